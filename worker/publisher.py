"""The token publisher: adaptive batching over one pipelined connection.

When idle, a token is written at once. While a pipeline is in flight, tokens
from every job of the process collect and go out in the next pipeline, one
fenced ``PUBLISH`` script call per job, one stream entry per token. So latency
stays one round trip when idle, and throughput grows with load instead of
queueing behind one round trip per token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer import keys, scripts
from producer.settings import Settings

from . import metrics

__all__ = ["JobChannel", "Publisher"]

log = logging.getLogger("actorq.publisher")


@dataclass(eq=False)
class JobChannel:
    """One attempt's write handle: pending entries, sequence numbers and its fate."""

    job_id: str
    owner: str
    pending: list[Sequence[str]] = field(default_factory=list)
    next_seq: int = 1  # sequence number of pending[0]
    lost: bool = False  # lease lost: another attempt owns the job now
    capped: bool = False  # the stream reached ACTORQ_STREAM_MAX_EVENTS
    published: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def stopped(self) -> bool:
        return self.lost or self.capped


class Publisher:
    """Writes stream entries for all jobs of a process; lives on the shared loop."""

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self._redis = redis
        self._settings = settings
        self._sha: str | None = None
        self._dirty: dict[JobChannel, None] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._dirty_since = 0.0  # when the oldest unsent entry was queued (publish lag)

    def open(self, job_id: str, owner: str) -> JobChannel:
        channel = JobChannel(job_id, owner)
        channel.drained.set()
        return channel

    def publish(self, channel: JobChannel, fields: Sequence[str]) -> None:
        """Queue one entry (flat field/value list); never blocks the caller."""
        if channel.stopped:
            return
        if not self._dirty:
            self._dirty_since = time.monotonic()
        channel.pending.append(fields)
        channel.drained.clear()
        self._dirty[channel] = None
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def drain(self, channel: JobChannel) -> None:
        """Wait until every entry queued for ``channel`` is written (or can't be)."""
        await channel.drained.wait()

    async def _flush(self) -> None:
        try:
            backoff = 0.05
            while self._dirty:
                batch = list(self._dirty)
                self._dirty.clear()
                since, self._dirty_since = self._dirty_since, time.monotonic()
                taken = [(ch, ch.pending, ch.next_seq) for ch in batch]
                for ch in batch:
                    ch.pending = []
                try:
                    results = await self._send(taken)
                except (NoScriptError, RedisConnectionError, RedisTimeoutError, OSError) as exc:
                    # Put the batch back in front and retry: the script's sequence
                    # check drops what a cut pipeline already wrote.
                    for ch, entries, _ in taken:
                        ch.pending = list(entries) + ch.pending
                        self._dirty[ch] = None
                    if isinstance(exc, NoScriptError):
                        self._sha = None  # the server restarted: load the script again
                        continue
                    log.warning("publish failed (%s); retrying in %.2fs", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                backoff = 0.05
                metrics.pipeline_acked(time.monotonic() - since)
                for (ch, entries, _), result in zip(taken, results, strict=True):
                    ch.next_seq += len(entries)
                    if result > 0:
                        metrics.published(entries[len(entries) - result :])
                    if result == -1:
                        ch.lost = True
                    elif result == -2:
                        ch.capped = True
                    else:
                        ch.published += int(result)
                    if ch.stopped:
                        ch.pending.clear()
                    if not ch.pending:
                        ch.drained.set()
        finally:
            self._flusher = None
            if self._dirty:  # raced with a publish after the loop's last check
                self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _send(self, taken: list[tuple[JobChannel, list[Sequence[str]], int]]) -> list[int]:
        s = self._settings
        if self._sha is None:
            self._sha = await self._redis.script_load(scripts.PUBLISH)
        pipe = self._redis.pipeline(transaction=False)
        for ch, entries, first_seq in taken:
            argv: list[str | int] = [
                ch.owner,
                s.stream_max_events + 64,
                s.stream_max_events,
                s.retention_s,
                first_seq,
            ]
            for fields in entries:
                argv.append(len(fields) // 2)
                argv.extend(fields)
            job = ch.job_id
            pipe.execute_command(
                "EVALSHA",
                self._sha,
                3,
                keys.events_key(job),
                keys.lease_key(job),
                keys.job_key(job),
                *argv,
            )
        return [int(r) for r in await pipe.execute()]
