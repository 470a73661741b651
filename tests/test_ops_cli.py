"""The ``actorq`` job commands as a user runs them: real processes, real Redis and workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from ops.cli import build_parser
from ops.commands import Exit, worker_argv
from ops.flower import FlowerConfigError, FlowerOptions, flower_command, format_task
from producer import Client, JobStatus, Settings
from producer.schema import parse_task_args
from tests.helpers import scripted
from tests.ops_support import ROOT, Service, actorq

pytestmark = pytest.mark.usefixtures("workers")

REPLY = "tokens stream from the cli as they come"


@pytest.fixture
def actor_file(tmp_path: Path) -> Path:
    path = tmp_path / "actor.json"
    path.write_text(json.dumps(scripted(REPLY, token_delay_ms=5)))
    return path


def test_enqueue_tail_status_jobs(
    stack_env: dict[str, str], actor_file: Path, client: Client
) -> None:
    done = actorq("enqueue", "--config", str(actor_file), "hello", env=stack_env)
    assert done.returncode == Exit.OK, done.stderr
    job_id = done.stdout.strip()
    client.wait_result(job_id, timeout=30)

    tail = actorq("tail", job_id, env=stack_env)
    assert tail.returncode == Exit.OK
    assert tail.stdout.strip() == REPLY
    assert "[succeeded]" in tail.stderr

    lines = [
        json.loads(x) for x in actorq("tail", job_id, "--json", env=stack_env).stdout.splitlines()
    ]
    assert lines[0]["type"] == "start" and lines[-1] == {
        **lines[-1],
        "type": "done",
        "status": "succeeded",
    }
    assert "".join(x.get("text", "") for x in lines) == REPLY
    later = actorq("tail", job_id, "--json", "--after", lines[2]["id"], env=stack_env)
    assert [json.loads(x)["id"] for x in later.stdout.splitlines()] == [x["id"] for x in lines[3:]]

    status = actorq("status", job_id, env=stack_env)
    assert status.returncode == Exit.OK and status.stdout.startswith("succeeded")
    record = json.loads(actorq("status", job_id, "--json", env=stack_env).stdout)
    assert record["status"] == "succeeded" and record["result"]["text"] == REPLY

    jobs = json.loads(actorq("jobs", "--json", "--limit", "50", env=stack_env).stdout)
    mine = next(j for j in jobs if j["job_id"] == job_id)
    assert mine["status"] == "succeeded" and mine["actor"] == "tester"
    assert mine["output_tokens"] == record["result"]["output_tokens"] > 0
    table = actorq("jobs", "--status", "succeeded", "--limit", "50", env=stack_env).stdout
    assert job_id in table and table.splitlines()[0].split()[:3] == ["JOB", "STATUS", "ACTOR"]


def test_follow_streams_live_and_exits_with_the_job_status(
    stack_env: dict[str, str], tmp_path: Path, client: Client
) -> None:
    slow = tmp_path / "slow.json"
    slow.write_text(json.dumps(scripted("w " * 40, token_delay_ms=100)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "enqueue", "--config", str(slow), "--follow", "hi"],
        env={**os.environ, **stack_env, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        job_line = proc.stderr.readline().decode()
        assert job_line.startswith("job ")
        job_id = job_line.split()[1]
        first = proc.stdout.read(2)  # the first token, printed as it arrives
        assert first == b"w "
        assert client.get_status(job_id) is JobStatus.RUNNING  # ...while the job still runs
        cancel = actorq("cancel", job_id, "--json", env=stack_env)
        assert json.loads(cancel.stdout) == {"job_id": job_id, "outcome": "requested"}
        assert proc.wait(30) == Exit.CANCELLED
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert actorq("tail", job_id, env=stack_env).returncode == Exit.CANCELLED
    again = actorq("cancel", job_id, env=stack_env)
    assert again.returncode == Exit.OK and again.stdout.strip() == "finished"


def test_bad_input_exits_with_clear_codes(
    stack_env: dict[str, str], tmp_path: Path, client: Client
) -> None:
    before = client.redis.zcard("actorq:jobs")
    cases = {
        ("status", "no-such-job"): (Exit.NOT_FOUND, "no such job"),
        ("tail", "no-such-job"): (Exit.NOT_FOUND, "no such job"),
        ("cancel", "no-such-job"): (Exit.NOT_FOUND, "no such job"),
        ("status", "bad id!"): (Exit.USAGE, "job_id"),
        ("tail", "x", "--after", "nope"): (Exit.USAGE, "after"),
        ("enqueue", "--config", str(tmp_path / "missing.json"), "hi"): (Exit.USAGE, "config"),
        ("jobs", "--status", "sideways"): (Exit.USAGE, "status"),
    }
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    cases[("enqueue", "--config", str(bad_json), "hi")] = (Exit.USAGE, "config")
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"type": "llm", "provider": "nope"}))
    cases[("enqueue", "--config", str(unknown), "hi")] = (Exit.USAGE, "config.provider")
    cases[("enqueue", "--config", str(unknown), "--limits", '{"timeout_ms": -1}', "hi")] = (
        Exit.USAGE,
        "",
    )
    for args, (code, text) in cases.items():
        got = actorq(*args, env=stack_env)
        assert got.returncode == code, (args, got.returncode, got.stderr)
        assert text in got.stderr, (args, got.stderr)
        assert "Traceback" not in got.stderr
    assert client.redis.zcard("actorq:jobs") == before  # nothing half-written
    down = actorq("status", "x", env={**stack_env, "REDIS_URL": "redis://127.0.0.1:1/0"})
    assert down.returncode == Exit.UNAVAILABLE and "cannot reach" in down.stderr
    # ...and the system still serves the next job.
    ok = actorq("enqueue", "--config", str(unknown).replace("unknown", "ok"), "hi", env=stack_env)
    assert ok.returncode == Exit.USAGE  # that file does not exist either
    good = tmp_path / "good.json"
    good.write_text(json.dumps(scripted("fine")))
    job = actorq(
        "enqueue", "--config", str(good), "--follow", "--timeout", "30", "hi", env=stack_env
    )
    assert job.returncode == Exit.OK and job.stdout.strip() == "fine"


def test_exit_codes_at_the_edges(stack_env: dict[str, str], tmp_path: Path, client: Client) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(scripted("fine")))
    # The broker away: "unavailable", not a traceback.
    dead = {**stack_env, "CELERY_BROKER_URL": "redis://127.0.0.1:1/0"}
    down = actorq("enqueue", "--config", str(good), "hi", env=dead)
    assert down.returncode == Exit.UNAVAILABLE and "cannot reach" in down.stderr, down.stderr
    assert "Traceback" not in down.stderr
    # Tailing from the ending (a resumed follower): the job's own status at once.
    job_id = client.enqueue_actor_job(scripted("fine"), "go")
    record = client.wait_result(job_id, timeout=30)
    assert record.done_id is not None
    tail = actorq("tail", job_id, "--after", record.done_id, "--timeout", "10", env=stack_env)
    assert tail.returncode == Exit.OK and tail.stdout == "", tail.stderr
    # Settings and arguments out of range are usage errors naming what is wrong.
    worker = actorq("worker", env={**stack_env, "ACTORQ_CONCURRENCY": "abc"})
    assert worker.returncode == Exit.USAGE and "ACTORQ_CONCURRENCY" in worker.stderr
    for limit in ("0", "-3"):
        jobs = actorq("jobs", "--limit", limit, env=stack_env)
        assert jobs.returncode == Exit.USAGE and "--limit" in jobs.stderr


def test_actorq_worker_runs_jobs_with_threads_pool(
    stack_env: dict[str, str], tmp_path: Path, session_tag: str
) -> None:
    queue = f"cli-worker-{session_tag}-{uuid.uuid4().hex[:6]}"
    env = {**stack_env, "ACTORQ_QUEUE": queue}
    worker = Service(
        ["worker", "--concurrency", "8", "--", "--without-mingle", "--without-gossip"],
        env,
        tmp_path / "worker.log",
    ).start()
    own = Client(Settings.from_env(env))
    try:
        job_id = own.enqueue_actor_job(scripted("served by actorq worker"), "hi")
        record = own.wait_result(job_id, timeout=60)
        assert record.status is JobStatus.SUCCEEDED
    finally:
        worker.stop()
        own.close()
    log = (tmp_path / "worker.log").read_text()
    assert "concurrency: 8 (thread)" in log
    assert f"job={job_id}" in log


def test_parser_and_argv_defaults() -> None:
    parser = build_parser()
    commands = {
        "worker",
        "enqueue",
        "tail",
        "status",
        "cancel",
        "jobs",
        "flower",
        "router",
        "demo",
        "up",
        "keygen",
    }
    assert commands <= set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    argv = worker_argv(concurrency=None, extra=["--autoscale", "10,2"])
    assert argv[1:8] == ["-m", "celery", "-A", "worker.app", "worker", "--pool", "threads"]
    assert argv[-2:] == ["--autoscale", "10,2"] and "--concurrency" in argv
    args = parser.parse_args(["worker", "--", "-Q", "a,b"])
    assert args.celery_args[-2:] == ["-Q", "a,b"]


def test_flower_refuses_to_start_without_auth(stack_env: dict[str, str]) -> None:
    env = {k: v for k, v in stack_env.items() if not k.startswith("FLOWER_")}
    started = time.monotonic()
    got = actorq("flower", "--port", "1", env=env, timeout=30)
    assert got.returncode == 2 and "refusing to start Flower without authentication" in got.stderr
    assert time.monotonic() - started < 30
    with pytest.raises(FlowerConfigError):
        flower_command(FlowerOptions(), env={})
    with pytest.raises(FlowerConfigError):
        flower_command(FlowerOptions(basic_auth=["nopassword"]), env={})
    with pytest.raises(FlowerConfigError, match="','"):  # Flower would let "ops:pa" and "ss" in
        flower_command(FlowerOptions(basic_auth=["ops:pa,ss"]), env={})
    with pytest.raises(FlowerConfigError):
        flower_command(FlowerOptions(local=True, url_prefix="a b"), env={})
    argv, fenv = flower_command(
        FlowerOptions(basic_auth=["u:p"], read_only=True, url_prefix="/ops/flower/"), env={}
    )
    assert "--read_only=true" in argv and "--url_prefix=ops/flower" in argv
    assert not any("u:p" in a for a in argv) and fenv["FLOWER_BASIC_AUTH"] == "u:p"
    argv, _ = flower_command(FlowerOptions(local=True), env={})
    assert "--address=127.0.0.1" in argv
    argv, fenv = flower_command(FlowerOptions(), env={"ACTORQ_FLOWER_BASIC_AUTH": "a:b,c:d"})
    assert fenv["FLOWER_BASIC_AUTH"] == "a:b,c:d" and "--address=0.0.0.0" in argv


def test_flower_task_formatter_names_the_job(
    client: Client, stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ops.flower

    # Flower's process reads the job store from its environment, as here.
    monkeypatch.setenv("REDIS_URL", stack_env["REDIS_URL"])
    monkeypatch.setattr(ops.flower, "_redis", None)
    job_id = client.enqueue_actor_job(scripted("format me"), "hi")
    client.wait_result(job_id, timeout=30)

    class FakeTask:  # the attributes Flower's task object has
        _fields = ("uuid", "name", "args", "result")

        def __init__(self, args: str) -> None:
            self.uuid, self.name, self.args, self.result = (
                "u",
                "actorq.run_job",
                args,
                "'succeeded'",
            )

    task = format_task(FakeTask(repr((job_id, "tester"))))
    assert task.name == f"tester · {job_id}"
    assert (task.job_status, task.attempt, task.result) == ("succeeded", 1, "succeeded · attempt 1")
    assert {"job_id", "actor", "job_status", "attempt"} <= set(task._fields)
    other = format_task(FakeTask("[1, 2]"))
    assert other.name == "actorq.run_job"
    assert parse_task_args("('abc', '')") == ("abc", "")
    assert parse_task_args("__import__('os')") is None
