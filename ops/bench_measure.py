"""Measuring instruments of ``actorq bench``: percentiles, process CPU and memory,
Redis connections per process, and the tailer that timestamps every token.

CPU, memory and sockets are read from ``/proc`` (Linux), so the figures are the
kernel's, not a sampling profiler's.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "JobTrace",
    "Sampler",
    "all_streaming",
    "command_time",
    "cpu_seconds",
    "cpu_wait",
    "pct",
    "pss_bytes",
    "ran_by_role",
    "redis_connections",
    "sched_ns",
    "summarise_lags",
    "tail_job",
    "thread_roles",
    "timeline",
    "tree_pids",
    "us_per_token",
]

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def us_per_token(cpu_s: float, tokens: int) -> float | None:
    """CPU seconds spread over ``tokens``, in microseconds; ``None`` with no tokens."""
    return cpu_s / tokens * 1e6 if tokens else None


def command_time(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """Microseconds Redis spent in each command between two ``INFO commandstats``."""
    out = {}
    for key, stats in after.items():
        spent = stats["usec"] - before.get(key, {}).get("usec", 0)
        if spent > 0:
            out[key.removeprefix("cmdstat_")] = float(spent)
    return out


def pct(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (nearest rank) of ``values``; ``None`` when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants (prefork children included)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
    return out


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time consumed so far by ``pids`` (threads included)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICK


def sched_ns(pids: Iterable[int]) -> dict[int, tuple[int, int]]:
    """Per thread of ``pids``: nanoseconds on a CPU and runnable but waiting for one
    (``/proc/<pid>/task/<tid>/schedstat``); empty where the kernel keeps no such counts."""
    out: dict[int, tuple[int, int]] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, ValueError):
                    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                        ran, waited = f.read().split()[:2]
                    out[int(tid)] = (int(ran), int(waited))
    return out


def thread_roles(pid: int, loop_name: str) -> dict[int, str]:
    """Each thread of worker ``pid`` by its part: ``main`` (Celery's consumer, which
    takes messages in), ``loop`` (the thread the kernel knows as ``loop_name``) and
    ``other`` (pool threads waiting on their jobs, helpers)."""
    roles: dict[int, str] = {}
    with contextlib.suppress(OSError):
        for tid in map(int, os.listdir(f"/proc/{pid}/task")):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
                roles[tid] = "main" if tid == pid else "loop" if name == loop_name else "other"
    return roles


def ran_by_role(
    before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], roles: dict[int, str]
) -> dict[str, float]:
    """Seconds on a CPU between two :func:`sched_ns` readings, summed by
    :func:`thread_roles` (a thread started in between counts from zero)."""
    out = {"main": 0.0, "loop": 0.0, "other": 0.0}
    for tid, (ran, _) in after.items():
        out[roles.get(tid, "other")] += (ran - before.get(tid, (0, 0))[0]) / 1e9
    return out


def cpu_wait(
    before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], wall_s: float
) -> dict[str, float] | None:
    """Between two :func:`sched_ns` readings, as shares of ``wall_s``: the busiest
    thread's time on a CPU and waiting for one, and every thread's waiting summed.

    Time a thread was runnable but not running is time its work (a token) sat in
    the machine's run queue: on a saturated machine, part of every lag figure.
    """
    if not after or wall_s <= 0:
        return None
    zero = (0, 0)
    deltas = [(r - before.get(t, zero)[0], w - before.get(t, zero)[1]) for t, (r, w) in after.items()]
    running, waiting = max(deltas)
    wall_ns = wall_s * 1e9
    return {
        "busiest_running": running / wall_ns,
        "busiest_waiting": waiting / wall_ns,
        "waiting": sum(w for _, w in deltas) / wall_ns,
    }


def pss_bytes(pids: Iterable[int]) -> int:
    """Proportional set size of ``pids``: shared pages counted once across them."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


def redis_connections(pid: int, port: int) -> int:
    """Established TCP connections from process ``pid`` to 127.0.0.1:``port``."""
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    want = f"{port:04X}"
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[3] == "01" and cols[2].rsplit(":", 1)[1] == want and cols[9] in inodes:
                    count += 1
    return count


class Sampler:
    """Samples a process tree's memory (and Redis connections) from a process of its own.

    Walking ``/proc`` for a worker of hundreds of threads, and the kernel building
    its ``smaps_rollup``, cost the measuring router a tenth of its CPU (and its
    loop's GIL) when this ran on one of its threads: the router's figures would
    carry the instrument's cost.
    """

    def __init__(self, pid: int, redis_port: int, every_s: float = 1.0) -> None:
        self.pid, self.port, self.every_s = pid, redis_port, every_s
        self.peak_pss = 0
        self.peak_connections = 0
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Sampler:
        args = [sys.executable, "-m", "ops.bench_measure", str(self.pid), str(self.port)]
        self._proc = subprocess.Popen(
            [*args, str(self.every_s)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        # Closing its stdin asks for a last sample and the peaks, as one JSON line.
        out, _ = self._proc.communicate(timeout=60)
        if self._proc.returncode != 0 or not out.strip():
            raise RuntimeError(f"the sampler process failed with {self._proc.returncode}")
        peaks = json.loads(out.strip().splitlines()[-1])
        self.peak_pss, self.peak_connections = peaks["pss"], peaks["connections"]


def _sample_until_stdin_closes(pid: int, port: int, every_s: float) -> dict[str, int]:
    peaks = {"pss": 0, "connections": 0}

    def take() -> None:
        pids = tree_pids(pid)
        peaks["pss"] = max(peaks["pss"], pss_bytes(pids))
        peaks["connections"] = max(
            peaks["connections"], sum(redis_connections(p, port) for p in pids)
        )

    while True:
        take()
        if select.select([sys.stdin], [], [], every_s)[0] and not sys.stdin.read(1):
            take()  # the state at the end of the phase counts too
            return peaks


@dataclass
class JobTrace:
    """What a tailer saw of one job."""

    job_id: str
    enqueued_at: float = 0.0  # unix time enqueue_actor_job() returned
    received: list[float] = field(default_factory=list)  # unix time of each token
    lags_ms: list[float] = field(default_factory=list)  # receive time - model yield time
    # The part of each lag spent before Redis stored the entry (its id is Redis's clock, ms).
    write_ms: list[float] = field(default_factory=list)
    status: str = ""
    error: str = ""
    first_id: str = ""  # entry id of the first token (Redis's clock, ms)

    @property
    def first_token_s(self) -> float | None:
        return self.received[0] - self.enqueued_at if self.received else None

    def rate_fraction(self, delay_ms: float) -> float | None:
        """Nominal over achieved inter-token time, first to last token."""
        if len(self.received) < 2 or delay_ms <= 0:
            return None
        span = self.received[-1] - self.received[0]
        return (len(self.received) - 1) * delay_ms / 1000 / span if span > 0 else None


async def tail_job(client: Any, trace: JobTrace, timeout: float) -> JobTrace:
    """Follow one job to its ``done`` entry, timestamping every token on arrival."""
    try:
        async for event in client.astream_events(trace.job_id, timeout=timeout):
            now = time.time()
            if event.type == "token":
                if not trace.received:
                    trace.first_id = event.id
                trace.received.append(now)
                ts = event.fields.get("ts")
                if ts:
                    yielded = float(ts)
                    trace.lags_ms.append((now - yielded) * 1000)
                    stored_ms = int(event.id.partition("-")[0])
                    trace.write_ms.append(stored_ms - yielded * 1000)
            elif event.terminal:
                trace.status = event.fields.get("status", "")
    except Exception as exc:  # recorded, so one failed job shows in the report
        trace.error = f"{type(exc).__name__}: {exc}"
    return trace


def summarise_lags(traces: Sequence[JobTrace], delay_ms: float) -> dict[str, Any]:
    """Lag percentiles, rate fraction and completion counts over ``traces``."""
    lags = [lag for t in traces for lag in t.lags_ms]
    writes = [w for t in traces for w in t.write_ms]
    spans = [
        (len(t.received) - 1, t.received[-1] - t.received[0])
        for t in traces
        if len(t.received) >= 2
    ]
    gaps = sum(n for n, _ in spans)
    span = sum(s for _, s in spans)
    return {
        "jobs": len(traces),
        "succeeded": sum(1 for t in traces if t.status == "succeeded"),
        "errors": sorted({t.error for t in traces if t.error})[:5],
        "tokens": sum(len(t.received) for t in traces),
        "lag_ms": {
            "p50": pct(lags, 50),
            "p99": pct(lags, 99),
            "p99_9": pct(lags, 99.9),
            "max": max(lags) if lags else None,
        },
        # Redis ids have millisecond resolution: these split a lag to within ~1 ms.
        "to_redis_ms": {"p50": pct(writes, 50), "p99": pct(writes, 99)},
        "from_redis_ms": {
            "p50": pct([lag - w for lag, w in zip(lags, writes, strict=True)], 50),
            "p99": pct([lag - w for lag, w in zip(lags, writes, strict=True)], 99),
        },
        "rate_fraction": (gaps * delay_ms / 1000 / span) if span > 0 and delay_ms > 0 else None,
        "peak_concurrent": peak_concurrency(traces),
        "all_streaming": all_streaming(traces),
        "timeline": timeline(traces),
    }


def timeline(traces: Sequence[JobTrace]) -> list[dict[str, Any]]:
    """Per second of the run: tokens received, their lag p50/p99 and the p99 of the
    part before Redis stored them — lag against load, and which side it came from."""
    starts = [t.received[0] for t in traces if t.received]
    if not starts:
        return []
    t0 = min(starts)
    seconds: dict[int, tuple[list[float], list[float]]] = {}
    for t in traces:
        for at, lag, write in zip(t.received, t.lags_ms, t.write_ms, strict=False):
            lags, writes = seconds.setdefault(int(at - t0), ([], []))
            lags.append(lag)
            writes.append(write)
    return [
        {
            "second": k,
            "tokens": len(lags),
            "lag_p50_ms": pct(lags, 50),
            "lag_p99_ms": pct(lags, 99),
            "to_redis_p99_ms": pct(writes, 99),
        }
        for k, (lags, writes) in sorted(seconds.items())
    ]


def all_streaming(traces: Sequence[JobTrace]) -> dict[str, Any] | None:
    """Lag while every job streams at once: from the last job's first token to the
    first job's last. ``None`` when the jobs never all overlap.

    The whole run also holds the ramp (the jobs enqueued one after another, their
    claims and set-up overlapping the first tokens) and the drain (every job's
    ending in the last second); this is the load at the stated concurrency.
    """
    spans = [(t.received[0], t.received[-1]) for t in traces if t.received]
    if not spans or len(spans) < len(traces):
        return None
    start, end = max(a for a, _ in spans), min(b for _, b in spans)
    if end <= start:
        return None
    lags = [
        lag
        for t in traces
        for at, lag in zip(t.received, t.lags_ms, strict=False)
        if start <= at <= end
    ]
    return {
        "seconds": end - start,
        "tokens": len(lags),
        "lag_ms": {"p50": pct(lags, 50), "p99": pct(lags, 99), "p99_9": pct(lags, 99.9)},
    }


def peak_concurrency(traces: Sequence[JobTrace]) -> int:
    """Most jobs streaming at one instant (first to last token at the tailer)."""
    edges = sorted(
        [(t.received[0], 1) for t in traces if t.received]
        + [(t.received[-1], -1) for t in traces if t.received]
    )
    peak = cur = 0
    for _, step in edges:
        cur += step
        peak = max(peak, cur)
    return peak


if __name__ == "__main__":
    got = _sample_until_stdin_closes(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
    print(json.dumps(got))
