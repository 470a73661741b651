"""One asyncio event loop per worker process, shared by every job of the process.

Celery has no native async tasks. The threads pool runs each task in a thread
that hands its coroutine to this loop and waits, so one process streams as many
jobs at once as it has pool threads, with pooled async clients shared by all.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["LOOP_THREAD_NAME", "get_loop", "new_event_loop", "run_on_loop"]

#: The loop thread's name, in Python and, on Linux, in the kernel (``top -H``,
#: ``ps -L``, ``/proc/<pid>/task/<tid>/comm``), where Python 3.11 names none.
LOOP_THREAD_NAME = "actorq-loop"

T = TypeVar("T")

_loop: asyncio.AbstractEventLoop | None = None
_pid: int | None = None
_lock = threading.Lock()


def new_event_loop(use_uvloop: bool = True) -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's when asked for and installed, else asyncio's."""
    if use_uvloop:
        try:
            import uvloop

            return uvloop.new_event_loop()
        except ImportError:
            pass
    return asyncio.new_event_loop()


def _name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` in the kernel too (Linux; best effort, 15 bytes)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # 15: PR_SET_NAME


def _new_loop() -> asyncio.AbstractEventLoop:
    """The shared loop's kind: uvloop unless ``ACTORQ_UVLOOP=0``."""
    return new_event_loop(os.environ.get("ACTORQ_UVLOOP", "1") != "0")


def get_loop() -> asyncio.AbstractEventLoop:
    """The process's loop, started on first use in a daemon thread."""
    global _loop, _pid
    with _lock:
        if _loop is None or _pid != os.getpid():
            loop = _new_loop()
            ready = threading.Event()

            def serve() -> None:
                _name_os_thread(LOOP_THREAD_NAME)
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            threading.Thread(target=serve, name=LOOP_THREAD_NAME, daemon=True).start()
            ready.wait()
            _loop, _pid = loop, os.getpid()
        return _loop


def run_on_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the shared loop and block the calling thread until it ends."""
    return asyncio.run_coroutine_threadsafe(coro, get_loop()).result()
