"""The per-run time limits of an execution (one timer per run, not per event)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from worker.errors import LimitExceeded
from worker.runtime.guard import Guard


async def _ticks(gaps: list[float]) -> AsyncIterator[int]:
    for i, gap in enumerate(gaps):
        await asyncio.sleep(gap)
        yield i


async def _drain(guard: Guard, source: AsyncIterator[int], pause: float = 0.0) -> list[int]:
    """Everything ``source`` yields through ``guard``; ``pause`` is the consumer's time per item."""
    out = []
    try:
        while True:
            try:
                out.append(await guard.next(source))
            except StopAsyncIteration:
                return out
            if pause:
                await asyncio.sleep(pause)
    finally:
        guard.close()


def test_steady_source_runs_to_the_end() -> None:
    async def main() -> list[int]:
        return await _drain(Guard(2000, 100), _ticks([0.01] * 30))

    assert asyncio.run(main()) == list(range(30))


def test_stall_is_one_long_wait_not_the_total() -> None:
    async def main() -> list[int]:
        guard = Guard(None, 80)
        got: list[int] = []
        with pytest.raises(LimitExceeded) as info:
            got += await _drain(guard, _ticks([0.03] * 5 + [0.5]))
        assert info.value.limit == "stall_timeout_ms"
        return got

    asyncio.run(main())


def test_deadline_counts_the_whole_run() -> None:
    async def main() -> None:
        with pytest.raises(LimitExceeded) as info:
            await _drain(Guard(150, 1000), _ticks([0.03] * 20))
        assert info.value.limit == "timeout_ms"
        assert info.value.timed_out

    asyncio.run(main())


def test_time_spent_by_the_consumer_is_not_a_stall() -> None:
    async def main() -> list[int]:
        # The consumer is slow (0.1 s per item, stall limit 60 ms); the model is not.
        return await _drain(Guard(None, 60), _ticks([0.0] * 4), pause=0.1)

    assert asyncio.run(main()) == [0, 1, 2, 3]


def test_outside_cancellation_stays_a_cancellation() -> None:
    async def main() -> None:
        task = asyncio.ensure_future(_drain(Guard(5000, 5000), _ticks([1.0])))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_a_wait_in_a_task_of_its_own_is_the_one_stopped() -> None:
    """asyncio.wait_for (Python 3.11) awaits each step in a new task: the guard must
    cancel the task of the wait in progress, not the first one it saw."""

    async def main() -> float:
        guard = Guard(None, 300)
        source = _ticks([0.01, 0.01, 5.0])
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            while True:
                await asyncio.wait_for(guard.next(source), 10)
        except LimitExceeded as exc:
            assert exc.limit == "stall_timeout_ms"
            return loop.time() - started
        finally:
            guard.close()
            await source.aclose()  # type: ignore[attr-defined]

    assert asyncio.run(main()) < 2.0  # not when the 5 s tick came
