"""Errors of the actor runtime: typed, classified retryable or not, scrubbed of credentials."""

from __future__ import annotations

from typing import Any

import pytest

from tests.openai_server import FakeOpenAI, Reply
from tests.runtime_support import API_KEY, auth_header, creds, llm, model, run
from worker import (
    ConfigError,
    CredentialsError,
    ProviderAuthError,
    ProviderError,
    create_executor,
)

# -- errors ------------------------------------------------------------------------


def test_401_echoing_the_key_is_scrubbed_and_not_retryable(
    openai_server: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    m = openai_server.script(model("auth"), Reply(status=401, echo_key=True))
    ex = create_executor(llm(m), creds(openai_server))
    with pytest.raises(ProviderAuthError) as info:
        run(ex.execute("hi"))
    err = info.value
    assert isinstance(err, ProviderError) and not err.retryable and err.status_code == 401
    assert "Incorrect API key provided" in str(err)
    texts = [str(err), repr(err), ex.last_result.model_dump_json() if ex.last_result else ""]
    texts += [r.getMessage() for r in caplog.records]
    for text in texts:
        assert API_KEY not in text and API_KEY[:12] not in text
    assert ex.last_result is not None and ex.last_result.finish_reason == "error"
    assert ex.last_result.error is not None and "[redacted]" in ex.last_result.error


@pytest.mark.parametrize("status", [429, 500, 503])
def test_rate_limits_and_server_errors_are_retryable(
    openai_server: FakeOpenAI, status: int
) -> None:
    m = openai_server.script(model("flaky"), Reply(status=status, error_message="try later"))
    ex = create_executor(llm(m), creds(openai_server))
    with pytest.raises(ProviderError) as info:
        run(ex.execute("hi"))
    assert info.value.retryable and info.value.status_code == status
    assert not isinstance(info.value, ProviderAuthError)


@pytest.mark.parametrize("cut", ["cut_after", "end_after"])
def test_connection_cut_mid_stream_is_retryable_with_a_partial_result(
    openai_server: FakeOpenAI, cut: str
) -> None:
    """Cut mid-body, or a whole HTTP body that ends before the reply's finish reason."""
    m = openai_server.script(model("cut"), Reply(text="one two three four five", **{cut: 3}))
    ex = create_executor(llm(m), creds(openai_server))
    got: list[str] = []

    async def consume() -> None:
        async for token in ex.execute_stream("go"):
            got.append(token)

    with pytest.raises(ProviderError) as info:
        run(consume())
    assert info.value.retryable
    assert got == ["one", " two", " three"]
    assert ex.last_result is not None and ex.last_result.text == "one two three"
    assert ex.last_result.finish_reason == "error"


def test_unreachable_provider_is_retryable(openai_server: FakeOpenAI) -> None:
    ex = create_executor(
        llm("m"), {"openai": {"api_key": API_KEY, "base_url": "http://127.0.0.1:9/v1"}}
    )
    with pytest.raises(ProviderError) as info:
        run(ex.execute("hi"))
    assert info.value.retryable and API_KEY not in str(info.value)


def test_missing_and_malformed_credentials_are_typed() -> None:
    with pytest.raises(CredentialsError) as info:
        create_executor(llm("gpt-4o-mini"))
    assert info.value.field == "credentials.openai.api_key"
    with pytest.raises(CredentialsError) as info:
        create_executor(llm("m"), {"openai": {"api_key": API_KEY, "password": "x"}})
    assert info.value.field == "credentials.openai" and API_KEY not in str(info.value)
    with pytest.raises(CredentialsError) as info:
        create_executor(llm("m"), {"openai": {"api_key": 42}})  # type: ignore[dict-item]
    assert info.value.field == "credentials.openai.api_key"


def test_self_hosted_server_needs_no_key(openai_server: FakeOpenAI) -> None:
    """A base_url in the config alone is enough (vLLM, Ollama, LM Studio)."""
    m = openai_server.script(model("local"), Reply(text="local reply"))
    ex = create_executor(llm(m, base_url=openai_server.base_url))
    assert run(ex.execute("hi")).text == "local reply"
    assert auth_header(openai_server, m) == "Bearer EMPTY"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"provider": "anthropic"}, "config.provider"),
        ({"temperature": 5}, "config.temperature"),
        ({"max_tokens": 0}, "config.max_tokens"),
        ({"api_key": "sk-in-config"}, "config.api_key"),
        ({"type": "agent", "tools": ["calculator"], "max_iterations": 0}, "config.max_iterations"),
        ({"type": "robot"}, "config.type"),
    ],
)
def test_bad_llm_configs_name_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        create_executor({**llm("m", base_url="http://127.0.0.1:9/v1"), **change})
    assert info.value.field == field
    assert "sk-in-config" not in str(info.value)


def test_an_error_event_inside_the_stream_is_retried_only_for_the_providers_side() -> None:
    import openai

    from worker.runtime.providers import http_library, provider_error

    request = http_library().Request("POST", "http://127.0.0.1/v1/chat/completions")

    def event(body: object) -> bool:
        return provider_error(openai.APIError("stream error", request, body=body), []).retryable

    assert not event({"type": "invalid_request_error", "code": "context_length_exceeded"})
    assert not event({"error": {"type": "invalid_request_error", "code": "content_filter"}})
    assert event({"type": "server_error", "code": None})
    assert event({"error": {"type": "overloaded_error"}})
    assert event({"code": "rate_limit_exceeded"})
    assert event(None)  # no event at all: the stream was cut


def test_the_http_timeout_leaves_long_waits_to_the_runs_limits() -> None:
    import openai

    from producer.config import parse_config
    from worker.runtime.providers import build_chat_model

    cfg = parse_config({"type": "llm", "provider": "openai", "model": "m"})
    model = build_chat_model(cfg, {"openai": {"api_key": "sk-test"}})
    timeout = model.request_timeout
    assert isinstance(timeout, openai.Timeout)
    # Not the 60 s that ended slow first tokens whatever stall_timeout_ms allowed.
    assert timeout.read == 600 and timeout.connect == 10
