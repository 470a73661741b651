"""Task events for Flower leave the worker in batches, and every one still arrives."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from typing import Any

import pytest
from celery import Celery

from producer import Client, Settings
from producer.schema import JobStatus
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


def test_every_task_event_arrives_in_fewer_messages(
    start_worker: WorkerFactory, stack_env: dict[str, str], session_tag: str
) -> None:
    queue = f"actorq-events-{session_tag}-{uuid.uuid4().hex[:6]}"
    env = {**stack_env, "ACTORQ_QUEUE": queue, "ACTORQ_EVENT_FLUSH_MS": "200"}
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
            for _ in recv.itercapture(limit=None, timeout=0.5, wakeup=False):
                if stop.is_set():
                    return

    worker = start_worker(f"events-{uuid.uuid4().hex[:6]}", concurrency=20, env=env)
    hostname = f"{worker.name}@{socket.gethostname()}"
    listener = threading.Thread(target=_until_stopped(listen), daemon=True)
    listener.start()
    assert ready.wait(10)
    client = Client(Settings.from_env(env))
    try:
        jobs = [client.enqueue_actor_job(scripted("batched events"), "go") for _ in range(10)]
        for job_id in jobs:
            assert client.wait_result(job_id, timeout=60).status is JobStatus.SUCCEEDED
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not _all_ended(seen, jobs, hostname):
            time.sleep(0.1)
        assert _all_ended(seen, jobs, hostname), sorted({e["type"] for e in seen})
    finally:
        stop.set()
        listener.join(5)
        client.redis.delete(queue)
        client.close()
        app.close()
    tasks = [e for e in seen if e["type"].startswith("task-") and e.get("hostname") == hostname]
    # 10 jobs: received, started, succeeded each.
    assert len(tasks) >= 30
    # Unbatched, Celery sent about two messages per three events here; batched, one per four.
    assert 0 < 2 * messages[0] <= len(seen), f"{len(seen)} events in {messages[0]} messages"


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
