"""The token publisher: adaptive batching over one pipelined connection.

When idle, a token is written at once. While a pipeline is in flight, tokens
from every job of the process collect and go out in the next pipeline, one
fenced ``PUBLISH`` script call for up to 64 jobs, one stream entry per token. So latency
stays one round trip when idle, and throughput grows with load instead of
queueing behind one round trip per token.

A job's claim and its ending ride the same pipelines (:meth:`Publisher.run_script`):
a burst of jobs starting or ending shares round trips with the tokens in flight,
and none of them pays redis-py's per-command packing, retry and timeout wrappers.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from producer import keys, scripts
from producer.resp import bulk, evalsha, script_sha, transient_reply, wrong_node_reply
from producer.settings import Settings, env_number

from . import metrics

__all__ = ["JobChannel", "Publisher", "ScriptArg"]

#: What :meth:`Publisher.run_script` sends as a key or argument (encoded as redis-py would).
ScriptArg = str | bytes | int | float

log = logging.getLogger("actorq.publisher")

#: Jobs and entries per PUBLISH call: enough to spread the call's cost, few enough
#: that one call holds Redis (single-threaded) for about a millisecond at most, even
#: when a backlog goes out after an outage.
_JOBS_PER_CALL = 64
_ENTRIES_PER_CALL = 512
_VERIFY, _TRUST = bulk(b"1"), bulk(b"0")
#: The held connection, idle this long, goes back through the pool's readiness check
#: before its next pipeline: a server ``timeout`` or a proxy may have closed it meanwhile.
_IDLE_RECHECK_S = 1.0
#: A job's PUBLISH arguments: its owner (packed), seq, verify flag (packed) and batch,
#: the JSON array of its entries.
_JOB_ARGS = b"%b$%d\r\n%d\r\n%b$%d\r\n[%b]\r\n"


@dataclass(eq=False)
class JobChannel:
    """One attempt's write handle: pending entries, sequence numbers and its fate."""

    job_id: str
    owner: str
    # Entries not yet written, each JSON-encoded when queued, and each one's type.
    pending: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    next_seq: int = 1  # sequence number of pending[0]
    lost: bool = False  # lease lost: another attempt owns the job now
    capped: bool = False  # the stream reached ACTORQ_STREAM_MAX_EVENTS
    # Redis refused this job's writes for good (a key of another type under its
    # name): what it said. The job's other entries are dropped; its neighbours go on.
    failed: str | None = None
    published: int = 0
    # Entries ever queued, written, in flight or pending: a pipeline in flight holds
    # its entries in neither ``pending`` nor ``next_seq``, so this is counted, not derived.
    queued: int = 0
    # This job's constant PUBLISH keys and owner argument, RESP-encoded once.
    packed_keys: bytes = b""
    packed_owner: bytes = b""
    # Whether Redis may hold more of this channel than next_seq says (a pipeline
    # failed after it went out): the next batch has PUBLISH check the stored seq.
    verify: bool = False
    unwritten: bool = False  # entries queued or in flight, not yet acknowledged
    # Made only when someone drains a channel with entries still pending: a job
    # drains once, at its end, while its tokens come and go hundreds of times.
    drained: asyncio.Future[None] | None = None
    # Lost, capped or failed: nothing more of this attempt is written. Stored, not
    # derived, as every token reads it.
    stopped: bool = False


@dataclass(eq=False)
class _ScriptCall:
    """A script call waiting for a pipeline: its source, its packed EVALSHA and its reply."""

    source: str
    command: bytes
    reply: asyncio.Future[Any]


def _encode_arg(value: ScriptArg) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"a script argument must be str, bytes, int or float, not {value!r}")
    return repr(value).encode()


class Publisher:
    """Writes stream entries for all jobs of a process; lives on the shared loop."""

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self._redis = redis
        self._settings = settings
        self._conn: Any = None  # the connection pipelines go out on, once taken
        self._read_reply: Callable[[int], Awaitable[list[Any]]] | None = None  # _conn's reader
        self._conn_used_at = 0.0  # loop time of _conn's last pipeline
        self._sha_arg = b""  # PUBLISH's SHA1 as a RESP bulk string, once the server has it
        # PUBLISH's arguments common to every job: maxlen, cap, ttl.
        self._args = b"".join(
            bulk(str(a).encode())
            for a in (
                settings.stream_max_events + 64,
                settings.stream_max_events,
                settings.retention_s,
            )
        )
        self._dirty: dict[JobChannel, None] = {}
        self._calls: list[_ScriptCall] = []
        self._loaded: set[str] = set()  # sources of the call scripts the server has loaded
        self._shas: dict[str, bytes] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._dirty_since = 0.0  # when the oldest unsent entry was queued (publish lag)
        # Benchmarks only: stamp each token entry with the time the model yielded it
        # (unix seconds), so a tailer can measure delivery lag. Off by default.
        self._stamp = os.environ.get("ACTORQ_STAMP_TOKENS", "") == "1"
        # Pipelines start at most this often: a token after a quiet spell goes out at
        # once, but under load the tokens of a few milliseconds share one round trip.
        self._interval = (
            env_number("ACTORQ_PUBLISH_INTERVAL_MS", 1.0, float, low=0, high=1000) / 1000
        )
        self._last_send = 0.0
        # A pipeline unanswered this long has its connection cut and is sent again. One
        # watchdog timer checks it, rather than a deadline armed for every round trip.
        timeout = redis.connection_pool.connection_kwargs.get("socket_timeout")
        self._reply_timeout = float(timeout) if timeout else None
        self._awaiting_since: float | None = None  # loop time the pipeline in flight went out
        self._watchdog: asyncio.TimerHandle | None = None

    def open(self, job_id: str, owner: str) -> JobChannel:
        return JobChannel(job_id, owner)

    def publish(self, channel: JobChannel, fields: Sequence[str]) -> bool:
        """Queue one entry (flat field/value list: ``type``, its kind, ...); never blocks.

        Returns whether the channel has stopped (lease lost, stream full): nothing
        more of this attempt will be written, so its producer can stop.
        """
        if channel.stopped:
            return True
        kind = fields[1]
        if self._stamp and kind == "token":
            fields = [*fields, "ts", f"{time.time():.6f}"]
        # Encoded now, one C call per string, so a batch is a join of its entries.
        self._queue(channel, "[" + ",".join(map(encode_basestring, fields)) + "]", kind)
        return False

    def publish_token(self, channel: JobChannel, text: str, node: str) -> bool:
        """:meth:`publish` of ``type token text <text> node <node>``, its constant part pre-encoded."""
        if channel.stopped:
            return True
        entry = '["type","token","text",' + encode_basestring(text) + ',"node",'
        if self._stamp:
            entry += encode_basestring(node) + ',"ts","' + f"{time.time():.6f}" + '"]'
        else:
            entry += encode_basestring(node) + "]"
        self._queue(channel, entry, "token")
        return False

    def _queue(self, channel: JobChannel, entry: str, kind: str) -> None:
        if not self._dirty:
            self._dirty_since = time.monotonic()
        channel.pending.append(entry)
        channel.kinds.append(kind)
        channel.queued += 1
        channel.unwritten = True
        self._dirty[channel] = None
        if self._flusher is None:
            self._start_flusher()

    def run_script(
        self, source: str, keys: Sequence[str], args: Sequence[ScriptArg]
    ) -> asyncio.Future[Any]:
        """Run a Lua script in the next pipeline; the future holds its reply.

        An error reply is the future's exception (a ``NOSCRIPT`` is handled here:
        the script is loaded and the call sent again). If the pipeline fails on
        its way (the connection drops, Redis is away), the future gets that error
        and the call is not sent again: the caller decides, as a script may have
        run before its reply was lost.
        """
        sha = self._shas.get(source)
        if sha is None:
            sha = self._shas[source] = script_sha(source)
        command = evalsha(sha, [k.encode() for k in keys], [_encode_arg(a) for a in args])
        loop = asyncio.get_running_loop()
        call = _ScriptCall(source, command, loop.create_future())
        self._calls.append(call)
        if self._flusher is None:
            self._start_flusher()
        return call.reply

    async def drain(self, channel: JobChannel) -> None:
        """Wait until every entry queued for ``channel`` is written (or can't be)."""
        if not channel.unwritten:
            return
        if channel.drained is None:
            channel.drained = asyncio.get_running_loop().create_future()
        await asyncio.shield(channel.drained)

    def _watch(self) -> None:
        """Cut the connection of a pipeline unanswered for longer than the socket timeout."""
        self._watchdog = None
        if self._flusher is None or self._reply_timeout is None:
            return
        loop = asyncio.get_running_loop()
        since, conn = self._awaiting_since, self._conn
        if since is not None and conn is not None and loop.time() - since > self._reply_timeout:
            log.warning(
                "Redis left a pipeline unanswered for %.1fs; reconnecting", loop.time() - since
            )
            transport = getattr(getattr(conn, "_writer", None), "transport", None)
            if transport is not None:
                transport.abort()  # the pending read fails and the batch is sent again
        self._watchdog = loop.call_later(self._reply_timeout / 4, self._watch)

    def _start_flusher(self) -> None:
        # In an empty context: a pipeline carries many jobs' entries, so its logs must
        # not name (logctx) whichever job happened to start it.
        self._flusher = asyncio.get_running_loop().create_task(
            self._flush(), context=contextvars.Context()
        )

    async def _flush(self) -> None:
        try:
            backoff = 0.05
            loop = asyncio.get_running_loop()
            if self._watchdog is None and self._reply_timeout is not None:
                self._watchdog = loop.call_later(self._reply_timeout / 4, self._watch)
            while self._dirty or self._calls:
                wait = self._last_send + self._interval - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                self._last_send = loop.time()
                batch, self._dirty = self._dirty, {}
                # A call whose caller stopped waiting is not sent.
                calls = [call for call in self._calls if not call.reply.done()]
                self._calls = []
                since, self._dirty_since = self._dirty_since, time.monotonic()
                taken: list[_Taken] = []
                for ch in batch:
                    taken.append((ch, ch.pending, ch.kinds, ch.next_seq))
                    ch.pending, ch.kinds = [], []
                try:
                    results = await self._send(taken, calls)
                except Exception as exc:
                    # Whatever failed (a connection, a failover's READONLY, an OOM), put
                    # the batch back in front and retry: entries are never dropped, and
                    # the script's sequence check drops what a cut pipeline already wrote.
                    for ch, entries, kinds, _ in taken:
                        ch.verify = True
                        ch.pending = entries + ch.pending
                        ch.kinds = kinds + ch.kinds
                        self._dirty[ch] = None
                    for call in calls:  # those that got no reply (nor a NOSCRIPT) before it failed
                        if not call.reply.done() and call not in self._calls:
                            call.reply.set_exception(exc)
                    if isinstance(exc, NoScriptError):
                        self._forget_scripts()  # the server restarted: load them again
                        continue
                    log.warning("publish failed (%s); retrying in %.2fs", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                backoff = 0.05
                metrics.pipeline_acked(time.monotonic() - since)
                written: list[str] = []  # the kinds written, counted once per pipeline
                for (ch, entries, kinds, _), result in zip(taken, results, strict=True):
                    n = len(entries)
                    ch.next_seq += n
                    if result == n and result.__class__ is int:  # all written, as nearly always
                        ch.verify = False
                        written += kinds
                        ch.published += n
                    else:
                        self._settle(ch, kinds, result, written)
                    if ch.stopped:
                        ch.pending.clear()
                        ch.kinds.clear()
                    if not ch.pending:
                        ch.unwritten = False
                        if ch.drained is not None:
                            if not ch.drained.done():
                                ch.drained.set_result(None)
                            ch.drained = None
                metrics.published(written)
        finally:
            self._flusher = None
            if self._dirty or self._calls:  # raced with a publish after the loop's last check
                self._start_flusher()

    @staticmethod
    def _settle(
        ch: JobChannel, kinds: list[str], result: int | ResponseError, written: list[str]
    ) -> None:
        """What a PUBLISH reply other than "all written" says of ``ch``'s batch."""
        if isinstance(result, BaseException):
            ch.failed = str(result).strip()
            log.error("job %s: Redis refused its entries: %s", ch.job_id, ch.failed)
            result = 0
        ch.verify = result < 0
        if result > 0:
            written += kinds[len(kinds) - result :]
            ch.published += result
        elif result == -1:
            ch.lost = True
        elif result == -2:
            ch.capped = True
        ch.stopped = ch.lost or ch.capped or ch.failed is not None

    def _forget_scripts(self) -> None:
        self._sha_arg = b""
        self._loaded.clear()

    async def _send(
        self,
        taken: list[_Taken],
        calls: list[_ScriptCall],
    ) -> list[int | ResponseError]:
        """One round trip: the jobs' batches in PUBLISH calls packed by hand into one
        write, then the calls.

        Only the sequence number and the JSON batch are encoded per job; its keys and
        owner are packed once. redis-py's pipeline spent ~30 us per command on
        packing, retry wrappers and reply dispatch. Returns what PUBLISH answered for
        each job (a job's own error reply in its place); settles the calls. Raises
        when the pipeline failed, or when Redis refused a write for now (OOM, a
        failover): then every job's batch is sent again.
        """
        if not self._sha_arg:
            self._sha_arg = bulk(str(await self._redis.script_load(scripts.PUBLISH)).encode())
        for call in calls:
            if call.source not in self._loaded:
                await self._redis.script_load(call.source)
                self._loaded.add(call.source)
        parts: list[bytes] = []
        sha = self._sha_arg
        groups = _call_groups(taken)
        for group in groups:
            n = len(group)
            parts += [b"*%d\r\n$7\r\nEVALSHA\r\n" % (6 + 7 * n), sha, bulk(b"%d" % (3 * n))]
            for ch, _, _, _ in group:
                if not ch.packed_keys:
                    self._pack_channel(ch)
                parts.append(ch.packed_keys)
            parts.append(self._args)
            for ch, entries, _, first_seq in group:
                # "replace": a lone surrogate (a model can send one) has no UTF-8 form.
                batch = ",".join(entries).encode("utf-8", "replace")
                # The job's owner, seq, verify flag and batch in one format: this runs
                # for nearly every token, and each bytes format costs ~0.3 us.
                parts.append(
                    _JOB_ARGS
                    % (
                        ch.packed_owner,
                        len(str(first_seq)),
                        first_seq,
                        _VERIFY if ch.verify else _TRUST,
                        len(batch) + 2,
                        batch,
                    )
                )
        n_publish = len(groups)
        parts += [call.command for call in calls]
        conn, read = self._conn, self._read_reply
        pool, now = self._redis.connection_pool, asyncio.get_running_loop().time()
        if conn is not None and now - self._conn_used_at > _IDLE_RECHECK_S:
            # Closed by the server while idle, it would fail this pipeline and log a
            # retry; the pool's checkout finds that out and reconnects instead.
            self._conn = self._read_reply = None
            await pool.release(conn)
            conn = read = None
        if conn is None or read is None:
            # Held across pipelines (one flush runs at a time): a pool checkout and
            # release per pipeline cost more than packing its commands.
            conn = self._conn = await pool.get_connection()
            read = self._read_reply = _reply_reader(conn)
        self._awaiting_since = self._conn_used_at = now
        try:
            await _write(conn, b"".join(parts))
            replies = await read(n_publish + len(calls))
        except BaseException:
            self._conn = self._read_reply = None
            await conn.disconnect()  # replies may be left unread: never reuse it
            await self._redis.connection_pool.release(conn)
            raise
        finally:
            self._awaiting_since = None
        # Every reply is read, error replies included: the connection stays in step.
        wrong_node = False
        for call, reply in zip(calls, replies[n_publish:], strict=True):
            if isinstance(reply, BaseException):
                wrong_node = wrong_node or wrong_node_reply(reply)
            if call.reply.done():  # its caller stopped waiting (cancelled)
                continue
            if isinstance(reply, NoScriptError):
                self._loaded.discard(call.source)
                self._calls.append(call)  # loaded and sent again with the next pipeline
            elif isinstance(reply, BaseException):
                call.reply.set_exception(reply)
            else:
                call.reply.set_result(reply)
        # A call that failed whole (NOSCRIPT, a demoted node), else a job's refusal that
        # is Redis's state (OOM, READONLY), not the job's: either way all go again.
        error = next((r for r in replies[:n_publish] if isinstance(r, BaseException)), None)
        results = [] if error else [r for reply in replies[:n_publish] for r in reply]
        # Every job's reply a count, as nearly always: nothing to look into one by one.
        plain = set(map(type, results)) <= {int}
        if not plain:
            error = error or next(
                (r for r in results if isinstance(r, ResponseError) and transient_reply(r)), None
            )
        if wrong_node or (error is not None and wrong_node_reply(error)):
            # A failover demoted the node this connection reached: every retry on it
            # would fail the same way, so the next pipeline connects afresh.
            self._conn = self._read_reply = None
            await conn.disconnect()
            await self._redis.connection_pool.release(conn)
        if error is not None:
            raise error
        return (
            results if plain else [r if isinstance(r, ResponseError) else int(r) for r in results]
        )

    @staticmethod
    def _pack_channel(ch: JobChannel) -> None:
        job = ch.job_id
        ch.packed_keys = b"".join(
            bulk(k.encode()) for k in (keys.events_key(job), keys.lease_key(job), keys.job_key(job))
        )
        ch.packed_owner = bulk(ch.owner.encode())


_Taken = tuple[JobChannel, list[str], list[str], int]


def _call_groups(taken: list[_Taken]) -> list[list[_Taken]]:
    """``taken`` cut into PUBLISH calls of at most ``_JOBS_PER_CALL`` jobs and, past
    a call's first job, ``_ENTRIES_PER_CALL`` entries."""
    if (
        0 < len(taken) <= _JOBS_PER_CALL
        and sum(map(len, [t[1] for t in taken])) <= _ENTRIES_PER_CALL
    ):
        return [taken]  # one call holds them all, as it does but after an outage
    groups: list[list[_Taken]] = []
    group: list[_Taken] = []
    entries = 0
    for item in taken:
        if group and (len(group) == _JOBS_PER_CALL or entries + len(item[1]) > _ENTRIES_PER_CALL):
            groups.append(group)
            group, entries = [], 0
        group.append(item)
        entries += len(item[1])
    if group:
        groups.append(group)
    return groups


async def _write(conn: Any, data: bytes) -> None:
    """Write to the connection's stream directly when it has one.

    ``send_packed_command`` wraps every write in ``asyncio.wait_for`` when the pool
    has a ``socket_timeout``: a task, a timer and an extra loop turn per pipeline,
    which cost more than the pipeline's tokens. The publisher's watchdog covers it.
    """
    writer = getattr(conn, "_writer", None)
    if writer is None:
        await conn.send_packed_command(data, check_health=False)
        return
    writer.write(data)
    await writer.drain()


def _reply_reader(conn: Any) -> Callable[[int], Awaitable[list[Any]]]:
    """A coroutine function reading the connection's next ``n`` replies.

    An error reply comes back in its place as the exception redis-py would raise
    for it (``ResponseError``, ``NoScriptError``...), so one failed command leaves
    the connection in step with the rest of its pipeline; a connection error is raised.

    With hiredis, the replies are taken from its reader in one loop, and the socket
    is read only when they are not all buffered yet: one await per read rather
    than a coroutine per reply. A pipeline carries one reply per job in it, so
    this runs for nearly every token. ``read_response`` wraps each reply in
    per-call error formatting and health-check bookkeeping that cost more than
    parsing it.
    """
    parser: Any = getattr(conn, "_parser", None)
    reader = getattr(parser, "_reader", None)
    fill = getattr(parser, "read_from_socket", None)
    if reader is None or fill is None or not hasattr(reader, "gets"):
        parser_read = getattr(parser, "read_response", None)
        one = parser_read or functools.partial(conn.read_response, timeout=math.inf)

        async def read_each(n: int) -> list[Any]:
            replies: list[Any] = []
            for _ in range(n):
                try:
                    replies.append(await one())
                except ResponseError as exc:  # a connection's reader raises what a parser returns
                    replies.append(exc)
            return replies

        return read_each

    # What hiredis answers while a reply is incomplete: redis-py's sentinel (False
    # in older releases).
    pending = getattr(sys.modules.get(type(parser).__module__), "NOT_ENOUGH_DATA", False)

    async def read(n: int) -> list[Any]:
        # Looked up per call: a reconnect gives the parser a new reader.
        hiredis_reader = parser._reader
        if hiredis_reader is None or not getattr(parser, "_connected", True):
            raise RedisConnectionError("the publisher's Redis connection is closed")
        gets = hiredis_reader.gets
        replies: list[Any] = []
        while len(replies) < n:
            reply = gets()
            if reply is pending:
                await fill()
                continue
            if isinstance(reply, RedisConnectionError):
                raise reply
            replies.append(reply)
        return replies

    return read
