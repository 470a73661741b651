"""Small helpers shared by tests."""

from __future__ import annotations

from typing import Any

import redis

from producer import keys


def scripted(reply: str = "one two three four five", **extra: Any) -> dict[str, Any]:
    return {"type": "llm", "name": "tester", "provider": "scripted", "reply": reply, **extra}


def actorq_keys(r: redis.Redis) -> set[bytes]:
    return set(r.scan_iter(match=f"{keys.PREFIX}:*", count=1000))


def queue_length(r: redis.Redis, queue: str) -> int:
    return int(r.llen(queue))
