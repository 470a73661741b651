"""Stopping long-lived asyncio tasks when a library may lose a cancellation.

redis-py can swallow a ``CancelledError`` that lands inside one of its commands
(seen while connecting and while a command was in flight): the command completes
and the task goes on as if nothing came. A housekeeping loop then runs on, and
whoever awaits its end, ``asyncio.run``'s cleanup included, waits forever.
"""

from __future__ import annotations

import asyncio

__all__ = ["raise_if_cancelling", "stop_task"]


def raise_if_cancelling() -> None:
    """Raise ``CancelledError`` if the current task was asked to stop and is still running.

    For the top of a loop: a cancel whose ``CancelledError`` a library swallowed
    leaves the task's cancel count up, so one cancel (as ``asyncio.run`` sends
    at its end) still ends the loop.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def stop_task(task: asyncio.Task[object] | None, every_s: float = 0.1) -> None:
    """Cancel ``task`` until it is done, and wait for that (``None``: nothing to stop)."""
    while task is not None and not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=every_s)
