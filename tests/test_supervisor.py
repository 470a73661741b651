"""The supervisor's stop of a running attempt survives a library that drops it."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from producer import Settings, keys
from worker.supervisor import RESTOP_AFTER_S, ActiveJob, Supervisor


def test_a_lost_cancellation_is_sent_again(stack_env: dict[str, str]) -> None:
    """Python 3.11's asyncio.wait_for drops a cancel that lands as its inner future
    completes; a cancelled job must not stream on because of it."""
    settings = Settings.from_env(stack_env)
    job_id = f"lost-cancel-{uuid.uuid4().hex[:8]}"
    dropped: list[bool] = []

    async def attempt() -> None:
        while True:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                if not dropped:  # the library swallows the first one
                    dropped.append(True)
                    continue
                raise

    async def main() -> None:
        r = aioredis.Redis.from_url(settings.redis_url)
        supervisor = Supervisor(r, settings, lambda *_: None)
        task = asyncio.ensure_future(attempt())
        job = ActiveJob(job_id, "owner", task)
        supervisor._jobs[job_id] = job  # one round at a time, without the renewals
        await r.set(keys.cancel_key(job_id), "1", ex=60)
        try:
            await supervisor._check(renew=False)
            await asyncio.sleep(0.01)
            assert job.cancel_requested and dropped and not task.done()
            await supervisor._check(renew=False)  # too soon to send it again
            await asyncio.sleep(0.01)
            assert not task.done()
            job.stopped_at -= RESTOP_AFTER_S  # as if the interval had passed
            await supervisor._check(renew=False)
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 5)
        finally:
            task.cancel()
            await r.delete(keys.cancel_key(job_id))
            await r.aclose()

    asyncio.run(main())


def test_a_renewal_that_reaches_redis_after_the_ending_leaves_the_running_index_alone(
    stack_env: dict[str, str],
) -> None:
    """A round's renewals are sent for the jobs running when it began: one may land after
    a job's FINISH. It must not put the ended job back in the running index."""
    settings = Settings.from_env(stack_env)
    job_id = f"late-renew-{uuid.uuid4().hex[:8]}"
    live_id = f"live-renew-{uuid.uuid4().hex[:8]}"

    async def main() -> tuple[list[tuple[int, int]], float | None, float | None]:
        r = aioredis.Redis.from_url(settings.redis_url)
        supervisor = Supervisor(r, settings, lambda *_: None)
        task = asyncio.ensure_future(asyncio.sleep(30))
        ended, live = ActiveJob(job_id, "owner", task), ActiveJob(live_id, "owner", task)
        try:
            # The ended job: its FINISH dropped the lease and took it out of the index.
            await r.zrem(keys.RUNNING_INDEX, job_id)
            # The live one: leased, indexed with an old deadline.
            await r.set(keys.lease_key(live_id), "owner", ex=60)
            await r.zadd(keys.RUNNING_INDEX, {live_id: 1.0})
            results = await supervisor._renew([ended, live])
            return (
                results,
                await r.zscore(keys.RUNNING_INDEX, job_id),
                await r.zscore(keys.RUNNING_INDEX, live_id),
            )
        finally:
            task.cancel()
            await r.zrem(keys.RUNNING_INDEX, job_id, live_id)
            await r.delete(keys.lease_key(live_id), keys.job_key(live_id), keys.job_key(job_id))
            await r.aclose()

    results, ended_score, live_score = asyncio.run(main())
    assert results == [(0, 0), (1, 0)]
    assert ended_score is None  # not put back
    assert live_score is not None and live_score > 1.0  # moved on to the new lease's end
