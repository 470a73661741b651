"""The worker's garbage-collector thresholds (``ACTORQ_GC_THRESHOLD``).

Every token allocates a handful of short-lived LangChain and pydantic objects,
so CPython's default thresholds (700, 10, 10) run a generation-1 collection
every 7,000 allocations: with a few hundred streams in flight that was about a
fifth of the worker's CPU per token. Collecting generation 1 ten times less
often (700, 100, ...) removes most of it; generation 0 still runs as often as
before, so garbage without reference cycles is freed as promptly as ever.

Full collections are the other cost: LangChain's ``astream`` keeps every chunk
of a call until the call ends, so with 300 long streams in flight a full
collection walks ~400,000 objects with the loop stopped (40-150 ms, every
stream's tokens held). A third threshold of 1000 instead of 10 makes them about
a hundred times rarer; cyclic garbage that outlived two young collections waits
that much longer to be freed.

Once the worker is up, the objects of its imports and set-up (Celery, kombu,
LangChain, pydantic: about 200,000) are frozen out of the collector
(``ACTORQ_GC_FREEZE``, on by default): they live as long as the process, and
every full collection would otherwise walk them with the loop stopped, which
held every stream's tokens for ~100 ms.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping

__all__ = ["DEFAULT_GC_THRESHOLD", "freeze_startup_heap", "gc_threshold_from_env", "tune_gc"]

DEFAULT_GC_THRESHOLD = (700, 100, 1000)


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


def freeze_startup_heap(env: Mapping[str, str] | None = None) -> int:
    """Move every object alive now out of the collector's reach (``ACTORQ_GC_FREEZE``).

    Call it once the process is set up; returns how many objects are frozen
    (0 when ``ACTORQ_GC_FREEZE=0``). Frozen objects are still freed normally
    when their reference count drops; only cycle detection skips them.
    """
    raw = (os.environ if env is None else env).get("ACTORQ_GC_FREEZE", "1").strip()
    if raw not in ("0", "1", ""):
        raise ValueError(f"ACTORQ_GC_FREEZE must be 0 or 1, got {raw!r}")
    if raw == "0":
        return 0
    gc.collect()  # what is garbage now is freed, not frozen
    gc.freeze()
    return gc.get_freeze_count()
