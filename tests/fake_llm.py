"""A scripted LLM server on 127.0.0.1 that speaks both the OpenAI and the Anthropic wire format.

    from fake_llm import FakeLLM, Reply, Status, Delay

    with FakeLLM(script=[Status(429, "slow down", retry_after=0), Reply("hello")], key="sk-test") as server:
        OpenAI(base_url=server.openai_base_url, api_key="sk-test")        # .../v1
        Anthropic(base_url=server.anthropic_base_url, api_key="sk-test")  # the SDK appends /v1/messages
        server.requests          # [Request(path, headers, json), ...], one per request received
        server.requests[0].json  # its body as the SDK sent it: messages, max_tokens, response_format, ...
        server.script.extend([Reply("more")])  # steps may be appended while it runs

Routing is by path suffix: `.../chat/completions` answers in the OpenAI format, `.../messages` in the
Anthropic one, so any base-URL prefix works. Each request consumes the next step of the script;
once the script is exhausted the LAST step repeats forever (so `[Status(503)]` is a server that stays
down); an empty script answers 500. When `key` is given, a request without it (OpenAI:
`Authorization: Bearer KEY`; Anthropic: `x-api-key: KEY` or the bearer header) gets a 401 in the
right format without consuming a step; that 401 echoes the key it received, as some real servers do,
so tests can check the key never leaks into an error message. Error bodies have each API's real
shape, so the SDKs raise their usual exception classes. The `fake_llm` pytest fixture yields a
running server with an empty script and no key.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator, NamedTuple, Union

import pytest

__all__ = ["FakeLLM", "Reply", "Status", "Delay", "Request", "fake_llm"]


@dataclass(frozen=True)
class Reply:
    """A successful completion. `input_tokens=None` leaves usage out of the reply (as some local servers do);
    `truncated` says it stopped at max_tokens (finish_reason "length", stop_reason "max_tokens")."""

    text: str
    input_tokens: int | None = 100
    output_tokens: int | None = 50
    truncated: bool = False


@dataclass(frozen=True)
class Status:
    """An HTTP error in the wire format of the request, e.g. Status(429, "slow down", retry_after=1)."""

    code: int
    message: str = "error"
    retry_after: float | None = None  # seconds, sent as the Retry-After header


@dataclass(frozen=True)
class Delay:
    """Wait `seconds` (to make a client time out, or to be a slow model), then play `then`."""

    seconds: float
    then: Step = Reply("ok")


Step = Union[Reply, Status, Delay]


class Request(NamedTuple):
    """One request as received: headers have lower-case names; json is the parsed body (None if not JSON)."""

    path: str
    headers: dict[str, str]
    json: Any


_OPENAI_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
                 404: "invalid_request_error", 429: "requests"}
_OPENAI_CODES = {401: "invalid_api_key", 404: "model_not_found", 429: "rate_limit_exceeded"}
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    529: "overloaded_error"}


class FakeLLM:
    """The server. Start with `with FakeLLM(...) as server:` (or start()/close())."""

    def __init__(self, script: list[Step] | None = None, key: str | None = None) -> None:
        self.script: list[Step] = list(script or [])
        self.key = key
        self.requests: list[Request] = []
        self._next = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._httpd is not None, "the server is not running"
        return self._httpd.server_address[1]

    @property
    def openai_base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def anthropic_base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeLLM:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stopping.set()  # ends pending Delay steps at once
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def next_step(self) -> Step | None:
        """The step for the next request: the script in order, then the last step again; None if empty."""
        with self._lock:
            if not self.script:
                return None
            if self._next < len(self.script):
                self._next += 1
                return self.script[self._next - 1]
            return self.script[-1]


class _Handler(BaseHTTPRequestHandler):
    fake: FakeLLM
    protocol_version = "HTTP/1.0"  # one request per connection: nothing lingers after close()

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        path = self.path.split("?", 1)[0]
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.fake.requests.append(Request(path, headers, body))
        wire = "anthropic" if path.endswith("/messages") else "openai" if path.endswith("/chat/completions") else ""
        if not wire:
            self._send(404, _openai_error(404, f"no route for {path}"))
            return
        if self.fake.key is not None:
            bearer = headers.get("authorization", "").removeprefix("Bearer ")
            given = headers["x-api-key"] if wire == "anthropic" and "x-api-key" in headers else bearer
            if given != self.fake.key:
                self._send(401, _error(wire, 401, f"Incorrect API key provided: {given}"))
                return
        step = self.fake.next_step()
        while isinstance(step, Delay):
            if self.fake._stopping.wait(step.seconds):
                return  # the server is closing
            step = step.then
        if step is None:
            self._send(500, _error(wire, 500, "the FakeLLM script is empty"))
        elif isinstance(step, Status):
            extra = {"Retry-After": f"{step.retry_after:g}"} if step.retry_after is not None else {}
            self._send(step.code, _error(wire, step.code, step.message), extra)
        else:
            model = str(body.get("model", "")) if isinstance(body, dict) else ""
            reply = _openai_reply if wire == "openai" else _anthropic_reply
            self._send(200, reply(step, model, len(self.fake.requests)))

    def _send(self, code: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test): nothing to answer


def _error(wire: str, code: int, message: str) -> dict[str, Any]:
    return _openai_error(code, message) if wire == "openai" else _anthropic_error(code, message)


def _openai_error(code: int, message: str) -> dict[str, Any]:
    kind = _OPENAI_TYPES.get(code, "server_error" if code >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": _OPENAI_CODES.get(code)}}


def _anthropic_error(code: int, message: str) -> dict[str, Any]:
    kind = _ANTHROPIC_TYPES.get(code, "api_error" if code >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def _openai_reply(step: Reply, model: str, n: int) -> dict[str, Any]:
    reply: dict[str, Any] = {
        "id": f"chatcmpl-fake{n}", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": step.text},
                     "finish_reason": "length" if step.truncated else "stop"}],
    }
    if step.input_tokens is not None and step.output_tokens is not None:
        reply["usage"] = {"prompt_tokens": step.input_tokens, "completion_tokens": step.output_tokens,
                          "total_tokens": step.input_tokens + step.output_tokens}
    return reply


def _anthropic_reply(step: Reply, model: str, n: int) -> dict[str, Any]:
    reply: dict[str, Any] = {
        "id": f"msg_fake{n}", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": step.text}],
        "stop_reason": "max_tokens" if step.truncated else "end_turn", "stop_sequence": None,
    }
    if step.input_tokens is not None and step.output_tokens is not None:
        reply["usage"] = {"input_tokens": step.input_tokens, "output_tokens": step.output_tokens}
    return reply


@pytest.fixture
def fake_llm() -> Iterator[FakeLLM]:
    """A running FakeLLM with an empty script and no key check; extend `fake_llm.script` in the test."""
    with FakeLLM() as server:
        yield server
