"""A worker given a bad setting stops at start, naming the variable, instead of
looking ready and failing every job it takes."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from ops.stack import WorkerProcess
from producer import Client, JobStatus, Settings
from tests.helpers import scripted

BAD = [
    ("ACTORQ_PROVIDER_RETRIES", "abc"),
    ("ACTORQ_STALL_TIMEOUT_MS", "0"),
    ("ACTORQ_LEASE_TTL_S", "0"),
    ("ACTORQ_REDIS_CONNECTIONS", "-1"),
    ("ACTORQ_PUBLISH_INTERVAL_MS", "soon"),
    ("ACTORQ_METRICS_PORT", "abc"),
    ("ACTORQ_GC_FREEZE", "yes"),
    ("ACTORQ_GC_THRESHOLD", "1,2"),
]


@pytest.mark.parametrize(("name", "value"), BAD, ids=[f"{n}={v}" for n, v in BAD])
def test_a_bad_setting_stops_the_worker_at_start(
    stack_env: dict[str, str], tmp_path: Path, name: str, value: str
) -> None:
    queue = f"actorq-badenv-{uuid.uuid4().hex[:8]}"
    env = {**stack_env, "ACTORQ_QUEUE": queue, name: value}
    log = tmp_path / "worker.log"
    worker = WorkerProcess(env=env, name=f"badenv-{uuid.uuid4().hex[:6]}", log_path=log)
    worker.start()
    try:
        assert worker.proc is not None
        code = worker.proc.wait(timeout=60)
        assert code != 0
        text = log.read_text(errors="replace")
        assert name in text, text[-2000:]
    finally:
        worker.stop()
    # Nothing was taken off its queue: a job sent there waits for a good worker.
    client = Client(Settings.from_env({**stack_env, "ACTORQ_QUEUE": queue}))
    try:
        job = client.enqueue_actor_job(scripted("waits"), "go")
        time.sleep(0.2)
        assert client.get_status(job) is JobStatus.QUEUED
        assert client.cancel_job(job).value == "cancelled"
    finally:
        client.redis.delete(queue)
        client.close()
