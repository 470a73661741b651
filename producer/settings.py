"""Settings read from the environment, with the defaults documented in the README."""

from __future__ import annotations

import math
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = [
    "DEFAULT_REDIS_URL",
    "Settings",
    "broker_ssl_options",
    "broker_transport_options",
    "broker_url_from_env",
    "env_flag",
    "env_number",
    "redis_tls_options",
]

N = TypeVar("N", int, float)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def env_number(
    name: str,
    default: N,
    kind: type[N],
    env: Mapping[str, str] | None = None,
    *,
    low: float | None = None,
    high: float | None = None,
) -> N:
    """``name`` from ``env`` (the process environment by default) as ``kind``.

    Unset or blank: ``default``. Not a number, or outside ``[low, high]`` when
    given: ``ValueError`` naming the variable.
    """
    raw = (os.environ if env is None else env).get(name, "").strip()
    if not raw:
        return default
    what = "an integer" if kind is int else "a number"
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name} must be {what}, got {raw!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be {what}, got {raw!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low:g}" if high is None else f"between {low:g} and {high:g}"
        raise ValueError(f"{name} must be {bounds}, got {raw!r}")
    return value


def env_flag(name: str, default: bool, env: Mapping[str, str] | None = None) -> bool:
    """``name`` from ``env`` (the process environment by default) as a switch: ``1`` or ``0``.

    Unset or blank: ``default``. Anything else: ``ValueError`` naming the variable.
    """
    raw = (os.environ if env is None else env).get(name, "").strip()
    if not raw:
        return default
    if raw not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {raw!r}")
    return raw == "1"


_TLS_VARS = (
    ("ssl_ca_certs", "ACTORQ_REDIS_SSL_CA_CERTS"),
    ("ssl_certfile", "ACTORQ_REDIS_SSL_CERTFILE"),
    ("ssl_keyfile", "ACTORQ_REDIS_SSL_KEYFILE"),
    ("ssl_cert_reqs", "ACTORQ_REDIS_SSL_CERT_REQS"),
)


def redis_tls_options(env: Mapping[str, str]) -> dict[str, Any]:
    """redis-py TLS keyword arguments from ``ACTORQ_REDIS_SSL_*`` (used with ``rediss://``)."""
    return {name: env[var] for name, var in _TLS_VARS if env.get(var)}


def broker_url_from_env(env: Mapping[str, str]) -> str:
    """Celery's broker: ``CELERY_BROKER_URL``, else ``REDIS_URL``, in kombu's spelling."""
    given = env.get("CELERY_BROKER_URL")
    url = given or env.get("REDIS_URL") or DEFAULT_REDIS_URL
    return _kombu_url(url, "CELERY_BROKER_URL" if given else "REDIS_URL")


def _kombu_url(url: str, name: str) -> str:
    """``url`` as Celery's broker takes it: a Redis Unix socket in kombu's spelling.

    redis-py (``REDIS_URL``) names a socket ``unix://[:password@]/path[?db=N]``;
    kombu knows no ``unix`` transport (it raised ``KeyError`` on the first send)
    and reads the database of a socket from ``virtual_host``, not ``db``. Other
    URLs pass as they are. ``name``: the variable to name in a ``ValueError``.
    """
    if not url.lower().startswith("unix://"):
        return url
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    extra = sorted(set(query) - {"db"})
    if extra:
        raise ValueError(
            f"{name}: a unix:// broker URL takes only the query parameter db, got {extra[0]!r}"
        )
    db = query.get("db", ["0"])[-1]
    if not db.isdigit():
        raise ValueError(f"{name}: db must be a database number, got {db!r}")
    if not parts.path:
        raise ValueError(f"{name}: a unix:// URL needs the socket's path")
    auth = parts.netloc.rpartition("@")[0]
    return f"redis+socket://{auth + '@' if auth else ''}{parts.path}?virtual_host={db}"


def broker_ssl_options(broker_url: str, env: Mapping[str, str]) -> dict[str, Any] | None:
    """Celery's ``broker_use_ssl`` for a ``rediss://`` broker, else ``None``.

    The same options as the stream store, and the server certificate is verified
    unless ``ACTORQ_REDIS_SSL_CERT_REQS`` says otherwise: kombu on its own would
    connect to ``rediss://`` without verifying anything.
    """
    if not broker_url.lower().startswith("rediss://"):
        return None
    return {"ssl_cert_reqs": "required", **redis_tls_options(env)}


def broker_transport_options(broker_url: str, env: Mapping[str, str]) -> dict[str, Any]:
    """Celery's ``broker_transport_options`` for ``broker_url`` (empty for RabbitMQ).

    Redis broker only (RabbitMQ redelivers as soon as a consumer's connection drops):

    - ``visibility_timeout``: an unacked message reappears after this many seconds.
      It must exceed the longest job (limits.timeout_ms is capped at 24 h), or a
      long job would be delivered again while it runs (harmless, but wasteful).
      Dead workers are found much sooner by the lease sweeper
      (``ACTORQ_SWEEP_INTERVAL_S``), which sends their jobs again itself.
    - ``unacked_restore_interval`` / ``unacked_restore_throttle``: how often a worker
      scans for messages past their visibility timeout (every 10 s, every time).
    - socket options: a broker that vanishes without closing the TCP connection
      (failover, NAT timeout) is noticed instead of hanging a publish forever.
    """
    if not broker_url.lower().startswith(("redis://", "rediss://", "unix://", "redis+socket://")):
        return {}
    return {
        "visibility_timeout": env_number("ACTORQ_VISIBILITY_TIMEOUT_S", 25 * 3600, int, env),
        "unacked_restore_interval": env_number("ACTORQ_UNACKED_RESTORE_INTERVAL_S", 10, int, env),
        "unacked_restore_throttle": 1,
        "socket_timeout": 30,
        "socket_connect_timeout": 5,
        "socket_keepalive": True,
    }


@dataclass(frozen=True)
class Settings:
    """Everything both sides agree on. ``Settings.from_env()`` reads ``ACTORQ_*``."""

    redis_url: str = DEFAULT_REDIS_URL
    broker_url: str = DEFAULT_REDIS_URL
    queue: str = "actorq"
    retention_s: int = 86_400
    max_config_bytes: int = 64 * 1024
    max_message_bytes: int = 256 * 1024
    stream_max_events: int = 100_000
    max_attempts: int = 3
    lease_ttl_s: int = 15
    tail_connections: int = 4
    #: Tails read the streams Redis's key tracking names as changed (else they poll).
    tail_tracking: bool = True
    secret_keys: tuple[str, ...] = field(default=(), repr=False)
    redis_options: dict[str, Any] = field(default_factory=dict, repr=False)
    broker_ssl: dict[str, Any] | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        e = dict(os.environ if env is None else env)
        keys = tuple(k.strip() for k in e.get("ACTORQ_SECRET_KEY", "").split(",") if k.strip())
        broker_url = broker_url_from_env(e)
        return cls(
            redis_url=e.get("REDIS_URL") or DEFAULT_REDIS_URL,
            broker_url=broker_url,
            queue=e.get("ACTORQ_QUEUE") or "actorq",
            retention_s=env_number("ACTORQ_RETENTION_S", 86_400, int, e, low=1),
            max_config_bytes=env_number("ACTORQ_MAX_CONFIG_BYTES", 64 * 1024, int, e, low=1),
            max_message_bytes=env_number("ACTORQ_MAX_MESSAGE_BYTES", 256 * 1024, int, e, low=1),
            stream_max_events=env_number("ACTORQ_STREAM_MAX_EVENTS", 100_000, int, e, low=1),
            max_attempts=env_number("ACTORQ_MAX_ATTEMPTS", 3, int, e, low=1),
            lease_ttl_s=env_number("ACTORQ_LEASE_TTL_S", 15, int, e, low=1),
            tail_connections=max(2, env_number("ACTORQ_TAIL_CONNECTIONS", 4, int, e, low=1)),
            tail_tracking=env_flag("ACTORQ_TAIL_TRACKING", True, e),
            secret_keys=keys,
            redis_options=redis_tls_options(e),
            broker_ssl=broker_ssl_options(broker_url, e),
        )
