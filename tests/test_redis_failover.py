"""A Redis that can't take writes for a while: a failover behind one endpoint, a
read-only or full Redis. Jobs wait it out and go on; none is lost or left queued.

Each test runs its own redis-server(s) (it stalls or demotes them) and one
``JobRunner`` in this process, as a worker process runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import redis

from ops.stack import EmbeddedRedis
from producer import Client, Settings, keys
from producer.crypto import generate_key
from tests.helpers import scripted
from worker.jobs import JobRunner


@contextlib.contextmanager
def _servers(n: int) -> Iterator[list[EmbeddedRedis]]:
    started: list[EmbeddedRedis] = []
    try:
        for _ in range(n):
            started.append(EmbeddedRedis().start())
        yield started
    finally:
        for server in started:
            server.cleanup()


def _settings(url: str) -> Settings:
    return Settings.from_env(
        {"REDIS_URL": url, "ACTORQ_SECRET_KEY": generate_key(), "ACTORQ_QUEUE": "failover-test"}
    )


class _SwitchProxy:
    """A TCP endpoint in front of Redis, as DNS or a proxy is: new connections go to
    ``upstream``, which a failover changes; connections made before stay where they are."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pump(src, dst))
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                dst.write(data)
        dst.close()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._pumps):
            task.cancel()


def _tokens(r: redis.Redis, job_id: str) -> list[bytes]:
    return [f[b"text"] for _, f in r.xrange(keys.events_key(job_id)) if f[b"type"] == b"token"]


def test_the_publisher_reconnects_when_a_failover_demotes_its_primary() -> None:
    with _servers(2) as (a, b):
        ra, rb = redis.Redis.from_url(a.url), redis.Redis.from_url(b.url)
        rb.execute_command("REPLICAOF", "127.0.0.1", a.port)

        async def main() -> str:
            proxy = _SwitchProxy(a.port)
            await proxy.start()
            settings = _settings(f"redis://127.0.0.1:{proxy.port}/0")
            client = Client(Settings.from_env({"REDIS_URL": a.url}))
            job_id = client.enqueue_actor_job(scripted("hi"), "go")
            client.close()
            runner = JobRunner(settings, lambda *a: None)
            claim = await runner._claim(job_id, "owner-1")
            assert claim is not None and claim[0] == b"claimed"
            publisher = runner.publisher
            channel = publisher.open(job_id, "owner-1")
            publisher.publish_token(channel, "before", "n")
            await publisher.drain(channel)
            while (
                rb.info("replication").get("slave_repl_offset")
                != ra.info("replication")["master_repl_offset"]
            ):
                await asyncio.sleep(0.02)
            # The failover: B promoted, A demoted to its replica, the endpoint moved to B.
            rb.execute_command("REPLICAOF", "NO", "ONE")
            ra.execute_command("REPLICAOF", "127.0.0.1", b.port)
            proxy.upstream = b.port
            publisher.publish_token(channel, "after", "n")
            await asyncio.wait_for(publisher.drain(channel), 20)
            await runner.aclose()
            await proxy.close()
            return job_id

        job_id = asyncio.run(main())
        assert _tokens(rb, job_id) == [b"before", b"after"]


def _run(runner: JobRunner, job_id: str) -> Any:
    async def main() -> Any:
        try:
            return await asyncio.wait_for(runner.run(job_id), 60)
        finally:
            await runner.aclose()

    return asyncio.run(main())


def test_a_claim_refused_by_a_read_only_or_full_redis_sends_the_job_again() -> None:
    with _servers(1) as (server,):
        r = redis.Redis.from_url(server.url)
        settings = _settings(server.url)
        client = Client(settings)
        for refuse, allow in (
            (("REPLICAOF", "127.0.0.1", "1"), ("REPLICAOF", "NO", "ONE")),  # read-only
            (("CONFIG", "SET", "maxmemory", "1"), ("CONFIG", "SET", "maxmemory", "0")),  # full
        ):
            r.config_set("maxmemory-policy", "noeviction")
            job_id = client.enqueue_actor_job(scripted("one two"), "go")
            sent: list[tuple[str, str, str]] = []
            runner = JobRunner(settings, lambda *args, sent=sent: sent.append(args))
            runner.claim_wait_s = 1.0
            r.execute_command(*refuse)
            try:
                assert _run(runner, job_id) == "deferred"
            finally:
                r.execute_command(*allow)
            assert sent == [(job_id, settings.queue, "")]  # back to its queue, not lost
            assert r.hget(keys.job_key(job_id), "status") == b"queued"
            # The message sent again runs it once Redis takes writes.
            assert _run(JobRunner(settings, lambda *a: None), job_id) == "succeeded"
            assert _tokens(r, job_id) == [b"one", b" two"]
        client.close()


def test_an_ending_refused_by_a_read_only_redis_is_written_once_it_takes_writes() -> None:
    with _servers(1) as (server,):
        r = redis.Redis.from_url(server.url)
        settings = _settings(server.url)
        client = Client(settings)
        job_id = client.enqueue_actor_job(scripted("hi"), "go")
        client.close()

        async def main() -> Any:
            runner = JobRunner(settings, lambda *a: None)
            add = runner.supervisor.add

            def claimed_then_read_only(active: Any) -> None:
                add(active)  # the claim is written: from here on Redis refuses writes
                r.execute_command("REPLICAOF", "127.0.0.1", "1")
                loop = asyncio.get_running_loop()
                loop.call_later(1.5, r.execute_command, "REPLICAOF", "NO", "ONE")

            runner.supervisor.add = claimed_then_read_only  # type: ignore[method-assign]
            try:
                # A payload that can't be decoded: the attempt goes straight to its ending.
                return await asyncio.wait_for(runner.run(job_id, decode_error="bad payload"), 60)
            finally:
                await runner.aclose()

        assert asyncio.run(main()) == "failed"
        entries = [f[b"type"] for _, f in r.xrange(keys.events_key(job_id))]
        assert entries.count(b"done") == 1 and entries[-1] == b"done"
        assert r.hget(keys.job_key(job_id), "status") == b"failed"
        assert r.zscore(keys.RUNNING_INDEX, job_id) is None  # ended: nothing for the sweeper


def test_replies_worth_a_retry_are_told_from_the_rest() -> None:
    from redis.exceptions import NoScriptError, OutOfMemoryError, ReadOnlyError, ResponseError

    from producer.resp import transient_reply, wrong_node_reply

    in_script = ResponseError(
        "Error running script (call to f_0): @user_script:36: @user_script: 36: "
        "-OOM command not allowed when used memory > 'maxmemory'."
    )
    master_down = ResponseError("MASTERDOWN Link with MASTER is down and replica-serve-stale-data")
    for reply, transient, wrong_node in (
        (ReadOnlyError("You can't write against a read only replica."), True, True),
        (master_down, True, True),
        (OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), True, False),
        (in_script, True, False),
        (ResponseError("BUSY Redis is busy running a script."), True, False),
        (ResponseError("WRONGTYPE Operation against a key holding the wrong kind"), False, False),
        (NoScriptError("No matching script. Please use EVAL."), False, False),
        (ResponseError("ERR Script attempted to access nonexistent global variable 'BUSYX'"),
         False, False),
    ):  # fmt: skip
        assert transient_reply(reply) is transient, reply
        assert wrong_node_reply(reply) is wrong_node, reply
