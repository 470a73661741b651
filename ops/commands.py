"""What the job commands of ``actorq`` do: enqueue, tail, status, cancel, jobs, worker.

``ops/cli.py`` only parses arguments; each ``run_*`` here returns the process
exit code (see :class:`Exit`). Human output goes to stdout (tokens, tables) and
stderr (progress, notices); ``--json`` prints machine-readable JSON on stdout
only: one object, or one object per line for event streams.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import IntEnum
from pathlib import Path
from typing import Any, TextIO

import redis
from kombu.exceptions import OperationalError

from producer import (
    ActorqError,
    Client,
    Event,
    InvalidInput,
    JobNotFound,
    JobRecord,
    JobStatus,
    JobTimeout,
    Settings,
)
from producer import keys as rkeys
from producer.settings import env_number

__all__ = [
    "Exit",
    "exit_for_status",
    "job_record",
    "recent_jobs",
    "run_cancel",
    "run_enqueue",
    "run_jobs",
    "run_status",
    "run_tail",
    "worker_argv",
]


class Exit(IntEnum):
    """Exit codes of the job commands (also documented in the README)."""

    OK = 0  # done; for enqueue --follow / tail: the job succeeded
    FAILED = 1  # the job ended failed
    USAGE = 2  # bad arguments or input (argparse uses 2 too)
    NOT_FOUND = 3  # no such job (never existed, or expired)
    CANCELLED = 4
    TIMED_OUT = 5
    LIMIT_EXCEEDED = 6
    WAIT_TIMEOUT = 7  # --timeout passed before the job ended
    UNAVAILABLE = 8  # Redis or the broker could not be reached


_BY_STATUS = {
    JobStatus.SUCCEEDED: Exit.OK,
    JobStatus.FAILED: Exit.FAILED,
    JobStatus.CANCELLED: Exit.CANCELLED,
    JobStatus.TIMED_OUT: Exit.TIMED_OUT,
    JobStatus.LIMIT_EXCEEDED: Exit.LIMIT_EXCEEDED,
}


def exit_for_status(status: JobStatus) -> Exit:
    """The exit code for a job that ended with ``status`` (OK for non-terminal ones)."""
    return _BY_STATUS.get(status, Exit.OK)


def _err(message: str) -> None:
    print(f"actorq: {message}", file=sys.stderr)


@contextmanager
def _client() -> Iterator[Client]:
    client = Client(Settings.from_env())
    try:
        yield client
    finally:
        client.close()


def guarded(fn: Any) -> Any:
    """Turn the errors every command can meet into a message and an exit code."""

    def run(*args: Any, **kwargs: Any) -> int:
        try:
            return int(fn(*args, **kwargs))
        except JobNotFound as exc:
            _err(f"no such job: {exc}")
            return Exit.NOT_FOUND
        except InvalidInput as exc:
            _err(f"invalid input: {exc}")
            return Exit.USAGE
        except JobTimeout as exc:
            _err(str(exc))
            return Exit.WAIT_TIMEOUT
        except (
            redis.ConnectionError,
            redis.TimeoutError,
            ConnectionError,
            OSError,
            OperationalError,  # kombu's: the broker is away
        ) as exc:
            _err(f"cannot reach Redis or the broker: {exc}")
            return Exit.UNAVAILABLE
        except ActorqError as exc:
            _err(str(exc))
            return Exit.USAGE
        except ValueError as exc:  # settings from the environment
            _err(str(exc))
            return Exit.USAGE

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


# -- enqueue / tail ----------------------------------------------------------------


def _read_json(path: str, what: str) -> Any:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise InvalidInput(what, f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidInput(what, f"{path} is not valid JSON ({exc})") from None


@guarded
def run_enqueue(
    *,
    config: str,
    message: str,
    credentials: str | None = None,
    limits: str | None = None,
    pricing: str | None = None,
    job_id: str | None = None,
    idempotency_key: str | None = None,
    follow: bool = False,
    as_json: bool = False,
    timeout: float | None = None,
    out: TextIO | None = None,
) -> int:
    """Enqueue a job; print its id, or with ``follow`` stream it and exit with its status."""
    out = out or sys.stdout
    cfg = _read_json(config, "config")
    if message == "-":
        message = sys.stdin.read()
    creds = _read_json(credentials, "credentials") if credentials else None
    lim = json.loads(limits) if limits and limits.lstrip().startswith("{") else None
    if limits and lim is None:
        lim = _read_json(limits, "limits")
    prices = _read_json(pricing, "pricing") if pricing else None
    with _client() as client:
        jid = client.enqueue_actor_job(
            cfg,
            message,
            credentials=creds,
            limits=lim,
            pricing=prices,
            job_id=job_id,
            idempotency_key=idempotency_key,
        )
        if not follow:
            print(json.dumps({"job_id": jid}) if as_json else jid, file=out, flush=True)
            return Exit.OK
        if not as_json:
            print(f"job {jid}", file=sys.stderr, flush=True)
        return _follow(client, jid, "0", as_json, timeout, out)


@guarded
def run_tail(
    job_id: str,
    *,
    after: str = "0",
    as_json: bool = False,
    timeout: float | None = None,
    out: TextIO | None = None,
) -> int:
    """Stream a job's events from after ``after`` until it ends; exit with its status."""
    with _client() as client:
        return _follow(client, job_id, after, as_json, timeout, out or sys.stdout)


def event_json(event: Event) -> str:
    return json.dumps({"id": event.id, "type": event.type, **event.fields}, ensure_ascii=False)


def _follow(
    client: Client, job_id: str, after: str, as_json: bool, timeout: float | None, out: TextIO
) -> int:
    last: Event | None = None
    for event in client.stream_events(job_id, after=after, timeout=timeout):
        last = event
        if as_json:
            print(event_json(event), file=out, flush=True)
        else:
            _render(event, out)
    if last is None or last.status is None:
        # Nothing after ``after``: it was at or past the ending. The record has the status.
        ended = client.get_result(job_id)
        if ended is None:  # pragma: no cover - a stream ends only with done
            return Exit.FAILED
        if not as_json:
            print(_summary(ended), file=sys.stderr, flush=True)
        return exit_for_status(ended.status)
    status = last.status
    if not as_json:
        out.write("\n")
        out.flush()
        record = client.get_result(job_id)
        print(_summary(record) if record else f"[{status.value}]", file=sys.stderr, flush=True)
    return exit_for_status(status)


def _render(event: Event, out: TextIO) -> None:
    """Live human output: tokens on stdout as they come, everything else as notes on stderr."""
    if event.type == "token":
        out.write(event.text)
        out.flush()
    elif event.type == "reset":
        out.write("\n")
        out.flush()
        reason = event.fields.get("reason", "")
        print(f"[reset: the text above is void; {reason}]", file=sys.stderr, flush=True)
    elif event.type == "node_start":
        print(f"\n[node {event.node}]", file=sys.stderr, flush=True)
    elif event.type == "tool_call":
        tool, args = event.fields.get("tool", ""), event.fields.get("args", "")
        print(f"\n[tool {tool} {args}]", file=sys.stderr, flush=True)
    elif event.type == "start" and event.fields.get("attempt", "1") != "1":
        print(f"[attempt {event.fields['attempt']}]", file=sys.stderr, flush=True)


def _summary(record: JobRecord) -> str:
    parts = [f"[{record.status.value}]"]
    r = record.result
    if r is not None:
        parts.append(f"{r.output_tokens} tokens out, {r.input_tokens} in")
        if r.cost_usd is not None:
            parts.append(f"${r.cost_usd}")
        parts.append(f"{r.duration_ms / 1000:.2f}s")
    if record.attempt > 1:
        parts.append(f"attempt {record.attempt}")
    if record.error:
        parts.append(f"error: {record.error}")
    return " ".join(parts)


# -- status / cancel -----------------------------------------------------------------


def job_record(client: Client, job_id: str) -> JobRecord:
    """The job's record whatever its state (``get_result`` waits for the end)."""
    if not rkeys.valid_job_id(job_id):
        raise InvalidInput("job_id", "must match [A-Za-z0-9_-]{1,64}")
    raw = client.redis.hgetall(rkeys.job_key(job_id))
    if not raw:
        raise JobNotFound(job_id)
    return JobRecord.from_hash(job_id, raw)


@guarded
def run_status(job_id: str, *, as_json: bool = False, out: TextIO | None = None) -> int:
    """Print a job's status and record; exit 0 when it exists, whatever its state."""
    out = out or sys.stdout
    with _client() as client:
        record = job_record(client, job_id)
    if as_json:
        print(record.model_dump_json(), file=out)
        return Exit.OK
    print(record.status.value, file=out)
    details = {
        "actor": record.actor,
        "attempt": record.attempt,
        "worker": record.worker,
        "created": _when(record.created_at),
        "started": _when(record.started_at),
        "finished": _when(record.finished_at),
        "error": record.error or "",
    }
    if record.result is not None:
        r = record.result
        details["tokens"] = f"{r.output_tokens} out, {r.input_tokens} in"
        details["cost_usd"] = "" if r.cost_usd is None else str(r.cost_usd)
        details["ttft_ms"] = (
            "" if r.time_to_first_token_ms is None else f"{r.time_to_first_token_ms:.0f}"
        )
        details["duration_ms"] = f"{r.duration_ms:.0f}"
    for k, v in details.items():
        if v not in ("", None):
            print(f"  {k}: {v}", file=out)
    return Exit.OK


@guarded
def run_cancel(job_id: str, *, as_json: bool = False, out: TextIO | None = None) -> int:
    """Ask a job to stop; print what happened (cancelled, requested, already_requested, finished)."""
    out = out or sys.stdout
    with _client() as client:
        outcome = client.cancel_job(job_id)
    print(
        json.dumps({"job_id": job_id, "outcome": outcome.value}) if as_json else outcome.value,
        file=out,
    )
    return Exit.OK


def _when(ts: float | None) -> str:
    return "" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


# -- jobs ----------------------------------------------------------------------------

_JOB_FIELDS = (
    "status",
    "actor",
    "attempt",
    "worker",
    "created_at",
    "started_at",
    "finished_at",
    "result",
    "error",
)


def recent_jobs(client: Client, limit: int = 20) -> list[dict[str, Any]]:
    """The latest ``limit`` jobs, newest first: status, actor, attempt, tokens, cost, times."""
    raw_ids: Any = client.redis.zrevrange(rkeys.JOBS_INDEX, 0, max(0, limit - 1))
    ids = [i.decode() for i in raw_ids]
    pipe = client.redis.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(rkeys.job_key(job_id), *_JOB_FIELDS)
    rows = []
    for job_id, values in zip(ids, pipe.execute(), strict=True):
        raw = {k: v for k, v in zip(_JOB_FIELDS, values, strict=True) if v is not None}
        if "status" not in raw:
            continue  # expired: its keys are gone
        record = JobRecord.from_hash(job_id, raw)
        r = record.result
        end = record.finished_at or time.time()
        rows.append(
            {
                "job_id": job_id,
                "status": record.status.value,
                "actor": record.actor,
                "attempt": record.attempt,
                "worker": record.worker,
                "created_at": record.created_at,
                "finished_at": record.finished_at,
                "duration_s": round(end - record.started_at, 3) if record.started_at else None,
                "input_tokens": r.input_tokens if r else None,
                "output_tokens": r.output_tokens if r else None,
                "cost_usd": str(r.cost_usd) if r and r.cost_usd is not None else None,
                "error": record.error,
            }
        )
    return rows


@guarded
def run_jobs(
    *, limit: int = 20, status: str | None = None, as_json: bool = False, out: TextIO | None = None
) -> int:
    """List recent jobs with status, tokens and cost."""
    out = out or sys.stdout
    if status is not None and status not in {s.value for s in JobStatus}:
        raise InvalidInput("status", f"must be one of {', '.join(s.value for s in JobStatus)}")
    with _client() as client:
        rows = recent_jobs(client, limit if status is None else max(limit, 1000))
    if status is not None:
        rows = [r for r in rows if r["status"] == status][:limit]
    if as_json:
        print(json.dumps(rows), file=out)
        return Exit.OK
    header = ("JOB", "STATUS", "ACTOR", "ATT", "TOKENS", "COST_USD", "SECONDS", "CREATED")
    table = [header]
    for r in rows:
        tokens = "-" if r["output_tokens"] is None else f"{r['output_tokens']}/{r['input_tokens']}"
        table.append(
            (
                r["job_id"],
                r["status"],
                r["actor"] or "-",
                str(r["attempt"]),
                tokens,
                r["cost_usd"] or "-",
                "-" if r["duration_s"] is None else f"{r['duration_s']:.2f}",
                _when(r["created_at"]),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)
    if not rows:
        print("(no recent jobs)", file=sys.stderr)
    return Exit.OK


# -- worker --------------------------------------------------------------------------


def worker_argv(
    *,
    concurrency: int | None = None,
    queue: str | None = None,
    hostname: str | None = None,
    loglevel: str = "INFO",
    extra: Sequence[str] = (),
) -> list[str]:
    """The ``celery worker`` command line of ``actorq worker``: threads pool, one shared loop.

    Concurrency is the number of jobs one process streams at once; the default
    (``ACTORQ_CONCURRENCY``, 200) suits I/O-bound streams, since each job mostly
    waits on its provider. Anything in ``extra`` is passed to celery unchanged.
    """
    argv = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--pool", "threads"]
    concurrency = concurrency or env_number("ACTORQ_CONCURRENCY", 200, int, low=1)
    argv += ["--concurrency", str(concurrency)]
    argv += ["--loglevel", loglevel]
    if queue:
        argv += ["--queues", queue]
    if hostname:
        argv += ["--hostname", hostname]
    return [*argv, *extra]
