"""Server-sent events for routers: a job's stream as ``text/event-stream`` frames.

A router returns these frames as a streaming HTTP response; a browser reads
them with ``EventSource``. Each event becomes one frame whose ``id:`` is the
stream entry id, so when the connection drops the browser reconnects with a
``Last-Event-ID`` header and the stream resumes right after the last event it
saw: no token lost, none repeated. Comment frames (``: keep-alive``) go out
while the job is quiet, so proxies and load balancers keep the connection open.

Frames look like::

    retry: 1000

    id: 1700000000000-0
    event: token
    data: {"text": "Hel", "node": "helper"}

``event:`` is the event type (``start``, ``token``, ``reset``, ``done``, ...; see
the stream contract); ``data:`` is the entry's other fields as one JSON line.
After the ``done`` frame the stream ends; the page should call
``EventSource.close()`` on ``done``, and a router answers 204 to a reconnect
that comes after the end (:func:`stream_finished`), which tells ``EventSource``
to stop.

No web framework is needed: the helpers yield ``str`` frames.

.. code-block:: python

    # Starlette / FastAPI
    cursor = sse.resume_cursor(request.headers.get("last-event-id"), request.query_params.get("after"))
    return StreamingResponse(sse.astream_sse(client, job_id, after=cursor),
                             media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator

from . import keys
from .client import Client, check_cursor, check_seconds, past_done
from .errors import InvalidInput, JobTimeout
from .schema import Event

__all__ = [
    "HEADERS",
    "MEDIA_TYPE",
    "astream_sse",
    "format_event",
    "heartbeat",
    "resume_cursor",
    "stream_finished",
    "stream_sse",
]

MEDIA_TYPE = "text/event-stream"
#: Response headers for an SSE stream: never cached, never buffered by nginx.
HEADERS = {
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
    "Connection": "keep-alive",
}


def format_event(event: Event) -> str:
    """One SSE frame for a stream event: ``id`` = entry id, ``event`` = type, JSON ``data``."""
    data = json.dumps(event.fields, ensure_ascii=False, separators=(",", ":"))
    return f"id: {event.id}\nevent: {event.type}\ndata: {data}\n\n"


def heartbeat() -> str:
    """A comment frame: ignored by ``EventSource``, but traffic for every proxy on the way."""
    return ": keep-alive\n\n"


def _retry(retry_ms: int | None) -> str:
    return f"retry: {int(retry_ms)}\n\n" if retry_ms else ""


def resume_cursor(last_event_id: str | None, after: str | None = None) -> str:
    """Where to resume: the ``Last-Event-ID`` header wins over an ``after`` query parameter.

    Raises :class:`~producer.InvalidInput` (field ``after``) for anything that is
    not a stream entry id, so a router can answer 400.
    """
    for value, name in ((last_event_id, "Last-Event-ID"), (after, "after")):
        if value is None or value.strip() == "":
            continue
        value = value.strip()
        if not keys.valid_entry_id(value):
            raise InvalidInput("after", f"{name} must be a stream entry id such as 1700000000000-0")
        return value
    return "0"


def stream_finished(client: Client, job_id: str, cursor: str) -> bool:
    """True when the job has ended and ``cursor`` is at or past its ``done`` entry.

    A router answers such a request with 204, which makes ``EventSource`` stop
    reconnecting. Raises :class:`~producer.JobNotFound` for an unknown job.
    """
    client.get_status(job_id)  # JobNotFound / InvalidInput for bad ids
    check_cursor(cursor)
    return past_done(client.redis.hget(keys.job_key(job_id), "done_id"), cursor)


def stream_sse(
    client: Client,
    job_id: str,
    *,
    after: str = "0",
    heartbeat_s: float = 15.0,
    retry_ms: int | None = 1000,
    timeout: float | None = None,
) -> Iterator[str]:
    """Frames for every event after ``after`` until ``done``, with heartbeats when quiet.

    ``timeout`` bounds the whole stream (:class:`~producer.JobTimeout`);
    ``retry_ms`` sets the browser's reconnection delay (None leaves its default).
    """
    check_seconds("heartbeat_s", heartbeat_s, positive=True)
    check_seconds("timeout", timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    cursor = after
    first = True
    while True:
        wait = heartbeat_s
        if deadline is not None:
            wait = min(wait, deadline - time.monotonic())
            if wait <= 0:
                raise JobTimeout(f"no end of job {job_id!r} within {timeout}s")
        try:
            for event in client.stream_events(job_id, after=cursor, timeout=wait):
                if first and retry_ms:
                    yield _retry(retry_ms)
                first = False
                cursor = event.id
                yield format_event(event)
                if event.terminal:
                    return
            # Ended with no ``done`` read: the cursor is at or past it (a resumed
            # stream of an ended job); nothing more will come.
            return
        except JobTimeout:
            if deadline is not None and time.monotonic() >= deadline:
                raise
        if first and retry_ms:
            yield _retry(retry_ms)
        first = False
        yield heartbeat()


async def astream_sse(
    client: Client,
    job_id: str,
    *,
    after: str = "0",
    heartbeat_s: float = 15.0,
    retry_ms: int | None = 1000,
    timeout: float | None = None,
) -> AsyncIterator[str]:
    """Async twin of :func:`stream_sse`, reading through ``Client.astream_events``.

    The event iterator is awaited with a heartbeat timer beside it, never
    cancelled by it, so a quiet job costs one blocking read, not a reconnect.
    """
    check_seconds("heartbeat_s", heartbeat_s, positive=True)
    check_seconds("timeout", timeout)
    events = client.astream_events(job_id, after=after, timeout=timeout).__aiter__()
    if retry_ms:
        yield _retry(retry_ms)
    pending: asyncio.Future[Event] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(events.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=heartbeat_s)
            if not done:
                yield heartbeat()
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield format_event(event)
            if event.terminal:
                return
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
                await pending
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
