"""The Redis broker transport: kombu's, sharing one Redis client per channel."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection

import celeryconfig  # noqa: F401  (installs the transport, as every actorq app does)
from producer import Client, Settings
from producer.broker import Channel, QoS, Transport
from producer.client import celery_app
from producer.settings import broker_from_env
from tests.conftest import RedisTarget
from tests.helpers import UNACKED, UNACKED_INDEX, queue_length, scripted


def test_redis_urls_get_the_shared_client_transport() -> None:
    assert Connection("redis://127.0.0.1:6379/0").transport_cls == "redis"
    assert isinstance(Connection("redis://127.0.0.1:6379/0").transport, Transport)
    assert not isinstance(Connection("rediss://127.0.0.1:6380/0").transport, Transport)
    amqp = Connection("amqp://guest:guest@127.0.0.1:5672//")
    assert not isinstance(amqp.transport, Transport)


BROKER_URLS = [
    ({"REDIS_URL": "unix:///run/redis.sock"}, "redis+socket:///run/redis.sock?virtual_host=0"),
    (
        {"REDIS_URL": "unix://:p%20w@/run/redis.sock?db=3&socket_timeout=5"},
        "redis+socket://:p%20w@/run/redis.sock?virtual_host=3",
    ),
    (
        {"REDIS_URL": "redis://127.0.0.1:6379/0", "CELERY_BROKER_URL": "unix:///s.sock?db=1"},
        "redis+socket:///s.sock?virtual_host=1",
    ),
    ({"REDIS_URL": "redis://h:6379/4"}, "redis://h:6379/4"),
    # redis-py's options stay with the stream store; a query's db moves into the path.
    ({"REDIS_URL": "redis://u:p@h:6379/9?socket_timeout=5&protocol=3"}, "redis://u:p@h:6379/9"),
    ({"REDIS_URL": "redis://h:6379?db=3&health_check_interval=10"}, "redis://h:6379/3"),
    ({"REDIS_URL": "redis://h:6379/1?db=3"}, "redis://h:6379/3"),  # redis-py: the query's
    ({"REDIS_URL": "rediss://h:6380/0?ssl_cert_reqs=required"}, "rediss://h:6380/0"),
    ({"CELERY_BROKER_URL": "amqp://guest@h//?heartbeat=10"}, "amqp://guest@h//?heartbeat=10"),
]


@pytest.mark.parametrize(("env", "want"), BROKER_URLS, ids=[w for _, w in BROKER_URLS])
def test_a_redis_url_reaches_the_broker_in_the_form_kombu_takes(
    env: dict[str, str], want: str
) -> None:
    assert broker_from_env(env)[0] == want
    assert Settings.from_env(env).broker_url == want
    # That kombu reads them so (socket, password, database): test_local_stack's demo on each.


def test_a_broker_urls_tls_options_join_the_environments_instead_of_replacing_them() -> None:
    """kombu takes a URL's ``ssl_*`` options over ``broker_use_ssl`` whole: the CA
    named by ACTORQ_REDIS_SSL_CA_CERTS was lost, and the certificate check failed."""
    env = {
        "REDIS_URL": "rediss://h:6380/0?ssl_cert_reqs=optional",
        "ACTORQ_REDIS_SSL_CA_CERTS": "/etc/ca.pem",
    }
    assert broker_from_env(env)[1] == {"ssl_cert_reqs": "optional", "ssl_ca_certs": "/etc/ca.pem"}
    assert Settings.from_env(env).redis_options == {"ssl_ca_certs": "/etc/ca.pem"}
    # A stream store without TLS gets no TLS options (a TypeError on its first command).
    plain = {**env, "REDIS_URL": "redis://h:6379/0", "CELERY_BROKER_URL": env["REDIS_URL"]}
    assert Settings.from_env(plain).redis_options == {}
    assert Settings.from_env(plain).broker_ssl == broker_from_env(env)[1]


BAD_URLS = [
    ({"REDIS_URL": "unix:///s.sock?db=x"}, "REDIS_URL: db must be a database number"),
    ({"REDIS_URL": "redis://h:6379?db=two"}, "REDIS_URL: db must be a database number"),
    ({"CELERY_BROKER_URL": "unix://"}, "CELERY_BROKER_URL: a unix:// URL needs the socket's path"),
]


@pytest.mark.parametrize(("env", "message"), BAD_URLS, ids=[m for _, m in BAD_URLS])
def test_a_broker_url_kombu_cannot_take_is_refused_naming_its_variable(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Settings.from_env(env)


def test_messages_round_trip_and_the_channel_keeps_one_client(redis_target: RedisTarget) -> None:
    if not redis_target.url.startswith("redis://"):
        pytest.skip("the shared-client transport serves redis:// URLs")
    queue = f"actorq-test-broker-{uuid.uuid4().hex[:8]}"
    with Connection(redis_target.url) as conn:
        channel = conn.default_channel
        assert isinstance(channel, Channel)
        assert channel._create_client() is channel._create_client()
        with conn.SimpleQueue(queue) as q:
            for i in range(3):
                q.put({"n": i})
            got = []
            for _ in range(3):
                message = q.get(timeout=5)
                got.append(message.payload["n"])
                message.ack()  # the unacked bookkeeping goes through the shared client
            assert got == [0, 1, 2]
            q.clear()
    r = redis_target.client()
    try:
        assert r.llen(queue) == 0
        r.delete(queue)
    finally:
        r.close()


class _UnackedQueue:
    """A queue of the test's own and a look at kombu's unacked bookkeeping of its messages."""

    def __init__(self, redis: Any, queue: str) -> None:
        self.redis, self.queue = redis, queue

    def tracked(self, tag: str) -> tuple[bool, bool]:
        """Is the message in the unacked index, and in the unacked hash?"""
        return self.redis.zscore(UNACKED_INDEX, tag) is not None, self.redis.hexists(UNACKED, tag)


@pytest.fixture
def unacked(redis_target: RedisTarget) -> Iterator[_UnackedQueue]:
    if not redis_target.url.startswith("redis://"):
        pytest.skip("the shared-client transport serves redis:// URLs")
    r = redis_target.client()
    queue = _UnackedQueue(r, f"actorq-test-broker-{uuid.uuid4().hex[:8]}")
    try:
        yield queue
    finally:
        r.delete(queue.queue)
        r.close()


def test_unacked_bookkeeping_is_written_removed_and_restored_by_kombu(
    redis_target: RedisTarget, unacked: _UnackedQueue
) -> None:
    """The script-call bookkeeping keeps kombu's layout: its own restore finds the message."""
    queue, tracked = unacked.queue, unacked.tracked
    with Connection(redis_target.url) as conn, conn.SimpleQueue(queue) as q:
        for n in ("acked", "rejected", "restored"):
            q.put({"n": n})
        acked = q.get(timeout=5)
        assert tracked(acked.delivery_tag) == (True, True)
        acked.ack()
        assert tracked(acked.delivery_tag) == (False, False)
        qos = q.channel.qos
        # Both went out on the connection the QoS holds, not through redis-py's scripts.
        assert isinstance(qos, QoS) and qos._conn is not None and not qos._scripts
        rejected = q.get(timeout=5)
        assert tracked(rejected.delivery_tag) == (True, True)
        rejected.reject()
        assert tracked(rejected.delivery_tag) == (False, False)
        left = q.get(timeout=5)  # never acked: the channel's close restores it
        assert left.payload == {"n": "restored"}
        assert tracked(left.delivery_tag) == (True, True)
    assert tracked(left.delivery_tag) == (False, False)
    with Connection(redis_target.url) as conn, conn.SimpleQueue(queue) as q:
        again = q.get(timeout=5)
        assert again.payload == {"n": "restored"}
        again.ack()
        assert tracked(again.delivery_tag) == (False, False)


def test_unacked_bookkeeping_falls_back_to_redis_py_when_its_connection_or_script_is_gone(
    redis_target: RedisTarget, unacked: _UnackedQueue
) -> None:
    """A broken held connection, or a script cache flushed under it: nothing is lost."""
    queue, tracked = unacked.queue, unacked.tracked
    with Connection(redis_target.url) as conn, conn.SimpleQueue(queue) as q:
        for n in range(3):
            q.put({"n": n})
        first = q.get(timeout=5)
        qos = q.channel.qos
        assert isinstance(qos, QoS) and qos._conn is not None
        qos._conn._sock.close()  # the held connection breaks under the QoS
        first.ack()
        assert tracked(first.delivery_tag) == (False, False)
        assert set(qos._scripts) == {"remove"}  # done by redis-py instead
        second = q.get(timeout=5)  # and a new held connection takes the next one
        assert tracked(second.delivery_tag) == (True, True) and qos._conn is not None
        second.ack()
        if redis_target.embedded is not None:  # SCRIPT FLUSH empties a shared server's cache
            unacked.redis.script_flush()
            third = q.get(timeout=5)  # NOSCRIPT on the held connection: redis-py reloads
            assert tracked(third.delivery_tag) == (True, True)
            assert set(qos._scripts) == {"remove", "append"}
            third.ack()
            assert tracked(third.delivery_tag) == (False, False)
    assert qos._conn is None  # given back when the channel closed


def test_a_client_sends_to_its_settings_broker_whatever_the_environment_names(
    redis_target: RedisTarget, stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Celery prefers CELERY_BROKER_URL from the environment over a configured URL."""
    monkeypatch.setenv("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:1//")  # nothing there
    queue = f"actorq-test-envbroker-{uuid.uuid4().hex[:8]}"
    settings = Settings.from_env(
        {**stack_env, "CELERY_BROKER_URL": redis_target.url, "ACTORQ_QUEUE": queue}
    )
    client = Client(settings)
    r = redis_target.client()
    job_id = ""
    try:
        job_id = client.enqueue_actor_job(scripted("x"), "go")
        assert queue_length(r, queue) == 1  # on the settings' Redis, not the environment's broker
        assert (
            celery_app("actorq-check", settings)
            .connection_for_write()
            .as_uri()
            .startswith("redis://")
        )
    finally:
        if job_id:
            client.cancel_job(job_id)
        r.delete(queue)
        r.close()
        client.close()
