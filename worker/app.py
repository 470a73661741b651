"""The Celery app of the worker fleet, configured from ``celeryconfig``."""

from __future__ import annotations

import logging
import threading

from celery import Celery
from celery.signals import (
    after_setup_logger,
    worker_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

import celeryconfig
from producer.gctune import freeze_startup_heap, tune_gc
from producer.schema import TASK_NAME, task_message
from producer.settings import Settings

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


@worker_init.connect
def _metrics_endpoint(**_: object) -> None:
    """Serve /metrics on ACTORQ_METRICS_PORT (when set) for the worker's lifetime."""
    metrics.serve()


@worker_init.connect
def _gc_thresholds(**_: object) -> None:
    """Fewer generation-1 collections on the token path (``ACTORQ_GC_THRESHOLD``)."""
    tune_gc()


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
