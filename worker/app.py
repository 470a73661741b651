"""The Celery app of the worker fleet, configured from ``celeryconfig``."""

from __future__ import annotations

import logging
import threading

from celery import Celery
from celery.signals import worker_ready

import celeryconfig
from producer.schema import SCHEMA_VERSION, TASK_NAME
from producer.settings import Settings

from .jobs import JobRunner
from .loop import get_loop

__all__ = ["app", "get_runner", "requeue"]

app = Celery("actorq")
app.config_from_object(celeryconfig)
app.conf.include = ["worker.tasks"]

_runner: JobRunner | None = None
_lock = threading.Lock()
log = logging.getLogger("actorq.worker")


def requeue(job_id: str, queue: str = "") -> None:
    """Send a job again (its attempt was lost), to the queue it came from."""
    app.send_task(
        TASK_NAME,
        args=[job_id, ""],
        kwargs={"v": SCHEMA_VERSION},
        queue=queue or app.conf.task_default_queue,
        argsrepr=repr((job_id, "")),
        kwargsrepr="{}",
    )


@worker_ready.connect
def _start_supervisor(**_: object) -> None:
    """Sweep for lost jobs from the start, not only once this worker runs a job."""
    supervisor = get_runner().supervisor
    get_loop().call_soon_threadsafe(supervisor.start)


def get_runner() -> JobRunner:
    """The process's job runner; built lazily so importing the app stays cheap."""
    global _runner
    with _lock:
        if _runner is None:
            _runner = JobRunner(Settings.from_env(), requeue)
        return _runner
