"""The worker's Celery consumer: it survives losing the broker while jobs run.

Celery 5.7's reconnect path first ``collect()``s the broken connection, which
drops its transport, and then ``close()``s it. Closing a Redis channel that
still has unacked messages (every running job, with ``task_acks_late``)
restores them through that transport, so the close raises ``AttributeError``,
which Celery treats as unrecoverable: the worker shuts down instead of
reconnecting. The late ack of such a message, once its job ends, fails the same
way on the new connection's event loop.

So on a connection loss this consumer closes the connection first, while its
transport is intact (the Redis transport puts the unacked messages back on the
queue when it can), and marks the messages of the jobs in flight as settled: the
old channel can't ack them, and the broker gives them back anyway (RabbitMQ at
once, Redis on close or after its visibility timeout). The jobs keep running,
their leases fence the redelivered copies (which then run nothing), and the
consumer reconnects.

It also sends task events (for Flower) in batches at most every
``ACTORQ_EVENT_FLUSH_MS`` (100 ms by default) instead of one broker round trip
per event: on the main thread, three events a job cost more CPU than the job's
own claim, load and finish.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from celery.exceptions import InvalidTaskError
from celery.worker import state
from celery.worker.consumer import Consumer as CeleryConsumer
from vine import promise

from producer.settings import env_number

__all__ = ["Consumer", "event_flush_s_from_env"]

log = logging.getLogger("actorq.worker")


#: Events buffered before a flush is forced from the sending thread (Celery: 24).
_EVENT_BUFFER_LIMIT = 1000


def event_flush_s_from_env(env: Mapping[str, str] | None = None) -> float:
    """``ACTORQ_EVENT_FLUSH_MS`` in seconds: how long task events wait to share a message."""
    value = env_number("ACTORQ_EVENT_FLUSH_MS", 100.0, float, env)
    if not 0 <= value <= 10_000:
        raise ValueError(f"ACTORQ_EVENT_FLUSH_MS must be in [0, 10000], got {value:g}")
    return value / 1000


class Consumer(CeleryConsumer):
    """Celery's consumer with a reconnect that survives unacked messages."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._event_flush_s = event_flush_s_from_env()
        self._event_flush_pending = False
        self._schedule_event_flush = promise(self._start_event_flush_timer)
        self._flush_buffered_events = promise(self._flush_event_batch)

    def create_task_handler(self, promise: Any = promise) -> Any:
        """Celery's handler, behind a check of the message's ``task`` name.

        Celery looks the name up among its strategies before any strategy runs: a
        name that is a list or a mapping raised ``TypeError`` there, which stopped
        the worker, and the message, restored unacked, stopped every worker after it.
        """
        handler = super().create_task_handler(promise)

        def on_task_received(message: Any) -> Any:
            headers = message.headers
            name = headers.get("task") if isinstance(headers, Mapping) else None
            if name is not None and not isinstance(name, str):
                exc = InvalidTaskError("header task must be a string")
                return self.on_invalid_task(None, message, exc)
            try:
                return handler(message)
            except TypeError as exc:  # a protocol-1 body naming its task by a non-string
                if message.acknowledged:
                    raise
                return self.on_invalid_task(None, message, InvalidTaskError(str(exc)))

        return on_task_received

    def on_send_event_buffered(self) -> None:
        """A task event was buffered (on any thread): flush within ``ACTORQ_EVENT_FLUSH_MS``."""
        dispatcher: Any = self.event_dispatcher
        if dispatcher is not None and dispatcher.buffer_limit < _EVENT_BUFFER_LIMIT:
            dispatcher.buffer_limit = _EVENT_BUFFER_LIMIT
        if self.hub is None or self._event_flush_pending:
            return
        self._event_flush_pending = True
        # call_soon is the one hub call that is safe from a pool thread; the timer is
        # then armed on the hub's own thread.
        self.hub.call_soon(self._schedule_event_flush)

    def _start_event_flush_timer(self) -> None:
        hub: Any = self.hub  # set: only a consumer with a hub buffers events
        hub.call_later(self._event_flush_s, self._flush_buffered_events)

    def _flush_event_batch(self) -> None:
        # Cleared first: an event buffered during the flush schedules the next one.
        self._event_flush_pending = False
        self._flush_events()

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        connection: Any = self.connection
        if connection is not None:
            try:
                from celery.utils.threads import bound_open_broker_sockets

                bound_open_broker_sockets(connection, 5.0)  # a silent peer can't hang the close
            except ImportError:  # older Celery: nothing to bound
                pass
            try:
                connection.close()
            except Exception as close_exc:  # a dead connection may raise anything here
                log.warning("closing the lost broker connection failed: %r", close_exc)
        in_flight = [r for r in state.requests.values() if not r.acknowledged]
        for request in in_flight:
            request.acknowledged = True  # its channel is gone: no ack can reach the broker
        if in_flight:
            log.warning(
                "broker connection lost with %d job(s) in flight: they keep running, "
                "and their redelivered messages are fenced by the job leases",
                len(in_flight),
            )
        super().on_connection_error_after_connected(exc)
