"""Per-execution state: counters, usage, cost, limits and the partial result."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from producer.config import Limits, ModelPrice
from producer.schema import ActorResult, NodeUsage

from ..errors import LimitExceeded
from .budget import token_totals
from .usage import cost_usd, count_tokens, warn_heuristic

__all__ = ["Run", "RunEvent"]


@dataclass(slots=True)
class RunEvent:
    """One thing an execution produced: a token, a node boundary, a tool call or result."""

    type: str
    text: str = ""
    node: str = ""
    data: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class _NodeAcc:
    node: str
    provider: str
    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    sources: set[str] = field(default_factory=set)
    model_calls: int = 0
    cost: Decimal | None = Decimal(0)

    def usage(self) -> NodeUsage:
        source = "none" if not self.sources else "+".join(sorted(self.sources))
        return NodeUsage(
            node=self.node,
            provider=self.provider,
            model=self.model,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            total_tokens=self.input_tokens + self.output_tokens,
            usage_source=source,
            model_calls=self.model_calls,
            cost_usd=self.cost,
        )


class Run:
    """State of one ``execute`` / ``execute_stream`` call.

    The result's ``text`` is the final answer: the output of the last model
    call (for a graph, the last node's answer; for an agent, the reply after
    its tools). The stream carries every token of every call.
    """

    def __init__(self, limits: Limits, pricing: Mapping[str, ModelPrice]) -> None:
        self.limits = limits
        self.pricing = pricing
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.final_text = ""
        self.nodes: dict[str, _NodeAcc] = {}
        self.model_calls = 0
        self.tool_calls = 0
        self.finish_reason = "stop"
        # The call in flight: its node, prompt and text so far, so max_cost_usd can
        # stop it mid-stream and a stopped call is counted; and the prompt's
        # ``count_tokens`` once counted (budget check, snapshots, a stopped call), as
        # a snapshot per lease renewal must not count a long prompt each time.
        self._inflight_node: _NodeAcc | None = None
        self._inflight_prompt = ""
        self._inflight_parts: list[str] = []
        self._inflight_counted: tuple[int, str] | None = None

    # -- counters ----------------------------------------------------------------

    def on_token(self, text: str) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if self._inflight_node is not None:
            self._inflight_parts.append(text)

    def check_cost(self) -> None:
        """Raise ``LimitExceeded`` once the running cost (finished calls + the one in flight) passes the budget."""
        if self.limits.max_cost_usd is not None:
            self._check_cost()

    def begin_model_call(self, node: str, provider: str, model: str, prompt_text: str) -> None:
        limit = self.limits.max_model_calls
        if limit is not None and self.model_calls >= limit:
            raise LimitExceeded("max_model_calls", f"{limit} model calls already made")
        counted = None
        if self.limits.max_cost_usd is not None and model in self.pricing:
            # Checked before the call counts: a call the budget stops is never sent.
            counted = count_tokens(prompt_text, model)
            self._check_cost(cost_usd(self.pricing.get(model), counted[0], 0))
        self.model_calls += 1
        acc = self.nodes.get(node)
        if acc is None:
            acc = self.nodes[node] = _NodeAcc(node, provider, model)
        acc.model_calls += 1
        self._inflight_node = acc
        self._inflight_prompt = prompt_text
        self._inflight_parts = []
        self._inflight_counted = counted
        # A node's own ending decides the run's, not an earlier node's.
        self.finish_reason = "stop"

    def begin_tool_call(self, name: str) -> None:
        limit = self.limits.max_tool_calls
        if limit is not None and self.tool_calls >= limit:
            raise LimitExceeded("max_tool_calls", f"{limit} tool calls already made")
        self.tool_calls += 1

    def end_model_call(
        self, usage: Mapping[str, Any] | None, output_text: str, *, check: bool = True
    ) -> None:
        """Record the finished call's usage: the provider's, else counted, else estimated."""
        acc = self._inflight_node
        if acc is None:
            return
        self._inflight_node = None
        self.final_text = output_text
        self._account(acc, usage, output_text)
        if check and self.limits.max_cost_usd is not None:
            self._check_cost()

    def _account(self, acc: _NodeAcc, usage: Mapping[str, Any] | None, output_text: str) -> None:
        """Add the call in flight's tokens and cost to ``acc``."""
        if usage and usage.get("input_tokens") is not None:
            n_in, n_out = int(usage["input_tokens"]), int(usage.get("output_tokens") or 0)
            acc.sources.add("provider")
        else:
            n_in, source = self._prompt_tokens(acc)
            n_out, _ = count_tokens(output_text, acc.model)
            acc.sources.add(source)
            if source == "heuristic":
                n_out = max(n_out, len(self._inflight_parts))
                warn_heuristic(acc.model)
        self._add(acc, n_in, n_out)

    def _prompt_tokens(self, acc: _NodeAcc) -> tuple[int, str]:
        """``count_tokens`` of the call in flight's prompt, counted once per call."""
        if self._inflight_counted is None:
            self._inflight_counted = count_tokens(self._inflight_prompt, acc.model)
        return self._inflight_counted

    def _inflight_estimate(self) -> tuple[int, int]:
        """The call in flight's input and output tokens so far, without a tokenizer pass
        (over a long text, each time): its prompt as counted if it was, else characters
        / 4; its text characters / 4, and at least one a chunk."""
        counted = self._inflight_counted
        n_in = counted[0] if counted else math.ceil(len(self._inflight_prompt) / 4)
        parts = self._inflight_parts
        return n_in, max(len(parts), math.ceil(sum(map(len, parts)) / 4))

    def _add(self, acc: _NodeAcc, n_in: int, n_out: int) -> None:
        acc.input_tokens += n_in
        acc.output_tokens += n_out
        call_cost = cost_usd(self.pricing.get(acc.model), n_in, n_out)
        acc.cost = None if call_cost is None or acc.cost is None else acc.cost + call_cost

    def _check_cost(self, next_call: Decimal | None = None) -> None:
        """Raise once the cost so far, with ``next_call``'s (a call about to be sent), or
        the call in flight's estimate, passes the budget."""
        limit = self.limits.max_cost_usd
        assert limit is not None
        total = self.cost() or Decimal(0)
        acc = self._inflight_node
        if next_call is not None:
            total += next_call
        elif acc is not None:
            # The call in flight: priced, so its prompt was counted as it began.
            n_in, out = self._inflight_estimate()
            total += cost_usd(self.pricing.get(acc.model), n_in, out) or Decimal(0)
        if total > limit:
            raise LimitExceeded("max_cost_usd", f"running cost {total:.6f} > {limit}")

    def cost(self) -> Decimal | None:
        """Total cost; ``None`` if any node's model has no price (unknown is not free)."""
        return _total_cost(self.nodes.values())

    # -- result ------------------------------------------------------------------

    def result(self, finish_reason: str | None = None, error: str | None = None) -> ActorResult:
        if self._inflight_node is not None:
            # Stopped mid-call: count what was sent and produced so far.
            self.end_model_call(None, "".join(self._inflight_parts), check=False)
        return self._result(
            self.nodes.values(), self.final_text, finish_reason or self.finish_reason, error
        )

    def snapshot(self) -> ActorResult:
        """What the run has used so far, the call in flight counted as if it stopped
        now, without ending it: a worker saves this with each lease renewal, so an
        attempt lost mid-run (its worker killed) still counts. No text: a lost
        attempt's output is void.

        The call in flight is estimated (:meth:`_inflight_estimate`): a tokenizer
        pass over a long prompt would hold the loop, and every stream with it,
        during renewals."""
        nodes = dict(self.nodes)
        acc = self._inflight_node
        if acc is not None:
            acc = nodes[acc.node] = dataclasses.replace(acc, sources=set(acc.sources))
            if self._inflight_counted is not None:
                acc.sources.add(self._inflight_counted[1])
            acc.sources.add("heuristic")
            self._add(acc, *self._inflight_estimate())
        return self._result(nodes.values(), "", "error", None)

    def _result(
        self, accs: Iterable[_NodeAcc], text: str, finish_reason: str, error: str | None
    ) -> ActorResult:
        accs = list(accs)
        nodes = [a.usage() for a in accs]
        now = time.monotonic()
        return ActorResult(
            text=text,
            nodes=nodes,
            **token_totals(nodes),
            cost_usd=_total_cost(accs),
            model_calls=self.model_calls,
            tool_calls=self.tool_calls,
            time_to_first_token_ms=(
                None if self.first_token_at is None else (self.first_token_at - self.started) * 1000
            ),
            duration_ms=(now - self.started) * 1000,
            finish_reason=finish_reason,
            error=error,
        )


def _total_cost(accs: Iterable[_NodeAcc]) -> Decimal | None:
    costs = [a.cost for a in accs]
    known = [c for c in costs if c is not None]
    return sum(known, Decimal(0)) if costs and len(known) == len(costs) else None
