"""Start every thread of the threads pool before the worker takes its first job.

``ThreadPoolExecutor`` starts a thread only when a task finds none idle, and on
the thread that takes messages in: a burst of jobs into a fresh worker paid one
thread start per job on the intake path (~0.13 ms of CPU and up to a
millisecond of waiting each), holding up the claims of the jobs behind it.

Each thread also builds its state of its own here: Celery keeps the app's result
backend per thread, and building it (even the disabled one) cost ~0.1 ms of CPU
on the first job of every thread, 300 of them in a burst into a fresh worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import bootsteps

__all__ = ["PrestartThreads", "prestart"]

log = logging.getLogger("actorq.worker")


def prestart(
    executor: ThreadPoolExecutor,
    timeout: float = 30.0,
    warm: Callable[[], object] | None = None,
) -> int:
    """Have ``executor`` start all its threads now; return how many it has.

    Each placeholder task holds its thread until all have started, so the
    executor finds none idle and starts a new one for every submit. ``warm``
    runs first in each new thread, to build its per-thread state.
    """
    threads = getattr(executor, "_threads", None)
    if threads is None:  # not the CPython executor this knows: leave it lazy
        return 0
    want = int(getattr(executor, "_max_workers", 0)) - len(threads)
    if want <= 0:
        return len(threads)
    started = threading.Semaphore(0)
    release = threading.Event()

    def hold() -> None:
        if warm is not None:
            try:
                warm()
            except Exception:  # the thread's first task meets it again, and reports it
                log.debug("warming a pool thread failed", exc_info=True)
        started.release()
        release.wait(timeout)

    deadline = time.monotonic() + timeout
    for _ in range(want):
        executor.submit(hold)
    try:
        for _ in range(want):
            if not started.acquire(timeout=max(0.0, deadline - time.monotonic())):
                break
    finally:
        release.set()
    return len(threads)


class PrestartThreads(bootsteps.StartStopStep):
    """Worker bootstep: after the pool, before the consumer takes messages."""

    requires = ("celery.worker.components:Pool",)

    def start(self, worker: Any) -> None:
        executor = getattr(worker.pool, "executor", None)
        if isinstance(executor, ThreadPoolExecutor):
            t0 = time.monotonic()
            n = prestart(executor, warm=lambda: worker.app.backend)
            log.info("started %d pool threads in %.0f ms", n, (time.monotonic() - t0) * 1000)
