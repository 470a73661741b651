"""Property tests: no input crashes enqueue validation or message/payload decoding with
anything but the typed errors. Pure functions only, so each property stays fast."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any

from celery.exceptions import InvalidTaskError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer import ActorqError, Client, Settings, keys
from producer.crypto import generate_key
from worker.message import decode_message, decode_payload
from worker.runtime.executor import create_executor
from worker.strategy import check_task_message

KEYS = (generate_key(),)
CLIENT = Client(Settings(secret_keys=KEYS))
FAST = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)

leaf = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats()
    | st.decimals()
    | st.text(max_size=12)
    | st.binary(max_size=6)
    | st.sampled_from(["", "scripted", "openai", "llm", "agent", "graph", "api_key", "NaN", "1e9"])
    # the nasty ones, always in reach
    | st.sampled_from(
        [math.nan, math.inf, -math.inf, 10**40, -1, 0, Decimal("NaN"), Decimal("-Infinity")]
    )
    | st.sampled_from(["\ud800", "\x00", "a}b", "x:y", "{x}", "a\nb", "é" * 3, "k" * 65])
)
anything = st.recursive(
    leaf,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=4)
    ),
    max_leaves=10,
)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


def near(valid: st.SearchStrategy[Any], fields: list[str]) -> st.SearchStrategy[Any]:
    """A valid value, one with some fields replaced by junk, or junk outright."""
    perturbed = st.builds(
        lambda base, extra: {**base, **extra},
        valid,
        st.dictionaries(st.sampled_from(fields), anything, max_size=3),
    )
    return st.integers(0, 9).flatmap(lambda i: valid if i < 5 else perturbed if i < 8 else anything)


configs = near(
    st.fixed_dictionaries(
        {"provider": st.sampled_from(["scripted", "openai"])},
        optional={
            "type": st.sampled_from(["llm", "agent"]),
            "reply": st.text(max_size=20),
            "temperature": st.floats(0, 2),
            "tools": st.lists(st.sampled_from(["calculator", "utc_now"]), max_size=2),
        },
    ),
    ["type", "provider", "name", "model", "temperature", "max_tokens", "nodes", "entry", "edges"],
)
limits = near(
    st.fixed_dictionaries(
        {},
        optional={
            "timeout_ms": st.integers(min_value=1, max_value=10**6),
            "max_cost_usd": st.decimals(min_value=Decimal("0.01"), max_value=Decimal(100)),
            "max_model_calls": st.integers(min_value=1, max_value=10),
        },
    ),
    ["timeout_ms", "stall_timeout_ms", "max_model_calls", "max_tool_calls", "max_cost_usd", "x"],
)
pricing = st.none() | st.dictionaries(
    st.text(max_size=6) | st.integers(),
    near(
        st.fixed_dictionaries({"input": st.decimals(0, 10), "output": st.floats(0, 10)}),
        ["input", "output", "other"],
    ),
    max_size=3,
)
credentials = st.none() | near(
    st.fixed_dictionaries(
        {},
        optional={
            "openai": st.dictionaries(
                st.sampled_from(["api_key", "base_url", "organization", "password"]),
                st.text(min_size=1, max_size=12) | anything,
                max_size=3,
            ),
            "scripted": st.just({}),
        },
    ),
    ["openai", "scripted", "acme"],
)


def mostly(usual: st.SearchStrategy[Any], *odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``usual`` most of the time, so that the checks after this one are reached too."""
    return st.integers(0, 9).flatmap(lambda i: usual if i < 7 else odd[i % len(odd)])


job_ids = mostly(
    st.none() | st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
    st.text(max_size=70),
    anything,
)
messages = mostly(st.text(max_size=40), anything)
idem_keys = mostly(st.none() | st.from_regex(r"[!-~]{1,20}", fullmatch=True), st.text(), anything)


@FAST
@given(configs, messages, credentials, limits, pricing, job_ids, idem_keys)
def test_enqueue_validation_raises_only_typed_errors(
    config: Any, message: Any, creds: Any, lim: Any, price: Any, job_id: Any, idem: Any
) -> None:
    try:
        payload, actor = CLIENT._build_payload(config, message, creds, lim, price, job_id, idem)
    except ActorqError as exc:
        assert str(exc)
        if hasattr(exc, "field"):
            assert str(exc).startswith(f"{exc.field}:")
        return
    # Accepted: storable, well-keyed, and the worker decodes exactly what was sent.
    raw = json.dumps(payload, allow_nan=False)
    assert keys.valid_job_id(payload["job_id"]) and isinstance(actor, str)
    job = decode_payload(raw.encode(), KEYS)
    assert job.message == message
    if creds:
        assert job.credentials == {p: dict(f) for p, f in creds.items()}
        assert all(v not in raw for f in creds.values() for v in f.values() if len(v) > 3)


@FAST
@given(
    st.lists(anything, max_size=4) | anything,
    st.dictionaries(st.text(max_size=4), anything) | anything,
)
def test_message_decoding_raises_only_typed_errors(args: Any, kwargs: Any) -> None:
    try:
        job_id, error = decode_message(args, kwargs)
    except ActorqError:
        return
    assert keys.valid_job_id(job_id)
    assert error is None or (isinstance(error, str) and len(error) < 300)


payload_docs = st.fixed_dictionaries(
    {
        "v": mostly(st.just(1), st.sampled_from([2, "1", True, None]), anything),
        "config": configs,
        "message": messages,
    },
    optional={
        "limits": limits,
        "pricing": pricing,
        "credentials": st.none() | st.text(max_size=20) | anything,
        "job_id": job_ids,
    },
)
raw_payloads = mostly(
    payload_docs.map(lambda d: json.dumps(d, default=str)),
    st.binary(max_size=64),
    st.text(max_size=64),
    json_value.map(json.dumps),
)


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
@given(raw_payloads)
def test_payload_decoding_and_executor_build_raise_only_typed_errors(raw: Any) -> None:
    """What the worker does with a stored payload: decode, then build the executor."""
    try:
        job = decode_payload(raw, KEYS)
        create_executor(job.config, job.credentials, job.limits, job.pricing)
    except ActorqError as exc:
        assert str(exc)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
@given(configs, credentials, limits, pricing)
def test_worker_accepts_what_enqueue_accepts(config: Any, creds: Any, lim: Any, price: Any) -> None:
    """A job enqueue validated never fails on the worker for a reason enqueue could have seen."""
    try:
        payload, _ = CLIENT._build_payload(config, "hi", creds, lim, price, None, None)
    except ActorqError:
        return
    job = decode_payload(json.dumps(payload).encode(), KEYS)
    executor = create_executor(job.config, job.credentials, job.limits, job.pricing)
    assert executor.name


@FAST
@given(
    st.dictionaries(
        st.sampled_from(["id", "task", "eta", "expires", "retries", "timelimit", "root_id"]),
        anything,
    )
    | anything,
    anything,
)
def test_task_message_check_raises_only_invalid_task(headers: Any, payload: Any) -> None:
    try:
        check_task_message(headers, payload)
    except InvalidTaskError:
        return
    assert isinstance(payload, list | tuple) and len(payload) == 3
