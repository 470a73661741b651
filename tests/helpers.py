"""Small helpers shared by tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import redis

from producer import Client, keys
from producer.aio import stop_task


def scripted(reply: str = "one two three four five", **extra: Any) -> dict[str, Any]:
    return {"type": "llm", "name": "tester", "provider": "scripted", "reply": reply, **extra}


async def listener_epoch(client: Client, other_than: int | None, timeout: float) -> int | None:
    """The tail's key-tracking listener id once it listens and is not ``other_than``;
    as it is after ``timeout`` (``None``: no listener, as when Redis refused tracking)."""
    deadline = time.monotonic() + timeout
    while client.tail.tracking_epoch in (None, other_than) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return client.tail.tracking_epoch


class SwallowsCancel:
    """A stand-in for a library that loses a cancellation landing inside one of its
    calls, as redis-py can: :meth:`call` waits and, cancelled, notes it and returns
    as if nothing came. ``inside`` is set once a call waits."""

    def __init__(self) -> None:
        self.inside = asyncio.Event()
        self.swallowed = 0

    async def call(self, seconds: float = 30.0) -> None:
        self.inside.set()
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.swallowed += 1


async def end_leftover(task: asyncio.Task[Any]) -> None:
    """Stop ``task`` within a second: one left running must fail its test, not hang
    the loop's end."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop_task(task), 1)


def actorq_keys(r: redis.Redis) -> set[bytes]:
    return set(r.scan_iter(match=f"{keys.PREFIX}:*", count=1000))


def queue_length(r: redis.Redis, queue: str) -> int:
    return int(r.llen(queue))


#: The keys of kombu's Redis transport holding unacked messages, for every queue.
UNACKED, UNACKED_INDEX = "unacked", "unacked_index"


def unacked_tags(r: redis.Redis, *queues: str) -> list[bytes]:
    """Delivery tags kombu's Redis transport holds unacked for any of ``queues``.

    The transport keeps one ``unacked`` hash for every queue of the database; each
    value is ``[message, exchange, routing_key]``.
    """
    return [tag for tag, value in r.hgetall(UNACKED).items() if json.loads(value)[-1] in queues]


def forget_unacked(r: redis.Redis, *queues: str) -> None:
    """Drop the unacked messages of ``queues`` (left by killed workers) from kombu's indices."""
    tags = unacked_tags(r, *queues)
    if tags:
        r.hdel(UNACKED, *tags)
        r.zrem(UNACKED_INDEX, *tags)
