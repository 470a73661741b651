"""The actor runtime in process: the real ChatOpenAI over real HTTP against the fake server."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import time
from decimal import Decimal
from typing import Any

import pytest

from producer import InvalidInput
from tests.openai_server import FakeOpenAI, Reply, ToolCall
from tests.runtime_support import API_KEY, collect, creds, llm, model, run
from worker import (
    ActorResult,
    ConfigError,
    CredentialsError,
    Executor,
    LimitExceeded,
    NodeUsage,
    ProviderAuthError,
    ProviderError,
    create_executor,
)


def _requests(server: FakeOpenAI, name: str) -> list[dict[str, Any]]:
    return [r.body for r in server.calls(name)]


def _auth(server: FakeOpenAI, name: str) -> str:
    headers = {k.lower(): v for k, v in server.calls(name)[0].headers.items()}
    return headers["authorization"]


# -- llm ---------------------------------------------------------------------------


def test_llm_streams_tokens_with_provider_usage(openai_server: FakeOpenAI) -> None:
    m = openai_server.script(
        model("llm"), Reply(text="Streams are append-only logs.", chunk_delay_s=0.01)
    )
    ex = create_executor(
        llm(m, system_prompt="Be brief.", temperature=0.3, max_tokens=64),
        creds(openai_server),
        pricing={m: {"input": "2.50", "output": "10"}},
    )
    tokens = run(collect(ex.execute_stream("What is a stream?")))
    assert tokens == ["Streams", " are", " append-only", " logs."]
    result = ex.last_result
    assert isinstance(result, ActorResult)
    assert result.text == "Streams are append-only logs."
    assert result.finish_reason == "stop" and result.error is None
    assert result.model_calls == 1 and result.tool_calls == 0
    [node] = result.nodes
    assert isinstance(node, NodeUsage)
    # The fake server counts whitespace-separated words: 2 prompt messages = 2 + 4 words.
    assert (node.node, node.provider, node.model) == ("writer", "openai", m)
    assert (node.input_tokens, node.output_tokens, node.total_tokens) == (6, 4, 10)
    assert node.usage_source == "provider"
    expected = (Decimal("2.50") * 6 + Decimal(10) * 4) / Decimal(1_000_000)
    assert node.cost_usd == expected and result.cost_usd == expected
    assert isinstance(result.cost_usd, Decimal)
    assert result.time_to_first_token_ms is not None
    assert result.duration_ms >= result.time_to_first_token_ms
    [body] = _requests(openai_server, m)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert body["temperature"] == 0.3 and body["max_completion_tokens"] == 64
    assert _auth(openai_server, m) == f"Bearer {API_KEY}"


def test_execute_stream_is_a_live_stream_not_a_replay(openai_server: FakeOpenAI) -> None:
    """The first token reaches the caller while the server is still sending the body."""
    m = openai_server.script(model("live"), Reply(text="a b c d e f", chunk_delay_s=0.3))
    ex = create_executor(llm(m), creds(openai_server))
    seen_completed: list[bool] = []

    async def first_tokens() -> list[str]:
        out = []
        async for token in ex.execute_stream("go"):
            seen_completed.append(m in openai_server.completed)
            out.append(token)
        return out

    tokens = run(first_tokens())
    assert "".join(tokens) == "a b c d e f"
    assert seen_completed[0] is False  # body still being written when the first token arrived
    assert m in openai_server.completed


def test_execute_returns_the_same_result_without_streaming(openai_server: FakeOpenAI) -> None:
    m = openai_server.script(model("exec"), Reply(text="done and dusted"))
    ex = create_executor(llm(m), creds(openai_server))
    result = run(ex.execute("hi"))
    assert result.text == "done and dusted"
    assert result is ex.last_result
    assert result.nodes[0].usage_source == "provider"


def test_executions_on_one_executor_are_independent(openai_server: FakeOpenAI) -> None:
    m = model("echo")  # unscripted: the server echoes the last user message
    ex = create_executor(llm(m), creds(openai_server), pricing={m: {"input": 1, "output": 1}})

    async def both() -> tuple[ActorResult, ActorResult]:
        a, b = await asyncio.gather(ex.execute("alpha beta"), ex.execute("gamma"))
        return a, b

    a, b = run(both())
    assert (a.text, b.text) == ("alpha beta", "gamma")
    assert a.model_calls == b.model_calls == 1
    assert (a.output_tokens, b.output_tokens) == (2, 1)
    again = run(ex.execute("delta epsilon zeta"))
    assert again.text == "delta epsilon zeta" and again.model_calls == 1
    assert again.output_tokens == 3 and len(again.nodes) == 1


# -- agent -------------------------------------------------------------------------


def test_agent_calls_a_tool_and_answers(openai_server: FakeOpenAI) -> None:
    m = openai_server.script(
        model("agent"),
        Reply(text="", tool_calls=(ToolCall("calculator", {"expression": "6*7"}),)),
        Reply(text="The answer is 42."),
    )
    config = {**llm(m), "type": "agent", "name": "maths", "tools": ["calculator", "utc_now"]}
    ex = create_executor(config, creds(openai_server))
    events = run(collect(ex.events("What is six times seven?")))
    kinds = [e.type for e in events]
    assert kinds.index("tool_call") < kinds.index("tool_result") < kinds.index("token")
    call = next(e for e in events if e.type == "tool_call")
    assert call.node == "maths" and call.data["tool"] == "calculator"
    assert json.loads(call.data["args"]) == {"expression": "6*7"}
    output = next(e for e in events if e.type == "tool_result")
    assert output.data["output"] == "42" and output.data["call_id"] == call.data["call_id"]
    result = ex.last_result
    assert result is not None
    assert result.text == "The answer is 42."
    assert (result.model_calls, result.tool_calls) == (2, 1)
    first, second = _requests(openai_server, m)
    assert {t["function"]["name"] for t in first["tools"]} == {"calculator", "utc_now"}
    tool_msg = second["messages"][-1]
    assert tool_msg["role"] == "tool" and tool_msg["content"] == "42"
    assert tool_msg["tool_call_id"] == call.data["call_id"]


def test_agent_unknown_tool_is_refused_at_build_time(openai_server: FakeOpenAI) -> None:
    config = {**llm("x"), "type": "agent", "tools": ["calculator", "rm_rf"]}
    with pytest.raises(ConfigError) as info:
        create_executor(config, creds(openai_server))
    assert info.value.field == "config.tools.1"


# -- graph -------------------------------------------------------------------------


def _review_graph(draft: str, review: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "graph",
        "name": "writer_room",
        "entry": "draft",
        "max_visits": 3,
        "nodes": {
            "draft": {"provider": "openai", "model": draft, "system_prompt": "Write it."},
            "review": {"provider": "openai", "model": review, "system_prompt": "Judge it."},
        },
        "edges": [
            {"from": "draft", "to": "review"},
            {"from": "review", "to": "draft", "when": "REVISE"},
            {"from": "review", "to": "__end__"},
        ],
        **extra,
    }


def test_graph_streams_every_node_tagged_and_routes_by_when(openai_server: FakeOpenAI) -> None:
    d = openai_server.script(model("draft"), Reply(text="first draft"), Reply(text="better draft"))
    r = openai_server.script(
        model("review"), Reply(text="revise: too short"), Reply(text="approved")
    )
    ex = create_executor(
        _review_graph(d, r), creds(openai_server), pricing={d: {"input": 1, "output": 2}}
    )
    events = run(collect(ex.events("Write a haiku")))
    flow = [(e.type, e.node) for e in events if e.type != "token"]
    assert flow == [
        ("node_start", "draft"), ("node_end", "draft"),
        ("node_start", "review"), ("node_end", "review"),
        ("node_start", "draft"), ("node_end", "draft"),
        ("node_start", "review"), ("node_end", "review"),
    ]  # fmt: skip
    ends = [e.data for e in events if e.type == "node_end"]
    assert [x["next"] for x in ends] == ["review", "draft", "review", "__end__"]
    assert [x["visit"] for x in ends] == ["1", "1", "2", "2"]
    by_node: dict[str, str] = {}
    for e in events:
        if e.type == "token":
            by_node[e.node] = by_node.get(e.node, "") + e.text
    assert by_node == {"draft": "first draftbetter draft", "review": "revise: too shortapproved"}
    result = ex.last_result
    assert result is not None
    assert result.text == "approved" and result.finish_reason == "stop"
    assert result.model_calls == 4
    nodes = {n.node: n for n in result.nodes}
    assert nodes["draft"].model_calls == 2 and nodes["draft"].model == d
    assert nodes["draft"].cost_usd is not None and nodes["review"].cost_usd is None
    assert result.cost_usd is None  # one node unpriced: the total is unknown, not understated
    assert result.input_tokens == sum(n.input_tokens for n in result.nodes)
    # The reviewer sees the transcript: the message, then the draft named after its node.
    review_body = _requests(openai_server, r)[0]
    assert review_body["messages"] == [
        {"role": "system", "content": "Judge it."},
        {"role": "user", "content": "Write a haiku"},
        {"role": "assistant", "content": "first draft", "name": "draft"},
    ]


def test_graph_max_visits_bounds_a_cycle(openai_server: FakeOpenAI) -> None:
    d = openai_server.script(model("draft"), Reply(text="draft"))
    r = openai_server.script(model("review"), Reply(text="REVISE again"))
    ex = create_executor(_review_graph(d, r, max_visits=2), creds(openai_server))
    result = run(ex.execute("go"))
    assert result.finish_reason == "max_visits"
    assert result.model_calls == 4
    assert len(openai_server.calls(d)) == 2 and len(openai_server.calls(r)) == 2
    assert result.text == "REVISE again"


def test_graph_stream_yields_tokens_of_all_nodes(openai_server: FakeOpenAI) -> None:
    d = openai_server.script(model("draft"), Reply(text="one two"))
    r = openai_server.script(model("review"), Reply(text="fine"))
    ex = create_executor(_review_graph(d, r), creds(openai_server))
    assert run(collect(ex.execute_stream("go"))) == ["one", " two", "fine"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"entry": "nowhere"}, "config.entry"),
        ({"entry": None}, "config.entry"),
        ({"edges": [{"from": "a", "to": "ghost"}]}, "config.edges.0.to"),
        ({"edges": [{"from": "ghost", "to": "a"}]}, "config.edges.0.from"),
        ({"edges": [{"from": "a", "to": "b"}, {"from": "b", "to": "a"}]}, "config.max_visits"),
        ({"edges": [{"from": "a", "to": "b"}, {"from": "a", "to": "a", "when": "x"}]}, "config.edges.1"),
        ({"nodes": {"__end__": {"provider": "scripted"}}, "entry": "__end__"}, "config.nodes.__end__"),
        ({"nodes": {"a": {"provider": "scripted"}, "b": {"provider": "nope"}}}, "config.nodes.b.provider"),
        ({"nodes": {"a": {"type": "agent", "provider": "scripted", "tools": ["nope"]}}, "edges": []}, "config.nodes.a.tools.0"),
        ({"nodes": {"a": {"provider": "openai", "model": "m"}}, "edges": []}, "credentials.openai.api_key"),
    ],
)  # fmt: skip
def test_malformed_graphs_are_refused_at_create_executor(
    change: dict[str, Any], field: str
) -> None:
    config: dict[str, Any] = {
        "type": "graph",
        "entry": "a",
        "nodes": {"a": {"provider": "scripted"}, "b": {"provider": "scripted"}},
        "edges": [{"from": "a", "to": "b"}],
        **change,
    }
    if config["entry"] is None:
        del config["entry"]
    with pytest.raises((ConfigError, CredentialsError)) as info:
        create_executor(config)
    assert info.value.field == field


# -- the config and the credentials ---------------------------------------------------------


def test_config_and_credentials_are_never_modified(openai_server: FakeOpenAI) -> None:
    d = openai_server.script(model("draft"), Reply(text="text"))
    r = openai_server.script(model("review"), Reply(text="ok"))
    config = _review_graph(d, r)
    config["nodes"]["review"]["type"] = "agent"
    config["nodes"]["review"]["tools"] = ["word_count"]
    credentials = creds(openai_server)
    limits = {"timeout_ms": 30_000, "max_cost_usd": 5}
    pricing = {d: {"input": "1", "output": "2"}, r: {"input": "3", "output": "4"}}
    before = copy.deepcopy((config, credentials, limits, pricing))
    ex = create_executor(config, credentials, limits, pricing)
    run(ex.execute("go"))
    run(collect(ex.execute_stream("again")))
    assert (config, credentials, limits, pricing) == before
    # The credentials are not folded into anything the executor exposes.
    assert API_KEY not in json.dumps(ex.config.model_dump(mode="json"))
    assert API_KEY not in repr(vars(ex).get("config")) and API_KEY not in repr(ex.last_result)


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
    _wait_for(lambda: m in openai_server.closed_early)


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
    _wait_for(lambda: m in openai_server.closed_early)


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
    assert result is not None and result.model_calls == 2 and result.tool_calls == 1
    assert len(openai_server.calls(m)) == 1  # the over-budget call never went out


def test_a_budget_needs_a_price_for_every_model(openai_server: FakeOpenAI) -> None:
    with pytest.raises(InvalidInput) as info:
        create_executor(llm("unpriced"), creds(openai_server), {"max_cost_usd": 1})
    assert info.value.field == "pricing" and "unpriced" in str(info.value)


def _wait_for(check: Any, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


# -- errors ------------------------------------------------------------------------


def test_401_echoing_the_key_is_scrubbed_and_not_retryable(
    openai_server: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    m = openai_server.script(model("auth"), Reply(status=401, echo_key=True))
    ex = create_executor(llm(m), creds(openai_server))
    with pytest.raises(ProviderAuthError) as info:
        run(ex.execute("hi"))
    err = info.value
    assert isinstance(err, ProviderError) and not err.retryable and err.status_code == 401
    assert "Incorrect API key provided" in str(err)
    texts = [str(err), repr(err), ex.last_result.model_dump_json() if ex.last_result else ""]
    texts += [r.getMessage() for r in caplog.records]
    for text in texts:
        assert API_KEY not in text and API_KEY[:12] not in text
    assert ex.last_result is not None and ex.last_result.finish_reason == "error"
    assert ex.last_result.error is not None and "[redacted]" in ex.last_result.error


@pytest.mark.parametrize("status", [429, 500, 503])
def test_rate_limits_and_server_errors_are_retryable(
    openai_server: FakeOpenAI, status: int
) -> None:
    m = openai_server.script(model("flaky"), Reply(status=status, error_message="try later"))
    ex = create_executor(llm(m), creds(openai_server))
    with pytest.raises(ProviderError) as info:
        run(ex.execute("hi"))
    assert info.value.retryable and info.value.status_code == status
    assert not isinstance(info.value, ProviderAuthError)


def test_connection_cut_mid_stream_is_retryable_with_a_partial_result(
    openai_server: FakeOpenAI,
) -> None:
    m = openai_server.script(model("cut"), Reply(text="one two three four five", cut_after=3))
    ex = create_executor(llm(m), creds(openai_server))
    got: list[str] = []

    async def consume() -> None:
        async for token in ex.execute_stream("go"):
            got.append(token)

    with pytest.raises(ProviderError) as info:
        run(consume())
    assert info.value.retryable
    assert got == ["one", " two", " three"]
    assert ex.last_result is not None and ex.last_result.text == "one two three"
    assert ex.last_result.finish_reason == "error"


def test_unreachable_provider_is_retryable(openai_server: FakeOpenAI) -> None:
    ex = create_executor(
        llm("m"), {"openai": {"api_key": API_KEY, "base_url": "http://127.0.0.1:9/v1"}}
    )
    with pytest.raises(ProviderError) as info:
        run(ex.execute("hi"))
    assert info.value.retryable and API_KEY not in str(info.value)


def test_missing_and_malformed_credentials_are_typed() -> None:
    with pytest.raises(CredentialsError) as info:
        create_executor(llm("gpt-4o-mini"))
    assert info.value.field == "credentials.openai.api_key"
    with pytest.raises(CredentialsError) as info:
        create_executor(llm("m"), {"openai": {"api_key": API_KEY, "password": "x"}})
    assert info.value.field == "credentials.openai" and API_KEY not in str(info.value)
    with pytest.raises(CredentialsError) as info:
        create_executor(llm("m"), {"openai": {"api_key": 42}})  # type: ignore[dict-item]
    assert info.value.field == "credentials.openai.api_key"


def test_self_hosted_server_needs_no_key(openai_server: FakeOpenAI) -> None:
    """A base_url in the config alone is enough (vLLM, Ollama, LM Studio)."""
    m = openai_server.script(model("local"), Reply(text="local reply"))
    ex = create_executor(llm(m, base_url=openai_server.base_url))
    assert run(ex.execute("hi")).text == "local reply"
    assert _auth(openai_server, m) == "Bearer EMPTY"


# -- cancellation --------------------------------------------------------------------


def test_cancelling_an_execution_closes_the_stream_and_keeps_the_partial_result(
    openai_server: FakeOpenAI,
) -> None:
    m = openai_server.script(model("cancel"), Reply(text="a b c d e f g h", chunk_delay_s=0.2))
    ex = create_executor(llm(m), creds(openai_server))

    async def cancel_after_two() -> None:
        got: list[str] = []

        async def consume() -> None:
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
    _wait_for(lambda: m in openai_server.closed_early)


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
    _wait_for(lambda: m in openai_server.closed_early)


def test_scripted_agents_in_a_graph_play_their_own_scripts() -> None:
    def agent(expr: str, answer: str) -> dict[str, Any]:
        turns = [{"tool_calls": [{"name": "calculator", "args": {"expression": expr}}]}]
        return {"type": "agent", "provider": "scripted", "tools": ["calculator"],
                "script": [*turns, {"text": answer}]}  # fmt: skip

    config = {
        "type": "graph",
        "entry": "a",
        "nodes": {"a": agent("1+1", "two"), "b": agent("2+2", "four")},
        "edges": [{"from": "a", "to": "b"}],
    }
    ex = create_executor(config)
    events = run(collect(ex.events("x")))
    outputs = [(e.node, e.data["output"]) for e in events if e.type == "tool_result"]
    assert outputs == [("a", "2"), ("b", "4")]
    assert ex.last_result is not None and ex.last_result.text == "four"


def test_limits_stop_a_graph_inside_its_nodes(openai_server: FakeOpenAI) -> None:
    d = openai_server.script(model("draft"), Reply(text="quick draft"))
    r = openai_server.script(model("review"), Reply(text="a b c d e f g h i j", chunk_delay_s=0.2))
    ex = create_executor(_review_graph(d, r), creds(openai_server), {"max_model_calls": 1})
    with pytest.raises(LimitExceeded) as info:
        run(ex.execute("go"))
    assert info.value.limit == "max_model_calls"
    assert ex.last_result is not None and ex.last_result.text == "quick draft"
    assert [n.node for n in ex.last_result.nodes] == ["draft"]

    ex = create_executor(_review_graph(d, r), creds(openai_server), {"timeout_ms": 800})
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
    _wait_for(lambda: r in openai_server.closed_early)


def test_length_finish_reason_is_reported(openai_server: FakeOpenAI) -> None:
    m = openai_server.script(model("length"), Reply(text="cut short", finish_reason="length"))
    result = run(create_executor(llm(m, max_tokens=2), creds(openai_server)).execute("go"))
    assert result.finish_reason == "length" and result.text == "cut short"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"provider": "anthropic"}, "config.provider"),
        ({"temperature": 5}, "config.temperature"),
        ({"max_tokens": 0}, "config.max_tokens"),
        ({"api_key": "sk-in-config"}, "config.api_key"),
        ({"type": "agent", "tools": ["calculator"], "max_iterations": 0}, "config.max_iterations"),
        ({"type": "robot"}, "config.type"),
    ],
)
def test_bad_llm_configs_name_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        create_executor({**llm("m", base_url="http://127.0.0.1:9/v1"), **change})
    assert info.value.field == field
    assert "sk-in-config" not in str(info.value)
