"""Garbage reaching a real worker: each ends its job failed (or is rejected) and the worker serves on.

Messages are pushed by hand on the queue (through Celery's send_task with bad
arguments, and as raw kombu messages), and job records are written with
broken payloads, as anyone with broker or Redis access could do.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.fernet import Fernet
from kombu import Connection

from ops.stack import WorkerProcess
from producer import Client, JobStatus, Settings, keys, scripts
from producer.crypto import encrypt_credentials
from producer.schema import SCHEMA_VERSION, TASK_NAME
from tests.conftest import RedisTarget, WorkerFactory
from tests.helpers import scripted, unacked_tags


class Garbage:
    """A private queue served by one worker of its own, and ways to push junk at it."""

    def __init__(self, env: dict[str, str], worker: WorkerProcess, redis_target: RedisTarget):
        self.env = env
        self.queue = env["ACTORQ_QUEUE"]
        self.worker = worker
        self.client = Client(Settings.from_env(env))
        self.r = redis_target.client()
        self.records: list[str] = []  # written here, not enqueued: no index lists them

    def record(self, payload: str | bytes) -> str:
        """Write a job record holding ``payload``, as the producer would, without a message."""
        job_id = f"junk-{uuid.uuid4().hex[:12]}"
        created = self.r.eval(
            scripts.CREATE, 4, *scripts.job_keys(job_id), payload, "junk", f"{time.time():.6f}", 600
        )
        assert created == 1
        self.records.append(job_id)
        return job_id

    def send(self, args: Any, kwargs: Any) -> None:
        self.client.celery.send_task(TASK_NAME, args=args, kwargs=kwargs, queue=self.queue)

    def raw(
        self, body: Any, headers: dict[str, Any], content_type: str = "application/json"
    ) -> None:
        with Connection(self.env["REDIS_URL"]) as conn:
            producer = conn.Producer()
            if isinstance(body, str | bytes):
                producer.publish(
                    body,
                    exchange="",
                    routing_key=self.queue,
                    headers=headers,
                    content_type=content_type,
                    content_encoding="utf-8",
                )
            else:
                producer.publish(
                    body, exchange="", routing_key=self.queue, headers=headers, serializer="json"
                )

    def envelope(self, item: bytes) -> None:
        """Push ``item`` onto the queue as it is, where kombu expects its JSON envelope."""
        self.r.lpush(self.queue, item)

    def good_payload(self, **change: Any) -> dict[str, Any]:
        payload, _ = self.client._build_payload(
            scripted("fine"), "hi", {"openai": {"api_key": "sk-tamper-test-0001"}},
            None, None, None, None,
        )  # fmt: skip
        return {**payload, **change}

    def failed(self, job_id: str, *expected: str) -> str:
        record = self.client.wait_result(job_id, timeout=30)
        assert record.status is JobStatus.FAILED, record
        assert record.error and all(e in record.error for e in expected), record.error
        assert record.worker.endswith(f":{self.worker.pid}")
        return record.error

    def still_serving(self) -> None:
        assert self.worker.proc is not None and self.worker.proc.poll() is None, "worker died"
        job = self.client.enqueue_actor_job(scripted("still serving"), "next")
        record = self.client.wait_result(job, timeout=30)
        assert record.status is JobStatus.SUCCEEDED
        assert record.worker.endswith(f":{self.worker.pid}")

    def drained(self, timeout: float = 20.0) -> None:
        """The junk left the queue (consumed, and acked or rejected: not stuck unacked)."""
        deadline = time.monotonic() + timeout
        while self.r.llen(self.queue) or self._unacked():
            assert time.monotonic() < deadline, "junk message stuck in the broker"
            time.sleep(0.05)

    def _unacked(self) -> int:
        """Unacked messages of this queue (the Redis transport keeps one hash for all queues)."""
        return len(unacked_tags(self.r, self.queue))

    def log(self) -> str:
        assert self.worker.log_path is not None
        return self.worker.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def garbage(
    stack_env: dict[str, str], start_worker: WorkerFactory, redis_target: RedisTarget
) -> Iterator[Garbage]:
    # An actorq- queue: the session's clean-up of a shared Redis drops its bindings.
    env = {**stack_env, "ACTORQ_QUEUE": f"actorq-junk-{uuid.uuid4().hex[:8]}"}
    worker = start_worker(f"junk-{uuid.uuid4().hex[:6]}", concurrency=4, env=env)
    g = Garbage(env, worker, redis_target)
    yield g
    g.client.close()
    worker.stop()
    for job_id in g.records:
        g.r.delete(*scripts.job_keys(job_id))
    g.r.delete(g.queue)
    g.r.close()


# -- stored payloads -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ("{{{ not json", "job payload is not valid JSON"),
        (b"\xff\xfe\x00garbage", "job payload is not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "job payload is not valid JSON (nested too deeply)"),
        ("[1, 2, 3]", "job payload must be a JSON object, not list"),
        ('"just a string"', "job payload must be a JSON object, not str"),
        ("{}", "job payload schema version None is not supported"),
        ('{"v": 2, "config": {}, "message": "hi"}', "job payload schema version 2"),
        ('{"v": true, "config": {}, "message": "hi"}', "job payload schema version True"),
        ('{"v": 1, "config": [], "message": "hi"}', "config must be an object"),
        ('{"v": 1, "config": {"provider": "scripted"}, "message": 5}', "message must be a string"),
        (
            '{"v": 1, "config": {"provider": "scripted"}, "message": "m", "limits": "x"}',
            "limits must be an object",
        ),
        (
            '{"v": 1, "config": {"provider": "acme"}, "message": "m"}',
            "config.provider: unknown provider 'acme'",
        ),
        (
            '{"v": 1, "config": {"provider": "scripted"}, "message": "m", "limits": {"timeout_ms": -1}}',
            "limits.timeout_ms",
        ),
        (
            '{"v": 1, "config": {"provider": "scripted"}, "message": "m", "credentials": 7}',
            "credentials: stored token must be a str, not int",
        ),
    ],
    ids=[
        "not json",
        "not utf-8",
        "nested 100k deep",
        "array",
        "string",
        "no version",
        "version 2",
        "version true",
        "config array",
        "message int",
        "limits string",
        "unknown provider",
        "negative limit",
        "credentials int",
    ],
)
def test_broken_payload_ends_the_job_failed(garbage: Garbage, payload: str, expected: str) -> None:
    job_id = garbage.record(payload)
    garbage.send([job_id, "junk"], {"v": SCHEMA_VERSION})
    garbage.failed(job_id, expected)
    assert not garbage.r.hexists(keys.job_key(job_id), "payload")  # the junk is dropped too
    garbage.still_serving()


def test_a_record_without_its_payload_ends_the_job_failed(garbage: Garbage) -> None:
    job_id = garbage.record(json.dumps(garbage.good_payload()))
    garbage.r.hdel(keys.job_key(job_id), "payload")  # CLAIM then answers without one
    garbage.send([job_id, "junk"], {"v": SCHEMA_VERSION})
    garbage.failed(job_id, "job payload is missing")
    garbage.still_serving()


def test_tampered_ciphertext_ends_the_job_failed(garbage: Garbage) -> None:
    payload = garbage.good_payload()
    token: str = payload["credentials"]
    middle = len(token) // 2
    flipped = token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]
    cases = {
        "flipped": flipped,
        "truncated": token[:-10],
        "foreign key": Fernet(Fernet.generate_key()).encrypt(b'{"openai": {}}').decode(),
        "empty": "",
    }
    ids = {}
    for name, tampered in cases.items():
        ids[name] = garbage.record(json.dumps({**payload, "credentials": tampered}))
        garbage.send([ids[name], "junk"], {"v": SCHEMA_VERSION})
    for name, job_id in ids.items():
        error = garbage.failed(job_id, "credentials: cannot decrypt")
        record = garbage.client.get_result(job_id)
        assert record is not None and record.error_type == "CredentialsError", name
        assert token not in error
    # a validly encrypted token holding the wrong shape is refused too
    odd = encrypt_credentials({"openai": {"api_key": ["x"]}}, garbage.client.settings.secret_keys)  # type: ignore[dict-item]
    job_id = garbage.record(json.dumps({**payload, "credentials": odd}))
    garbage.send([job_id, "junk"], {"v": SCHEMA_VERSION})
    garbage.failed(job_id, "credentials.openai.api_key")
    garbage.still_serving()


# -- messages ------------------------------------------------------------------------


def test_wrong_message_version_or_args_end_the_job_failed(garbage: Garbage) -> None:
    payload = json.dumps(garbage.good_payload())
    cases = [
        ([None, "junk"], {"v": 99}, "message schema version 99 is not supported"),
        ([None, "junk"], {}, "message schema version None"),
        ([None, "junk"], {"v": "1"}, "message schema version '1'"),
        ([None, "junk", "extra"], {"v": SCHEMA_VERSION}, "message has 3 args"),
        ([None, {"actor": 1}], {"v": SCHEMA_VERSION}, "actor name must be a string"),
    ]
    ids = []
    for args, kwargs, expected in cases:
        job_id = garbage.record(payload)
        garbage.send([job_id, *args[1:]], kwargs)
        ids.append((job_id, expected))
    for job_id, expected in ids:
        garbage.failed(job_id, expected)
    garbage.still_serving()


@pytest.mark.parametrize(
    "args",
    [[], [None], [123], ["a}b", "x"], ["x:y"], ["a" * 65], [["nested"]], [{"id": "x"}]],
    ids=["empty", "none", "int", "brace", "colon", "65 chars", "list", "dict"],
)
def test_message_without_a_usable_id_is_rejected(garbage: Garbage, args: list[Any]) -> None:
    before = set(garbage.r.scan_iter(match="actorq:*", count=1000))
    garbage.send(args, {"v": SCHEMA_VERSION})
    garbage.drained()
    garbage.still_serving()
    rejected = [line for line in garbage.log().splitlines() if "rejected a message" in line]
    assert rejected
    # Logged as no job's, not as the job its pool thread ran last.
    assert all("[job=- " in line for line in rejected), rejected
    created = set(garbage.r.scan_iter(match="actorq:*", count=1000)) - before
    assert all(b"junk" not in k and b"a}b" not in k and b"x:y" not in k for k in created)


def test_job_id_with_no_record_runs_nothing_and_writes_nothing(garbage: Garbage) -> None:
    job_id = f"ghost-{uuid.uuid4().hex[:10]}"
    garbage.send([job_id, "junk"], {"v": SCHEMA_VERSION})
    garbage.drained()
    garbage.still_serving()
    assert not list(garbage.r.scan_iter(match=f"*{job_id}*"))
    assert f"job {job_id}: not run (missing)" in garbage.log()


JSON = "application/json"
RAW = [
    ("body not json", b"\x80\x81{{", {"task": TASK_NAME}, JSON),
    ("body a string", '"garbage"', {"task": TASK_NAME}, JSON),
    ("body a dict", json.dumps({"args": ["x"]}), {"task": TASK_NAME}, JSON),
    ("args a string", json.dumps(["abc", {"v": 1}, {}]), {"task": TASK_NAME}, JSON),
    ("args a dict", json.dumps([{"job": "x"}, {"v": 1}, {}]), {"task": TASK_NAME}, JSON),
    ("kwargs a list", json.dumps([["a}b"], [1], {}]), {"task": TASK_NAME}, JSON),
    ("no task header", json.dumps([["x"], {}, {}]), {}, JSON),
    ("unknown task", json.dumps([["x"], {}, {}]), {"task": "os.system"}, JSON),
    # pickle is never accepted (accept_content = json): no code runs from a message
    ("pickle body", b"\x80\x04K\x01.", {"task": TASK_NAME}, "application/x-python-serialize"),
    (
        "yaml body",
        "!!python/object/apply:os.system ['true']",
        {"task": TASK_NAME},
        "application/x-yaml",
    ),
    ("eta garbage", json.dumps([["x"], {}, {}]), {"task": TASK_NAME, "eta": "tomorrow"}, JSON),
    ("timelimit str", json.dumps([["x"], {}, {}]), {"task": TASK_NAME, "timelimit": "x"}, JSON),
    ("retries str", json.dumps([["x"], {}, {}]), {"task": TASK_NAME, "retries": "x"}, JSON),
    ("id int", json.dumps([["x"], {}, {}]), {"task": TASK_NAME, "id": 5}, JSON),
    ("builtin task junk", '"garbage"', {"task": "celery.backend_cleanup"}, JSON),
    ("task header a list", json.dumps([["x"], {}, {}]), {"task": [TASK_NAME]}, JSON),
    ("task header a mapping", json.dumps([["x"], {}, {}]), {"task": {"a": 1}}, JSON),
]


@pytest.mark.parametrize(
    ("body", "headers", "content_type"), [r[1:] for r in RAW], ids=[r[0] for r in RAW]
)
def test_raw_junk_on_the_queue_leaves_the_worker_serving(
    garbage: Garbage, body: Any, headers: dict[str, Any], content_type: str
) -> None:
    garbage.raw(body, {"id": str(uuid.uuid4()), "lang": "py", **headers}, content_type)
    # (the task message, if it had one, was rejected before it could run anything)
    garbage.drained()
    garbage.still_serving()


def _envelope(**properties: Any) -> bytes:
    body = base64.b64encode(json.dumps([["x"], {"v": 1}, {}]).encode()).decode()
    return json.dumps(
        {
            "body": body,
            "content-encoding": "utf-8",
            "content-type": JSON,
            "headers": {"task": TASK_NAME, "id": str(uuid.uuid4()), "lang": "py"},
            "properties": {"body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
                           **properties},
        }
    ).encode()  # fmt: skip


ENVELOPES = [
    ("not json", b"\x80 not json {{"),
    ("a json list", b"[1, 2, 3]"),
    ("delivery_info a string", _envelope(delivery_info="x")),
]


@pytest.mark.parametrize("item", [e[1] for e in ENVELOPES], ids=[e[0] for e in ENVELOPES])
def test_a_queue_item_that_is_no_envelope_is_dropped_and_the_worker_serves_on(
    garbage: Garbage, item: bytes
) -> None:
    if not garbage.env.get("CELERY_BROKER_URL", "redis").startswith("redis"):
        pytest.skip("the item is pushed onto a Redis broker's queue")
    garbage.envelope(item)
    garbage.drained()
    garbage.still_serving()
    assert "dropped a malformed message from the queue" in garbage.log()
