"""Settings read from the environment, with the defaults documented in the README."""

from __future__ import annotations

import math
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

__all__ = [
    "DEFAULT_REDIS_URL",
    "Settings",
    "broker_from_env",
    "broker_ssl_options",
    "broker_transport_options",
    "env_flag",
    "env_number",
    "kombu_broker_url",
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


def broker_from_env(env: Mapping[str, str]) -> tuple[str, dict[str, Any] | None]:
    """Celery's broker URL and ``broker_use_ssl``: ``CELERY_BROKER_URL``, else ``REDIS_URL``.

    The URL is put in the form kombu takes (see :func:`kombu_broker_url`); the TLS
    options are those of :func:`broker_ssl_options`.
    """
    given = env.get("CELERY_BROKER_URL")
    url = given or env.get("REDIS_URL") or DEFAULT_REDIS_URL
    name = "CELERY_BROKER_URL" if given else "REDIS_URL"
    return kombu_broker_url(url, name), broker_ssl_options(url, env)


def _redis_query(url: str) -> tuple[urllib.parse.SplitResult, dict[str, str]]:
    parts = urllib.parse.urlsplit(url)
    return parts, dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))


def kombu_broker_url(url: str, name: str = "CELERY_BROKER_URL") -> str:
    """A Redis URL as the broker takes it; other brokers' URLs pass as they are.

    A ``REDIS_URL`` may carry redis-py's options in its query (``socket_timeout``,
    ``protocol``, ``db``...): kombu hands them to its own connection class, which
    refused them (``TypeError``: no enqueue, no worker), and takes a URL's
    ``ssl_*`` options over ``broker_use_ssl`` whole. The broker keeps the host,
    credentials and database (a query's ``db`` moved into the path) and has its
    timeouts from :func:`broker_transport_options`; ``ssl_*`` go to
    :func:`broker_ssl_options`. A Unix socket (``unix://[:password@]/path[?db=N]``,
    redis-py's spelling, which kombu does not know) becomes kombu's
    ``redis+socket:///path?virtual_host=N``. ``name``: the variable a
    ``ValueError`` names.
    """
    scheme = url.partition("://")[0].lower()
    if scheme not in ("redis", "rediss", "unix"):
        return url
    parts, query = _redis_query(url)
    db = query.get("db", "")
    if db and not db.isdigit():
        raise ValueError(f"{name}: db must be a database number, got {db!r}")
    if scheme == "unix":
        if not parts.path:
            raise ValueError(f"{name}: a unix:// URL needs the socket's path")
        auth = parts.netloc.rpartition("@")[0]
        return f"redis+socket://{auth + '@' if auth else ''}{parts.path}?virtual_host={db or 0}"
    path = f"/{db}" if db else parts.path if parts.path.strip("/") else "/0"  # as redis-py
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def broker_ssl_options(broker_url: str, env: Mapping[str, str]) -> dict[str, Any] | None:
    """Celery's ``broker_use_ssl`` for a ``rediss://`` broker, else ``None``.

    The same options as the stream store (``ACTORQ_REDIS_SSL_*``, then the URL's
    own ``ssl_*`` query options, as redis-py would take them), and the server
    certificate is verified unless one of them says otherwise: kombu on its own
    would connect to ``rediss://`` without verifying anything.
    """
    if not broker_url.lower().startswith("rediss://"):
        return None
    in_url = {k: v for k, v in _redis_query(broker_url)[1].items() if k.startswith("ssl_")}
    return {"ssl_cert_reqs": "required", **redis_tls_options(env), **in_url}


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


def _masked(url: str) -> str:
    """``url`` with its password, if any, as ``***``."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user, _, host = parts.netloc.rpartition("@")
    name = user.partition(":")[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{name}:***@{host}"))


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

    def __repr__(self) -> str:
        # The URLs' passwords masked: a logged Settings, or one in an error report's
        # frame locals, must not carry them (the keys and TLS options are left out).
        shown = {
            f.name: _masked(v) if f.name.endswith("_url") else v
            for f in fields(self)
            if f.repr
            for v in [getattr(self, f.name)]
        }
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        e = dict(os.environ if env is None else env)
        keys = tuple(k.strip() for k in e.get("ACTORQ_SECRET_KEY", "").split(",") if k.strip())
        broker_url, broker_ssl = broker_from_env(e)
        redis_url = e.get("REDIS_URL") or DEFAULT_REDIS_URL
        return cls(
            redis_url=redis_url,
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
            # TLS options on a plain connection are a TypeError on its first command.
            redis_options=redis_tls_options(e) if redis_url.lower().startswith("rediss://") else {},
            broker_ssl=broker_ssl,
        )
