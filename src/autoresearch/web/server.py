"""`autoresearch dashboard`: a read-only web page over the lab's ledger, live while a run goes.

A Starlette app on uvicorn. It opens the ledger with SQLite's `mode=ro` and never writes anything.
Pages are Jinja templates with automatic escaping; the script and the chart library are served from
the package (no CDN, so it works offline). A change of the ledger reaches open pages through
server-sent events: one poll of `PRAGMA data_version` every quarter second, shared by all pages.

Security: bound to 127.0.0.1 by default, and then only `Host: 127.0.0.1/localhost` is accepted (a
web page elsewhere cannot reach it through DNS rebinding). Any other address needs the printed token
on every request (query `token=`, then a cookie; or `Authorization: Bearer`). Only GET. No route
takes a path: experiments are named by id and logs and transcripts are read only from the lab's own
folders, capped. Every response forbids inline scripts (Content-Security-Policy).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlencode

from ..carry import lab_studies
from ..errors import ConfigError
from ..experiment import Experiment
from ..lab import Lab
from ..ledger import Ledger, LedgerError
from . import data
from .render import environment, static_dir

POLL_SECONDS = 0.25  # how often the ledger's data_version is read for live updates
HEARTBEAT_SECONDS = 15.0
COOKIE = "autoresearch_token"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class Research:
    """The lab's ledger as the dashboard reads it: opened read-only when it appears, one state per
    (tag, data_version) computed once and shared by every page."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self._ledger: Ledger | None = None
        self._lock = threading.Lock()
        self._states: dict[str, tuple[int, dict[str, Any], dict[int | None, bytes]]] = {}

    def ledger(self) -> Ledger | None:
        with self._lock:
            if self._ledger is None and self.lab.ledger_path.is_file():
                try:
                    self._ledger = Ledger(self.lab.ledger_path, readonly=True)
                except LedgerError:
                    return None  # created this instant, or older: `version` says so on the page
            return self._ledger

    def version(self) -> int:
        ledger = self.ledger()
        return -1 if ledger is None else ledger.data_version()

    def tags(self) -> list[str]:
        ledger = self.ledger()
        return [] if ledger is None else ledger.tags()

    def default_tag(self) -> str | None:
        ledger = self.ledger()
        if ledger is None:
            return None
        from ..loop import latest_tag

        tag = latest_tag(ledger.runs())
        if tag is not None:
            return tag
        tags = ledger.tags()
        return tags[-1] if tags else None

    def history(self, tag: str) -> list[Experiment]:
        ledger = self.ledger()
        return [] if ledger is None else ledger.experiments(tag)

    def state(self, tag: str, rows: int | None = None) -> tuple[dict[str, Any], bytes]:
        """The tag's state and its JSON, recomputed only after the ledger changed; with `rows`, only
        that many of the table's rows (the newest: a first page that need not carry 10,000 of them)."""
        version = self.version()
        cached = self._states.get(tag)
        if cached is None or cached[0] != version:
            ledger = self.ledger()
            runs = [] if ledger is None else [dict(r) for r in ledger.runs(tag)]
            found = [] if ledger is None else lab_studies(ledger, tag, self.lab.config)
            value = data.state(self.lab, self.history(tag), tag, self.tags(), runs, found=found)
            value["version"] = version
            cached = self._states[tag] = (version, value, {})
        _, value, bodies = cached
        if rows is not None and rows >= len(value["rows"]):
            rows = None
        if rows not in bodies:
            part = value if rows is None else {**value, "rows": value["rows"][:rows]}
            bodies[rows] = json.dumps(part, separators=(",", ":"), allow_nan=False, default=str).encode()
        return value, bodies[rows]

    def experiment(self, eid: int) -> tuple[Experiment, list[Experiment]] | None:
        ledger = self.ledger()
        if ledger is None:
            return None
        try:
            e = ledger.get(eid)
        except LedgerError:
            return None
        return e, ledger.experiments(e.tag)

    def close(self) -> None:
        with self._lock:
            if self._ledger is not None:
                self._ledger.close()
                self._ledger = None


class Guard:
    """ASGI middleware: the Host check on loopback, the token elsewhere, GET only, and the security
    headers on every response."""

    def __init__(self, app: Any, token: str | None, hosts: tuple[str, ...] | None) -> None:
        self.app, self.token, self.hosts = app, token, hosts

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.hosts is not None and _host(headers.get("host", "")) not in self.hosts:
            await _plain(send, 421, "this dashboard answers only to 127.0.0.1 and localhost")
            return
        if scope["method"] not in ("GET", "HEAD"):
            await _plain(send, 405, "the dashboard is read-only", [(b"allow", b"GET, HEAD")])
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if self.token is not None:
            given = _given(headers, query)
            if given is None or not secrets.compare_digest(given.encode(), self.token.encode()):
                await _plain(send, 401, "this dashboard needs its access token: open the URL that "
                                        "`autoresearch dashboard` printed")
                return
            if "token" in query:  # once: a cookie from now on, and the token out of the address bar
                rest = urlencode({k: v for k, v in query.items() if k != "token"}, doseq=True)
                cookie = f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
                await _plain(send, 303, "", [(b"location", (scope["path"] + (f"?{rest}" if rest else "")).encode()),
                                             (b"set-cookie", cookie.encode())])
                return

        async def secured(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                extra = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                         (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY")]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, secured)


def _host(value: str) -> str:
    """The host part of a Host header: `127.0.0.1:8765` -> `127.0.0.1`, `[::1]:80` -> `::1`."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _given(headers: dict[str, str], query: dict[str, list[str]]) -> str | None:
    if query.get("token"):
        return query["token"][0]
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    cookie = SimpleCookie()
    try:
        cookie.load(headers.get("cookie", ""))
    except Exception:  # a malformed Cookie header is no token  # noqa: BLE001
        return None
    morsel = cookie.get(COOKIE)
    return morsel.value if morsel else None


async def _plain(send: Any, status: int, text: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def make_app(lab: Lab, token: str | None = None, loopback: bool = True) -> Any:
    """The dashboard's ASGI app for `lab` (`token`: required on every request when set)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import (
        HTMLResponse,
        JSONResponse,
        Response,
        StreamingResponse,
    )
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    research = Research(lab)
    env = environment()

    def page(name: str, status: int = 200, **context: Any) -> HTMLResponse:
        context = {"lab": lab.config.name, "metric": lab.config.metric.name, **context}
        return HTMLResponse(env.get_template(name).render(mode="live", **context), status_code=status,
                            headers={"cache-control": "no-store"})

    def tag_of(request: Request) -> str | None:
        tag = request.query_params.get("tag")
        return tag if tag in research.tags() else research.default_tag()

    async def overview(request: Request) -> Response:
        tag = await asyncio.to_thread(tag_of, request)
        return page("overview.html", tag=tag, tags=await asyncio.to_thread(research.tags))

    async def api_state(request: Request) -> Response:
        tag = await asyncio.to_thread(tag_of, request)
        if tag is None:
            return JSONResponse({"tag": None, "tags": [], "version": research.version(), "empty": True},
                                headers={"cache-control": "no-store"})
        wanted = request.query_params.get("rows", "")
        rows = int(wanted) if wanted.isdigit() and len(wanted) < 9 else None  # anything else: all of them
        _, body = await asyncio.to_thread(research.state, tag, rows)
        return Response(body, media_type="application/json", headers={"cache-control": "no-store"})

    async def experiment(request: Request) -> Response:
        found = await asyncio.to_thread(research.experiment, request.path_params["eid"])
        if found is None:
            return page("missing.html", what=f"experiment {request.path_params['eid']}", status=404)
        e, history = found
        info = await asyncio.to_thread(data.detail, lab, e, history)
        return page("experiment.html", d=info, tag=e.tag)

    async def api_log(request: Request) -> Response:
        found = await asyncio.to_thread(research.experiment, request.path_params["eid"])
        if found is None:
            return JSONResponse({"missing": "no such experiment"}, status_code=404)
        return JSONResponse(await asyncio.to_thread(data.log_tail, lab, found[0]), headers={"cache-control": "no-store"})

    async def events(request: Request) -> Response:
        async def stream():  # type: ignore[no-untyped-def]
            seen = await asyncio.to_thread(research.version)
            yield f"event: version\ndata: {json.dumps({'version': seen})}\n\n"
            said = time.monotonic()
            while not await request.is_disconnected():
                await asyncio.sleep(POLL_SECONDS)
                now = await asyncio.to_thread(research.version)
                if now != seen:
                    seen, said = now, time.monotonic()
                    yield f"event: change\ndata: {json.dumps({'version': now})}\n\n"
                elif time.monotonic() - said > HEARTBEAT_SECONDS:  # keeps proxies from closing it
                    said = time.monotonic()
                    yield ": still here\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    async def not_found(request: Request, exc: Exception) -> Response:
        return page("missing.html", what="this page", status=404)

    routes = [Route("/", overview), Route("/e/{eid:int}", experiment), Route("/api/state", api_state),
              Route("/api/log/{eid:int}", api_log), Route("/api/events", events),
              Mount("/static", app=StaticFiles(directory=static_dir()), name="static")]
    @contextlib.asynccontextmanager
    async def lifespan(app: Any):  # type: ignore[no-untyped-def]
        yield
        research.close()

    app = Starlette(routes=routes, exception_handlers={404: not_found}, lifespan=lifespan)
    app.state.research = research
    return Guard(app, token, LOOPBACK if loopback else None)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(lab: Lab, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
          announce: Any = print) -> None:
    """Serve the dashboard until Ctrl-C (port 0: any free port). A non-loopback `host` requires a
    token, made here unless given, and printed in the URL."""
    import socket

    import uvicorn

    loopback = is_loopback(host)
    if not loopback and token is None:
        token = secrets.token_urlsafe(24)
    app = make_app(lab, token=None if loopback else token, loopback=loopback)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"the dashboard cannot listen on {host}:{port}: {exc.strerror or exc}",
                          "pass another --port (or --port 0 for any free one)") from None
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=1, lifespan="on")
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104
    url = f"http://{'[' + shown + ']' if ':' in shown else shown}:{port}/"
    if token is not None and not loopback:
        url += f"?token={token}"
    announce(f"autoresearch dashboard for {lab.root}: {url}")
    if host in ("0.0.0.0", "::"):  # noqa: S104
        announce("from another machine, put this machine's address in place of 127.0.0.1; the token is required")
    announce("read-only; Ctrl-C to stop")
    uvicorn.Server(config).run(sockets=[sock])
