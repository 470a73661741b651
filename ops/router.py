"""An example router: start a job over HTTP, stream it to a browser as SSE, cancel it.

Run it with ``actorq router`` (or ``uvicorn ops.router:app``) next to a worker;
install the ``router`` extra (Starlette + uvicorn). It is the smallest honest
router: the actor config is the server's (``ACTORQ_ROUTER_CONFIG``, a JSON file;
default: the scripted demo actor), never the browser's, and so are provider
credentials (``ACTORQ_ROUTER_CREDENTIALS``, a JSON file) — a browser only sends
the message.

============================  ===============================================
``GET /``                     a page that starts a job and shows its tokens
``POST /jobs``                ``{"message": "..."}`` -> 202 ``{"job_id", "events", "cancel"}``
``GET /jobs/{id}``            the job's status and record (JSON)
``GET /jobs/{id}/events``     SSE; resumes after ``Last-Event-ID`` (or ``?after=``)
``POST /jobs/{id}/cancel``    ``{"outcome": ...}``
``GET /healthz``              ``ok``
============================  ===============================================
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from producer import Client, InvalidInput, JobNotFound, Settings, sse
from producer.gctune import tuned_gc
from producer.settings import env_number

__all__ = ["app", "create_app", "demo_actor", "serve"]

PAGE = Path(__file__).with_name("router_page.html")
MAX_BODY = 300_000


def demo_actor() -> dict[str, Any]:
    """The default actor: the scripted model, slow enough to watch the tokens arrive."""
    return {
        "type": "llm",
        "name": "demo",
        "provider": "scripted",
        "first_token_delay_ms": 100,
        "token_delay_ms": float(os.environ.get("ACTORQ_ROUTER_TOKEN_DELAY_MS", "60")),
    }


def _load_json(var: str) -> Any:
    path = os.environ.get(var)
    return json.loads(Path(path).read_text()) if path else None


def create_app(client: Client | None = None) -> Starlette:
    """The router app; ``client`` defaults to one built from the environment."""
    state: dict[str, Any] = {"client": client}
    config = _load_json("ACTORQ_ROUTER_CONFIG") or demo_actor()
    credentials = _load_json("ACTORQ_ROUTER_CREDENTIALS")
    # Checked here, at start: a bad value would otherwise fail every stream request.
    heartbeat_s = env_number("ACTORQ_SSE_HEARTBEAT_S", 15.0, float, low=0.05, high=3600)

    def get_client() -> Client:
        if state["client"] is None:
            state["client"] = Client(Settings.from_env())
        c: Client = state["client"]
        return c

    async def page(_: Request) -> Response:
        return HTMLResponse(PAGE.read_text())

    async def health(_: Request) -> Response:
        return PlainTextResponse("ok")

    async def start(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_BODY:
            return _error(413, "body", "too large")
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            return _error(400, "body", "not JSON")
        if not isinstance(data, dict) or not isinstance(data.get("message"), str):
            return _error(400, "message", "a JSON object with a string 'message' is required")
        try:
            job_id = await asyncio.to_thread(
                get_client().enqueue_actor_job, config, data["message"], credentials=credentials
            )
        except InvalidInput as exc:
            return _error(400, exc.field, str(exc))
        return JSONResponse(
            {
                "job_id": job_id,
                "events": f"jobs/{job_id}/events",
                "cancel": f"jobs/{job_id}/cancel",
            },
            status_code=202,
        )

    async def status(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        try:
            record = await asyncio.to_thread(_record, get_client(), job_id)
        except (JobNotFound, InvalidInput) as exc:
            return _error(404, "job_id", str(exc))
        return Response(record, media_type="application/json")

    async def events(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        client = get_client()
        try:
            cursor = sse.resume_cursor(
                request.headers.get("last-event-id"), request.query_params.get("after")
            )
            finished = await asyncio.to_thread(sse.stream_finished, client, job_id, cursor)
        except JobNotFound as exc:
            return _error(404, "job_id", str(exc))
        except InvalidInput as exc:
            return _error(400, exc.field, str(exc))
        if finished:
            return Response(status_code=204)  # EventSource stops reconnecting
        return StreamingResponse(
            sse.astream_sse(client, job_id, after=cursor, heartbeat_s=heartbeat_s),
            media_type=sse.MEDIA_TYPE,
            headers=sse.HEADERS,
        )

    async def cancel(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        try:
            outcome = await asyncio.to_thread(get_client().cancel_job, job_id)
        except (JobNotFound, InvalidInput) as exc:
            return _error(404, "job_id", str(exc))
        return JSONResponse({"job_id": job_id, "outcome": outcome.value})

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        # One loop forwards every client's tokens: a full collection would stop
        # them all. The set-up (imports, the client) is frozen out of collections.
        get_client()
        with tuned_gc():
            yield

    return Starlette(
        lifespan=lifespan,
        routes=[
            Route("/", page),
            Route("/healthz", health),
            Route("/jobs", start, methods=["POST"]),
            Route("/jobs/{job_id}", status),
            Route("/jobs/{job_id}/events", events),
            Route("/jobs/{job_id}/cancel", cancel, methods=["POST"]),
        ]
    )


def _record(client: Client, job_id: str) -> str:
    from .commands import job_record

    return job_record(client, job_id).model_dump_json()


def _error(code: int, field: str, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=code)


#: ``uvicorn ops.router:app``. Building it opens no connection (the client is lazy).
app = create_app()


def serve(host: str = "127.0.0.1", port: int = 8000) -> int:
    """Run the router with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    return 0
