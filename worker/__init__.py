"""actorq's worker side: the actor runtime and the Celery task that streams it.

``from worker import create_executor, Executor, ActorResult, NodeUsage``.
"""

from .errors import ActorError, Cancelled, LimitExceeded, ProviderError
from .runtime import ActorResult, Executor, NodeUsage, RunEvent, create_executor, register_tool

__all__ = [
    "ActorError",
    "ActorResult",
    "Cancelled",
    "Executor",
    "LimitExceeded",
    "NodeUsage",
    "ProviderError",
    "RunEvent",
    "create_executor",
    "register_tool",
]
