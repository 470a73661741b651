"""The actor runtime: executors, results, tools and providers."""

from producer.schema import ActorResult, NodeUsage

from .executor import Executor, RunEvent, create_executor
from .tools import register_tool
from .usage import EncodingSpec, fetch_encodings, register_encoding

__all__ = [
    "ActorResult",
    "EncodingSpec",
    "Executor",
    "NodeUsage",
    "RunEvent",
    "create_executor",
    "fetch_encodings",
    "register_encoding",
    "register_tool",
]
