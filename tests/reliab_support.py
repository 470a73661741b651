"""Helpers for the reliability tests: bounded waits, worker lookup, stream checks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import redis

from ops.stack import WorkerProcess
from producer import ActorResult, Client, Event, JobRecord, JobStatus, final_text, keys
from producer.schema import TASK_NAME, task_message

T = TypeVar("T")


def wait_until(
    check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05
) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def retrying(call: Callable[[], T], timeout: float = 30.0) -> T:
    """Run ``call``, retrying Redis connection errors (for tests that restart Redis)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def read_events(client: Client, job_id: str) -> list[Event]:
    """Everything in the job's stream now (no waiting)."""
    raw = client.redis.xrange(f"actorq:job:{{{job_id}}}:events")
    return [Event.from_entry(i, f) for i, f in raw]


def tokens_seen(client: Client, job_id: str, n: int) -> list[Event] | None:
    events = read_events(client, job_id)
    return events if sum(e.type == "token" for e in events) >= n else None


def worker_of(event: Event, workers: Sequence[WorkerProcess]) -> WorkerProcess:
    """The worker process whose ``start`` entry this is (its field is host:pid)."""
    pid = int(event.fields["worker"].rsplit(":", 1)[1])
    for w in workers:
        if w.proc is not None and w.proc.pid == pid:
            return w
    raise AssertionError(f"no running worker has pid {pid}")


def log_count(workers: Sequence[WorkerProcess], text: str) -> int:
    total = 0
    for w in workers:
        if w.log_path is not None and Path(w.log_path).exists():
            total += Path(w.log_path).read_text(errors="replace").count(text)
    return total


def send_duplicate(client: Client, job_id: str, actor: str = "tester") -> None:
    """Deliver the job's task again, by name, as a broker redelivery would."""
    client.celery.send_task(TASK_NAME, queue=client.settings.queue, **task_message(job_id, actor))


def check_one_ending(events: Sequence[Event], record: JobRecord | None) -> None:
    """Exactly one ``done``, last, matching the record; the final text matches on success."""
    types = [e.type for e in events]
    assert types.count("done") == 1, types
    assert types[-1] == "done"
    assert record is not None and record.status.terminal
    assert record.done_id == events[-1].id
    assert events[-1].fields["status"] == record.status.value
    if record.status.value == "succeeded":
        assert record.result is not None
        assert final_text(events) == record.result.text


def summary(label: str, seconds: Sequence[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    return (
        f"{label}: n={len(ms)} p50={statistics.median(ms):.0f} ms max={ms[-1]:.0f} ms "
        f"all={[round(m) for m in ms]}"
    )


def openai_llm(base_url: str, model: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "llm",
        "name": "tester",
        "provider": "openai",
        "model": model,
        "base_url": base_url,
        **extra,
    }


def check_restarted_once(events: Sequence[Event], record: JobRecord | None, text: str) -> None:
    """Attempt 2 succeeded after exactly one ``reset`` (restart); readers end with ``text``."""
    check_one_ending(events, record)
    assert record is not None and record.status is JobStatus.SUCCEEDED and record.attempt == 2
    types = [e.type for e in events]
    assert types.count("reset") == 1 and types.count("start") == 2
    reset = events[types.index("reset")]
    assert reset.fields["reason"] == "restart" and reset.fields["attempt"] == "2"
    after = [e.text for e in events[types.index("reset") :] if e.type == "token"]
    assert "".join(after) == text  # not one token of the old attempt after the reset
    assert final_text(events) == text
    assert record.result is not None and record.result.text == text


def saved_usage(client: Client, job_id: str, calls: int) -> ActorResult:
    """Wait for a lease renewal to save the job's usage with ``calls`` model calls and a
    token of the latest; return it."""

    def saved() -> ActorResult | None:
        raw = client.redis.hget(keys.job_key(job_id), "usage")
        usage = ActorResult.model_validate_json(raw) if raw else None
        ok = usage and usage.model_calls >= calls and usage.output_tokens > 0
        return usage if ok else None

    return wait_until(saved, 20, f"a renewal to save {calls} model calls of {job_id}")
