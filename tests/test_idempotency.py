"""Idempotency keys through failures: a failed enqueue gives its key back, a caller
that finds the key taken never returns a job that is undone, and a key left by a
creator that died mid-way is finished by the next caller.

No worker consumes these tests' queues: what was sent stays there to be counted.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import redis
from kombu.exceptions import OperationalError

import producer.client as client_module
from ops.stack import free_port
from producer import Client, keys, scripts
from tests.helpers import scripted


@pytest.fixture
def quiet(client: Client) -> Iterator[Client]:
    """A client sending to a queue of its own, which nothing consumes."""
    c = Client(replace(client.settings, queue=f"actorq-idem-{uuid.uuid4().hex[:8]}"))
    yield c
    r = c.redis
    # kombu 5.7 keeps a queue's binding in _kombu.binding_permanent.* too.
    r.delete(c.settings.queue, *r.keys(f"_kombu.binding*{c.settings.queue}*"))
    c.close()


def _queued_messages(c: Client) -> int | None:
    """Messages waiting on the client's queue (None when the broker is not Redis)."""
    if not c.settings.broker_url.startswith("redis"):
        return None
    return int(redis.Redis.from_url(c.settings.broker_url).llen(c.settings.queue))


def _dead_broker(c: Client) -> Client:
    return Client(replace(c.settings, broker_url=f"redis://127.0.0.1:{free_port()}/0"))


def _key() -> str:
    return f"order-{uuid.uuid4().hex}"


def _sent(c: Client, job_id: str) -> bool:
    return c.redis.hget(keys.job_key(job_id), "sent") == b"1"


def test_a_failed_send_gives_the_key_back_and_the_retry_enqueues_afresh(quiet: Client) -> None:
    key = _key()
    down = _dead_broker(quiet)
    with pytest.raises(OperationalError):  # kombu's error for an unreachable broker
        down.enqueue_actor_job(scripted("hi"), "go", job_id="idem-fail-1", idempotency_key=key)
    down.close()
    r = quiet.redis
    assert not r.exists(keys.job_key("idem-fail-1"), keys.idempotency_key(key))
    job_id = quiet.enqueue_actor_job(scripted("hi"), "go", idempotency_key=key)
    assert job_id != "idem-fail-1" and _sent(quiet, job_id)
    assert quiet.enqueue_actor_job(scripted("hi"), "go", idempotency_key=key) == job_id
    assert _queued_messages(quiet) in (1, None)


def test_a_redis_error_while_creating_gives_the_key_back(quiet: Client) -> None:
    key = _key()
    real_eval = quiet.redis.eval

    def create_fails(script: str, *args: Any) -> Any:
        if script == scripts.CREATE:
            raise redis.ConnectionError("connection reset while creating")
        return real_eval(script, *args)

    quiet.redis.eval = create_fails  # type: ignore[method-assign]
    with pytest.raises(redis.ConnectionError):
        quiet.enqueue_actor_job(scripted("hi"), "go", idempotency_key=key)
    quiet.redis.eval = real_eval  # type: ignore[method-assign]
    assert not quiet.redis.exists(keys.idempotency_key(key))
    job_id = quiet.enqueue_actor_job(scripted("hi"), "go", idempotency_key=key)
    assert quiet.get_status(job_id).value == "queued" and _sent(quiet, job_id)


def test_a_caller_that_finds_the_key_taken_never_returns_an_undone_job(quiet: Client) -> None:
    key = _key()
    down = _dead_broker(quiet)
    failed: list[BaseException] = []

    def first() -> None:
        try:
            down.enqueue_actor_job(scripted("hi"), "go", job_id="idem-race-1", idempotency_key=key)
        except Exception as exc:
            failed.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    deadline = time.monotonic() + 10
    while not quiet.redis.exists(keys.job_key("idem-race-1")):  # the first is sending now
        assert time.monotonic() < deadline
        time.sleep(0.005)
    job_id = quiet.enqueue_actor_job(scripted("hi"), "go", idempotency_key=key)
    thread.join(30)
    down.close()
    assert failed and job_id != "idem-race-1"
    assert not quiet.redis.exists(keys.job_key("idem-race-1"))
    assert quiet.get_status(job_id).value == "queued" and _sent(quiet, job_id)
    assert quiet.redis.get(keys.idempotency_key(key)) == job_id.encode()


def test_a_key_held_by_an_enqueue_in_flight_is_returned_not_taken_over(
    quiet: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "_IDEM_WAIT_S", 0.3)
    r = quiet.redis
    # Another process holds the key and has not sent its job yet (a slow broker): the
    # caller waits, then returns that id; it never makes a second job for the key.
    key = _key()
    r.set(keys.idempotency_key(key), "idem-slow-1", ex=60)
    before = _queued_messages(quiet)
    assert quiet.enqueue_actor_job(scripted("hi"), "go", idempotency_key=key) == "idem-slow-1"
    assert not r.exists(keys.job_key("idem-slow-1")) and _queued_messages(quiet) == before
    # A process that died holding it: the key lapses, and the next enqueue is fresh.
    key = _key()
    r.set(keys.idempotency_key(key), "idem-dead-1", px=200)
    time.sleep(0.3)
    job_id = quiet.enqueue_actor_job(scripted("hi"), "go", idempotency_key=key)
    assert job_id != "idem-dead-1" and _sent(quiet, job_id)


def test_the_key_is_held_briefly_while_sending_and_as_long_as_the_job_once_sent(
    quiet: Client,
) -> None:
    key = _key()
    job_id = quiet.enqueue_actor_job(scripted("hi"), "go", idempotency_key=key)
    ttl = quiet.redis.ttl(keys.idempotency_key(key))
    assert quiet.settings.retention_s - 5 <= ttl <= quiet.settings.retention_s
    assert quiet.redis.get(keys.idempotency_key(key)) == job_id.encode()
