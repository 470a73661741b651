"""Tracked tails: reads of only the streams Redis says changed, and what happens when
the invalidations stop (listener lost, tracking refused). Each case has a Redis of
its own: it watches every command, kills connections or changes ACLs.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from ops.stack import EmbeddedRedis
from producer import Client, Settings, keys
from tests.helpers import listener_epoch


@pytest.fixture
def server() -> Iterator[EmbeddedRedis]:
    s = EmbeddedRedis().start()
    try:
        yield s
    finally:
        s.cleanup()


def _client(server: EmbeddedRedis, tracking: bool = True) -> Client:
    return Client(Settings(redis_url=server.url, broker_url=server.url, tail_tracking=tracking))


def _jobs(r: redis.Redis, n: int) -> list[str]:
    ids = [f"trk-{uuid.uuid4().hex[:10]}" for _ in range(n)]
    pipe = r.pipeline(transaction=False)
    for job_id in ids:
        pipe.hset(keys.job_key(job_id), mapping={"status": "running"})
        pipe.xadd(keys.events_key(job_id), {"type": "start", "attempt": "1"})
    pipe.execute()
    return ids


def _write(r: redis.Redis, job_id: str, text: str) -> None:
    r.xadd(keys.events_key(job_id), {"type": "token", "text": text, "node": "n"})


def _finish(r: redis.Redis, job_ids: list[str]) -> None:
    pipe = r.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.xadd(keys.events_key(job_id), {"type": "done", "status": "succeeded"})
    pipe.execute()


async def _collect(client: Client, job_id: str) -> list[Any]:
    return [e async for e in client.astream_events(job_id, timeout=30)]


class _XreadWatch:
    """MONITOR in a thread: the number of streams named by each ``XREAD``."""

    def __init__(self, url: str) -> None:
        self.streams_per_read: list[int] = []
        self._stop = threading.Event()
        self._r = redis.Redis.from_url(url)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    def _run(self) -> None:
        with self._r.monitor() as m:
            self._ready.set()
            while not self._stop.is_set():
                args = m.next_command()["command"].split()
                if args and args[0].upper() == "XREAD":
                    names = args[[a.upper() for a in args].index("STREAMS") + 1 :]
                    self.streams_per_read.append(len(names) // 2)

    def __enter__(self) -> _XreadWatch:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._r.ping()  # one more command, so the monitor loop sees the stop
        self._thread.join(5)
        self._r.close()


@pytest.mark.parametrize("tracking", [True, False])
def test_a_tracked_tail_reads_only_the_streams_that_changed(
    server: EmbeddedRedis, tracking: bool
) -> None:
    """200 quiet tails and one busy one: tracked reads name the busy stream, not all 201."""
    r = redis.Redis.from_url(server.url)
    client = _client(server, tracking)
    quiet, (busy,) = _jobs(r, 200), _jobs(r, 1)

    async def main() -> tuple[list[Any], list[int], list[dict[str, Any]]]:
        tails = [asyncio.create_task(_collect(client, j)) for j in [*quiet, busy]]
        await asyncio.sleep(0.5)  # subscribed, start entries read
        with _XreadWatch(server.url) as watch:
            for i in range(40):
                await asyncio.to_thread(_write, r, busy, f"{i} ")
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.1)
        readers = await asyncio.to_thread(r.client_list)
        await asyncio.to_thread(_finish, r, [*quiet, busy])
        results = await asyncio.wait_for(asyncio.gather(*tails), 30)
        await client.aclose()
        return results[-1], watch.streams_per_read, readers

    got, per_read, readers = asyncio.run(main())
    client.close()
    assert "".join(e.text for e in got if e.type == "token") == "".join(f"{i} " for i in range(40))
    assert per_read, "no XREAD seen"
    if tracking:
        # Sweeps read every stream once a second; every other read names what changed.
        assert statistics.median(per_read) <= 3, per_read
        listener = [
            c for c in readers if "P" in c["flags"] and c.get("name", "").startswith("actorq-tail")
        ]
        tracked = [c for c in readers if "t" in c["flags"]]
        assert len(listener) == 1 and tracked
        assert all(c["redir"] == listener[0]["id"] for c in tracked)
    else:
        assert statistics.median(per_read) >= 50, per_read  # ~100 a reader: all of its streams
    r.close()


def test_tails_lose_nothing_when_the_invalidation_listener_is_killed(
    server: EmbeddedRedis,
) -> None:
    """Its connection killed: the readers poll, then track again under the new listener."""
    r = redis.Redis.from_url(server.url)
    client = _client(server)
    jobs = _jobs(r, 20)

    async def main() -> tuple[list[list[Any]], int, int | None]:
        tails = [asyncio.create_task(_collect(client, j)) for j in jobs]
        first = await listener_epoch(client, None, 5)
        assert first is not None
        for i in range(30):
            if i == 10:
                await asyncio.to_thread(r.client_kill_filter, _id=first)
            for j in jobs:
                await asyncio.to_thread(_write, r, j, f"{i} ")
            await asyncio.sleep(0.02)
        second = await listener_epoch(client, first, 10)
        # Entries after the new listener came: delivered by tracked reads again.
        for j in jobs:
            await asyncio.to_thread(_write, r, j, "30 ")
        await asyncio.to_thread(_finish, r, jobs)
        results = await asyncio.wait_for(asyncio.gather(*tails), 30)
        await client.aclose()
        return results, first, second

    results, first, second = asyncio.run(main())
    client.close()
    assert second is not None and second != first
    want = "".join(f"{i} " for i in range(31))
    for events in results:
        assert "".join(e.text for e in events if e.type == "token") == want
        assert [e.type for e in events][-1] == "done"
        assert len({e.id for e in events}) == len(events)
    r.close()


@pytest.mark.parametrize(
    "acl",
    [
        ("-client", "+client|id", "+client|setname", "+client|unblock"),  # no CLIENT TRACKING
        ("resetchannels",),  # no channel: the listener's SUBSCRIBE is refused
    ],
    ids=["no-client-tracking", "no-channels"],
)
def test_a_redis_that_refuses_tracking_is_polled(
    server: EmbeddedRedis, caplog: pytest.LogCaptureFixture, acl: tuple[str, ...]
) -> None:
    """An ACL (or a proxy) without what tracking needs: the tails poll, nothing is lost."""
    r = redis.Redis.from_url(server.url)
    r.execute_command("ACL", "SETUSER", "default", *acl)
    client = _client(server)
    jobs = _jobs(r, 10)

    async def main() -> list[list[Any]]:
        tails = [asyncio.create_task(_collect(client, j)) for j in jobs]
        for i in range(20):
            for j in jobs:
                await asyncio.to_thread(_write, r, j, f"{i} ")
            await asyncio.sleep(0.02)
        await asyncio.to_thread(_finish, r, jobs)
        results = await asyncio.wait_for(asyncio.gather(*tails), 30)
        assert client.tail.tracking_epoch is None
        await client.aclose()
        return results

    with caplog.at_level(logging.INFO, logger="actorq.tail"):
        results = asyncio.run(main())
    client.close()
    assert any("refused key tracking" in rec.getMessage() for rec in caplog.records)
    for events in results:
        assert "".join(e.text for e in events if e.type == "token") == "".join(
            f"{i} " for i in range(20)
        )
    r.close()


def test_a_listener_that_hears_nothing_reconnects(
    server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its PING unanswered (Redis stalled, or a silent network) for two intervals: a new listener."""
    from producer import tracking

    monkeypatch.setattr(tracking, "_PING_S", 0.2)
    r = redis.Redis.from_url(server.url)
    client = _client(server)
    (job,) = _jobs(r, 1)

    async def main() -> tuple[list[Any], int | None, int | None]:
        tail = asyncio.create_task(_collect(client, job))
        first = await listener_epoch(client, None, 5)
        await asyncio.to_thread(r.execute_command, "CLIENT", "PAUSE", "1500")
        second = await listener_epoch(client, first, 10)
        await asyncio.to_thread(_write, r, job, "after")
        await asyncio.to_thread(_finish, r, [job])
        events = await asyncio.wait_for(tail, 30)
        await client.aclose()
        return events, first, second

    events, first, second = asyncio.run(main())
    client.close()
    assert first is not None and second is not None and second != first
    assert [e.text for e in events if e.type == "token"] == ["after"]
    r.close()


@pytest.mark.parametrize("tracking", [True, False])
def test_a_key_that_is_not_a_stream_fails_only_its_own_tail(
    server: EmbeddedRedis, tracking: bool
) -> None:
    """Redis answers a whole multi-stream XREAD with WRONGTYPE: the reader finds the key."""
    r = redis.Redis.from_url(server.url)
    client = _client(server, tracking)
    good = _jobs(r, 3)
    r.hset(keys.job_key("trk-bad"), "status", "running")
    r.set(keys.events_key("trk-bad"), "not a stream")

    async def collect(job_id: str) -> list[Any] | BaseException:
        try:
            return await _collect(client, job_id)
        except Exception as exc:
            return exc

    async def main() -> list[list[Any] | BaseException]:
        tails = [asyncio.create_task(collect(j)) for j in good]
        await asyncio.sleep(0.3)
        tails.append(asyncio.create_task(collect("trk-bad")))
        await asyncio.sleep(0.3)
        for j in good:
            await asyncio.to_thread(_write, r, j, "after")
        await asyncio.to_thread(_finish, r, good)
        results = await asyncio.wait_for(asyncio.gather(*tails), 30)
        await client.aclose()
        return results

    *fine, bad = asyncio.run(main())
    client.close()
    assert isinstance(bad, redis.ResponseError) and "trk-bad" in str(bad) and "string" in str(bad)
    for events in fine:
        assert isinstance(events, list), events
        assert [e.type for e in events] == ["start", "token", "done"]
    r.close()
