"""The worker's garbage-collector thresholds (``ACTORQ_GC_THRESHOLD``).

Every token allocates a handful of short-lived LangChain and pydantic objects,
so CPython's default thresholds (700, 10, 10) run a generation-1 collection
every 7,000 allocations: with a few hundred streams in flight that was about a
fifth of the worker's CPU per token. Collecting generation 1 ten times less
often (700, 100, 10) removes most of it; generation 0 still runs as often as
before, so garbage without reference cycles is freed as promptly as ever.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping

__all__ = ["DEFAULT_GC_THRESHOLD", "gc_threshold_from_env", "tune_gc"]

DEFAULT_GC_THRESHOLD = (700, 100, 10)


def gc_threshold_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int, int] | None:
    """``ACTORQ_GC_THRESHOLD``: three counts ``"g0,g1,g2"``, or ``"default"`` for Python's own.

    Unset: :data:`DEFAULT_GC_THRESHOLD`. None: leave the interpreter's thresholds alone.
    """
    e = os.environ if env is None else env
    raw = e.get("ACTORQ_GC_THRESHOLD", "").strip()
    if not raw:
        return DEFAULT_GC_THRESHOLD
    if raw == "default":
        return None
    try:
        g0, g1, g2 = (int(part) for part in raw.split(","))
    except ValueError:
        raise ValueError(
            f"ACTORQ_GC_THRESHOLD must be three integers like '700,100,10' or 'default', "
            f"got {raw!r}"
        ) from None
    if not (g0 >= 1 and g1 >= 1 and g2 >= 1):
        raise ValueError(f"ACTORQ_GC_THRESHOLD counts must be at least 1, got {raw!r}")
    return g0, g1, g2


def tune_gc(env: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """Apply ``ACTORQ_GC_THRESHOLD`` to this process; return the thresholds now in force."""
    threshold = gc_threshold_from_env(env)
    if threshold is not None:
        gc.set_threshold(*threshold)
    g0, g1, g2 = gc.get_threshold()
    return g0, g1, g2
