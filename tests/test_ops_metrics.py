"""Worker metrics scraped from a real worker's endpoint, and its structured JSON logs."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ops.stack import WorkerProcess, free_port
from producer import Client, JobStatus, Settings
from producer.client import celery_app
from tests.conftest import WorkerFactory
from tests.helpers import scripted
from tests.ops_support import ROOT, http_get


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta_once(
    port: int,
    before: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    name: str,
    want: float,
    **labels: str,
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The change since ``before`` once ``name{labels}`` moved by ``want`` (or after 10 s):
    a job's record is written before its worker counts it."""
    deadline = time.monotonic() + 10
    while True:
        delta = {k: v - before.get(k, 0.0) for k, v in scrape(port).items()}
        if value(delta, name, **labels) >= want or time.monotonic() > deadline:
            return delta
        time.sleep(0.1)


@pytest.fixture(scope="module")
def metered(
    start_worker: WorkerFactory,
    stack_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[WorkerProcess, int, Client]]:
    """A worker on its own queue with metrics (multiprocess mode) and JSON logs."""
    port = free_port()
    queue = f"actorq-metrics-{uuid.uuid4().hex[:8]}"
    multiproc = tmp_path_factory.mktemp("prom")
    env = {
        "ACTORQ_QUEUE": queue,
        "ACTORQ_METRICS_PORT": str(port),
        "ACTORQ_METRICS_ADDR": "127.0.0.1",
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
        "ACTORQ_LOG_JSON": "1",
    }
    worker = start_worker(f"metrics-{uuid.uuid4().hex[:6]}", concurrency=20, env=env)
    client = Client(Settings.from_env({**stack_env, **env}))
    yield worker, port, client
    client.close()


def test_metrics_count_what_the_worker_did(metered: tuple[WorkerProcess, int, Client]) -> None:
    _, port, client = metered
    before = scrape(port)
    done = [
        client.enqueue_actor_job(scripted("one two three four", token_delay_ms=5), "go")
        for _ in range(3)
    ]
    slow = client.enqueue_actor_job(scripted("x " * 200, token_delay_ms=50), "slow")
    tokens = 0
    for job_id in done:
        record = client.wait_result(job_id, timeout=30)
        assert record.status is JobStatus.SUCCEEDED
        tokens += sum(1 for e in client.stream_events(job_id, timeout=5) if e.type == "token")
    # While the slow job streams, it is in flight.
    deadline = time.monotonic() + 20
    while client.get_status(slow) is not JobStatus.RUNNING and time.monotonic() < deadline:
        time.sleep(0.05)
    during = scrape(port)
    assert value(during, "actorq_streams_in_flight") >= 1
    client.cancel_job(slow)
    record = client.wait_result(slow, timeout=30)
    assert record.status is JobStatus.CANCELLED
    tokens += sum(1 for e in client.stream_events(slow, timeout=5) if e.type == "token")

    # A job's record is written before the worker counts its ending: wait, bounded.
    deadline = time.monotonic() + 10
    while True:
        after = scrape(port)
        delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
        ended = sum(value(delta, "actorq_jobs_total", status=s) for s in ("succeeded", "cancelled"))
        idle = value(after, "actorq_streams_in_flight") == 0
        if (ended >= 4 and idle) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert value(delta, "actorq_jobs_total", status="succeeded") == 3
    assert value(delta, "actorq_jobs_total", status="cancelled") == 1
    assert value(delta, "actorq_cancels_total") == 1
    assert value(delta, "actorq_tokens_published_total") == tokens
    assert value(delta, "actorq_events_published_total", type="token") == tokens
    assert value(delta, "actorq_time_to_first_token_seconds_count") == 4
    assert value(delta, "actorq_job_duration_seconds_count", status="succeeded") == 3
    assert value(delta, "actorq_publish_lag_seconds_count") >= 1
    # The shared loop ran the jobs: its thread's CPU and its lag are sampled.
    assert value(delta, "actorq_loop_cpu_seconds_total") > 0
    assert value(delta, "actorq_loop_lag_seconds_count") >= 1
    assert value(after, "actorq_streams_in_flight") == 0
    for name in ("actorq_provider_retries_total", "actorq_redeliveries_total"):
        assert (name, ()) in after  # exported even while zero
    # A duplicate delivery of an ended job runs nothing and is counted as skipped.
    app = celery_app("actorq-test", client.settings)
    app.send_task(
        "actorq.run_job", args=[done[0], "tester"], kwargs={"v": 1}, queue=client.settings.queue
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if value(scrape(port), "actorq_deliveries_skipped_total", reason="terminal") >= 1:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the duplicate delivery was not counted")
    print("\nmetrics scraped after the run:")
    for line in http_get(f"http://127.0.0.1:{port}/metrics")[1].decode().splitlines():
        if line.startswith("actorq_") and "_bucket" not in line:
            print("  " + line)


def test_every_job_log_line_carries_job_attempt_and_actor(
    metered: tuple[WorkerProcess, int, Client],
) -> None:
    worker, _, client = metered
    job_id = client.enqueue_actor_job(scripted("logged"), "go")
    client.wait_result(job_id, timeout=30)
    assert worker.log_path is not None
    deadline = time.monotonic() + 10
    mine: list[dict[str, str]] = []
    while time.monotonic() < deadline:
        records = [
            json.loads(line)
            for line in Path(worker.log_path).read_text().splitlines()
            if line.startswith("{")
        ]
        mine = [r for r in records if r["job_id"] == job_id]
        if any(r["logger"] == "celery.app.trace" for r in mine):
            break
        time.sleep(0.1)
    assert records and all(
        {"ts", "level", "logger", "message", "job_id", "attempt", "actor"} <= r.keys()
        for r in records
    )
    loggers = {r["logger"] for r in mine}
    assert {"celery.worker.strategy", "actorq.jobs", "celery.app.trace"} <= loggers, loggers
    assert all(r["actor"] == "tester" for r in mine)
    assert any(r["attempt"] == "1" and r["logger"] == "actorq.jobs" for r in mine)
    assert all(r["attempt"] == "1" for r in mine if r["logger"] != "celery.worker.strategy")
    assert all(job_id in r["message"] or r["job_id"] == job_id for r in mine)


class FlakyOpenAI:
    """An OpenAI-compatible chat server on 127.0.0.1 that fails the way providers do:
    the first call gets a 429, the second streams three tokens and then the
    connection is cut mid-body, the third streams the whole reply."""

    WORDS = ["Retried", " and", " reset", " but", " whole", " in", " the", " end."]

    def __init__(self) -> None:
        import http.server
        import threading

        calls = self.calls = [0]
        words = self.WORDS

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: object) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                calls[0] += 1
                if calls[0] == 1:
                    body = b'{"error": {"message": "slow down", "type": "rate_limit"}}'
                    self.send_response(429)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                cut = calls[0] == 2
                for i, word in enumerate(words):
                    if cut and i == 3:
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(2)  # mid-body: an incomplete chunked read
                        return
                    self._chunk({"delta": {"content": word}, "finish_reason": None})
                    time.sleep(0.02)
                self._chunk({"delta": {}, "finish_reason": "stop"})
                self._send(b"data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")

            def _chunk(self, choice: dict[str, object]) -> None:
                data = {
                    "id": "c",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": "gpt-test",
                    "choices": [{"index": 0, **choice}],
                }
                self._send(f"data: {json.dumps(data)}\n\n".encode())

            def _send(self, payload: bytes) -> None:
                self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
                self.wfile.flush()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_provider_retries_and_resets_are_counted(
    metered: tuple[WorkerProcess, int, Client],
) -> None:
    _, port, client = metered
    server = FlakyOpenAI()
    try:
        before = scrape(port)
        config = {
            "type": "llm",
            "name": "flaky",
            "provider": "openai",
            "model": "gpt-test",
            "base_url": f"http://127.0.0.1:{server.port}/v1",
        }
        job_id = client.enqueue_actor_job(config, "go")
        record = client.wait_result(job_id, timeout=60)
        assert record.status is JobStatus.SUCCEEDED, record.error
        assert record.result is not None and record.result.text == "".join(FlakyOpenAI.WORDS)
        assert server.calls[0] == 3
        delta = delta_once(port, before, "actorq_jobs_total", 1, status="succeeded")
        assert value(delta, "actorq_provider_retries_total") == 2
        assert value(delta, "actorq_resets_total", reason="retry") == 1
        assert value(delta, "actorq_events_published_total", type="reset") == 1
        assert value(delta, "actorq_jobs_total", status="succeeded") == 1
    finally:
        server.close()


def test_a_job_the_claim_ends_itself_counts_as_ended(
    metered: tuple[WorkerProcess, int, Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivery of a job whose attempts are used up runs nothing, but its claim
    writes the job's ending (failed): the worker counts that job as ended."""
    from producer import keys, scripts
    from producer.schema import TASK_NAME, task_message

    _, port, client = metered
    with monkeypatch.context() as m:  # the job's record, as after lost attempts: no message yet
        m.setattr(client, "_send", lambda *_: None)
        job_id = client.enqueue_actor_job(scripted("never runs"), "go")
    try:
        client.redis.hset(keys.job_key(job_id), "attempt", client.settings.max_attempts)
        before = scrape(port)
        client.celery.send_task(
            TASK_NAME, queue=client.settings.queue, **task_message(job_id, "go")
        )
        record = client.wait_result(job_id, timeout=60)
        assert record.status is JobStatus.FAILED and record.error_type == "AttemptsExhausted"
        delta = delta_once(port, before, "actorq_jobs_total", 1, status="failed")
        assert value(delta, "actorq_deliveries_skipped_total", reason="exhausted") == 1
        assert value(delta, "actorq_jobs_total", status="failed") == 1
    finally:  # never indexed (no message went out at enqueue): the suite's sweep misses it
        client.redis.delete(*scripts.job_keys(job_id))


def test_metrics_endpoint_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.metrics import serve

    monkeypatch.delenv("ACTORQ_METRICS_PORT", raising=False)
    assert serve() is None  # off unless asked for
    monkeypatch.setenv("ACTORQ_METRICS_PORT", "nine")
    with pytest.raises(ValueError, match="ACTORQ_METRICS_PORT"):
        serve()
    monkeypatch.setenv("ACTORQ_METRICS_PORT", "0")  # any free port
    bound = serve(addr="127.0.0.1")
    assert bound and http_get(f"http://127.0.0.1:{bound}/metrics")[0] == 200


def test_a_killed_process_leaves_the_streams_in_flight_at_the_next_scrape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal
    import subprocess
    import sys

    from prometheus_client import generate_latest

    from worker import metrics

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    # A worker process with two streams in flight, killed without a clean exit.
    code = "import time, worker.metrics as m; m.IN_FLIGHT.inc(2); print('up', flush=True); time.sleep(60)"
    child = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "up"
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))

        def in_flight() -> float:
            registry = metrics._registry()
            assert registry is not None
            for line in generate_latest(registry).decode().splitlines():
                if line.startswith("actorq_streams_in_flight "):
                    return float(line.split()[1])
            return 0.0

        assert in_flight() == 2.0  # alive: counted
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        assert in_flight() == 0.0  # gone: dropped, though it never said so
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
