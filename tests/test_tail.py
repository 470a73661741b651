"""The multiplexed reader behind ``astream_events``: many tails, few connections.

Streams are written here directly (the worker's side is covered by the job-path
tests), so each case controls exactly which entries exist and when.
"""

from __future__ import annotations

import asyncio
import gc
import math
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from ops.stack import EmbeddedRedis
from producer import Client, InvalidInput, JobNotFound, JobTimeout, Settings, keys
from producer.tail import Tail, _Shard
from tests.helpers import SwallowsCancel, end_leftover

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


# -- resuming, closing, timeouts ---------------------------------------------------------


def _finish(r: redis.Redis, job_id: str) -> str:
    """What FINISH writes at the end: the done entry and its id in the record."""
    done = r.xadd(keys.events_key(job_id), {"type": "done", "status": "succeeded"}).decode()
    r.hset(keys.job_key(job_id), mapping={"status": "succeeded", "done_id": done})
    return done


def test_a_tail_resumed_at_or_past_the_done_entry_ends_at_once(client: Client) -> None:
    r = client.redis
    job_id = _new_job(r)
    r.xadd(keys.events_key(job_id), {"type": "token", "text": "a", "node": "n"})
    done = _finish(r, job_id)
    later = f"{int(done.split('-')[0]) + 1}-0"
    for after in (done, later):
        assert list(client.stream_events(job_id, after=after, timeout=5)) == []

    async def main() -> None:
        for after in (done, later):
            assert await _collect(client, job_id, after=after, timeout=5) == []
        # Just before the ending: the ending itself, as before.
        events = [e.type for e in await _collect(client, job_id, after="0", timeout=5)]
        assert events == ["start", "token", "done"]
        await client.aclose()

    asyncio.run(main())


def test_closing_the_client_ends_its_open_tails(client: Client) -> None:
    job_id = _new_job(client.redis)

    async def main() -> None:
        tails = [asyncio.create_task(_collect(client, job_id, timeout=30)) for _ in range(3)]
        await asyncio.sleep(0.3)  # subscribed, and the start entry read
        await client.aclose()
        results = await asyncio.wait_for(asyncio.gather(*tails, return_exceptions=True), 5)
        assert all(isinstance(x, redis.ConnectionError) for x in results), results
        assert "closed" in str(results[0])
        # The client serves the next tail on a fresh reader.
        _finish(client.redis, job_id)
        assert [e.type for e in await _collect(client, job_id, timeout=5)] == ["start", "done"]
        await client.aclose()

    asyncio.run(main())


def test_the_clients_of_loops_closed_without_aclose_are_let_go(client: Client) -> None:
    r = client.redis
    name = None
    for _ in range(5):
        job_id = _new_job(r)
        _finish(r, job_id)

        async def handler(job_id: str = job_id) -> str:
            nonlocal name
            name = client.tail.client_name
            return (await client.await_result(job_id, timeout=5)).status.value

        assert asyncio.run(handler()) == "succeeded"  # no aclose, as a careless handler
    assert len(client._tails) <= 1 and len(client._aredis) <= 1
    gc.collect()
    assert name is not None
    open_tails = sum(1 for c in r.client_list() if c.get("name", "").startswith("actorq-tail:"))
    assert open_tails <= 4  # at most the last loop's tail pool


def test_a_subscriber_joining_while_the_reader_starts_is_in_its_first_read(
    redis_target: Any,
) -> None:
    r = redis_target.client()
    quiet, busy = _new_job(r), _new_job(r)

    async def main() -> float:
        tail = Tail(redis_target.url)
        async with tail.subscribe(keys.events_key(quiet), "9999999999999-0"):
            await asyncio.sleep(0)  # the reader started and now awaits CLIENT ID
            started = asyncio.get_running_loop().time()
            async with tail.subscribe(keys.events_key(busy), "0") as sub:
                batch = await sub.get()
                took = asyncio.get_running_loop().time() - started
        await tail.aclose()
        assert batch and batch[0][1][:2] == ["type", "start"]
        return took

    assert asyncio.run(main()) < 0.5  # not a whole BLOCK (1 s) later


def _private_redis_client(
    server: EmbeddedRedis, socket_timeout: float, tracking: bool = True
) -> Client:
    return Client(
        Settings(
            redis_url=f"{server.url}?socket_timeout={socket_timeout}",
            broker_url=server.url,
            tail_tracking=tracking,
        )
    )


def test_a_read_cut_by_the_socket_timeout_fails_the_tail_and_repeats_nothing() -> None:
    """Polling: the blocked read is the one Redis's stall cuts (tracked reads don't block)."""
    server = EmbeddedRedis().start()  # its own: the test stalls it
    try:
        client = _private_redis_client(server, 0.5, tracking=False)
        r = redis.Redis.from_url(server.url)
        job_id = _new_job(r)
        stream = keys.events_key(job_id)

        async def main() -> None:
            got: list[Any] = []

            async def tail() -> None:
                async for event in client.astream_events(job_id, timeout=30):
                    got.append(event)

            task = asyncio.create_task(tail())
            await asyncio.sleep(0.3)
            await asyncio.to_thread(r.xadd, stream, {"type": "token", "text": "a", "node": "n"})
            await asyncio.sleep(0.1)
            # The reader's blocked read outlives socket_timeout + BLOCK while Redis stalls.
            await asyncio.to_thread(r.execute_command, "DEBUG", "SLEEP", "2")
            for i in range(3):
                await asyncio.to_thread(r.xadd, stream, {"type": "token", "text": f"{i}"})
            with pytest.raises(redis.TimeoutError):
                await asyncio.wait_for(task, 10)
            ids = [e.id for e in got]
            assert len(ids) == len(set(ids)) and [e.type for e in got][:2] == ["start", "token"]
            # The next tail reads the whole stream, each entry once.
            await asyncio.to_thread(_finish, r, job_id)
            events = await _collect(client, job_id, timeout=10)
            assert [e.text for e in events if e.type == "token"] == ["a", "0", "1", "2"]
            await client.aclose()

        asyncio.run(main())
        client.close()
        r.close()
    finally:
        server.cleanup()


def test_a_sync_tail_under_a_short_socket_timeout_waits_out_a_quiet_job() -> None:
    server = EmbeddedRedis().start()
    try:
        client = _private_redis_client(server, 0.4)
        r = redis.Redis.from_url(server.url)
        job_id = _new_job(r)
        with pytest.raises(JobTimeout):  # not redis.TimeoutError after 0.4 s
            list(client.stream_events(job_id, timeout=1.5))
        _finish(r, job_id)
        assert client.wait_result(job_id, timeout=5).status.value == "succeeded"
        client.close()
        r.close()
    finally:
        server.cleanup()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1, "5", True])
def test_a_bad_timeout_is_refused_naming_the_field(client: Client, bad: Any) -> None:
    job_id = _new_job(client.redis)
    with pytest.raises(InvalidInput) as sync_err:
        list(client.stream_events(job_id, timeout=bad))
    with pytest.raises(InvalidInput):
        client.wait_result(job_id, timeout=bad)

    async def main() -> None:
        with pytest.raises(InvalidInput) as async_err:
            await _collect(client, job_id, timeout=bad)
        assert async_err.value.field == "timeout"
        with pytest.raises(InvalidInput):
            await client.await_result(job_id, timeout=bad)
        await client.aclose()

    asyncio.run(main())
    assert sync_err.value.field == "timeout"


def test_a_reader_whose_last_tail_left_while_it_started_gives_its_connection_back(
    redis_target: Any,
) -> None:
    r = redis_target.client()
    job_id = _new_job(r)

    async def main() -> None:
        tail = Tail(redis_target.url)
        async with tail.subscribe(keys.events_key(job_id), "0"):
            await asyncio.sleep(0)  # the reader started: it awaits its CLIENT ID now
        shard = tail._shards[0]
        for _ in range(100):  # it stops, rather than wait for a subscriber
            if shard.task is None or shard.task.done():
                break
            await asyncio.sleep(0.01)
        assert shard.task is None or shard.task.done()
        await tail.aclose()

    asyncio.run(main())


def test_closing_a_tail_ends_a_reader_whose_cancel_a_library_swallowed(
    redis_target: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py can lose a cancellation that lands inside a command: ``aclose`` must
    still end the reader, not wait on it forever."""
    job_id = _new_job(redis_target.client())
    library = SwallowsCancel()

    async def read(self: _Shard, command: bytes, streams: dict[str, str]) -> Any:
        await library.call()  # the read in flight as the cancel lands
        return None

    monkeypatch.setattr(_Shard, "_read", read)

    async def main() -> bool:
        tail = Tail(redis_target.url)
        async with tail.subscribe(keys.events_key(job_id), "0"):
            await asyncio.wait_for(library.inside.wait(), 5)
            reader = tail._shards[0].task
            assert reader is not None
            try:
                await asyncio.wait_for(tail.aclose(), 5)
            finally:
                await end_leftover(reader)
        return reader.done()

    assert asyncio.run(main())
    assert library.swallowed, "the stand-in library did not swallow the cancel"
