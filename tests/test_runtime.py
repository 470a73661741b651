"""The actor runtime in process: the real ChatOpenAI over real HTTP against the fake server."""

from __future__ import annotations

import asyncio
import copy
import json
from decimal import Decimal
from typing import Any

import pytest

from tests.openai_server import FakeOpenAI, Reply, ToolCall
from tests.runtime_support import (
    API_KEY,
    auth_header,
    collect,
    creds,
    llm,
    model,
    review_graph,
    run,
)
from worker import (
    ActorResult,
    ConfigError,
    CredentialsError,
    NodeUsage,
    create_executor,
    register_tool,
)


def _requests(server: FakeOpenAI, name: str) -> list[dict[str, Any]]:
    return [r.body for r in server.calls(name)]


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
    assert auth_header(openai_server, m) == f"Bearer {API_KEY}"


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


def test_agent_tells_the_model_its_tool_call_was_malformed_and_goes_on(
    openai_server: FakeOpenAI,
) -> None:
    m = openai_server.script(
        model("sloppy-agent"),
        Reply(text="", tool_calls=(ToolCall("calculator", raw_args="{expression: '6*7'}"),)),
        Reply(text="", tool_calls=(ToolCall("calculator", {"expression": "6*7"}),)),
        Reply(text="It is 42."),
    )
    config = {**llm(m), "type": "agent", "tools": ["calculator"]}
    ex = create_executor(config, creds(openai_server))
    events = run(collect(ex.events("six times seven?")))
    results = [e.data["output"] for e in events if e.type == "tool_result"]
    assert results[0].startswith("error:") and "not a JSON object" in results[0]
    assert results[1] == "42"
    result = ex.last_result
    assert result is not None and result.text == "It is 42." and result.finish_reason == "stop"
    assert (result.model_calls, result.tool_calls) == (3, 2)
    second = _requests(openai_server, m)[1]
    told = second["messages"][-1]  # the error went back as the malformed call's answer
    assert told["role"] == "tool" and told["content"] == results[0]
    assert second["messages"][-2]["tool_calls"][0]["id"] == told["tool_call_id"]


def test_agent_unknown_tool_is_refused_at_build_time(openai_server: FakeOpenAI) -> None:
    config = {**llm("x"), "type": "agent", "tools": ["calculator", "rm_rf"]}
    with pytest.raises(ConfigError) as info:
        create_executor(config, creds(openai_server))
    assert info.value.field == "config.tools.1"


# -- graph -------------------------------------------------------------------------


def test_graph_streams_every_node_tagged_and_routes_by_when(openai_server: FakeOpenAI) -> None:
    d = openai_server.script(model("draft"), Reply(text="first draft"), Reply(text="better draft"))
    r = openai_server.script(
        model("review"), Reply(text="revise: too short"), Reply(text="approved")
    )
    ex = create_executor(
        review_graph(d, r), creds(openai_server), pricing={d: {"input": 1, "output": 2}}
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
    ex = create_executor(review_graph(d, r, max_visits=2), creds(openai_server))
    result = run(ex.execute("go"))
    assert result.finish_reason == "max_visits"
    assert result.model_calls == 4
    assert len(openai_server.calls(d)) == 2 and len(openai_server.calls(r)) == 2
    assert result.text == "REVISE again"


def test_graph_stream_yields_tokens_of_all_nodes(openai_server: FakeOpenAI) -> None:
    d = openai_server.script(model("draft"), Reply(text="one two"))
    r = openai_server.script(model("review"), Reply(text="fine"))
    ex = create_executor(review_graph(d, r), creds(openai_server))
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
    config = review_graph(d, r)
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


def test_length_finish_reason_is_reported(openai_server: FakeOpenAI) -> None:
    m = openai_server.script(model("length"), Reply(text="cut short", finish_reason="length"))
    result = run(create_executor(llm(m, max_tokens=2), creds(openai_server)).execute("go"))
    assert result.finish_reason == "length" and result.text == "cut short"


def test_a_failing_tool_is_reported_to_the_model_not_raised(openai_server: FakeOpenAI) -> None:
    def explode(text: str) -> str:
        """Always fails."""
        raise ValueError(f"cannot handle {text!r} with key {API_KEY}")

    register_tool(explode, name="test_explode")
    m = openai_server.script(
        model("toolfail"),
        Reply(
            text="",
            tool_calls=(ToolCall("test_explode", {"text": "x"}), ToolCall("calculator", {})),
        ),
        Reply(text="sorry"),
    )
    ex = create_executor(
        {**llm(m), "type": "agent", "tools": ["test_explode"]}, creds(openai_server)
    )
    events = run(collect(ex.events("go")))
    outputs = [e.data["output"] for e in events if e.type == "tool_result"]
    assert (
        outputs[0].startswith("error: ValueError: cannot handle 'x'") and API_KEY not in outputs[0]
    )
    assert outputs[1] == "error: tool 'calculator' is not available to this actor"
    assert ex.last_result is not None and ex.last_result.text == "sorry"
    tool_messages = [
        msg for msg in _requests(openai_server, m)[1]["messages"] if msg["role"] == "tool"
    ]
    assert [t["content"] for t in tool_messages] == outputs


def test_graph_tokens_are_live_too(openai_server: FakeOpenAI) -> None:
    """LangGraph's custom stream hands tokens over as the node's model produces them."""
    d = openai_server.script(model("draft"), Reply(text="a b c d e", chunk_delay_s=0.25))
    r = openai_server.script(model("review"), Reply(text="ok"))
    ex = create_executor(review_graph(d, r), creds(openai_server))
    completed_at_first: list[bool] = []

    async def consume() -> None:
        async for event in ex.events("go"):
            if event.type == "token" and not completed_at_first:
                completed_at_first.append(d in openai_server.completed)

    run(consume())
    assert completed_at_first == [False]
    assert d in openai_server.completed
