"""The peers ``actorq bench`` compares with, each run in its own process.

- (a) the floor: the same LangChain ``astream`` loop of the scripted model, many
  jobs on one event loop, no queue and no Redis;
- (b) a naive publisher: the same loop awaiting one ``XADD`` per token;
- (c) lives in :mod:`ops.bench_prefork` (Celery prefork + ``asyncio.run`` per task)
  and reuses :func:`naive_job` from here.

Run as ``python -m ops.bench_peers floor|naive ...``; prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from typing import Any

from .bench_measure import us_per_token

__all__ = [
    "arrival_offsets",
    "bench_config",
    "bench_model",
    "bench_reply",
    "naive_job",
    "run_enqueue",
    "run_floor",
    "run_naive",
]


def arrival_offsets(jobs: int, ramp_s: float, seed: int = 0) -> list[float]:
    """When each job starts, in seconds after the first could: seeded, uniform over ``ramp_s``.

    The floor and the load it is compared with start their jobs on this same
    schedule. Random, not evenly spaced: streams of different users are not in
    phase, and streams in phase share the loop's wake-ups (300 streams started
    together cost 10-15% less CPU per token than the same streams at random phases).
    """
    if ramp_s <= 0:
        return [0.0] * jobs
    rng = random.Random(seed)
    return sorted(rng.uniform(0, ramp_s) for _ in range(jobs))


def bench_reply(tokens: int) -> str:
    """A reply the scripted model splits into exactly ``tokens`` tokens."""
    return " ".join(f"t{i}" for i in range(tokens))


def bench_config(tokens: int, ttft_ms: float, delay_ms: float) -> dict[str, Any]:
    """The actor config every job of the benchmark runs."""
    return {
        "type": "llm",
        "name": "bench",
        "provider": "scripted",
        "model": "scripted",
        "reply": bench_reply(tokens),
        "first_token_delay_ms": ttft_ms,
        "token_delay_ms": delay_ms,
    }


def bench_model(tokens: int, ttft_ms: float, delay_ms: float) -> Any:
    """The scripted chat model with the benchmark's reply and delays."""
    from worker.runtime.scripted import ScriptedChatModel

    return ScriptedChatModel(
        reply=bench_reply(tokens),
        first_token_delay_s=ttft_ms / 1000,
        token_delay_s=delay_ms / 1000,
    )


async def naive_job(redis: Any, stream: str, model: Any) -> int:
    """Stream one reply, awaiting one XADD per token (stamped like the bench's tokens)."""
    from langchain_core.messages import HumanMessage

    n = 0
    async for chunk in model.astream([HumanMessage("bench")]):
        if chunk.content:
            await redis.xadd(
                stream,
                {
                    "type": "token",
                    "text": chunk.content,
                    "node": "bench",
                    "ts": f"{time.time():.6f}",
                },
            )
            n += 1
    await redis.xadd(stream, {"type": "done", "status": "succeeded", "attempt": "1"})
    return n


def _on_worker_loop(coro: Any) -> Any:
    """Run on the same kind of loop the worker uses (uvloop when installed and allowed)."""
    from worker.loop import run_on_loop

    return run_on_loop(coro)


def run_floor(
    jobs: int, tokens: int, ttft_ms: float, delay_ms: float, ramp_s: float = 0.0
) -> dict[str, Any]:
    """Peer (a): ``jobs`` concurrent ``astream`` loops in this process; CPU and timing.

    Job ``i`` starts ``arrival_offsets(jobs, ramp_s)[i]`` seconds in, as in the load.
    """
    from langchain_core.messages import HumanMessage

    model = bench_model(tokens, ttft_ms, delay_ms)
    offsets = arrival_offsets(jobs, ramp_s)

    async def one(offset: float) -> list[float]:
        if offset:
            await asyncio.sleep(offset)
        seen = []
        async for chunk in model.astream([HumanMessage("bench")]):
            if chunk.content:
                seen.append(time.time())
        return seen

    async def main() -> list[list[float]]:
        return list(await asyncio.gather(*(one(offset) for offset in offsets)))

    _on_worker_loop(asyncio.sleep(0))  # start the loop before measuring
    cpu0, wall0 = time.process_time(), time.time()
    runs = _on_worker_loop(main())
    cpu = time.process_time() - cpu0
    n = sum(len(r) for r in runs)
    gaps = sum(len(r) - 1 for r in runs if len(r) > 1)
    span = sum(r[-1] - r[0] for r in runs if len(r) > 1)
    return {
        "jobs": jobs,
        "tokens": n,
        "cpu_s": cpu,
        "cpu_us_per_token": us_per_token(cpu, n),
        "wall_s": time.time() - wall0,
        "rate_fraction": gaps * delay_ms / 1000 / span if span > 0 and delay_ms > 0 else None,
        "first_token_ms_p50": sorted((r[0] - wall0) * 1000 for r in runs if r)[len(runs) // 2],
    }


def run_naive(
    url: str, prefix: str, jobs: int, tokens: int, ttft_ms: float, delay_ms: float
) -> dict[str, Any]:
    """Peer (b): the worker's loop and pool size, but one awaited XADD per token."""
    import redis.asyncio as aioredis

    from producer import keys

    model = bench_model(tokens, ttft_ms, delay_ms)

    async def main() -> list[int]:
        # A bounded pool as the worker's (redis-py's default pool raises when exhausted).
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=8, timeout=None)
        r = aioredis.Redis(connection_pool=pool)
        try:
            return list(
                await asyncio.gather(
                    *(naive_job(r, keys.events_key(f"{prefix}-{i}"), model) for i in range(jobs))
                )
            )
        finally:
            await r.aclose()

    _on_worker_loop(asyncio.sleep(0))
    cpu0 = time.process_time()
    counts = _on_worker_loop(main())
    cpu = time.process_time() - cpu0
    n = sum(counts)
    return {"jobs": jobs, "tokens": n, "cpu_s": cpu, "cpu_us_per_token": us_per_token(cpu, n)}


def run_enqueue(jobs: int, config: dict[str, Any], ramp_s: float = 0.0) -> None:
    """Enqueue ``jobs`` jobs, printing ``job_id enqueued_at`` as each call returns.

    Job ``i`` is enqueued ``arrival_offsets(jobs, ramp_s)[i]`` seconds in, or as
    soon as the ones before it are when that time has passed.
    """
    from producer import Client

    client = Client()
    start = time.monotonic()
    try:
        for offset in arrival_offsets(jobs, ramp_s):
            wait = start + offset - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            job_id = client.enqueue_actor_job(config, "bench")
            print(job_id, f"{time.time():.6f}", flush=True)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ops.bench_peers")
    p.add_argument("peer", choices=["floor", "naive", "enqueue"])
    p.add_argument("--config", default="{}", help="actor config JSON (enqueue)")
    p.add_argument("--url", default="")
    p.add_argument("--prefix", default="naive")
    p.add_argument("--jobs", type=int, required=True)
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--ttft-ms", type=float, default=0)
    p.add_argument("--delay-ms", type=float, default=0)
    p.add_argument("--ramp-s", type=float, default=0, help="arrival schedule (floor, enqueue)")
    a = p.parse_args(argv)
    if a.peer == "enqueue":
        run_enqueue(a.jobs, json.loads(a.config), a.ramp_s)
        return 0
    if a.peer == "floor":
        # The worker's garbage-collector settings here too: the floor is the same
        # loop in the same interpreter settings, so the ratio measures actorq alone.
        from producer.gctune import freeze_startup_heap, tune_gc

        tune_gc()
        freeze_startup_heap()
        out = run_floor(a.jobs, a.tokens, a.ttft_ms, a.delay_ms, a.ramp_s)
    else:
        out = run_naive(a.url, a.prefix, a.jobs, a.tokens, a.ttft_ms, a.delay_ms)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
