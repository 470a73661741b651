"""Limits of the actor runtime: each stops the run with a typed LimitExceeded and a partial result."""

from __future__ import annotations

import asyncio
import contextlib
from decimal import Decimal
from typing import Any

import langchain_openai  # noqa: F401  (imported here, not inside a timed run: ~3 s cold)
import pytest

from producer import InvalidInput
from tests.openai_server import FakeOpenAI, Reply, ToolCall
from tests.runtime_support import creds, llm, model, review_graph, run, wait_for
from worker import (
    Executor,
    LimitExceeded,
    create_executor,
)

# -- limits ------------------------------------------------------------------------


def _limited(
    server: FakeOpenAI, reply: Reply, limits: dict[str, Any], **kw: Any
) -> tuple[Executor, str]:
    m = server.script(model("limit"), reply)
    return create_executor(llm(m), creds(server), limits, **kw), m


def test_timeout_ms_covers_the_stream(openai_server: FakeOpenAI) -> None:
    words = " ".join(f"w{i}" for i in range(20))
    ex, m = _limited(openai_server, Reply(text=words, chunk_delay_s=0.1), {"timeout_ms": 600})
    got: list[str] = []

    async def consume() -> None:
        async for token in ex.execute_stream("go"):
            got.append(token)

    with pytest.raises(LimitExceeded) as info:
        run(consume())
    assert info.value.limit == "timeout_ms" and info.value.timed_out
    assert "timeout_ms" in str(info.value)
    result = ex.last_result
    assert result is not None and result.finish_reason == "timeout"
    assert 0 < len(got) < 20 and result.text == "".join(got)  # partial, as far as it came
    assert result.output_tokens == len(got) and result.model_calls == 1
    assert result.nodes[0].usage_source == "heuristic"  # cut before the usage chunk
    wait_for(lambda: m in openai_server.closed_early)


def test_timeout_ms_counts_a_slow_consumer(openai_server: FakeOpenAI) -> None:
    ex, _ = _limited(openai_server, Reply(text="a b c d e f g h"), {"timeout_ms": 500})

    async def slow() -> None:
        async for _ in ex.execute_stream("go"):
            await asyncio.sleep(0.2)

    with pytest.raises(LimitExceeded) as info:
        run(slow())
    assert info.value.limit == "timeout_ms"


def test_stall_timeout(openai_server: FakeOpenAI) -> None:
    ex, _ = _limited(
        openai_server, Reply(text="late", first_delay_s=2.0), {"stall_timeout_ms": 300}
    )
    with pytest.raises(LimitExceeded) as info:
        run(ex.execute("go"))
    assert info.value.limit == "stall_timeout_ms" and info.value.timed_out
    assert ex.last_result is not None and ex.last_result.finish_reason == "timeout"


def _tool_loop(server: FakeOpenAI, limits: dict[str, Any], calls: int = 1) -> Executor:
    m = server.script(
        model("loop"),
        Reply(
            text="", tool_calls=tuple(ToolCall("word_count", {"text": "a b"}) for _ in range(calls))
        ),
        Reply(text="", tool_calls=(ToolCall("word_count", {"text": "a b c"}),)),
        Reply(text="done"),
    )
    return create_executor(
        {**llm(m), "type": "agent", "tools": ["word_count"]}, creds(server), limits
    )


def test_max_model_calls(openai_server: FakeOpenAI) -> None:
    ex = _tool_loop(openai_server, {"max_model_calls": 2})
    with pytest.raises(LimitExceeded) as info:
        run(ex.execute("count"))
    assert info.value.limit == "max_model_calls" and not info.value.timed_out
    result = ex.last_result
    assert result is not None and result.finish_reason == "limit"
    assert (result.model_calls, result.tool_calls) == (2, 2)
    assert "max_model_calls" in (result.error or "")


def test_max_tool_calls(openai_server: FakeOpenAI) -> None:
    ex = _tool_loop(openai_server, {"max_tool_calls": 1}, calls=2)
    events: list[Any] = []

    async def consume() -> None:
        async for e in ex.events("count"):
            events.append(e)

    with pytest.raises(LimitExceeded) as info:
        run(consume())
    assert info.value.limit == "max_tool_calls"
    assert [e.type for e in events].count("tool_result") == 1
    result = ex.last_result
    assert result is not None and (result.model_calls, result.tool_calls) == (1, 1)


def test_max_cost_usd_stops_mid_stream(openai_server: FakeOpenAI) -> None:
    words = " ".join(f"w{i}" for i in range(30))
    m = openai_server.script(model("costly"), Reply(text=words, chunk_delay_s=0.05))
    price = {m: {"input": "0", "output": "1000000"}}  # 1 USD per output token
    ex = create_executor(llm(m), creds(openai_server), {"max_cost_usd": "2.5"}, price)
    with pytest.raises(LimitExceeded) as info:
        run(ex.execute("go"))
    assert info.value.limit == "max_cost_usd"
    result = ex.last_result
    assert result is not None and result.finish_reason == "limit"
    assert result.text == "w0 w1 w2"  # stopped at the token that passed the budget
    assert result.cost_usd is not None and result.cost_usd > Decimal("2.5")
    wait_for(lambda: m in openai_server.closed_early)


def test_max_cost_usd_counts_the_prompt_and_finished_calls(openai_server: FakeOpenAI) -> None:
    m = openai_server.script(
        model("budget"), Reply(text="", tool_calls=(ToolCall("word_count", {"text": "x"}),))
    )
    ex = create_executor(
        {**llm(m), "type": "agent", "tools": ["word_count"]},
        creds(openai_server),
        {"max_cost_usd": "0.00003"},
        {m: {"input": "1", "output": "1"}},  # 1 USD per million tokens
    )
    # 20 prompt words: the first call (about 20 tokens) fits, the second one's prompt does not.
    with pytest.raises(LimitExceeded) as info:
        run(ex.execute(" ".join(["word"] * 20)))
    assert info.value.limit == "max_cost_usd"
    result = ex.last_result
    # The over-budget call never went out, and is not counted as made.
    assert result is not None and result.model_calls == 1 and result.tool_calls == 1
    assert len(openai_server.calls(m)) == 1
    assert result.cost_usd is not None and result.cost_usd < Decimal("0.00003")


def test_a_node_the_budget_stops_before_its_call_leaves_the_result_to_the_last(
    openai_server: FakeOpenAI,
) -> None:
    d = openai_server.script(model("cheap-draft"), Reply(text="quick draft"))
    r = openai_server.script(model("dear-review"), Reply(text="fine"))
    price = {d: {"input": "0", "output": "0"}, r: {"input": "1000000", "output": "0"}}
    ex = create_executor(review_graph(d, r), creds(openai_server), {"max_cost_usd": "1"}, price)
    with pytest.raises(LimitExceeded) as info:
        run(ex.execute("go"))
    assert info.value.limit == "max_cost_usd"
    result = ex.last_result
    assert result is not None and result.finish_reason == "limit"
    assert openai_server.calls(r) == []  # the review's prompt alone was over budget
    assert result.model_calls == 1 and result.text == "quick draft"
    assert [n.node for n in result.nodes] == ["draft"] and result.cost_usd == 0


def test_a_budget_needs_a_price_for_every_model(openai_server: FakeOpenAI) -> None:
    with pytest.raises(InvalidInput) as info:
        create_executor(llm("unpriced"), creds(openai_server), {"max_cost_usd": 1})
    assert info.value.field == "pricing" and "unpriced" in str(info.value)


def test_limits_stop_a_graph_inside_its_nodes(openai_server: FakeOpenAI) -> None:
    d = openai_server.script(model("draft"), Reply(text="quick draft"))
    r = openai_server.script(model("review"), Reply(text="a b c d e f g h i j", chunk_delay_s=0.2))
    ex = create_executor(review_graph(d, r), creds(openai_server), {"max_model_calls": 1})
    with pytest.raises(LimitExceeded) as info:
        run(ex.execute("go"))
    assert info.value.limit == "max_model_calls"
    assert ex.last_result is not None and ex.last_result.text == "quick draft"
    assert [n.node for n in ex.last_result.nodes] == ["draft"]

    ex = create_executor(review_graph(d, r), creds(openai_server), {"timeout_ms": 800})
    events: list[Any] = []

    async def consume() -> None:
        async for e in ex.events("go"):
            events.append(e)

    with pytest.raises(LimitExceeded) as info:
        run(consume())
    assert info.value.limit == "timeout_ms"
    partial = [e.text for e in events if e.type == "token" and e.node == "review"]
    assert 0 < len(partial) < 10
    assert ex.last_result is not None and ex.last_result.text == "".join(partial)
    wait_for(lambda: r in openai_server.closed_early)


# -- cancellation --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["pulled", "pushed"])
def test_cancelling_an_execution_closes_the_stream_and_keeps_the_partial_result(
    openai_server: FakeOpenAI, path: str
) -> None:
    m = openai_server.script(model("cancel"), Reply(text="a b c d e f g h", chunk_delay_s=0.2))
    ex = create_executor(llm(m), creds(openai_server))

    async def cancel_after_two() -> None:
        got: list[str] = []

        async def consume() -> None:
            if path == "pushed":  # the worker's way: Executor.stream_to
                await ex.stream_to("go", lambda text, node: got.append(text), lambda e: None)
                return
            async for token in ex.execute_stream("go"):
                got.append(token)

        task = asyncio.create_task(consume())
        while len(got) < 2:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(cancel_after_two())
    result = ex.last_result
    assert result is not None and result.finish_reason == "cancelled"
    assert result.text.startswith("a b") and result.model_calls == 1
    wait_for(lambda: m in openai_server.closed_early)


def test_leaving_execute_stream_early_closes_the_provider_stream(openai_server: FakeOpenAI) -> None:
    m = openai_server.script(model("leave"), Reply(text="a b c d e f g h", chunk_delay_s=0.2))
    ex = create_executor(llm(m), creds(openai_server))

    async def first_two() -> list[str]:
        got: list[str] = []
        async with contextlib.aclosing(ex.execute_stream("go")) as tokens:
            async for token in tokens:
                got.append(token)
                if len(got) == 2:
                    break
        return got

    assert run(first_two()) == ["a", " b"]
    assert ex.last_result is not None and ex.last_result.finish_reason == "cancelled"
    assert ex.last_result.text == "a b"
    wait_for(lambda: m in openai_server.closed_early)


def test_the_last_node_decides_the_finish_reason(openai_server: FakeOpenAI) -> None:
    d = openai_server.script(
        model("cut-draft"), Reply(text="a draft cut sho", finish_reason="length")
    )
    r = openai_server.script(model("fine-review"), Reply(text="fine"))
    result = run(create_executor(review_graph(d, r), creds(openai_server)).execute("go"))
    assert result.text == "fine" and result.finish_reason == "stop"
    # ...and when the last call is the one cut short, the result says so.
    r2 = openai_server.script(model("cut-review"), Reply(text="fi", finish_reason="length"))
    result = run(create_executor(review_graph(d, r2), creds(openai_server)).execute("go"))
    assert result.finish_reason == "length"


async def _slow_lookup(query: str) -> str:
    """Look something up, slowly (a test tool)."""
    await asyncio.sleep(0.6)
    return f"found {query}"


def test_the_stall_limit_waits_for_the_model_not_for_tools(openai_server: FakeOpenAI) -> None:
    from worker import register_tool

    register_tool(_slow_lookup, name="slow_lookup_for_stall_test")
    call = ToolCall("slow_lookup_for_stall_test", {"query": "x"})
    m = openai_server.script(
        model("tool-stall"), Reply(text="", tool_calls=(call,)), Reply(text="ok")
    )
    config = {**llm(m), "type": "agent", "tools": ["slow_lookup_for_stall_test"]}
    limits = {"stall_timeout_ms": 300}
    # The tool takes 0.6 s: longer than the stall limit, which is the model's.
    result = run(create_executor(config, creds(openai_server), limits).execute("go"))
    assert result.text == "ok" and result.tool_calls == 1
    # The model still may not stall, before or after a tool.
    slow = openai_server.script(
        model("tool-then-stall"),
        Reply(text="", tool_calls=(call,)),
        Reply(text="late", first_delay_s=2),
    )
    ex = create_executor({**config, "model": slow}, creds(openai_server), limits)
    with pytest.raises(LimitExceeded) as info:
        run(ex.execute("go"))
    assert info.value.limit == "stall_timeout_ms"


# -- what the tries of a job used together ----------------------------------------------


def _try(*nodes: tuple[str, str, int, int, Decimal | None, str], tools: int = 0) -> Any:
    from producer.schema import ActorResult, NodeUsage

    usages = [
        NodeUsage(node=name, provider="openai", model=m, input_tokens=i, output_tokens=o,
                  total_tokens=i + o, model_calls=1, cost_usd=cost, usage_source=source)
        for name, m, i, o, cost, source in nodes
    ]  # fmt: skip
    costs = [u.cost_usd for u in usages]
    return ActorResult(
        text=f"text of {len(nodes)}",
        nodes=usages,
        input_tokens=sum(u.input_tokens for u in usages),
        output_tokens=sum(u.output_tokens for u in usages),
        total_tokens=sum(u.total_tokens for u in usages),
        cost_usd=None if not usages or None in costs else sum(costs, Decimal(0)),  # type: ignore[arg-type]
        model_calls=len(usages),
        tool_calls=tools,
        duration_ms=10,
    )


def test_combined_tries_add_up_per_node_and_keep_the_last_tries_output() -> None:
    from worker.runtime.budget import combine_tries

    first = _try(("a", "m", 10, 5, Decimal("0.1"), "tiktoken"), tools=1)
    nothing = _try()  # failed before any model call: cost nothing, known or not
    last = _try(
        ("a", "m", 10, 7, Decimal("0.2"), "provider"), ("b", "n", 3, 4, Decimal(1), "provider")
    )
    both = combine_tries([first, nothing], last, 1234.0)
    assert both.text == last.text and both.duration_ms == 1234.0
    assert [(n.node, n.input_tokens, n.output_tokens, n.model_calls) for n in both.nodes] == [
        ("a", 20, 12, 2),
        ("b", 3, 4, 1),
    ]
    assert both.nodes[0].usage_source == "provider+tiktoken"
    assert (both.input_tokens, both.output_tokens, both.total_tokens) == (23, 16, 39)
    assert both.cost_usd == Decimal("1.3")
    assert (both.model_calls, both.tool_calls) == (3, 1)
    # One call of unknown price makes the total unknown, as within one try.
    unpriced = _try(("a", "m", 1, 1, None, "provider"))
    assert combine_tries([unpriced], last, 1.0).cost_usd is None
