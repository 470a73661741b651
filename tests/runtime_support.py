"""Helpers for the actor runtime tests: model names, credentials, a synthetic tiktoken file."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

from tests.openai_server import FakeOpenAI

T = TypeVar("T")

# A key shaped like a real one, so both the value and the shape scrubbers are exercised.
API_KEY = "sk-test-" + "A1b2C3d4E5f6G7h8I9j0" * 2


def model(label: str) -> str:
    """A model name no other test scripts (the server is shared by the session)."""
    return f"{label}-{uuid.uuid4().hex[:8]}"


def creds(server: FakeOpenAI, api_key: str = API_KEY) -> dict[str, dict[str, str]]:
    return {"openai": {"api_key": api_key, "base_url": server.base_url}}


def auth_header(server: FakeOpenAI, model_name: str) -> str:
    """The Authorization header of the first request for ``model_name``."""
    headers = {k.lower(): v for k, v in server.calls(model_name)[0].headers.items()}
    return headers["authorization"]


def llm(model_name: str, **extra: Any) -> dict[str, Any]:
    return {"type": "llm", "name": "writer", "provider": "openai", "model": model_name, **extra}


def run(coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
    """Run a coroutine on a fresh loop, bounded so a bug cannot hang the suite."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def review_graph(draft: str, review: str, **extra: Any) -> dict[str, Any]:
    """draft -> review; review -> draft when it says REVISE, else the end."""
    return {
        "type": "graph",
        "name": "writer_room",
        "entry": "draft",
        "max_visits": 3,
        "nodes": {
            "draft": {"provider": "openai", "model": draft, "system_prompt": "Write it."},
            "review": {"provider": "openai", "model": review, "system_prompt": "Judge it."},
        },
        "edges": [
            {"from": "draft", "to": "review"},
            {"from": "review", "to": "draft", "when": "REVISE"},
            {"from": "review", "to": "__end__"},
        ],
        **extra,
    }


def wait_for(check: Any, timeout: float = 5.0) -> None:
    """Poll ``check`` until true; fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


async def collect(agen: Any) -> list[Any]:
    return [item async for item in agen]


# A tiny BPE vocabulary in tiktoken's file format: every byte, plus merges that
# make "hello" and " world" one token each.
SYNTHETIC_PAT = r"""\s?\S+|\s+"""
_MERGES = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world"]


def synthetic_encoding_file() -> tuple[bytes, str]:
    """``(file bytes, sha256)`` of the synthetic encoding."""
    tokens = [bytes([b]) for b in range(256)] + _MERGES
    data = b"".join(
        base64.b64encode(tok) + b" " + str(rank).encode() + b"\n" for rank, tok in enumerate(tokens)
    )
    return data, hashlib.sha256(data).hexdigest()
