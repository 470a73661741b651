"""The worker's tool registry: configs name tools, never carry code.

Register more with :func:`register_tool` in a module the worker imports.
The built-ins are harmless: arithmetic, the clock, text utilities.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from langchain_core.tools import BaseTool, StructuredTool

__all__ = ["get_tool", "register_tool", "tool_names"]

_REGISTRY: dict[str, BaseTool] = {}


def register_tool(func: Callable[..., Any], *, name: str | None = None) -> BaseTool:
    """Register a plain (sync or async) function as a tool under ``name``."""
    import inspect

    kwargs: dict[str, Any] = {
        "name": name or func.__name__,
        "description": (func.__doc__ or "").strip(),
    }
    if inspect.iscoroutinefunction(func):
        tool = StructuredTool.from_function(coroutine=func, **kwargs)
    else:
        tool = StructuredTool.from_function(func=func, **kwargs)
    _REGISTRY[tool.name] = tool
    return tool


def get_tool(name: str) -> BaseTool | None:
    return _REGISTRY.get(name)


def tool_names() -> list[str]:
    return sorted(_REGISTRY)


_OPS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Mod: operator.mod,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left), _eval(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.operand))
    raise ValueError("only numbers and + - * / % are allowed")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression with + - * / % and parentheses."""
    if len(expression) > 200:
        return "error: expression too long"
    try:
        return str(_eval(ast.parse(expression, mode="eval")))
    except (ValueError, SyntaxError, ZeroDivisionError, TypeError) as exc:
        return f"error: {exc}"


def utc_now() -> str:
    """The current UTC time in ISO 8601."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def word_count(text: str) -> int:
    """Count the words in a text."""
    return len(text.split())


def reverse_text(text: str) -> str:
    """Reverse a text."""
    return text[::-1]


for _f in (calculator, utc_now, word_count, reverse_text):
    register_tool(_f)
