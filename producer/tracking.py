"""Which tailed streams changed: Redis's key-tracking invalidations, on one connection.

A router polling every stream it tails pays Redis (and itself) for every stream
in every read, whether it holds a new entry or not: with 1,000 tails that was
most of Redis's CPU. Redis can say which keys changed instead. A reader
connection turns on ``CLIENT TRACKING ON REDIRECT <id>``; from then on each key
an ``XREAD`` of it reads is remembered, and the first write to it afterwards
(``XADD`` by any client, inside a script or not, and expiry or deletion too)
sends one message naming the key to connection ``<id>``, which is subscribed to
``__redis__:invalidate``. That is exactly "written since last read", and only
for keys this router reads; writers change nothing.

:class:`InvalidationListener` holds that subscribed connection. It tells its
owner the keys that changed (``None``: all may have: a flush, or the listener
came back after a gap) and when its connection id (``epoch``) changes, so
readers turn tracking on again, redirected to the new one. Lost messages cannot
be told apart from quiet streams, so readers still read everything now and then
(see :mod:`producer.tail`); a server without tracking (before Redis 6, or a
proxy) is found at the first ``CLIENT TRACKING`` and readers keep polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from .aio import raise_if_cancelling, stop_task

__all__ = ["INVALIDATE_CHANNEL", "InvalidationListener"]

log = logging.getLogger("actorq.tail")

INVALIDATE_CHANNEL = "__redis__:invalidate"
#: A subscribed connection hears nothing while no tailed key changes: a PING this
#: often, answered within as long again, tells a live one from a dead one.
_PING_S = 5.0
_RETRY_S = (0.1, 0.5, 1.0, 2.0)


class InvalidationListener:
    """One connection subscribed to ``__redis__:invalidate``; see the module doc.

    ``on_keys(keys)`` gets the keys of each message (``None``: any key may have
    changed); ``on_epoch()`` runs whenever ``epoch`` changes (subscribed anew,
    or lost: ``epoch`` is then ``None``); ``on_refused(exc)`` when Redis answers
    the subscription with an error (an ACL without the channel): it stops then.
    """

    def __init__(
        self,
        client_factory: Callable[[], aioredis.Redis],
        on_keys: Callable[[Iterable[str] | None], None],
        on_epoch: Callable[[], None],
        on_refused: Callable[[Exception], None],
    ) -> None:
        self._client_factory = client_factory
        self._on_keys = on_keys
        self._on_epoch = on_epoch
        self._on_refused = on_refused
        #: The subscribed connection's client id while it listens, else ``None``.
        self.epoch: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_heard = 0.0

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        # Cancelled until done: redis-py, connecting, can swallow one cancellation
        # (the task then went on to listen, and an await on it never ended).
        await stop_task(task)
        self._set_epoch(None)

    def _set_epoch(self, epoch: int | None) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self._on_epoch()

    async def _run(self) -> None:
        failures = 0
        while self._task is asyncio.current_task():  # else stopped
            raise_if_cancelling()  # redis-py may have swallowed the CancelledError
            client = self._client_factory()
            try:
                await self._listen(client)
            except asyncio.CancelledError:
                raise
            except ResponseError as exc:  # refused, not lost: asking again changes nothing
                self._on_refused(exc)
                return
            except Exception as exc:
                failures += 1
                log.info("tail invalidation listener lost (%s); readers poll meanwhile", exc)
            finally:
                self._set_epoch(None)
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(_RETRY_S[min(failures, len(_RETRY_S)) - 1] if failures else 0)

    async def _listen(self, client: aioredis.Redis) -> None:
        epoch = int(await client.client_id())
        # redis-py swallows a cancel that lands while it connects (asyncio.run's, at its
        # end, for a loop whose tails all ended): that one must still stop the listener.
        raise_if_cancelling()
        conn: Any = client.connection
        await conn.send_command("SUBSCRIBE", INVALIDATE_CHANNEL, check_health=False)
        reply = await conn.read_response(timeout=math.inf)
        raise_if_cancelling()
        if not (isinstance(reply, list) and reply and str(reply[0]).lower() == "subscribe"):
            raise ConnectionError(f"unexpected reply to SUBSCRIBE: {reply!r}")
        loop = asyncio.get_running_loop()
        self._last_heard = loop.time()
        self._set_epoch(epoch)
        # Anything written before the readers' tracking points here was missed.
        self._on_keys(None)
        reader = loop.create_task(self._read(conn))
        try:
            while not reader.done():
                raise_if_cancelling()
                done, _ = await asyncio.wait({reader}, timeout=_PING_S)
                if done:
                    break
                if loop.time() - self._last_heard > 2 * _PING_S:
                    raise ConnectionError("no answer to PING on the invalidation connection")
                # No health check of redis-py's own: it would read what _read reads.
                await conn.send_command("PING", check_health=False)
            reader.result()  # raises what ended it
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            await conn.disconnect(nowait=True)  # a read was cut: the parser's state is void

    async def _read(self, conn: Any) -> None:
        loop = asyncio.get_running_loop()
        on_keys = self._on_keys
        while True:
            msg = await conn.read_response(timeout=math.inf)
            self._last_heard = loop.time()
            # ["message", channel, [keys] | None]; a PING answers ["pong", ""].
            if isinstance(msg, list) and len(msg) == 3 and msg[0] == "message":
                keys = msg[2]
                on_keys(keys if isinstance(keys, list) else None)
