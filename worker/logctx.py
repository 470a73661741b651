"""Structured worker logs: every line carries the job id, attempt and actor.

The job's identity lives in context variables. The task binds the job id and
actor before handing the job to the shared loop (each asyncio task has its own
copy of the context), and the runner binds the attempt once it has claimed the
job. A logging filter copies them onto every record; Celery's own lines about a
task ("received", "succeeded in") carry its ``argsrepr`` (job id, actor), which
the filter reads when no job is bound.

``ACTORQ_LOG_JSON=1`` switches the worker's handlers to one JSON object per line.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextvars import ContextVar
from typing import Any

from producer.schema import parse_task_args

__all__ = [
    "TEXT_FORMAT",
    "ContextFilter",
    "JsonFormatter",
    "bind",
    "current",
    "install",
    "json_enabled",
    "start_job",
]

_job_id: ContextVar[str] = ContextVar("actorq_job_id", default="-")
_attempt: ContextVar[str] = ContextVar("actorq_attempt", default="-")
_actor: ContextVar[str] = ContextVar("actorq_actor", default="-")

TEXT_FORMAT = (
    "[%(asctime)s: %(levelname)s/%(processName)s] "
    "[job=%(job_id)s attempt=%(attempt)s actor=%(actor)s] %(name)s: %(message)s"
)


def bind(
    *, job_id: str | None = None, attempt: int | None = None, actor: str | None = None
) -> None:
    """Set the job identity of the current context (the running asyncio task or thread)."""
    if job_id is not None:
        _job_id.set(job_id)
    if attempt is not None:
        _attempt.set(str(attempt))
    if actor is not None:
        _actor.set(actor or "-")


def start_job(job_id: str, actor: str) -> None:
    """Bind a new job in the current context; its attempt is unknown until it is claimed."""
    _job_id.set(job_id)
    _actor.set(actor or "-")
    _attempt.set("-")


def current() -> dict[str, str]:
    """The bound job identity: ``job_id``, ``attempt``, ``actor`` (``-`` when unknown)."""
    return {"job_id": _job_id.get(), "attempt": _attempt.get(), "actor": _actor.get()}


def _from_task_args(record: logging.LogRecord) -> tuple[str, str] | None:
    """Job id and actor from Celery's task log context (its ``argsrepr``), if present."""
    data = getattr(record, "data", None)
    if not isinstance(data, dict):
        return None
    found = parse_task_args(data.get("args"))
    return None if found is None else (found[0], found[1] or "-")


class ContextFilter(logging.Filter):
    """Adds ``job_id``, ``attempt`` and ``actor`` to every record (never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = current()
        if ctx["job_id"] == "-":
            found = _from_task_args(record)
            if found is not None:
                ctx["job_id"], ctx["actor"] = found
        for key, value in ctx.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, job identity, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "job_id": getattr(record, "job_id", "-"),
            "attempt": getattr(record, "attempt", "-"),
            "actor": getattr(record, "actor", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def json_enabled() -> bool:
    return os.environ.get("ACTORQ_LOG_JSON", "").strip().lower() in ("1", "true", "yes", "on")


def install(logger: logging.Logger | None = None) -> None:
    """Give every handler of ``logger`` (default: root) the filter and actorq's format."""
    target = logger or logging.getLogger()
    formatter: logging.Formatter = (
        JsonFormatter() if json_enabled() else logging.Formatter(TEXT_FORMAT)
    )
    for handler in target.handlers:
        if not any(isinstance(f, ContextFilter) for f in handler.filters):
            handler.addFilter(ContextFilter())
        handler.setFormatter(formatter)
