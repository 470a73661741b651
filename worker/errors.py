"""The worker's error tree. Every error text is scrubbed of credentials before it leaves."""

from __future__ import annotations

from producer.errors import ActorqError, ConfigError, CredentialsError, InvalidInput

__all__ = [
    "ActorError",
    "Cancelled",
    "ConfigError",
    "CredentialsError",
    "InvalidInput",
    "LimitExceeded",
    "ProviderAuthError",
    "ProviderError",
]


class ActorError(ActorqError):
    """Root of errors raised while running an actor."""


class ProviderError(ActorError):
    """The model provider failed; ``retryable`` for rate limits, 5xx and dropped connections."""

    def __init__(self, message: str, *, retryable: bool, status_code: int | None = None) -> None:
        self.retryable = retryable
        self.status_code = status_code
        super().__init__(message)


class ProviderAuthError(ProviderError):
    """The provider rejected the credentials (401 / 403); never retryable."""


class LimitExceeded(ActorError):
    """A job limit was hit; ``limit`` names it (``timeout_ms``, ``max_cost_usd``, ...)."""

    def __init__(self, limit: str, detail: str) -> None:
        self.limit = limit
        super().__init__(f"{limit} exceeded: {detail}")

    @property
    def timed_out(self) -> bool:
        return self.limit in ("timeout_ms", "stall_timeout_ms")


class Cancelled(ActorError):
    """The job was cancelled while running."""
