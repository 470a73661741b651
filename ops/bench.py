"""``actorq bench``: streaming speed, jobs per process and memory, against three peers.

Everything runs on this machine: an embedded redis-server, real ``celery worker``
processes and the scripted chat model. Phases, in order:

1. idle worker: added first-token latency (one job at a time) and Redis memory;
2. floor (a): the LangChain ``astream`` loop alone, in a process of its own;
3. load: one worker process, ``--jobs`` concurrent jobs; token rate, delivery
   lag, worker CPU per token, memory, connections; then the floor again, and
   load and floor alternate for ``--rounds`` loads (the median round is reported);
4. fan-in: one router process (this one) tails ``--tail-jobs`` streams at once;
5. naive (b): one awaited ``XADD`` per token, same jobs as the load phase;
6. prefork (c): Celery prefork + ``asyncio.run`` per task.

Token entries carry the model-side yield time only in this benchmark (the worker
runs with ``ACTORQ_STAMP_TOKENS=1``); the memory phase runs without it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from .bench_measure import (
    JobTrace,
    Sampler,
    command_time,
    cpu_seconds,
    cpu_wait,
    pct,
    ran_by_role,
    sched_ns,
    summarise_lags,
    tail_job,
    thread_roles,
    tree_pids,
    us_per_token,
)
from .bench_peers import bench_config
from .bench_report import capacity, render, targets, write_plot
from .stack import EmbeddedRedis, WorkerProcess

__all__ = ["BenchOptions", "bracket_floor", "median_round", "memory_tokens", "run_bench"]

T = TypeVar("T")


@dataclass(frozen=True)
class BenchOptions:
    jobs: int = 300
    tokens: int = 200
    delay_ms: float = 20.0
    ttft_ms: float = 100.0
    # The load's jobs and the floor's start on one seeded random schedule over this
    # long (bench_peers.arrival_offsets), so both see the same phases and ramp.
    ramp_s: float = 1.0
    idle_jobs: int = 30
    memory_jobs: int = 50
    # One-token jobs: the worker and Redis CPU, and the Redis bytes, each job pays once.
    # CPU is read in 10 ms clock ticks: over 50 jobs that was a step of 0.2 ms a job.
    cost_jobs: int = 300
    tail_jobs: int = 1000
    # 15 s a job: longer than enqueueing 1,000 jobs takes on a slow machine, so all
    # of them do stream at once for a while.
    tail_tokens: int = 150
    tail_delay_ms: float = 100.0
    prefork: int = 4
    # Floor and load alternate (floor, load, floor, load, ..., floor): the CPU ratio
    # of one load against the floors around it moves by 0.2-0.4 from run to run on
    # a shared 2-core VM, and the median of three moves far less.
    rounds: int = 3
    uvloop: bool = True
    out_dir: Path = Path("bench-out")
    plot: bool = True

    def __post_init__(self) -> None:
        for name in ("jobs", "tokens", "idle_jobs", "memory_jobs", "cost_jobs", "tail_jobs",
                     "tail_tokens", "prefork", "rounds"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("delay_ms", "ttft_ms", "tail_delay_ms"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 <= value <= 60_000:
                raise ValueError(f"{name} must be between 0 and 60000 ms, got {value!r}")
        if not isinstance(self.ramp_s, int | float) or not 0 <= self.ramp_s <= 600:
            raise ValueError(f"ramp_s must be between 0 and 600 s, got {self.ramp_s!r}")

    @classmethod
    def quick(cls, **over: Any) -> BenchOptions:
        """A small run that proves every phase works, in well under a minute."""
        # Each job streams for well over the time it takes to enqueue them all, so
        # every phase has a stretch where all its jobs stream at once.
        base = cls(
            jobs=20,
            tokens=20,
            delay_ms=30,
            ttft_ms=20,
            ramp_s=0.2,
            idle_jobs=3,
            memory_jobs=3,
            cost_jobs=10,
            tail_jobs=40,
            tail_tokens=30,
            tail_delay_ms=40,
            prefork=2,
            rounds=1,
        )
        return replace(base, **over)


class _Stack:
    """The embedded Redis and the environment every process of the run shares."""

    def __init__(self, opts: BenchOptions, log_dir: Path, out: Callable[[str], None]) -> None:
        from producer.crypto import generate_key

        self.opts, self.log_dir, self.out = opts, log_dir, out
        self.redis = EmbeddedRedis().start()
        tag = uuid.uuid4().hex[:8]
        self.env = {
            "REDIS_URL": self.redis.url,
            "CELERY_BROKER_URL": self.redis.url,
            "ACTORQ_SECRET_KEY": generate_key(),
            "ACTORQ_QUEUE": f"actorq-bench-{tag}",
            "ACTORQ_LOG_LEVEL": "WARNING",
            "ACTORQ_UVLOOP": "1" if opts.uvloop else "0",
        }
        self.workers: list[WorkerProcess] = []

    def worker(self, name: str, concurrency: int, **kw: Any) -> WorkerProcess:
        env = {**self.env, **kw.pop("env", {})}
        w = WorkerProcess(
            env=env,
            name=f"{name}-{uuid.uuid4().hex[:6]}",
            concurrency=concurrency,
            log_path=self.log_dir / f"{name}.log",
            **kw,
        )
        self.workers.append(w)
        w.start()
        w.wait_ready(self.redis.url, timeout=120)
        return w

    def close(self) -> None:
        for w in self.workers:
            w.stop(timeout=20)
        self.redis.cleanup()


#: Redis gives a new stream a 4 KiB node up front, so a short stream costs the same
#: as an empty one give or take the radix tree's 16 bytes: the long jobs of the
#: memory phase need enough entries to outgrow it, or the cost per entry is noise.
_MEMORY_MIN_TOKENS = 200


def memory_tokens(opts: BenchOptions) -> int:
    """Tokens of the long jobs the Redis memory figures are measured on."""
    return max(opts.tokens, _MEMORY_MIN_TOKENS)


def _client(env: dict[str, str]) -> Any:
    from producer import Client, Settings

    return Client(Settings.from_env({**os.environ, **env}))


def _job_timeout(tokens: int, ttft_ms: float, delay_ms: float) -> float:
    return 120 + (ttft_ms + tokens * delay_ms) / 1000


async def _run_jobs(
    client: Any,
    env: dict[str, str],
    config: dict[str, Any],
    n: int,
    timeout: float,
    on_sample: Callable[[], None],
    ramp_s: float = 0.0,
) -> list[JobTrace]:
    """Enqueue ``n`` jobs from another process and tail each here as soon as it exists.

    The enqueuing runs apart, as a web front end would, so this process measures a
    router that only tails (a thread would take the GIL from the tails' loop).
    ``ramp_s``: enqueue on the schedule of ``arrival_offsets`` (0: as fast as it can).
    """
    args = [
        sys.executable, "-m", "ops.bench_peers", "enqueue", "--jobs", str(n),
        "--config", json.dumps(config), "--ramp-s", str(ramp_s),
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *args, env={**os.environ, **env}, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    tails: list[asyncio.Task[JobTrace]] = []
    async for line in proc.stdout:
        job_id, at = line.decode().split()
        trace = JobTrace(job_id, enqueued_at=float(at))
        tails.append(asyncio.ensure_future(tail_job(client, trace, timeout)))
    if await proc.wait() != 0:
        raise RuntimeError(f"the enqueuing process failed with {proc.returncode}")

    async def sample_every(period_s: float) -> None:
        while True:
            on_sample()
            await asyncio.sleep(period_s)

    # Sampled on a timer of its own: asyncio.wait over 1,000 tails every 0.25 s
    # added and removed 1,000 callbacks each time, ~6% of the router's CPU.
    sampler = asyncio.ensure_future(sample_every(0.25))
    try:
        return list(await asyncio.gather(*tails))
    finally:
        sampler.cancel()
        on_sample()


def _redis_cpu(r: Any) -> float:
    """Redis's own CPU seconds so far, to the microsecond (``/proc`` counts 10 ms ticks)."""
    cpu = r.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def _phase_idle(stack: _Stack) -> dict[str, Any]:
    """One job at a time on an idle worker, then batches for Redis memory and the
    work paid once per job."""
    o = stack.opts
    w = stack.worker("idle", concurrency=max(8, o.memory_jobs))
    client = _client(stack.env)
    r = client.redis
    cfg = bench_config(3, o.ttft_ms, 1)
    timeout = _job_timeout(3, o.ttft_ms, 1)

    async def first_tokens() -> list[JobTrace]:
        out = []
        for i in range(o.idle_jobs + 1):
            job_id = client.enqueue_actor_job(cfg, "bench")
            trace = await tail_job(client, JobTrace(job_id, enqueued_at=time.time()), timeout)
            if i:  # the first one warms the worker up (imports, connections)
                out.append(trace)
            await asyncio.sleep(0.05)
        return out

    per_job_cpu: list[float] = []  # worker, then Redis: CPU seconds per one-token job

    async def memory() -> tuple[list[JobTrace], list[JobTrace]]:
        # Two lengths, so the per-entry cost and the fixed cost of a job can be told apart.
        big = await _run_jobs(
            client, stack.env, bench_config(memory_tokens(o), 0, 0), o.memory_jobs, 120, _noop
        )
        pids = tree_pids(w.pid)
        cpu0, redis0 = cpu_seconds(pids), _redis_cpu(r)
        small = await _run_jobs(client, stack.env, bench_config(1, 0, 0), o.cost_jobs, 120, _noop)
        per_job_cpu.append((cpu_seconds(pids) - cpu0) / max(1, len(small)))
        per_job_cpu.append((_redis_cpu(r) - redis0) / max(1, len(small)))
        await client.aclose()
        return big, small

    async def both() -> tuple[list[JobTrace], tuple[list[JobTrace], list[JobTrace]]]:
        return await first_tokens(), await memory()

    traces, (big, small) = _run_router(both(), o.uvloop)
    w.stop()
    added = [(t.first_token_s or 0) * 1000 - o.ttft_ms for t in traces if t.received]
    # Where the added first-token time goes: queue + claim, the worker's setup and
    # first write, then Redis to the tailer (entry ids are Redis's clock, in ms).
    to_claim, to_redis, to_tailer = [], [], []
    for t in traces:
        record = client.get_result(t.job_id)
        if not (t.received and record and record.started_at):
            continue
        stored = int(t.first_id.partition("-")[0]) / 1000
        to_claim.append((record.started_at - t.enqueued_at) * 1000)
        to_redis.append((stored - record.started_at) * 1000 - o.ttft_ms)
        to_tailer.append((t.received[0] - stored) * 1000)
    sizes_big, sizes_small = _redis_sizes(r, big), _redis_sizes(r, small)
    client.close()
    per_entry = (sizes_big["stream"] - sizes_small["stream"]) / max(
        1, sizes_big["entries"] - sizes_small["entries"]
    )
    return {
        "first_token": {
            "jobs": len(traces),
            "errors": sorted({t.error for t in traces if t.error})[:5],
            "added_ms_p50": pct(added, 50),
            "added_ms_p99": pct(added, 99),
            "added_ms_max": max(added) if added else None,
            "p50_split_ms": {
                "enqueued_to_claimed": pct(to_claim, 50),
                "claimed_to_stored_minus_ttft": pct(to_redis, 50),
                "stored_to_tailer": pct(to_tailer, 50),
            },
        },
        # Claim, load, build the model, finish, Celery's own work: paid once per job.
        "worker_cpu_ms_per_job": per_job_cpu[0] * 1000 if per_job_cpu else None,
        # Enqueue, queue, claim, one entry, ending, ack: Redis's share of a job's fixed cost.
        "redis_cpu_ms_per_job": per_job_cpu[1] * 1000 if per_job_cpu else None,
        "memory": {
            "jobs": len(big) + len(small),
            "succeeded": sum(1 for t in big + small if t.status == "succeeded"),
            "entries_per_job": sizes_big["entries"],
            "stream_bytes_per_job": sizes_big["stream"],
            "record_bytes_per_job": sizes_big["record"],
            "bytes_per_entry": sizes_big["stream"] / max(1, sizes_big["entries"]),
            "marginal_bytes_per_entry": per_entry,
            # What a job costs before its entries: record + stream minus its entries.
            "fixed_bytes_per_job": sizes_small["record"]
            + sizes_small["stream"]
            - per_entry * sizes_small["entries"],
        },
    }


def _run_router(coro: Coroutine[Any, Any, T], uvloop_on: bool) -> T:
    """Run this process's tailing router as ``ops.router`` runs: on uvloop when the run
    uses it (as uvicorn does), with the router's garbage-collector settings."""
    from producer.gctune import tuned_gc
    from worker.loop import new_event_loop

    loop_factory = functools.partial(new_event_loop, uvloop_on)
    with tuned_gc(), asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coro)


def _noop() -> None:
    pass


def _cpu_model() -> str | None:
    """The CPU's name from /proc/cpuinfo (Linux): figures move with it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def _redis_server(url: str) -> dict[str, Any]:
    """The Redis version and the setting that moves its cost per read (``ops.stack``)."""
    import redis

    r = redis.Redis.from_url(url, decode_responses=True)
    try:
        node = r.config_get("stream-node-max-entries").get("stream-node-max-entries")
        return {
            "redis_version": r.info("server").get("redis_version"),
            "stream_node_max_entries": int(node) if node else None,
        }
    finally:
        r.close()


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _redis_sizes(r: Any, traces: list[JobTrace]) -> dict[str, float]:
    """Mean exact bytes of a job's stream and record, and its entry count."""
    from producer import keys

    n = max(1, len(traces))
    pipe = r.pipeline(transaction=False)
    for t in traces:
        pipe.memory_usage(keys.events_key(t.job_id), samples=0)
        pipe.memory_usage(keys.job_key(t.job_id), samples=0)
        pipe.xlen(keys.events_key(t.job_id))
    got = pipe.execute()
    return {
        "stream": sum(int(x or 0) for x in got[0::3]) / n,
        "record": sum(int(x or 0) for x in got[1::3]) / n,
        "entries": sum(int(x or 0) for x in got[2::3]) / n,
    }


def _phase_stream(
    stack: _Stack, name: str, jobs: int, tokens: int, delay_ms: float, ramp_s: float = 0.0
) -> dict[str, Any]:
    """``jobs`` concurrent jobs on one worker process, tailed from this process."""
    from worker.loop import LOOP_THREAD_NAME

    o = stack.opts
    w = stack.worker(name, concurrency=jobs, env={"ACTORQ_STAMP_TOKENS": "1"})
    client = _client(stack.env)
    cfg = bench_config(tokens, o.ttft_ms, delay_ms)
    timeout = _job_timeout(tokens, o.ttft_ms, delay_ms)
    r = client.redis
    peak = {"tail_connections": 0, "redis_clients": 0}

    def sample() -> None:
        peak["tail_connections"] = max(peak["tail_connections"], client.tail.connections)

    others = {"router": [os.getpid()], "redis": [stack.redis.pid]}
    other_cpu: dict[str, float] = {}
    command_us: dict[str, float] = {}
    waits: dict[str, dict[str, float] | None] = {}
    by_thread: dict[str, float] = {}  # the worker's CPU seconds by thread role

    async def main() -> tuple[list[JobTrace], float, Sampler]:
        # One warm-up job: imports, connections and the script cache are not the point.
        await _run_jobs(client, stack.env, bench_config(2, 0, 0), 1, 60, _noop)
        pids = tree_pids(w.pid)
        with Sampler(w.pid, stack.redis.port) as sampler:
            cpu0 = cpu_seconds(pids)
            others0 = {k: cpu_seconds(v) for k, v in others.items()}
            parts = {"worker": pids, **others}
            sched0, started = {k: sched_ns(v) for k, v in parts.items()}, time.monotonic()
            commands0 = r.info("commandstats")
            traces = await _run_jobs(client, stack.env, cfg, jobs, timeout, sample, ramp_s)
            cpu = cpu_seconds(pids) - cpu0
            wall = time.monotonic() - started
            sched1 = {k: sched_ns(v) for k, v in parts.items()}
            waits.update({k: cpu_wait(sched0[k], sched1[k], wall) for k in parts})
            roles = thread_roles(w.pid, LOOP_THREAD_NAME)
            if sched1["worker"] and "loop" in roles.values():  # a kernel that names threads
                by_thread.update(ran_by_role(sched0["worker"], sched1["worker"], roles))
            other_cpu.update({k: cpu_seconds(v) - others0[k] for k, v in others.items()})
            command_us.update(command_time(commands0, r.info("commandstats")))
            peak["redis_clients"] = int(r.info("clients")["connected_clients"])
        await client.aclose()
        return traces, cpu, sampler

    traces, cpu, sampler = _run_router(main(), o.uvloop)
    w.stop()
    client.close()
    out = summarise_lags(traces, delay_ms)
    out.update(
        cpu_s=cpu,
        cpu_us_per_token=us_per_token(cpu, out["tokens"]),
        # The rest of the machine's CPU on the same tokens: the tailing router and Redis.
        router_cpu_us_per_token=us_per_token(other_cpu["router"], out["tokens"]),
        redis_cpu_us_per_token=us_per_token(other_cpu["redis"], out["tokens"]),
        # Where Redis's time went, by command (a script's time holds its commands').
        redis_command_us_per_token={
            k: v / out["tokens"] for k, v in command_us.items() if out["tokens"]
        },
        worker_pss_bytes=sampler.peak_pss,
        worker_redis_connections=sampler.peak_connections,
        router_tail_connections=peak["tail_connections"],
        redis_connected_clients=peak["redis_clients"],
        # Run-queue time of each process while the jobs ran: how much of the lag is
        # the machine's CPUs being busy rather than actorq's own path.
        cpu_wait=waits,
        # Where the worker's CPU went: its event loop, Celery's intake, the rest.
        worker_cpu_us_per_token_by_thread={
            k: us_per_token(v, out["tokens"]) for k, v in by_thread.items()
        },
        lags_ms=[lag for t in traces for lag in t.lags_ms],
    )
    return out


def _make_jobs(stack: _Stack, prefix: str, n: int) -> list[str]:
    """Job records for a peer's streams, so the same tailer can follow them."""
    import redis

    from producer import keys

    r = redis.Redis.from_url(stack.redis.url)
    ids = [f"{prefix}-{i}" for i in range(n)]
    pipe = r.pipeline(transaction=False)
    for job_id in ids:
        pipe.hset(keys.job_key(job_id), mapping={"status": "running", "actor": "bench"})
        pipe.expire(keys.job_key(job_id), 3600)
    pipe.execute()
    r.close()
    return ids


async def _tail_all(client: Any, ids: list[str], timeout: float) -> list[JobTrace]:
    tasks = [tail_job(client, JobTrace(i, enqueued_at=time.time()), timeout) for i in ids]
    out = list(await asyncio.gather(*tasks))
    await client.aclose()
    return out


def _phase_naive(stack: _Stack) -> dict[str, Any]:
    o = stack.opts
    prefix = f"naive-{uuid.uuid4().hex[:6]}"
    ids = _make_jobs(stack, prefix, o.jobs)
    client = _client(stack.env)
    args = [
        sys.executable, "-m", "ops.bench_peers", "naive", "--url", stack.redis.url,
        "--prefix", prefix, "--jobs", str(o.jobs), "--tokens", str(o.tokens),
        "--ttft-ms", str(o.ttft_ms), "--delay-ms", str(o.delay_ms),
    ]  # fmt: skip

    async def main() -> tuple[list[JobTrace], dict[str, Any]]:
        tails = asyncio.ensure_future(
            _tail_all(client, ids, _job_timeout(o.tokens, o.ttft_ms, o.delay_ms))
        )
        proc = await asyncio.create_subprocess_exec(
            *args, env={**os.environ, **stack.env}, stdout=subprocess.PIPE
        )
        stdout, _ = await asyncio.wait_for(proc.communicate(), 600)
        return await tails, json.loads(stdout.decode().strip().splitlines()[-1])

    traces, stats = _run_router(main(), o.uvloop)
    client.close()
    out = summarise_lags(traces, o.delay_ms)
    out.update(
        cpu_s=stats["cpu_s"],
        cpu_us_per_token=stats["cpu_us_per_token"],
        lags_ms=[lag for t in traces for lag in t.lags_ms],
    )
    return out


def _phase_prefork(stack: _Stack) -> dict[str, Any]:
    """Peer (c): ``--prefork`` children, twice as many jobs as children."""
    o = stack.opts
    queue = stack.env["ACTORQ_QUEUE"] + "-prefork"
    w = stack.worker(
        "prefork", o.prefork, app="ops.bench_prefork", pool="prefork",
        env={"ACTORQ_QUEUE": queue},
    )  # fmt: skip
    from producer.client import use_broker

    from .bench_prefork import PREFORK_TASK, app

    use_broker(app, stack.redis.url)
    n = 2 * o.prefork
    ids = _make_jobs(stack, f"prefork-{uuid.uuid4().hex[:6]}", n)
    client = _client(stack.env)
    timeout = _job_timeout(o.tokens, o.ttft_ms, o.delay_ms) * 2

    async def main() -> tuple[list[JobTrace], float, Sampler]:
        pids = tree_pids(w.pid)
        with Sampler(w.pid, stack.redis.port) as sampler:
            cpu0 = cpu_seconds(pids)
            tails = asyncio.ensure_future(_tail_all(client, ids, timeout))
            for job_id in ids:
                app.send_task(
                    PREFORK_TASK, args=[job_id, o.tokens, o.ttft_ms, o.delay_ms], queue=queue
                )
            traces = await tails
            cpu = cpu_seconds(pids) - cpu0
        return traces, cpu, sampler

    traces, cpu, sampler = _run_router(main(), o.uvloop)
    w.stop()
    app.close()
    client.close()
    out = summarise_lags(traces, o.delay_ms)
    out.update(
        children=o.prefork,
        cpu_s=cpu,
        cpu_us_per_token=us_per_token(cpu, out["tokens"]),
        worker_pss_bytes=sampler.peak_pss,
        worker_redis_connections=sampler.peak_connections,
        lags_ms=[lag for t in traces for lag in t.lags_ms],
    )
    return out


def _floor(o: BenchOptions) -> dict[str, Any]:
    args = [
        sys.executable, "-m", "ops.bench_peers", "floor", "--jobs", str(o.jobs),
        "--tokens", str(o.tokens), "--ttft-ms", str(o.ttft_ms), "--delay-ms", str(o.delay_ms),
        "--ramp-s", str(o.ramp_s),
    ]  # fmt: skip
    env = {**os.environ, "ACTORQ_UVLOOP": "1" if o.uvloop else "0"}
    done = subprocess.run(args, env=env, capture_output=True, check=True, timeout=600)
    return dict(json.loads(done.stdout.decode().strip().splitlines()[-1]))


def bracket_floor(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """One floor from the runs before and after the load: the mean of each figure."""
    merged = dict(before)
    for key, value in before.items():
        other = after.get(key)
        if isinstance(value, float) and isinstance(other, float):
            merged[key] = (value + other) / 2
    merged["cpu_us_per_token_runs"] = [before["cpu_us_per_token"], after["cpu_us_per_token"]]
    return merged


def median_round(
    loads: list[dict[str, Any]], floors: list[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The round with the median CPU ratio: its load, and the floor around it.

    ``floors`` are the runs between the loads (one more than ``loads``); load ``i``
    is compared with the mean of floors ``i`` and ``i + 1``. Every round's figures
    go into the load's ``rounds``; the reported round's are its own, so the table's
    worker CPU, floor and ratio stay one measurement. With an even number of
    rounds the lower of the two middle ones is reported.
    """
    if len(floors) != len(loads) + 1 or not loads:
        raise ValueError("need one floor run around each load run")
    brackets = [bracket_floor(floors[i], floors[i + 1]) for i in range(len(loads))]
    rounds = [
        {
            "worker_cpu_us_per_token": load["cpu_us_per_token"],
            "floor_cpu_us_per_token": floor["cpu_us_per_token"],
            "cpu_vs_floor": load["cpu_us_per_token"] / floor["cpu_us_per_token"],
        }
        for load, floor in zip(loads, brackets, strict=True)
    ]
    order = sorted(range(len(rounds)), key=lambda i: rounds[i]["cpu_vs_floor"])
    pick = order[(len(order) - 1) // 2]
    return {**loads[pick], "rounds": rounds, "reported_round": pick + 1}, brackets[pick]


def run_bench(opts: BenchOptions, out: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every phase; print the table, write JSON (and the plot); return the results."""
    started = time.time()
    log_dir = Path(tempfile.mkdtemp(prefix="actorq-bench-"))
    out(f"actorq bench: {opts.jobs} jobs x {opts.tokens} tokens, {opts.delay_ms} ms apart, "
        f"ttft {opts.ttft_ms} ms (logs: {log_dir})")  # fmt: skip
    results: dict[str, Any] = {"options": {**asdict(opts), "out_dir": str(opts.out_dir)}}
    stack = _Stack(opts, log_dir, out)
    redis_server = _redis_server(stack.redis.url)
    mark = time.time()

    def lap() -> str:
        nonlocal mark
        took, mark = time.time() - mark, time.time()
        return f"    ({took:.1f} s)"

    try:
        out("  idle worker: first-token latency, Redis memory ...")
        results["idle"] = _phase_idle(stack)
        out(lap())
        # Each load runs between two floors, so each is compared with the machine as
        # it was right then: a neighbour that took the CPU during one of the two
        # moves their mean less than it moves either.
        out("  floor (a): in-process astream ...")
        floors, loads = [_floor(opts)], []
        out(lap())
        for n in range(1, opts.rounds + 1):
            of = f" (round {n} of {opts.rounds})" if opts.rounds > 1 else ""
            out(f"  load: {opts.jobs} concurrent jobs on one worker process{of} ...")
            loads.append(
                _phase_stream(stack, "load", opts.jobs, opts.tokens, opts.delay_ms, opts.ramp_s)
            )
            out(lap())
            out(f"  floor (a) again{of} ...")
            floors.append(_floor(opts))
            out(lap())
        results["load"], results["floor"] = median_round(loads, floors)
        out(f"  fan-in: {opts.tail_jobs} concurrent tails in one router process ...")
        results["fanin"] = _phase_stream(
            stack, "fanin", opts.tail_jobs, opts.tail_tokens, opts.tail_delay_ms
        )
        out(lap())
        out("  naive (b): one awaited XADD per token ...")
        results["naive"] = _phase_naive(stack)
        out(lap())
        out(f"  prefork (c): {opts.prefork} children, asyncio.run per task ...")
        results["prefork"] = _phase_prefork(stack)
        out(lap())
    finally:
        stack.close()
    results["targets"] = targets(results)
    results["capacity"] = capacity(results)
    results["machine"] = {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "load_avg_after": os.getloadavg(),
        "python": sys.version.split()[0],
        "uvloop": _has("uvloop") and opts.uvloop,
        "hiredis": _has("hiredis"),
        **redis_server,
    }
    results["elapsed_s"] = time.time() - started
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    lags = {k: results[k].pop("lags_ms") for k in ("load", "fanin", "naive", "prefork")}
    (opts.out_dir / "bench.json").write_text(json.dumps(results, indent=2, default=str))
    out(render(results))
    if opts.plot:
        png = write_plot(lags, opts.out_dir / "bench-lag.png")
        out(f"plot: {png}" if png else "plot: skipped (pip install 'actorq[bench]' for matplotlib)")
    out(f"json: {opts.out_dir / 'bench.json'}  ({results['elapsed_s']:.0f} s)")
    return results
