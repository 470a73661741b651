"""kombu's Redis transport with one Redis client per channel, not one per command.

kombu builds a new ``redis.Redis`` for every synchronous broker operation: the
unacked bookkeeping of each delivered message, each ack, each publish (an
enqueue, a batch of task events). Building one costs ~190 us of CPU (its table
of reply callbacks); a worker paid it two to three times per job on the
thread that takes messages in. A ``redis.Redis`` is safe to share between
threads (each command takes a connection from the pool), so each channel keeps
one.

The unacked bookkeeping of a delivered message and its ack are each one script
call rather than a MULTI/EXEC pipeline of four commands: the same keys and
values, just as atomic, for less of the intake thread's CPU per job. The call
goes out hand-packed on one connection the QoS holds: redis-py's per-command
pool checkout (with a readiness poll of the socket), retry wrapper and generic
packing cost more than the round trip itself. Any failure there falls back to
redis-py's script call, with its retries and its reload of a flushed script.

:func:`install` makes it the transport of ``redis://`` URLs (``celeryconfig``
calls it), so whatever broker URL an app is given later picks its transport by
scheme as before. ``rediss://`` keeps kombu's own, with its TLS defaults.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import kombu.transport
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .resp import evalsha, script_sha

__all__ = ["REDIS_TRANSPORT", "Channel", "QoS", "Transport", "install"]

log = logging.getLogger("actorq.broker")

#: This transport, as kombu names transports.
REDIS_TRANSPORT = "producer.broker:Transport"

# KEYS: unacked index (zset), unacked (hash). ARGV: delivery tag, time, message.
_APPEND = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
"""
# KEYS: as above. ARGV: delivery tag.
_REMOVE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""
_SHAS = {source: script_sha(source) for source in (_APPEND, _REMOVE)}


class QoS(kombu_redis.QoS):
    """kombu's unacked bookkeeping, each step one script call on the channel's client.

    With a ``global_keyprefix`` kombu's own pipelines run: its prefixing client
    would prefix only the first key of a script call.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._scripts: dict[str, Any] = {}  # by name, on the channel's sync client
        self._lock = threading.Lock()  # acks may come from another thread than deliveries
        self._conn: Any = None  # the held connection, and the pool it came from
        self._conn_pool: Any = None

    def append(self, message: Any, delivery_tag: str) -> None:
        if self.channel.global_keyprefix:
            return super().append(message, delivery_tag)
        delivery = message.delivery_info
        raw = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        self._run("append", _APPEND, [delivery_tag, repr(time.time()), raw])
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        if self.channel.global_keyprefix:
            return super().ack(delivery_tag)
        self._remove(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue or self.channel.global_keyprefix:
            return super().reject(delivery_tag, requeue)
        self._remove(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def _remove(self, delivery_tag: str) -> None:
        self._run("remove", _REMOVE, [delivery_tag])

    def _run(self, name: str, source: str, args: list[str]) -> None:
        """Call a script on the unacked keys: on the held connection, else through redis-py."""
        client = self.channel._create_client()
        keys = [self.unacked_index_key, self.unacked_key]
        command = evalsha(_SHAS[source], [k.encode() for k in keys], [a.encode() for a in args])
        with self._lock:
            pool = client.connection_pool
            if self._conn is None or self._conn_pool is not pool:
                self._release_connection()
                self._conn, self._conn_pool = pool.get_connection(), pool
            try:
                self._conn.send_packed_command([command], check_health=False)
                self._conn.read_response()
                return
            except ResponseError:  # NOSCRIPT, or the server refusing: the reply was read
                pass
            except (RedisConnectionError, RedisTimeoutError, OSError):
                self._release_connection()
        self._script(client, name, source)(keys, args)

    def _release_connection(self) -> None:
        conn, pool = self._conn, self._conn_pool
        self._conn = self._conn_pool = None
        if conn is not None:
            conn.disconnect()
            pool.release(conn)

    def close(self) -> None:
        """Give the held connection back (the channel is closing)."""
        with self._lock:
            self._release_connection()

    def _script(self, client: Any, name: str, source: str) -> Any:
        """A script object (EVALSHA, loaded again after a flush) on the channel's sync client.

        Not ``channel.client``: that one holds the connection of the pending ``BRPOP``.
        """
        script = self._scripts.get(name)
        if script is None or script.registered_client is not client:
            script = self._scripts[name] = client.register_script(source)
        return script


class Channel(kombu_redis.Channel):
    QoS = QoS
    _shared_client: Any = None

    def _brpop_read(self, **options: Any) -> Any:
        """kombu's read of one message, which drops a message it can't take in.

        An item on the queue that is not a kombu envelope (not JSON, its properties
        of the wrong types) raised out of the consumer and stopped the worker; it
        was already popped, so nothing of it can be kept.
        """
        try:
            return super()._brpop_read(**options)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            log.error(
                "dropped a malformed message from the queue (%s: %s)", type(exc).__name__, exc
            )
            return True

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:  # the consumer's BRPOP client: one already, kept by kombu
            return super()._create_client(asynchronous=True)
        client = self._shared_client
        if client is None:
            client = self._shared_client = super()._create_client()
        return client

    def close(self) -> None:
        qos = self._qos
        super().close()  # kombu restores unacked messages here, through the QoS
        if isinstance(qos, QoS):
            qos.close()
        self._shared_client = None


class Transport(kombu_redis.Transport):
    Channel = Channel


def install() -> None:
    """Make this the transport of ``redis://`` broker URLs in this process."""
    kombu.transport.TRANSPORT_ALIASES["redis"] = REDIS_TRANSPORT
    kombu.transport._transport_cache.pop("redis", None)  # resolved before: resolve again
