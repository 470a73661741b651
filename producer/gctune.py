"""Garbage-collector settings for a streaming process: worker or router.

``ACTORQ_GC_THRESHOLD`` sets the thresholds, ``ACTORQ_GC_FREEZE`` keeps the
set-up's heap out of collections. The worker applies both at start; a router
applies both with :func:`tuned_gc` (``ops.router`` does, in its lifespan).

Worker: LangChain's ``astream`` keeps every chunk of a call until the call ends:
about a dozen tracked objects per token, alive for the whole stream. The
collector walks each of them in a generation-0 and a generation-1 collection
before it reaches generation 2, and in every full collection after that.

Full collections are the cost: with 300 long streams in flight one walks
~400,000 objects with the loop stopped (0.1-0.4 s, every stream's tokens held).
CPython's default third threshold (10) ran seven of them in a 60,000-token load
(1.7-1.9 s of CPU); a third threshold of 10,000 makes them as rare as one per
70 million net allocations. Cyclic garbage that outlived two young collections
waits that much longer to be freed.

Generation 1 is collected every 10 generation-0 collections, as CPython does:
each one walks what generation 0 promoted since the last (~7,000 objects, 4-6 ms).
Every 100 (the setting before) made the same total work into pauses of 22-41 ms,
the largest single cause of the worker's p99 token lag; the long-lived chunks
are walked once in generation 1 either way. In one process, 300 streams x 200
tokens: generation-1 time 126-158 ms at 10 against 148-192 ms at 100.

Once the worker is up, the objects of its imports and set-up (Celery, kombu,
LangChain, pydantic: about 200,000) are frozen out of the collector
(``ACTORQ_GC_FREEZE``, on by default): they live as long as the process, and
every full collection would otherwise walk them with the loop stopped, which
held every stream's tokens for ~100 ms.

Router: one loop forwards every client's tokens, so a full collection stops all
of them at once. Tailing 1,000 streams (150,000 tokens) with Python's defaults
ran two full collections, one a 101 ms pause of the loop; with these settings,
none (generation-0 and -1 work unchanged, longest pause 7-10 ms).
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator, Mapping

from .settings import env_flag

__all__ = [
    "DEFAULT_GC_THRESHOLD",
    "freeze_startup_heap",
    "gc_threshold_from_env",
    "tune_gc",
    "tuned_gc",
]

DEFAULT_GC_THRESHOLD = (700, 10, 10_000)


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
    if not env_flag("ACTORQ_GC_FREEZE", True, env):
        return 0
    gc.collect()  # what is garbage now is freed, not frozen
    gc.freeze()
    return gc.get_freeze_count()


@contextlib.contextmanager
def tuned_gc(env: Mapping[str, str] | None = None) -> Iterator[tuple[int, int, int]]:
    """:func:`tune_gc` and :func:`freeze_startup_heap` for the block, undone after it.

    For a router: enter once its imports and clients are set up, before it serves.
    On the way out the previous thresholds come back and the frozen heap returns
    to the collector, so a process that goes on (a test run) is as it was.
    """
    before = gc.get_threshold()
    try:
        threshold = tune_gc(env)
        freeze_startup_heap(env)
    except ValueError:
        gc.set_threshold(*before)  # nothing half-applied
        raise
    try:
        yield threshold
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
