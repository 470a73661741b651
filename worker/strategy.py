"""Malformed task messages are rejected, not fatal to the worker.

Celery 5 builds a request by unpacking a protocol-2 message body as
``(args, kwargs, embed)`` inside the consumer; a body of another shape, or a
header of the wrong type (``eta``, ``timelimit``...), raises there and stops
the whole worker ("Unrecoverable error"). Anyone who can push to the broker
could do that. Every task of the app uses :class:`GuardedTask`, whose strategy
checks the message first and turns a malformed one into Celery's
``InvalidTaskError``, which the consumer logs and rejects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from celery import Task
from celery.exceptions import InvalidTaskError
from celery.worker.strategy import default

__all__ = ["GuardedTask", "check_task_message", "guarded"]

log = logging.getLogger("actorq.worker")

_STR_HEADERS = ("id", "root_id", "parent_id", "group", "shadow", "lang")
_TIME_HEADERS = ("eta", "expires")


def _check_time(name: str, value: object) -> None:
    if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
        return
    if not isinstance(value, str):
        raise InvalidTaskError(f"header {name} must be an ISO 8601 string")
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise InvalidTaskError(f"header {name} is not an ISO 8601 time") from None


def check_task_message(headers: object, payload: object) -> None:
    """Raise ``InvalidTaskError`` unless this is a well-formed protocol-2 task message."""
    if not isinstance(headers, Mapping):
        raise InvalidTaskError("headers must be a mapping")
    for name in _STR_HEADERS:
        if headers.get(name) is not None and not isinstance(headers[name], str):
            raise InvalidTaskError(f"header {name} must be a string")
    if not isinstance(headers.get("id"), str):
        raise InvalidTaskError("header id is missing")
    for name in _TIME_HEADERS:
        _check_time(name, headers.get(name))
    retries = headers.get("retries", 0)
    if not isinstance(retries, int) or isinstance(retries, bool):
        raise InvalidTaskError("header retries must be an integer")
    limits = headers.get("timelimit")
    if limits is not None and not (
        isinstance(limits, list | tuple)
        and len(limits) == 2
        and all(
            v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in limits
        )
    ):
        raise InvalidTaskError("header timelimit must be [soft, hard] seconds")
    if not (isinstance(payload, list | tuple) and len(payload) == 3):
        raise InvalidTaskError("body must be [args, kwargs, embed]")
    args, kwargs, embed = payload
    if not isinstance(args, list | tuple):
        raise InvalidTaskError("body args must be a list")
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise InvalidTaskError("body kwargs must be a mapping with string keys")
    if embed is not None and not isinstance(embed, Mapping):
        raise InvalidTaskError("body embed must be a mapping")


def guarded(task: Task, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
    """Celery's default strategy behind :func:`check_task_message`."""
    handler = default(task, app, consumer, **kwargs)

    def on_message(
        message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any
    ) -> Any:
        if body is None:  # protocol 2: Celery decodes the body lazily; decode errors stay Celery's
            check_task_message(message.headers, message.payload)
        try:
            return handler(message, body, ack, reject, callbacks, **kw)
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
            if message.acknowledged:  # already dispatched: nothing left to reject
                log.error("task message failed after dispatch: %s", exc)
                return None
            raise InvalidTaskError(f"malformed task message ({type(exc).__name__}: {exc})") from exc

    return on_message


class GuardedTask(Task):
    """The app's task base: every task, built-ins included, gets the guarded strategy."""

    Strategy = "worker.strategy:guarded"
