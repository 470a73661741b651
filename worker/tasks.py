"""The one Celery task: a thin shell that hands the job to the shared loop."""

from __future__ import annotations

import logging
from typing import Any

from celery.exceptions import Reject

from producer import keys
from producer.schema import SCHEMA_VERSION, TASK_NAME

from . import logctx
from .app import app, get_runner
from .jobs import JobRunner, Outcome
from .loop import run_on_loop

__all__ = ["run_job"]

log = logging.getLogger("actorq.worker")


@app.task(name=TASK_NAME, ignore_result=True)
def run_job(job_id: Any = None, actor: Any = "", v: Any = None, **extra: Any) -> str:
    """Run one attempt of a job. Arguments are the job id and actor name only."""
    if not keys.valid_job_id(job_id):
        log.error("rejected a message with no usable job id")
        raise Reject("no usable job id", requeue=False)
    error = None
    if v != SCHEMA_VERSION:
        error = f"message schema version {v!r} is not supported (want {SCHEMA_VERSION})"
    logctx.start_job(job_id, actor if isinstance(actor, str) else "")
    outcome, ctx = run_on_loop(_run(get_runner(), job_id, actor, error))
    # Celery logs the task's end from this thread: give it what the run learnt.
    logctx.bind(
        actor=ctx["actor"], attempt=int(ctx["attempt"]) if ctx["attempt"].isdigit() else None
    )
    return str(outcome)


async def _run(
    runner: JobRunner, job_id: str, actor: Any, error: str | None
) -> tuple[Outcome, dict[str, str]]:
    # The loop's task has a context of its own: bind the job there too, for its logs.
    logctx.start_job(job_id, actor if isinstance(actor, str) else "")
    outcome = await runner.run(job_id, error)
    return outcome, logctx.current()
