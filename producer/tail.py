"""A multiplexed stream reader: many concurrent tails over a few Redis connections.

One :class:`Tail` lives per client and event loop. It owns a connection pool of
at most ``max_connections`` connections: up to ``max_connections - 1`` *reader
shards*, each holding one connection and issuing one ``XREAD BLOCK`` over every
stream subscribed to it, and one connection for short commands (existence
checks and waking a blocked reader). Entries are fanned out to per-subscription
asyncio queues, so 1,000 tails cost a handful of connections instead of 1,000
blocked ones.

A shard's ``XREAD`` is rebuilt whenever its set of streams changes: a blocked
read is interrupted with ``CLIENT UNBLOCK`` so a new subscriber's replay starts
at once. Wake-ups are coalesced, so a burst of subscribers costs one unblock.
A subscriber whose queue grows past ``high_water`` batches is left out of the
reads until it catches up, so a slow consumer holds a bounded amount of memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import math
import os
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .keys import entry_id_key as _id_key
from .resp import bulk

__all__ = ["Subscription", "Tail"]

log = logging.getLogger("actorq.tail")

#: One stream entry as Redis sent it: its id and its flat field/value list.
Entry = tuple[str, list[str]]

_BLOCK_MS = 1000  # a blocked read is interrupted on every change; this bounds shutdown
_COUNT = 1000  # entries per stream per read
_TICK_S = 0.1  # resolution of idle wake-ups (existence checks, timeouts)
_serial = itertools.count(1)
#: While reads keep finding entries, a shard polls without BLOCK at most this often.
#: A blocking XREAD costs Redis about four times a polling one (it registers and
#: unregisters every stream of the read), and a pause lets entries collect, so a
#: busy router costs Redis a fraction of the reads for at most this much lag.
_POLL_S = 0.002
#: ...and at most this often per stream in the read: a polling read costs Redis and
#: the router about as much for each stream in it as for the entries it finds, so
#: with many quiet streams (1,000 tails, a token each every 100 ms) reading all of
#: them every 2 ms took half of Redis's CPU. Up to 133 streams a shard polls every
#: 2 ms; 333 streams every 5 ms.
_POLL_PER_STREAM_S = 0.000015
#: The longest pause, whatever the number of streams.
_POLL_MAX_S = 0.010
_XREAD_POLL = b"$5\r\nXREAD\r\n$5\r\nCOUNT\r\n$%d\r\n%d\r\n" % (len(str(_COUNT)), _COUNT)
_XREAD_BLOCK = _XREAD_POLL + b"$5\r\nBLOCK\r\n$%d\r\n%d\r\n" % (len(str(_BLOCK_MS)), _BLOCK_MS)
_STREAMS = b"$7\r\nSTREAMS\r\n"


class Subscription:
    """One tail of one stream: the entry batches read for it and the cursor read so far.

    A deque and one future rather than an ``asyncio.Queue``: the reader hands over
    a batch per read for every stream, so this is on the path of every token.
    """

    def __init__(self, stream: str, cursor: str) -> None:
        self.stream = stream
        self.cursor = cursor
        self.shard: _Shard | None = None
        self.paused = False
        #: Loop time after which an idle subscriber is woken with ``None`` (see :meth:`get`).
        self.check_at = math.inf
        self._items: collections.deque[list[Entry] | BaseException | None] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    @property
    def backlog(self) -> int:
        """Batches handed over and not yet taken."""
        return len(self._items)

    def put(self, item: list[Entry] | BaseException | None) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> list[Entry] | None:
        """Every entry handed over so far (in order), or ``None`` once ``check_at`` passed idle.

        Raises the reader's error if it failed. The idle wake-up comes from the tail's
        one ticker, so waiting costs no timer.
        """
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        if isinstance(item, BaseException):
            raise item
        while item is not None and self._items and isinstance(self._items[0], list):
            item = item + self._items.popleft()  # type: ignore[operator]
        shard = self.shard
        if self.paused and shard is not None and len(self._items) <= shard.tail.low_water:
            self.paused = False
            shard.changed()
        return item


class _PackedStream:
    """A stream's ``XREAD`` arguments in RESP: its key, and the cursor last read from."""

    __slots__ = ("cursor", "key", "packed_cursor")

    def __init__(self, stream: str) -> None:
        self.key = bulk(stream.encode())
        self.cursor: str | None = None
        self.packed_cursor = b""


class _Shard:
    """One reader connection and the streams it reads with one ``XREAD BLOCK``."""

    def __init__(self, tail: Tail) -> None:
        self.tail = tail
        self.subs: dict[str, list[Subscription]] = {}
        self.count = 0
        self.gen = 0  # bumped on every change of the read set
        self.read_gen = -1  # the generation of the read in flight
        self.in_read = False
        self.waking = False
        self.client_id: int | None = None
        self.task: asyncio.Task[None] | None = None
        self.has_work = asyncio.Event()
        self.redis = tail.reader_client()
        # Per stream: its key RESP-encoded, and the cursor last read from with its
        # encoding. Between two polls most streams have no new entry, so most of a
        # read's arguments are reused as they are.
        self._packed: dict[str, _PackedStream] = {}

    def add(self, sub: Subscription) -> None:
        sub.shard = self
        self.subs.setdefault(sub.stream, []).append(sub)
        self.count += 1
        self.changed()
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())

    def remove(self, sub: Subscription) -> None:
        group = self.subs.get(sub.stream)
        if group and sub in group:
            group.remove(sub)
            self.count -= 1
            if not group:
                del self.subs[sub.stream]
            self.has_work.set()  # a reader waiting on paused tails may have none left
        # No wake-up: a stale read only delivers entries nobody waits for.

    def changed(self) -> None:
        self.gen += 1
        self.has_work.set()
        if self.in_read and not self.waking and self.client_id is not None:
            self.waking = True
            asyncio.get_running_loop().create_task(self._wake())

    async def _wake(self) -> None:
        """Interrupt the blocked read so the next one includes the new streams."""
        try:
            for _ in range(100):
                if not self.in_read or self.read_gen >= self.gen or self.client_id is None:
                    return
                if await self.tail.redis.client_unblock(self.client_id):
                    return
                await asyncio.sleep(0.001)  # the read is not blocked yet: try again
        except Exception as exc:  # the reader's own timeout still picks the change up
            log.debug("could not wake a tail reader: %s", exc)
        finally:
            self.waking = False

    def _read_set(self, block: bool) -> tuple[dict[str, str], bytes]:
        """The streams to read and the cursor read from in each, and that ``XREAD`` in RESP.

        ``XREAD COUNT .. [BLOCK ..] STREAMS k.. id..``, built in one pass over the
        shard's streams: this runs for every read, and a read covers every stream
        of the shard. redis-py's generic packing (two encodes and a length per
        argument) was the largest cost of a router tailing hundreds of busy streams.
        """
        streams: dict[str, str] = {}
        packed = self._packed
        keys: list[bytes] = []
        ids: list[bytes] = []
        for stream, group in self.subs.items():
            if len(group) == 1:  # the common case: one tail per stream, no comparing
                if group[0].paused:
                    continue
                cursor = group[0].cursor
            else:
                live = [s for s in group if not s.paused]
                if not live:
                    continue
                cursor = min((s.cursor for s in live), key=_id_key)
            streams[stream] = cursor
            entry = packed.get(stream)
            if entry is None:
                entry = packed[stream] = _PackedStream(stream)
            if entry.cursor != cursor:
                entry.cursor, entry.packed_cursor = cursor, bulk(cursor.encode())
            keys.append(entry.key)
            ids.append(entry.packed_cursor)
        if len(packed) > 2 * len(self.subs) + 64:  # forget streams that left
            self._packed = {k: v for k, v in packed.items() if k in self.subs}
        head = _XREAD_BLOCK if block else _XREAD_POLL
        count = b"*%d\r\n" % ((6 if block else 4) + 2 * len(streams))
        return streams, b"".join([count, head, _STREAMS, *keys, *ids])

    async def _xread(self, command: bytes) -> Any:
        conn: Any = self.redis.connection
        await conn.send_packed_command(command, check_health=False)
        timeout = conn.socket_timeout
        if timeout is None:
            return await conn.read_response(timeout=math.inf)
        # A blocked read legitimately waits _BLOCK_MS: never time it out before that.
        # Timed out here, not by read_response's own timeout: that one answers None,
        # the same as a read that found nothing, and leaves the reply still due on
        # the connection, where the next read would take it as its own.
        try:
            async with asyncio.timeout(timeout + _BLOCK_MS / 1000):
                return await conn.read_response(timeout=math.inf)
        except TimeoutError:
            await conn.disconnect(nowait=True)
            raise RedisTimeoutError(f"Redis sent no reply to a tail read in {timeout}s") from None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        block = True  # the first read waits; later ones poll while entries keep coming
        try:
            while True:
                if not self.subs:
                    return  # idle: give the connection back; the next subscriber restarts it
                if self.client_id is None:
                    # Before the read set is taken: a subscriber that arrives during
                    # this await must be in the read, or it waits a whole BLOCK.
                    self.client_id = int(await self.redis.client_id())
                    if not self.subs:
                        return  # the last one left meanwhile
                streams, command = self._read_set(block)
                if not streams:  # every subscriber is paused
                    self.has_work.clear()
                    await self.has_work.wait()
                    continue
                self.read_gen = self.gen
                self.in_read = block  # only a blocked read needs waking on a change
                started = loop.time()
                try:
                    reply = await self._xread(command)
                finally:
                    self.in_read = False
                if reply:
                    self._dispatch(reply, streams)
                    block = False
                    every = min(_POLL_MAX_S, max(_POLL_S, len(streams) * _POLL_PER_STREAM_S))
                    pause = started + every - loop.time()
                    if pause > 0:
                        await asyncio.sleep(pause)
                else:
                    block = True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self.tail._closing:
                log.warning("tail reader failed: %s", exc)
            self._fail(exc)
        finally:
            # Swap before awaiting: a subscriber arriving meanwhile starts a fresh reader.
            self.client_id = None
            self.task = None
            redis, self.redis = self.redis, self.tail.reader_client()
            with contextlib.suppress(Exception):
                await redis.aclose()

    def _dispatch(self, reply: Any, read: dict[str, str]) -> None:
        high = self.tail.high_water
        # RESP3 answers a map, RESP2 a list of [stream, entries] pairs.
        for stream, entries in reply.items() if isinstance(reply, dict) else reply:
            group = self.subs.get(stream)
            if not group or not entries:
                continue
            last_s = entries[-1][0]
            read_from = read[stream]
            for sub in group:
                if sub.paused:
                    continue
                if sub.cursor == read_from:
                    batch = entries
                else:
                    after = _id_key(sub.cursor)
                    if after < _id_key(read_from):
                        continue  # joined after this read began: the next read covers it
                    batch = [e for e in entries if _id_key(e[0]) > after]
                if batch:
                    sub.cursor = last_s
                    sub.put(batch)
                    if sub.backlog > high:
                        sub.paused = True

    def _fail(self, exc: BaseException) -> None:
        for group in self.subs.values():
            for sub in group:
                sub.put(exc)
                sub.shard = None
        self.subs.clear()
        self.count = 0


class Tail:
    """Shares a few Redis connections among every tail of one event loop."""

    def __init__(
        self,
        redis_url: str,
        *,
        max_connections: int = 4,
        shard_size: int = 128,
        high_water: int = 256,
        **redis_options: Any,
    ) -> None:
        if max_connections < 2:
            raise ValueError("max_connections must be at least 2 (one reader, one command)")
        # Named per process and tail, so CLIENT LIST tells which router holds what.
        self.client_name = f"actorq-tail:{os.getpid()}:{next(_serial)}"
        self.pool = aioredis.BlockingConnectionPool.from_url(
            redis_url,
            max_connections=max_connections,
            timeout=None,
            client_name=self.client_name,
            decode_responses=True,  # ids and fields as str, decoded in C by hiredis
            **redis_options,
        )
        self.redis = aioredis.Redis(connection_pool=self.pool)  # short commands
        self.shard_size = shard_size
        self.high_water = high_water
        self.low_water = high_water // 4
        self._shards: list[_Shard] = []
        self._subs: set[Subscription] = set()
        self._ticker: asyncio.Task[None] | None = None
        self._closing = False
        self._max_shards = max_connections - 1

    def reader_client(self) -> aioredis.Redis:
        """A client holding one pooled connection of its own, for a shard's reads."""
        return aioredis.Redis(connection_pool=self.pool, single_connection_client=True)

    def _pick_shard(self) -> _Shard:
        best = min(self._shards, key=lambda s: s.count, default=None)
        if best is None or (best.count >= self.shard_size and len(self._shards) < self._max_shards):
            best = _Shard(self)
            self._shards.append(best)
        return best

    @contextlib.asynccontextmanager
    async def subscribe(self, stream: str, after: str = "0") -> AsyncIterator[Subscription]:
        """Receive every entry of ``stream`` after id ``after`` until the block exits."""
        sub = Subscription(stream, after)
        self._pick_shard().add(sub)
        self._subs.add(sub)
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())
        try:
            yield sub
        finally:
            self._subs.discard(sub)
            shard = sub.shard
            if shard is not None:
                shard.remove(sub)
                sub.shard = None
                if not shard.subs and shard.in_read and shard.client_id is not None:
                    # The last tail of this reader left: end its read now, so the
                    # reader stops before the caller's loop shuts down.
                    with contextlib.suppress(Exception):
                        await self.redis.client_unblock(shard.client_id)

    async def _tick(self) -> None:
        """Wake idle subscribers whose ``check_at`` passed; ends with the last one."""
        loop = asyncio.get_running_loop()
        try:
            while self._subs:
                await asyncio.sleep(_TICK_S)
                now = loop.time()
                for sub in self._subs:
                    if sub.check_at <= now and not sub.backlog:
                        sub.check_at = math.inf
                        sub.put(None)
        finally:
            self._ticker = None

    @property
    def connections(self) -> int:
        """Connections the pool holds now (in use or idle); never above ``max_connections``."""
        pool: Any = self.pool
        return len(pool._available_connections) + len(pool._in_use_connections)

    @property
    def subscriptions(self) -> int:
        return sum(s.count for s in self._shards)

    async def aclose(self) -> None:
        """Stop the readers and close the connections."""
        self._closing = True
        if self._ticker is not None:
            self._ticker.cancel()
        for shard in self._shards:
            task = shard.task
            if task is None:
                continue
            if shard.client_id is not None:
                # End a blocked read first, so the reader stops at once.
                with contextlib.suppress(Exception):
                    await self.redis.client_unblock(shard.client_id)
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        closed = RedisConnectionError("the tail was closed (Client.aclose)")
        for shard in self._shards:
            shard._fail(closed)  # its tails raise now rather than wait for entries
        self._shards.clear()
        await self.redis.aclose()
        await self.pool.disconnect()
