"""The multiplexed reader behind ``astream_events``: many tails, few connections.

Streams are written here directly (the worker's side is covered by the job-path
tests), so each case controls exactly which entries exist and when.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from producer import Client, InvalidInput, JobNotFound, JobTimeout, keys
from producer.tail import Tail

_made: list[str] = []  # jobs written here directly: deleted after each test


@pytest.fixture(autouse=True)
def _forget_jobs(client: Client) -> Iterator[None]:
    yield
    while _made:
        job_id = _made.pop()
        client.redis.delete(keys.job_key(job_id), keys.events_key(job_id))


def _new_job(r: redis.Redis, stream: bool = True) -> str:
    job_id = f"tail-{uuid.uuid4().hex[:12]}"
    _made.append(job_id)
    r.hset(keys.job_key(job_id), mapping={"status": "running"})
    r.expire(keys.job_key(job_id), 600)
    if stream:
        r.xadd(keys.events_key(job_id), {"type": "start", "attempt": "1"})
        r.expire(keys.events_key(job_id), 600)
    return job_id


def _tail_clients(r: redis.Redis, name: str) -> int:
    return sum(1 for c in r.client_list() if c.get("name") == name)


async def _collect(client: Client, job_id: str, after: str = "0", timeout: float = 30) -> list[Any]:
    return [e async for e in client.astream_events(job_id, after=after, timeout=timeout)]


def test_many_tails_share_a_few_connections(client: Client) -> None:
    r = client.redis
    n_jobs, n_tokens = 400, 8
    jobs = [_new_job(r) for _ in range(n_jobs)]
    peak = 0

    async def write() -> None:
        nonlocal peak
        for i in range(n_tokens):
            pipe = r.pipeline(transaction=False)
            for job in jobs:
                pipe.xadd(keys.events_key(job), {"type": "token", "text": f"t{i} ", "node": "a"})
            await asyncio.to_thread(pipe.execute)
            peak = max(peak, await asyncio.to_thread(_tail_clients, r, client.tail.client_name))
            await asyncio.sleep(0.02)
        pipe = r.pipeline(transaction=False)
        for job in jobs:
            pipe.xadd(keys.events_key(job), {"type": "done", "status": "succeeded"})
        await asyncio.to_thread(pipe.execute)

    async def main() -> list[list[Any]]:
        tails = [asyncio.create_task(_collect(client, job)) for job in jobs]
        await asyncio.sleep(0.2)  # every tail has subscribed and replayed its start entry
        await write()
        results = await asyncio.wait_for(asyncio.gather(*tails), 60)
        assert 1 <= client.tail.connections <= 4
        await client.aclose()
        return results

    results = asyncio.run(main())
    assert 1 <= peak <= 4
    for events in results:
        assert [e.type for e in events] == ["start"] + ["token"] * n_tokens + ["done"]
        assert "".join(e.text for e in events) == "".join(f"t{i} " for i in range(n_tokens))
        ids = [e.id for e in events]
        assert len(set(ids)) == len(ids)


def test_resume_gets_each_later_entry_once(client: Client) -> None:
    r = client.redis
    job = _new_job(r)
    for i in range(10):
        r.xadd(keys.events_key(job), {"type": "token", "text": str(i)})

    async def main() -> tuple[list[Any], list[Any], list[Any]]:
        stream = client.astream_events(job, timeout=30)
        first = [await anext(stream) for _ in range(5)]
        await stream.aclose()
        # Resume live: the rest and the ending arrive after the resumed tail subscribed.
        resumed = asyncio.create_task(_collect(client, job, after=first[-1].id))
        await asyncio.sleep(0.1)
        for i in range(10, 13):
            r.xadd(keys.events_key(job), {"type": "token", "text": str(i)})
        r.xadd(keys.events_key(job), {"type": "done", "status": "succeeded"})
        rest = await asyncio.wait_for(resumed, 30)
        again = await _collect(client, job)
        await client.aclose()
        return first, rest, again

    first, rest, again = asyncio.run(main())
    assert [e.text for e in first] == ["", "0", "1", "2", "3"]
    assert [e.text for e in rest] == [str(i) for i in range(4, 13)] + [""]
    assert rest[-1].terminal
    assert [e.id for e in again] == [e.id for e in first] + [e.id for e in rest]


def test_two_tails_of_one_stream_at_different_cursors(client: Client) -> None:
    r = client.redis
    job = _new_job(r)
    ids = [
        r.xadd(keys.events_key(job), {"type": "token", "text": str(i)}).decode() for i in range(6)
    ]

    async def main() -> tuple[list[Any], list[Any]]:
        early = asyncio.create_task(_collect(client, job, after=ids[4]))
        await asyncio.sleep(0.1)
        late = asyncio.create_task(_collect(client, job, after="0"))  # joins an in-flight read
        await asyncio.sleep(0.1)
        r.xadd(keys.events_key(job), {"type": "done", "status": "succeeded"})
        out = await asyncio.wait_for(asyncio.gather(early, late), 30)
        await client.aclose()
        return out[0], out[1]

    early, late = asyncio.run(main())
    assert [e.text for e in early] == ["5", ""]
    assert [e.text for e in late] == ["", *map(str, range(6)), ""]


def test_unknown_job_and_timeout(client: Client) -> None:
    r = client.redis
    silent = _new_job(r, stream=False)  # queued, nothing written yet

    async def main() -> None:
        with pytest.raises(JobNotFound):
            await _collect(client, "no-such-job-" + uuid.uuid4().hex[:6])
        with pytest.raises(JobTimeout):
            await _collect(client, silent, timeout=0.5)
        await client.aclose()

    asyncio.run(main())


def test_slow_consumer_is_paused_and_loses_nothing(redis_target: Any) -> None:
    r = redis_target.client()
    job = _new_job(r)
    stream = keys.events_key(job)

    async def main() -> list[str]:
        tail = Tail(redis_target.url, max_connections=2, high_water=2)
        got: list[str] = []
        async with tail.subscribe(stream, "0") as sub:
            for i in range(40):  # forty separate reads' worth while nobody consumes
                r.xadd(stream, {"type": "token", "text": str(i)})
                await asyncio.sleep(0.005)
            assert sub.paused  # the reader stopped filling this queue
            while len(got) < 41:
                async with asyncio.timeout(10):
                    batch = await sub.get()
                got += [dict(zip(f[::2], f[1::2], strict=True)).get("text", "") for _, f in batch]
        await tail.aclose()
        return got

    got = asyncio.run(main())
    r.close()
    assert got == ["", *map(str, range(40))]


def test_a_bad_cursor_is_refused_before_it_reaches_a_shared_read(client: Client) -> None:
    """An id above 2**64 or with non-ASCII digits is its caller's input error only."""
    r = client.redis
    job_id = _new_job(r)

    async def main() -> list[Any]:
        live = asyncio.create_task(_collect(client, job_id, timeout=30))
        await asyncio.sleep(0.1)  # the live tail is blocked in the shared XREAD now
        for bad in (str(2**64), f"1-{2**64}", "\u0661", "1\u00b2"):
            with pytest.raises(InvalidInput) as err:
                await _collect(client, job_id, after=bad, timeout=5)
            assert err.value.field == "after"
            with pytest.raises(InvalidInput):
                next(iter(client.stream_events(job_id, after=bad, timeout=5)))
        r.xadd(keys.events_key(job_id), {"type": "done", "status": "succeeded"})
        events = await asyncio.wait_for(live, 30)
        await client.aclose()
        return events

    assert [e.type for e in asyncio.run(main())] == ["start", "done"]


def test_a_shard_packs_its_read_as_redis_py_would_and_follows_moved_cursors() -> None:
    """The hand-packed XREAD: the same bytes as redis-py's packing, cursors re-encoded once moved."""
    import redis.connection

    from producer import tail as tail_module
    from producer.tail import Subscription, _Shard

    pack = redis.connection.Connection().pack_command

    def expected(block: bool, streams: dict[str, str]) -> bytes:
        args: list[Any] = ["XREAD", "COUNT", tail_module._COUNT]
        if block:
            args += ["BLOCK", tail_module._BLOCK_MS]
        return b"".join(pack(*args, "STREAMS", *streams, *streams.values()))

    async def main() -> None:
        tail = Tail("redis://127.0.0.1:1/0")  # never connects: only the packing is looked at
        shard = _Shard(tail)
        a, b_behind, b_ahead, c = (
            Subscription("s:a", "5-0"),
            Subscription("s:b", "9-1"),
            Subscription("s:b", "10-0"),
            Subscription("s:ć", "0"),
        )
        c.paused = True
        for sub in (a, b_behind, b_ahead, c):
            shard.subs.setdefault(sub.stream, []).append(sub)
        for block in (True, False):
            streams, command = shard._read_set(block)
            # Two tails of one stream: read from the one further behind; a paused one: left out.
            assert streams == {"s:a": "5-0", "s:b": "9-1"}
            assert command == expected(block, streams)
        a.cursor, c.paused = "7-3", False
        streams, command = shard._read_set(False)
        assert streams == {"s:a": "7-3", "s:b": "9-1", "s:ć": "0"}
        assert command == expected(False, streams)

    asyncio.run(main())
