"""``python -m ops.bench_inprocess``: the worker's own CPU per token, without Celery.

One process runs, in turns, the floor (a) of ``actorq bench``, the same floor with
every token handed to the worker's ``Publisher``, and the worker's ``JobRunner`` on
the same load: each job claimed, run through the scripted model, published to an
embedded Redis and ended, as in a worker, but handed over by this process instead
of Celery. The runner against the floor is what target 2 measures less Celery's
per-job intake and hand-off and less the cores a worker shares with Redis and a
router; the middle column tells publishing from the rest of the runner's work.
Each round also counts the publisher's pipelines (round trips to Redis) in the
middle column and the runner's, and the medians say how many tokens each carried.
``--pin`` (Linux) puts this process on one CPU and Redis on another. Prints one
line per round and the medians; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .bench_measure import us_per_token
from .bench_peers import arrival_offsets, bench_config, bench_model, run_floor

__all__ = ["main", "run_floor_publishing", "run_runner"]

#: The lease holder this process writes the publishing floor's streams as.
_OWNER = "bench-inprocess"


def _cpu_per_token(
    one: Callable[[float, str], Awaitable[None]], ids: list[str], offsets: list[float],
    tokens: int,
) -> float | None:  # fmt: skip
    """CPU µs per token of ``one(offsets[i], ids[i])`` for every job at once, on the shared loop."""
    from worker.loop import run_on_loop

    async def main() -> None:
        await asyncio.gather(*(one(o, i) for o, i in zip(offsets, ids, strict=True)))

    cpu0 = time.process_time()
    run_on_loop(main())
    return us_per_token(time.process_time() - cpu0, len(ids) * tokens)


def run_runner(runner: Any, ids: list[str], offsets: list[float], tokens: int) -> float | None:
    """CPU µs per token of ``runner`` running the jobs ``ids``, job *i* starting at ``offsets[i]``."""

    async def one(offset: float, job_id: str) -> None:
        await asyncio.sleep(offset)
        outcome = await runner.run(job_id)
        if outcome != "succeeded":
            raise RuntimeError(f"job {job_id} ended {outcome}")

    return _cpu_per_token(one, ids, offsets, tokens)


def run_floor_publishing(
    publisher: Any, ids: list[str], offsets: list[float], tokens: int, ttft_ms: float,
    delay_ms: float,
) -> float | None:  # fmt: skip
    """CPU µs per token of the floor's ``astream`` loops with each token handed to
    ``publisher`` for job ``ids[i]`` (leases held by ``_OWNER``)."""
    from langchain_core.messages import HumanMessage

    model = bench_model(tokens, ttft_ms, delay_ms)

    async def one(offset: float, job_id: str) -> None:
        channel = publisher.open(job_id, _OWNER)
        await asyncio.sleep(offset)
        async for chunk in model.astream([HumanMessage("bench")]):
            if chunk.content:
                publisher.publish_token(channel, chunk.content, "bench")
        await publisher.drain(channel)
        if channel.published != tokens:
            raise RuntimeError(f"job {job_id}: {channel.published} of {tokens} tokens written")

    return _cpu_per_token(one, ids, offsets, tokens)


def _pipelines() -> float:
    """Pipelines this process's publishers have had acknowledged (their metric's count)."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("actorq_publish_lag_seconds_count") or 0.0


def _new_publisher(settings: Any) -> Any:
    """The worker's publisher, on its own client of the shared loop."""
    import redis.asyncio as aioredis

    from worker.loop import run_on_loop
    from worker.publisher import Publisher

    async def make() -> Any:
        return Publisher(aioredis.Redis.from_url(settings.redis_url), settings)

    return run_on_loop(make())


def _pin(redis_pid: int) -> None:
    """This process (every thread) on the last CPU, Redis on the first."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return
    os.sched_setaffinity(redis_pid, {cpus[0]})
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), {cpus[-1]})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ops.bench_inprocess", description=__doc__)
    p.add_argument("--jobs", type=int, default=300)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--delay-ms", type=float, default=20.0)
    p.add_argument("--ttft-ms", type=float, default=100.0)
    p.add_argument("--ramp-s", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pin", action="store_true", help="this process and Redis on CPUs of their own")
    a = p.parse_args(argv)
    if a.jobs < 1 or a.tokens < 1 or a.rounds < 1:
        p.error("--jobs, --tokens and --rounds must be positive")

    from producer import Client, Settings, keys
    from producer.crypto import generate_key
    from producer.gctune import freeze_startup_heap, tune_gc
    from worker.jobs import JobRunner
    from worker.loop import get_loop

    from .stack import EmbeddedRedis

    redis = EmbeddedRedis().start()
    try:
        env = {"REDIS_URL": redis.url, "ACTORQ_SECRET_KEY": generate_key(),
               "ACTORQ_QUEUE": "actorq-inprocess"}  # fmt: skip
        settings = Settings.from_env(env)
        client = Client(settings)  # its messages wait on a queue nobody reads
        runner = JobRunner(settings, lambda *_: None)
        config = bench_config(a.tokens, a.ttft_ms, a.delay_ms)
        offsets = arrival_offsets(a.jobs, a.ramp_s)
        get_loop()
        if a.pin:
            _pin(redis.pid)
        warm = [client.enqueue_actor_job(bench_config(2, 0, 0), "warm") for _ in range(5)]
        run_runner(runner, warm, [0.0] * len(warm), 2)
        tune_gc()  # the worker's collector settings, for both
        freeze_startup_heap()
        publisher = _new_publisher(settings)
        floors, publishing, runners = [], [], []
        carried: tuple[list[float], list[float]] = ([], [])  # tokens a pipeline: publishing, runner
        for n in range(1, a.rounds + 1):
            floor = run_floor(a.jobs, a.tokens, a.ttft_ms, a.delay_ms, a.ramp_s)
            floors.append(float(floor["cpu_us_per_token"]))
            leased = [f"inprocess-{n}-{i}" for i in range(a.jobs)]
            client.redis.mset({keys.lease_key(i): _OWNER for i in leased})
            sent = _pipelines()
            publishing.append(
                run_floor_publishing(publisher, leased, offsets, a.tokens, a.ttft_ms, a.delay_ms)
                or 0.0
            )
            ids = [client.enqueue_actor_job(config, "bench") for _ in range(a.jobs)]
            between = _pipelines()
            runners.append(run_runner(runner, ids, offsets, a.tokens) or 0.0)
            pipes = (between - sent, _pipelines() - between)
            # The runner's pipelines also carry each job's claim, start entry and ending.
            for into, count in zip(carried, pipes, strict=True):
                into.append(a.jobs * a.tokens / count if count else 0.0)
            print(f"round {n}: floor {floors[-1]:.1f} us/token, floor + publishing "
                  f"{publishing[-1]:.1f}, runner {runners[-1]:.1f} us/token, "
                  f"{runners[-1] / floors[-1]:.2f}x; pipelines {pipes[0]:,.0f} / "
                  f"{pipes[1]:,.0f}", flush=True)  # fmt: skip
        floor_m, runner_m = statistics.median(floors), statistics.median(runners)
        print(f"median: floor {floor_m:.1f}, floor + publishing "
              f"{statistics.median(publishing):.1f}, runner {runner_m:.1f} us/token, "
              f"{runner_m / floor_m:.2f}x ({a.jobs} jobs x {a.tokens} tokens, "
              f"{a.delay_ms:g} ms apart{', pinned' if a.pin else ''}); "
              f"tokens a pipeline {statistics.median(carried[0]):.1f} / "
              f"{statistics.median(carried[1]):.1f}")  # fmt: skip
        client.close()
    finally:
        redis.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
