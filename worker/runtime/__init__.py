"""The actor runtime: executors, results, tools and providers."""

from producer.schema import ActorResult, NodeUsage

from .executor import Executor, RunEvent, create_executor
from .tools import register_tool

__all__ = ["ActorResult", "Executor", "NodeUsage", "RunEvent", "create_executor", "register_tool"]
