"""Faults with real processes: SIGKILLed workers, attempts running out, Redis
restarts and dropped connections, and the core path on a RabbitMQ broker.

Every worker and Redis started here is stopped by pid; waits are bounded.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator

import pytest

from ops.stack import EmbeddedRedis, WorkerProcess, free_port
from producer import CancelOutcome, Client, JobStatus, Settings, final_text
from tests.conftest import WorkerFactory
from tests.helpers import forget_unacked, scripted
from tests.reliab_support import (
    check_one_ending,
    check_restarted_once,
    log_count,
    read_events,
    retrying,
    saved_usage,
    send_duplicate,
    summary,
    tokens_seen,
    wait_until,
    worker_of,
)

REPLY = " ".join(f"k{i}" for i in range(40))
#: Priced, so a lost attempt's cost shows in the record: $1 a token each way.
PRICING = {"scripted": {"input": 1_000_000, "output": 1_000_000}}
FAST_RECOVERY = {"ACTORQ_LEASE_TTL_S": "3", "ACTORQ_SWEEP_INTERVAL_S": "0.5"}


def _start_all(start: WorkerFactory, names: list[str], env: dict[str, str]) -> list[WorkerProcess]:
    workers = [start(n, env=env, wait=False) for n in names]
    for w in workers:
        w.wait_ready(w.env["REDIS_URL"], timeout=60)
    return workers


def _kill_mid_stream(
    client: Client, workers: list[WorkerProcess], label: str
) -> tuple[str, WorkerProcess]:
    """SIGKILL the worker streaming a new job once a lease renewal saved its usage; wait
    for attempt 2; return the job, the victim and the usage it saved."""
    job_id = client.enqueue_actor_job(
        scripted(REPLY, token_delay_ms=50, model="scripted"), "go", pricing=PRICING
    )
    events = wait_until(lambda: tokens_seen(client, job_id, 5), 20, "the job to stream")
    victim = worker_of(events[0], workers)
    saved = saved_usage(client, job_id, calls=1)
    victim.kill()
    killed_at = time.monotonic()
    recovered = _next_start(client, job_id, 2) - killed_at
    print(f"\n{label}: SIGKILL -> attempt 2 started on the survivor: {recovered:.2f} s")
    events = list(client.stream_events(job_id, timeout=30))
    record = client.get_result(job_id)
    check_restarted_once(events, record, REPLY)
    # The record counts the lost attempt's call, tokens and cost with the second's.
    assert record is not None and record.result is not None
    result = record.result
    assert result.model_calls == 2 and result.output_tokens >= 40 + saved.output_tokens
    assert saved.cost_usd is not None and result.cost_usd is not None
    assert result.cost_usd >= saved.cost_usd + 40
    assert "heuristic" in result.nodes[0].usage_source  # the lost call's estimate
    return job_id, victim


def _next_start(client: Client, job_id: str, attempt: int) -> float:
    """Wait for the ``start`` entry of ``attempt``; return when it was seen."""
    wait_until(
        lambda: (
            any(
                e.type == "start" and e.fields.get("attempt") == str(attempt)
                for e in read_events(client, job_id)
            )
            or client.redis.hget(f"actorq:job:{{{job_id}}}", "done_id")
        ),
        45,
        f"attempt {attempt} of {job_id} to start",
    )
    return time.monotonic()


# -- dead workers ------------------------------------------------------------------------


@pytest.fixture
def kill_env(stack_env: dict[str, str]) -> Iterator[dict[str, str]]:
    env = {
        **stack_env,
        **FAST_RECOVERY,
        "ACTORQ_QUEUE": f"actorq-kill-{uuid.uuid4().hex[:6]}",
        "ACTORQ_MAX_ATTEMPTS": "2",
    }
    yield env
    c = Client(Settings.from_env(env))
    c.redis.delete(env["ACTORQ_QUEUE"])
    # The killed workers' messages stay unacked in kombu's shared indices: a live
    # worker's restore would otherwise push them back to this queue later.
    forget_unacked(c.redis, env["ACTORQ_QUEUE"])
    c.close()


def test_sigkill_mid_stream_then_attempts_run_out(
    kill_env: dict[str, str], start_worker: WorkerFactory
) -> None:
    tag = kill_env["ACTORQ_QUEUE"].rsplit("-", 1)[1]
    workers = _start_all(start_worker, [f"k1-{tag}", f"k2-{tag}"], kill_env)
    client = Client(Settings.from_env(kill_env))
    try:
        # 1. SIGKILL the worker streaming a job: the other worker finishes it.
        job_id, victim = _kill_mid_stream(client, workers, "Redis broker")
        survivor = next(w for w in workers if w is not victim)
        assert client.wait_result(job_id, timeout=5).worker.endswith(f":{survivor.pid}")

        # 2. Kill the worker of every attempt: after ACTORQ_MAX_ATTEMPTS (2) it fails.
        job_id = client.enqueue_actor_job(
            scripted(REPLY, token_delay_ms=50, model="scripted"), "go", pricing=PRICING
        )
        events = wait_until(lambda: tokens_seen(client, job_id, 3), 20, "the job to stream")
        assert worker_of(events[0], workers) is survivor
        saved_usage(client, job_id, calls=1)
        survivor.kill()
        third = start_worker(f"k3-{tag}", env=kill_env)
        _next_start(client, job_id, 2)
        wait_until(lambda: tokens_seen(client, job_id, 8), 20, "attempt 2 to stream")
        saved = saved_usage(client, job_id, calls=2)
        third.kill()
        start_worker(f"k4-{tag}", env=kill_env)
        events = list(client.stream_events(job_id, timeout=45))
        record = client.get_result(job_id)
        check_one_ending(events, record)
        assert record is not None and record.status is JobStatus.FAILED
        assert record.error_type == "AttemptsExhausted"
        assert record.error is not None and "gave up after 2 attempts" in record.error
        # A reset before each new attempt, and one voiding the last attempt's tokens.
        resets = [e.fields.get("reason") for e in events if e.type == "reset"]
        assert [e.type for e in events].count("start") == 2 and resets == ["restart", "lost"]
        assert final_text(events) == ""  # as the record's text
        # Given up at a claim: the result is what both lost attempts used.
        assert record.result is not None and record.result.model_calls == 2
        assert record.result.output_tokens >= saved.output_tokens > 0
        assert record.result.finish_reason == "error" and record.result.text == ""
    finally:
        client.close()


# -- Redis restarts and dropped connections ---------------------------------------------------


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    """A private Redis with an append-only file, restartable on the same port."""
    server = EmbeddedRedis(port=free_port(), appendonly=True).start()
    try:
        yield server
    finally:
        server.cleanup()


def _run_through(
    client: Client, fault: str, jobs: list[str], reply: str, timeout: float = 60
) -> list[str]:
    """Wait for every job to end; check its one ending and its text; return the statuses."""
    statuses = []
    for job_id in jobs:
        record = wait_until(
            lambda j=job_id: retrying(lambda: client.get_result(j)), timeout, f"{job_id} to end"
        )
        events = retrying(lambda j=job_id: read_events(client, j))
        check_one_ending(events, record)
        if record.status is JobStatus.SUCCEEDED:
            assert final_text(events) == reply
        statuses.append(f"{record.status.value}@attempt{record.attempt}")
    print(f"\n{fault}: {statuses}")
    return statuses


def test_redis_restart_and_dropped_connections_end_every_job(
    own_redis: EmbeddedRedis, stack_env: dict[str, str], start_worker: WorkerFactory
) -> None:
    env = {
        **stack_env,
        **FAST_RECOVERY,
        "REDIS_URL": own_redis.url,
        "CELERY_BROKER_URL": own_redis.url,
        "ACTORQ_QUEUE": f"actorq-rr-{uuid.uuid4().hex[:6]}",
    }
    worker = start_worker(f"rr-{env['ACTORQ_QUEUE'][-6:]}", env=env)
    client = Client(Settings.from_env(env))
    reply = " ".join(f"r{i}" for i in range(50))
    try:

        def launch(n: int) -> list[str]:
            jobs = [
                client.enqueue_actor_job(scripted(reply, token_delay_ms=40), "go") for _ in range(n)
            ]
            for j in jobs:
                wait_until(lambda j=j: tokens_seen(client, j, 3), 20, "jobs to stream")
            return jobs

        # A short restart (shorter than the lease): the jobs carry on.
        jobs = launch(3)
        own_redis.stop()
        time.sleep(1.0)
        own_redis.start()
        statuses = _run_through(client, "redis restart, 1 s down", jobs, reply)
        assert all(s.startswith("succeeded") for s in statuses), statuses

        # Every client connection dropped at once (workers' and the broker's).
        jobs = launch(3)
        killed = client.redis.client_kill_filter(_type="normal", skipme=True)
        killed += client.redis.client_kill_filter(_type="pubsub")
        assert killed > 0
        statuses = _run_through(client, f"CLIENT KILL ({killed} connections)", jobs, reply)
        assert all(s.startswith("succeeded") for s in statuses), statuses

        # Down for longer than the lease: the attempts lose their claim and run again.
        jobs = launch(2)
        own_redis.stop()
        time.sleep(int(env["ACTORQ_LEASE_TTL_S"]) + 2)
        own_redis.start()
        statuses = _run_through(client, "redis restart, 5 s down (> lease)", jobs, reply)
        assert all(s == "succeeded@attempt2" for s in statuses), statuses
        assert log_count([worker], "lost its lease") >= 1
        # None stays running, and the worker still serves the next job.
        leftover = client.redis.zrange("actorq:running", 0, -1)
        assert not [j for j in jobs if j.encode() in leftover]
        nxt = client.enqueue_actor_job(scripted("still serving"), "go")
        assert client.wait_result(nxt, timeout=30).status is JobStatus.SUCCEEDED
    finally:
        client.close()
        worker.stop(timeout=10)


# -- RabbitMQ as the broker ----------------------------------------------------------------

RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672//"


def _rabbit_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not _rabbit_reachable(), reason="no RabbitMQ on 127.0.0.1:5672")
def test_rabbitmq_broker_core_path_duplicates_cancel_and_a_killed_worker(
    own_redis: EmbeddedRedis, stack_env: dict[str, str], start_worker: WorkerFactory
) -> None:
    from kombu import Connection

    queue = f"actorq-amqp-{uuid.uuid4().hex[:6]}"
    env = {
        **stack_env,
        **FAST_RECOVERY,
        "REDIS_URL": own_redis.url,
        "CELERY_BROKER_URL": RABBIT_URL,
        "ACTORQ_QUEUE": queue,
    }
    workers = _start_all(start_worker, [f"q1-{queue[-6:]}", f"q2-{queue[-6:]}"], env)
    client = Client(Settings.from_env(env))
    try:
        # The core path: tokens in order, one ending, the record.
        job_id = client.enqueue_actor_job(scripted(REPLY, token_delay_ms=5), "go")
        events = list(client.stream_events(job_id, timeout=30))
        record = client.get_result(job_id)
        check_one_ending(events, record)
        assert record is not None and record.status is JobStatus.SUCCEEDED
        assert "".join(e.text for e in events if e.type == "token") == REPLY

        # A duplicate while running is fenced; cancel stops the run (a 40 s reply: it
        # is still running however slowly the duplicate is seen).
        job_id = client.enqueue_actor_job(scripted(REPLY * 20, token_delay_ms=50), "go")
        wait_until(lambda: tokens_seen(client, job_id, 3), 20, "the job to stream")
        send_duplicate(client, job_id)
        wait_until(lambda: log_count(workers, f"job {job_id}: not run (busy)"), 20, "the dup")
        assert client.cancel_job(job_id) is CancelOutcome.REQUESTED
        events = list(client.stream_events(job_id, timeout=15))
        record = client.get_result(job_id)
        check_one_ending(events, record)
        assert record is not None and record.status is JobStatus.CANCELLED
        assert [e.type for e in events].count("start") == 1

        # SIGKILL: RabbitMQ hands the message back at once (fenced while the lease
        # lives), and the sweeper restarts the job on the survivor.
        _, victim = _kill_mid_stream(client, workers, "RabbitMQ")

        # The message arrives while Redis (the job store) is down: the worker
        # waits for it rather than failing the delivery, then runs the job.
        idle = Client(Settings.from_env({**env, "ACTORQ_QUEUE": f"{queue}-idle"}))
        try:
            job_id = idle.enqueue_actor_job(scripted(REPLY), "go")
            own_redis.stop()
            survivor = next(w for w in workers if w is not victim)
            names = [f"{survivor.name}@{socket.gethostname()}"]
            idle.celery.control.add_consumer(f"{queue}-idle", destination=names, reply=True)
            wait_until(
                lambda: log_count([survivor], f"job {job_id}: Redis unreachable"),
                20,
                "the delivery to find Redis away",
            )
            own_redis.start()
            record = retrying(lambda: idle.wait_result(job_id, timeout=30), 45)
            assert record.status is JobStatus.SUCCEEDED
            check_one_ending(read_events(idle, job_id), record)
        finally:
            idle.close()
    finally:
        client.close()
        for w in workers:
            w.stop(timeout=10)
        with Connection(RABBIT_URL, connect_timeout=5) as conn:
            for name in (queue, f"{queue}-idle"):
                conn.default_channel.queue_delete(name)


def test_summary_helper_reports_p50_and_max() -> None:
    line = summary("x", [0.1, 0.3, 0.2])
    assert "p50=200 ms" in line and "max=300 ms" in line
