"""Shared fixtures: a real Redis (embedded unless REDIS_URL is set) and real workers.

Every process a fixture starts is stopped by pid at the end, whatever happened.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from ops.stack import EmbeddedRedis, WorkerProcess
from producer import Client, Settings
from producer.crypto import generate_key
from tests.openai_server import FakeOpenAI

ROOT = Path(__file__).resolve().parent.parent


class RedisTarget:
    def __init__(self, url: str, embedded: EmbeddedRedis | None) -> None:
        self.url = url
        self.embedded = embedded

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


@pytest.fixture(scope="session")
def redis_target() -> Iterator[RedisTarget]:
    url = os.environ.get("REDIS_URL")
    if url:
        started = time.time()
        target = RedisTarget(url, None)
        bindings_before = set(target.client().scan_iter(match="_kombu.binding*", count=1000))
        yield target
        _forget_jobs_since(target.client(), started)
        _forget_test_queues(target.client(), bindings_before)
        return
    server = EmbeddedRedis().start()
    try:
        yield RedisTarget(server.url, server)
    finally:
        server.cleanup()


def _forget_jobs_since(r: redis.Redis, since: float) -> None:
    """On a Redis the suite does not own, delete the jobs it enqueued (and their keys)."""
    from producer import keys, scripts

    ids = [i.decode() for i in r.zrangebyscore(keys.JOBS_INDEX, since, "+inf")]
    for job_id in ids:
        r.delete(*scripts.job_keys(job_id))
    if ids:
        r.zrem(keys.JOBS_INDEX, *ids)
        r.zrem(keys.RUNNING_INDEX, *ids)
    mine = set(ids)
    for idem in r.scan_iter(match=keys.idempotency_key("*"), count=1000):
        if (r.get(idem) or b"").decode() in mine:
            r.delete(idem)
    r.close()


def _forget_test_queues(r: redis.Redis, before: set[bytes]) -> None:
    """Delete the kombu keys the run made (bindings of its queues, and of Celery's
    pidbox and event exchanges, binding deadlines: kombu's keys that were there before
    stay), and the messages that workers the tests killed left unacked on its queues."""
    from tests.helpers import forget_unacked

    queues = set()
    for key in r.scan_iter(match="_kombu.binding*", count=1000):
        if key in before:
            continue
        r.delete(key)
        queue = key.decode().rpartition(".")[2]
        if queue.startswith(("actorq-", "cli-worker-")):
            queues.add(queue)
    forget_unacked(r, *queues)
    r.close()


@pytest.fixture(scope="session")
def session_tag() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def stack_env(redis_target: RedisTarget, session_tag: str) -> Iterator[dict[str, str]]:
    env = {
        "REDIS_URL": redis_target.url,
        "ACTORQ_SECRET_KEY": generate_key(),
        "ACTORQ_QUEUE": f"actorq-test-{session_tag}",
        "ACTORQ_LOG_LEVEL": "INFO",
        "PYTHONPATH": str(ROOT),
    }
    if os.environ.get("CELERY_BROKER_URL"):
        env["CELERY_BROKER_URL"] = os.environ["CELERY_BROKER_URL"]
    yield env
    _delete_rabbitmq_queues([env])
    if redis_target.embedded is None:  # a Redis we don't own: drop this session's queue keys
        r = redis_target.client()
        for key in r.scan_iter(match=f"*{env['ACTORQ_QUEUE']}*", count=1000):
            r.delete(key)
        r.close()


WorkerFactory = Callable[..., WorkerProcess]


@pytest.fixture(scope="session")
def start_worker(
    stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory, session_tag: str
) -> Iterator[WorkerFactory]:
    """Start ``celery worker`` subprocesses; all are stopped (by pid) at session end."""
    started: list[WorkerProcess] = []
    logs = tmp_path_factory.mktemp("worker-logs")

    def start(
        name: str | None = None,
        concurrency: int = 50,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> WorkerProcess:
        name = name or f"w{len(started)}-{session_tag}"
        worker = WorkerProcess(
            env={**stack_env, **(env or {})},
            name=name,
            concurrency=concurrency,
            log_path=logs / f"{name}.log",
        )
        started.append(worker)
        worker.start()
        if wait:
            worker.wait_ready(worker.env["REDIS_URL"], timeout=60)
        return worker

    yield start
    for worker in started:
        worker.stop(timeout=10)
    _delete_rabbitmq_queues([worker.env for worker in started])


def _delete_rabbitmq_queues(envs: list[dict[str, str]]) -> None:
    """On a RabbitMQ the suite does not own, delete the queues of these environments
    (``ACTORQ_QUEUE``; durable: they outlive the workers that consumed them)."""
    from kombu import Connection

    by_broker: dict[str, set[str]] = {}
    for env in envs:
        broker = env.get("CELERY_BROKER_URL", "")
        if broker.startswith("amqp"):
            by_broker.setdefault(broker, set()).add(env["ACTORQ_QUEUE"])
    for broker, queues in by_broker.items():
        with Connection(broker, connect_timeout=5) as conn:
            for queue in sorted(queues):
                conn.default_channel.queue_delete(queue)


@pytest.fixture(scope="session")
def workers(start_worker: WorkerFactory) -> list[WorkerProcess]:
    """Two workers sharing the session's queue."""
    return [start_worker(f"a-{uuid.uuid4().hex[:6]}"), start_worker(f"b-{uuid.uuid4().hex[:6]}")]


@pytest.fixture(scope="session")
def openai_server() -> Iterator[FakeOpenAI]:
    """An OpenAI-compatible server on 127.0.0.1 that workers and tests can reach."""
    server = FakeOpenAI().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(stack_env: dict[str, str]) -> Iterator[Client]:
    c = Client(Settings.from_env(stack_env))
    yield c
    c.close()


def hostname() -> str:
    return socket.gethostname()
