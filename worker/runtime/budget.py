"""What is left of a job's limits once some tries failed and the job retries, and
what all the tries used together.

A retry runs a fresh execution, but the limits are the job's, not the try's:
``timeout_ms`` counts from the first try (backoff included), and the model
calls, tool calls and cost of the abandoned tries are spent. For the same
reason the result a job records counts them: the provider billed them.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from producer.config import Limits
from producer.schema import ActorResult, NodeUsage

from ..errors import LimitExceeded

__all__ = ["combine_tries", "remaining_limits", "token_totals"]


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


def combine_tries(
    spent: Sequence[ActorResult], last: ActorResult, duration_ms: float
) -> ActorResult:
    """``last`` (the try whose output stands) with the usage, cost and call counts of
    the abandoned tries in ``spent`` added, per node (same node, provider and model)
    and in total; ``duration_ms`` spans every try and the waits between them. Text,
    finish reason, error and first-token time stay ``last``'s.

    A try that made no model call cost nothing; otherwise one call of unknown price
    makes the total unknown, as within a try.
    """
    tries = [r for r in (*spent, last) if r.nodes]
    nodes: dict[tuple[str, str, str], NodeUsage] = {}
    for result in tries:
        for n in result.nodes:
            key = (n.node, n.provider, n.model)
            have = nodes.get(key)
            nodes[key] = n if have is None else _add_usage(have, n)
    merged = list(nodes.values())
    costs = [r.cost_usd for r in tries]
    known = [c for c in costs if c is not None]
    cost = sum(known, Decimal(0)) if tries and len(known) == len(costs) else None
    return last.model_copy(
        update={
            "nodes": merged,
            **token_totals(merged),
            "cost_usd": cost,
            "model_calls": sum(r.model_calls for r in (*spent, last)),
            "tool_calls": sum(r.tool_calls for r in (*spent, last)),
            "duration_ms": duration_ms,
        }
    )


def token_totals(nodes: Sequence[NodeUsage]) -> dict[str, int]:
    """An ``ActorResult``'s token counts: its nodes' summed."""
    return {
        "input_tokens": sum(n.input_tokens for n in nodes),
        "output_tokens": sum(n.output_tokens for n in nodes),
        "total_tokens": sum(n.total_tokens for n in nodes),
    }


def _add_usage(a: NodeUsage, b: NodeUsage) -> NodeUsage:
    sources = {s for n in (a, b) for s in n.usage_source.split("+")}
    if len(sources) > 1:
        sources.discard("none")
    return a.model_copy(
        update={
            "input_tokens": a.input_tokens + b.input_tokens,
            "output_tokens": a.output_tokens + b.output_tokens,
            "total_tokens": a.total_tokens + b.total_tokens,
            "model_calls": a.model_calls + b.model_calls,
            "usage_source": "+".join(sorted(sources)),
            "cost_usd": None
            if a.cost_usd is None or b.cost_usd is None
            else a.cost_usd + b.cost_usd,
        }
    )
