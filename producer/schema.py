"""The wire contract: job states, stream event types and the completion record.

Both sides and foreign clients rely on these names; changing one is a
breaking change of ``SCHEMA_VERSION``.
"""

from __future__ import annotations

import ast
import json
from decimal import Decimal
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "SCHEMA_VERSION",
    "TASK_NAME",
    "TERMINAL",
    "ActorResult",
    "Event",
    "EventType",
    "JobRecord",
    "JobStatus",
    "NodeUsage",
    "parse_task_args",
    "task_message",
]

SCHEMA_VERSION = 1
TASK_NAME = "actorq.run_job"


def task_message(job_id: str, actor: str) -> dict[str, Any]:
    """``send_task`` arguments of a job: all the broker, Flower and logs ever see of it."""
    return {
        "args": [job_id, actor],
        "kwargs": {"v": SCHEMA_VERSION},
        "argsrepr": repr((job_id, actor)),
        "kwargsrepr": "{}",
    }


def parse_task_args(argsrepr: object) -> tuple[str, str] | None:
    """``(job_id, actor)`` back from a task's ``argsrepr`` as Celery reports it, if it is ours."""
    if not isinstance(argsrepr, str) or len(argsrepr) > 300:
        return None
    try:
        value = ast.literal_eval(argsrepr)  # literals only: never evaluates code
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if isinstance(value, tuple | list) and value and isinstance(value[0], str):
        actor = value[1] if len(value) > 1 and isinstance(value[1], str) else ""
        return value[0], actor
    return None


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    LIMIT_EXCEEDED = "limit_exceeded"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset(
    {
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.CANCELLED,
        JobStatus.TIMED_OUT,
        JobStatus.LIMIT_EXCEEDED,
    }
)


class EventType(str, Enum):
    START = "start"
    TOKEN = "token"
    NODE_START = "node_start"
    NODE_END = "node_end"
    TOOL_CALL = "tool_call"
    TOOL_RESULT = "tool_result"
    RESET = "reset"
    DONE = "done"


class Event(BaseModel):
    """One stream entry, as a client sees it: its entry id, type and fields."""

    model_config = ConfigDict(frozen=True)

    id: str
    type: str
    fields: dict[str, str]

    @property
    def text(self) -> str:
        return self.fields.get("text", "")

    @property
    def node(self) -> str:
        return self.fields.get("node", "")

    @property
    def terminal(self) -> bool:
        return self.type == EventType.DONE.value

    @property
    def status(self) -> JobStatus | None:
        raw = self.fields.get("status")
        return JobStatus(raw) if raw else None

    @classmethod
    def from_entry(cls, entry_id: bytes | str, raw: dict[Any, Any]) -> Event:
        fields = {_s(k): _s(v) for k, v in raw.items()}
        return cls(id=_s(entry_id), type=fields.pop("type", ""), fields=fields)


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NodeUsage(BaseModel):
    """Token usage and cost of one node (the whole actor for a plain ``llm``)."""

    node: str
    provider: str
    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    usage_source: str = "provider"  # provider | tiktoken | heuristic | none
    model_calls: int = 0
    cost_usd: Decimal | None = None


class ActorResult(BaseModel):
    """What one execution produced: text, usage, cost, counters and timings."""

    text: str = ""
    nodes: list[NodeUsage] = Field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    cost_usd: Decimal | None = None
    model_calls: int = 0
    tool_calls: int = 0
    time_to_first_token_ms: float | None = None
    duration_ms: float = 0.0
    finish_reason: str = "stop"
    error: str | None = None

    def to_json(self) -> str:
        return self.model_dump_json()


class JobRecord(BaseModel):
    """The completion record of a finished job (hash ``actorq:job:{ID}``)."""

    job_id: str
    status: JobStatus
    actor: str = ""
    attempt: int = 0
    worker: str = ""
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    error_type: str | None = None
    done_id: str | None = None
    result: ActorResult | None = None

    @classmethod
    def from_hash(cls, job_id: str, raw: dict[Any, Any]) -> JobRecord:
        h = {_s(k): _s(v) for k, v in raw.items()}
        result = h.get("result")
        return cls(
            job_id=job_id,
            status=JobStatus(h.get("status", "queued")),
            actor=h.get("actor", ""),
            attempt=int(h.get("attempt") or 0),
            worker=h.get("worker", ""),
            created_at=_f(h.get("created_at")),
            started_at=_f(h.get("started_at")),
            finished_at=_f(h.get("finished_at")),
            error=h.get("error") or None,
            error_type=h.get("error_type") or None,
            done_id=h.get("done_id") or None,
            result=ActorResult.model_validate(json.loads(result)) if result else None,
        )


def _f(value: str | None) -> float | None:
    return float(value) if value else None
