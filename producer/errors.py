"""The producer's error tree: every failure a router can see is one of these."""

from __future__ import annotations

__all__ = [
    "ActorqError",
    "ConfigError",
    "CredentialsError",
    "InvalidInput",
    "JobNotFound",
    "JobTimeout",
    "MessageDecodeError",
    "SecretKeyMissing",
]


class ActorqError(Exception):
    """Root of every error actorq raises on purpose."""


class InvalidInput(ActorqError, ValueError):
    """An argument to the public API is malformed; ``field`` names which one."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


class ConfigError(InvalidInput):
    """The actor config dict is invalid."""


class CredentialsError(InvalidInput):
    """Credentials are malformed, or cannot be decrypted."""


class SecretKeyMissing(ActorqError):
    """Credentials were given but ACTORQ_SECRET_KEY is not configured."""


class MessageDecodeError(ActorqError):
    """A queue message or stored payload is not a job actorq can run."""


class JobNotFound(ActorqError, LookupError):
    """No job with this id exists (never enqueued, or expired)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id!r} not found (never enqueued, or its retention expired)")


class JobTimeout(ActorqError, TimeoutError):
    """A wait for a job's events or result ran out of time."""
