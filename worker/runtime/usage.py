"""Token counts and cost.

Counts come from the provider's ``usage_metadata`` where it reports them;
otherwise from tiktoken, but only from an encoding file already in the cache
directory (``TIKTOKEN_CACHE_DIR``); otherwise from a heuristic of one token per
four characters (OpenAI's rule of thumb for English). The source used is
recorded on the node, and the heuristic logs a warning.

Nothing here downloads. tiktoken's own loader re-downloads a cache file whose
hash does not match, so the runtime never calls it: it checks the file's
SHA-256 against the published one and builds the ``tiktoken.Encoding`` from
the file itself. ``actorq tiktoken-fetch`` (:func:`fetch_encodings`) fills the
cache for images built with network access, under the same file names
tiktoken uses (SHA-1 of the canonical URL), so tiktoken itself finds them too.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import os
import tempfile
import threading
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from producer.config import ModelPrice

__all__ = [
    "ENCODINGS",
    "EncodingFetchError",
    "EncodingSpec",
    "cache_path",
    "cost_usd",
    "count_tokens",
    "encoding_cache_dir",
    "encoding_name",
    "fetch_encodings",
    "register_encoding",
    "tiktoken_encoding",
    "warn_heuristic",
]

log = logging.getLogger("actorq.usage")
_MILLION = Decimal(1_000_000)
_ENDOFTEXT = "<|endoftext|>"
_ENDOFPROMPT = "<|endofprompt|>"


@dataclass(frozen=True)
class EncodingSpec:
    """A tiktoken encoding: where its file is published, its hash, and how it splits text."""

    name: str
    url: str
    sha256: str
    pat_str: str
    special_tokens: Mapping[str, int] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


# The two encodings of current OpenAI chat models (values as published with tiktoken).
ENCODINGS: dict[str, EncodingSpec] = {
    "cl100k_base": EncodingSpec(
        "cl100k_base",
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
        {
            _ENDOFTEXT: 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            _ENDOFPROMPT: 100276,
        },
    ),
    "o200k_base": EncodingSpec(
        "o200k_base",
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        "|".join(
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        {_ENDOFTEXT: 199999, _ENDOFPROMPT: 200018},
    ),
}
_DEFAULT_ENCODING = "cl100k_base"
_MODEL_ENCODINGS: dict[str, str] = {}
_loaded: dict[tuple[str, str, str], Any] = {}
_lock = threading.Lock()


def register_encoding(spec: EncodingSpec, models: Iterable[str] = ()) -> None:
    """Add an encoding (e.g. a self-hosted model's vocabulary in tiktoken format).

    ``models`` are exact model names that count with it.
    """
    ENCODINGS[spec.name] = spec
    for model in models:
        _MODEL_ENCODINGS[model] = spec.name


def encoding_cache_dir() -> str:
    """Where tiktoken looks for its files (same rule as tiktoken's own loader)."""
    return (
        os.environ.get("TIKTOKEN_CACHE_DIR")
        or os.environ.get("DATA_GYM_CACHE_DIR")
        or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    )


def cache_path(spec: EncodingSpec, cache_dir: str | None = None) -> str:
    """The cache file of ``spec``: tiktoken names it by the SHA-1 of the canonical URL."""
    key = hashlib.sha1(spec.url.encode()).hexdigest()
    return os.path.join(cache_dir or encoding_cache_dir(), key)


def encoding_name(model: str) -> str:
    """The encoding a model counts with: registered, else tiktoken's table, else cl100k_base.

    Models tiktoken does not know (self-hosted ones) get ``cl100k_base``: an
    approximation, but far closer than characters / 4.
    """
    registered = _MODEL_ENCODINGS.get(model)
    if registered in ENCODINGS:
        return registered
    from tiktoken.model import encoding_name_for_model

    try:
        name = encoding_name_for_model(model)
    except KeyError:
        return _DEFAULT_ENCODING
    return name if name in ENCODINGS else _DEFAULT_ENCODING


def _parse_ranks(data: bytes) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _load(spec: EncodingSpec, cache_dir: str) -> Any | None:
    path = cache_path(spec, cache_dir)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if hashlib.sha256(data).hexdigest() != spec.sha256:
        _warn_once(
            f"tiktoken file {path} for {spec.name} does not match its published hash; ignored"
        )
        return None
    import tiktoken

    try:
        return tiktoken.Encoding(
            name=spec.name,
            pat_str=spec.pat_str,
            mergeable_ranks=_parse_ranks(data),
            special_tokens=dict(spec.special_tokens),
        )
    except Exception as exc:  # a malformed file must not fail the job
        _warn_once(f"tiktoken file {path} for {spec.name} is unusable: {exc}")
        return None


def tiktoken_encoding(model: str) -> Any | None:
    """The model's tiktoken encoding if its file is in the cache, else ``None``.

    Loaded encodings are kept for the process; a missing file is looked for
    again next time (it may be fetched meanwhile).
    """
    spec = ENCODINGS[encoding_name(model)]
    key = (spec.name, spec.sha256, encoding_cache_dir())
    enc = _loaded.get(key)
    if enc is None:
        enc = _load(spec, key[2])
        if enc is not None:
            with _lock:
                _loaded[key] = enc
    return enc


def count_tokens(text: str, model: str) -> tuple[int, str]:
    """``(count, source)`` with source ``tiktoken`` or ``heuristic``; never downloads."""
    enc = tiktoken_encoding(model)
    if enc is not None:
        return len(enc.encode(text, disallowed_special=())), "tiktoken"
    return math.ceil(len(text) / 4), "heuristic"


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def warn_heuristic(model: str) -> None:
    """Warn (once per model and process) that token counts are estimates."""
    _warn_once(
        f"model {model}: no provider usage and no offline tiktoken encoding; "
        "estimating tokens as ceil(characters / 4)"
    )


def cost_usd(price: ModelPrice | None, input_tokens: int, output_tokens: int) -> Decimal | None:
    """Cost in USD, or ``None`` when the model has no price (unknown is not free)."""
    if price is None:
        return None
    return (price.input * input_tokens + price.output * output_tokens) / _MILLION


class EncodingFetchError(Exception):
    """An encoding file could not be fetched, or did not match its published hash."""


def fetch_encodings(
    names: Iterable[str] | None = None,
    *,
    base_url: str | None = None,
    cache_dir: str | None = None,
    timeout: float = 60.0,
) -> list[str]:
    """Download encoding files into the cache; return the paths written.

    ``base_url`` replaces the publisher's folder (a mirror serving the same file
    names). Every file is checked against its published SHA-256 before it is
    written (atomically), so a bad mirror or a cut download leaves nothing.
    """
    target = cache_dir or encoding_cache_dir()
    wanted = list(names) if names is not None else ["cl100k_base", "o200k_base"]
    for name in wanted:
        if name not in ENCODINGS:
            raise EncodingFetchError(f"unknown encoding {name!r} ({', '.join(sorted(ENCODINGS))})")
    written = []
    os.makedirs(target, exist_ok=True)
    for name in wanted:
        spec = ENCODINGS[name]
        url = spec.url if base_url is None else f"{base_url.rstrip('/')}/{spec.filename}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                data = resp.read()
        except OSError as exc:
            raise EncodingFetchError(f"{name}: cannot download {url}: {exc}") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != spec.sha256:
            raise EncodingFetchError(
                f"{name}: {url} has SHA-256 {digest}, expected {spec.sha256}; not written"
            )
        path = cache_path(spec, target)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        written.append(path)
    return written
