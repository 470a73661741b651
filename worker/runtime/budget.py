"""What is left of a job's limits once some tries failed and the job retries.

A retry runs a fresh execution, but the limits are the job's, not the try's:
``timeout_ms`` counts from the first try (backoff included), and the model
calls, tool calls and cost of the abandoned tries are spent.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from producer.config import Limits
from producer.schema import ActorResult

from ..errors import LimitExceeded

__all__ = ["remaining_limits"]


def remaining_limits(base: Limits, spent: Sequence[ActorResult], elapsed_ms: float) -> Limits:
    """``base`` less what the tries in ``spent`` used; :class:`LimitExceeded` if one ran out."""
    update: dict[str, Any] = {}
    if base.timeout_ms is not None:
        left_ms = base.timeout_ms - elapsed_ms
        if left_ms <= 0:
            raise LimitExceeded(
                "timeout_ms", f"ran longer than {base.timeout_ms} ms (retries included)"
            )
        update["timeout_ms"] = max(1, int(left_ms))
    counts = (
        ("max_model_calls", "model calls", sum(r.model_calls for r in spent), 1),
        ("max_tool_calls", "tool calls", sum(r.tool_calls for r in spent), 0),
    )
    for name, what, used, least in counts:
        limit = getattr(base, name)
        if limit is None:
            continue
        if limit - used < least:
            raise LimitExceeded(name, f"{limit} {what} made (retries included)")
        update[name] = limit - used
    if base.max_cost_usd is not None:
        cost = sum((r.cost_usd or Decimal(0) for r in spent), Decimal(0))
        left = base.max_cost_usd - cost
        if left <= 0:
            raise LimitExceeded(
                "max_cost_usd", f"spent {cost:.6f} > {base.max_cost_usd} (retries included)"
            )
        update["max_cost_usd"] = left
    return base.model_copy(update=update)
