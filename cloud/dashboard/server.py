"""The dashboard's web server (aiohttp): the page, a WebSocket of frames and numbers, a JSON API, a login.

Routes::

    GET  /                    the page (static/index.html; plain ES modules, no build step)
    GET  /static/...          app.js, style.css
    GET  /ws                  WebSocket: {"type": "hello"}, then "stats" every stats_interval_s and "frame"
                              messages (the last frame of each camera: latest wins for a slow browser)
    GET  /api/state           the numbers as JSON (link, cameras with their chart points, timeline)
    GET  /api/frame/{camera}  the camera's last frame, image/jpeg
    GET  /healthz             "ok" (no login)
    GET  /login, POST /login  with a login token configured: the form, and the cookie it sets

A login token is needed on any address but loopback (``dashboard.exposure_problem``). With one, every route
but /login, /healthz and the stylesheet needs the session cookie from POST /login or an
``Authorization: Bearer <login token>`` header; the page redirects to /login, the API answers 401.
WebSockets must come from the page's own origin (a foreign ``Origin`` gets 403).

Each browser has its own send task and a pending slot per camera plus one for the numbers, so a slow
browser skips frames (counted in ``skipped``) and never delays the subscription or another browser.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

from .config import DashboardConfig
from .state import CameraView, DashboardState
from .subscription import CloudSubscription

log = logging.getLogger(__name__)

__all__ = ["DashboardServer", "STATIC_DIR", "COOKIE"]

STATIC_DIR = Path(__file__).with_name("static")
COOKIE = "latentcast_dashboard"  # the session cookie set by POST /login
_PUBLIC = frozenset({"/login", "/healthz", "/static/style.css"})
_MAX_SESSIONS = 1024  # login sessions kept (the oldest is logged out beyond)
_FAILED_LOGIN_DELAY_S = 0.5  # a wrong token waits this long before the answer (slows guessing)
_CSP = ("default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; style-src 'self'; "
        "script-src 'self'; frame-ancestors 'none'")


class _Browser:
    """One WebSocket: pending messages by key (latest wins) and the task that sends them."""

    def __init__(self, ws: web.WebSocketResponse, peer: str) -> None:
        self.ws = ws
        self.peer = peer
        self.pending: OrderedDict[str, str] = OrderedDict()
        self.ready = asyncio.Event()
        self.sent = 0
        self.skipped = 0  # messages replaced by a newer one before they were sent

    def offer(self, key: str, text: str) -> None:
        if key in self.pending:
            self.skipped += 1
            del self.pending[key]
        self.pending[key] = text
        self.ready.set()

    async def send_loop(self) -> None:
        while not self.ws.closed:
            await self.ready.wait()
            self.ready.clear()
            while self.pending and not self.ws.closed:
                _, text = self.pending.popitem(last=False)
                await self.ws.send_str(text)
                self.sent += 1


class DashboardServer:
    """The subscription, the state and the web server of one dashboard."""

    def __init__(self, config: DashboardConfig | None = None) -> None:
        self.config = config or DashboardConfig()
        d = self.config.dashboard
        self.state = DashboardState(d, target=self.config.cloud.target)
        self._login = d.resolved_login_token()  # a missing token file fails here
        self.subscription = CloudSubscription(self.config.cloud, self.state, on_frame=self._on_frame)
        self._sessions: OrderedDict[str, float] = OrderedDict()
        self._browsers: set[_Browser] = set()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.port: int | None = None

    # ---------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        host = self.config.dashboard.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host.strip('[]')}]" if ":" in host else host
        return f"http://{shown}:{self.port}/"

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth_middleware], client_max_size=64 * 1024)
        app.router.add_get("/", self._index)
        app.router.add_get("/ws", self._websocket)
        app.router.add_get("/api/state", self._api_state)
        app.router.add_get("/api/frame/{camera}", self._api_frame)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/login", self._login_page)
        app.router.add_post("/login", self._login_post)
        app.router.add_static("/static", STATIC_DIR, show_index=False, follow_symlinks=False)
        app.on_response_prepare.append(self._headers)
        return app

    async def start(self) -> None:
        """Serve the page and subscribe to the cloud; raises ValueError for an exposed bind without a login."""
        d = self.config.dashboard
        problem = d.exposure_problem()
        if problem:
            raise ValueError(problem)
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, d.host.strip("[]"), d.port)
        try:
            await self._site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise OSError(exc.errno, f"dashboard.host/port {d.host}:{d.port}: {exc.strerror or exc}") from None
        server = self._site._server  # aiohttp keeps the bound sockets there; port 0 picks a free one
        self.port = int(server.sockets[0].getsockname()[1]) if server is not None and server.sockets else d.port
        self._tasks = [asyncio.create_task(self.subscription.run(self._stop), name="dashboard-subscription"),
                       asyncio.create_task(self._ticker(), name="dashboard-ticker")]
        log.info("dashboard on %s, subscribed to %s", self.url, self.config.cloud.target)

    async def stop(self) -> None:
        self._stop.set()
        for ws in [b.ws for b in self._browsers]:
            await ws.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def serve_forever(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    # ---------------------------------------------------------------- push
    def _broadcast(self, key: str, text: str) -> None:
        for b in self._browsers:
            b.offer(key, text)

    def _on_frame(self, cam: CameraView) -> None:
        if self._browsers:
            self._broadcast(f"frame:{cam.camera_id}", json.dumps(cam.frame_message(), separators=(",", ":")))

    async def _ticker(self) -> None:
        while not self._stop.is_set():
            msg = self.state.tick()
            self._broadcast("stats", json.dumps(msg, separators=(",", ":")))
            try:
                await asyncio.wait_for(self._stop.wait(), self.config.dashboard.stats_interval_s)
            except asyncio.TimeoutError:
                pass

    # ---------------------------------------------------------------- auth
    def _authorized(self, request: web.Request) -> bool:
        if self._login is None:
            return True
        sid = request.cookies.get(COOKIE, "")
        if sid and sid in self._sessions:
            return True
        auth = request.headers.get("Authorization", "")
        return auth.startswith("Bearer ") and hmac.compare_digest(auth[7:].strip().encode(), self._login.encode())

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler):
        if request.path in _PUBLIC or self._authorized(request):
            return await handler(request)
        if request.method == "GET" and request.path == "/":
            raise web.HTTPSeeOther("/login")
        return web.json_response({"error": "login required: POST /login with the dashboard's login token, or send "
                                           "Authorization: Bearer <token>"}, status=401)

    async def _login_page(self, request: web.Request, *, message: str = "", status: int = 200) -> web.Response:
        if self._login is None:
            raise web.HTTPSeeOther("/")
        html = (STATIC_DIR / "login.html").read_text(encoding="utf-8").replace("{{message}}", message)
        return web.Response(text=html, content_type="text/html", status=status)

    async def _login_post(self, request: web.Request) -> web.Response:
        if self._login is None:
            raise web.HTTPSeeOther("/")
        form = await request.post()
        token = str(form.get("token", "")).strip()
        if not hmac.compare_digest(token.encode(), self._login.encode()):
            log.info("dashboard login refused from %s", request.remote)
            await asyncio.sleep(_FAILED_LOGIN_DELAY_S)
            return await self._login_page(request, message="Wrong token.", status=401)
        sid = secrets.token_urlsafe(32)
        self._sessions[sid] = time.time()
        while len(self._sessions) > _MAX_SESSIONS:
            self._sessions.popitem(last=False)
        resp = web.HTTPSeeOther("/")
        resp.set_cookie(COOKIE, sid, httponly=True, samesite="Strict", path="/")
        raise resp

    async def _headers(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers.setdefault("Content-Security-Policy", _CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")

    # ---------------------------------------------------------------- handlers
    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _api_state(self, request: web.Request) -> web.Response:
        return web.json_response(self.state.snapshot())

    async def _api_frame(self, request: web.Request) -> web.Response:
        cam = self.state.cameras.get(request.match_info["camera"])
        if cam is None or not cam.jpeg:
            return web.json_response({"error": f"no frame of camera {request.match_info['camera']!r}"}, status=404)
        return web.Response(body=cam.jpeg, content_type="image/jpeg", headers={"Cache-Control": "no-store"})

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin and urlsplit(origin).netloc != request.host:
            return web.json_response({"error": f"WebSocket from foreign origin {origin!r}"}, status=403)
        if len(self._browsers) >= self.config.dashboard.max_clients:
            return web.json_response({"error": f"dashboard.max_clients {self.config.dashboard.max_clients} "
                                               "browsers are connected"}, status=503)
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=4096)
        await ws.prepare(request)
        b = _Browser(ws, request.remote or "?")
        self._browsers.add(b)
        d = self.config.dashboard
        b.offer("hello", json.dumps({"type": "hello", "stale_s": d.stale_s, "history_s": d.history_s,
                                     "rate_window_s": d.rate_window_s, "target": self.config.cloud.target}))
        b.offer("stats", json.dumps(self.state.snapshot() | {"type": "stats"}, separators=(",", ":")))
        for cam in self.state.cameras.values():
            if cam.jpeg:
                b.offer(f"frame:{cam.camera_id}", json.dumps(cam.frame_message(), separators=(",", ":")))
        sender = asyncio.create_task(b.send_loop(), name=f"dashboard-ws-{b.peer}")
        try:
            async for msg in ws:  # the page sends nothing it needs answered; reading notices the close
                if msg.type == WSMsgType.ERROR:
                    break
        finally:
            self._browsers.discard(b)
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            log.debug("browser %s left: %d sent, %d skipped", b.peer, b.sent, b.skipped)
        return ws
