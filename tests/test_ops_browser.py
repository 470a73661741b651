"""Headless Chromium end to end: the SSE page survives a dropped connection; Flower shows a job.

Skipped only when Debian's ``chromium`` is not installed (``.ci/run`` installs it).
Screenshots are saved under the test's tmp dir and their paths printed.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest

from ops.stack import free_port
from producer import Client
from tests.browser_support import Browser, chromium_binary
from tests.helpers import scripted
from tests.ops_support import ROOT, Service, basic_auth, http_get, http_request

pytestmark = [
    pytest.mark.usefixtures("workers"),
    pytest.mark.skipif(chromium_binary() is None, reason="chromium is not installed"),
]

WORDS = [f"w{i:02d}" for i in range(60)]
REPLY = " ".join(WORDS) + "."


@pytest.fixture(scope="module")
def shots() -> Path:
    """Screenshots outlive pytest's rotating tmp dirs: ACTORQ_SCREENSHOT_DIR or .artifacts/."""
    path = Path(os.environ.get("ACTORQ_SCREENSHOT_DIR") or ROOT / ".artifacts" / "screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def browser() -> object:
    with Browser() as b:
        yield b


def test_sse_page_gets_every_token_once_across_a_dropped_connection(
    browser: Browser, stack_env: dict[str, str], client: Client, tmp_path: Path, shots: Path
) -> None:
    config = tmp_path / "actor.json"
    config.write_text(json.dumps(scripted(REPLY, first_token_delay_ms=200, token_delay_ms=60)))
    port = free_port()
    env = {**stack_env, "ACTORQ_ROUTER_CONFIG": str(config), "ACTORQ_SSE_HEARTBEAT_S": "1"}
    router = Service(["router", "--port", str(port)], env, tmp_path / "router.log").start()
    base = f"http://127.0.0.1:{port}"
    try:
        router.wait_http(f"{base}/healthz")
        page = browser.new_page()
        page.navigate(f"{base}/?message=hello")
        job_id = page.wait_for("window.actorq.tokens >= 8 && window.actorq.jobId", timeout=30)
        assert not page.evaluate("window.actorq.done"), "the job ended before the disconnect"
        # Cut every connection at once: the router process dies mid-stream.
        router.kill()
        cut_at = page.evaluate("window.actorq.tokens")
        router = Service(["router", "--port", str(port)], env, tmp_path / "router.log").start()
        router.wait_http(f"{base}/healthz")
        page.wait_for("window.actorq.done", timeout=60)
        state = page.evaluate("window.actorq")
        shot = page.screenshot(shots / "sse-page.png")
        print(f"\nSSE page screenshot: {shot}")
    finally:
        router.stop()

    record = client.wait_result(job_id, timeout=30)
    assert record.status.value == "succeeded"
    assert state["status"] == "succeeded"
    assert state["opens"] >= 2, "EventSource never reconnected"
    assert state["errors"] >= 1
    assert cut_at < len(WORDS)
    # The whole text, each token once, in the stream's order.
    assert state["text"] == REPLY == record.result.text
    all_ids = [e.id for e in client.stream_events(job_id, timeout=10)]
    assert state["ids"] == all_ids
    assert len(set(state["ids"])) == len(state["ids"])
    assert page.evaluate("document.getElementById('out').textContent") == REPLY


def test_router_http_contract(stack_env: dict[str, str], client: Client, tmp_path: Path) -> None:
    """Status codes a router's clients rely on: 202 start, 400/404 bad input, 204 after the end."""
    config = tmp_path / "actor.json"
    config.write_text(json.dumps(scripted("alpha beta gamma")))
    port = free_port()
    env = {**stack_env, "ACTORQ_ROUTER_CONFIG": str(config)}
    router = Service(["router", "--port", str(port)], env, tmp_path / "router.log").start()
    base = f"http://127.0.0.1:{port}"
    try:
        router.wait_http(f"{base}/healthz")
        status, body = http_request(f"{base}/jobs", method="POST", data=b'{"message": "hi"}')
        assert status == 202
        job_id = json.loads(body)["job_id"]
        client.wait_result(job_id, timeout=30)
        status, body = http_get(f"{base}/jobs/{job_id}/events")
        assert status == 200
        frames = body.decode()
        assert frames.startswith("retry: 1000\n\n")
        assert "event: done\n" in frames and '"status":"succeeded"' in frames
        ids = [line[4:] for line in frames.splitlines() if line.startswith("id: ")]
        done_id = ids[-1]
        # Resume in the middle: only the later frames.
        status, body = http_get(f"{base}/jobs/{job_id}/events", {"Last-Event-ID": ids[1]})
        later = [line[4:] for line in body.decode().splitlines() if line.startswith("id: ")]
        assert status == 200 and later == ids[2:]
        # After the end: 204, so EventSource stops reconnecting.
        assert http_get(f"{base}/jobs/{job_id}/events", {"Last-Event-ID": done_id})[0] == 204
        assert http_get(f"{base}/jobs/{job_id}/events?after=junk")[0] == 400
        assert http_get(f"{base}/jobs/nope/events")[0] == 404
        assert http_get(f"{base}/jobs/bad%20id/events")[0] in (400, 404)
        status, body = http_get(f"{base}/jobs/{job_id}")
        assert status == 200 and json.loads(body)["status"] == "succeeded"
        assert http_request(f"{base}/jobs", method="POST", data=b"[1]")[0] == 400
        assert http_request(f"{base}/jobs", method="POST", data=b"{nope")[0] == 400
        status, body = http_request(f"{base}/jobs/{job_id}/cancel", method="POST")
        assert status == 200 and json.loads(body)["outcome"] == "finished"
        # Still serving the next job after the bad inputs.
        status, body = http_request(f"{base}/jobs", method="POST", data=b'{"message": "again"}')
        assert status == 202
        assert (
            client.wait_result(json.loads(body)["job_id"], timeout=30).status.value == "succeeded"
        )
    finally:
        router.stop()


FLOWER_USER, FLOWER_PASSWORD = "ops", "flower-" + uuid.uuid4().hex[:8]


def test_flower_shows_a_finished_job_and_stays_locked(
    browser: Browser, stack_env: dict[str, str], client: Client, tmp_path: Path, shots: Path
) -> None:
    port = free_port()
    env = {**stack_env, "FLOWER_BASIC_AUTH": f"{FLOWER_USER}:{FLOWER_PASSWORD}"}
    flower = Service(
        ["flower", "--port", str(port), "--read-only", "--url-prefix", "flower"],
        env,
        tmp_path / "flower.log",
    ).start()
    base = f"http://127.0.0.1:{port}/flower"
    auth = {"Authorization": basic_auth(FLOWER_USER, FLOWER_PASSWORD)}
    prompt = f"secret prompt {uuid.uuid4().hex}"
    try:
        flower.wait_http(f"{base}/healthcheck", timeout=60)
        # Flower only knows tasks whose events it received: retry until one shows (bounded).
        job_id = None
        for _ in range(4):
            candidate = client.enqueue_actor_job(
                scripted("flower can see this job"),
                prompt,
                credentials={"openai": {"api_key": "sk-flower-test-" + uuid.uuid4().hex}},
            )
            client.wait_result(candidate, timeout=30)
            if _flower_has(base, auth, candidate, timeout=10):
                job_id = candidate
                break
        assert job_id is not None, f"Flower never showed a job: {flower.log()}"

        page = browser.new_page()
        page.set_headers(auth)
        page.navigate(f"{base}/tasks")
        page.wait_for("document.querySelector('#tasks-table_filter input')", timeout=20)
        page.evaluate("document.querySelector('#tasks-table_filter input').focus()")
        page.call("Input.insertText", {"text": job_id})
        row = page.wait_for(
            f"[...document.querySelectorAll('#tasks-table tbody tr')].map(r => r.innerText)"
            f".find(t => t.includes('{job_id}'))",
            timeout=20,
        )
        assert "tester" in row and "succeeded" in row and "SUCCESS" in row
        shot = page.screenshot(shots / "flower-tasks.png")
        print(f"\nFlower tasks screenshot: {shot}")

        href = page.evaluate(
            f"[...document.querySelectorAll('#tasks-table tbody tr')]"
            f".find(r => r.innerText.includes('{job_id}')).querySelector('a[href*=\"/task/\"]').href"
        )
        page.navigate(href)
        text = page.wait_for("document.querySelector('#task-page') && document.body.innerText")
        for expected in (job_id, "tester", "Attempt", "succeeded · attempt 1", "Runtime", "Worker"):
            assert expected in text, expected
        shot = page.screenshot(shots / "flower-task.png", full_page=True)
        print(f"Flower task screenshot: {shot}")
        html = page.evaluate("document.documentElement.outerHTML")
        assert prompt not in html and "sk-flower-test" not in html

        # Locked: no page without credentials; read-only refuses control actions.
        assert http_get(f"{base}/tasks")[0] == 401
        assert http_get(f"{base}/api/tasks")[0] == 401
        uuid_ = href.rsplit("/", 1)[-1]
        for path in (
            f"/api/task/revoke/{uuid_}",
            "/api/worker/shutdown/nobody@nowhere",
            "/api/worker/pool/shrink/nobody@nowhere",
            "/api/task/async-apply/actorq.run_job",
        ):
            status, body = http_request(f"{base}{path}", method="POST", headers=auth, data=b"{}")
            assert status == 403, (path, status, body)
        # Flower's /metrics has no authentication (documented: keep the port internal).
        assert http_get(f"{base}/metrics")[0] == 200
    finally:
        flower.stop()


def _flower_has(base: str, auth: dict[str, str], job_id: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = http_get(f"{base}/api/tasks?search={job_id}", auth)
        if status == 200 and any(t.get("state") == "SUCCESS" for t in json.loads(body).values()):
            return True
        time.sleep(0.3)
    return False
