"""kombu's Redis transport with one Redis client per channel, not one per command.

kombu builds a new ``redis.Redis`` for every synchronous broker operation: the
unacked bookkeeping of each delivered message, each ack, each publish (an
enqueue, a batch of task events). Building one costs ~190 us of CPU (its table
of reply callbacks); a worker paid it two to three times per job on the
thread that takes messages in. A ``redis.Redis`` is safe to share between
threads (each command takes a connection from the pool), so each channel keeps
one.

:func:`install` makes it the transport of ``redis://`` URLs (``celeryconfig``
calls it), so whatever broker URL an app is given later picks its transport by
scheme as before. ``rediss://`` keeps kombu's own, with its TLS defaults.
"""

from __future__ import annotations

from typing import Any

import kombu.transport
from kombu.transport import redis as kombu_redis

__all__ = ["REDIS_TRANSPORT", "Channel", "Transport", "install"]

#: This transport, as kombu names transports.
REDIS_TRANSPORT = "producer.broker:Transport"


class Channel(kombu_redis.Channel):
    _shared_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:  # the consumer's BRPOP client: one already, kept by kombu
            return super()._create_client(asynchronous=True)
        client = self._shared_client
        if client is None:
            client = self._shared_client = super()._create_client()
        return client

    def close(self) -> None:
        self._shared_client = None
        super().close()


class Transport(kombu_redis.Transport):
    Channel = Channel


def install() -> None:
    """Make this the transport of ``redis://`` broker URLs in this process."""
    kombu.transport.TRANSPORT_ALIASES["redis"] = REDIS_TRANSPORT
    kombu.transport._transport_cache.pop("redis", None)  # resolved before: resolve again
