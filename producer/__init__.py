"""actorq's router-side API: enqueue actor jobs, tail their token streams, cancel them.

Imports no LangChain: a router installs ``actorq`` (the light part) only.
The module-level functions use a default :class:`Client` configured from the
environment (``REDIS_URL``, ``CELERY_BROKER_URL``, ``ACTORQ_*``).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

from .client import CancelOutcome, Client
from .errors import (
    ActorqError,
    ConfigError,
    CredentialsError,
    InvalidInput,
    JobNotFound,
    JobTimeout,
    MessageDecodeError,
    SecretKeyMissing,
)
from .schema import TERMINAL, ActorResult, Event, EventType, JobRecord, JobStatus, NodeUsage
from .settings import Settings
from .text import TextAssembler, final_text

__all__ = [
    "TERMINAL",
    "ActorResult",
    "ActorqError",
    "CancelOutcome",
    "Client",
    "ConfigError",
    "CredentialsError",
    "Event",
    "EventType",
    "InvalidInput",
    "JobNotFound",
    "JobRecord",
    "JobStatus",
    "JobTimeout",
    "MessageDecodeError",
    "NodeUsage",
    "SecretKeyMissing",
    "Settings",
    "TextAssembler",
    "astream_events",
    "await_result",
    "cancel_job",
    "default_client",
    "enqueue_actor_job",
    "final_text",
    "get_result",
    "get_status",
    "set_default_client",
    "stream_events",
    "wait_result",
]

_default: Client | None = None
_lock = threading.Lock()


def default_client() -> Client:
    """The client the module-level functions use, built from the environment on first use."""
    global _default
    with _lock:
        if _default is None:
            _default = Client()
        return _default


def set_default_client(client: Client | None) -> None:
    """Replace the default client (``None`` rebuilds it from the environment next time)."""
    global _default
    with _lock:
        _default = client


def enqueue_actor_job(
    config: Mapping[str, Any],
    message: str,
    *,
    credentials: Mapping[str, Mapping[str, str]] | None = None,
    limits: Mapping[str, Any] | None = None,
    pricing: Mapping[str, Mapping[str, Any]] | None = None,
    job_id: str | None = None,
    idempotency_key: str | None = None,
) -> str:
    """Validate and enqueue a job; return its id without waiting for the run."""
    return default_client().enqueue_actor_job(
        config,
        message,
        credentials=credentials,
        limits=limits,
        pricing=pricing,
        job_id=job_id,
        idempotency_key=idempotency_key,
    )


def stream_events(
    job_id: str, *, after: str = "0", timeout: float | None = None
) -> Iterator[Event]:
    """Every event of the job after entry ``after``, ending after the terminal event."""
    return default_client().stream_events(job_id, after=after, timeout=timeout)


def astream_events(
    job_id: str, *, after: str = "0", timeout: float | None = None
) -> AsyncIterator[Event]:
    """Async twin of :func:`stream_events`."""
    return default_client().astream_events(job_id, after=after, timeout=timeout)


def get_status(job_id: str) -> JobStatus:
    return default_client().get_status(job_id)


def get_result(job_id: str) -> JobRecord | None:
    """The completion record, or ``None`` while the job has not ended."""
    return default_client().get_result(job_id)


def wait_result(job_id: str, timeout: float | None = None) -> JobRecord:
    return default_client().wait_result(job_id, timeout)


async def await_result(job_id: str, timeout: float | None = None) -> JobRecord:
    return await default_client().await_result(job_id, timeout)


def cancel_job(job_id: str) -> CancelOutcome:
    return default_client().cancel_job(job_id)
