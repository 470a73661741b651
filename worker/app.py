"""The Celery app of the worker fleet, configured from ``celeryconfig``."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery, bootsteps
from celery.signals import (
    after_setup_logger,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

import celeryconfig
from producer.gctune import freeze_startup_heap, tune_gc
from producer.schema import TASK_NAME, task_message
from producer.settings import Settings, env_flag

from . import logctx, metrics
from .jobs import JobRunner
from .loop import get_loop
from .prestart import PrestartThreads

__all__ = ["app", "get_runner", "requeue"]

app = Celery("actorq", task_cls="worker.strategy:GuardedTask")
app.config_from_object(celeryconfig)
app.steps["worker"].add(PrestartThreads)
app.conf.include = ["worker.tasks"]

_runner: JobRunner | None = None
_lock = threading.Lock()
log = logging.getLogger("actorq.worker")


@after_setup_logger.connect
def _structured_logs(logger: logging.Logger, **_: object) -> None:
    """Every line of the worker's log carries the job id, attempt and actor."""
    logctx.install(logger)


class StartFromEnvironment(bootsteps.StartStopStep):
    """Worker bootstep: apply the settings the environment gives, or stop the worker.

    Celery logs and swallows what a signal handler raises, so a bad value read
    there left a worker that looked ready and failed (and acked) every job.
    Raised from a bootstep, it stops the worker at start, naming the variable.
    """

    requires = ("celery.worker.components:Pool",)

    def start(self, worker: Any) -> None:
        tune_gc()  # ACTORQ_GC_THRESHOLD: fewer generation-1 collections on the token path
        env_flag("ACTORQ_GC_FREEZE", True)  # applied once the worker is ready
        metrics.serve()  # /metrics on ACTORQ_METRICS_PORT, when set
        get_runner()  # Settings and the job runner's own ACTORQ_* variables


app.steps["worker"].add(StartFromEnvironment)


@worker_shutdown.connect
@worker_process_shutdown.connect
def _metrics_process_gone(**_: object) -> None:
    """In multiprocess mode, a stopped process's streams-in-flight gauge must not linger."""
    metrics.process_exited()


def requeue(job_id: str, queue: str = "", actor: str = "") -> None:
    """Send a job again (its attempt was lost), to the queue it came from."""
    app.send_task(
        TASK_NAME, queue=queue or app.conf.task_default_queue, **task_message(job_id, actor)
    )


@worker_ready.connect
def _freeze_startup_heap(**_: object) -> None:
    """Keep the set-up's objects out of full collections (``ACTORQ_GC_FREEZE``)."""
    get_runner()  # its clients and imports belong to the set-up too
    frozen = freeze_startup_heap()
    log.info("froze %d start-up objects out of the garbage collector", frozen)


@worker_ready.connect
def _start_supervisor(**_: object) -> None:
    """Sweep for lost jobs from the start, not only once this worker runs a job."""
    supervisor = get_runner().supervisor
    get_loop().call_soon_threadsafe(supervisor.start)


@worker_ready.connect
def _watch_loop(**_: object) -> None:
    """Export the shared loop's lag and CPU, the process's limit on streams."""
    get_loop().call_soon_threadsafe(metrics.watch_loop)


def get_runner() -> JobRunner:
    """The process's job runner; built lazily so importing the app stays cheap."""
    global _runner
    with _lock:
        if _runner is None:
            _runner = JobRunner(Settings.from_env(), requeue)
        return _runner
