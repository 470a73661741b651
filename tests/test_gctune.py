"""ACTORQ_GC_THRESHOLD and ACTORQ_GC_FREEZE: parsing, bad values, and that the worker and
the router apply them."""

from __future__ import annotations

import asyncio
import gc
import re
import time
import uuid
from collections.abc import Iterator

import pytest

from producer.gctune import (
    DEFAULT_GC_THRESHOLD,
    freeze_startup_heap,
    gc_threshold_from_env,
    tune_gc,
    tuned_gc,
)
from tests.conftest import WorkerFactory


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


def test_the_worker_app_tunes_gc_at_start(
    restore_gc: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.app as worker_app

    monkeypatch.setattr(worker_app, "get_runner", lambda: None)  # no job runner here
    gc.set_threshold(700, 10, 10)
    worker_app.StartFromEnvironment(None).start(None)  # the worker's start-up bootstep
    assert gc.get_threshold() == DEFAULT_GC_THRESHOLD


@pytest.fixture
def restore_freeze() -> Iterator[None]:
    yield
    gc.unfreeze()


def test_freeze_moves_the_live_heap_out_of_collections(restore_freeze: None) -> None:
    gc.unfreeze()
    frozen = freeze_startup_heap({})
    assert frozen > 1000 and gc.get_freeze_count() == frozen
    assert gc.get_count()[2] == 0  # nothing left for a full collection to walk yet


def test_freeze_can_be_turned_off_and_bad_values_name_the_variable(restore_freeze: None) -> None:
    gc.unfreeze()
    assert freeze_startup_heap({"ACTORQ_GC_FREEZE": "0"}) == 0
    assert gc.get_freeze_count() == 0
    for raw in ("yes", "2", "off"):
        with pytest.raises(ValueError, match="ACTORQ_GC_FREEZE"):
            freeze_startup_heap({"ACTORQ_GC_FREEZE": raw})
    assert gc.get_freeze_count() == 0  # nothing half-applied


def test_a_worker_freezes_its_start_up_heap_once_ready(start_worker: WorkerFactory) -> None:
    # A queue of its own: the session's queue belongs to the shared workers.
    name = f"gc-{uuid.uuid4().hex[:6]}"
    worker = start_worker(name, concurrency=4, env={"ACTORQ_QUEUE": f"actorq-{name}"})
    assert worker.log_path is not None
    deadline = time.monotonic() + 20
    while True:
        log = worker.log_path.read_text()
        frozen = re.search(r"froze (\d+) start-up objects", log)
        if frozen or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert frozen and int(frozen.group(1)) > 100_000, log[-2000:]


def test_tuned_gc_applies_both_and_undoes_them(restore_gc: None, restore_freeze: None) -> None:
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    with tuned_gc({}) as threshold:
        assert threshold == gc.get_threshold() == DEFAULT_GC_THRESHOLD
        assert gc.get_freeze_count() > 1000
    assert gc.get_threshold() == (700, 10, 10) and gc.get_freeze_count() == 0
    with pytest.raises(ValueError, match="ACTORQ_GC_FREEZE"), tuned_gc({"ACTORQ_GC_FREEZE": "no"}):
        pass
    assert gc.get_threshold() == (700, 10, 10) and gc.get_freeze_count() == 0


def test_the_router_runs_with_the_gc_settings(
    restore_gc: None, restore_freeze: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ops.router import create_app
    from producer import Client, Settings

    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    app = create_app(Client(Settings.from_env({"REDIS_URL": "redis://127.0.0.1:1/0"})))

    async def serve_once() -> tuple[tuple[int, int, int], int]:
        async with app.router.lifespan_context(app):
            return gc.get_threshold(), gc.get_freeze_count()

    threshold, frozen = asyncio.run(serve_once())
    assert threshold == DEFAULT_GC_THRESHOLD and frozen > 1000
    assert gc.get_threshold() == (700, 10, 10) and gc.get_freeze_count() == 0
    # A bad setting stops the router at start, naming the variable.
    monkeypatch.setenv("ACTORQ_GC_THRESHOLD", "lots")
    with pytest.raises(ValueError, match="ACTORQ_GC_THRESHOLD"):
        asyncio.run(serve_once())
    assert gc.get_threshold() == (700, 10, 10)


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan"])
def test_a_bad_heartbeat_stops_the_router_at_start(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    from ops.router import create_app
    from producer import Client, Settings

    monkeypatch.setenv("ACTORQ_SSE_HEARTBEAT_S", value)
    with pytest.raises(ValueError, match="ACTORQ_SSE_HEARTBEAT_S"):
        create_app(Client(Settings.from_env({"REDIS_URL": "redis://127.0.0.1:1/0"})))
