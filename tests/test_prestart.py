"""The threads pool starts all its threads before the worker takes a job."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from producer import Settings
from producer.client import celery_app
from tests.conftest import WorkerFactory
from worker.prestart import prestart


def test_prestart_starts_every_thread_and_leaves_them_idle() -> None:
    executor = ThreadPoolExecutor(max_workers=12)
    try:
        assert prestart(executor, timeout=10) == 12
        assert len(executor._threads) == 12
        # All idle again: a burst of tasks runs at once, no thread started for it.
        gate = threading.Barrier(12, timeout=5)
        done = [executor.submit(gate.wait) for _ in range(12)]
        assert all(f.result(timeout=10) is not None for f in done)
        assert len(executor._threads) == 12
        assert prestart(executor) == 12  # nothing left to start
    finally:
        executor.shutdown()


def test_prestart_warms_each_new_thread_once() -> None:
    executor = ThreadPoolExecutor(max_workers=6)
    warmed: list[int] = []
    lock = threading.Lock()

    def warm() -> None:
        with lock:
            warmed.append(threading.get_ident())
            second = len(warmed) == 2
        if second:
            raise RuntimeError("one thread's warm-up fails")  # that thread still starts

    try:
        assert prestart(executor, timeout=10, warm=warm) == 6
        assert sorted(warmed) == sorted({t.ident for t in executor._threads})
        assert prestart(executor, warm=warm) == 6 and len(warmed) == 6  # no new thread, no warm-up
    finally:
        executor.shutdown()


def test_a_worker_has_its_threads_before_its_first_job(
    stack_env: dict[str, str], start_worker: WorkerFactory
) -> None:
    env = {**stack_env, "ACTORQ_QUEUE": f"actorq-prestart-{uuid.uuid4().hex[:8]}"}
    worker = start_worker(f"prestart-{uuid.uuid4().hex[:6]}", concurrency=24, env=env)
    app = celery_app("actorq-inspect", Settings.from_env(env))
    try:
        stats: dict[str, object] = {}
        deadline = time.monotonic() + 20
        while not stats and time.monotonic() < deadline:
            stats = app.control.inspect(destination=[f"{worker.name}@{socket.gethostname()}"], timeout=2).stats() or {}
        assert stats, "the worker did not answer inspect stats"
        pool = next(iter(stats.values()))["pool"]  # type: ignore[index]
        assert pool["max-concurrency"] == 24
        assert pool["threads"] == 24
    finally:
        app.close()
