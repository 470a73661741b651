"""Peer (c) of ``actorq bench``: Celery's prefork pool running ``asyncio.run`` per task.

This is how async work usually runs under Celery: each child process runs one
task at a time, each task builds a fresh loop and a fresh Redis client, and
tokens go out one awaited ``XADD`` each. Started by the benchmark as
``celery -A ops.bench_prefork worker --pool prefork``.
"""

from __future__ import annotations

import asyncio
import os

from celery import Celery

import celeryconfig
from producer import keys

from .bench_peers import bench_model, naive_job

__all__ = ["PREFORK_TASK", "app", "prefork_stream"]

PREFORK_TASK = "actorq.bench.prefork_stream"

app = Celery("actorq-bench-prefork")
app.config_from_object(celeryconfig)


@app.task(name=PREFORK_TASK, ignore_result=True)
def prefork_stream(job_id: str, tokens: int, ttft_ms: float, delay_ms: float) -> int:
    """Stream one scripted reply to the job's stream on a loop of its own."""
    import redis.asyncio as aioredis

    async def run() -> int:
        r = aioredis.Redis.from_url(os.environ["REDIS_URL"])
        try:
            return await naive_job(r, keys.events_key(job_id), bench_model(tokens, ttft_ms, delay_ms))
        finally:
            await r.aclose()

    return asyncio.run(run())
