"""The publisher on a real Redis: no entry of one job is lost because of another's."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio
import redis.asyncio.connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from producer import Client, JobStatus, Settings, keys, scripts
from tests.conftest import RedisTarget
from tests.helpers import scripted
from worker.jobs import JobRunner
from worker.publisher import JobChannel, Publisher, _encode_arg


def test_an_unencodable_token_loses_nothing_of_its_own_job_or_its_pipeline_neighbours(
    redis_target: RedisTarget, stack_env: dict[str, str]
) -> None:
    queue = f"actorq-pub-{uuid.uuid4().hex[:6]}"
    settings = Settings.from_env({**stack_env, "ACTORQ_QUEUE": queue})
    client = Client(settings)
    good, odd = (client.enqueue_actor_job(scripted("x"), "go") for _ in range(2))

    async def main() -> None:
        runner = JobRunner(settings, lambda *a: None)
        for job_id in (good, odd):
            assert await runner._claim(job_id, f"owner-{job_id}") is not None
        pub = runner.publisher
        ch_good, ch_odd = (pub.open(j, f"owner-{j}") for j in (good, odd))
        pub.publish(ch_good, ["type", "token", "text", "A", "node", "n"])
        await pub.drain(ch_good)
        # One pipeline: a normal token beside one a broken model could send (a lone
        # surrogate has no UTF-8 form).
        pub.publish(ch_good, ["type", "token", "text", "B", "node", "n"])
        pub.publish(ch_odd, ["type", "token", "text", "\ud83d!", "node", "n"])
        pub.publish(ch_good, ["type", "token", "text", "C", "node", "n"])
        await asyncio.wait_for(pub.drain(ch_good), 10)
        await asyncio.wait_for(pub.drain(ch_odd), 10)
        await runner.aclose()

    try:
        asyncio.run(main())
        r = redis_target.client()

        def texts(job_id: str) -> list[str]:
            entries = r.xrange(keys.events_key(job_id))
            return [f[b"text"].decode() for _, f in entries if f[b"type"] == b"token"]

        assert texts(good) == ["A", "B", "C"]
        assert texts(odd) == ["?!"]  # replaced, not dropped, and nothing else lost
    finally:
        for job_id in (good, odd):
            client.cancel_job(job_id)
        # Claimed here and never finished: out of the running index, or a live
        # worker's sweeper would send them to this queue again once their leases lapse.
        client.redis.zrem(keys.RUNNING_INDEX, good, odd)
        client.redis.delete(queue)
        client.close()


class _FreezableProxy:
    """A TCP proxy to Redis whose open connections can be frozen: bytes go nowhere.

    A frozen connection stays open, like one to a Redis host that stopped
    answering without closing the socket; connections made later pass through.
    """

    def __init__(self, target_url: str) -> None:
        self._target = redis.asyncio.connection.parse_url(target_url)
        self._pumps: list[tuple[asyncio.Task[None], dict[str, bool]]] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(
            self._target.get("host", "127.0.0.1"), self._target.get("port", 6379)
        )
        requests, replies = {"frozen": False}, {"frozen": False}

        async def pump(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, state: dict[str, bool]
        ) -> None:
            while data := await src.read(65536):
                if not state["frozen"]:
                    dst.write(data)
            dst.close()

        for src, dst, state in ((reader, up_writer, requests), (up_reader, writer, replies)):
            self._pumps.append((asyncio.ensure_future(pump(src, dst, state)), state))

    def freeze_open_connections(self, *, replies_only: bool = False) -> None:
        """Bytes either way go nowhere; ``replies_only``: Redis still gets (and runs)
        what is sent, but its replies never come back."""
        for i, (_, state) in enumerate(self._pumps):
            if not replies_only or i % 2:
                state["frozen"] = True

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task, _ in self._pumps:
            task.cancel()


@contextlib.asynccontextmanager
async def _behind_proxy(
    redis_target: RedisTarget, settings: Settings
) -> AsyncIterator[tuple[Publisher, _FreezableProxy]]:
    """A publisher whose connections pass a freezable proxy (socket timeout 0.5 s)."""
    db = redis.asyncio.connection.parse_url(redis_target.url).get("db", 0)
    proxy = _FreezableProxy(redis_target.url)
    await proxy.start()
    client = redis.asyncio.Redis(host="127.0.0.1", port=proxy.port, db=db, socket_timeout=0.5)
    try:
        yield Publisher(client, settings), proxy
    finally:
        await client.aclose()
        await proxy.close()


@pytest.fixture
def leased_job(redis_target: RedisTarget) -> Iterator[tuple[str, Any]]:
    """A job id whose lease ``owner`` holds, and a client; its keys go at the end."""
    job = f"pub-{uuid.uuid4().hex[:8]}"
    r = redis_target.client()
    r.set(keys.lease_key(job), "owner", ex=60)
    yield job, r
    r.delete(keys.lease_key(job), keys.events_key(job), keys.job_key(job))
    r.close()


def test_a_pipeline_redis_never_answers_is_cut_and_sent_again_once(
    redis_target: RedisTarget,
    stack_env: dict[str, str],
    leased_job: tuple[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    job, r = leased_job

    async def main() -> float:
        async with _behind_proxy(redis_target, Settings.from_env(stack_env)) as (pub, proxy):
            ch = pub.open(job, "owner")
            pub.publish(ch, ["type", "token", "text", "A", "node", "n"])
            await asyncio.wait_for(pub.drain(ch), 10)
            proxy.freeze_open_connections()
            t0 = time.monotonic()
            pub.publish(ch, ["type", "token", "text", "B", "node", "n"])
            cut = pub.run_script("return ARGV[1]", [], ["cut"])  # in the same pipeline as B
            await asyncio.wait_for(pub.drain(ch), 10)
            took = time.monotonic() - t0
            # The call's reply was lost with the connection: its caller hears so, and
            # decides (a script may have run); the next call goes through.
            with pytest.raises(RedisConnectionError):
                await asyncio.wait_for(cut, 10)
            assert await asyncio.wait_for(pub.run_script("return ARGV[1]", [], ["ok"]), 10) == b"ok"
            return took

    with caplog.at_level(logging.WARNING, logger="actorq.publisher"):
        took = asyncio.run(main())
    entries = r.xrange(keys.events_key(job))
    assert [f[b"text"] for _, f in entries] == [b"A", b"B"]  # B once, after A
    assert took >= 0.5  # waited out the timeout, then went through a new connection
    assert any("unanswered" in rec.getMessage() for rec in caplog.records)


def test_a_batch_redis_ran_but_whose_reply_was_lost_is_not_written_twice(
    redis_target: RedisTarget, stack_env: dict[str, str], leased_job: tuple[str, Any]
) -> None:
    """The pipeline is sent again on a new connection; its PUBLISH then counts what
    the first try wrote (the stream's entries past the attempt's start): no token
    doubles."""
    job, r = leased_job

    async def main() -> None:
        async with _behind_proxy(redis_target, Settings.from_env(stack_env)) as (pub, proxy):
            ch = pub.open(job, "owner")
            pub.publish_token(ch, "A", "n")
            await asyncio.wait_for(pub.drain(ch), 10)
            proxy.freeze_open_connections(replies_only=True)
            pub.publish_token(ch, "B", "n")
            pub.publish_token(ch, "C", "n")
            await asyncio.wait_for(pub.drain(ch), 10)
            assert not ch.verify  # the retry's reply came: next_seq is what Redis holds
            pub.publish_token(ch, "D", "n")
            await asyncio.wait_for(pub.drain(ch), 10)

    asyncio.run(main())
    entries = r.xrange(keys.events_key(job))
    assert [f[b"text"] for _, f in entries] == [b"A", b"B", b"C", b"D"]
    assert not r.exists(keys.job_key(job))  # nothing stored per call


def test_a_pipeline_of_many_jobs_fences_and_writes_each_job_on_its_own(
    redis_target: RedisTarget, stack_env: dict[str, str]
) -> None:
    """150 jobs share pipelines (several PUBLISH calls each): the one whose lease is
    gone is refused, every other gets its own entries, and a stream made by PUBLISH
    gets the retention TTL while one CLAIM made keeps its own."""
    tag = uuid.uuid4().hex[:8]
    jobs = [f"pub-many-{tag}-{i}" for i in range(150)]
    lost, claimed = jobs[70], jobs[5]
    settings = Settings.from_env(stack_env)
    r = redis_target.client()
    for job in jobs:
        if job != lost:
            r.set(keys.lease_key(job), f"owner-{job}", ex=60)
    r.xadd(keys.events_key(claimed), {"type": "start", "attempt": "1"})
    r.expire(keys.events_key(claimed), 5000)

    async def main() -> list[JobChannel]:
        client = redis.asyncio.Redis.from_url(settings.redis_url)
        pub = Publisher(client, settings)
        channels = [pub.open(job, f"owner-{job}") for job in jobs]
        try:
            for i in range(3):
                for ch in channels:
                    pub.publish_token(ch, f"{ch.job_id}:{i}", "n")
            for ch in channels:
                await asyncio.wait_for(pub.drain(ch), 10)
        finally:
            await client.aclose()
        return channels

    try:
        channels = asyncio.run(main())
        for ch in channels:
            texts = [f.get(b"text", b"").decode() for _, f in r.xrange(keys.events_key(ch.job_id))]
            if ch.job_id == lost:
                assert ch.lost and texts == []
                continue
            assert not ch.lost and ch.published == 3
            assert texts[-3:] == [f"{ch.job_id}:{i}" for i in range(3)]
        assert 4000 < r.ttl(keys.events_key(claimed)) <= 5000
        assert settings.retention_s - 60 < r.ttl(keys.events_key(jobs[0])) <= settings.retention_s
    finally:
        for job in jobs:
            r.delete(keys.lease_key(job), keys.events_key(job), keys.job_key(job))
        r.close()


def test_a_job_whose_stream_key_is_of_another_type_fails_alone(
    redis_target: RedisTarget, stack_env: dict[str, str]
) -> None:
    """Redis refuses one job's writes for good (WRONGTYPE): that job stops with the
    error, and the job beside it in the same PUBLISH call streams on."""
    tag = uuid.uuid4().hex[:8]
    good, bad = f"pub-good-{tag}", f"pub-bad-{tag}"
    settings = Settings.from_env(stack_env)
    r = redis_target.client()
    for job in (good, bad):
        r.set(keys.lease_key(job), "owner", ex=60)
    r.set(keys.events_key(bad), "not a stream")

    async def main() -> tuple[JobChannel, JobChannel]:
        client = redis.asyncio.Redis.from_url(settings.redis_url)
        pub = Publisher(client, settings)
        ok, broken = pub.open(good, "owner"), pub.open(bad, "owner")
        try:
            pub.publish_token(broken, "x", "n")
            pub.publish_token(ok, "a", "n")
            await asyncio.wait_for(pub.drain(ok), 10)
            await asyncio.wait_for(pub.drain(broken), 10)
            assert pub.publish_token(broken, "y", "n")  # stopped: nothing more is queued
            assert not pub.publish_token(ok, "b", "n")
            await asyncio.wait_for(pub.drain(ok), 10)
        finally:
            await client.aclose()
        return ok, broken

    try:
        ok, broken = asyncio.run(main())
        assert broken.failed is not None and "WRONGTYPE" in broken.failed
        assert ok.failed is None and ok.published == 2
        assert [f[b"text"] for _, f in r.xrange(keys.events_key(good))] == [b"a", b"b"]
        assert r.get(keys.events_key(bad)) == b"not a stream"
    finally:
        for job in (good, bad):
            r.delete(keys.lease_key(job), keys.events_key(job), keys.job_key(job))
        r.close()


def test_a_job_whose_events_key_is_not_a_stream_ends_failed_and_stays_ended(
    redis_target: RedisTarget, stack_env: dict[str, str]
) -> None:
    """At claim (its key broken while it queued) or at its ending (broken while it ran):
    the record is written without a done entry, and the job is not run or sent again."""
    from producer import ActorResult

    queue = f"actorq-pub-{uuid.uuid4().hex[:6]}"
    settings = Settings.from_env({**stack_env, "ACTORQ_QUEUE": queue})
    client = Client(settings)
    queued, running = (client.enqueue_actor_job(scripted("x"), "go") for _ in range(2))
    r = redis_target.client()
    r.set(keys.events_key(queued), "not a stream")

    async def main() -> tuple[str, str, str, str]:
        runner = JobRunner(settings, lambda *a: None)
        first, again = await runner.run(queued), await runner.run(queued)
        assert await runner._claim(running, "owner-r") is not None
        await asyncio.to_thread(r.delete, keys.events_key(running))
        await asyncio.to_thread(r.set, keys.events_key(running), "not a stream either")
        result = ActorResult(finish_reason="error")
        ended = await runner._finish(
            running, "owner-r", JobStatus.FAILED, "x", "StreamWriteError", result, []
        )
        later = await runner.run(running)
        await runner.aclose()
        return first, again, ended, later

    try:
        first, again, ended, later = asyncio.run(main())
        assert (first, again) == ("unstreamable", "terminal")
        assert (ended, later) == ("failed", "terminal")
        for job_id in (queued, running):
            record = client.get_result(job_id)
            assert record is not None and record.status is JobStatus.FAILED, record
            assert record.error_type == "StreamWriteError" and not record.done_id
            assert r.zscore(keys.RUNNING_INDEX, job_id) is None
        record = client.get_result(queued)
        assert record is not None and record.error is not None and "not a stream" in record.error
        assert r.get(keys.events_key(queued)) == b"not a stream"  # left as it was
    finally:
        for job_id in (queued, running):
            r.delete(keys.lease_key(job_id), keys.events_key(job_id), keys.job_key(job_id))
        r.zrem(keys.RUNNING_INDEX, queued, running)
        client.redis.delete(queue)
        client.close()
        r.close()


def test_a_script_cache_flushed_under_the_publisher_is_loaded_again(
    redis_target: RedisTarget, stack_env: dict[str, str]
) -> None:
    """A restarted or failed-over Redis has no scripts: NOSCRIPT makes the publisher reload."""
    if redis_target.embedded is None:
        pytest.skip("SCRIPT FLUSH would empty the script cache of a Redis shared with others")
    job = f"pub-noscript-{uuid.uuid4().hex[:8]}"
    r = redis_target.client()
    r.set(keys.lease_key(job), "owner", ex=60)

    async def main() -> None:
        client = redis.asyncio.Redis.from_url(redis_target.url, socket_timeout=5)
        pub = Publisher(client, Settings.from_env(stack_env))
        ch = pub.open(job, "owner")
        try:
            pub.publish(ch, ["type", "token", "text", "A", "node", "n"])
            await asyncio.wait_for(pub.drain(ch), 10)
            assert await pub.run_script("return ARGV[1]", [], ["before"]) == b"before"
            await client.script_flush()
            # A call alone in its pipeline meets NOSCRIPT first, then the entries do.
            assert await asyncio.wait_for(pub.run_script("return ARGV[1]", [], ["x"]), 10) == b"x"
            await client.script_flush()
            pub.publish(ch, ["type", "token", "text", "B", "node", "n"])
            after = pub.run_script("return ARGV[1]", [], ["after"])
            await asyncio.wait_for(pub.drain(ch), 10)
            assert await asyncio.wait_for(after, 10) == b"after"
        finally:
            await client.aclose()

    try:
        asyncio.run(main())
        entries = r.xrange(keys.events_key(job))
        assert [f[b"text"] for _, f in entries] == [b"A", b"B"]
    finally:
        r.delete(keys.lease_key(job), keys.events_key(job), keys.job_key(job))
        r.close()


@pytest.mark.parametrize("parser", ["hiredis", "python"])
def test_the_reply_reader_takes_a_pipelines_replies_in_order_with_an_error_in_its_place(
    redis_target: RedisTarget, parser: str
) -> None:
    """Both of redis-py's parsers: the replies of one write, then an error among them."""
    from redis._parsers import _AsyncHiredisParser, _AsyncRESP2Parser
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import ResponseError

    from worker.publisher import _reply_reader

    parser_class = _AsyncHiredisParser if parser == "hiredis" else _AsyncRESP2Parser
    key = f"actorq-test:replies:{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        pool = redis.asyncio.ConnectionPool.from_url(redis_target.url, parser_class=parser_class)
        conn = await pool.get_connection()
        try:
            read = _reply_reader(conn)
            # Many replies to one write, more than fit one socket read of small ones.
            await conn.send_packed_command(
                conn.pack_commands([("INCR", key)] * 2000), check_health=False
            )
            assert await read(2000) == list(range(1, 2001))
            await conn.send_packed_command(
                conn.pack_commands([("INCR", key), ("HGET", key, "f"), ("INCR", key)]),
                check_health=False,
            )
            first, error, last = await read(3)
            assert (first, last) == (2001, 2002)  # the replies after the error are read too
            assert isinstance(error, ResponseError) and "WRONGTYPE" in str(error)
            # ...so the connection is still in step: the next write's reply is its own.
            await conn.send_packed_command(conn.pack_command("INCR", key), check_health=False)
            assert await read(1) == [2003]
            await conn.disconnect()
            with pytest.raises(RedisConnectionError):  # not a wait for bytes that never come
                await asyncio.wait_for(read(1), 5)
        finally:
            await conn.disconnect()
            await pool.disconnect()
            r = redis_target.client()
            r.delete(key)
            r.close()

    asyncio.run(main())


def test_script_calls_share_a_pipeline_with_entries_and_an_error_stays_with_its_call(
    redis_target: RedisTarget, stack_env: dict[str, str]
) -> None:
    """Claims and endings ride the token pipelines: each call gets its own reply or error."""
    job = f"pub-calls-{uuid.uuid4().hex[:8]}"
    key = f"actorq-test:calls:{uuid.uuid4().hex[:8]}"
    r = redis_target.client()
    r.set(keys.lease_key(job), "owner", ex=60)

    async def main() -> list[object]:
        client = redis.asyncio.Redis.from_url(redis_target.url, socket_timeout=5)
        pub = Publisher(client, Settings.from_env(stack_env))
        ch = pub.open(job, "owner")
        try:
            # All queued before the loop runs again: one pipeline carries them all.
            pub.publish(ch, ["type", "token", "text", "A", "node", "n"])
            calls = [
                pub.run_script("return redis.call('INCRBY', KEYS[1], ARGV[1])", [key], [5]),
                pub.run_script("return redis.error_reply('refused by the script')", [], []),
                pub.run_script("return {ARGV[1], ARGV[2], ARGV[3]}", [], ["é", b"\x00b", 1.5]),
            ]
            pub.publish(ch, ["type", "token", "text", "B", "node", "n"])
            out = await asyncio.gather(*calls, return_exceptions=True)
            await asyncio.wait_for(pub.drain(ch), 10)
            return out
        finally:
            await client.aclose()

    try:
        incr, refused, echoed = asyncio.run(main())
        assert incr == 5
        assert isinstance(refused, ResponseError) and "refused by the script" in str(refused)
        assert echoed == ["é".encode(), b"\x00b", b"1.5"]
        entries = r.xrange(keys.events_key(job))
        assert [f[b"text"] for _, f in entries] == [b"A", b"B"]
    finally:
        r.delete(keys.lease_key(job), keys.events_key(job), keys.job_key(job), key)
        r.close()


def test_a_script_call_whose_caller_stops_waiting_leaves_the_pipelines_working(
    redis_target: RedisTarget, stack_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Cancelled before its pipeline: not sent. Cancelled after: its reply is read and dropped."""
    key = f"actorq-test:calls:{uuid.uuid4().hex[:8]}"
    # Keeps Redis busy ~50 ms, so the call is surely in flight when its caller gives up.
    slow = """
    local t0 = redis.call('TIME')
    repeat local t = redis.call('TIME')
    until (t[1] - t0[1]) * 1000000 + (t[2] - t0[2]) > 50000
    redis.call('INCR', KEYS[1])
    return redis.error_reply('too late: nobody waits for this one')
    """

    async def main() -> list[object]:
        client = redis.asyncio.Redis.from_url(redis_target.url, socket_timeout=5)
        pub = Publisher(client, Settings.from_env(stack_env))
        try:
            never = pub.run_script("return redis.call('INCR', KEYS[1])", [key], [])
            never.cancel()  # before the loop ran the flusher: never sent
            in_flight = pub.run_script(slow, [key], [])
            await asyncio.sleep(0.02)
            in_flight.cancel()  # its reply comes back to nobody
            after = await asyncio.wait_for(
                pub.run_script("return redis.call('GET', KEYS[1])", [key], []), 10
            )
            return [never.cancelled(), in_flight.cancelled(), after]
        finally:
            await client.aclose()

    r = redis_target.client()
    try:
        with caplog.at_level(logging.WARNING, logger="actorq.publisher"):
            # The slow call ran, the first never did, and no pipeline failed over either.
            assert asyncio.run(main()) == [True, True, b"1"]
        assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
    finally:
        r.delete(key)
        r.close()


@pytest.mark.parametrize("bad", [True, None, 1j, ["a"]])
def test_a_script_argument_of_another_type_is_refused_by_name(bad: object) -> None:
    with pytest.raises(TypeError, match="script argument must be str, bytes, int or float"):
        _encode_arg(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("stamp", ["0", "1"])
def test_a_token_queued_by_publish_token_is_the_entry_publish_would_queue(
    stamp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token path's pre-encoded entry matches the general one, escapes and stamps included."""
    monkeypatch.setenv("ACTORQ_STAMP_TOKENS", stamp)
    pub = Publisher(redis.asyncio.Redis(), Settings.from_env({}))
    general, fast = JobChannel("job", "owner"), JobChannel("job", "owner")

    async def main() -> None:
        for text in ["x", 'q"\\\n\u2603', "\ud83d", ""]:
            pub.publish(general, ["type", "token", "text", text, "node", "n\u00e9"])
            pub.publish_token(fast, text, "n\u00e9")
        pub._dirty.clear()  # nothing is sent: only the queued entries are compared

    asyncio.run(main())
    strip = (lambda e: e.rsplit(',"ts",', 1)[0]) if stamp == "1" else (lambda e: e)
    assert [strip(e) for e in general.pending] == [strip(e) for e in fast.pending]
    assert fast.kinds == ["token"] * 4
    for entry in fast.pending:
        fields = json.loads(entry)
        assert fields[:3] == ["type", "token", "text"] and fields[4:6] == ["node", "n\u00e9"]
        assert (fields[6:7] == ["ts"]) == (stamp == "1")


def test_a_channel_counts_its_entries_while_a_pipeline_holds_them(
    redis_target: RedisTarget, stack_env: dict[str, str]
) -> None:
    """A retry publishes ``reset`` when its failed try queued anything: in flight counts."""
    job_id = f"queued-{uuid.uuid4().hex}"
    settings = Settings.from_env(stack_env)

    async def main() -> None:
        r = redis.asyncio.Redis.from_url(settings.redis_url)
        await r.set(keys.lease_key(job_id), "owner", ex=60)
        pub = Publisher(r, settings)
        ch = pub.open(job_id, "owner")
        pub.publish_token(ch, "a", "n")
        pub.publish(ch, ["type", "node_end", "node", "n"])
        await asyncio.sleep(0)  # the flusher takes both and waits for Redis's reply
        assert ch.pending == [] and ch.next_seq == 1  # in flight: in neither
        assert ch.queued == 2
        await asyncio.wait_for(pub.drain(ch), 10)
        assert ch.queued == 2 and ch.published == 2
        await r.delete(keys.lease_key(job_id), keys.events_key(job_id), keys.job_key(job_id))
        await r.aclose()

    asyncio.run(main())


def test_evalsha_packs_what_redis_py_packs_and_names_the_script_as_redis_does() -> None:
    import hashlib

    import redis.connection

    from producer.resp import evalsha, script_sha

    sha = script_sha("return 1")
    assert sha == hashlib.sha1(b"return 1").hexdigest().encode()
    expected = redis.connection.Connection().pack_command(
        "EVALSHA", sha, 2, "k1", "k2", "x", "1.5", "é"
    )
    assert evalsha(sha, [b"k1", b"k2"], [b"x", b"1.5", "é".encode()]) == b"".join(expected)


def test_publish_calls_are_cut_by_jobs_and_by_entries() -> None:
    """At most 64 jobs a call, and 512 entries past its first job: a backlog after an
    outage goes out in calls that each hold Redis briefly."""
    from worker.publisher import _call_groups

    def taken(*sizes: int) -> list[tuple[JobChannel, list[str], list[str], int]]:
        return [
            (JobChannel(f"j{i}", "o"), ["e"] * n, ["token"] * n, 1) for i, n in enumerate(sizes)
        ]

    assert [len(g) for g in _call_groups(taken(*[1] * 150))] == [64, 64, 22]
    assert [len(g) for g in _call_groups(taken(300, 300, 100, 2000, 5))] == [1, 2, 1, 1]
    assert _call_groups([]) == []


@pytest.fixture
def private_redis(stack_env: dict[str, str]) -> Iterator[tuple[redis.Redis, Settings]]:
    """A Redis of the test's own (its configuration changes), and settings on it."""
    from ops.stack import EmbeddedRedis

    server = EmbeddedRedis().start()
    r = redis.Redis.from_url(server.url)
    try:
        yield r, Settings.from_env({**stack_env, "REDIS_URL": server.url})
    finally:
        r.close()
        server.cleanup()


def _publish_on_own_client(
    settings: Settings, job_id: str, steps: Callable[[Publisher, JobChannel], Awaitable[None]]
) -> JobChannel:
    """Run ``steps`` on a Publisher (and its client) of their own, owning ``job_id``'s channel."""

    async def main() -> JobChannel:
        client = redis.asyncio.Redis.from_url(settings.redis_url)
        pub = Publisher(client, settings)
        ch = pub.open(job_id, "owner")
        try:
            await steps(pub, ch)
        finally:
            await client.aclose()
        return ch

    return asyncio.run(main())


def test_a_redis_refusing_writes_for_its_own_state_is_waited_out(
    private_redis: tuple[redis.Redis, Settings],
) -> None:
    """NOREPLICAS (min-replicas-to-write unmet) refuses every job of a call: that is
    Redis's state, not the job's, so the batch goes again until Redis takes it, once."""
    r, settings = private_redis
    r.set(keys.lease_key("refused"), "owner", ex=60)
    r.config_set("min-replicas-to-write", 1)

    async def steps(pub: Publisher, ch: JobChannel) -> None:
        assert not pub.publish_token(ch, "A", "n")
        await asyncio.sleep(0.5)  # refused, and sent again, a few times
        assert ch.failed is None and ch.unwritten
        r.config_set("min-replicas-to-write", 0)
        await asyncio.wait_for(pub.drain(ch), 10)

    ch = _publish_on_own_client(settings, "refused", steps)
    assert ch.failed is None and ch.published == 1
    assert [f[b"text"] for _, f in r.xrange(keys.events_key("refused"))] == [b"A"]


def test_a_job_whose_entries_redis_refused_ends_failed(
    redis_target: RedisTarget, stack_env: dict[str, str]
) -> None:
    """Entries Redis refused for good leave the job's text short: the job ends
    ``failed`` naming Redis's reply, never ``succeeded``."""
    queue = f"actorq-pub-{uuid.uuid4().hex[:6]}"
    settings = Settings.from_env({**stack_env, "ACTORQ_QUEUE": queue})
    client = Client(settings)
    job_id = client.enqueue_actor_job(
        scripted("one two three four five six", token_delay_ms=20), "go"
    )
    refusal = ResponseError("NOPERM this user has no permissions to access one of the keys")

    async def main() -> str:
        runner = JobRunner(settings, lambda *a: None)
        pub = runner.publisher
        send = pub._send

        batches = 0

        async def refusing(taken: Any, calls: Any) -> list[Any]:
            nonlocal batches
            results = await send(taken, calls)
            out = []
            for (ch, *_), result in zip(taken, results, strict=True):
                if ch.job_id == job_id:
                    batches += 1
                out.append(refusal if ch.job_id == job_id and batches >= 3 else result)
            return out

        pub._send = refusing  # type: ignore[method-assign]
        try:
            return str(await runner.run(job_id))
        finally:
            await runner.aclose()

    try:
        assert asyncio.run(main()) == "failed"
        record = client.get_result(job_id)
        assert record is not None and record.status is JobStatus.FAILED
        assert record.error_type == "StreamWriteError" and record.error is not None
        assert "NOPERM" in record.error
    finally:
        client.redis.delete(queue)
        client.close()


def test_a_job_failing_mid_batch_keeps_the_entries_it_wrote_counted(
    redis_target: RedisTarget, stack_env: dict[str, str], leased_job: tuple[str, Any]
) -> None:
    """An entry Redis refuses after others of the same batch went in (here one with an
    odd number of fields): those stay counted, so a resend of the pipeline (another
    job's OOM, say) skips them instead of writing them twice."""
    job, r = leased_job
    settings = Settings.from_env(stack_env)

    async def main() -> JobChannel:
        client = redis.asyncio.Redis.from_url(settings.redis_url)
        pub = Publisher(client, settings)
        ch = pub.open(job, "owner")
        try:
            pub.publish_token(ch, "A", "n")
            pub.publish(ch, ["type", "token", "text"])  # one batch with A
            await asyncio.wait_for(pub.drain(ch), 10)
        finally:
            await client.aclose()
        return ch

    ch = asyncio.run(main())
    assert ch.failed is not None and "wrong number of arguments" in ch.failed
    assert [f[b"text"] for _, f in r.xrange(keys.events_key(job))] == [b"A"]
    # The same batch sent again (fixed), as a resend would: A is not written twice.
    batch = json.dumps([["type", "token", "text", "A"], ["type", "token", "text", "B"]])
    job_keys = [keys.events_key(job), keys.lease_key(job), keys.job_key(job)]
    sent = r.eval(scripts.PUBLISH, 3, *job_keys, 1064, 1000, 60, "owner", 1, "1", batch)
    assert sent == [1]
    assert [f[b"text"] for _, f in r.xrange(keys.events_key(job))] == [b"A", b"B"]


def test_a_batch_sent_again_counts_what_the_attempt_wrote_past_its_claims_entries(
    stack_env: dict[str, str],
) -> None:
    """A restarted job's stream starts with the earlier attempt's entries and CLAIM's
    ``reset`` and ``start``: a resend skips exactly the entries this attempt wrote."""
    queue = f"actorq-resend-{uuid.uuid4().hex[:6]}"
    c = Client(Settings.from_env({**stack_env, "ACTORQ_QUEUE": queue}))
    job_id = c.enqueue_actor_job(scripted("resend"), "go")  # nobody consumes this queue
    r = c.redis
    job_keys = [keys.events_key(job_id), keys.lease_key(job_id), keys.job_key(job_id)]

    def claim(owner: str) -> Any:
        return r.eval(
            scripts.CLAIM, 5, *scripts.running_job_keys(job_id), owner, 60_000,
            f"{time.time()}", 3, "w", 60, 1000, "{}", "{}", queue, time.time() + 60, job_id,
        )  # fmt: skip

    def publish(owner: str, first: int, verify: str, *texts: str) -> Any:
        batch = json.dumps([["type", "token", "text", t] for t in texts])
        return r.eval(scripts.PUBLISH, 3, *job_keys, 1064, 1000, 60, owner, first, verify, batch)

    try:
        assert claim("owner-1")[:2] == [b"claimed", 1]
        assert publish("owner-1", 1, "0", "old1", "old2") == [2]
        r.delete(keys.lease_key(job_id))  # the attempt was lost
        r.hset(keys.job_key(job_id), "status", "queued")
        assert claim("owner-2")[:2] == [b"claimed", 2]
        assert publish("owner-2", 1, "0", "a", "b") == [2]
        assert publish("owner-2", 1, "1", "a", "b", "c") == [1]  # a and b ran before
        assert publish("owner-2", 3, "1", "c", "d") == [1]
        texts = [f[b"type"] + b":" + f.get(b"text", b"") for _, f in r.xrange(job_keys[0])]
        assert texts == [
            b"start:", b"token:old1", b"token:old2", b"reset:", b"start:",
            b"token:a", b"token:b", b"token:c", b"token:d",
        ]  # fmt: skip
        # The stream vanishes under the attempt: it starts anew, and a resend counts from there.
        r.delete(job_keys[0])
        assert publish("owner-2", 5, "0", "e", "f") == [2]
        assert publish("owner-2", 5, "1", "e", "f", "g") == [1]
        assert [f[b"text"] for _, f in r.xrange(job_keys[0])] == [b"e", b"f", b"g"]
        assert r.ttl(job_keys[0]) > 0
    finally:
        r.delete(*scripts.job_keys(job_id), queue)
        r.zrem(keys.JOBS_INDEX, job_id)
        r.zrem(keys.RUNNING_INDEX, job_id)
        c.close()


def test_a_connection_the_server_closed_while_idle_is_replaced_before_it_fails_a_pipeline(
    private_redis: tuple[redis.Redis, Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """A server ``timeout`` (or a proxy) closes idle clients: the publisher's held
    connection, idle past it, is checked out afresh, not found dead by a pipeline
    (a failed round trip, a warning and a retry pause on the job's path)."""
    r, settings = private_redis
    r.set(keys.lease_key("idle"), "owner", ex=60)
    r.config_set("timeout", 1)

    async def steps(pub: Publisher, ch: JobChannel) -> None:
        pub.publish_token(ch, "A", "n")
        await asyncio.wait_for(pub.drain(ch), 10)
        await asyncio.sleep(2.5)  # Redis checks idle clients about every 100 ms
        pub.publish_token(ch, "B", "n")
        await asyncio.wait_for(pub.drain(ch), 10)

    with caplog.at_level(logging.WARNING, logger="actorq.publisher"):
        ch = _publish_on_own_client(settings, "idle", steps)
    assert ch.failed is None and ch.published == 2
    assert [f[b"text"] for _, f in r.xrange(keys.events_key("idle"))] == [b"A", b"B"]
    assert not [rec.getMessage() for rec in caplog.records], "a pipeline failed"
