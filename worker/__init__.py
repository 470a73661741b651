"""actorq's worker side: the actor runtime and the Celery task that streams it.

``from worker import create_executor, Executor, ActorResult, NodeUsage``.
"""

from .errors import (
    ActorError,
    Cancelled,
    ConfigError,
    CredentialsError,
    LimitExceeded,
    ProviderAuthError,
    ProviderError,
)
from .runtime import ActorResult, Executor, NodeUsage, RunEvent, create_executor, register_tool

__all__ = [
    "ActorError",
    "ActorResult",
    "Cancelled",
    "ConfigError",
    "CredentialsError",
    "Executor",
    "LimitExceeded",
    "NodeUsage",
    "ProviderAuthError",
    "ProviderError",
    "RunEvent",
    "create_executor",
    "register_tool",
]
