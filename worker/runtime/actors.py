"""How each actor kind runs: ``llm``, ``agent`` (tool loop) and ``graph`` (LangGraph)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from langchain_core.messages import AIMessage, BaseMessage, ToolMessage

from producer.config import AgentConfig, GraphConfig, LLMConfig, check_credentials

from ..errors import ConfigError
from .run import Run, RunEvent
from .tools import get_tool, tool_names

if TYPE_CHECKING:
    from .executor import Executor

__all__ = ["check", "drive"]

_TOOL_OUTPUT_MAX = 4000


def check(
    config: LLMConfig | AgentConfig | GraphConfig, credentials: Mapping[str, Mapping[str, str]]
) -> None:
    """Build-time checks that need the worker's registry or the credentials."""
    if isinstance(config, GraphConfig):
        for name, node in config.nodes.items():
            _check_tools(node, f"config.nodes.{name}.tools")
    else:
        _check_tools(config, "config.tools")
    check_credentials(config, credentials)


def _check_tools(cfg: LLMConfig, field: str) -> None:
    if isinstance(cfg, AgentConfig):
        for i, name in enumerate(cfg.tools):
            if get_tool(name) is None:
                raise ConfigError(
                    f"{field}.{i}", f"unknown tool {name!r} (have: {', '.join(tool_names())})"
                )


def drive(executor: Executor, run: Run, message: str) -> AsyncIterator[RunEvent]:
    config = executor.config
    if isinstance(config, GraphConfig):
        from .graph import run_graph

        return run_graph(executor, run, config, message)
    messages = executor.messages_for(config, message)
    if not isinstance(config, AgentConfig):
        # A plain llm actor is one model call: its tokens come straight from the
        # model stream, one async-generator hop fewer per token than run_node.
        return executor.stream_model(run, config.name, config, None, messages, [])
    return run_node(executor, run, config.name, config, messages)


async def run_node(
    executor: Executor, run: Run, node: str, cfg: LLMConfig, messages: list[BaseMessage]
) -> AsyncIterator[RunEvent]:
    """An llm node (one model call) or an agent node (model and tools until a plain answer).

    Appends every message it produces to ``messages``.
    """
    model = executor.chat_model(cfg)
    tools = [get_tool(n) for n in cfg.tools] if isinstance(cfg, AgentConfig) else []
    if tools:
        model = model.bind_tools(tools)
    iterations = cfg.max_iterations if isinstance(cfg, AgentConfig) else 1
    for _ in range(iterations):
        reply: list[AIMessage] = []
        async for event in executor.stream_model(run, node, cfg, model, messages, reply):
            yield event
        answer = reply[0]
        messages.append(answer)
        calls: list[Any] = [*answer.tool_calls, *answer.invalid_tool_calls]
        if not calls or not tools:
            return
        for call in calls:
            name = call.get("name") or ""
            run.begin_tool_call(name)
            call_id = call.get("id") or ""
            args = call.get("args")
            yield RunEvent(
                "tool_call",
                node=node,
                data={
                    "tool": name,
                    "call_id": call_id,
                    "args": args if isinstance(args, str) else json.dumps(args or {}),
                },
            )
            tool = get_tool(name)
            if call.get("type") == "invalid_tool_call":
                # Told, as a failing tool is, so the model can call again properly.
                output = f"error: the arguments of {name!r} are not a JSON object"
            elif tool is None or tool not in tools:
                output = f"error: tool {name!r} is not available to this actor"
            else:
                try:
                    output = str(await tool.ainvoke(call["args"]))
                except Exception as exc:  # a tool's failure is the model's to handle
                    output = f"error: {type(exc).__name__}: {executor.scrub(str(exc))}"
            output = output[:_TOOL_OUTPUT_MAX]
            yield RunEvent(
                "tool_result", node=node, data={"tool": name, "call_id": call_id, "output": output}
            )
            messages.append(ToolMessage(content=output, tool_call_id=call_id))
    run.finish_reason = "max_iterations"
