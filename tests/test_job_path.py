"""The job path end to end: real Redis, real `celery worker` processes, the scripted model."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
import redis

from producer import (
    Client,
    ConfigError,
    CredentialsError,
    InvalidInput,
    JobNotFound,
    JobStatus,
    JobTimeout,
)
from tests.conftest import RedisTarget
from tests.helpers import actorq_keys, queue_length, scripted

pytestmark = pytest.mark.usefixtures("workers")

REPLY = "The quick brown fox jumps over the lazy dog, twice: quick brown fox, lazy dog."


def test_tokens_arrive_in_order_and_join_to_the_record(client: Client) -> None:
    job_id = client.enqueue_actor_job(scripted(REPLY, token_delay_ms=2), "go")
    events = list(client.stream_events(job_id, timeout=30))
    types = [e.type for e in events]
    assert types[0] == "start" and types[-1] == "done"
    assert types.count("done") == 1
    tokens = [e.text for e in events if e.type == "token"]
    assert len(tokens) == 15
    assert "".join(tokens) == REPLY
    ids = [e.id for e in events]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    record = client.get_result(job_id)
    assert record is not None
    assert record.status is JobStatus.SUCCEEDED
    assert record.result is not None and record.result.text == REPLY
    assert record.result.output_tokens == 15
    assert record.done_id == events[-1].id
    assert events[-1].fields["status"] == "succeeded"
    assert client.get_status(job_id) is JobStatus.SUCCEEDED


def test_enqueue_returns_before_the_run(client: Client) -> None:
    started = time.monotonic()
    job_id = client.enqueue_actor_job(scripted(REPLY, first_token_delay_ms=1500), "slow")
    assert time.monotonic() - started < 1.0
    assert client.get_status(job_id) in (JobStatus.QUEUED, JobStatus.RUNNING)
    assert client.get_result(job_id) is None
    record = client.wait_result(job_id, timeout=30)
    assert record.status is JobStatus.SUCCEEDED


def test_late_joiner_gets_full_replay_and_resume_gets_the_rest_once(client: Client) -> None:
    job_id = client.enqueue_actor_job(scripted(REPLY), "go")
    client.wait_result(job_id, timeout=30)
    first = list(client.stream_events(job_id, timeout=5))
    again = list(client.stream_events(job_id, timeout=5))
    assert [e.id for e in first] == [e.id for e in again]
    assert "".join(e.text for e in first if e.type == "token") == REPLY
    for cut in (1, 5, len(first) - 2):
        rest = list(client.stream_events(job_id, after=first[cut - 1].id, timeout=5))
        assert [e.id for e in rest] == [e.id for e in first[cut:]]


def test_resume_while_running_sees_each_later_event_once(client: Client) -> None:
    job_id = client.enqueue_actor_job(scripted(REPLY, token_delay_ms=30), "go")
    seen = []
    for event in client.stream_events(job_id, timeout=30):
        seen.append(event)
        if len([e for e in seen if e.type == "token"]) == 4:
            break  # the client drops mid-stream
    rest = list(client.stream_events(job_id, after=seen[-1].id, timeout=30))
    full = seen + rest
    assert len({e.id for e in full}) == len(full)
    assert "".join(e.text for e in full if e.type == "token") == REPLY
    assert full[-1].type == "done"


def test_async_stream_and_await_result(client: Client) -> None:
    async def main() -> tuple[str, str]:
        job_id = client.enqueue_actor_job(scripted(REPLY, token_delay_ms=1), "go")
        text = "".join(
            [e.text async for e in client.astream_events(job_id, timeout=30) if e.type == "token"]
        )
        record = await client.await_result(job_id, timeout=10)
        assert record.result is not None
        return text, record.result.text

    streamed, recorded = asyncio.run(main())
    assert streamed == recorded == REPLY


def test_two_workers_fifty_jobs_each_streamed_by_exactly_one_worker(client: Client) -> None:
    job_ids = [
        client.enqueue_actor_job(scripted(f"job {i} " + REPLY, token_delay_ms=5), f"m{i}")
        for i in range(50)
    ]
    workers_used: Counter[str] = Counter()
    for i, job_id in enumerate(job_ids):
        events = list(client.stream_events(job_id, timeout=60))
        starts = [e for e in events if e.type == "start"]
        assert len(starts) == 1, f"{job_id} started {len(starts)} times"
        assert [e.type for e in events].count("done") == 1
        assert "".join(e.text for e in events if e.type == "token") == f"job {i} " + REPLY
        record = client.get_result(job_id)
        assert record is not None and record.status is JobStatus.SUCCEEDED
        assert record.worker == starts[0].fields["worker"]
        workers_used[record.worker] += 1
    assert sum(workers_used.values()) == 50
    assert len(workers_used) == 2, f"one worker took every job: {workers_used}"


def test_unknown_job_is_not_found_not_a_hang(client: Client) -> None:
    with pytest.raises(JobNotFound):
        client.get_status("no-such-job")
    with pytest.raises(JobNotFound):
        client.get_result("no-such-job")
    started = time.monotonic()
    with pytest.raises(JobNotFound):
        next(iter(client.stream_events("no-such-job")))
    with pytest.raises(JobNotFound):
        client.wait_result("no-such-job", timeout=5)
    assert time.monotonic() - started < 2


def test_wait_timeout_is_typed(client: Client) -> None:
    job_id = client.enqueue_actor_job(scripted(REPLY, first_token_delay_ms=3000), "slow")
    with pytest.raises(JobTimeout):
        client.wait_result(job_id, timeout=0.3)
    assert client.wait_result(job_id, timeout=30).status is JobStatus.SUCCEEDED


BAD_INPUTS = [
    ("config", ["not", "a", "dict"], "hi", {}, ConfigError, "config"),
    (
        "unknown actor type",
        {"type": "wizard", "provider": "scripted"},
        "hi",
        {},
        ConfigError,
        "config.type",
    ),
    ("unknown provider", {"provider": "acme"}, "hi", {}, ConfigError, "config.provider"),
    ("message not a string", scripted(), 42, {}, InvalidInput, "message"),
    ("message None", scripted(), None, {}, InvalidInput, "message"),
    (
        "negative limit",
        scripted(),
        "hi",
        {"limits": {"timeout_ms": -5}},
        InvalidInput,
        "limits.timeout_ms",
    ),
    (
        "NaN limit",
        scripted(),
        "hi",
        {"limits": {"max_cost_usd": float("nan")}},
        InvalidInput,
        "limits.max_cost_usd",
    ),
    ("bad job id", scripted(), "hi", {"job_id": "a}b:c"}, InvalidInput, "job_id"),
    (
        "credentials not a mapping",
        scripted(),
        "hi",
        {"credentials": "sk-123"},
        CredentialsError,
        "credentials",
    ),
    (
        "pricing not numeric",
        scripted(),
        "hi",
        {"pricing": {"m": {"input": "cheap", "output": 1}}},
        InvalidInput,
        "pricing.m.input",
    ),
    (
        "openai without a key",
        {"provider": "openai", "model": "gpt-4o-mini"},
        "hi",
        {},
        CredentialsError,
        "credentials.openai.api_key",
    ),
    ("unknown limit", scripted(), "hi", {"limits": {"forever": 1}}, InvalidInput, "limits.forever"),
]


@pytest.mark.parametrize(
    ("config", "message", "kwargs", "error", "field"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_is_refused_with_the_field_named_and_nothing_written(
    client: Client,
    redis_target: RedisTarget,
    stack_env: dict[str, str],
    config: object,
    message: object,
    kwargs: dict[str, object],
    error: type[Exception],
    field: str,
) -> None:
    r = redis_target.client()
    before_keys = actorq_keys(r)
    before_queue = queue_length(r, stack_env["ACTORQ_QUEUE"])
    with pytest.raises(error) as info:
        client.enqueue_actor_job(config, message, **kwargs)  # type: ignore[arg-type]
    assert getattr(info.value, "field", None) == field, info.value
    assert field in str(info.value)
    assert actorq_keys(r) - before_keys == set()
    assert queue_length(r, stack_env["ACTORQ_QUEUE"]) == before_queue
    # ... and the system still serves the next job.
    ok = client.enqueue_actor_job(scripted("still serving"), "next")
    assert client.wait_result(ok, timeout=30).status is JobStatus.SUCCEEDED


def test_every_key_expires(client: Client, redis_target: RedisTarget) -> None:
    job_id = client.enqueue_actor_job(scripted(REPLY), "go")
    client.wait_result(job_id, timeout=30)
    r: redis.Redis = redis_target.client()
    job_keys = [k for k in actorq_keys(r) if job_id.encode() in k]
    assert len(job_keys) >= 2
    for key in job_keys:
        assert 0 < r.ttl(key) <= client.settings.retention_s, key


def test_duplicate_job_id_is_refused(client: Client) -> None:
    job_id = client.enqueue_actor_job(scripted(), "go", job_id="fixed-id-" + str(time.time_ns()))
    with pytest.raises(InvalidInput) as info:
        client.enqueue_actor_job(scripted(), "go", job_id=job_id)
    assert info.value.field == "job_id"
    assert client.wait_result(job_id, timeout=30).status is JobStatus.SUCCEEDED
