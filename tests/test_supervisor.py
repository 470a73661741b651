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
