"""Credentials travel and rest only as Fernet tokens (AES-CBC + HMAC).

``ACTORQ_SECRET_KEY`` holds one or more comma-separated Fernet keys; the first
encrypts, all decrypt (MultiFernet), so keys rotate without dropping jobs in
flight.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from .errors import CredentialsError, SecretKeyMissing

__all__ = ["decrypt_credentials", "encrypt_credentials", "generate_key"]


def generate_key() -> str:
    return Fernet.generate_key().decode()


def _fernet(keys: Sequence[str]) -> MultiFernet:
    if not keys:
        raise SecretKeyMissing(
            "credentials given but ACTORQ_SECRET_KEY is not set: "
            "generate one with `actorq keygen` and give it to routers and workers"
        )
    try:
        return MultiFernet([Fernet(k.encode()) for k in keys])
    except (ValueError, TypeError):
        raise SecretKeyMissing(
            "ACTORQ_SECRET_KEY is not a valid Fernet key (32 url-safe base64 bytes)"
        ) from None


def encrypt_credentials(credentials: dict[str, dict[str, str]], keys: Sequence[str]) -> str:
    return _fernet(keys).encrypt(json.dumps(credentials).encode()).decode()


def decrypt_credentials(token: object, keys: Sequence[str]) -> dict[str, dict[str, str]]:
    """Decrypt a stored credentials token; :class:`CredentialsError` when it isn't one of ours."""
    if not isinstance(token, str):
        raise CredentialsError(
            "credentials", f"stored token must be a str, not {type(token).__name__}"
        )
    try:
        data = json.loads(_fernet(keys).decrypt(token.encode()))
    except (InvalidToken, ValueError, UnicodeError, RecursionError):
        raise CredentialsError(
            "credentials", "cannot decrypt (tampered, or encrypted with an unknown key)"
        ) from None
    if not isinstance(data, dict):
        raise CredentialsError("credentials", "decrypted payload is not a mapping")
    return data
