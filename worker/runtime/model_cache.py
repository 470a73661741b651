"""Chat models reused across jobs of the same model settings and credentials.

Building a ``ChatOpenAI`` cost ~1.1 ms of CPU per job (its client objects,
pydantic validation), and LangChain serialises each new model once more on its
first ``astream`` for the callbacks. Jobs of one actor share the same settings,
so the worker keeps the built models in a small LRU per event loop
(``ACTORQ_MODEL_CACHE_SIZE``, default 128; 0 builds a model per job).

The key holds no secret: credentials enter it as an HMAC under a key made at
process start. A cached model does hold its API key in memory, as it would for
the length of a job; entries unused for ``ACTORQ_MODEL_CACHE_TTL_S`` (default
600 s) are dropped by a timer on the loop, so a tenant's key does not outlive its
traffic by more than that.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from producer.settings import env_number

__all__ = ["ModelCache", "cache_from_env", "credentials_digest"]

_DIGEST_KEY = secrets.token_bytes(32)


def credentials_digest(credentials: Mapping[str, str]) -> bytes:
    """A process-local fingerprint of ``credentials``: equal maps, equal digests."""
    raw = json.dumps(dict(credentials), sort_keys=True).encode()
    return hmac.new(_DIGEST_KEY, raw, hashlib.sha256).digest()


class ModelCache:
    """An LRU of built models, one per running event loop (models bind loop-local clients)."""

    def __init__(self, size: int, ttl_s: float) -> None:
        self.size, self.ttl_s = size, ttl_s
        self._per_loop: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, OrderedDict[Hashable, tuple[Any, float]]
        ] = weakref.WeakKeyDictionary()
        # Loops with an expiry timer pending (one each, not one per entry).
        self._timers: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The model cached under ``key`` on this loop, else ``build()`` (and cache it)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return build()  # no loop: nothing to tie the model's clients to
        if self.size <= 0:
            return build()
        entries = self._per_loop.get(loop)
        if entries is None:
            entries = self._per_loop[loop] = OrderedDict()
        now = time.monotonic()
        hit = entries.get(key)
        if hit is not None and now - hit[1] <= self.ttl_s:
            entries[key] = (hit[0], now)
            entries.move_to_end(key)
            return hit[0]
        model = build()
        entries[key] = (model, now)
        entries.move_to_end(key)
        while len(entries) > self.size:
            entries.popitem(last=False)
        self._expire(loop)
        return model

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        """Drop the entries unused for the TTL; come back while any remain."""
        entries = self._per_loop.get(loop)
        if not entries:
            return
        now = time.monotonic()
        # The oldest entries are the least recently used: drop the ones past the TTL.
        while entries and now - next(iter(entries.values()))[1] > self.ttl_s:
            entries.popitem(last=False)
        if entries and loop not in self._timers and not loop.is_closed():
            self._timers.add(loop)
            # When the oldest entry comes due: no entry outlives its TTL by much.
            due = next(iter(entries.values()))[1] + self.ttl_s - now
            loop.call_later(max(due, 0.01), self._timer_fired, loop)

    def _timer_fired(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timers.discard(loop)
        self._expire(loop)

    def __len__(self) -> int:
        """Models cached on the running loop."""
        try:
            return len(self._per_loop.get(asyncio.get_running_loop(), ()))
        except RuntimeError:
            return 0


def cache_from_env(env: Mapping[str, str] | None = None) -> ModelCache:
    """A cache sized by ``ACTORQ_MODEL_CACHE_SIZE`` and ``ACTORQ_MODEL_CACHE_TTL_S``."""
    size = env_number("ACTORQ_MODEL_CACHE_SIZE", 128, int, env)
    ttl = env_number("ACTORQ_MODEL_CACHE_TTL_S", 600.0, float, env)
    if size < 0:
        raise ValueError(f"ACTORQ_MODEL_CACHE_SIZE must be 0 or more, got {size}")
    if not ttl > 0:
        raise ValueError(f"ACTORQ_MODEL_CACHE_TTL_S must be more than 0, got {ttl}")
    return ModelCache(size, ttl)
