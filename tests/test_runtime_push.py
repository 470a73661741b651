"""``Executor.stream_to``: the pushed run the worker publishes from, against ``events()``.

Each test drives the real ``langchain-openai`` client against the scripted
OpenAI-compatible server, through both paths where both apply, and checks that
they agree: the same events, the same result, the same typed errors.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import langchain_openai  # noqa: F401  (imported here, not inside a timed run: ~3 s cold)
import pytest

from producer.schema import ActorResult
from tests.openai_server import FakeOpenAI, Reply, ToolCall
from tests.runtime_support import collect, creds, llm, model, review_graph, run, wait_for
from worker import Executor, LimitExceeded, ProviderError, create_executor
from worker.runtime.executor import RunEvent


async def _pushed(ex: Executor, message: str, stop_after: int | None = None) -> list[RunEvent]:
    """Every event ``stream_to`` pushed, tokens as ``RunEvent`` too; stop after ``stop_after`` tokens."""
    got: list[RunEvent] = []

    def on_token(text: str, node: str) -> bool:
        got.append(RunEvent("token", text, node))
        return stop_after is not None and sum(e.type == "token" for e in got) >= stop_after

    def on_event(event: RunEvent) -> bool:
        got.append(event)
        return False

    await ex.stream_to(message, on_token, on_event)
    return got


def _same_result(a: ActorResult, b: ActorResult) -> None:
    timing = {"duration_ms", "time_to_first_token_ms"}
    assert a.model_dump(exclude=timing) == b.model_dump(exclude=timing)


def test_llm_pushes_the_events_and_result_of_events(openai_server: FakeOpenAI) -> None:
    m = openai_server.script(
        model("push"),
        Reply(text="Streams are append-only logs."),
        Reply(text="Streams are append-only logs."),
    )
    price = {m: {"input": "2.50", "output": "10"}}
    ex = create_executor(llm(m, system_prompt="Be brief."), creds(openai_server), pricing=price)
    pulled = run(collect(ex.events("What is a stream?")))
    by_pull = ex.last_result
    pushed = run(_pushed(ex, "What is a stream?"))
    assert pushed == pulled
    assert [e.text for e in pushed] == ["Streams", " are", " append-only", " logs."]
    assert {e.node for e in pushed} == {"writer"}
    assert by_pull is not None and ex.last_result is not None
    _same_result(ex.last_result, by_pull)
    assert ex.last_result.cost_usd == (Decimal("2.50") * 6 + Decimal(10) * 4) / Decimal(1_000_000)


@pytest.mark.parametrize("kind", ["agent", "graph"])
def test_agents_and_graphs_push_every_event(openai_server: FakeOpenAI, kind: str) -> None:
    if kind == "agent":
        m = openai_server.script(
            model("agent"),
            *[
                Reply(text="", tool_calls=(ToolCall("calculator", {"expression": "6*7"}),)),
                Reply(text="It is 42."),
            ]
            * 2,
        )
        config: dict[str, Any] = {
            **llm(m),
            "type": "agent",
            "name": "maths",
            "tools": ["calculator"],
        }
    else:
        draft, review = model("draft"), model("review")
        openai_server.script(draft, Reply(text="A draft."), Reply(text="A draft."))
        openai_server.script(review, Reply(text="Fine."), Reply(text="Fine."))
        config = review_graph(draft, review)
    ex = create_executor(config, creds(openai_server))
    pulled = run(collect(ex.events("go")))
    by_pull = ex.last_result
    pushed = run(_pushed(ex, "go"))
    assert len({e.type for e in pushed}) > 1  # tokens and the kind's own events
    assert [(e.type, e.text, e.node, e.data.get("tool"), e.data.get("output")) for e in pushed] == [
        (e.type, e.text, e.node, e.data.get("tool"), e.data.get("output")) for e in pulled
    ]
    assert by_pull is not None and ex.last_result is not None
    _same_result(ex.last_result, by_pull)


@pytest.mark.parametrize("kind", ["llm", "agent"])
def test_a_sink_that_says_stop_ends_the_run_as_cancelled(
    openai_server: FakeOpenAI, kind: str
) -> None:
    m = openai_server.script(model("stop"), Reply(text="a b c d e f g h", chunk_delay_s=0.2))
    config = llm(m) if kind == "llm" else {**llm(m), "type": "agent", "tools": ["calculator"]}
    ex = create_executor(config, creds(openai_server))
    pushed = run(_pushed(ex, "go", stop_after=2))
    assert [e.text for e in pushed] == ["a", " b"]
    result = ex.last_result
    assert result is not None and result.finish_reason == "cancelled" and result.text == "a b"
    wait_for(lambda: m in openai_server.closed_early)


def test_limits_stop_a_pushed_run_with_a_partial_result(openai_server: FakeOpenAI) -> None:
    words = " ".join(f"w{i}" for i in range(20))
    m = openai_server.script(model("slow"), Reply(text=words, chunk_delay_s=0.1))
    ex = create_executor(llm(m), creds(openai_server), {"timeout_ms": 600})
    with pytest.raises(LimitExceeded) as info:
        run(_pushed(ex, "go"))
    assert info.value.limit == "timeout_ms" and info.value.timed_out
    result = ex.last_result
    assert result is not None and result.finish_reason == "timeout" and result.text.startswith("w0")
    wait_for(lambda: m in openai_server.closed_early)

    m = openai_server.script(model("stall"), Reply(text="a b", first_delay_s=1.0))
    ex = create_executor(llm(m), creds(openai_server), {"stall_timeout_ms": 300})
    with pytest.raises(LimitExceeded) as info:
        run(_pushed(ex, "go"))
    assert info.value.limit == "stall_timeout_ms" and info.value.timed_out
    assert ex.last_result is not None and ex.last_result.finish_reason == "timeout"

    m = openai_server.script(model("costly"), Reply(text=words, chunk_delay_s=0.02))
    price = {m: {"input": "0", "output": "1000000"}}  # 1 USD per output token
    ex = create_executor(llm(m), creds(openai_server), {"max_cost_usd": "2.5"}, price)
    with pytest.raises(LimitExceeded) as info:
        run(_pushed(ex, "go"))
    assert info.value.limit == "max_cost_usd"
    result = ex.last_result
    assert result is not None and result.finish_reason == "limit" and result.text == "w0 w1 w2"


def test_provider_errors_are_typed_and_scrubbed(openai_server: FakeOpenAI) -> None:
    m = openai_server.script(model("down"), Reply(status=503, error_message="overloaded"))
    ex = create_executor(llm(m), creds(openai_server))
    with pytest.raises(ProviderError) as info:
        run(_pushed(ex, "go"))
    assert info.value.retryable
    assert ex.last_result is not None and ex.last_result.finish_reason == "error"

    m = openai_server.script(model("cut"), Reply(text="a b c d e", cut_after=2))
    ex = create_executor(llm(m), creds(openai_server))
    with pytest.raises(ProviderError):
        run(_pushed(ex, "go"))
    assert ex.last_result is not None and ex.last_result.text == "a b"


def test_a_message_that_is_not_text_is_refused(openai_server: FakeOpenAI) -> None:
    ex = create_executor(llm(model("never")), creds(openai_server))
    with pytest.raises(TypeError, match="message must be a str"):
        run(ex.stream_to(b"go", lambda text, node: None, lambda event: None))  # type: ignore[arg-type]
    assert ex.last_result is None
