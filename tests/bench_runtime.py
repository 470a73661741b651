"""Runtime cost per token: ``.venv/bin/python tests/bench_runtime.py`` (prints, asserts nothing)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from typing import Any

from tests.openai_server import FakeOpenAI, Reply
from worker import create_executor

N = 5000
text = " ".join(f"w{i}" for i in range(N))


async def measure(label: str, cfg: dict[str, Any], creds: Any = None) -> None:
    ex = create_executor(cfg, creds)
    await ex.execute("warm")
    t = time.perf_counter()
    n = 0
    async for _ in ex.execute_stream("go"):
        n += 1
    dt = time.perf_counter() - t
    print(f"{label}: {n} tokens in {dt:.3f}s = {dt / n * 1e6:.1f} us/token")


async def first_token(srv: FakeOpenAI) -> None:
    """Time to first token against the time the server needs to send the whole body."""
    srv.script("paced", Reply(text="a b c d e f g h i j", chunk_delay_s=0.1))
    ex = create_executor(
        {"type": "llm", "provider": "openai", "model": "paced"},
        {"openai": {"api_key": "sk-x", "base_url": srv.base_url}},
    )
    await ex.execute("warm")
    t = time.perf_counter()
    first = None
    async for _ in ex.execute_stream("go"):
        first = first if first is not None else time.perf_counter() - t
    total = time.perf_counter() - t
    assert first is not None
    print(
        f"paced stream (10 tokens, 100 ms apart): first token {first * 1e3:.0f} ms, last {total * 1e3:.0f} ms"
    )


async def main(srv: FakeOpenAI) -> None:
    await first_token(srv)
    await measure("scripted llm", {"type": "llm", "provider": "scripted", "reply": text})
    await measure(
        "scripted graph(2 nodes)",
        {
            "type": "graph",
            "entry": "a",
            "nodes": {
                "a": {"provider": "scripted", "reply": text},
                "b": {"provider": "scripted", "reply": text},
            },
            "edges": [{"from": "a", "to": "b"}],
        },
    )
    await measure(
        "openai over HTTP llm",
        {"type": "llm", "provider": "openai", "model": "big"},
        {"openai": {"api_key": "sk-x", "base_url": srv.base_url}},
    )


if __name__ == "__main__":
    server = FakeOpenAI().start()
    server.script("big", Reply(text=text))
    try:
        asyncio.run(main(server))
    finally:
        server.stop()
