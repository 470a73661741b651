"""Per-process housekeeping on the shared loop: leases, cancel flags and the sweeper.

- Every ``poll_s`` it checks the cancel flag of each running job (one ``MGET``
  for all jobs) and cancels the job's asyncio task when one is set, again if the
  task still runs a second later (a library dropped the cancellation).
- It renews each lease ``lease_ttl / 3`` after the job's claim and after each
  renewal, saving what the job has used so far (a later attempt counts it if this
  one is lost); a lease found lost stops its job at once (another attempt owns it).
  Each job on its own clock: jobs that started apart are renewed apart, rather than
  all of a process's in one burst of work for the loop (and Redis) every period,
  and a job shorter than the period is never renewed.
- Every ``sweep_s`` (``ACTORQ_SWEEP_INTERVAL_S``, default 5) it looks for running
  jobs whose lease expired (their worker died, froze, or lost Redis for longer
  than the lease) and sends them again to the queue they came from, so a dead
  worker's jobs run again within ``lease_ttl + sweep_s`` (20 s by default)
  instead of after the broker's visibility timeout.

It starts with the worker (not with its first job), so an idle worker sweeps too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer import keys, scripts
from producer.aio import raise_if_cancelling, stop_task
from producer.settings import Settings, env_number

from .publisher import Publisher, ScriptArg

__all__ = ["ActiveJob", "Requeue", "RunScript", "Supervisor", "sweep_interval_from_env"]

#: Sends a job again: ``requeue(job_id, queue)``; ``queue`` is ``""`` when unknown.
#: ``requeue(job_id, queue, actor)`` sends a job's message again.
Requeue = Callable[[str, str, str], None]

#: Runs a Lua script in a shared pipeline: ``run_script(source, keys, args)`` -> its
#: reply's future (:meth:`worker.publisher.Publisher.run_script`).
RunScript = Callable[[str, Sequence[str], Sequence[ScriptArg]], "asyncio.Future[Any]"]


def sweep_interval_from_env() -> float:
    """``ACTORQ_SWEEP_INTERVAL_S`` (seconds, may be fractional; default 5)."""
    value = env_number("ACTORQ_SWEEP_INTERVAL_S", 5.0, float)
    if not 0 < value <= 3600:
        raise ValueError(f"ACTORQ_SWEEP_INTERVAL_S must be in (0, 3600], got {value}")
    return value


log = logging.getLogger("actorq.supervisor")

#: A stopped attempt still running this long after its task was cancelled is
#: cancelled again (a normal stop takes milliseconds).
RESTOP_AFTER_S = 1.0

#: Renewals queued per turn of the loop: ~2 ms of work (each takes a usage snapshot
#: of its job, 25-45 us), so a round of a thousand jobs never holds the tokens of
#: every stream for longer than that.
_RENEW_BATCH = 50


@dataclass(eq=False)
class ActiveJob:
    job_id: str
    owner: str
    task: asyncio.Task[object]
    cancel_requested: bool = False
    lease_lost: bool = False
    # Writing its ending: a late cancel or lost lease must not cut that, and FINISH
    # drops the lease itself.
    ending: bool = False
    #: When this worker cancelled the attempt's task (cancel request or lost lease).
    stopped_at: float = 0.0
    #: When the lease was last renewed (or taken): the next renewal is due lease/3 later.
    renewed_at: float = field(default_factory=time.monotonic)
    #: What the job has used so far (ActorResult JSON, ``""`` for nothing yet), saved
    #: with each renewal: a later attempt counts it if this one is lost.
    usage: Callable[[], str] = lambda: ""


class Supervisor:
    def __init__(
        self,
        redis: aioredis.Redis,
        settings: Settings,
        requeue: Requeue,
        *,
        run_script: RunScript | None = None,
        poll_s: float = 0.25,
        sweep_s: float | None = None,
    ) -> None:
        """``run_script``: the process's publisher's, so renewals share its pipelines
        (default: a publisher of the supervisor's own on ``redis``)."""
        self._redis = redis
        self._settings = settings
        self._requeue = requeue
        self._run_script = run_script or Publisher(redis, settings).run_script
        self._poll_s = poll_s
        self._sweep_s = sweep_interval_from_env() if sweep_s is None else sweep_s
        self._jobs: dict[str, ActiveJob] = {}
        self._runner: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._jobs)

    def start(self) -> None:
        """Start the housekeeping task on the running loop (idempotent)."""
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._run())

    def add(self, job: ActiveJob) -> None:
        """Renew and watch ``job`` (CLAIM already put it in the running index)."""
        self._jobs[job.job_id] = job
        self.start()

    def remove(self, job: ActiveJob) -> None:
        """Stop renewing ``job``; FINISH takes it out of the running index."""
        if self._jobs.get(job.job_id) is job:
            del self._jobs[job.job_id]

    async def stop(self) -> None:
        """Stop the housekeeping task and wait until it has ended."""
        task, self._runner = self._runner, None
        await stop_task(task)

    async def _run(self) -> None:
        last_sweep = time.monotonic()
        while True:
            raise_if_cancelling()  # a library may have swallowed the CancelledError
            await asyncio.sleep(self._poll_s)
            now = time.monotonic()
            try:
                await self._check()
                if now - last_sweep >= self._sweep_s:
                    last_sweep = now
                    await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: keep trying; jobs keep their leases a while
                log.warning("supervisor round failed: %s", exc)

    async def _check(self) -> None:
        """Every job's cancel flag, and a renewal of the leases that fell due."""
        jobs = list(self._jobs.values())
        if not jobs:
            return
        start = time.monotonic()
        renew_every = self._settings.lease_ttl_s / 3
        due = [job for job in jobs if start - job.renewed_at >= renew_every]
        rest = [job for job in jobs if start - job.renewed_at < renew_every]
        # A renewal reads its job's cancel flag too; one MGET reads the others'.
        if due:
            renewed, flagged = await asyncio.gather(self._renew(due), self._flags(rest))
            for job in due:
                job.renewed_at = start
            jobs, results = due + rest, renewed + flagged
        else:
            results = await self._flags(rest)
        now = time.monotonic()
        for job, (held, cancel) in zip(jobs, results, strict=False):
            if job.ending or self._jobs.get(job.job_id) is not job:
                continue  # ending, or ended while this round was in flight: fenced by FINISH
            if not held and not job.lease_lost:
                job.lease_lost = True
                log.warning("job %s: lease lost, stopping this attempt", job.job_id)
                job.stopped_at = now
                job.task.cancel()
            elif cancel and not job.cancel_requested:
                job.cancel_requested = True
                job.stopped_at = now
                job.task.cancel()
            elif job.stopped_at and now - job.stopped_at >= RESTOP_AFTER_S:
                # A library lost the cancellation (Python 3.11's asyncio.wait_for
                # drops one that lands as its inner future completes): send it again.
                log.warning("job %s: still running %.1fs after it was stopped; stopping it again",
                            job.job_id, now - job.stopped_at)  # fmt: skip
                job.stopped_at = now
                job.task.cancel()

    async def _flags(self, jobs: list[ActiveJob]) -> list[tuple[int, int]]:
        """``(1, cancel_requested)`` per job: its cancel flag, leases left as they are.

        One MGET for every flag: a pipeline of one EXISTS per job cost the loop ~25 us
        a job each round (7.5 ms for 300 jobs vs 0.6 ms), four rounds a second.
        """
        if not jobs:
            return []
        flags = await self._redis.mget([keys.cancel_key(j.job_id) for j in jobs])
        return [(1, int(flag is not None)) for flag in flags]

    async def _renew(self, jobs: list[ActiveJob]) -> list[tuple[int, int]]:
        """Renew every lease and read every cancel flag: ``(held, cancel)`` per job.

        Each renewal is a hand-packed EVALSHA in the publisher's pipelines, queued
        ``_RENEW_BATCH`` at a time with the loop let go in between: a redis-py
        pipeline of one EVAL per job held the loop 20 ms in one stretch for 1,000
        jobs (every stream's tokens with it), every ``lease_ttl / 3``.
        """
        s = self._settings
        # The same for every job of the round: encoded once.
        shared = [
            str(s.lease_ttl_s * 1000).encode(),
            str(s.retention_s).encode(),
            repr(time.time() + s.lease_ttl_s).encode(),
        ]
        run, index = self._run_script, keys.RUNNING_INDEX
        calls: list[asyncio.Future[Any]] = []
        for start in range(0, len(jobs), _RENEW_BATCH):
            if start:
                await asyncio.sleep(0)
            for job in jobs[start : start + _RENEW_BATCH]:
                job_id = job.job_id
                calls.append(
                    run(
                        scripts.RENEW,
                        [
                            keys.lease_key(job_id),
                            keys.cancel_key(job_id),
                            keys.job_key(job_id),
                            index,
                            keys.events_key(job_id),
                        ],
                        [job.owner, *shared, job_id, _usage(job)],
                    )
                )
        return [(int(held), int(cancel)) for held, cancel in await _replies(calls)]

    async def sweep(self) -> int:
        """Send again the running jobs whose lease expired; return how many."""
        now = time.time()
        stale: Any = await self._redis.zrangebyscore(
            keys.RUNNING_INDEX, "-inf", now, start=0, num=100
        )
        requeued = 0
        for raw in stale:
            job_id = raw.decode()
            if job_id in self._jobs:
                continue
            try:
                requeued += await self.requeue(job_id)
            except (RedisConnectionError, RedisTimeoutError, OSError):
                raise  # Redis away: the whole round fails and is tried again
            except Exception:  # one bad entry must not stall the sweep of all the others
                log.exception("job %s: could not sweep it", job_id)
        return requeued

    def send_again(self, job_id: str, queue: str, actor: str = "") -> None:
        """Send a job's message again (blocking: call it from a thread)."""
        self._requeue(job_id, queue, actor)

    async def requeue(self, job_id: str) -> bool:
        """Send ``job_id`` again if it is running with no lease (or was requeued and its
        message never went out); True when this call sent it."""
        now = f"{time.time():.6f}"
        job_keys = scripts.running_job_keys(job_id)
        code, raw_queue, raw_actor = await self._redis.eval(
            scripts.REQUEUE, 5, *job_keys, now, self._settings.lease_ttl_s, job_id
        )
        if int(code) <= 0:
            return False  # a live attempt holds it, or there is nothing to send
        queue, actor = (
            v.decode() if isinstance(v, bytes) else str(v) for v in (raw_queue, raw_actor)
        )
        try:
            await asyncio.to_thread(self._requeue, job_id, queue, actor)
        except Exception as exc:  # broker away: undo, so the next sweep tries again
            log.warning("job %s: could not send it again (%s); will retry", job_id, exc)
            await self._redis.eval(scripts.UNQUEUE, 4, *scripts.job_keys(job_id))
            await self._redis.zadd(keys.RUNNING_INDEX, {job_id: time.time()})
            return False
        await self._redis.eval(scripts.REQUEUE_SENT, 5, *job_keys, now, job_id)
        log.warning("job %s: its attempt was lost (worker gone or lease lapsed); requeued", job_id)
        return True


def _usage(job: ActiveJob) -> str:
    try:
        return job.usage()
    except Exception:  # a renewal must not fail over a snapshot: the lease matters more
        log.exception("job %s: could not take its usage so far", job.job_id)
        return ""


async def _replies(calls: list[asyncio.Future[Any]]) -> list[Any]:
    """Every call's reply, in order; the first error once all have settled.

    Waiting on each in turn: one pipeline answers them all at once, so this
    suspends about once, where a ``gather`` would add a callback per call.
    """
    out: list[Any] = []
    error: BaseException | None = None
    try:
        for call in calls:
            try:
                out.append(await call)
            except Exception as exc:  # each call's own error; a cancel of this task goes on up
                error = error or exc
    finally:
        for call in calls:
            call.cancel()  # a no-op once settled; the publisher drops a cancelled call's reply
    if error is not None:
        raise error
    return out
