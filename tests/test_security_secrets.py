"""Credentials never at rest in the clear: a scan of Redis, logs, Flower and inspect replies.

Jobs carry a distinctive random API key to the OpenAI-compatible test server
and succeed, fail on a 401 that echoes the key, retry after a 500 that echoes
it, get cancelled, and are retried after their worker is SIGKILLed. Then every
place a secret could rest is searched for the key, its base64 forms and its
first 12 characters.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from ops.stack import WorkerProcess
from producer import Client, JobStatus, SecretKeyMissing, Settings
from producer.client import celery_app
from producer.crypto import generate_key
from tests.conftest import RedisTarget, WorkerFactory, hostname
from tests.helpers import actorq_keys, queue_length, scripted
from tests.openai_server import FakeOpenAI, Reply
from tests.security_support import FlowerProcess, find_secret, redis_dump

LONG = " ".join(f"word{i}" for i in range(60))


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def openai_config(server: FakeOpenAI, model: str) -> dict[str, Any]:
    return {
        "type": "llm",
        "name": "secure",
        "provider": "openai",
        "model": model,
        "base_url": server.base_url,
    }


@pytest.fixture
def private_stack(
    stack_env: dict[str, str], start_worker: WorkerFactory
) -> Iterator[tuple[dict[str, str], Client, Callable[[str], WorkerProcess]]]:
    """A queue of this test's own, short leases, and a way to start workers on it."""
    env = {**stack_env, "ACTORQ_QUEUE": f"actorq-sec-{uuid.uuid4().hex[:8]}", "ACTORQ_LEASE_TTL_S": "3"}
    client = Client(Settings.from_env(env))

    def worker(name: str) -> WorkerProcess:
        return start_worker(f"{name}-{uuid.uuid4().hex[:6]}", concurrency=8, env=env)

    yield env, client, worker
    client.close()


def _inspect_app(env: dict[str, str]) -> Celery:
    return celery_app("actorq-inspect", Settings.from_env(env))


def test_no_secret_in_redis_logs_flower_or_inspect(
    private_stack: tuple[dict[str, str], Client, Callable[[str], WorkerProcess]],
    openai_server: FakeOpenAI,
    redis_target: RedisTarget,
    tmp_path: Path,
) -> None:
    env, client, start = private_stack
    key = f"live-{secrets.token_hex(20)}"  # not key-shaped: only value scrubbing can catch it
    creds = {"openai": {"api_key": key, "organization": f"org-{secrets.token_hex(8)}"}}
    tag = uuid.uuid4().hex[:8]
    models = {
        "ok": openai_server.script(f"ok-{tag}", Reply(text="all good here")),
        "denied": openai_server.script(f"denied-{tag}", Reply(status=401, echo_key=True)),
        "flaky": openai_server.script(
            f"flaky-{tag}", Reply(status=500, echo_key=True), Reply(text="recovered fine")
        ),
        "slow": openai_server.script(f"slow-{tag}", Reply(text=LONG, chunk_delay_s=0.3)),
        "killed": openai_server.script(f"killed-{tag}", Reply(text=LONG, chunk_delay_s=0.05)),
    }
    flower = FlowerProcess(env, log_path=tmp_path / "flower.log").start()
    inspect_app = _inspect_app(env)
    try:
        first = start("sec-a")

        def enqueue(kind: str) -> str:
            return client.enqueue_actor_job(
                openai_config(openai_server, models[kind]), f"please {kind}", credentials=creds
            )

        ok, denied, flaky = enqueue("ok"), enqueue("denied"), enqueue("flaky")
        assert client.wait_result(ok, timeout=60).status is JobStatus.SUCCEEDED
        rec = client.wait_result(denied, timeout=60)
        assert rec.status is JobStatus.FAILED
        assert rec.error and "Incorrect API key provided" in rec.error and "[redacted]" in rec.error
        rec = client.wait_result(flaky, timeout=60)
        assert rec.status is JobStatus.SUCCEEDED
        assert len(openai_server.calls(models["flaky"])) == 2  # the echoing 500 was retried
        # the server really was sent the key each time
        sent = {k.lower(): v for k, v in openai_server.calls(models["denied"])[0].headers.items()}
        assert sent["authorization"] == f"Bearer {key}"

        # cancelled mid-stream; inspect active / reserved while it runs
        slow = enqueue("slow")
        wait_until(lambda: client.get_status(slow) is JobStatus.RUNNING, 30, "slow job to run")
        inspect = inspect_app.control.inspect(destination=[f"{first.name}@{hostname()}"], timeout=5)
        replies = json.dumps([inspect.active(), inspect.reserved()], default=str).encode()
        assert slow.encode() in replies, "inspect did not see the running job"
        assert find_secret(replies, key) == []
        client.cancel_job(slow)
        assert client.wait_result(slow, timeout=30).status is JobStatus.CANCELLED

        # retried after its worker is SIGKILLed mid-stream: another worker finishes it
        killed = enqueue("killed")
        first_pid = first.pid
        for event in client.stream_events(killed, timeout=30):
            if event.type == "start":
                assert event.fields["worker"].endswith(f":{first_pid}")
            if event.type == "token":
                break
        first.kill()
        second = start("sec-b")
        wake = client.enqueue_actor_job(scripted("wake the sweeper"), "go")
        assert client.wait_result(wake, timeout=60).status is JobStatus.SUCCEEDED
        rec = client.wait_result(killed, timeout=90)
        assert rec.status is JobStatus.SUCCEEDED
        assert rec.attempt >= 2 and rec.worker and not rec.worker.endswith(f":{first_pid}")

        # -- the scan ---------------------------------------------------------------
        hits: list[str] = []
        r = redis_target.client()
        scanned = 0
        for name, kind, blob in redis_dump(r):
            scanned += 1
            for form in find_secret(blob, key):
                hits.append(f"redis {kind.decode()} {name!r}: {form!r}")
        assert scanned > 0
        log_dir = second.log_path.parent if second.log_path else None
        assert log_dir is not None
        logs = sorted(log_dir.glob("*.log"))
        assert first.log_path in logs and second.log_path in logs
        assert b"Task actorq.run_job" in first.log_path.read_bytes()  # the logs are real
        for path in [*logs, flower.log_path]:
            for form in find_secret(path.read_bytes(), key):
                hits.append(f"log {path.name}: {form!r}")

        tasks = json.loads(flower.get("/api/tasks"))
        ours = {
            tid: t
            for tid, t in tasks.items()
            if any(j in str(t.get("args")) for j in (ok, denied, flaky, slow, killed))
        }
        assert len(ours) >= 5, f"flower saw {len(ours)} of our tasks"
        pages = ["/", "/tasks", "/api/workers?refresh=1", "/broker"]
        pages += [f"/task/{tid}" for tid in ours]
        pages += [f"/worker/{w.name}@{hostname()}" for w in (second,)]
        for page in pages:
            flower.get(page)
        for page, body in flower.fetched.items():
            for form in find_secret(body, key):
                hits.append(f"flower {page}: {form!r}")
        assert hits == [], "\n".join(hits)
        # Flower really shows the job id (argsrepr), just nothing secret
        assert any(killed.encode() in body for body in flower.fetched.values())
    finally:
        inspect_app.close()
        flower.stop()


def test_credentials_without_a_secret_key_are_refused_and_write_nothing(
    stack_env: dict[str, str], redis_target: RedisTarget
) -> None:
    env = {k: v for k, v in stack_env.items() if k != "ACTORQ_SECRET_KEY"}
    client = Client(Settings.from_env(env))
    r = redis_target.client()
    before_keys, before_queue = actorq_keys(r), queue_length(r, env["ACTORQ_QUEUE"])
    try:
        with pytest.raises(SecretKeyMissing) as info:
            client.enqueue_actor_job(
                scripted(),
                "hi",
                credentials={"openai": {"api_key": "sk-unencryptable"}},
                idempotency_key=f"nokey-{uuid.uuid4().hex}",
            )
        assert "ACTORQ_SECRET_KEY" in str(info.value)
        assert actorq_keys(r) - before_keys == set()
        assert queue_length(r, env["ACTORQ_QUEUE"]) == before_queue
        # a malformed key is refused the same way
        bad = Client(Settings.from_env({**env, "ACTORQ_SECRET_KEY": "not-a-fernet-key"}))
        with pytest.raises(SecretKeyMissing, match="not a valid Fernet key"):
            bad._build_payload(
                scripted(), "hi", {"openai": {"api_key": "k"}}, None, None, None, None
            )
        # jobs without credentials need no key
        assert client._build_payload(scripted(), "hi", None, None, None, None, None)[1] == "tester"
    finally:
        client.close()


def test_key_rotation_with_real_workers(
    stack_env: dict[str, str], start_worker: WorkerFactory, openai_server: FakeOpenAI
) -> None:
    """A worker holding "new,old" runs jobs enqueued with "old" and with "new"; a worker
    holding only "new" ends an "old" job failed with a clear error, and keeps serving."""
    old, new = generate_key(), generate_key()
    queue = f"actorq-rot-{uuid.uuid4().hex[:8]}"
    base = {**stack_env, "ACTORQ_QUEUE": queue}
    model = openai_server.script(f"rot-{uuid.uuid4().hex[:6]}", Reply(text="rotated ok"))
    config = openai_config(openai_server, model)
    creds = {"openai": {"api_key": f"rot-{secrets.token_hex(12)}"}}
    old_client = Client(Settings.from_env({**base, "ACTORQ_SECRET_KEY": old}))
    new_client = Client(Settings.from_env({**base, "ACTORQ_SECRET_KEY": f"{new},{old}"}))
    worker = start_worker(
        f"rot-{uuid.uuid4().hex[:6]}",
        concurrency=4,
        env={**base, "ACTORQ_SECRET_KEY": f"{new},{old}"},
    )
    try:
        j_old = old_client.enqueue_actor_job(config, "hi", credentials=creds)
        j_new = new_client.enqueue_actor_job(config, "hi", credentials=creds)
        assert old_client.wait_result(j_old, timeout=60).status is JobStatus.SUCCEEDED
        assert new_client.wait_result(j_new, timeout=60).status is JobStatus.SUCCEEDED
        # the first key encrypts: a holder of only the old key can't read new tokens
        from producer.crypto import decrypt_credentials

        payload, _ = new_client._build_payload(config, "hi", creds, None, None, None, None)
        assert decrypt_credentials(payload["credentials"], [new]) == creds
        with pytest.raises(Exception, match="cannot decrypt"):
            decrypt_credentials(payload["credentials"], [old])
        worker.stop()
        # old key retired from the worker: old jobs fail clearly, the worker serves the next
        start_worker(
            f"rot2-{uuid.uuid4().hex[:6]}", concurrency=4, env={**base, "ACTORQ_SECRET_KEY": new}
        )
        j_stale = old_client.enqueue_actor_job(config, "hi", credentials=creds)
        rec = old_client.wait_result(j_stale, timeout=60)
        assert rec.status is JobStatus.FAILED and rec.error_type == "CredentialsError"
        assert rec.error and "cannot decrypt" in rec.error
        j_next = new_client.enqueue_actor_job(config, "hi", credentials=creds)
        assert new_client.wait_result(j_next, timeout=60).status is JobStatus.SUCCEEDED
    finally:
        old_client.close()
        new_client.close()


def test_the_scan_finds_a_planted_secret_in_every_type(redis_target: RedisTarget) -> None:
    """Guard for the scan itself: a secret planted anywhere, in any encoding, is found."""
    import base64

    key = f"plant-{secrets.token_hex(16)}"
    tag = f"actorq-scan-test:{uuid.uuid4().hex[:8]}"
    r = redis_target.client()
    body = base64.b64encode(json.dumps([["job", "x"], {"k": key}]).encode()).decode()
    planted = {
        f"{tag}:string": lambda k: r.set(k, f"xx{key[:12]}yy"),
        f"{tag}:hash": lambda k: r.hset(k, "f", base64.b64encode(b"?" + key.encode())),
        f"{tag}:list": lambda k: r.rpush(k, json.dumps({"body": body})),
        f"{tag}:set": lambda k: r.sadd(k, key),
        f"{tag}:zset": lambda k: r.zadd(k, {key: 1}),
        f"{tag}:stream": lambda k: r.xadd(k, {"text": f"Bearer {key}"}),
    }
    try:
        for name, plant in planted.items():
            plant(name)
        found = {
            name.decode()
            for name, _, blob in redis_dump(r)
            if name.startswith(tag.encode()) and find_secret(blob, key)
        }
        assert found == set(planted)
    finally:
        r.delete(*planted)
