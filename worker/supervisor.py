"""Per-process housekeeping on the shared loop: leases, cancel flags and the sweeper.

- Every ``poll_s`` it checks the cancel flag of each running job (one pipeline
  for all jobs) and cancels the job's asyncio task when one is set.
- Every ``lease_ttl / 3`` it renews each lease; a lease found lost stops its job
  at once (another attempt owns it).
- Every ``sweep_s`` it looks for running jobs whose lease expired (their worker
  died) and puts them back on the queue, so a dead worker's jobs run again in
  well under a minute instead of after the broker's visibility timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from producer import keys, scripts
from producer.settings import Settings

__all__ = ["ActiveJob", "Supervisor"]

log = logging.getLogger("actorq.supervisor")


@dataclass(eq=False)
class ActiveJob:
    job_id: str
    owner: str
    task: asyncio.Task[object]
    cancel_requested: bool = False
    lease_lost: bool = False
    finishing: bool = False  # its ending is being written: FINISH drops the lease itself


class Supervisor:
    def __init__(
        self,
        redis: aioredis.Redis,
        settings: Settings,
        requeue: Callable[[str], None],
        *,
        poll_s: float = 0.25,
        sweep_s: float = 5.0,
    ) -> None:
        self._redis = redis
        self._settings = settings
        self._requeue = requeue
        self._poll_s = poll_s
        self._sweep_s = sweep_s
        self._jobs: dict[str, ActiveJob] = {}
        self._runner: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._jobs)

    async def add(self, job: ActiveJob) -> None:
        self._jobs[job.job_id] = job
        await self._redis.zadd(
            keys.RUNNING_INDEX, {job.job_id: time.time() + self._settings.lease_ttl_s}
        )
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._run())

    async def remove(self, job: ActiveJob) -> None:
        if self._jobs.get(job.job_id) is job:
            del self._jobs[job.job_id]
        with contextlib.suppress(Exception):
            await self._redis.zrem(keys.RUNNING_INDEX, job.job_id)

    async def _run(self) -> None:
        last_renew = last_sweep = time.monotonic()
        renew_every = self._settings.lease_ttl_s / 3
        while True:
            await asyncio.sleep(self._poll_s)
            now = time.monotonic()
            try:
                renew = now - last_renew >= renew_every
                await self._check(renew)
                if renew:
                    last_renew = now
                if now - last_sweep >= self._sweep_s:
                    last_sweep = now
                    await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: keep trying; jobs keep their leases a while
                log.warning("supervisor round failed: %s", exc)

    async def _check(self, renew: bool) -> None:
        jobs = list(self._jobs.values())
        if not jobs:
            return
        s = self._settings
        pipe = self._redis.pipeline(transaction=False)
        for job in jobs:
            if renew:
                pipe.eval(
                    scripts.RENEW,
                    3,
                    keys.lease_key(job.job_id),
                    keys.cancel_key(job.job_id),
                    keys.job_key(job.job_id),
                    job.owner,
                    s.lease_ttl_s * 1000,
                    s.retention_s,
                )
            else:
                pipe.exists(keys.cancel_key(job.job_id))
        if renew:
            deadline = time.time() + s.lease_ttl_s
            pipe.zadd(keys.RUNNING_INDEX, {j.job_id: deadline for j in jobs})
        results = await pipe.execute()
        for job, result in zip(jobs, results, strict=False):
            held, cancel = (int(result[0]), int(result[1])) if renew else (1, int(result))
            if job.finishing or self._jobs.get(job.job_id) is not job:
                continue  # ended while this round was in flight: no lease to hold any more
            if not held and not job.lease_lost:
                job.lease_lost = True
                log.warning("job %s: lease lost, stopping this attempt", job.job_id)
                job.task.cancel()
            elif cancel and not job.cancel_requested:
                job.cancel_requested = True
                job.task.cancel()

    async def sweep(self) -> int:
        """Requeue running jobs whose lease expired; return how many."""
        now = time.time()
        stale: Any = await self._redis.zrangebyscore(
            keys.RUNNING_INDEX, "-inf", now, start=0, num=100
        )
        requeued = 0
        for raw in stale:
            job_id = raw.decode()
            if job_id in self._jobs:
                continue
            got = await self._redis.eval(scripts.REQUEUE, 4, *scripts.job_keys(job_id))
            await self._redis.zrem(keys.RUNNING_INDEX, job_id)
            if got:
                log.warning("job %s: its worker vanished; requeued", job_id)
                await asyncio.to_thread(self._requeue, job_id)
                requeued += 1
        return requeued
