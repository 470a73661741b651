"""The actor runtime: ``create_executor(config) -> Executor``.

An :class:`Executor` is built once per job from a validated config; it holds
the credentials in memory only, never writes them into the config, and runs any
number of independent executions. ``events()`` is the rich stream (tokens tagged
with their node, node boundaries, tool calls); ``stream_to()`` pushes the same
events into callbacks, which is how the worker publishes them;
``execute_stream()`` is the token-only view and ``execute()`` the buffered one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage

from producer.config import (
    AgentConfig,
    GraphConfig,
    Limits,
    LLMConfig,
    ModelPrice,
    check_budget,
    parse_config,
    parse_credentials,
    parse_limits,
    parse_pricing,
)
from producer.errors import ActorqError
from producer.schema import ActorResult

from ..errors import ActorError, LimitExceeded, ProviderError
from .guard import Guard
from .providers import build_chat_model, provider_error
from .run import Run, RunEvent
from .scrub import scrub, secret_values

__all__ = ["EventSink", "Executor", "RunEvent", "TokenSink", "create_executor"]

#: Takes each token of :meth:`Executor.stream_to` as ``(text, node)``; a true return stops the run.
TokenSink = Callable[[str, str], object]
#: Takes every other event of :meth:`Executor.stream_to`; a true return stops the run.
EventSink = Callable[[RunEvent], object]


def create_executor(
    config_dict: Mapping[str, Any],
    credentials: Mapping[str, Mapping[str, str]] | None = None,
    limits: Mapping[str, Any] | Limits | None = None,
    pricing: Mapping[str, Any] | None = None,
    *,
    stall_timeout_ms: int | None = None,
) -> Executor:
    """Validate ``config_dict`` (never modified) and build an :class:`Executor`.

    Reads no files and no environment: everything comes from the arguments.
    Malformed configs raise :class:`producer.ConfigError` naming the field.
    """
    config = parse_config(config_dict)
    parsed_limits = parse_limits(limits)
    if stall_timeout_ms is not None and parsed_limits.stall_timeout_ms is None:
        parsed_limits = parsed_limits.model_copy(update={"stall_timeout_ms": stall_timeout_ms})
    executor = Executor(
        config, parse_credentials(credentials), parsed_limits, parse_pricing(pricing)
    )
    executor.check()
    return executor


class Executor:
    """Runs one actor config; see :func:`create_executor`."""

    def __init__(
        self,
        config: LLMConfig | AgentConfig | GraphConfig,
        credentials: Mapping[str, Mapping[str, str]],
        limits: Limits,
        pricing: Mapping[str, ModelPrice],
    ) -> None:
        self.config = config
        self.limits = limits
        self.pricing = pricing
        self._credentials = credentials
        self._secrets = secret_values(credentials)
        self.last_result: ActorResult | None = None
        self._run: Run | None = None  # the latest execution's state
        self._graph: Any = None

    @property
    def name(self) -> str:
        return self.config.name

    def check(self) -> None:
        """Fail at build time on what can be known before running (tools, graph shape)."""
        from . import actors

        actors.check(self.config, self._credentials)
        check_budget(self.config, self.limits, self.pricing)
        if isinstance(self.config, GraphConfig):
            self.compiled_graph()

    def compiled_graph(self) -> Any:
        """The LangGraph graph of a ``graph`` actor, compiled once per executor."""
        if self._graph is None:
            from .graph import build_graph

            assert isinstance(self.config, GraphConfig)
            self._graph = build_graph(self, self.config)
        return self._graph

    def scrub(self, text: str) -> str:
        return scrub(text, self._secrets)

    def usage_so_far(self) -> ActorResult | None:
        """The latest execution's usage up to now (:meth:`Run.snapshot`), even while it runs."""
        return None if self._run is None else self._run.snapshot()

    # -- public API ---------------------------------------------------------------

    async def execute(self, message: str) -> ActorResult:
        """Run to the end and return the :class:`ActorResult` (non-streaming path)."""
        async for _ in self.events(message):
            pass
        assert self.last_result is not None
        return self.last_result

    async def execute_stream(self, message: str) -> AsyncIterator[str]:
        """Yield text tokens as the model produces them; ``last_result`` holds the result.

        Close the iterator when stopping early (``contextlib.aclosing``) so the
        provider stream is closed and ``last_result`` is set at once.
        """
        async with contextlib.aclosing(self.events(message)) as events:
            async for event in events:
                if event.type == "token":
                    yield event.text

    async def events(self, message: str) -> AsyncGenerator[RunEvent, None]:
        """Every event of one execution, with ``timeout_ms`` and the stall guard enforced."""
        _check_message(message)
        from . import actors

        run = self._run = Run(self.limits, self.pricing)
        self.last_result = None
        inner: Any = actors.drive(self, run, message)
        guard = Guard(self.limits.timeout_ms, self.limits.stall_timeout_ms)
        with self._settle(run):
            try:
                stall = True
                while True:
                    try:
                        event = await guard.next(inner, stall=stall)
                    except StopAsyncIteration:
                        break
                    # After a tool call the source runs the tool: no model to stall.
                    stall = event.type != "tool_call"
                    yield event
                self.last_result = run.result()
            finally:
                guard.close()
                with contextlib.suppress(Exception):
                    await inner.aclose()

    async def stream_to(self, message: str, on_token: TokenSink, on_event: EventSink) -> None:
        """Run as :meth:`events` does, pushing each token to ``on_token(text, node)`` and
        every other event to ``on_event(event)``; ``last_result`` holds the result.

        A sink that returns true stops the run, as closing the :meth:`events` stream
        does (``finish_reason`` ``cancelled``). For an ``llm`` actor nothing stands
        between the model's stream and ``on_token``: each async generator on a
        token's way cost about a microsecond of CPU per token, and the worker
        publishes hundreds of thousands of tokens a minute.
        """
        _check_message(message)
        config = self.config
        if isinstance(config, AgentConfig | GraphConfig):
            async with contextlib.aclosing(self.events(message)) as events:
                async for event in events:
                    if event.type == "token":
                        if on_token(event.text, event.node):
                            return
                    elif on_event(event):
                        return
            return
        run = self._run = Run(self.limits, self.pricing)
        self.last_result = None
        guard = Guard(self.limits.timeout_ms, self.limits.stall_timeout_ms)
        with self._settle(run):
            try:
                stopped = await self._push_model(
                    run, config, self.messages_for(config, message), guard, on_token
                )
            finally:
                guard.close()
            self.last_result = run.result("cancelled") if stopped else run.result()

    @contextlib.contextmanager
    def _settle(self, run: Run) -> Iterator[None]:
        """Set ``last_result`` for a run that ends in an exception, typed as callers expect."""
        try:
            yield
        except LimitExceeded as exc:
            reason = "timeout" if exc.timed_out else "limit"
            self.last_result = run.result(reason, str(exc))
            raise
        except ActorqError as exc:  # typed already (provider, credentials, ...): keep it
            self.last_result = run.result("error", self.scrub(str(exc)))
            raise
        except (asyncio.CancelledError, GeneratorExit):
            self.last_result = run.result("cancelled")
            raise
        except Exception as exc:
            # Provider failures are classified where the model is called; anything
            # else escaping here is the runtime's own failure, not the provider's.
            err = ActorError(self.scrub(f"{type(exc).__name__}: {exc}"))
            self.last_result = run.result("error", str(err))
            raise err from None

    async def _push_model(
        self,
        run: Run,
        cfg: LLMConfig,
        messages: list[BaseMessage],
        guard: Guard,
        on_token: TokenSink,
    ) -> bool:
        """:meth:`stream_model` for an ``llm`` actor, its tokens pushed to ``on_token``
        under ``guard``; True when ``on_token`` stopped it."""
        node, model = cfg.name, self.chat_model(cfg)
        call = _ModelCall(run, node, cfg, messages)
        stream = model.astream(messages)
        # Bound once: this loop runs once per token, and Guard.next written out, as a
        # coroutine per token cost more than the guard's own bookkeeping.
        step, begin, end = stream.__anext__, guard.begin, guard.end
        task = asyncio.current_task()
        keep, count = call.parts.append, run.on_token
        costed = run.limits.max_cost_usd is not None
        try:
            while True:
                begin(True, task)
                try:
                    chunk = await step()
                except StopAsyncIteration:
                    break
                except asyncio.CancelledError as exc:
                    guard.raise_cancelled(exc)
                except (ProviderError, LimitExceeded):
                    raise
                except Exception as exc:
                    raise provider_error(exc, self._secrets) from None
                finally:
                    end()
                text = chunk.content
                for piece in (text,) if isinstance(text, str) else _block_texts(text):
                    if piece:
                        keep(piece)
                        count(piece)
                        if on_token(piece, node):
                            return True
                        if costed:
                            run.check_cost()
                call.see(chunk)
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()
        call.end()
        return False

    # -- building blocks for actors -----------------------------------------------------

    def messages_for(self, cfg: LLMConfig, message: str) -> list[BaseMessage]:
        out: list[BaseMessage] = []
        if cfg.system_prompt:
            out.append(SystemMessage(cfg.system_prompt))
        out.append(HumanMessage(message))
        return out

    def chat_model(self, cfg: LLMConfig) -> Any:
        return build_chat_model(cfg, self._credentials)

    async def stream_model(
        self,
        run: Run,
        node: str,
        cfg: LLMConfig,
        model: Any | None,
        messages: list[BaseMessage],
        reply: list[AIMessage],
    ) -> AsyncIterator[RunEvent]:
        """One model call through ``astream``: yield tokens, append the full reply to ``reply``.

        ``model`` None: build ``cfg``'s chat model here, once the stream is first awaited.
        """
        if model is None:
            model = self.chat_model(cfg)
        call = _ModelCall(run, node, cfg, messages)
        # Bound once: this loop runs once per token.
        keep, on_token = call.parts.append, run.on_token
        costed = run.limits.max_cost_usd is not None
        try:
            async for chunk in model.astream(messages):
                text = chunk.content
                # A plain string is the common case: no list per chunk for it.
                for piece in (text,) if isinstance(text, str) else _block_texts(text):
                    if piece:
                        keep(piece)
                        on_token(piece)
                        yield RunEvent("token", piece, node)
                        # After the yield: the token that passes the budget is still
                        # published, so the stream and the partial result agree.
                        if costed:
                            run.check_cost()
                call.see(chunk)
        except ProviderError:
            raise
        except (asyncio.CancelledError, GeneratorExit, LimitExceeded):
            raise
        except Exception as exc:
            raise provider_error(exc, self._secrets) from None
        reply.append(call.end())


class _ModelCall:
    """One model call's text, usage, tool-call chunks and finish reason as chunks arrive."""

    __slots__ = ("finish", "parts", "run", "tool_chunks", "usage")

    def __init__(self, run: Run, node: str, cfg: LLMConfig, messages: list[BaseMessage]) -> None:
        run.begin_model_call(node, cfg.provider, cfg.model, _prompt_text(messages))
        self.run = run
        self.parts: list[str] = []
        self.usage: Any = None
        self.tool_chunks: list[Any] = []
        self.finish: str | None = None

    def see(self, chunk: Any) -> None:
        """Take what a chunk carries besides its text."""
        if chunk.usage_metadata:
            self.usage = chunk.usage_metadata
        if chunk.tool_call_chunks:
            self.tool_chunks.append(chunk)
        fr = chunk.response_metadata.get("finish_reason") if chunk.response_metadata else None
        if fr:
            self.finish = fr

    def end(self) -> AIMessage:
        """Account the finished call; the full reply.

        Raises a retryable ``ProviderError`` when the stream ended without a finish
        reason: every OpenAI-style stream closes with one, so its absence means the
        body was cut where HTTP could not tell (a proxy ending the response cleanly,
        a close-delimited body). The call is accounted first: it was billed.
        """
        output = "".join(self.parts)
        self.run.end_model_call(self.usage, output)
        if self.finish is None:
            raise ProviderError(
                "the model's stream ended without a finish reason: its reply was cut short",
                retryable=True,
            )
        tool_calls: list[Any] = []
        invalid: list[Any] = []
        if self.tool_chunks:
            merged = self.tool_chunks[0]
            for c in self.tool_chunks[1:]:
                merged = merged + c
            tool_calls = list(merged.tool_calls)
            invalid = list(merged.invalid_tool_calls)  # arguments that are not JSON
        if self.finish == "length":
            self.run.finish_reason = "length"
        return AIMessage(content=output, tool_calls=tool_calls, invalid_tool_calls=invalid)


def _check_message(message: object) -> None:
    if not isinstance(message, str):
        raise TypeError(f"message must be a str, not {type(message).__name__}")


def _block_texts(content: list[Any]) -> list[str]:
    return [b.get("text") or "" for b in content if isinstance(b, dict)]


def _prompt_text(messages: list[BaseMessage]) -> str:
    return "\n".join(str(m.content) for m in messages)
