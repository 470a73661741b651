"""A deterministic chat model for demos, tests and benchmarks.

It streams a configured reply (or echoes the last human message) word by word
with configurable delays, can play a script of tool-calling turns for agents,
and reports ``usage_metadata`` like a real provider (switchable, so the usage
fallbacks can be exercised).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

__all__ = ["ScriptedChatModel", "split_tokens"]

_TOKEN = re.compile(r"\s*\S+|\s+")


def split_tokens(text: str) -> list[str]:
    """Split text into word-sized tokens that join back to exactly ``text``."""
    return _TOKEN.findall(text)


class ScriptedChatModel(BaseChatModel):
    """Streams a fixed reply, an echo, or a script of turns, token by token."""

    reply: str | None = None
    script: list[dict[str, Any]] | None = None
    first_token_delay_s: float = 0.0
    token_delay_s: float = 0.0
    report_usage: bool = True
    model_name: str = "scripted"

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Any:
        # Tool calls come from the script; binding only has to be accepted.
        return self

    def _turn(self, messages: list[BaseMessage]) -> dict[str, Any]:
        if self.script:
            done = 0  # this turn's own replies so far (graph nodes' answers are named)
            for m in reversed(messages):
                if isinstance(m, HumanMessage) or (isinstance(m, AIMessage) and m.name):
                    break
                done += isinstance(m, AIMessage)
            return self.script[min(done, len(self.script) - 1)]
        if self.reply is not None:
            return {"text": self.reply}
        human = [m for m in messages if isinstance(m, HumanMessage)]
        last = human[-1].content if human else ""
        return {"text": last if isinstance(last, str) else str(last)}

    def _usage(self, messages: list[BaseMessage], text: str) -> dict[str, int]:
        prompt = sum(len(split_tokens(str(m.content))) for m in messages)
        out = len(split_tokens(text))
        return {"input_tokens": prompt, "output_tokens": out, "total_tokens": prompt + out}

    def _chunks(self, messages: list[BaseMessage]) -> Iterator[AIMessageChunk]:
        turn = self._turn(messages)
        text = turn.get("text", "")
        for token in split_tokens(text):
            yield AIMessageChunk(content=token)
        calls = turn.get("tool_calls") or []
        if calls:
            import json

            yield AIMessageChunk(
                content="",
                tool_call_chunks=[
                    tool_call_chunk(
                        name=c["name"], args=json.dumps(c.get("args", {})), id=f"call_{i}", index=i
                    )
                    for i, c in enumerate(calls)
                ],
            )
        final: dict[str, Any] = {
            "response_metadata": {
                "finish_reason": "tool_calls" if calls else "stop",
                "model_name": self.model_name,
            }
        }
        if self.report_usage:
            final["usage_metadata"] = self._usage(messages, text)
        yield AIMessageChunk(content="", chunk_position="last", **final)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        # Paced like a network source: token i is due at start + ttft + i * delay, so a
        # consumer that falls behind gets the backlog at once, as from a socket buffer,
        # instead of slowing the model down.
        loop = asyncio.get_running_loop()
        due = loop.time()
        first = True
        for chunk in self._chunks(messages):
            if chunk.content or chunk.tool_call_chunks:
                due += self.first_token_delay_s if first else self.token_delay_s
                first = False
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            gen = ChatGenerationChunk(message=chunk)
            if run_manager and isinstance(chunk.content, str) and chunk.content:
                await run_manager.on_llm_new_token(chunk.content, chunk=gen)
            yield gen

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        due = time.monotonic()
        first = True
        for chunk in self._chunks(messages):
            if chunk.content or chunk.tool_call_chunks:
                due += self.first_token_delay_s if first else self.token_delay_s
                first = False
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            yield ChatGenerationChunk(message=chunk)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        merged: AIMessageChunk | None = None
        for chunk in self._stream(messages, stop, run_manager, **kwargs):
            merged = chunk.message if merged is None else merged + chunk.message  # type: ignore[assignment]
        assert merged is not None
        msg = AIMessage(
            content=merged.content,
            tool_calls=merged.tool_calls,
            usage_metadata=merged.usage_metadata,
            response_metadata=merged.response_metadata,
        )
        return ChatResult(generations=[ChatGeneration(message=msg)])
