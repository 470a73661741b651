"""The one Celery task: a thin shell that hands the job to the shared loop."""

from __future__ import annotations

import logging
from typing import Any

from celery.exceptions import Reject

from producer.errors import MessageDecodeError
from producer.schema import TASK_NAME

from . import logctx
from .app import app, get_runner
from .jobs import JobRunner, Outcome
from .loop import run_on_loop
from .message import decode_message

__all__ = ["run_job"]

log = logging.getLogger("actorq.worker")


@app.task(name=TASK_NAME, ignore_result=True)
def run_job(*args: Any, **kwargs: Any) -> str:
    """Run one attempt of a job. Arguments are the job id and actor name only.

    The signature takes anything so that a malformed message reaches
    :func:`decode_message` (and ends its job ``failed``) instead of failing
    inside Celery with a ``TypeError`` that leaves the job queued forever.
    """
    # This pool thread's log context still names its previous job until bound anew.
    logctx.start_job("-", "")
    try:
        job_id, error = decode_message(args, kwargs)
    except MessageDecodeError as exc:
        log.error("rejected a message: %s", exc)
        raise Reject(str(exc), requeue=False) from None
    actor = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
    logctx.start_job(job_id, actor)
    outcome, ctx = run_on_loop(_run(get_runner(), job_id, actor, error))
    # Celery logs the task's end from this thread: give it what the run learnt.
    logctx.bind(
        actor=ctx["actor"], attempt=int(ctx["attempt"]) if ctx["attempt"].isdigit() else None
    )
    return str(outcome)


async def _run(
    runner: JobRunner, job_id: str, actor: str, error: str | None
) -> tuple[Outcome, dict[str, str]]:
    # The loop's task has a context of its own: bind the job there too, for its logs.
    logctx.start_job(job_id, actor)
    outcome = await runner.run(job_id, error)
    return outcome, logctx.current()
