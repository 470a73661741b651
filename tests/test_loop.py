"""The worker's shared loop: uvloop unless ACTORQ_UVLOOP=0, and jobs handed to it from threads."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from worker import loop as worker_loop


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop is not installed on Windows")
def test_the_loop_is_uvloop_by_default_and_asyncio_when_turned_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import uvloop

    monkeypatch.delenv("ACTORQ_UVLOOP", raising=False)
    default = worker_loop._new_loop()
    monkeypatch.setenv("ACTORQ_UVLOOP", "0")
    plain = worker_loop._new_loop()
    try:
        assert isinstance(default, uvloop.Loop)
        assert not isinstance(plain, uvloop.Loop)
        assert isinstance(plain, asyncio.AbstractEventLoop)
    finally:
        default.close()
        plain.close()


def test_coroutines_from_many_threads_run_on_the_one_loop_thread() -> None:
    async def where(i: int) -> tuple[int, str]:
        await asyncio.sleep(0.001)
        return i, threading.current_thread().name

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(lambda i: worker_loop.run_on_loop(where(i)), range(200)))
    assert [i for i, _ in got] == list(range(200))
    assert {name for _, name in got} == {worker_loop.LOOP_THREAD_NAME}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kernel thread names: Linux")
def test_the_kernel_knows_the_loop_thread_by_its_name() -> None:
    """``top -H`` and ``ps -L`` show which thread is the loop (the bench splits CPU by it)."""
    import os

    async def native_id() -> int:
        return threading.get_native_id()

    tid = worker_loop.run_on_loop(native_id())
    with open(f"/proc/{os.getpid()}/task/{tid}/comm") as f:
        assert f.read().strip() == worker_loop.LOOP_THREAD_NAME


def test_the_loop_watch_counts_its_threads_cpu_and_how_late_it_ran() -> None:
    from prometheus_client import REGISTRY

    from worker import metrics

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    names = ("actorq_loop_cpu_seconds_total", "actorq_loop_lag_seconds_sum",
             "actorq_loop_lag_seconds_count")  # fmt: skip
    before = {n: sample(n) for n in names}

    async def main() -> None:
        metrics.watch_loop(period_s=0.02)
        await asyncio.sleep(0.05)
        spin_until = time.thread_time() + 0.15  # the loop's thread busy for 0.15 s of CPU
        while time.thread_time() < spin_until:
            pass
        await asyncio.sleep(0.1)

    asyncio.run(main())
    got = {n: sample(n) - before[n] for n in names}
    assert got["actorq_loop_cpu_seconds_total"] >= 0.14
    assert got["actorq_loop_lag_seconds_sum"] >= 0.1  # the tick due during the spin came late
    assert got["actorq_loop_lag_seconds_count"] >= 4
