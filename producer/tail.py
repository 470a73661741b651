"""A multiplexed stream reader: many concurrent tails over a few Redis connections.

One :class:`Tail` lives per client and event loop. It owns at most
``max_connections`` connections: *reader shards*, each holding one connection
and issuing one ``XREAD`` over streams subscribed to it, one connection for
short commands (existence checks and waking a blocked reader) and, with key
tracking, one that listens for Redis's invalidations (:mod:`producer.tracking`).
Entries are fanned out to per-subscription batches, so 1,000 tails cost a
handful of connections instead of 1,000 blocked ones.

With tracking, a shard reads only the streams written since it last read them
(and every stream once a second); a new subscriber's stream is read at once.
Without (turned off, refused by Redis, or while the listener reconnects), a
shard's ``XREAD BLOCK`` covers all its streams and is rebuilt whenever that set
changes: a blocked read is interrupted with ``CLIENT UNBLOCK`` so a new
subscriber's replay starts at once. Wake-ups are coalesced, so a burst of
subscribers costs one unblock. A subscriber whose queue grows past
``high_water`` batches is left out of the reads until it catches up, so a slow
consumer holds a bounded amount of memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import math
import os
from collections.abc import AsyncIterator, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .aio import raise_if_cancelling, stop_task
from .keys import entry_id_key as _id_key
from .resp import bulk
from .tracking import InvalidationListener

__all__ = ["Subscription", "Tail"]

log = logging.getLogger("actorq.tail")

#: One stream entry as Redis sent it: its id and its flat field/value list.
Entry = tuple[str, list[str]]

_BLOCK_MS = 1000  # a blocked read is interrupted on every change; this bounds shutdown
_COUNT = 1000  # entries per stream per read
_TICK_S = 0.1  # resolution of idle wake-ups (existence checks, timeouts)
#: The invalidation listener outlives the last tail this long, for the next one.
_LISTENER_LINGER_S = 10.0
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
#: With key tracking, a reader reads only the streams Redis said changed, and all of
#: them this often: a lost invalidation (there is no telling) costs at most this.
_SWEEP_S = _BLOCK_MS / 1000
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
            shard.dirty.add(self.stream)  # what came while it was left out
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
    """One reader connection and the streams it reads with one ``XREAD``.

    With key tracking (see :mod:`producer.tracking`) a read covers the streams
    Redis said changed (``dirty``), and every stream once a ``_SWEEP_S``;
    without, one ``XREAD BLOCK`` over every stream, then polls while entries come.
    """

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
        #: Streams to read at the next tracked read: changed, new, or resumed.
        self.dirty: set[str] = set()
        #: The listener epoch this connection's tracking redirects to, once turned on.
        self.tracked: int | None = None
        self.next_sweep = 0.0
        self.redis = tail.reader_client()
        # Per stream: its key RESP-encoded, and the cursor last read from with its
        # encoding. Between two polls most streams have no new entry, so most of a
        # read's arguments are reused as they are.
        self._packed: dict[str, _PackedStream] = {}

    def add(self, sub: Subscription) -> None:
        sub.shard = self
        self.subs.setdefault(sub.stream, []).append(sub)
        self.count += 1
        self.dirty.add(sub.stream)
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
        except NoPermissionError as exc:  # the reader's own timeout still picks the change up
            if not self.tail.unblock_refused:
                self.tail.unblock_refused = True
                log.warning(
                    "Redis refused CLIENT UNBLOCK (%s): a new tail waits for its reader's "
                    "BLOCK (up to %d ms) while key tracking is off; grant +client|unblock",
                    exc,
                    _BLOCK_MS,
                )
        except Exception as exc:
            log.debug("could not wake a tail reader: %s", exc)
        finally:
            self.waking = False

    def mark(self, stream: str | None) -> None:
        """``stream`` changed (``None``: any may have): read it at the next read."""
        if stream is None:
            self.dirty.update(self.subs)
        else:
            self.dirty.add(stream)
        self.has_work.set()

    def _read_set(self, block: bool, only: set[str] | None = None) -> tuple[dict[str, str], bytes]:
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
        subs = self.subs
        groups = subs.items() if only is None else ((s, subs[s]) for s in only if s in subs)
        for stream, group in groups:
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

    async def _read(self, command: bytes, streams: dict[str, str]) -> Any:
        """:meth:`_xread`; a key of another type fails its own tails, not the read's others.

        Redis answers a whole multi-stream ``XREAD`` with ``WRONGTYPE`` when one of
        its keys is not a stream: one such key (a bug, a hand-made key) would fail
        every tail of the reader, and every read after.
        """
        try:
            return await self._xread(command)
        except ResponseError as exc:
            if not str(exc).startswith("WRONGTYPE") or not await self._drop_wrong_types(streams):
                raise
            return None

    async def _drop_wrong_types(self, streams: dict[str, str]) -> bool:
        """Fail and drop the subscriptions of ``streams`` whose key is not a stream."""
        pipe = self.tail.redis.pipeline(transaction=False)
        for stream in streams:
            pipe.type(stream)
        kinds = await pipe.execute()
        dropped = False
        for stream, kind in zip(streams, kinds, strict=True):
            if kind in ("stream", "none"):
                continue
            dropped = True
            self._fail_stream(
                stream, ResponseError(f"WRONGTYPE {stream} holds a {kind}, not a stream")
            )
        return dropped

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
                raise_if_cancelling()  # a library may have swallowed the CancelledError
                if not self.subs:
                    return  # idle: give the connection back; the next subscriber restarts it
                if self.client_id is None:
                    # Before the read set is taken: a subscriber that arrives during
                    # this await must be in the read, or it waits a whole BLOCK.
                    self.client_id = int(await self.redis.client_id())
                    self.tracked = None  # a new connection: tracking is off on it
                    if not self.subs:
                        return  # the last one left meanwhile
                epoch = self.tail.tracking_epoch
                if epoch is not None and (self.tracked == epoch or await self._track(epoch)):
                    await self._read_changed(loop)
                    block = True  # should tracking stop, polling starts with a blocked read
                    continue
                streams, command = self._read_set(block)
                self.dirty.clear()  # a poll reads every stream
                if not streams:  # every subscriber is paused
                    self.has_work.clear()
                    await self.has_work.wait()
                    continue
                self.read_gen = self.gen
                self.in_read = block  # only a blocked read needs waking on a change
                started = loop.time()
                try:
                    reply = await self._read(command, streams)
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
            self.tracked = None
            self.task = None
            redis, self.redis = self.redis, self.tail.reader_client()
            with contextlib.suppress(Exception):
                await redis.aclose()

    async def _track(self, epoch: int) -> bool:
        """Turn tracking on for this connection, redirected to listener ``epoch``.

        False: poll instead (the listener moved on meanwhile, or Redis refused).
        """
        try:
            await self.redis.execute_command("CLIENT", "TRACKING", "ON", "REDIRECT", epoch)
        except ResponseError as exc:
            if "does not exist" not in str(exc):  # not a listener gone meanwhile: no tracking
                self.tail.tracking_refused(exc)
            return False
        self.tracked = epoch
        # Keys are tracked from their next read on: one read of every stream.
        self.dirty.update(self.subs)
        self.next_sweep = asyncio.get_running_loop().time() + _SWEEP_S
        return True

    async def _read_changed(self, loop: asyncio.AbstractEventLoop) -> None:
        """One tracked read of the streams marked changed, or a wait for a mark."""
        now = loop.time()
        if now >= self.next_sweep:
            self.dirty.update(self.subs)
            self.next_sweep = now + _SWEEP_S
        # Taken before the read: a mark arriving during it is for the next one.
        # A paused stream taken here is marked again when it resumes.
        taken, self.dirty = self.dirty, set()
        streams, command = self._read_set(False, taken)
        if not streams:
            self.has_work.clear()
            if not self.dirty:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.next_sweep - now):
                        await self.has_work.wait()
            return
        reply = await self._read(command, streams)
        if reply:
            self._dispatch(reply, streams)
            # Busy: marks gather meanwhile, so one read takes the streams of many
            # writes. A read that found nothing (a new tail's first) does not wait.
            pause = now + _POLL_S - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)

    def _dispatch(self, reply: Any, read: dict[str, str]) -> None:
        high = self.tail.high_water
        # RESP3 answers a map, RESP2 a list of [stream, entries] pairs.
        for stream, entries in reply.items() if isinstance(reply, dict) else reply:
            group = self.subs.get(stream)
            if not group or not entries:
                continue
            last_s = entries[-1][0]
            if len(entries) >= _COUNT:  # more may wait, and no write will say so
                self.dirty.add(stream)
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
        for stream in list(self.subs):
            self._fail_stream(stream, exc)

    def _fail_stream(self, stream: str, exc: BaseException) -> None:
        """End the tails of ``stream`` with ``exc``; they leave this reader."""
        for sub in self.subs.pop(stream, []):
            self.count -= 1
            sub.shard = None
            sub.put(exc)


class Tail:
    """Shares a few Redis connections among every tail of one event loop."""

    def __init__(
        self,
        redis_url: str,
        *,
        max_connections: int = 4,
        shard_size: int = 128,
        high_water: int = 256,
        track: bool = True,
        **redis_options: Any,
    ) -> None:
        """``track``: read only the streams Redis's key tracking says changed (one of
        the ``max_connections`` listens for that; needs at least three); else poll."""
        if max_connections < 2:
            raise ValueError("max_connections must be at least 2 (one reader, one command)")
        # Named per process and tail, so CLIENT LIST tells which router holds what.
        self.client_name = f"actorq-tail:{os.getpid()}:{next(_serial)}"
        tracked = track and max_connections >= 3
        options: dict[str, Any] = {
            "timeout": None,
            "client_name": self.client_name,
            "decode_responses": True,  # ids and fields as str, decoded in C by hiredis
            **redis_options,
        }
        self.pool = aioredis.BlockingConnectionPool.from_url(
            redis_url, max_connections=max_connections - tracked, **options
        )
        self.redis = aioredis.Redis(connection_pool=self.pool)  # short commands
        self.shard_size = shard_size
        self.high_water = high_water
        self.low_water = high_water // 4
        self._shards: list[_Shard] = []
        self._subs: set[Subscription] = set()
        self._ticker: asyncio.Task[None] | None = None
        self._closing = False
        self._listener: InvalidationListener | None = None
        self._listener_idle: asyncio.TimerHandle | None = None
        self._listener_pool: aioredis.BlockingConnectionPool | None = None
        self._stopping: set[asyncio.Task[None]] = set()
        #: CLIENT UNBLOCK was refused (an ACL without it): said once, in the log.
        self.unblock_refused = False
        if tracked:
            # RESP2 on the listener's own connection: invalidations come as Pub/Sub
            # messages it reads itself (RESP3 pushes would go to redis-py's handlers).
            listener_pool = aioredis.BlockingConnectionPool.from_url(
                redis_url, max_connections=1, **options
            )
            # Set after: a URL's own ``?protocol=3`` takes precedence over keywords.
            listener_pool.connection_kwargs["protocol"] = 2
            self._listener_pool = listener_pool
            self._listener = InvalidationListener(
                lambda: aioredis.Redis(
                    connection_pool=listener_pool, single_connection_client=True
                ),
                self._on_invalidated,
                self._on_epoch,
                self.tracking_refused,
            )
        self._max_shards = max_connections - 1 - tracked

    def reader_client(self) -> aioredis.Redis:
        """A client holding one pooled connection of its own, for a shard's reads."""
        return aioredis.Redis(connection_pool=self.pool, single_connection_client=True)

    @property
    def tracking_epoch(self) -> int | None:
        """The listener's connection id while it listens (readers redirect there), else None."""
        return self._listener.epoch if self._listener is not None else None

    def tracking_refused(self, exc: Exception) -> None:
        """Redis will not track keys (before 6.0, a proxy, an ACL): readers poll from now on."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        log.warning("Redis refused key tracking (%s): tail readers poll instead", exc)
        self._stop_listener(listener)

    def _stop_listener(self, listener: InvalidationListener) -> None:
        # Held until done: the loop keeps only a weak reference to a task.
        task = asyncio.get_running_loop().create_task(listener.stop())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def _on_invalidated(self, keys: Iterable[str] | None) -> None:
        shards = self._shards
        if keys is None:
            for shard in shards:
                shard.mark(None)
            return
        for key in keys:
            for shard in shards:
                if key in shard.subs:
                    shard.mark(key)

    def _on_epoch(self) -> None:
        for shard in self._shards:
            shard.changed()  # to re-track, or to poll: a blocked read is woken for either

    def _cancel_linger(self) -> None:
        if self._listener_idle is not None:
            self._listener_idle.cancel()
            self._listener_idle = None

    def _linger_listener(self) -> None:
        """Stop the listener once no tail has needed it for ``_LISTENER_LINGER_S``."""
        self._cancel_linger()
        if self._listener is not None and not self._subs and not self._closing:
            loop = asyncio.get_running_loop()
            self._listener_idle = loop.call_later(_LISTENER_LINGER_S, self._stop_idle_listener)

    def _stop_idle_listener(self) -> None:
        self._listener_idle = None
        if self._listener is not None and not self._subs:
            self._stop_listener(self._listener)

    def _pick_shard(self) -> _Shard:
        best = min(self._shards, key=lambda s: s.count, default=None)
        if best is None or (best.count >= self.shard_size and len(self._shards) < self._max_shards):
            best = _Shard(self)
            self._shards.append(best)
        return best

    @contextlib.asynccontextmanager
    async def subscribe(self, stream: str, after: str = "0") -> AsyncIterator[Subscription]:
        """Receive every entry of ``stream`` after id ``after`` until the block exits.

        Raises ``ConnectionError`` once :meth:`aclose` began: a tail still starting
        then would restart the readers the close just stopped.
        """
        if self._closing:
            raise RedisConnectionError("the tail reader is closed")
        sub = Subscription(stream, after)
        self._pick_shard().add(sub)
        self._subs.add(sub)
        if self._listener is not None:
            self._cancel_linger()
            self._listener.start()
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())
        try:
            yield sub
        finally:
            self._subs.discard(sub)
            if not self._subs:
                self._linger_listener()
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
        pools: list[Any] = [self.pool, self._listener_pool] if self._listener_pool else [self.pool]
        return sum(len(p._available_connections) + len(p._in_use_connections) for p in pools)

    @property
    def subscriptions(self) -> int:
        return sum(s.count for s in self._shards)

    async def aclose(self) -> None:
        """Stop the readers and close the connections."""
        self._closing = True
        if self._ticker is not None:
            self._ticker.cancel()
        self._cancel_linger()
        if self._listener is not None:
            await self._listener.stop()
        for shard in self._shards:
            task = shard.task
            if task is None:
                continue
            if shard.client_id is not None:
                # End a blocked read first, so the reader stops at once.
                with contextlib.suppress(Exception):
                    await self.redis.client_unblock(shard.client_id)
            await stop_task(task)
        closed = RedisConnectionError("the tail was closed (Client.aclose)")
        for shard in self._shards:
            shard._fail(closed)  # its tails raise now rather than wait for entries
        self._shards.clear()
        await self.redis.aclose()
        await self.pool.disconnect()
        if self._listener_pool is not None:
            await self._listener_pool.disconnect()
