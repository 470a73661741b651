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
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker import state
from celery.worker.consumer import Consumer as CeleryConsumer

__all__ = ["Consumer"]

log = logging.getLogger("actorq.worker")


class Consumer(CeleryConsumer):
    """Celery's consumer with a reconnect that survives unacked messages."""

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
