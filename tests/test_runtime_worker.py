"""The actor kinds end to end: producer -> real celery worker -> real ChatOpenAI over HTTP.

Credentials travel encrypted in the job payload; tokens land in the job's
stream (tagged with their node) and the ActorResult in its record.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from ops.stack import WorkerProcess
from producer import Client, InvalidInput, JobStatus
from producer.schema import Event
from tests.conftest import RedisTarget
from tests.helpers import actorq_keys
from tests.openai_server import FakeOpenAI, Reply, ToolCall
from tests.runtime_support import API_KEY, creds, llm, model

pytestmark = pytest.mark.usefixtures("workers")


def _run(client: Client, config: dict[str, Any], message: str, **kw: Any) -> tuple[list[Event], Any]:
    job_id = client.enqueue_actor_job(config, message, **kw)
    events = list(client.stream_events(job_id, timeout=60))
    record = client.wait_result(job_id, timeout=30)
    return events, record


def _tokens(events: list[Event]) -> list[tuple[str, str]]:
    return [(e.node, e.text) for e in events if e.type == "token"]


def test_llm_job_streams_tokens_and_records_usage_and_cost(
    client: Client, openai_server: FakeOpenAI
) -> None:
    m = openai_server.script(model("wllm"), Reply(text="Redis streams are logs.", chunk_delay_s=0.01))
    events, record = _run(
        client,
        llm(m, system_prompt="Be brief."),
        "What is a stream?",
        credentials=creds(openai_server),
        pricing={m: {"input": "1", "output": "3"}},
    )
    assert _tokens(events) == [("writer", "Redis"), ("writer", " streams"), ("writer", " are"), ("writer", " logs.")]
    assert record.status is JobStatus.SUCCEEDED
    result = record.result
    assert result.text == "Redis streams are logs."
    [node] = result.nodes
    assert node.usage_source == "provider" and (node.input_tokens, node.output_tokens) == (6, 4)
    assert node.cost_usd == result.cost_usd == (Decimal(6) + Decimal(12)) / Decimal(1_000_000)
    assert openai_server.calls(m)[0].body["stream"] is True


def test_agent_job_publishes_tool_calls_and_results(client: Client, openai_server: FakeOpenAI) -> None:
    m = openai_server.script(
        model("wagent"),
        Reply(text="", tool_calls=(ToolCall("reverse_text", {"text": "stressed"}),)),
        Reply(text="It reads desserts."),
    )
    config = {**llm(m), "type": "agent", "name": "rev", "tools": ["reverse_text"]}
    events, record = _run(client, config, "Reverse stressed", credentials=creds(openai_server))
    call = next(e for e in events if e.type == "tool_call")
    output = next(e for e in events if e.type == "tool_result")
    assert call.fields["tool"] == "reverse_text" and call.node == "rev"
    assert json.loads(call.fields["args"]) == {"text": "stressed"}
    assert output.fields["output"] == "desserts"
    assert output.fields["call_id"] == call.fields["call_id"]
    assert "".join(t for _, t in _tokens(events)) == "It reads desserts."
    assert record.status is JobStatus.SUCCEEDED
    assert record.result.text == "It reads desserts."
    assert (record.result.model_calls, record.result.tool_calls) == (2, 1)


def test_graph_job_tags_tokens_by_node(client: Client, openai_server: FakeOpenAI) -> None:
    d = openai_server.script(model("wdraft"), Reply(text="a draft"), Reply(text="a better draft"))
    r = openai_server.script(model("wreview"), Reply(text="REVISE it"), Reply(text="approved"))
    config = {
        "type": "graph",
        "name": "room",
        "entry": "draft",
        "max_visits": 2,
        "nodes": {
            "draft": {"provider": "openai", "model": d},
            "review": {"type": "agent", "provider": "openai", "model": r, "tools": ["word_count"]},
        },
        "edges": [
            {"from": "draft", "to": "review"},
            {"from": "review", "to": "draft", "when": "revise"},
        ],
    }
    events, record = _run(client, config, "Write", credentials=creds(openai_server))
    assert _tokens(events) == [
        ("draft", "a"), ("draft", " draft"),
        ("review", "REVISE"), ("review", " it"),
        ("draft", "a"), ("draft", " better"), ("draft", " draft"),
        ("review", "approved"),
    ]  # fmt: skip
    bounds = [(e.type, e.node, e.fields.get("visit")) for e in events if e.type.startswith("node_")]
    assert bounds == [
        ("node_start", "draft", "1"), ("node_end", "draft", "1"),
        ("node_start", "review", "1"), ("node_end", "review", "1"),
        ("node_start", "draft", "2"), ("node_end", "draft", "2"),
        ("node_start", "review", "2"), ("node_end", "review", "2"),
    ]  # fmt: skip
    assert record.status is JobStatus.SUCCEEDED
    result = record.result
    assert result.text == "approved" and result.model_calls == 4
    assert {n.node: n.model_calls for n in result.nodes} == {"draft": 2, "review": 2}
    assert all(n.usage_source == "provider" for n in result.nodes)


def test_rejected_key_fails_without_leaking_it(
    client: Client, openai_server: FakeOpenAI, workers: list[WorkerProcess]
) -> None:
    m = openai_server.script(model("wauth"), Reply(status=401, echo_key=True))
    events, record = _run(client, llm(m), "hi", credentials=creds(openai_server))
    assert record.status is JobStatus.FAILED
    assert record.error_type == "ProviderAuthError"
    assert len(openai_server.calls(m)) == 1  # an auth failure is not retried
    everything = record.model_dump_json() + json.dumps([e.fields for e in events])
    assert "Incorrect API key provided" in everything
    assert API_KEY not in everything and API_KEY[:12] not in everything
    for worker in workers:  # nor in any worker log line
        assert worker.log_path is not None
        logged = worker.log_path.read_text(errors="replace")
        assert API_KEY not in logged and API_KEY[:12] not in logged


def test_cost_limit_ends_limit_exceeded_with_the_partial_result(
    client: Client, openai_server: FakeOpenAI
) -> None:
    m = openai_server.script(
        model("wcost"), Reply(text=" ".join(f"t{i}" for i in range(40)), chunk_delay_s=0.02)
    )
    events, record = _run(
        client,
        llm(m),
        "go",
        credentials=creds(openai_server),
        limits={"max_cost_usd": 3.5},
        pricing={m: {"input": 0, "output": 1_000_000}},
    )
    assert record.status is JobStatus.LIMIT_EXCEEDED
    assert "max_cost_usd" in (record.error or "")
    assert events[-1].fields["status"] == "limit_exceeded"
    assert record.result.text == "t0 t1 t2 t3" == "".join(t for _, t in _tokens(events))
    assert record.result.finish_reason == "limit" and record.result.cost_usd > Decimal("3.5")


def test_timeout_ends_timed_out(client: Client, openai_server: FakeOpenAI) -> None:
    m = openai_server.script(model("wslow"), Reply(text="a b c d e f g h i j", chunk_delay_s=0.3))
    events, record = _run(
        client, llm(m), "go", credentials=creds(openai_server), limits={"timeout_ms": 700}
    )
    assert record.status is JobStatus.TIMED_OUT
    assert record.result.finish_reason == "timeout"
    assert 0 < len(_tokens(events)) < 10


@pytest.mark.parametrize("cut", ["cut_after", "end_after"])
def test_dropped_connection_is_retried_after_a_reset(
    client: Client, openai_server: FakeOpenAI, cut: str
) -> None:
    """Dropped mid-body, or ended cleanly with no finish reason: never a cut ``succeeded``."""
    m = openai_server.script(
        model("wcut"), Reply(text="lost words here", **{cut: 2}), Reply(text="whole answer")
    )
    events, record = _run(client, llm(m), "go", credentials=creds(openai_server))
    kinds = [e.type for e in events]
    assert "reset" in kinds
    after_reset = events[kinds.index("reset") :]
    assert "".join(t for _, t in _tokens(after_reset)) == "whole answer"
    assert record.status is JobStatus.SUCCEEDED and record.result.text == "whole answer"
    assert len(openai_server.calls(m)) == 2


def test_a_budget_without_prices_is_refused_at_enqueue(
    client: Client, openai_server: FakeOpenAI, redis_target: RedisTarget
) -> None:
    before = actorq_keys(redis_target.client())
    with pytest.raises(InvalidInput) as info:
        client.enqueue_actor_job(
            llm("unpriced-model"), "hi", credentials=creds(openai_server), limits={"max_cost_usd": 1}
        )
    assert info.value.field == "pricing" and "unpriced-model" in str(info.value)
    assert actorq_keys(redis_target.client()) - before == set()
