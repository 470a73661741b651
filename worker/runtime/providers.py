"""Chat models built from a node config and the job's credentials, reused across jobs."""

from __future__ import annotations

import asyncio
import importlib
import json
import weakref
from collections.abc import Mapping
from typing import Any

from langchain_core.language_models import BaseChatModel

from producer.config import LLMConfig

from ..errors import CredentialsError, ProviderAuthError, ProviderError
from .model_cache import cache_from_env, credentials_digest
from .scripted import ScriptedChatModel
from .scrub import scrub

__all__ = ["build_chat_model", "http_library", "model_cache", "provider_error"]

#: Seconds a provider connection may stay silent when no limit of the run is set,
#: and may take to connect.
_READ_TIMEOUT_S = 600.0
_CONNECT_TIMEOUT_S = 10.0
#: What the type or code of a retryable error event inside a stream contains.
_RETRYABLE_STREAM_ERRORS = ("server", "overload", "rate_limit", "timeout", "unavailable")

#: Built models by settings and credentials (see :mod:`.model_cache`).
model_cache = cache_from_env()


# One HTTP connection pool per event loop. langchain-openai's default async client
# is cached for the process and bound to the first loop that used it, which
# breaks every later loop (``asyncio.run`` per call, tests); the worker runs one
# shared loop, so this is one pool per worker process there.
_http_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
    weakref.WeakKeyDictionary()
)


def _http_client() -> Any:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None  # built outside a loop: langchain-openai's default applies
    client = _http_clients.get(loop)
    if client is None:
        import openai

        client = _http_clients[loop] = openai.DefaultAsyncHttpxClient()
    return client


def build_chat_model(cfg: LLMConfig, credentials: Mapping[str, Mapping[str, str]]) -> BaseChatModel:
    """The chat model for ``cfg``: a cached one when an earlier job had the same settings."""
    if cfg.provider == "scripted":
        script = [t.model_dump() for t in cfg.script] if cfg.script else None
        key: tuple[Any, ...] = (
            "scripted",
            cfg.model,
            cfg.reply,
            json.dumps(script, sort_keys=True),
            cfg.first_token_delay_ms,
            cfg.token_delay_ms,
            cfg.report_usage,
        )
        return model_cache.get(
            key,
            lambda: ScriptedChatModel(
                reply=cfg.reply,
                script=script,
                first_token_delay_s=cfg.first_token_delay_ms / 1000,
                token_delay_s=cfg.token_delay_ms / 1000,
                report_usage=cfg.report_usage,
                model_name=cfg.model,
            ),
        )
    creds = credentials.get("openai", {})
    base_url = creds.get("base_url") or cfg.base_url
    api_key = creds.get("api_key")
    if not api_key:
        if not base_url:
            raise CredentialsError(
                "credentials.openai.api_key", "required for provider openai without a base_url"
            )
        api_key = "EMPTY"  # self-hosted OpenAI-compatible servers (vLLM, Ollama) ignore it
    organization = creds.get("organization")
    key = (
        "openai",
        cfg.model,
        base_url,
        credentials_digest({"api_key": api_key, "organization": organization or ""}),
        cfg.temperature,
        cfg.max_tokens,
    )
    return model_cache.get(key, lambda: _chat_openai(cfg, api_key, base_url, organization))


def _chat_openai(
    cfg: LLMConfig, api_key: str, base_url: str | None, organization: str | None
) -> BaseChatModel:
    from langchain_openai import ChatOpenAI

    extra: dict[str, Any] = {}
    if "stream_chunk_timeout" in ChatOpenAI.model_fields:
        # Its per-chunk asyncio.wait_for costs a task and a timer per token and, on
        # Python 3.11, can drop a cancel that lands as a chunk arrives; the runtime's
        # own stall guard (stall_timeout_ms) bounds the wait for the next chunk.
        extra["stream_chunk_timeout"] = None
    return ChatOpenAI(
        **extra,
        model=cfg.model,
        api_key=api_key,  # type: ignore[arg-type]
        base_url=base_url,
        organization=organization,
        temperature=cfg.temperature,
        max_completion_tokens=cfg.max_tokens,
        stream_usage=True,
        http_async_client=_http_client(),
        max_retries=0,  # retries are the job runner's, with resets and backoff
        # The run's limits (timeout_ms, stall_timeout_ms) bound the waits for the model;
        # this only ends a connection that went silent when no limit is set. A first
        # token may take minutes (long prompts, reasoning models).
        timeout=_http_timeout(),
    )


def _http_timeout() -> Any:
    return http_library().Timeout(_READ_TIMEOUT_S, connect=_CONNECT_TIMEOUT_S)


def http_library() -> Any:
    """The HTTP package the installed openai SDK is built on: ``httpx`` before its 3.0,
    ``httpx2`` since. Its timeouts and transport errors are the ones the client takes
    and raises; both packages can be installed at once."""
    import openai

    for name in ("httpx2", "httpx"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(module, "Timeout", None) is openai.Timeout:
            return module
    raise ImportError("the HTTP package of the installed openai SDK cannot be found")


def provider_error(exc: BaseException, secrets: list[str]) -> ProviderError:
    """Classify a provider exception and scrub its text."""
    status = getattr(exc, "status_code", None)
    text = scrub(f"{type(exc).__name__}: {exc}", secrets)
    try:
        import openai

        transport_error = http_library().TransportError
    except ImportError:  # pragma: no cover - worker extra always has them
        return ProviderError(text, retryable=False, status_code=status)
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return ProviderAuthError(text, retryable=False, status_code=exc.status_code)
    if isinstance(exc, openai.APIStatusError):
        retryable = exc.status_code == 429 or exc.status_code >= 500 or exc.status_code == 408
        return ProviderError(text, retryable=retryable, status_code=exc.status_code)
    if isinstance(exc, openai.APIConnectionError | transport_error):
        return ProviderError(text, retryable=True)
    if isinstance(exc, openai.APIError):
        # Mid-stream: an error event the provider sent (its body says what), or
        # nothing at all when the connection was cut.
        return ProviderError(text, retryable=_retryable_stream_error(exc.body))
    return ProviderError(text, retryable=False, status_code=status)


def _retryable_stream_error(body: object) -> bool:
    """An error event inside a stream: worth retrying only when the provider's side
    failed (overloaded, rate limited, a server error), not the request."""
    if not isinstance(body, dict):
        return True  # no event: the stream was cut
    inner = body.get("error")
    error: dict[str, Any] = inner if isinstance(inner, dict) else body
    words = " ".join(str(error.get(k) or "") for k in ("type", "code")).lower()
    return any(w in words for w in _RETRYABLE_STREAM_ERRORS)
