"""``graph`` actors: a LangGraph StateGraph of llm / agent nodes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from producer.config import GraphConfig

from .run import Run, RunEvent

if TYPE_CHECKING:
    from .executor import Executor

__all__ = ["run_graph"]


async def run_graph(
    executor: Executor, run: Run, config: GraphConfig, message: str
) -> AsyncIterator[RunEvent]:
    raise NotImplementedError("graph actors")
    yield  # pragma: no cover
