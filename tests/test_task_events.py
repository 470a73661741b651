"""Task events for Flower leave the worker in batches, and every one still arrives."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery

from producer import Client, Settings
from producer.schema import JobStatus
from producer.settings import env_flag
from tests.conftest import WorkerFactory
from tests.helpers import scripted
from worker.consumer import event_flush_s_from_env


def test_flush_interval_from_env() -> None:
    assert event_flush_s_from_env({}) == 0.1
    assert event_flush_s_from_env({"ACTORQ_EVENT_FLUSH_MS": " 250 "}) == 0.25
    assert event_flush_s_from_env({"ACTORQ_EVENT_FLUSH_MS": "0"}) == 0.0


@pytest.mark.parametrize("raw", ["soon", "-1", "10001", "nan"])
def test_bad_flush_interval_names_the_variable(raw: str) -> None:
    with pytest.raises(ValueError, match="ACTORQ_EVENT_FLUSH_MS"):
        event_flush_s_from_env({"ACTORQ_EVENT_FLUSH_MS": raw})


def test_task_events_switch_from_env() -> None:
    assert env_flag("ACTORQ_TASK_EVENTS", True, {}) is True
    assert env_flag("ACTORQ_TASK_EVENTS", True, {"ACTORQ_TASK_EVENTS": " "}) is True
    assert env_flag("ACTORQ_TASK_EVENTS", True, {"ACTORQ_TASK_EVENTS": " 0 "}) is False
    assert env_flag("ACTORQ_TASK_EVENTS", False, {"ACTORQ_TASK_EVENTS": "1"}) is True


@pytest.mark.parametrize("raw", ["yes", "true", "off", "2", "-1"])
def test_a_bad_task_events_switch_names_the_variable(raw: str) -> None:
    with pytest.raises(ValueError, match=f"ACTORQ_TASK_EVENTS must be 0 or 1, got '{raw}'"):
        env_flag("ACTORQ_TASK_EVENTS", True, {"ACTORQ_TASK_EVENTS": raw})


@contextlib.contextmanager
def _captured_events(env: dict[str, str]) -> Iterator[tuple[list[dict[str, Any]], list[int]]]:
    """Every Celery event on the broker while the block runs, and how many messages held them."""
    app = Celery("events-test", broker=env.get("CELERY_BROKER_URL") or env["REDIS_URL"])
    seen: list[dict[str, Any]] = []
    messages = [0]
    ready, stop = threading.Event(), threading.Event()

    class Counting(app.events.Receiver):  # type: ignore[name-defined]
        def _receive(self, body: Any, message: Any, *args: Any, **kwargs: Any) -> None:
            messages[0] += 1  # one broker message, holding one event or a batch
            super()._receive(body, message, *args, **kwargs)

    def listen() -> None:
        with app.connection_for_read() as conn:
            recv = Counting(conn, handlers={"*": seen.append})
            ready.set()
            while not stop.is_set():
                try:  # a quiet half second ends a capture: start the next one
                    for _ in recv.itercapture(limit=None, timeout=0.5, wakeup=False):
                        if stop.is_set():
                            return
                except TimeoutError:
                    pass

    listener = threading.Thread(target=_until_stopped(listen), daemon=True)
    listener.start()
    assert ready.wait(10)
    try:
        yield seen, messages
    finally:
        stop.set()
        listener.join(5)
        app.close()


def _jobs_while_capturing(
    start_worker: WorkerFactory,
    stack_env: dict[str, str],
    label: str,
    jobs: int,
    env: dict[str, str],
    done: Callable[[list[dict[str, Any]], list[str], str], bool],
) -> tuple[list[dict[str, Any]], int, str]:
    """Run ``jobs`` jobs on a worker of a queue of its own while capturing events, until
    ``done(events, job_ids, hostname)`` or 10 s; the events, their messages, the hostname."""
    queue = f"actorq-{label}-{uuid.uuid4().hex[:8]}"
    env = {**stack_env, "ACTORQ_QUEUE": queue, **env}
    worker = start_worker(f"{label}-{uuid.uuid4().hex[:6]}", concurrency=20, env=env)
    hostname = f"{worker.name}@{socket.gethostname()}"
    client = Client(Settings.from_env(env))
    try:
        with _captured_events(env) as (seen, messages):
            ids = [client.enqueue_actor_job(scripted(label), "go") for _ in range(jobs)]
            for job_id in ids:
                assert client.wait_result(job_id, timeout=60).status is JobStatus.SUCCEEDED
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not done(seen, ids, hostname):
                time.sleep(0.1)
            assert done(seen, ids, hostname), sorted({(e["type"], e.get("hostname")) for e in seen})
            time.sleep(0.5)  # past the default 100 ms event flush: whatever else comes
    finally:
        client.redis.delete(queue)
        client.close()
    return seen, messages[0], hostname


def test_every_task_event_arrives_in_fewer_messages(
    start_worker: WorkerFactory, stack_env: dict[str, str]
) -> None:
    seen, messages, hostname = _jobs_while_capturing(
        start_worker, stack_env, "events", 10, {"ACTORQ_EVENT_FLUSH_MS": "200"}, _all_ended
    )
    tasks = [e for e in seen if e["type"].startswith("task-") and e.get("hostname") == hostname]
    # 10 jobs: received, started, succeeded each.
    assert len(tasks) >= 30
    # Unbatched, Celery sent about two messages per three events here; batched, one per four.
    assert 0 < 2 * messages <= len(seen), f"{len(seen)} events in {messages} messages"


def test_task_events_can_be_turned_off(
    start_worker: WorkerFactory, stack_env: dict[str, str]
) -> None:
    def heartbeat(seen: list[dict[str, Any]], ids: list[str], hostname: str) -> bool:
        # Heartbeats go out every 2 s: Flower still lists the worker.
        return any(e["type"] == "worker-heartbeat" and e.get("hostname") == hostname for e in seen)

    seen, _, hostname = _jobs_while_capturing(
        start_worker, stack_env, "quiet", 3, {"ACTORQ_TASK_EVENTS": "0"}, heartbeat
    )
    from_worker = {e["type"] for e in seen if e.get("hostname") == hostname}
    assert not {t for t in from_worker if t.startswith("task-")}, from_worker


def test_a_bad_task_events_switch_stops_the_worker_naming_it(
    start_worker: WorkerFactory, stack_env: dict[str, str]
) -> None:
    worker = start_worker(
        f"badevents-{uuid.uuid4().hex[:6]}", concurrency=2, env={"ACTORQ_TASK_EVENTS": "yes"},
        wait=False,
    )  # fmt: skip
    assert worker.proc is not None and worker.log_path is not None
    assert worker.proc.wait(timeout=60) != 0
    assert "ACTORQ_TASK_EVENTS must be 0 or 1, got 'yes'" in worker.log_path.read_text()


def _until_stopped(fn: Any) -> Any:
    def run() -> None:
        with contextlib.suppress(Exception):  # the connection closes under it at the end
            fn()

    return run


def _all_ended(seen: list[dict[str, Any]], jobs: list[str], hostname: str) -> bool:
    """Each job's task was received, started and succeeded (only ``received`` has args)."""
    mine = [e for e in seen if e.get("hostname") == hostname and e["type"].startswith("task-")]
    task_of = {
        job_id: e["uuid"]
        for e in mine
        if e["type"] == "task-received"
        for job_id in jobs
        if job_id in str(e.get("args", ""))
    }
    types: dict[str, set[str]] = {}
    for e in mine:
        types.setdefault(e["uuid"], set()).add(e["type"])
    need = {"task-received", "task-started", "task-succeeded"}
    return all(job_id in task_of and need <= types[task_of[job_id]] for job_id in jobs)
