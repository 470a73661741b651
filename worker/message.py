"""Decoding what arrives from outside the worker: the task message and the stored payload.

Both are untrusted (anyone with broker or Redis access can push bytes), so
each decoder turns every malformed input into a typed error: a message with
no usable job id is rejected, anything else ends that job ``failed`` with a
clear reason, and the worker keeps serving.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from producer import keys
from producer.config import parse_credentials
from producer.crypto import decrypt_credentials
from producer.errors import MessageDecodeError
from producer.schema import SCHEMA_VERSION

from .runtime.scrub import secret_values

__all__ = ["JobPayload", "decode_message", "decode_payload"]


def _short(value: object) -> str:
    """A bounded repr for error texts: junk can be megabytes long."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def decode_message(args: object, kwargs: object) -> tuple[str, str | None]:
    """``(job_id, error)`` of a task message; ``error`` is why the job can't run, if any.

    The contract is ``args=(job_id, actor)``, ``kwargs={"v": SCHEMA_VERSION}``.
    Raises :class:`MessageDecodeError` when there is no usable job id, so no job
    record can be named (the message is rejected).
    """
    if not isinstance(args, Sequence) or isinstance(args, str | bytes) or not args:
        raise MessageDecodeError("message args must be a non-empty list")
    job_id = args[0]
    if not keys.valid_job_id(job_id):
        raise MessageDecodeError("message has no usable job id")
    if not isinstance(kwargs, Mapping):
        return job_id, "message kwargs must be a mapping"
    version = kwargs.get("v")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        return job_id, (
            f"message schema version {_short(version)} is not supported (want {SCHEMA_VERSION})"
        )
    if len(args) > 2:
        return job_id, f"message has {len(args)} args (want job id and actor name)"
    if len(args) == 2 and not isinstance(args[1], str):
        return job_id, "message actor name must be a string"
    return job_id, None


@dataclass(frozen=True)
class JobPayload:
    """The stored job, decoded; credentials decrypted (held in memory only)."""

    config: Mapping[str, Any]
    message: str
    credentials: dict[str, dict[str, str]] = field(repr=False)
    limits: Mapping[str, Any] | None
    pricing: Mapping[str, Any] | None

    @property
    def secrets(self) -> list[str]:
        """Every credential value to scrub from texts (base URLs are not secret)."""
        return secret_values(self.credentials)


def decode_payload(raw: object, secret_keys: Sequence[str]) -> JobPayload:
    """Decode the ``payload`` field of a job record.

    Raises :class:`MessageDecodeError` (not JSON, wrong shape, wrong version) or
    :class:`producer.CredentialsError` (tampered or unknown-key ciphertext).
    """
    if raw is None:
        raise MessageDecodeError("job payload is missing (expired, or Redis lost it)")
    if not isinstance(raw, bytes | str):
        raise MessageDecodeError(f"job payload must be bytes, not {type(raw).__name__}")
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        problem = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise MessageDecodeError(f"job payload is not valid JSON ({problem})") from None
    if not isinstance(payload, dict):
        raise MessageDecodeError(f"job payload must be a JSON object, not {type(payload).__name__}")
    version = payload.get("v")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise MessageDecodeError(
            f"job payload schema version {_short(version)} is not supported (want {SCHEMA_VERSION})"
        )
    config = payload.get("config")
    if not isinstance(config, dict):
        raise MessageDecodeError("job payload: config must be an object")
    message = payload.get("message")
    if not isinstance(message, str):
        raise MessageDecodeError("job payload: message must be a string")
    for name in ("limits", "pricing"):
        if payload.get(name) is not None and not isinstance(payload[name], dict):
            raise MessageDecodeError(f"job payload: {name} must be an object")
    token = payload.get("credentials")
    creds = parse_credentials(decrypt_credentials(token, secret_keys)) if token is not None else {}
    return JobPayload(config, message, creds, payload.get("limits"), payload.get("pricing"))
