"""Reliability on one pool of real workers: duplicates, cancellation, time limits,
provider retries, idempotency and the stream cap.

The pool has its own queue and short lease / sweep settings so lost attempts are
found within seconds.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from ops.stack import WorkerProcess
from producer import CancelOutcome, Client, JobStatus, Settings, TextAssembler, final_text
from producer.schema import Event
from tests.conftest import WorkerFactory
from tests.helpers import scripted
from tests.openai_server import FakeOpenAI, Reply
from tests.reliab_support import (
    check_one_ending,
    check_restarted_once,
    log_count,
    openai_llm,
    read_events,
    saved_usage,
    send_duplicate,
    summary,
    tokens_seen,
    wait_until,
    worker_of,
)

WORDS = " ".join(f"w{i}" for i in range(40))


@dataclass
class Pool:
    client: Client
    workers: list[WorkerProcess]
    env: dict[str, str]


@pytest.fixture(scope="module")
def pool(stack_env: dict[str, str], start_worker: WorkerFactory) -> Iterator[Pool]:
    tag = uuid.uuid4().hex[:6]
    env = {
        "ACTORQ_QUEUE": f"actorq-rel-{tag}",
        "ACTORQ_LEASE_TTL_S": "3",
        "ACTORQ_SWEEP_INTERVAL_S": "0.5",
        "ACTORQ_PROVIDER_RETRIES": "2",
        "ACTORQ_STREAM_MAX_EVENTS": "200",
    }
    workers = [start_worker(f"rel{i}-{tag}", env=env, wait=False) for i in range(2)]
    for w in workers:
        w.wait_ready(stack_env["REDIS_URL"], timeout=60)
    client = Client(Settings.from_env({**stack_env, **env}))
    try:
        yield Pool(client, workers, {**stack_env, **env})
    finally:
        client.redis.delete(client.settings.queue)
        client.close()
        for w in workers:
            w.stop(timeout=10)


def _events(pool: Pool, job_id: str, timeout: float = 30) -> list[Event]:
    return list(pool.client.stream_events(job_id, timeout=timeout))


# -- the text helper ---------------------------------------------------------------


def test_text_assembler_drops_everything_before_a_reset() -> None:
    def ev(i: int, type_: str, **fields: str) -> Event:
        return Event(id=f"1-{i}", type=type_, fields=fields)

    events = [
        ev(0, "start", attempt="1"),
        ev(1, "token", text="Hel"),
        ev(2, "token", text="lo"),
        ev(3, "reset", attempt="1", reason="retry", retry="1"),
        ev(4, "token", text="Hi"),
        ev(5, "reset", attempt="2", reason="restart"),
        ev(6, "start", attempt="2"),
        ev(7, "token", text="Hello"),
        ev(8, "token", text=" world"),
        ev(9, "done", status="succeeded", attempt="2"),
    ]
    assembler = TextAssembler()
    for e in events:
        assembler.feed(e)
    assert assembler.text == final_text(events) == "Hello world"
    assert assembler.resets == 2 and assembler.attempt == 2
    assert assembler.done and assembler.status is JobStatus.SUCCEEDED
    assert final_text(events[:3]) == "Hello"
    assert final_text([]) == ""


# -- duplicates ----------------------------------------------------------------------


def test_duplicate_delivery_while_running_gives_one_stream_and_one_ending(pool: Pool) -> None:
    c = pool.client
    job_id = c.enqueue_actor_job(scripted(WORDS, token_delay_ms=40), "go")
    wait_until(lambda: tokens_seen(c, job_id, 2), 20, "the job to stream")
    for _ in range(2):
        send_duplicate(c, job_id)
    events = _events(pool, job_id)
    record = c.get_result(job_id)
    check_one_ending(events, record)
    assert [e.type for e in events].count("start") == 1
    assert "".join(e.text for e in events if e.type == "token") == WORDS
    assert record is not None and record.status is JobStatus.SUCCEEDED and record.attempt == 1
    wait_until(
        lambda: log_count(pool.workers, f"job {job_id}: not run (") >= 2,
        20,
        "both duplicates to be refused",
    )


def test_a_running_job_is_indexed_for_the_sweeper_until_it_ends(pool: Pool) -> None:
    from producer import keys

    c = pool.client
    job_id = c.enqueue_actor_job(scripted(WORDS, token_delay_ms=40), "go")
    wait_until(lambda: tokens_seen(c, job_id, 1), 20, "the job to stream")
    deadline = c.redis.zscore(keys.RUNNING_INDEX, job_id)  # set by the claim itself
    assert deadline is not None and deadline > time.time()  # the lease's end
    assert c.wait_result(job_id, timeout=30).status is JobStatus.SUCCEEDED
    assert c.redis.zscore(keys.RUNNING_INDEX, job_id) is None  # and gone with the ending


def test_duplicate_after_the_end_writes_nothing(pool: Pool) -> None:
    c = pool.client
    job_id = c.enqueue_actor_job(scripted("short reply"), "go")
    record = c.wait_result(job_id, timeout=30)
    before = (
        c.redis.xrange(f"actorq:job:{{{job_id}}}:events"),
        c.redis.hgetall(f"actorq:job:{{{job_id}}}"),
    )
    for _ in range(2):
        send_duplicate(c, job_id)
    wait_until(
        lambda: log_count(pool.workers, f"job {job_id}: not run (terminal)") >= 2,
        20,
        "both duplicates to be refused",
    )
    after = (
        c.redis.xrange(f"actorq:job:{{{job_id}}}:events"),
        c.redis.hgetall(f"actorq:job:{{{job_id}}}"),
    )
    assert after == before
    assert c.get_result(job_id) == record


# -- cancellation ----------------------------------------------------------------------


def test_cancel_a_queued_job_it_never_starts(pool: Pool, stack_env: dict[str, str]) -> None:
    idle_queue = f"{pool.env['ACTORQ_QUEUE']}-idle"
    idle = Client(Settings.from_env({**pool.env, "ACTORQ_QUEUE": idle_queue}))
    try:
        job_id = idle.enqueue_actor_job(scripted("never"), "go")
        assert idle.get_status(job_id) is JobStatus.QUEUED
        assert idle.cancel_job(job_id) is CancelOutcome.CANCELLED
        assert idle.cancel_job(job_id) is CancelOutcome.FINISHED
        record = idle.get_result(job_id)
        assert record is not None and record.status is JobStatus.CANCELLED
        assert record.error_type == "Cancelled"
        # Now the message reaches a worker: it must not start the job.
        names = [f"{w.name}@{os.uname().nodename}" for w in pool.workers]
        idle.celery.control.add_consumer(idle_queue, destination=names, reply=True, timeout=5)
        try:
            wait_until(
                lambda: log_count(pool.workers, f"job {job_id}: not run (terminal)") >= 1,
                20,
                "the cancelled job's message to be consumed",
            )
        finally:
            idle.celery.control.cancel_consumer(
                idle_queue, destination=names, reply=True, timeout=5
            )
        events = read_events(idle, job_id)
        assert [e.type for e in events] == ["done"]
        assert events[0].fields["status"] == "cancelled"
    finally:
        idle.redis.delete(idle_queue)
        idle.close()


def test_cancel_running_jobs_stops_them_closes_the_http_stream_and_keeps_usage(
    pool: Pool, openai_server: FakeOpenAI
) -> None:
    c = pool.client
    model = openai_server.script(
        # 100 ms apart, the pool's 200-event stream cap is ~20 s away: no job can end
        # on its own while the test cancels, even on a slow machine.
        f"slow-{uuid.uuid4().hex[:6]}",
        Reply(text=WORDS * 50, chunk_delay_s=0.1),
    )
    jobs = [
        c.enqueue_actor_job(openai_llm(openai_server.base_url, model), f"go {i}") for i in range(6)
    ]
    for job_id in jobs:
        wait_until(lambda j=job_id: tokens_seen(c, j, 3), 30, "the job to stream")
    latencies = []
    for i, job_id in enumerate(jobs):
        cursor = read_events(c, job_id)[-1].id
        started = time.monotonic()
        outcome = c.cancel_job(job_id)
        # Should it have ended already, say how: the record holds the status and error.
        assert outcome is CancelOutcome.REQUESTED, (i, outcome, c.get_result(job_id))
        if i == 0:  # asking twice is harmless and says so
            assert c.cancel_job(job_id) in (CancelOutcome.ALREADY_REQUESTED, CancelOutcome.FINISHED)
        for event in c.stream_events(job_id, after=cursor, timeout=15):
            if event.terminal:
                latencies.append(time.monotonic() - started)
    print("\n" + summary("cancel latency (cancel_job -> done entry seen)", latencies))
    assert len(latencies) == len(jobs)
    wait_until(
        lambda: openai_server.closed_early.count(model) >= len(jobs),
        10,
        "the model's HTTP streams to be closed",
    )
    for job_id in jobs:
        events = read_events(c, job_id)
        record = c.get_result(job_id)
        check_one_ending(events, record)
        assert record is not None and record.status is JobStatus.CANCELLED
        assert record.result is not None
        streamed = final_text(events)
        assert 0 < len(streamed) < len(WORDS * 50)
        assert record.result.text == streamed  # the partial result is what was streamed
        assert record.result.finish_reason == "cancelled"
        assert record.result.model_calls == 1
        assert record.result.output_tokens > 0
        assert record.result.input_tokens > 0  # the prompt was sent, so it counts
        assert c.cancel_job(job_id) is CancelOutcome.FINISHED


# -- time limits ----------------------------------------------------------------------


def test_timeout_and_stall_end_timed_out(pool: Pool, openai_server: FakeOpenAI) -> None:
    c = pool.client
    slow = openai_server.script(
        f"slow-{uuid.uuid4().hex[:6]}", Reply(text=WORDS, chunk_delay_s=0.1)
    )
    stall = openai_server.script(
        f"stall-{uuid.uuid4().hex[:6]}", Reply(text=WORDS, chunk_delay_s=1.5)
    )
    timed = c.enqueue_actor_job(
        openai_llm(openai_server.base_url, slow), "go", limits={"timeout_ms": 700}
    )
    stalled = c.enqueue_actor_job(
        openai_llm(openai_server.base_url, stall), "go", limits={"stall_timeout_ms": 500}
    )
    for job_id, limit in ((timed, "timeout_ms"), (stalled, "stall_timeout_ms")):
        events = _events(pool, job_id)
        record = c.get_result(job_id)
        check_one_ending(events, record)
        assert record is not None and record.status is JobStatus.TIMED_OUT, record
        assert record.error is not None and limit in record.error
        assert record.result is not None and record.result.text == final_text(events)
        assert record.result.text  # the partial text so far is kept
    wait_until(
        lambda: slow in openai_server.closed_early and stall in openai_server.closed_early,
        15,
        "the timed-out HTTP streams to be closed",
    )


# -- provider errors ---------------------------------------------------------------------


def test_rate_limit_then_success_retries_without_a_reset(
    pool: Pool, openai_server: FakeOpenAI
) -> None:
    c = pool.client
    model = openai_server.script(
        f"r429-{uuid.uuid4().hex[:6]}",
        Reply(status=429, error_message="slow down"),
        Reply(text=WORDS),
    )
    job_id = c.enqueue_actor_job(openai_llm(openai_server.base_url, model), "go")
    events = _events(pool, job_id)
    record = c.get_result(job_id)
    check_one_ending(events, record)
    assert record is not None and record.status is JobStatus.SUCCEEDED
    assert len(openai_server.calls(model)) == 2
    assert "reset" not in [e.type for e in events]  # no token was out: nothing to void
    assert final_text(events) == WORDS


def test_a_retry_spends_the_same_budget_as_the_failed_try(
    pool: Pool, openai_server: FakeOpenAI
) -> None:
    """Limits are the job's: a retry can't make a second model call under max_model_calls=1."""
    c = pool.client
    model = openai_server.script(
        f"r500b-{uuid.uuid4().hex[:6]}", Reply(status=500), Reply(text=WORDS)
    )
    job_id = c.enqueue_actor_job(
        openai_llm(openai_server.base_url, model), "go", limits={"max_model_calls": 1}
    )
    events = _events(pool, job_id)
    record = c.get_result(job_id)
    check_one_ending(events, record)
    assert record is not None and record.status is JobStatus.LIMIT_EXCEEDED
    assert record.error is not None and "max_model_calls" in record.error
    assert len(openai_server.calls(model)) == 1  # the retry was never sent


def test_stream_cut_mid_body_retries_with_one_reset(pool: Pool, openai_server: FakeOpenAI) -> None:
    c = pool.client
    model = openai_server.script(
        f"cut-{uuid.uuid4().hex[:6]}", Reply(text=WORDS, cut_after=5), Reply(text=WORDS)
    )
    job_id = c.enqueue_actor_job(openai_llm(openai_server.base_url, model), "go")
    events = _events(pool, job_id)
    record = c.get_result(job_id)
    check_one_ending(events, record)
    assert record is not None and record.status is JobStatus.SUCCEEDED
    resets = [e for e in events if e.type == "reset"]
    assert len(resets) == 1 and resets[0].fields["reason"] == "retry"
    assert resets[0].fields["attempt"] == "1" and resets[0].fields["retry"] == "1"
    before = [e.text for e in events[: events.index(resets[0])] if e.type == "token"]
    assert "".join(before) == " ".join(WORDS.split()[:5])  # the void partial text
    assert final_text(events) == record.result.text == WORDS  # type: ignore[union-attr]


def test_the_record_counts_the_usage_and_cost_of_an_abandoned_try(
    pool: Pool, openai_server: FakeOpenAI
) -> None:
    """A try cut mid-stream was billed: the record's usage, cost and model calls add
    it (its tokens estimated, as no usage came) to the try whose text stands."""
    c = pool.client
    model = openai_server.script(
        f"billed-{uuid.uuid4().hex[:6]}", Reply(text=WORDS, cut_after=5), Reply(text=WORDS)
    )
    job_id = c.enqueue_actor_job(
        openai_llm(openai_server.base_url, model),
        "go",
        pricing={model: {"input": "1000000", "output": "1000000"}},  # $1 a token
    )
    events = _events(pool, job_id)
    record = c.get_result(job_id)
    check_one_ending(events, record)
    assert record is not None and record.status is JobStatus.SUCCEEDED
    result = record.result
    assert result is not None and result.text == WORDS
    assert result.model_calls == 2
    (node,) = result.nodes
    assert node.model_calls == 2
    # The standing try reported its own usage: len(WORDS.split()) completion tokens.
    assert result.output_tokens > len(WORDS.split())
    # ...and the cut one's were estimated: the node says both.
    sources = set(node.usage_source.split("+"))
    assert "provider" in sources and sources & {"tiktoken", "heuristic"}
    assert result.total_tokens == result.input_tokens + result.output_tokens
    assert result.cost_usd == result.total_tokens  # every try's tokens, at $1 each


def test_auth_error_fails_at_once_without_leaking_the_key(
    pool: Pool, openai_server: FakeOpenAI
) -> None:
    c = pool.client
    key = f"sk-test-{uuid.uuid4().hex}"
    model = openai_server.script(f"r401-{uuid.uuid4().hex[:6]}", Reply(status=401, echo_key=True))
    job_id = c.enqueue_actor_job(
        openai_llm(openai_server.base_url, model), "go", credentials={"openai": {"api_key": key}}
    )
    events = _events(pool, job_id)
    record = c.get_result(job_id)
    check_one_ending(events, record)
    assert record is not None and record.status is JobStatus.FAILED
    assert len(openai_server.calls(model)) == 1  # not retried
    assert record.error is not None and "401" in record.error
    assert key not in record.error and key not in str(events)


def test_server_errors_exhaust_the_provider_retries(pool: Pool, openai_server: FakeOpenAI) -> None:
    c = pool.client
    model = openai_server.script(f"r500-{uuid.uuid4().hex[:6]}", Reply(status=500))
    job_id = c.enqueue_actor_job(openai_llm(openai_server.base_url, model), "go")
    events = _events(pool, job_id)
    record = c.get_result(job_id)
    check_one_ending(events, record)
    assert record is not None and record.status is JobStatus.FAILED
    assert len(openai_server.calls(model)) == 3  # ACTORQ_PROVIDER_RETRIES=2: three tries
    assert record.error is not None and "gave up after 3 tries" in record.error


# -- idempotency and the stream cap --------------------------------------------------------


def test_idempotency_key_returns_the_same_job_and_enqueues_once(pool: Pool) -> None:
    c = pool.client
    key = f"order-{uuid.uuid4().hex}"
    first = c.enqueue_actor_job(scripted("once"), "go", idempotency_key=key)
    again = c.enqueue_actor_job(scripted("once"), "go", idempotency_key=key)
    assert again == first
    c.wait_result(first, timeout=30)
    after_end = c.enqueue_actor_job(scripted("once"), "go", idempotency_key=key)
    assert after_end == first
    other = c.enqueue_actor_job(scripted("twice"), "go", idempotency_key=key + "-b")
    assert other != first
    assert c.wait_result(other, timeout=30).status is JobStatus.SUCCEEDED
    events = read_events(c, first)
    assert [e.type for e in events].count("start") == 1
    assert log_count(pool.workers, f"job {first}: not run (") == 0  # sent once


def test_stream_cap_ends_limit_exceeded_and_trims_nothing(pool: Pool) -> None:
    c = pool.client
    words = " ".join(f"t{i}" for i in range(400))
    job_id = c.enqueue_actor_job(scripted(words), "go")
    events = _events(pool, job_id)
    record = c.get_result(job_id)
    check_one_ending(events, record)
    assert record is not None and record.status is JobStatus.LIMIT_EXCEEDED
    assert record.error is not None and "stream_max_events" in record.error
    assert len(events) == 201  # the cap (200) plus the ending
    assert events[0].type == "start"  # nothing trimmed from the front
    tokens = [e.text for e in events if e.type == "token"]
    assert "".join(tokens) == " ".join(words.split()[:199])
    assert record.result is not None and record.result.finish_reason == "limit"


# -- a worker that lost its claim ---------------------------------------------------------


def test_frozen_worker_loses_its_claim_and_publishes_nothing_more(pool: Pool) -> None:
    c = pool.client
    reply = " ".join(f"f{i}" for i in range(60))
    job_id = c.enqueue_actor_job(scripted(reply, token_delay_ms=50), "go")
    events = wait_until(lambda: tokens_seen(c, job_id, 5), 20, "the job to stream")
    frozen = worker_of(events[0], pool.workers)
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        wait_until(
            lambda: (
                c.redis.hget(f"actorq:job:{{{job_id}}}", "status") != b"running"
                or c.redis.hget(f"actorq:job:{{{job_id}}}", "attempt") == b"2"
            ),
            20,
            "the sweeper to requeue the frozen worker's job",
        )
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    events = _events(pool, job_id)
    check_restarted_once(events, c.get_result(job_id), reply)
    wait_until(
        lambda: log_count([frozen], f"job {job_id}") and log_count([frozen], "lost its lease"),
        15,
        "the frozen worker to notice it lost the job",
    )


def test_cancel_a_job_whose_worker_froze_ends_cancelled_once(pool: Pool) -> None:
    c = pool.client
    job_id = c.enqueue_actor_job(scripted(WORDS, token_delay_ms=50), "go")
    events = wait_until(lambda: tokens_seen(c, job_id, 3), 20, "the job to stream")
    frozen = worker_of(events[0], pool.workers)
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        assert c.cancel_job(job_id) is CancelOutcome.REQUESTED
        # Its worker can't see the flag: the sweeper requeues the job once the lease
        # lapses, and the claim finds the flag and ends it.
        wait_until(
            lambda: c.redis.hget(f"actorq:job:{{{job_id}}}", "status") != b"running",
            20,
            "the sweeper to pick up the frozen worker's job",
        )
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    events = _events(pool, job_id)
    record = c.get_result(job_id)
    check_one_ending(events, record)
    assert record is not None and record.status is JobStatus.CANCELLED
    assert record.error is not None and "lost before it could stop" in record.error
    assert [e.type for e in events].count("start") == 1
    time.sleep(1.0)  # the thawed worker must not write after the ending
    assert read_events(c, job_id) == events


def test_a_lost_attempts_calls_and_cost_count_against_the_jobs_limits(pool: Pool) -> None:
    """The budget is the job's: an attempt lost after its model call leaves the next
    attempt nothing under ``max_model_calls`` 1, so it ends at once, recording the lost
    attempt's usage."""
    c = pool.client
    reply = " ".join(f"b{i}" for i in range(60))
    job_id = c.enqueue_actor_job(
        scripted(reply, token_delay_ms=50), "go", limits={"max_model_calls": 1}
    )
    events = wait_until(lambda: tokens_seen(c, job_id, 5), 20, "the job to stream")
    frozen = worker_of(events[0], pool.workers)
    saved = saved_usage(c, job_id, calls=1)
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        record = wait_until(lambda: c.get_result(job_id), 20, "the next attempt to end the job")
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    assert record.status is JobStatus.LIMIT_EXCEEDED and record.attempt == 2
    assert record.error is not None and "1 model calls made (retries included)" in record.error
    assert record.result is not None and record.result.model_calls == 1
    # Named as an execution stopped by a limit names it.
    assert record.result.finish_reason == "limit" and record.result.error == record.error
    assert record.result.output_tokens >= saved.output_tokens > 0
    events = _events(pool, job_id)
    check_one_ending(events, record)
    assert [e.type for e in events].count("token") < 60  # the second attempt ran no call


def test_concurrent_enqueues_with_one_idempotency_key_make_one_job(pool: Pool) -> None:
    from concurrent.futures import ThreadPoolExecutor

    c = pool.client
    key = f"race-{uuid.uuid4().hex}"
    with ThreadPoolExecutor(8) as ex:
        ids = list(
            ex.map(
                lambda _: c.enqueue_actor_job(scripted("raced"), "go", idempotency_key=key),
                range(16),
            )
        )
    assert len(set(ids)) == 1
    record = c.wait_result(ids[0], timeout=30)
    assert record.status is JobStatus.SUCCEEDED
    assert [e.type for e in read_events(c, ids[0])].count("start") == 1


def test_sweep_interval_setting_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.supervisor import sweep_interval_from_env

    monkeypatch.delenv("ACTORQ_SWEEP_INTERVAL_S", raising=False)
    assert sweep_interval_from_env() == 5.0
    monkeypatch.setenv("ACTORQ_SWEEP_INTERVAL_S", "0.5")
    assert sweep_interval_from_env() == 0.5
    for bad in ("soon", "0", "-1", "99999"):
        monkeypatch.setenv("ACTORQ_SWEEP_INTERVAL_S", bad)
        with pytest.raises(ValueError, match="ACTORQ_SWEEP_INTERVAL_S"):
            sweep_interval_from_env()


def test_sweeper_sends_a_lost_job_to_its_own_queue_and_retries_when_the_broker_fails(
    stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    import redis.asyncio as aioredis

    from producer import keys, scripts
    from worker.supervisor import Supervisor

    class Ahead:
        """This test's sweeper runs a minute ahead. The running index is one key for
        every worker on this Redis: the entries below are due for this sweeper only,
        not for the live workers' own sweeps, which would otherwise race it."""

        monotonic = staticmethod(time.monotonic)

        @staticmethod
        def time() -> float:
            return time.time() + 60

    monkeypatch.setattr("worker.supervisor.time", Ahead)
    queue = f"actorq-sweep-{uuid.uuid4().hex[:6]}"
    settings = Settings.from_env({**stack_env, "ACTORQ_QUEUE": queue})
    c = Client(settings)
    job_id = c.enqueue_actor_job(scripted("lost"), "go")  # nobody consumes this queue
    # An attempt claims it with a lease that lapses at once: its worker "died".
    c.redis.eval(
        scripts.CLAIM, 5, *scripts.running_job_keys(job_id), "gone", 1, f"{time.time()}", 3,
        "gone-worker", 60, 1000, "{}", "{}", queue, time.time() + 30, job_id,
    )  # fmt: skip
    assert c.redis.zscore(keys.RUNNING_INDEX, job_id) is not None  # indexed by the claim
    # A stale entry of a job that already ended sorts first: the sweep drops it and
    # goes on to the lost job.
    ended = c.enqueue_actor_job(scripted("ended"), "go")
    assert c.cancel_job(ended) is CancelOutcome.CANCELLED
    c.redis.zadd(keys.RUNNING_INDEX, {ended: time.time() + 28})
    time.sleep(0.01)
    sent: list[tuple[str, str, str]] = []

    def broker_down(job: str, q: str, actor: str) -> None:
        raise ConnectionError("broker away")

    async def sweep(requeue: object) -> int:
        r = aioredis.Redis.from_url(settings.redis_url)
        try:
            return await Supervisor(r, settings, requeue, sweep_s=1).sweep()  # type: ignore[arg-type]
        finally:
            await r.aclose()

    try:
        assert asyncio.run(sweep(broker_down)) == 0
        assert c.get_status(job_id) is JobStatus.RUNNING  # undone: the next sweep retries
        assert c.redis.zscore(keys.RUNNING_INDEX, job_id) is not None
        assert asyncio.run(sweep(lambda job, q, actor: sent.append((job, q, actor)))) == 1
        assert sent == [(job_id, queue, "tester")]  # the actor name travels again too
        assert c.get_status(job_id) is JobStatus.QUEUED
        assert c.redis.zscore(keys.RUNNING_INDEX, job_id) is None
        assert c.redis.zscore(keys.RUNNING_INDEX, ended) is None
        assert asyncio.run(sweep(lambda job, q, actor: sent.append((job, q, actor)))) == 0
    finally:
        c.cancel_job(job_id)
        c.redis.zrem(keys.RUNNING_INDEX, job_id, ended)
        c.redis.delete(queue)
        c.close()


@pytest.mark.parametrize("ending", ["exhausted", "cancelled"])
def test_a_claim_that_ends_the_job_answers_its_rerun_as_the_first_run(
    stack_env: dict[str, str], ending: str
) -> None:
    """A claim that ended the job itself (attempts used up, cancel asked) and lost its
    reply gets the same verdict again, so its worker counts the job it ended; another
    claim still hears ``terminal``."""
    from producer import keys, scripts

    queue = f"actorq-rerun-{uuid.uuid4().hex[:6]}"
    c = Client(Settings.from_env({**stack_env, "ACTORQ_QUEUE": queue}))
    job_id = c.enqueue_actor_job(scripted("rerun"), "go")  # nobody consumes this queue
    if ending == "exhausted":
        c.redis.hset(keys.job_key(job_id), "attempt", 3)
    else:
        c.redis.set(keys.cancel_key(job_id), "1", ex=60)
    claim = [
        scripts.CLAIM, 5, *scripts.running_job_keys(job_id), "owner-1", 60_000,
        f"{time.time()}", 3, "w", 60, 1000, "{}", "{}", queue, time.time() + 60, job_id,
    ]  # fmt: skip
    try:
        first = c.redis.eval(*claim)
        assert first[0] == ending.encode()
        assert c.redis.eval(*claim) == first  # its reply was lost: the same answer
        other = [*claim]
        other[7] = "owner-2"
        assert c.redis.eval(*other) == [b"terminal", 0]
        assert [e.type for e in read_events(c, job_id)].count("done") == 1
    finally:
        c.redis.delete(*scripts.job_keys(job_id), queue)
        c.redis.zrem(keys.JOBS_INDEX, job_id)
        c.close()


def test_claim_and_requeue_answer_a_rerun_as_the_first_run(stack_env: dict[str, str]) -> None:
    """redis-py re-sends a script after a dropped connection even if it already ran."""
    from producer import keys, scripts

    queue = f"actorq-rerun-{uuid.uuid4().hex[:6]}"
    c = Client(Settings.from_env({**stack_env, "ACTORQ_QUEUE": queue}))
    job_id = c.enqueue_actor_job(scripted("rerun"), "go")  # nobody consumes this queue
    claim = [
        scripts.CLAIM, 5, *scripts.running_job_keys(job_id), "owner-1", 60_000,
        f"{time.time()}", 3, "w", 60, 1000, "{}", "{}", queue, time.time() + 60, job_id,
    ]  # fmt: skip
    payload = c.redis.hget(keys.job_key(job_id), "payload")
    try:
        assert payload and c.redis.eval(*claim) == [b"claimed", 1, payload, None]
        # The same claim again (its reply was lost): the same answer.
        assert c.redis.eval(*claim) == [b"claimed", 1, payload, None]
        other = [*claim]
        other[7] = "owner-2"
        assert c.redis.eval(*other)[0] == b"busy"  # a real duplicate is still fenced
        starts = [e for e in read_events(c, job_id) if e.type == "start"]
        assert len(starts) == 1  # the re-run wrote nothing

        finish = [
            scripts.FINISH, 5, *scripts.running_job_keys(job_id), "owner-1", "succeeded", "",
            "", "{}", f"{time.time()}", 60, 1000, job_id,
        ]  # fmt: skip
        ended = c.redis.eval(*finish)
        assert ended[0] == 1
        assert c.redis.eval(*finish) == ended  # its reply was lost: the same answer
        late = [*finish]
        late[7] = "owner-2"
        assert c.redis.eval(*late) == [0, b"terminal"]  # another attempt: not its ending
        assert [e.type for e in read_events(c, job_id)].count("done") == 1
        c.redis.hset(keys.job_key(job_id), mapping={"status": "running"})  # for the requeue below
        c.redis.hdel(keys.job_key(job_id), "done_id", "ended_by")
        c.redis.delete(keys.lease_key(job_id))  # the attempt's worker died
        now = f"{time.time():.6f}"
        job_keys = scripts.running_job_keys(job_id)
        requeue = [scripts.REQUEUE, 5, *job_keys, now, 60, job_id]
        assert c.redis.eval(*requeue) == [1, queue.encode(), b"tester"]
        assert c.redis.eval(*requeue) == [1, queue.encode(), b"tester"]  # lost reply re-run
        late = [scripts.REQUEUE, 5, *job_keys, f"{time.time() + 1:.6f}", 60, job_id]
        assert c.redis.eval(*late)[0] == -1  # another sweeper is sending it: nothing to send
        # Sent: the job leaves the running index (its next claim indexes it again).
        assert c.redis.eval(scripts.REQUEUE_SENT, 5, *job_keys, now, job_id) == 1
        assert c.redis.zscore(keys.RUNNING_INDEX, job_id) is None
    finally:
        c.cancel_job(job_id)
        c.redis.delete(queue)
        c.close()


@pytest.mark.parametrize(
    "ending", ["next_attempt", "exhausted", "cancel_at_claim", "cancel_queued"]
)
def test_a_lost_attempts_usage_reaches_the_next_attempt_or_the_ending(
    stack_env: dict[str, str], ending: str
) -> None:
    """What RENEW saved of a lost attempt's usage comes back with the next CLAIM, and is
    the record's result when the job ends without running again; FINISH drops it."""
    from producer import ActorResult, NodeUsage, keys, scripts

    queue = f"actorq-usage-{uuid.uuid4().hex[:6]}"
    c = Client(Settings.from_env({**stack_env, "ACTORQ_QUEUE": queue}))
    job_id = c.enqueue_actor_job(scripted("lost"), "go")  # nobody consumes this queue
    node = NodeUsage(node="n", provider="openai", model="m", input_tokens=7, output_tokens=5,
                     total_tokens=12, usage_source="tiktoken", model_calls=1, cost_usd="0.25")  # fmt: skip
    used = ActorResult(nodes=[node], input_tokens=7, output_tokens=5, total_tokens=12,
                       cost_usd="0.25", model_calls=1, duration_ms=900, finish_reason="error")  # fmt: skip
    job_keys = scripts.running_job_keys(job_id)

    def claim(owner: str, max_attempts: int = 3) -> Any:
        return c.redis.eval(
            scripts.CLAIM, 5, *job_keys, owner, 60_000, f"{time.time()}", max_attempts, "w", 60,
            1000, ActorResult(finish_reason="cancelled").to_json(),
            ActorResult(finish_reason="error").to_json(), queue, time.time() + 60, job_id,
        )  # fmt: skip

    def renew(owner: str, usage: str) -> Any:
        return c.redis.eval(
            scripts.RENEW, 5, keys.lease_key(job_id), keys.cancel_key(job_id),
            keys.job_key(job_id), keys.RUNNING_INDEX, keys.events_key(job_id),
            owner, 60_000, 60, time.time() + 60, job_id, usage,
        )  # fmt: skip

    def lose_attempt() -> None:  # its worker died: the lease lapses, the sweeper requeues
        c.redis.delete(keys.lease_key(job_id))
        assert c.redis.eval(scripts.REQUEUE, 5, *job_keys, f"{time.time():.6f}", 60, job_id)[0] == 1

    try:
        assert claim("owner-1")[:2] == [b"claimed", 1]
        assert renew("owner-1", "") == [1, 0]  # nothing used yet: nothing saved
        assert c.redis.hget(keys.job_key(job_id), "usage") is None
        assert renew("owner-1", used.to_json()) == [1, 0]
        assert renew("intruder", ActorResult(model_calls=9).to_json()) == [0, 0]  # fenced
        # The attempt streamed a token before it was lost (its worker died mid-stream).
        c.redis.xadd(keys.events_key(job_id), {"type": "token", "text": "half", "node": "n"})
        lose_attempt()
        if ending == "next_attempt":
            reply = claim("owner-2")
            assert reply[:2] == [b"claimed", 2]
            assert ActorResult.model_validate_json(reply[3]) == used
            finish = [scripts.FINISH, 5, *job_keys, "owner-2", "succeeded", "", "", "{}",
                      f"{time.time()}", 60, 1000, job_id]  # fmt: skip
            assert c.redis.eval(*finish)[0] == 1
            assert c.redis.hget(keys.job_key(job_id), "usage") is None
            return
        if ending == "exhausted":
            assert claim("owner-2", max_attempts=1)[0] == b"exhausted"
            status, reason = JobStatus.FAILED, "error"
        elif ending == "cancel_at_claim":
            c.redis.set(keys.cancel_key(job_id), "1", ex=60)
            assert claim("owner-2")[0] == b"cancelled"
            status, reason = JobStatus.CANCELLED, "cancelled"
        else:
            assert c.cancel_job(job_id) is CancelOutcome.CANCELLED
            status, reason = JobStatus.CANCELLED, "cancelled"
        record = c.get_result(job_id)
        assert record is not None and record.status is status and record.result is not None
        assert record.result == used.model_copy(update={"finish_reason": reason})
        assert c.redis.hget(keys.job_key(job_id), "usage") is None
        # The lost attempt's token is voided before the ending: stream and record agree.
        events = list(c.stream_events(job_id, timeout=10))
        assert [e.type for e in events][-3:] == ["token", "reset", "done"]
        assert events[-2].fields["reason"] == "lost"
        assert final_text(events) == record.result.text == ""
    finally:
        c.redis.delete(*scripts.job_keys(job_id), queue)
        c.redis.zrem(keys.JOBS_INDEX, job_id)
        c.redis.zrem(keys.RUNNING_INDEX, job_id)
        c.close()


def test_a_renewal_after_the_tries_ran_out_saves_what_the_record_will_hold(
    stack_env: dict[str, str], openai_server: FakeOpenAI
) -> None:
    """Retries that end in a limit: while the ending is written (a renewal can land
    then), the usage saved is the record's, each try counted once."""
    from producer import ActorResult, keys, scripts
    from worker.jobs import JobRunner
    from worker.supervisor import ActiveJob

    queue = f"actorq-ended-{uuid.uuid4().hex[:6]}"
    settings = Settings.from_env({**stack_env, "ACTORQ_QUEUE": queue})
    c = Client(settings)
    model = openai_server.script(f"r500x3-{uuid.uuid4().hex[:6]}", *[Reply(status=500)] * 3)
    job_id = c.enqueue_actor_job(
        openai_llm(openai_server.base_url, model), "go", limits={"max_model_calls": 2}
    )
    active: list[ActiveJob] = []

    async def main() -> str:
        runner = JobRunner(settings, lambda *a: None)
        watch = runner.supervisor.add

        def add(job: ActiveJob) -> None:  # the attempt's job, kept to ask for its usage
            active.append(job)
            watch(job)

        runner.supervisor.add = add  # type: ignore[method-assign]
        try:
            return str(await asyncio.wait_for(runner.run(job_id), 60))
        finally:
            await runner.aclose()

    try:
        assert asyncio.run(main()) == "limit_exceeded"
        record = c.get_result(job_id)
        assert record is not None and record.result is not None
        assert record.result.model_calls == 2 and len(openai_server.calls(model)) == 2
        saved = ActorResult.model_validate_json(active[0].usage())
        assert saved.model_calls == 2 and saved.input_tokens == record.result.input_tokens
    finally:
        c.redis.delete(*scripts.job_keys(job_id), queue)
        c.redis.zrem(keys.JOBS_INDEX, job_id)
        c.close()
