"""ACTORQ_GC_THRESHOLD: parsing, bad values, and that the worker applies it."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from worker.gctune import DEFAULT_GC_THRESHOLD, gc_threshold_from_env, tune_gc


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


def test_unset_is_the_default_and_default_keeps_python_s() -> None:
    assert gc_threshold_from_env({}) == DEFAULT_GC_THRESHOLD
    assert gc_threshold_from_env({"ACTORQ_GC_THRESHOLD": " "}) == DEFAULT_GC_THRESHOLD
    assert gc_threshold_from_env({"ACTORQ_GC_THRESHOLD": "default"}) is None
    assert gc_threshold_from_env({"ACTORQ_GC_THRESHOLD": "1000, 50, 5"}) == (1000, 50, 5)


@pytest.mark.parametrize(
    "raw", ["700,100", "a,b,c", "700,100,10,1", "1.5,2,3", "0,10,10", "700,-1,10"]
)
def test_bad_values_name_the_variable(raw: str, restore_gc: None) -> None:
    before = gc.get_threshold()
    with pytest.raises(ValueError, match="ACTORQ_GC_THRESHOLD"):
        tune_gc({"ACTORQ_GC_THRESHOLD": raw})
    assert gc.get_threshold() == before  # nothing half-applied


def test_tune_gc_applies_or_leaves_alone(restore_gc: None) -> None:
    assert tune_gc({"ACTORQ_GC_THRESHOLD": "900,20,7"}) == (900, 20, 7)
    assert gc.get_threshold() == (900, 20, 7)
    assert tune_gc({"ACTORQ_GC_THRESHOLD": "default"}) == (900, 20, 7)
    assert tune_gc({}) == DEFAULT_GC_THRESHOLD


def test_the_worker_app_tunes_gc_at_start(restore_gc: None) -> None:
    from celery.signals import worker_init

    import worker.app  # noqa: F401  (connects the handler)

    gc.set_threshold(700, 10, 10)
    worker_init.send(sender=None)
    assert gc.get_threshold() == DEFAULT_GC_THRESHOLD
