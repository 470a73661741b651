"""Worker-side Prometheus metrics and the endpoint that serves them.

Each worker process serves ``/metrics`` on ``ACTORQ_METRICS_PORT`` (off when
unset; ``ACTORQ_METRICS_ADDR`` picks the address, default all interfaces). With
``PROMETHEUS_MULTIPROC_DIR`` set (before the worker starts, an empty directory
per host), every process writes its samples there and the endpoint serves the
sum of all of them, so a prefork pool or several processes behind one port are
counted right; the gauge of streams in flight sums the live processes only (a
process killed without a clean exit is dropped at the next scrape).

Call sites in the job path are single calls of the functions below; each costs
well under a microsecond or is made once per job or per pipeline.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = [
    "CANCELS",
    "EVENTS",
    "IN_FLIGHT",
    "JOBS",
    "JOB_DURATION",
    "LOOP_CPU",
    "LOOP_LAG",
    "PUBLISH_LAG",
    "REDELIVERIES",
    "RESETS",
    "RETRIES",
    "SKIPPED",
    "TOKENS",
    "TTFT",
    "job_claimed",
    "job_ended",
    "job_released",
    "job_skipped",
    "pipeline_acked",
    "process_exited",
    "provider_retry",
    "published",
    "serve",
    "watch_loop",
]

log = logging.getLogger("actorq.metrics")

_TIME_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600)
_LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)

JOBS = Counter("actorq_jobs_total", "Jobs this worker ended, by final status.", ["status"])
SKIPPED = Counter(
    "actorq_deliveries_skipped_total",
    "Deliveries that ran nothing (duplicate, already ended, fenced, ...), by reason.",
    ["reason"],
)
TOKENS = Counter("actorq_tokens_published_total", "Token entries written to job streams.")
EVENTS = Counter(
    "actorq_events_published_total", "Entries written to job streams, by type.", ["type"]
)
TTFT = Histogram(
    "actorq_time_to_first_token_seconds",
    "From the start of an attempt to its first token.",
    buckets=_TIME_BUCKETS,
)
JOB_DURATION = Histogram(
    "actorq_job_duration_seconds",
    "Run time of an attempt that ended the job, by final status.",
    ["status"],
    buckets=_TIME_BUCKETS,
)
IN_FLIGHT = Gauge(
    "actorq_streams_in_flight",
    "Jobs streaming on this worker right now.",
    multiprocess_mode="livesum",
)
PUBLISH_LAG = Histogram(
    "actorq_publish_lag_seconds",
    "From an entry being handed to the publisher to Redis acknowledging its pipeline "
    "(the oldest entry of each pipeline).",
    buckets=_LAG_BUCKETS,
)
RETRIES = Counter(
    "actorq_provider_retries_total", "Retries of provider calls (rate limits, 5xx, drops)."
)
REDELIVERIES = Counter(
    "actorq_redeliveries_total", "Attempts after the first (the earlier attempt's worker was lost)."
)
RESETS = Counter(
    "actorq_resets_total",
    "Reset entries: earlier output of an attempt voided, by reason (retry, redelivery).",
    ["reason"],
)
CANCELS = Counter("actorq_cancels_total", "Running jobs this worker stopped on request.")
LOOP_CPU = Counter(
    "actorq_loop_cpu_seconds_total",
    "CPU time of the process's shared event-loop thread (near 1 a second: it holds a core).",
)
LOOP_LAG = Histogram(
    "actorq_loop_lag_seconds",
    "How late the shared event loop ran a callback due at a fixed time: every token waits as long.",
    buckets=_LAG_BUCKETS,
)

#: How often the loop's lag and CPU are sampled: a callback four times a second.
LOOP_WATCH_S = 0.25


def job_claimed(attempt: int) -> None:
    """An attempt started streaming here."""
    IN_FLIGHT.inc()
    if attempt > 1:
        REDELIVERIES.inc()
        RESETS.labels("redelivery").inc()


def job_released() -> None:
    IN_FLIGHT.dec()


def job_skipped(reason: str) -> None:
    SKIPPED.labels(reason).inc()


def job_ended_at_claim(status: str) -> None:
    """The claim wrote the job's ending itself (cancelled before it ran, its attempts
    used up): a job this worker ended, with no run to time."""
    JOBS.labels(status).inc()


def job_ended(status: str, ttft_ms: float | None, duration_ms: float) -> None:
    """The attempt wrote the job's ending with ``status``."""
    JOBS.labels(status).inc()
    JOB_DURATION.labels(status).observe(max(0.0, duration_ms) / 1000)
    if ttft_ms is not None:
        TTFT.observe(max(0.0, ttft_ms) / 1000)
    if status == "cancelled":
        CANCELS.inc()


def provider_retry() -> None:
    RETRIES.inc()


def pipeline_acked(lag_s: float) -> None:
    """Redis acknowledged a pipeline whose oldest entry was queued ``lag_s`` ago."""
    PUBLISH_LAG.observe(max(0.0, lag_s))


def published(kinds: Sequence[str]) -> None:
    """Entries were written, given by their types, any number of jobs at once."""
    tokens = kinds.count("token")
    if tokens:
        TOKENS.inc(tokens)
        EVENTS.labels("token").inc(tokens)
    if tokens == len(kinds):
        return
    for kind in kinds:  # rare: node boundaries, tool calls, endings
        if kind != "token":
            EVENTS.labels(kind).inc()
            if kind == "reset":
                RESETS.labels("retry").inc()


def watch_loop(period_s: float = LOOP_WATCH_S) -> None:
    """Sample the running loop's lag and its thread's CPU every ``period_s``; call on the loop.

    One process carries all its streams on this one thread, so the loop, not the
    process, is what saturates: its CPU near one second a second, or a lag of
    milliseconds, says the process can take no more streams.
    """
    loop = asyncio.get_running_loop()
    last_cpu = time.thread_time()

    def tick(due: float) -> None:
        nonlocal last_cpu
        now = loop.time()
        LOOP_LAG.observe(max(0.0, now - due))
        cpu = time.thread_time()
        LOOP_CPU.inc(max(0.0, cpu - last_cpu))
        last_cpu = cpu
        loop.call_at(now + period_s, tick, now + period_s)

    start = loop.time() + period_s
    loop.call_at(start, tick, start)


def process_exited(pid: int | None = None) -> None:
    """Drop an exited process's live gauges from the multiprocess directory."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())


def _registry() -> CollectorRegistry | None:
    """The multiprocess registry when ``PROMETHEUS_MULTIPROC_DIR`` is set, else the default."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        return None
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    registry.register(_GoneProcesses(path))  # first: it runs before the sum is read
    multiprocess.MultiProcessCollector(registry)
    return registry


#: A live-mode gauge's file in the multiprocess directory, named after its process.
_LIVE_FILE = re.compile(r"gauge_live\w*_(\d+)\.db")


class _GoneProcesses:
    """Before each scrape, drops the live gauges of processes that are gone.

    ``process_exited`` does it for a process that exits cleanly; one killed
    (SIGKILL, the OOM killer) left its streams in flight in the sum for good.
    The directory is one host's, so its pids are this host's.
    """

    def __init__(self, path: str) -> None:
        self._path = path

    def describe(self) -> list[Any]:
        return []  # exports nothing of its own

    def collect(self) -> list[Any]:
        from prometheus_client import multiprocess

        try:
            names = os.listdir(self._path)
        except OSError:
            return []
        for pid in {int(m.group(1)) for m in map(_LIVE_FILE.fullmatch, names) if m}:
            if not _alive(pid):
                multiprocess.mark_process_dead(pid, self._path)
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def serve(port: int | None = None, addr: str | None = None) -> int | None:
    """Start the ``/metrics`` endpoint (a daemon thread); return its port, or None when off."""
    if port is None:
        raw = os.environ.get("ACTORQ_METRICS_PORT", "").strip()
        if not raw:
            return None
        try:
            port = int(raw)
        except ValueError:
            raise ValueError(f"ACTORQ_METRICS_PORT must be a port number, got {raw!r}") from None
    addr = addr if addr is not None else os.environ.get("ACTORQ_METRICS_ADDR", "0.0.0.0")
    registry = _registry()
    if registry is None:
        server, _ = start_http_server(port, addr)
    else:
        server, _ = start_http_server(port, addr, registry=registry)
    bound = int(server.server_port)
    log.info("metrics on http://%s:%d/metrics", addr, bound)
    return bound
