"""Headless Chromium for the browser tests, driven over the DevTools protocol.

Debian's ``chromium`` package, started with a fresh profile and
``--remote-debugging-port=0``; we talk CDP over its websocket (``websockets``'
sync client). Nothing is downloaded; tests skip when chromium is not installed.
Every wait is bounded and the browser is stopped by pid.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

__all__ = ["Browser", "BrowserError", "Page", "chromium_binary"]

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1600,900",
    "--remote-debugging-port=0",
    "--remote-allow-origins=*",
]


class BrowserError(RuntimeError):
    pass


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Browser:
    """One headless Chromium process with a private profile directory."""

    def __init__(self, binary: str | None = None, *, timeout: float = 30.0) -> None:
        binary = binary or chromium_binary()
        if binary is None:
            raise BrowserError("chromium is not installed")
        self.home = Path(tempfile.mkdtemp(prefix="actorq-chromium-"))
        self.profile = self.home / "profile"
        self.log = open(self.home / "chromium.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._ids = itertools.count(1)
        try:
            self._conn = connect(
                self._ws_url(timeout), max_size=64 * 1024 * 1024, open_timeout=timeout
            )
            self.ws: ClientConnection | None = self._conn.__enter__()
        except BaseException:
            self.close()
            raise

    def _ws_url(self, timeout: float) -> str:
        marker = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrowserError(f"chromium exited with {self.proc.returncode}")
            lines = marker.read_text().split() if marker.exists() else []
            if len(lines) >= 2:
                return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
            time.sleep(0.05)
        raise BrowserError(f"chromium did not open its debugging port within {timeout}s")

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: str | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Send one CDP command and wait (bounded) for its answer; events are skipped."""
        msg_id = next(self._ids)
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        assert self.ws is not None
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrowserError(f"no answer to {method} within {timeout}s")
            try:
                reply = json.loads(self.ws.recv(timeout=remaining))
            except TimeoutError:
                continue
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result

    def new_page(self) -> Page:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})
        page = Page(self, session["sessionId"])
        page.call("Page.enable")
        page.call("Runtime.enable")
        return page

    def close(self) -> None:
        ws, self.ws = getattr(self, "ws", None), None
        if ws is not None:
            with contextlib.suppress(Exception):
                ws.close()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()
        shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class Page:
    """One tab, attached with a flat CDP session."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session

    def call(
        self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0
    ) -> dict[str, Any]:
        return self.browser.call(method, params, session=self.session, timeout=timeout)

    def set_headers(self, headers: dict[str, str]) -> None:
        self.call("Network.enable")
        self.call("Network.setExtraHTTPHeaders", {"headers": headers})

    def navigate(self, url: str, timeout: float = 30.0) -> None:
        result = self.call("Page.navigate", {"url": url}, timeout=timeout)
        if result.get("errorText"):
            raise BrowserError(f"navigating to {url}: {result['errorText']}")
        self.wait_for("document.readyState === 'complete'", timeout=timeout)

    def evaluate(self, expression: str, timeout: float = 30.0) -> Any:
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            timeout=timeout,
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, interval: float = 0.1) -> Any:
        """Poll a JS expression until it is truthy; its value, or BrowserError at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() >= deadline:
                raise BrowserError(f"timed out after {timeout}s waiting for: {expression}")
            time.sleep(interval)

    def screenshot(self, path: Path, *, full_page: bool = False) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.call("Page.getLayoutMetrics")["cssContentSize"]
            params["captureBeyondViewport"] = True
            params["clip"] = {
                "x": 0,
                "y": 0,
                "width": size["width"],
                "height": size["height"],
                "scale": 1,
            }
        data = self.call("Page.captureScreenshot", params)
        path.write_bytes(base64.b64decode(data["data"]))
        return path
