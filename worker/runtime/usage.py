"""Token counts and cost.

Counts come from the provider's ``usage_metadata`` where it reports them;
otherwise from tiktoken, but only when its encoding file is already cached
(tiktoken would download it, which fails offline); otherwise from a heuristic
of one token per four characters (OpenAI's rule of thumb for English).
The source used is recorded on the node, and the fallback logs a warning.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
from decimal import Decimal
from functools import lru_cache
from typing import Any

from producer.config import ModelPrice

__all__ = [
    "ENCODING_URLS",
    "cost_usd",
    "count_tokens",
    "encoding_cache_dir",
    "tiktoken_encoding",
]

log = logging.getLogger("actorq.usage")

ENCODING_URLS = {
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
}
_MILLION = Decimal(1_000_000)


def encoding_cache_dir() -> str:
    """Where tiktoken looks for its files (same rule as tiktoken's own loader)."""
    return (
        os.environ.get("TIKTOKEN_CACHE_DIR")
        or os.environ.get("DATA_GYM_CACHE_DIR")
        or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    )


def _encoding_for(model: str) -> str:
    return (
        "o200k_base"
        if model.startswith(("gpt-4o", "gpt-4.1", "gpt-5", "o1", "o3", "o4"))
        else "cl100k_base"
    )


@lru_cache(maxsize=8)
def _load(name: str, cache_dir: str) -> Any | None:
    path = os.path.join(cache_dir, hashlib.sha1(ENCODING_URLS[name].encode()).hexdigest())
    if not os.path.exists(path):
        return None
    import tiktoken

    try:
        return tiktoken.get_encoding(name)
    except Exception:  # a corrupt cache file must not fail the job
        log.warning("tiktoken encoding %s in %s is unusable", name, cache_dir)
        return None


def tiktoken_encoding(model: str) -> Any | None:
    """The model's tiktoken encoding if it is available offline, else ``None``."""
    return _load(_encoding_for(model), encoding_cache_dir())


def count_tokens(text: str, model: str) -> tuple[int, str]:
    """``(count, source)`` with source ``tiktoken`` or ``heuristic``; never downloads."""
    enc = tiktoken_encoding(model)
    if enc is not None:
        return len(enc.encode(text, disallowed_special=())), "tiktoken"
    return math.ceil(len(text) / 4), "heuristic"


def cost_usd(price: ModelPrice | None, input_tokens: int, output_tokens: int) -> Decimal | None:
    """Cost in USD, or ``None`` when the model has no price (unknown is not free)."""
    if price is None:
        return None
    return (price.input * input_tokens + price.output * output_tokens) / _MILLION
