"""Every tail ends: at ``done``, at a cursor already past it, at its timeout, or
at the loop's own end; and one Client serves a threaded router.

Streams are written here directly, so each case controls which entries exist.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError

from producer import Client, JobTimeout, Settings, keys
from producer.sse import astream_sse, stream_sse
from tests.helpers import scripted
from tests.test_tail import _forget_jobs, _made  # noqa: F401  (the jobs made here, deleted)


def _job(r: redis.Redis, tokens: int = 1, done: bool = True) -> tuple[str, str | None]:
    """A job of ``tokens`` tokens, ended when ``done``; its id and its done entry's id."""
    job_id = f"ending-{uuid.uuid4().hex[:12]}"
    _made.append(job_id)
    r.hset(keys.job_key(job_id), mapping={"status": "running"})
    stream = keys.events_key(job_id)
    r.xadd(stream, {"type": "start", "attempt": "1"})
    for i in range(tokens):
        r.xadd(stream, {"type": "token", "text": f"t{i} ", "node": "n"})
    done_id = _end(r, job_id) if done else None
    for key in (keys.job_key(job_id), stream):
        r.expire(key, 600)
    return job_id, done_id


def _end(r: redis.Redis, job_id: str) -> str:
    done_id = r.xadd(keys.events_key(job_id), {"type": "done", "status": "succeeded"}).decode()
    r.hset(keys.job_key(job_id), mapping={"status": "succeeded", "done_id": done_id})
    return done_id


_LOOPS = """
import asyncio, sys
from producer import Client, Settings

client = Client(Settings.from_env())  # key tracking on, the default


async def once():
    return [e.type async for e in client.astream_events(sys.argv[1])]


for _ in range(5):
    assert asyncio.run(once()) == ["start", "token", "done"]
print("returned")
"""


def test_a_loop_whose_tails_all_ended_closes_though_it_never_closed_the_client(
    client: Client, stack_env: dict[str, str]
) -> None:
    """``asyncio.run`` per request, no ``aclose``: its one cancel of the tracking
    listener landed while redis-py connected, which swallowed it, and the loop hung.
    In a process of its own, bounded: each ``asyncio.run`` hung until the listener's
    next PING (~10 s); the five return in about a second."""
    job_id, _ = _job(client.redis)
    try:
        done = subprocess.run(
            [sys.executable, "-c", _LOOPS, job_id], env={**os.environ, **stack_env},
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("five asyncio.run of an ended job's tail took over 30 s")
    assert done.returncode == 0 and "returned" in done.stdout, done.stderr[-2000:]


def test_a_resume_at_or_past_done_ends_at_once_in_every_form(client: Client) -> None:
    job_id, done_id = _job(client.redis)
    assert done_id is not None
    assert list(client.stream_events(job_id, after=done_id)) == []
    frames = stream_sse(client, job_id, after=done_id, heartbeat_s=0.05, retry_ms=None)
    assert list(frames) == []  # the sync SSE stream sent heartbeats forever

    async def frames_async() -> list[str]:
        sse = astream_sse(client, job_id, after=done_id, heartbeat_s=0.05, retry_ms=None)
        return [f async for f in sse]

    assert asyncio.run(frames_async()) == []


def test_a_cursor_ahead_of_the_stream_ends_once_the_job_has(client: Client) -> None:
    """A client's Last-Event-ID from before a flush: past every entry there is, and
    past ``done`` once written. The tail ends then, not at its timeout (or never)."""
    r = client.redis
    job_id, _ = _job(r, done=False)
    ahead = f"{int(time.time() * 1000) + 3_600_000}-0"
    threading.Timer(0.5, _end, (r, job_id)).start()
    started = time.monotonic()
    assert list(client.stream_events(job_id, after=ahead, timeout=20)) == []
    synced = time.monotonic() - started

    async def tail() -> list[str]:
        return [e.type async for e in client.astream_events(job_id, after=ahead, timeout=20)]

    started = time.monotonic()
    assert asyncio.run(tail()) == []
    # Bounds, not timings: ended by the job's end (within an idle check), not at 20 s.
    assert synced < 10 and time.monotonic() - started < 10


def test_a_timeout_bounds_a_slowly_read_backlog_too(client: Client) -> None:
    job_id, _ = _job(client.redis, tokens=300)

    def read_slowly() -> int:
        n = 0
        for _ in client.stream_events(job_id, timeout=0.2):
            n += 1
            time.sleep(0.002)
        return n

    with pytest.raises(JobTimeout):
        read_slowly()

    async def read_slowly_async() -> None:
        async for _ in client.astream_events(job_id, timeout=0.2):
            await asyncio.sleep(0.002)

    with pytest.raises(JobTimeout):
        asyncio.run(read_slowly_async())


def test_aclose_ends_the_tails_still_starting(stack_env: dict[str, str]) -> None:
    """A tail between its first awaits and its subscription when the client closes
    raises ConnectionError, as a running one does; it does not restart the readers."""
    client = Client(Settings.from_env(stack_env))
    job_id, _ = _job(client.redis, done=False)

    async def main() -> list[BaseException]:
        async def tail() -> None:
            async for _ in client.astream_events(job_id, timeout=30):
                pass

        tails = [asyncio.ensure_future(tail()) for _ in range(20)]
        await asyncio.sleep(0)  # each is in its first await
        await client.aclose()
        results = await asyncio.wait_for(asyncio.gather(*tails, return_exceptions=True), 10)
        assert not client._tails
        return [r for r in results if isinstance(r, BaseException)]

    try:
        errors = asyncio.run(main())
        assert len(errors) == 20 and all(isinstance(e, RedisConnectionError) for e in errors)
    finally:
        client.close()


def test_one_client_serves_many_threads_from_its_first_call(stack_env: dict[str, str]) -> None:
    """A threaded router's first requests race to build the client's Celery app and
    Redis client: some failed with ImportError, and each built an app of its own."""
    queue = f"actorq-threads-{uuid.uuid4().hex[:8]}"
    client = Client(Settings.from_env({**stack_env, "ACTORQ_QUEUE": queue}))
    built: list[object] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def enqueue() -> None:
        barrier.wait()
        try:
            job_id = client.enqueue_actor_job(scripted("x"), "go")
            built.append(client.celery)
            client.cancel_job(job_id)
        except BaseException as exc:  # recorded: the assertion names it
            errors.append(exc)

    threads = [threading.Thread(target=enqueue) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors, errors
        assert len(built) == 8 and len({id(app) for app in built}) == 1
    finally:
        client.redis.delete(queue)
        client.close()


def test_a_settings_repr_masks_the_url_passwords() -> None:
    settings = Settings.from_env(
        {
            "REDIS_URL": "redis://user:S3cret-pw@h:6379/0",
            "CELERY_BROKER_URL": "amqp://guest:Br0ker-pw@h:5672//",
            "ACTORQ_SECRET_KEY": "k" * 44,
        }
    )
    shown = repr(settings)
    assert "S3cret-pw" not in shown and "Br0ker-pw" not in shown and "k" * 44 not in shown
    assert "redis://user:***@h:6379/0" in shown and "amqp://guest:***@h:5672//" in shown
