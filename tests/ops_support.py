"""Processes the ops tests run: the example router, Flower, the ``actorq`` CLI.

Each is a real subprocess started with the session's stack environment, waited
for with a bounded poll, and stopped by pid (its whole process group).
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Service", "actorq", "basic_auth", "http_get", "http_request"]

ROOT = Path(__file__).resolve().parent.parent


def basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def http_request(
    url: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    """Status and body of one request; HTTP errors are answers, not exceptions."""
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_get(
    url: str, headers: dict[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    return http_request(url, headers=headers, timeout=timeout)


@dataclass
class Service:
    """A long-running ``actorq`` subcommand (router, flower) as a child process."""

    args: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    def start(self) -> Service:
        env = {**os.environ, **self.env, **self.extra_env, "PYTHONPATH": str(ROOT)}
        out = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", *self.args],
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        return self

    def wait_http(self, url: str, timeout: float = 60.0, ok: tuple[int, ...] = (200,)) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.args[0]} exited with {self.proc.returncode}: {self.log()}"
                )
            try:
                status, _ = http_get(url, timeout=2)
                if status in ok:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{url} not answering after {timeout}s: {self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """Gone at once, connections cut (SIGKILL to the process group)."""
        self._signal(signal.SIGKILL, 5)

    def stop(self) -> None:
        self._signal(signal.SIGTERM, 10)

    def _signal(self, sig: int, timeout: float) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None


def actorq(
    *args: str, env: dict[str, str], stdin: str | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run one ``actorq`` command to completion (bounded) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args],
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
