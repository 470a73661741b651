"""Remove credential values from any text before it reaches a log, stream or record.

Provider error bodies echo the key they were given (OpenAI's 401 does), so every
error text passes through :func:`scrub` with the run's secrets.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping

__all__ = ["REDACTED", "scrub", "secret_values"]

REDACTED = "[redacted]"
# Key-shaped strings, caught even when we were not told the value (e.g. a key in a config URL).
_KEY_SHAPES = re.compile(r"\b(sk-[A-Za-z0-9_\-]{8,}|Bearer\s+[A-Za-z0-9_\-.=]{8,})")


def secret_values(credentials: Mapping[str, Mapping[str, str]]) -> list[str]:
    """Every credential value worth hiding (base URLs are not secrets)."""
    return [
        v
        for fields in credentials.values()
        for k, v in fields.items()
        if k != "base_url" and isinstance(v, str) and v
    ]


def _forms(secret: str) -> Iterable[str]:
    yield secret
    yield base64.b64encode(secret.encode()).decode().rstrip("=")
    if len(secret) >= 12:
        yield secret[:12]


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    for secret in sorted(set(secrets), key=len, reverse=True):
        for form in _forms(secret):
            if form:
                text = text.replace(form, REDACTED)
    return _KEY_SHAPES.sub(REDACTED, text)
