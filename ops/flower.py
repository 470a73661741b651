"""``actorq flower``: Flower on the configured broker, locked down, showing jobs as jobs.

- **Authentication is required.** Basic auth comes from ``--basic-auth user:pass``
  (repeatable) or ``FLOWER_BASIC_AUTH`` / ``ACTORQ_FLOWER_BASIC_AUTH``
  (``user:pass[,user2:pass2]``); it reaches Flower through its environment, never
  its command line (which ``ps`` shows). OAuth users set ``FLOWER_AUTH`` and the
  ``FLOWER_OAUTH2_*`` variables Flower documents. Without any, ``actorq flower``
  refuses to start, unless told the deployment is local (``--local`` or
  ``ACTORQ_FLOWER_LOCAL=1``), which also binds it to 127.0.0.1 by default.
- **Read-only** (``--read-only`` / ``ACTORQ_FLOWER_READ_ONLY=1``): Flower's own
  ``read_only`` option (Flower >= 2.2): every control endpoint (revoke, terminate,
  pool resize, shutdown, apply / send task, rate limit, ...) answers 403.
- **URL prefix** (``--url-prefix``) for a reverse proxy serving it under a path.
- **Jobs shown as jobs.** :func:`format_task` (installed through the Flower config
  file ``ops/flowerconf.py``) names each task "actor · job id" and adds the job's
  actorq status and attempt, read from its record. The task's arguments are only
  the job id and actor name, so no page shows a credential or the prompt.

Flower's ``/metrics`` and ``/healthcheck`` answer without authentication: keep
Flower's port internal and expose only the authenticated pages through a proxy
that blocks ``/metrics`` (see the README).
"""

from __future__ import annotations

import os
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from producer.schema import parse_task_args

__all__ = [
    "FlowerConfigError",
    "FlowerOptions",
    "flower_command",
    "format_task",
]

_TRUE = ("1", "true", "yes", "on")
CONF_FILE = Path(__file__).with_name("flowerconf.py")


class FlowerConfigError(ValueError):
    """``actorq flower`` was asked to start in an unsafe or invalid way."""


@dataclass
class FlowerOptions:
    port: int = 5555
    address: str | None = None
    basic_auth: list[str] = field(default_factory=list)
    local: bool = False
    read_only: bool = False
    url_prefix: str = ""
    extra: list[str] = field(default_factory=list)


def _env_true(env: dict[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in _TRUE


def flower_command(
    opts: FlowerOptions, env: dict[str, str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """The Flower command line and environment for ``opts``; refuses unsafe setups.

    Raises :class:`FlowerConfigError` when no authentication is configured and
    the deployment was not declared local, or when an option is malformed.
    """
    env = dict(os.environ if env is None else env)
    auth = list(opts.basic_auth)
    for var in ("ACTORQ_FLOWER_BASIC_AUTH", "FLOWER_BASIC_AUTH"):
        auth += [a for a in env.pop(var, "").split(",") if a.strip()]
    for cred in auth:
        user, sep, password = cred.partition(":")
        if not sep or not user or not password:
            raise FlowerConfigError("basic auth must be user:password with both parts non-empty")
        if "," in cred:  # Flower splits its list of logins on commas: "a:b,c" lets "c" in
            raise FlowerConfigError("basic auth user and password can't contain ','")
    oauth = bool(env.get("FLOWER_AUTH"))
    local = opts.local or _env_true(env, "ACTORQ_FLOWER_LOCAL")
    if not auth and not oauth and not local:
        raise FlowerConfigError(
            "refusing to start Flower without authentication: give --basic-auth user:password "
            "(or FLOWER_BASIC_AUTH / ACTORQ_FLOWER_BASIC_AUTH, or FLOWER_AUTH for OAuth), "
            "or --local (ACTORQ_FLOWER_LOCAL=1) for a dashboard on this machine only"
        )
    prefix = opts.url_prefix.strip("/")
    if prefix and not all(
        part.isascii() and part.replace("-", "").replace("_", "").replace(".", "").isalnum()
        for part in prefix.split("/")
    ):
        raise FlowerConfigError(f"url prefix {opts.url_prefix!r}: use letters, digits, - _ . and /")
    if not 0 < opts.port < 65536:
        raise FlowerConfigError(f"port {opts.port} is out of range")
    address = (
        opts.address
        if opts.address is not None
        else ("127.0.0.1" if local and not auth else "0.0.0.0")
    )
    if auth:
        env["FLOWER_BASIC_AUTH"] = ",".join(auth)
    read_only = opts.read_only or _env_true(env, "ACTORQ_FLOWER_READ_ONLY")
    argv = [
        sys.executable,
        "-m",
        "celery",
        "--config",
        "celeryconfig",
        "flower",
        f"--conf={CONF_FILE}",
        f"--port={opts.port}",
        f"--address={address}",
    ]
    if read_only:
        argv.append("--read_only=true")
    if prefix:
        argv.append(f"--url_prefix={prefix}")
    argv += list(opts.extra)
    return argv, env


def run_flower(opts: FlowerOptions) -> int:
    """Replace this process with Flower (signals then reach it directly)."""
    try:
        argv, env = flower_command(opts)
    except FlowerConfigError as exc:
        print(f"actorq: {exc}", file=sys.stderr)
        return 2
    if opts.local and not opts.basic_auth and "FLOWER_BASIC_AUTH" not in env:
        print("actorq: Flower without authentication (--local): this machine only", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)
    return 0  # pragma: no cover - execve does not return


# -- the task formatter Flower calls for every task it renders ----------------------

_CACHE_MAX = 10_000
_cache: OrderedDict[str, tuple[float, dict[str, str]]] = OrderedDict()
_redis: Any = None
_down_until = 0.0  # after a Redis error, skip lookups for a while: pages stay fast
_EXTRA_FIELDS = ("job_id", "actor", "job_status", "attempt")


def _job_info(job_id: str) -> dict[str, str]:
    """status / attempt / actor / worker of a job, cached (ended jobs for longer)."""
    global _redis
    now = time.monotonic()
    hit = _cache.get(job_id)
    if hit is not None and hit[0] > now:
        return hit[1]
    if now < _down_until:
        return {}
    from producer import keys
    from producer.settings import Settings

    if _redis is None:
        import redis

        s = Settings.from_env()
        _redis = redis.Redis.from_url(
            s.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5, **s.redis_options
        )
    if not keys.valid_job_id(job_id):
        return {}
    values = _redis.hmget(keys.job_key(job_id), "status", "attempt", "actor", "worker")
    info = {
        k: v.decode()
        for k, v in zip(("status", "attempt", "actor", "worker"), values, strict=True)
        if v is not None
    }
    ended = info.get("status") in (
        "succeeded",
        "failed",
        "cancelled",
        "timed_out",
        "limit_exceeded",
    )
    _cache[job_id] = (now + (3600.0 if ended else 1.0), info)
    _cache.move_to_end(job_id)
    while len(_cache) > _CACHE_MAX:
        _cache.popitem(last=False)
    return info


def format_task(task: Any) -> Any:
    """Show an actorq task as "actor · job id", with the job's status and attempt.

    Flower passes a copy of its task object; the extra attributes appear on the
    task page (``_fields`` lists what it renders) and in the tasks table's data.
    """
    found = parse_task_args(getattr(task, "args", None))
    if found is None:
        return task
    job_id, actor = found
    try:
        info = _job_info(job_id)
    except Exception:  # Redis away: still show the job by its id, and stop asking for 5 s
        global _down_until
        _down_until = time.monotonic() + 5.0
        info = {}
    actor = actor or info.get("actor", "")
    task.name = f"{actor or '?'} · {job_id}"
    task.job_id = job_id
    task.actor = actor
    task.job_status = info.get("status")
    task.attempt = int(info["attempt"]) if info.get("attempt", "").isdigit() else None
    if task.job_status:
        attempt = f" · attempt {task.attempt}" if task.attempt else ""
        task.result = f"{task.job_status}{attempt}"
    task._fields = (*type(task)._fields, *_EXTRA_FIELDS)
    return task


def extra_args(extra: Sequence[str]) -> list[str]:
    """Extra Flower options, with a leading ``--`` separator dropped."""
    items = list(extra)
    return items[1:] if items[:1] == ["--"] else items
