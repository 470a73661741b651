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


async def main(srv: FakeOpenAI) -> None:
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
