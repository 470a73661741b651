"""``graph`` actors: a LangGraph ``StateGraph`` of llm / agent nodes.

Shape of a run:

- The state is the shared transcript: the user's message, then each node's
  final answer as an ``AIMessage`` named after the node. A node sees its own
  ``system_prompt`` followed by that transcript, so a reviewer reads the draft.
  Tool calls and tool results stay inside the agent node that made them.
- Routing: after a node ran, its edges are tried in config order; the first
  whose ``when`` text occurs in the node's output (case-insensitive), or that
  has no ``when``, is followed. No match, or an edge to ``"__end__"``, ends the
  graph. So exactly one node runs at a time and the last one's answer is the
  actor's final text.
- Visits: each node may run ``max_visits`` times per execution (once when the
  graph has no cycle). A route to a node that used its visits ends the graph
  with finish reason ``max_visits``; that is a normal ending, not an error.
- Streaming: every node runs its model through ``astream`` and hands each
  event (tokens tagged with the node name, tool calls, ``node_start`` /
  ``node_end``) to LangGraph's stream writer; the graph runs through
  ``CompiledStateGraph.astream(stream_mode="custom")``, so events arrive as
  the models produce them. Limits raised inside a node stop the whole graph.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Annotated, Any, TypedDict

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.types import StreamWriter

from producer.config import GRAPH_END, GraphConfig, GraphEdge, LLMConfig

from .run import Run, RunEvent

if TYPE_CHECKING:
    from .executor import Executor

__all__ = ["build_graph", "message_text", "next_node", "run_graph"]


def _add_visits(old: Mapping[str, int], new: Mapping[str, int]) -> dict[str, int]:
    out = dict(old)
    for node, n in new.items():
        out[node] = out.get(node, 0) + n
    return out


class GraphState(TypedDict):
    messages: Annotated[list[BaseMessage], add_messages]
    visits: Annotated[dict[str, int], _add_visits]
    route: str


def message_text(message: BaseMessage) -> str:
    """The plain text of a message (content blocks joined)."""
    content = message.content
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") if isinstance(b, dict) else str(b) for b in content)


def next_node(
    edges: list[GraphEdge], output: str, visits: Mapping[str, int], max_visits: int
) -> tuple[str, bool]:
    """``(target, exhausted)``: where a node with ``output`` routes to.

    ``target`` is a node name or ``GRAPH_END``; ``exhausted`` is true when the
    chosen node already ran ``max_visits`` times, so the graph ends instead.
    """
    lowered = output.lower()
    for edge in edges:
        if edge.when is None or edge.when.lower() in lowered:
            if edge.target == GRAPH_END:
                return GRAPH_END, False
            if visits.get(edge.target, 0) >= max_visits:
                return GRAPH_END, True
            return edge.target, False
    return GRAPH_END, False


def build_graph(executor: Executor, config: GraphConfig) -> Any:
    """Compile the config into a LangGraph graph; the per-run :class:`Run` comes in ``configurable``."""
    from .actors import run_node

    max_visits = config.max_visits or 1
    outgoing: dict[str, list[GraphEdge]] = {name: [] for name in config.nodes}
    for edge in config.edges:
        outgoing[edge.source].append(edge)

    def make_node(name: str, cfg: LLMConfig) -> Any:
        async def node(
            state: GraphState, config: RunnableConfig, writer: StreamWriter
        ) -> dict[str, Any]:
            run: Run = config["configurable"]["actorq_run"]
            visit = state["visits"].get(name, 0) + 1
            writer(RunEvent("node_start", node=name, data={"visit": str(visit)}))
            messages: list[BaseMessage] = []
            if cfg.system_prompt:
                messages.append(SystemMessage(cfg.system_prompt))
            messages.extend(state["messages"])
            async for event in run_node(executor, run, name, cfg, messages):
                writer(event)
            answer = next(m for m in reversed(messages) if isinstance(m, AIMessage))
            output = message_text(answer)
            visits = {**state["visits"], name: visit}
            target, exhausted = next_node(outgoing[name], output, visits, max_visits)
            if exhausted:
                run.finish_reason = "max_visits"
            writer(RunEvent("node_end", node=name, data={"visit": str(visit), "next": target}))
            return {
                "messages": [AIMessage(content=output, name=name)],
                "visits": {name: 1},
                "route": target,
            }

        return node

    builder: Any = StateGraph(GraphState)
    for name, cfg in config.nodes.items():
        builder.add_node(name, make_node(name, cfg))
    builder.add_edge(START, config.entry)
    for name in config.nodes:
        targets = {e.target for e in outgoing[name] if e.target != GRAPH_END}
        builder.add_conditional_edges(
            name, _route, {**{t: t for t in sorted(targets)}, GRAPH_END: END}
        )
    return builder.compile(name=config.name)


def _route(state: GraphState) -> str:
    return state["route"]


async def run_graph(
    executor: Executor, run: Run, config: GraphConfig, message: str
) -> AsyncIterator[RunEvent]:
    """Run the compiled graph once, yielding every node's events as they happen."""
    graph = executor.compiled_graph()
    steps = (config.max_visits or 1) * len(config.nodes)
    run_config: RunnableConfig = {
        "configurable": {"actorq_run": run},
        "recursion_limit": steps + 1,
    }
    state = {"messages": [HumanMessage(message)], "visits": {}, "route": GRAPH_END}
    async for event in graph.astream(state, run_config, stream_mode="custom"):
        if isinstance(event, RunEvent):
            yield event
