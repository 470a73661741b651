"""Time limits of one execution with one timer per run instead of one per event.

``asyncio.timeout()`` around every ``__anext__`` cost a timer handle, a
reschedule and a task lookup per token: about a tenth of the worker's CPU on
the token path. :class:`Guard` keeps one timer armed for the nearest limit and
only re-arms it when it fires early, so a token costs two attribute writes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, NoReturn, TypeVar

from ..errors import LimitExceeded

__all__ = ["Guard"]

T = TypeVar("T")


class Guard:
    """Enforces ``timeout_ms`` (whole run) and ``stall_timeout_ms`` (each wait for the model)."""

    def __init__(self, timeout_ms: float | None, stall_ms: float | None) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout_ms, self._stall_ms = timeout_ms, stall_ms
        now = self._loop.time()
        self._deadline = None if timeout_ms is None else now + timeout_ms / 1000
        self._stall = None if stall_ms is None else stall_ms / 1000
        self._since = now  # when the current wait began
        self._waiting = False
        self._expired: str | None = None
        self._task: asyncio.Task[object] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._stalls = True  # whether the wait in progress counts against stall_timeout_ms

    def _stall_due(self) -> float | None:
        """When the wait in progress stalls, if it is a wait for the model."""
        return self._since + self._stall if self._stalls and self._stall is not None else None

    def _due(self) -> float | None:
        dues = [d for d in (self._deadline, self._stall_due()) if d is not None]
        return min(dues) if dues else None

    def _arm(self) -> None:
        if self._deadline is None and self._stall is None:
            return
        due = self._due()
        if due is not None:
            self._handle = self._loop.call_at(due, self._fire)

    def _fire(self) -> None:
        self._handle = None
        if not self._waiting or self._task is None:
            return  # between waits nothing can stall; the next wait re-arms
        now = self._loop.time()
        if self._deadline is not None and now >= self._deadline:
            self._expired = "timeout_ms"
        elif (stall_due := self._stall_due()) is not None and now >= stall_due:
            self._expired = "stall_timeout_ms"
        if self._expired:
            self._task.cancel()
        else:
            self._arm()  # the model sent something since this timer was set

    async def next(self, source: AsyncIterator[T], *, stall: bool = True) -> T:
        """``await source.__anext__()``, raising :class:`LimitExceeded` when a limit passes.

        The same as :meth:`begin`, the await, :meth:`raise_cancelled` on a cancel and
        :meth:`end`, which the worker's token path (``Executor._push_model``) writes
        out to save a coroutine per token.
        """
        self.begin(stall)
        try:
            return await source.__anext__()
        except asyncio.CancelledError as exc:
            self.raise_cancelled(exc)
        finally:
            self._waiting = False

    def begin(self, stall: bool = True, task: asyncio.Task[Any] | None = None) -> None:
        """A wait for the source starts (in the task the guard may cancel).

        ``stall`` False: this wait is not for the model (a tool runs), so only
        ``timeout_ms`` bounds it.
        """
        # The task of this wait: a caller may await each step in a task of its own
        # (asyncio.wait_for on Python 3.11), and the timer must cancel that one. A
        # caller that waits in one task throughout passes it (one lookup, not one a token).
        self._task = task or asyncio.current_task()
        self._since = now = self._loop.time()
        if self._deadline is not None and now >= self._deadline:
            # Checked before awaiting: buffered events arrive without a suspension,
            # so a timer alone would never fire for a slow consumer.
            raise self._exceeded("timeout_ms")
        self._waiting = True
        if stall != self._stalls:  # the timer was set for the other kind of wait
            self._stalls = stall
            if self._handle is not None:
                self._handle.cancel()
                self._handle = None
        if self._handle is None:
            self._arm()

    def end(self) -> None:
        """The wait is over (whatever it ended with)."""
        self._waiting = False

    def raise_cancelled(self, cancel: asyncio.CancelledError) -> NoReturn:
        """For a ``CancelledError`` in a wait: raise the limit the guard cancelled for
        (uncancelling the task), or ``cancel`` itself when it came from outside."""
        if self._expired is None or self._task is None or self._task.uncancel() > 0:
            raise cancel
        raise self._exceeded(self._expired) from None

    def _exceeded(self, limit: str) -> LimitExceeded:
        if limit == "timeout_ms":
            return LimitExceeded("timeout_ms", f"ran longer than {self._timeout_ms:g} ms")
        return LimitExceeded("stall_timeout_ms", f"model sent nothing for {self._stall_ms:g} ms")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
