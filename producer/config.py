"""Validated shapes of everything a job carries: actor config, limits, pricing, credentials.

These are plain pydantic models so that a router can validate a job without
installing the worker's LangChain stack; the worker validates with the same
models, so a config accepted at enqueue is a config the worker understands.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from .errors import ConfigError, CredentialsError, InvalidInput

__all__ = [
    "GRAPH_END",
    "PROVIDERS",
    "ActorConfig",
    "AgentConfig",
    "GraphConfig",
    "GraphEdge",
    "LLMConfig",
    "Limits",
    "ModelPrice",
    "ScriptedTurn",
    "check_budget",
    "check_credentials",
    "parse_config",
    "parse_credentials",
    "parse_limits",
    "parse_pricing",
]

PROVIDERS = ("openai", "scripted")
_NAME = r"^[A-Za-z0-9_.:-]{1,64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ScriptedToolCall(_Strict):
    name: str = Field(min_length=1, max_length=64)
    args: dict[str, Any] = Field(default_factory=dict)


class ScriptedTurn(_Strict):
    """One reply of the scripted model: text, tool calls, or both."""

    text: str = ""
    tool_calls: list[ScriptedToolCall] = Field(default_factory=list)


class LLMConfig(_Strict):
    """One chat model. ``scripted`` fields drive the deterministic test/demo model."""

    type: Literal["llm"] = "llm"
    name: str = Field(default="actor", pattern=_NAME)
    provider: Literal["openai", "scripted"]
    model: str = Field(default="scripted", min_length=1, max_length=128)
    system_prompt: str | None = Field(default=None, max_length=100_000)
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, gt=0, le=1_000_000)
    base_url: str | None = Field(default=None, max_length=2048)
    # Scripted provider: a fixed reply (None echoes the message), or a list of
    # turns for tool-calling agents, streamed with the given delays.
    reply: str | None = Field(default=None, max_length=1_000_000)
    script: list[ScriptedTurn] | None = Field(default=None, max_length=1000)
    first_token_delay_ms: float = Field(default=0, ge=0, le=600_000)
    token_delay_ms: float = Field(default=0, ge=0, le=600_000)
    report_usage: bool = True

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        problem = None if url is None else _url_problem(url)
        if problem:
            raise ValueError(problem)
        return url


def _url_problem(url: str) -> str | None:
    """Why ``url`` can't be a provider's base URL (``http(s)://host...``), or None."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "is not a URL"
    if parts.scheme not in ("http", "https") or not parts.hostname or url != url.strip():
        return "must be an http:// or https:// URL with a host"
    return None


class AgentConfig(LLMConfig):
    """An llm with named tools from the worker's registry and a tool-calling loop."""

    type: Literal["agent"] = "agent"  # type: ignore[assignment]
    tools: list[str] = Field(default_factory=list, max_length=64)
    max_iterations: int = Field(default=8, ge=1, le=100)


GRAPH_END = "__end__"
_RESERVED_NODES = frozenset({GRAPH_END, "__start__"})


class GraphEdge(_Strict):
    """``from`` -> ``to`` (a node or ``"__end__"``), taken when ``when`` is absent or matches.

    A node's edges are tried in order after it ran: the first whose ``when`` text
    occurs in the node's output (case-insensitive), or that has no ``when``, is
    followed; when none matches the graph ends.
    """

    source: str = Field(alias="from", min_length=1)
    target: str = Field(alias="to", min_length=1)
    when: str | None = Field(default=None, min_length=1, max_length=1000)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


NodeConfig = Annotated[LLMConfig | AgentConfig, Field(discriminator="type")]


class GraphConfig(_Strict):
    """A LangGraph StateGraph of llm / agent nodes.

    ``max_visits`` caps how many times any one node runs in one execution; it is
    required when the edges form a cycle, and a route to a node that has used
    its visits ends the graph (finish reason ``max_visits``).
    """

    type: Literal["graph"]
    name: str = Field(default="graph", pattern=_NAME)
    nodes: dict[str, NodeConfig] = Field(min_length=1, max_length=64)
    edges: list[GraphEdge] = Field(default_factory=list, max_length=1024)
    entry: str = Field(min_length=1)
    max_visits: int | None = Field(default=None, ge=1, le=100)

    @field_validator("nodes", mode="before")
    @classmethod
    def _default_node_type(cls, nodes: Any) -> Any:
        if isinstance(nodes, Mapping):
            return {
                k: ({"type": "llm", **v} if isinstance(v, Mapping) and "type" not in v else v)
                for k, v in nodes.items()
            }
        return nodes


def _check_graph(graph: GraphConfig) -> None:
    """Reject malformed graphs with the offending field named."""
    for name in graph.nodes:
        if not re.fullmatch(_NAME, name):
            raise ConfigError(f"config.nodes.{name[:64]}", f"node name must match {_NAME}")
        if name in _RESERVED_NODES:
            raise ConfigError(f"config.nodes.{name}", f"{name!r} is a reserved name")
        if ":" in name:  # LangGraph's separator of namespaces
            raise ConfigError(f"config.nodes.{name}", "a node name can't contain ':'")
    if graph.entry not in graph.nodes:
        raise ConfigError("config.entry", f"entry {graph.entry!r} is not a node")
    catch_all: dict[str, int] = {}
    for i, edge in enumerate(graph.edges):
        if edge.source not in graph.nodes:
            raise ConfigError(f"config.edges.{i}.from", f"unknown node {edge.source!r}")
        if edge.target not in graph.nodes and edge.target != GRAPH_END:
            raise ConfigError(f"config.edges.{i}.to", f"unknown node {edge.target!r}")
        if edge.source in catch_all:
            raise ConfigError(
                f"config.edges.{i}",
                f"unreachable: edge {catch_all[edge.source]} from {edge.source!r} has no "
                "'when' and is always taken first",
            )
        if edge.when is None:
            catch_all[edge.source] = i
    if graph.max_visits is None and _has_cycle(graph.nodes, graph.edges):
        raise ConfigError("config.max_visits", "graph has a cycle: set max_visits to bound it")


def _has_cycle(nodes: Mapping[str, Any], edges: list[GraphEdge]) -> bool:
    succ: dict[str, list[str]] = {n: [] for n in nodes}
    for e in edges:
        if e.target != GRAPH_END:
            succ[e.source].append(e.target)
    state: dict[str, int] = {}

    def visit(n: str) -> bool:
        state[n] = 1
        for m in succ[n]:
            if state.get(m) == 1 or (m not in state and visit(m)):
                return True
        state[n] = 2
        return False

    return any(n not in state and visit(n) for n in nodes)


ActorConfig = Annotated[LLMConfig | AgentConfig | GraphConfig, Field(discriminator="type")]
_ACTOR = TypeAdapter(ActorConfig)


class Limits(_Strict):
    """Per-job limits; each one exceeded ends the job with its own reason."""

    timeout_ms: int | None = Field(default=None, gt=0, le=24 * 3600 * 1000)
    stall_timeout_ms: int | None = Field(default=None, gt=0, le=3600 * 1000)
    max_model_calls: int | None = Field(default=None, ge=1, le=10_000)
    max_tool_calls: int | None = Field(default=None, ge=0, le=10_000)
    max_cost_usd: Decimal | None = Field(default=None, gt=0, le=1_000_000)


class ModelPrice(_Strict):
    """USD per million tokens."""

    input: Decimal = Field(ge=0, le=1_000_000)
    output: Decimal = Field(ge=0, le=1_000_000)


_MONEY_LIMITS = frozenset({"max_cost_usd"})
_PRICING = TypeAdapter(dict[str, ModelPrice])
_MAX_PRICED_MODELS = 256
_CRED_FIELDS = frozenset({"api_key", "base_url", "organization"})
_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]+")


def _first_error(exc: ValidationError, root: str, tagged: bool = False) -> tuple[str, str]:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    if tagged and loc and loc[0] in ("llm", "agent", "graph"):
        loc = loc[1:]  # drop the discriminator tag pydantic puts first
    # Nested node configs also carry a tag: nodes.<name>.<tag>.<field>
    loc = [
        p
        for i, p in enumerate(loc)
        if not (i >= 2 and loc[i - 2] == "nodes" and p in ("llm", "agent"))
    ]
    path = ".".join([root, *loc]) if loc else root
    return path, err["msg"]


def parse_config(config: object) -> LLMConfig | AgentConfig | GraphConfig:
    """Validate an actor config dict; raise :class:`ConfigError` naming the field."""
    if not isinstance(config, Mapping):
        raise ConfigError("config", f"must be a mapping, not {type(config).__name__}")
    actor_type = config.get("type", "llm")
    if actor_type not in ("llm", "agent", "graph"):
        raise ConfigError("config.type", f"unknown actor type {actor_type!r} (llm, agent, graph)")
    data = dict(config)
    data.setdefault("type", "llm")
    if actor_type != "graph" and "provider" in data and data["provider"] not in PROVIDERS:
        raise ConfigError(
            "config.provider", f"unknown provider {data['provider']!r} ({', '.join(PROVIDERS)})"
        )
    try:
        parsed = _ACTOR.validate_python(data)
    except ValidationError as exc:
        raise ConfigError(*_first_error(exc, "config", tagged=True)) from None
    if isinstance(parsed, GraphConfig):
        _check_graph(parsed)
    return parsed


def parse_limits(limits: object) -> Limits:
    if limits is None:
        return Limits()
    if isinstance(limits, Limits):
        return limits
    if not isinstance(limits, Mapping):
        raise InvalidInput("limits", f"must be a mapping, not {type(limits).__name__}")
    for key, value in limits.items():
        if value is None or (key in _MONEY_LIMITS and isinstance(value, str)):
            continue  # money is Decimal: a decimal string is exact, as in pricing
        if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
            raise InvalidInput(
                f"limits.{str(key)[:64]}", f"must be a number, not {type(value).__name__}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidInput(f"limits.{str(key)[:64]}", "must be a finite number")
    try:
        return Limits.model_validate(dict(limits))
    except ValidationError as exc:
        raise InvalidInput(*_first_error(exc, "limits")) from None


def parse_pricing(pricing: object) -> dict[str, ModelPrice]:
    if pricing is None:
        return {}
    if not isinstance(pricing, Mapping):
        raise InvalidInput("pricing", f"must be a mapping, not {type(pricing).__name__}")
    if len(pricing) > _MAX_PRICED_MODELS:
        raise InvalidInput("pricing", f"more than {_MAX_PRICED_MODELS} models")
    for model, price in pricing.items():
        if not isinstance(model, str) or not 0 < len(model) <= 128:
            raise InvalidInput(
                "pricing", f"model names must be 1-128 character strings ({str(model)[:32]!r})"
            )
        if isinstance(price, Mapping):
            for side, value in price.items():
                if isinstance(value, bool):
                    raise InvalidInput(f"pricing.{model}.{side}", "must be a number")
    try:
        return _PRICING.validate_python(dict(pricing))
    except ValidationError as exc:
        raise InvalidInput(*_first_error(exc, "pricing")) from None


def check_budget(
    config: LLMConfig | GraphConfig, limits: Limits, pricing: Mapping[str, ModelPrice]
) -> None:
    """A cost budget needs a price for every model the actor runs (unknown cost is not 0)."""
    if limits.max_cost_usd is None:
        return
    models = (
        [n.model for n in config.nodes.values()]
        if isinstance(config, GraphConfig)
        else [config.model]
    )
    for model in models:
        if model not in pricing:
            raise InvalidInput(
                "pricing", f"limits.max_cost_usd needs a price for every model; {model!r} has none"
            )


def check_credentials(
    config: LLMConfig | GraphConfig, credentials: Mapping[str, Mapping[str, str]]
) -> None:
    """Every openai node needs an API key, unless it talks to a self-hosted base URL."""
    nodes = list(config.nodes.values()) if isinstance(config, GraphConfig) else [config]
    for node in nodes:
        if node.provider != "openai":
            continue
        creds = credentials.get("openai", {})
        if not creds.get("api_key") and not (creds.get("base_url") or node.base_url):
            raise CredentialsError(
                "credentials.openai.api_key", "required for provider openai without a base_url"
            )


def parse_credentials(credentials: object) -> dict[str, dict[str, str]]:
    """Check credentials are ``{provider: {field: str}}``; never echo a value in errors."""
    if credentials is None:
        return {}
    if not isinstance(credentials, Mapping):
        raise CredentialsError(
            "credentials", f"must be a mapping, not {type(credentials).__name__}"
        )
    out: dict[str, dict[str, str]] = {}
    for provider, fields in credentials.items():
        if not isinstance(provider, str) or provider not in PROVIDERS:
            raise CredentialsError("credentials", f"unknown provider key {str(provider)[:32]!r}")
        if not isinstance(fields, Mapping):
            raise CredentialsError(f"credentials.{provider}", "must be a mapping of strings")
        entry: dict[str, str] = {}
        for name, value in fields.items():
            if not isinstance(name, str) or name not in _CRED_FIELDS:
                raise CredentialsError(
                    f"credentials.{provider}",
                    f"unknown field {str(name)[:32]!r} ({', '.join(sorted(_CRED_FIELDS))})",
                )
            if not isinstance(value, str) or not value or len(value) > 4096:
                raise CredentialsError(
                    f"credentials.{provider}.{name}", "must be a non-empty string (<= 4096 chars)"
                )
            # Sent as an HTTP header or URL: a control character or non-ASCII text would
            # fail only on the worker, at the provider call.
            if not _PRINTABLE_ASCII.fullmatch(value):
                raise CredentialsError(
                    f"credentials.{provider}.{name}",
                    "must be printable ASCII (no spaces, control characters or other text)",
                )
            problem = _url_problem(value) if name == "base_url" else None
            if problem:
                raise CredentialsError(f"credentials.{provider}.{name}", problem)
            entry[name] = value
        out[provider] = entry
    return out
