"""An OpenAI-compatible chat-completions server on 127.0.0.1 for tests.

It speaks the real wire format (``POST /v1/chat/completions``, streamed as
chunked ``text/event-stream``), so the real ``langchain-openai`` client runs
against it unchanged, in the test process or in a worker subprocess.

Behaviour is scripted per model name: ``server.script("m", Reply(...), ...)``
makes successive calls for model ``m`` get successive replies (the last one
repeats). Unscripted models echo the last user message. Every request is
recorded, and so is every stream the client closed before its end.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["FakeOpenAI", "Reply", "ToolCall"]

_TOKEN = re.compile(r"\s*\S+|\s+")


@dataclass(frozen=True)
class ToolCall:
    name: str
    args: dict[str, Any] = field(default_factory=dict)
    raw_args: str | None = None  # sent as the arguments instead of ``args`` (malformed JSON)

    @property
    def arguments(self) -> str:
        return self.raw_args if self.raw_args is not None else json.dumps(self.args)


@dataclass(frozen=True)
class Reply:
    """One scripted answer.

    ``status`` other than 200 answers with an OpenAI-style error body; with
    ``echo_key`` its message repeats the API key it was sent, as OpenAI's 401 does.
    ``cut_after`` closes the connection after that many content chunks, mid-body;
    ``end_after`` ends the body cleanly there instead, with no finish reason and no
    ``[DONE]``, as a proxy giving up on its upstream may.
    """

    text: str | None = None  # None: echo the last user message
    tool_calls: tuple[ToolCall, ...] = ()
    first_delay_s: float = 0.0
    chunk_delay_s: float = 0.0
    status: int = 200
    error_message: str = "scripted failure"
    echo_key: bool = False
    cut_after: int | None = None
    end_after: int | None = None
    usage: bool = True  # send the usage chunk when the client asks for it
    finish_reason: str | None = None


@dataclass
class Recorded:
    model: str
    body: dict[str, Any]
    headers: dict[str, str]
    at: float


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._json(200, {"object": "list", "data": []})
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._json(404, {"error": {"message": f"no route {self.path}"}})
            return
        fake = self.server.fake
        model = str(body.get("model", ""))
        fake._record(Recorded(model, body, dict(self.headers), time.time()))
        reply = fake._next_reply(model)
        if reply.first_delay_s:
            time.sleep(reply.first_delay_s)
        if reply.status != 200:
            message = reply.error_message
            if reply.echo_key:
                key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                message = f"Incorrect API key provided: {key}. You can find your API key at https://platform.openai.com/account/api-keys."
            kinds = {401: "invalid_api_key", 429: "rate_limit_exceeded"}
            self._json(
                reply.status,
                {
                    "error": {
                        "message": message,
                        "type": "invalid_request_error" if reply.status < 500 else "server_error",
                        "param": None,
                        "code": kinds.get(reply.status),
                    }
                },
            )
            return
        text = reply.text if reply.text is not None else _last_user_text(body)
        prompt_tokens = sum(len(_tokens(_content(m))) for m in body.get("messages", []))
        if body.get("stream"):
            self._stream(model, body, reply, text, prompt_tokens)
        else:
            self._complete(model, reply, text, prompt_tokens)

    # -- answers -----------------------------------------------------------------

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _complete(self, model: str, reply: Reply, text: str, prompt_tokens: int) -> None:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if reply.tool_calls:
            message["tool_calls"] = [
                {
                    "id": f"call_{i}",
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for i, c in enumerate(reply.tool_calls)
            ]
        completion = len(_tokens(text))
        self._json(
            200,
            {
                "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {"index": 0, "message": message, "finish_reason": _finish(reply)},
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion,
                },
            },
        )

    def _stream(
        self, model: str, body: dict[str, Any], reply: Reply, text: str, prompt_tokens: int
    ) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        cid = f"chatcmpl-{uuid.uuid4().hex[:12]}"

        def chunk(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> None:
            payload: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": []
                if delta is None
                else [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra,
            }
            self._send_chunk(f"data: {json.dumps(payload)}\n\n".encode())

        tokens = _tokens(text)
        try:
            chunk({"role": "assistant", "content": ""})
            for i, token in enumerate(tokens):
                if reply.cut_after is not None and i >= reply.cut_after:
                    self.close_connection = True
                    return  # no terminating chunk: the client sees a cut body
                if reply.end_after is not None and i >= reply.end_after:
                    self._send_chunk(b"")  # a whole HTTP body that holds half a reply
                    return
                if i and reply.chunk_delay_s:
                    time.sleep(reply.chunk_delay_s)
                chunk({"content": token})
            for i, call in enumerate(reply.tool_calls):
                chunk(
                    {
                        "tool_calls": [
                            {
                                "index": i,
                                "id": f"call_{uuid.uuid4().hex[:8]}",
                                "type": "function",
                                "function": {"name": call.name, "arguments": ""},
                            }
                        ]
                    }
                )
                chunk(
                    {"tool_calls": [{"index": i, "function": {"arguments": call.arguments}}]}
                )
            chunk({}, _finish(reply))
            if reply.usage and (body.get("stream_options") or {}).get("include_usage"):
                n = len(tokens)
                chunk(
                    None,
                    usage={
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": n,
                        "total_tokens": prompt_tokens + n,
                    },
                )
            self._send_chunk(b"data: [DONE]\n\n")
            self._send_chunk(b"")
            self.server.fake._completed(model)
        except (BrokenPipeError, ConnectionResetError):
            self.server.fake._closed_early(model)
            self.close_connection = True

    def _send_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def _finish(reply: Reply) -> str:
    return reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop")


def _content(message: dict[str, Any]) -> str:
    content = message.get("content") or ""
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content)


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "user":
            return _content(message)
    return ""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeOpenAI


class FakeOpenAI:
    """The server; ``base_url`` is what ``ChatOpenAI(base_url=...)`` takes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scripts: dict[str, list[Reply]] = {}
        self._calls: dict[str, int] = {}
        self.requests: list[Recorded] = []
        self.closed_early: list[str] = []
        self.completed: list[str] = []  # models whose streamed body was sent to its end
        self._server: _Server | None = None

    def start(self) -> FakeOpenAI:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.fake = self
        self._server = server
        threading.Thread(target=server.serve_forever, name="fake-openai", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def script(self, model: str, *replies: Reply) -> str:
        """Successive calls for ``model`` get ``replies`` in turn; the last repeats."""
        with self._lock:
            self._scripts[model] = list(replies)
            self._calls[model] = 0
        return model

    def calls(self, model: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.model == model]

    def _record(self, rec: Recorded) -> None:
        with self._lock:
            self.requests.append(rec)

    def _closed_early(self, model: str) -> None:
        with self._lock:
            self.closed_early.append(model)

    def _completed(self, model: str) -> None:
        with self._lock:
            self.completed.append(model)

    def _next_reply(self, model: str) -> Reply:
        with self._lock:
            replies = self._scripts.get(model)
            n = self._calls.get(model, 0)
            self._calls[model] = n + 1
        if not replies:
            return Reply()
        return replies[min(n, len(replies) - 1)]
