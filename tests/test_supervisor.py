"""The supervisor's stop of a running attempt survives a library that drops it."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from producer import Settings, keys, scripts
from tests.helpers import SwallowsCancel, end_leftover
from worker.supervisor import _RENEW_BATCH, RESTOP_AFTER_S, ActiveJob, Supervisor

#: A running-index deadline an hour from now: renewals move it nearer (to the
#: lease's end), and no sweeper of another worker takes it for a lost job.
_FAR = time.time() + 3600


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
            await supervisor._check()
            await asyncio.sleep(0.01)
            assert job.cancel_requested and dropped and not task.done()
            await supervisor._check()  # too soon to send it again
            await asyncio.sleep(0.01)
            assert not task.done()
            job.stopped_at -= RESTOP_AFTER_S  # as if the interval had passed
            await supervisor._check()
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
            # The live one: leased, indexed with a far deadline (a past one would be
            # swept by the suite's other workers, whose sweepers share the index).
            await r.set(keys.lease_key(live_id), "owner", ex=60)
            await r.zadd(keys.RUNNING_INDEX, {live_id: _FAR})
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
    assert live_score is not None and live_score < _FAR  # moved to the new lease's end


def test_a_renewal_keeps_the_stream_as_long_as_the_record(stack_env: dict[str, str]) -> None:
    """A run quiet for longer than the retention (a slow first token, a long tool) must
    not lose its stream's first entries while its record lives on."""
    settings = Settings.from_env(stack_env)
    job_id = f"quiet-renew-{uuid.uuid4().hex[:8]}"

    async def main() -> tuple[int, int]:
        r = aioredis.Redis.from_url(settings.redis_url)
        supervisor = Supervisor(r, settings, lambda *_: None)
        task = asyncio.ensure_future(asyncio.sleep(30))
        try:
            await r.set(keys.lease_key(job_id), "owner", ex=60)
            await r.hset(keys.job_key(job_id), "status", "running")
            await r.xadd(keys.events_key(job_id), {"type": "start", "attempt": "1"})
            for key in (keys.job_key(job_id), keys.events_key(job_id)):
                await r.expire(key, 5)  # about to lapse
            await r.zadd(keys.RUNNING_INDEX, {job_id: _FAR})
            assert await supervisor._renew([ActiveJob(job_id, "owner", task)]) == [(1, 0)]
            return await r.ttl(keys.job_key(job_id)), await r.ttl(keys.events_key(job_id))
        finally:
            task.cancel()
            await r.zrem(keys.RUNNING_INDEX, job_id)
            await r.delete(keys.lease_key(job_id), keys.job_key(job_id), keys.events_key(job_id))
            await r.aclose()

    record_ttl, stream_ttl = asyncio.run(main())
    assert record_ttl > 60 and stream_ttl > 60 and abs(record_ttl - stream_ttl) <= 1


def test_a_renewal_round_of_many_jobs_goes_out_in_batches(stack_env: dict[str, str]) -> None:
    """More jobs than one batch: each gets its own answer, in order, and the leases
    still held are renewed (their running-index deadline moved on)."""
    settings = Settings.from_env(stack_env)
    tag = uuid.uuid4().hex[:8]
    ids = [f"batch-renew-{tag}-{i}" for i in range(_RENEW_BATCH * 2 + 17)]

    async def main() -> tuple[Any, ...]:
        r = aioredis.Redis.from_url(settings.redis_url)
        supervisor = Supervisor(r, settings, lambda *_: None)
        task = asyncio.ensure_future(asyncio.sleep(30))
        jobs = [
            ActiveJob(job_id, "owner", task, usage=_usage_of(i)) for i, job_id in enumerate(ids)
        ]
        try:
            for i, job_id in enumerate(ids):
                if i % 2 == 0:  # odd ones lost their lease
                    await r.set(keys.lease_key(job_id), "owner", ex=600)
                    await r.zadd(keys.RUNNING_INDEX, {job_id: _FAR})
                    if i != 12:  # a held lease whose record is gone (deleted, evicted)
                        await r.hset(keys.job_key(job_id), "status", "running")
            await r.set(keys.cancel_key(ids[4]), "1", ex=60)
            results = await supervisor._renew(jobs)
            ttls = [await r.pttl(keys.lease_key(job_id)) for job_id in ids]
            scores = [await r.zscore(keys.RUNNING_INDEX, job_id) for job_id in ids]
            saved = [await r.hget(keys.job_key(job_id), "usage") for job_id in ids]
            return results, ttls, scores, saved
        finally:
            task.cancel()
            await r.zrem(keys.RUNNING_INDEX, *ids)
            for job_id in ids:
                await r.delete(keys.lease_key(job_id), keys.job_key(job_id))
            await r.delete(keys.cancel_key(ids[4]))
            await r.aclose()

    results, ttls, scores, saved = asyncio.run(main())
    assert results == [(int(i % 2 == 0), int(i == 4)) for i in range(len(ids))]
    # Each held lease saved its job's usage, when it had some; a snapshot that failed
    # saved nothing and renewed the lease all the same; a record that was gone is
    # not made anew.
    assert saved == [
        f"used {i}".encode() if i % 2 == 0 and i % 3 == 0 and i not in (6, 12) else None
        for i in range(len(ids))
    ]
    lease_ms = settings.lease_ttl_s * 1000
    assert all(0 < ttl <= lease_ms for ttl in ttls[::2])  # 600 s cut to the lease
    assert all(ttl == -2 for ttl in ttls[1::2])  # not re-created
    assert all(s is not None and s < _FAR for s in scores[::2])
    assert all(s is None for s in scores[1::2])


def _usage_of(i: int) -> Callable[[], str]:
    """Job ``i``'s usage snapshot: some have one, most nothing yet, job 6's fails."""

    def usage() -> str:
        if i == 6:
            raise RuntimeError("snapshot failed")
        return f"used {i}" if i % 3 == 0 else ""

    return usage


def test_one_failed_renewal_fails_the_round_not_the_others(stack_env: dict[str, str]) -> None:
    """A renewal Redis refuses (a key of the wrong type) fails the round, which the
    supervisor retries; the other jobs of the round are renewed all the same."""
    settings = Settings.from_env(stack_env)
    tag = uuid.uuid4().hex[:8]
    bad, good = f"bad-renew-{tag}", f"good-renew-{tag}"

    async def main() -> tuple[int, list[tuple[int, int]]]:
        r = aioredis.Redis.from_url(settings.redis_url)
        supervisor = Supervisor(r, settings, lambda *_: None)
        task = asyncio.ensure_future(asyncio.sleep(30))
        try:
            await r.hset(keys.lease_key(bad), "not", "a string")  # GET on it: WRONGTYPE
            await r.set(keys.lease_key(good), "owner", ex=600)
            jobs = [ActiveJob(bad, "owner", task), ActiveJob(good, "owner", task)]
            with pytest.raises(ResponseError, match="WRONGTYPE"):
                await supervisor._renew(jobs)
            renewed_ttl = await r.pttl(keys.lease_key(good))
            await r.delete(keys.lease_key(bad))
            return renewed_ttl, await supervisor._renew(jobs)  # the next round works
        finally:
            task.cancel()
            await r.zrem(keys.RUNNING_INDEX, bad, good)
            await r.delete(keys.lease_key(bad), keys.lease_key(good))
            await r.aclose()

    renewed_ttl, again = asyncio.run(main())
    assert 0 < renewed_ttl <= settings.lease_ttl_s * 1000
    assert again == [(0, 0), (1, 0)]


# -- sweeping: a lost job is sent again, whatever happens around the send --------------


class _Clock:
    """The sweeper's clock, ``ahead`` seconds past this machine's. The running index is
    one key for every worker on this Redis: entries due only this far ahead are this
    test's, never the live workers' sweeps'."""

    monotonic = staticmethod(time.monotonic)

    def __init__(self, ahead: float) -> None:
        self.ahead = ahead

    def time(self) -> float:
        return time.time() + self.ahead


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    c = _Clock(600)
    monkeypatch.setattr("worker.supervisor.time", c)
    return c


class _Sweeping:
    """This test's Redis, settings and the jobs it wrote (forgotten after it)."""

    def __init__(self, stack_env: dict[str, str]) -> None:
        self.settings = Settings.from_env(stack_env)
        self.r = redis.Redis.from_url(self.settings.redis_url)
        self.made: list[str] = []

    def running(self, job_id: str, due: float, lease_s: int = 0) -> None:
        """A job as a claim leaves it, its lease ``lease_s`` long (0: its worker is gone)."""
        r = self.r
        self.made.append(job_id)
        r.hset(keys.job_key(job_id), mapping={"status": "running", "queue": "q", "actor": "a"})
        r.expire(keys.job_key(job_id), 600)
        if lease_s:
            r.set(keys.lease_key(job_id), "owner", ex=lease_s)
        r.zadd(keys.RUNNING_INDEX, {job_id: due})

    def sweep(self, sent: list[str], on_send: Any = None) -> int:
        def requeue(job_id: str, queue: str, actor: str) -> None:
            sent.append(job_id)
            if on_send is not None:
                on_send(job_id)

        async def main() -> int:
            r = aioredis.Redis.from_url(self.settings.redis_url)
            try:
                return await Supervisor(r, self.settings, requeue).sweep()
            finally:
                await r.aclose()

        return asyncio.run(main())


@pytest.fixture
def sweeping(stack_env: dict[str, str], clock: _Clock) -> Iterator[_Sweeping]:
    s = _Sweeping(stack_env)
    yield s
    for job_id in s.made:
        s.r.delete(keys.job_key(job_id), keys.lease_key(job_id))
    if s.made:
        s.r.zrem(keys.RUNNING_INDEX, *s.made)
    s.r.close()


def test_an_attempt_that_claims_the_resent_job_before_the_send_returns_stays_indexed(
    sweeping: _Sweeping,
) -> None:
    r = sweeping.r
    job_id = f"sweep-claimed-{uuid.uuid4().hex[:8]}"
    sweeping.running(job_id, due=time.time() + 300)

    def claimed_at_once(job: str) -> None:  # a worker took the message as it was sent
        r.hset(keys.job_key(job), "status", "running")
        r.set(keys.lease_key(job), "owner-2", ex=60)
        r.zadd(keys.RUNNING_INDEX, {job: _FAR})

    sent: list[str] = []
    assert sweeping.sweep(sent, claimed_at_once) == 1 and sent == [job_id]
    assert r.zscore(keys.RUNNING_INDEX, job_id) == _FAR  # the new attempt's entry


def test_a_requeue_whose_message_never_went_out_is_sent_by_a_later_sweep(
    sweeping: _Sweeping, clock: _Clock
) -> None:
    r, ttl = sweeping.r, sweeping.settings.lease_ttl_s
    job_id = f"sweep-unsent-{uuid.uuid4().hex[:8]}"
    sweeping.running(job_id, due=time.time() + 300)
    # A sweeper requeued it, then died (or lost Redis) before sending its message.
    job_keys = scripts.running_job_keys(job_id)
    r.eval(scripts.REQUEUE, 5, *job_keys, f"{clock.time():.6f}", ttl, job_id)
    assert r.hget(keys.job_key(job_id), "status") == b"queued"
    sent: list[str] = []
    assert sweeping.sweep(sent) == 0  # not due yet: that sweeper may still send it
    clock.ahead += ttl + 1
    assert sweeping.sweep(sent) == 1 and sent == [job_id]
    assert r.zscore(keys.RUNNING_INDEX, job_id) is None  # sent: out of the index
    assert sweeping.sweep(sent) == 0 and sent == [job_id]


def test_entries_of_live_attempts_do_not_crowd_a_lost_job_out_of_the_sweeps(
    sweeping: _Sweeping, clock: _Clock
) -> None:
    tag = uuid.uuid4().hex[:8]
    # More live attempts than a sweep looks at, indexed in the past (their worker's
    # clock runs behind), and one lost job after them.
    live = [f"sweep-live-{tag}-{i}" for i in range(110)]
    for i, job_id in enumerate(live):
        sweeping.running(job_id, due=time.time() + 100 + i / 1000, lease_s=120)
    lost = f"sweep-lost-{tag}"
    sweeping.running(lost, due=time.time() + 200)
    sent: list[str] = []
    rounds = 0
    while not sent and rounds < 3:
        sweeping.sweep(sent)
        rounds += 1
    assert sent == [lost] and rounds == 2
    for job_id in live:  # moved to their lease's end
        score = sweeping.r.zscore(keys.RUNNING_INDEX, job_id)
        assert score is not None and score > clock.time() + 60


def test_each_lease_is_renewed_on_its_own_clock(stack_env: dict[str, str]) -> None:
    """A round renews the leases that fell due (lease/3 after the claim or the last
    renewal) and leaves the others alone: jobs started apart are renewed apart."""
    settings = Settings.from_env(stack_env)
    tag = uuid.uuid4().hex[:8]
    due_id, fresh_id, lost_id = (f"clock-{tag}-{n}" for n in ("due", "fresh", "lost"))

    async def main() -> tuple[int, int, bool, bool, float]:
        r = aioredis.Redis.from_url(settings.redis_url)
        supervisor = Supervisor(r, settings, lambda *_: None)
        tasks = [asyncio.ensure_future(asyncio.sleep(30)) for _ in range(3)]
        long_ago = time.monotonic() - settings.lease_ttl_s  # past lease/3
        due = ActiveJob(due_id, "owner", tasks[0], renewed_at=long_ago)
        fresh = ActiveJob(fresh_id, "owner", tasks[1])
        lost = ActiveJob(lost_id, "owner", tasks[2], renewed_at=long_ago)
        try:
            for job in (due, fresh):
                await r.set(keys.lease_key(job.job_id), "owner", ex=600)
                await r.zadd(keys.RUNNING_INDEX, {job.job_id: _FAR})
            for job in (due, fresh, lost):
                supervisor._jobs[job.job_id] = job
            await supervisor._check()
            await asyncio.sleep(0)
            return (
                await r.pttl(keys.lease_key(due_id)),
                await r.pttl(keys.lease_key(fresh_id)),
                lost.lease_lost and tasks[2].cancelled(),
                fresh.lease_lost or due.lease_lost,
                due.renewed_at - long_ago,
            )
        finally:
            for task in tasks:
                task.cancel()
            await r.zrem(keys.RUNNING_INDEX, due_id, fresh_id, lost_id)
            await r.delete(*(keys.lease_key(j) for j in (due_id, fresh_id, lost_id)))
            await r.aclose()

    due_ttl, fresh_ttl, lost_stopped, wrongly_lost, moved = asyncio.run(main())
    assert 0 < due_ttl <= settings.lease_ttl_s * 1000  # renewed: cut to the lease
    assert fresh_ttl > settings.lease_ttl_s * 1000  # not due: untouched
    assert lost_stopped and not wrongly_lost
    assert moved >= settings.lease_ttl_s  # its clock moved to this round


def test_a_supervisor_ends_on_one_cancel_though_a_library_swallowed_it(
    stack_env: dict[str, str],
) -> None:
    """redis-py can lose a cancellation that lands inside a command. The one cancel
    asyncio.run sends at its end must still end the supervisor: a task that loops
    on keeps the loop from ever closing. ``stop`` ends it too."""
    settings = Settings.from_env(stack_env)
    job_id = f"swallow-{uuid.uuid4().hex[:8]}"
    library = SwallowsCancel()

    async def main() -> tuple[bool, bool, bool]:
        r = aioredis.Redis.from_url(settings.redis_url)
        real_mget = r.mget

        async def mget(names: list[str]) -> Any:
            await library.call()  # the command in flight as the cancel lands
            return await real_mget(names)

        r.mget = mget  # type: ignore[method-assign]
        idle = asyncio.ensure_future(asyncio.sleep(30))
        runners: list[asyncio.Task[None]] = []
        try:
            ended = []
            for how in ("cancel", "stop"):
                library.inside.clear()
                supervisor = Supervisor(r, settings, lambda *_: None, poll_s=0.01, sweep_s=3600)
                supervisor._jobs[job_id] = ActiveJob(job_id, "owner", idle)  # not due: flags only
                supervisor.start()
                runner = supervisor._runner
                assert runner is not None
                runners.append(runner)
                await asyncio.wait_for(library.inside.wait(), 5)
                if how == "cancel":
                    runner.cancel()
                    await asyncio.wait({runner}, timeout=5)
                else:
                    await asyncio.wait_for(supervisor.stop(), 5)
                ended.append(runner.cancelled())
            return ended[0], ended[1], library.swallowed == 2
        finally:
            idle.cancel()
            for t in runners:
                await end_leftover(t)
            await r.aclose()

    by_cancel, by_stop, both_swallowed = asyncio.run(main())
    assert both_swallowed, "the stand-in library did not swallow the cancels"
    assert by_cancel and by_stop
