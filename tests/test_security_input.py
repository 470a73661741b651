"""Hostile input at enqueue: a typed error naming the field, nothing written, still serving.

Complements the cases in test_job_path.py; every case here also checks that no
idempotency key was left behind and that the next job runs.
"""

from __future__ import annotations

import math
import uuid
from decimal import Decimal
from typing import Any

import pytest

from producer import (
    Client,
    ConfigError,
    CredentialsError,
    InvalidInput,
    JobStatus,
    Settings,
)
from tests.conftest import RedisTarget
from tests.helpers import actorq_keys, queue_length, scripted

pytestmark = pytest.mark.usefixtures("workers")


def _deep(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {}
    root = node
    for _ in range(depth):
        node["a"] = {}
        node = node["a"]
    return root


def _circular() -> dict[str, Any]:
    config: dict[str, Any] = scripted()
    config["self"] = config
    return config


def _graph(node: dict[str, Any]) -> dict[str, Any]:
    return {"type": "graph", "nodes": {"n": node}, "entry": "n"}


OK = scripted()
C = ConfigError
I = InvalidInput  # noqa: E741
K = CredentialsError

# (id, kwargs for enqueue_actor_job, error, field)
CASES: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    # config
    ("config None", {"config": None}, C, "config"),
    ("config str", {"config": '{"provider": "scripted"}'}, C, "config"),
    ("config int", {"config": 7}, C, "config"),
    ("config set inside", {"config": {**OK, "reply": {1, 2}}}, C, "config"),
    ("config circular", {"config": _circular()}, C, "config"),
    ("config nested 100k deep", {"config": {**OK, "extra": _deep(100_000)}}, C, "config"),
    ("config tuple key", {"config": {("a",): 1}}, C, "config"),
    ("config NaN", {"config": {**OK, "temperature": math.nan}}, C, "config"),
    ("actor type int", {"config": {"type": 3, "provider": "scripted"}}, C, "config.type"),
    ("actor type None", {"config": {"type": None, "provider": "scripted"}}, C, "config.type"),
    ("provider list", {"config": {"provider": ["openai"]}}, C, "config.provider"),
    ("provider missing", {"config": {"type": "llm"}}, C, "config.provider"),
    (
        "graph node provider",
        {"config": _graph({"provider": "acme"})},
        C,
        "config.nodes.n.provider",
    ),
    ("unknown config field", {"config": {**OK, "shell": "rm -rf /"}}, C, "config.shell"),
    ("config over default limit", {"config": {**OK, "reply": "x" * 70_000}}, C, "config"),
    # message
    ("message bytes", {"message": b"hi"}, I, "message"),
    ("message list", {"message": ["hi"]}, I, "message"),
    ("message dict", {"message": {"text": "hi"}}, I, "message"),
    ("message lone surrogate", {"message": "a\ud800b"}, I, "message"),
    ("message over default limit", {"message": "x" * (256 * 1024 + 1)}, I, "message"),
    ("message over limit in utf-8", {"message": "é" * (128 * 1024 + 1)}, I, "message"),
    # limits
    ("limits list", {"limits": [1, 2]}, I, "limits"),
    ("limits str", {"limits": "timeout_ms=5"}, I, "limits"),
    ("limit string", {"limits": {"timeout_ms": "5000"}}, I, "limits.timeout_ms"),
    ("limit inf", {"limits": {"timeout_ms": math.inf}}, I, "limits.timeout_ms"),
    ("limit -inf", {"limits": {"stall_timeout_ms": -math.inf}}, I, "limits.stall_timeout_ms"),
    ("limit huge", {"limits": {"timeout_ms": 10**30}}, I, "limits.timeout_ms"),
    ("limit bool", {"limits": {"max_model_calls": True}}, I, "limits.max_model_calls"),
    ("limit zero", {"limits": {"max_model_calls": 0}}, I, "limits.max_model_calls"),
    ("limit fraction", {"limits": {"max_tool_calls": 1.5}}, I, "limits.max_tool_calls"),
    ("limit list", {"limits": {"timeout_ms": [5]}}, I, "limits.timeout_ms"),
    ("cost negative", {"limits": {"max_cost_usd": -1}}, I, "limits.max_cost_usd"),
    ("cost Decimal NaN", {"limits": {"max_cost_usd": Decimal("NaN")}}, I, "limits.max_cost_usd"),
    ("cost word", {"limits": {"max_cost_usd": "cheap"}}, I, "limits.max_cost_usd"),
    ("cost huge", {"limits": {"max_cost_usd": 1e300}}, I, "limits.max_cost_usd"),
    ("limit key not str", {"limits": {1: 5}}, I, "limits.1"),
    # pricing
    ("pricing list", {"pricing": [("m", 1)]}, I, "pricing"),
    ("price bool", {"pricing": {"m": {"input": True, "output": 1}}}, I, "pricing.m.input"),
    ("price NaN", {"pricing": {"m": {"input": 1, "output": math.nan}}}, I, "pricing.m.output"),
    ("price inf str", {"pricing": {"m": {"input": "inf", "output": 1}}}, I, "pricing.m.input"),
    ("price negative", {"pricing": {"m": {"input": -0.5, "output": 1}}}, I, "pricing.m.input"),
    ("price missing side", {"pricing": {"m": {"input": 1}}}, I, "pricing.m.output"),
    ("price not mapping", {"pricing": {"m": 3}}, I, "pricing.m"),
    ("pricing model int", {"pricing": {5: {"input": 1, "output": 1}}}, I, "pricing"),
    (
        "pricing too many models",
        {"pricing": {f"m{i}": {"input": 1, "output": 1} for i in range(257)}},
        I,
        "pricing",
    ),
    # job ids: no key injection
    ("job id brace", {"job_id": "a}b"}, I, "job_id"),
    ("job id open brace", {"job_id": "{x"}, I, "job_id"),
    ("job id colon", {"job_id": "x:y"}, I, "job_id"),
    ("job id newline", {"job_id": "a\nb"}, I, "job_id"),
    ("job id trailing newline", {"job_id": "abc\n"}, I, "job_id"),
    ("job id 65 chars", {"job_id": "a" * 65}, I, "job_id"),
    ("job id unicode", {"job_id": "jöb"}, I, "job_id"),
    ("job id unicode digit", {"job_id": "١٢٣"}, I, "job_id"),
    ("job id empty", {"job_id": ""}, I, "job_id"),
    ("job id space", {"job_id": "a b"}, I, "job_id"),
    ("job id glob", {"job_id": "*"}, I, "job_id"),
    ("job id path", {"job_id": "../x"}, I, "job_id"),
    ("job id int", {"job_id": 5}, I, "job_id"),
    ("job id bytes", {"job_id": b"abc"}, I, "job_id"),
    # idempotency keys
    ("idem empty", {"idempotency_key": ""}, I, "idempotency_key"),
    ("idem 201 chars", {"idempotency_key": "k" * 201}, I, "idempotency_key"),
    ("idem space", {"idempotency_key": "a b"}, I, "idempotency_key"),
    ("idem newline", {"idempotency_key": "a\r\nSET x y"}, I, "idempotency_key"),
    ("idem unicode", {"idempotency_key": "ключ"}, I, "idempotency_key"),
    ("idem int", {"idempotency_key": 42}, I, "idempotency_key"),
    ("idem bytes", {"idempotency_key": b"k"}, I, "idempotency_key"),
    # credentials
    ("creds str", {"credentials": "sk-abc"}, K, "credentials"),
    ("creds list", {"credentials": [("openai", {"api_key": "k"})]}, K, "credentials"),
    ("creds unknown provider", {"credentials": {"anthropic": {"api_key": "k"}}}, K, "credentials"),
    ("creds provider int", {"credentials": {1: {"api_key": "k"}}}, K, "credentials"),
    ("creds fields str", {"credentials": {"openai": "sk-abc"}}, K, "credentials.openai"),
    (
        "creds unknown field",
        {"credentials": {"openai": {"password": "k"}}},
        K,
        "credentials.openai",
    ),
    (
        "creds nested",
        {"credentials": {"openai": {"api_key": {"v": "k"}}}},
        K,
        "credentials.openai.api_key",
    ),
    ("creds int", {"credentials": {"openai": {"api_key": 123}}}, K, "credentials.openai.api_key"),
    ("creds None", {"credentials": {"openai": {"api_key": None}}}, K, "credentials.openai.api_key"),
    ("creds empty", {"credentials": {"openai": {"api_key": ""}}}, K, "credentials.openai.api_key"),
    (
        "creds 4097 chars",
        {"credentials": {"openai": {"api_key": "k" * 4097}}},
        K,
        "credentials.openai.api_key",
    ),
    ("creds newline", {"credentials": {"openai": {"api_key": "sk-1\nX: y"}}}, K,
     "credentials.openai.api_key"),
    ("creds surrogate", {"credentials": {"openai": {"api_key": "sk-\ud800"}}}, K,
     "credentials.openai.api_key"),
    ("creds non-ascii", {"credentials": {"openai": {"organization": "org-é"}}}, K,
     "credentials.openai.organization"),
    ("creds space", {"credentials": {"openai": {"base_url": "http://x /v1"}}}, K,
     "credentials.openai.base_url"),
    ("creds base_url no scheme", {"credentials": {"openai": {"base_url": "http//typo"}}}, K,
     "credentials.openai.base_url"),
    # what failed only on the worker before
    ("base_url no scheme", {"config": {**OK, "base_url": "localhost:8000/v1"}}, C,
     "config.base_url"),
    ("base_url ftp", {"config": {**OK, "base_url": "ftp://files.example/v1"}}, C,
     "config.base_url"),
    ("graph node with ':'", {"config": {"type": "graph", "nodes": {"a:b": scripted()},
     "entry": "a:b"}}, C, "config.nodes.a:b"),
    ("fail_with (no such field)", {"config": {**OK, "fail_with": "error"}}, C, "config.fail_with"),
]


def _strings(value: object) -> list[str]:
    """Every string inside a nested structure (values only, of length > 3)."""
    if isinstance(value, str):
        return [value] if len(value) > 3 else []
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return []


def _assert_refused(
    client: Client,
    redis_target: RedisTarget,
    queue: str,
    kwargs: dict[str, Any],
    error: type[Exception],
    field: str,
) -> None:
    r = redis_target.client()
    before_keys, before_queue = actorq_keys(r), queue_length(r, queue)
    call: dict[str, Any] = {"config": OK, "message": "hi", **kwargs}
    if "idempotency_key" not in call:
        call["idempotency_key"] = f"refused-{uuid.uuid4().hex}"  # must not be left behind
    with pytest.raises(error) as info:
        client.enqueue_actor_job(call.pop("config"), call.pop("message"), **call)
    assert type(info.value) is error, repr(info.value)
    assert info.value.field == field, info.value  # type: ignore[attr-defined]
    assert str(info.value).startswith(f"{field}:")
    for value in _strings(kwargs.get("credentials")):
        assert value not in str(info.value), "a credential value was echoed in the error"
    assert actorq_keys(r) - before_keys == set()
    assert queue_length(r, queue) == before_queue
    ok = client.enqueue_actor_job(scripted("still serving"), "next")
    assert client.wait_result(ok, timeout=30).status is JobStatus.SUCCEEDED


@pytest.mark.parametrize(
    ("kwargs", "error", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_hostile_enqueue_input_is_refused(
    client: Client,
    redis_target: RedisTarget,
    stack_env: dict[str, str],
    kwargs: dict[str, Any],
    error: type[Exception],
    field: str,
) -> None:
    _assert_refused(client, redis_target, stack_env["ACTORQ_QUEUE"], kwargs, error, field)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"config": {**OK, "reply": "x" * 600}}, "config"),
        ({"message": "x" * 301}, "message"),
    ],
    ids=["config", "message"],
)
def test_size_limits_are_configurable(
    stack_env: dict[str, str],
    redis_target: RedisTarget,
    kwargs: dict[str, Any],
    field: str,
) -> None:
    env = {**stack_env, "ACTORQ_MAX_CONFIG_BYTES": "512", "ACTORQ_MAX_MESSAGE_BYTES": "300"}
    client = Client(Settings.from_env(env))
    try:
        error = ConfigError if field == "config" else InvalidInput
        _assert_refused(client, redis_target, env["ACTORQ_QUEUE"], kwargs, error, field)
        # just under the limits is accepted
        job = client.enqueue_actor_job({**OK, "reply": "y" * 100}, "m" * 300)
        assert client.wait_result(job, timeout=30).status is JobStatus.SUCCEEDED
    finally:
        client.close()
    with pytest.raises(ValueError, match="ACTORQ_MAX_MESSAGE_BYTES"):
        Settings.from_env({**env, "ACTORQ_MAX_MESSAGE_BYTES": "-1"})


def test_idempotency_keys_cannot_inject_or_duplicate(
    client: Client, redis_target: RedisTarget, stack_env: dict[str, str]
) -> None:
    r = redis_target.client()
    queue = stack_env["ACTORQ_QUEUE"]
    # Braces and colons are allowed in idempotency keys: they stay inside actorq:idem:
    key = f"x}}:{{job}}:events:{uuid.uuid4().hex}"
    before = actorq_keys(r)
    first = client.enqueue_actor_job(scripted("once"), "a", idempotency_key=key)
    assert client.wait_result(first, timeout=30).status is JobStatus.SUCCEEDED
    new = {k.decode() for k in actorq_keys(r) - before}
    assert f"actorq:idem:{key}" in new
    # one idempotency key, and job keys under the job's own id only
    assert {k for k in new if k.startswith("actorq:idem:")} == {f"actorq:idem:{key}"}
    assert {k for k in new if k.startswith("actorq:job:")} <= {
        f"actorq:job:{{{first}}}",
        f"actorq:job:{{{first}}}:events",
        f"actorq:job:{{{first}}}:cancel",
        f"actorq:job:{{{first}}}:lease",
    }
    # the same key again returns the first job: no second record, nothing queued
    before_keys, before_queue = actorq_keys(r), queue_length(r, queue)
    again = client.enqueue_actor_job(scripted("twice"), "b", idempotency_key=key)
    assert again == first
    assert actorq_keys(r) - before_keys == set() and queue_length(r, queue) == before_queue
    # ... but a bad input under that key is still refused, not answered from the key
    with pytest.raises(ConfigError):
        client.enqueue_actor_job({"provider": "acme"}, "c", idempotency_key=key)
    # a duplicate job id under a fresh key leaves that key behind neither
    fresh = f"fresh-{uuid.uuid4().hex}"
    with pytest.raises(InvalidInput) as info:
        client.enqueue_actor_job(scripted(), "d", job_id=first, idempotency_key=fresh)
    assert info.value.field == "job_id"
    assert not r.exists(f"actorq:idem:{fresh}")
