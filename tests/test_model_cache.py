"""The worker's cache of built chat models: reuse, separation, eviction, settings."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from producer.config import parse_config
from worker.runtime import providers
from worker.runtime.model_cache import ModelCache, cache_from_env, credentials_digest
from worker.runtime.providers import build_chat_model

OPENAI = {"type": "llm", "name": "a", "provider": "openai", "model": "gpt-4o-mini"}
SCRIPTED = {"type": "llm", "name": "a", "provider": "scripted", "reply": "hi there"}


def _on_loop(fn: Any) -> Any:
    async def main() -> Any:
        return fn()

    return asyncio.run(main())


def test_same_settings_and_credentials_share_one_model() -> None:
    cfg = parse_config(OPENAI)

    def build() -> list[Any]:
        creds = {"openai": {"api_key": "sk-one"}}
        return [build_chat_model(cfg, creds), build_chat_model(cfg, creds)]

    first, second = _on_loop(build)
    assert first is second


def test_other_credentials_or_settings_get_their_own_model() -> None:
    def build() -> list[Any]:
        a = parse_config(OPENAI)
        b = parse_config({**OPENAI, "temperature": 0.5})
        return [
            build_chat_model(a, {"openai": {"api_key": "sk-one"}}),
            build_chat_model(a, {"openai": {"api_key": "sk-two"}}),
            build_chat_model(a, {"openai": {"api_key": "sk-one", "organization": "org"}}),
            build_chat_model(b, {"openai": {"api_key": "sk-one"}}),
            build_chat_model(parse_config(SCRIPTED), {}),
            build_chat_model(parse_config({**SCRIPTED, "reply": "other"}), {}),
        ]

    models = _on_loop(build)
    assert len({id(m) for m in models}) == len(models)
    assert models[1].openai_api_key.get_secret_value() == "sk-two"


def test_openai_models_leave_the_wait_for_the_next_chunk_to_the_stall_guard() -> None:
    """langchain-openai's per-chunk wait_for can drop a cancel on Python 3.11."""
    model = _on_loop(lambda: build_chat_model(parse_config(OPENAI), {"openai": {"api_key": "k"}}))
    if "stream_chunk_timeout" in type(model).model_fields:
        assert model.stream_chunk_timeout is None


def test_each_loop_builds_its_own_model() -> None:
    """A model's HTTP client belongs to the loop that made it."""
    cfg = parse_config(OPENAI)
    creds = {"openai": {"api_key": "sk-one"}}
    assert _on_loop(lambda: build_chat_model(cfg, creds)) is not _on_loop(
        lambda: build_chat_model(cfg, creds)
    )


def test_the_key_holds_no_secret() -> None:
    digest = credentials_digest({"api_key": "sk-secret-value"})
    assert b"sk-secret" not in digest and len(digest) == 32
    assert digest == credentials_digest({"api_key": "sk-secret-value"})
    assert digest != credentials_digest({"api_key": "sk-secret-valuf"})


def test_least_recently_used_entries_go_first() -> None:
    cache = ModelCache(size=2, ttl_s=60)

    def run() -> list[Any]:
        a1 = cache.get("a", object)
        cache.get("b", object)
        a2 = cache.get("a", object)  # "a" is now the most recent
        cache.get("c", object)  # evicts "b"
        return [a1, a2, cache.get("a", object), cache.get("b", object)]

    a1, a2, a3, b_again = _on_loop(run)
    assert a1 is a2 is a3
    assert b_again is not None


def test_entries_expire_after_the_ttl() -> None:
    cache = ModelCache(size=8, ttl_s=0.05)

    def run() -> tuple[Any, Any, Any]:
        first = cache.get("k", object)
        again = cache.get("k", object)
        time.sleep(0.08)
        return first, again, cache.get("k", object)

    first, again, later = _on_loop(run)
    assert first is again
    assert later is not first


def test_an_idle_cache_empties_itself_after_the_ttl() -> None:
    """No later job needed: a timer on the loop drops what went unused."""
    cache = ModelCache(size=8, ttl_s=0.05)

    async def run() -> tuple[int, int]:
        cache.get("a", object)
        cache.get("b", object)
        before = len(cache)
        await asyncio.sleep(0.2)
        return before, len(cache)

    assert asyncio.run(run()) == (2, 0)


def test_size_zero_builds_every_time() -> None:
    cache = ModelCache(size=0, ttl_s=60)
    a, b = _on_loop(lambda: (cache.get("k", object), cache.get("k", object)))
    assert a is not b


def test_outside_a_loop_nothing_is_cached() -> None:
    cache = ModelCache(size=8, ttl_s=60)
    assert cache.get("k", object) is not cache.get("k", object)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ACTORQ_MODEL_CACHE_SIZE": "many"}, "ACTORQ_MODEL_CACHE_SIZE must be an integer"),
        ({"ACTORQ_MODEL_CACHE_SIZE": "-1"}, "ACTORQ_MODEL_CACHE_SIZE must be 0 or more"),
        ({"ACTORQ_MODEL_CACHE_TTL_S": "soon"}, "ACTORQ_MODEL_CACHE_TTL_S must be a number"),
        ({"ACTORQ_MODEL_CACHE_TTL_S": "0"}, "ACTORQ_MODEL_CACHE_TTL_S must be more than 0"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cache_from_env(env)


def test_settings_from_env() -> None:
    cache = cache_from_env({"ACTORQ_MODEL_CACHE_SIZE": "3", "ACTORQ_MODEL_CACHE_TTL_S": "1.5"})
    assert (cache.size, cache.ttl_s) == (3, 1.5)
    default = cache_from_env({})
    assert (default.size, default.ttl_s) == (128, 600.0)
    assert providers.model_cache.size >= 0
