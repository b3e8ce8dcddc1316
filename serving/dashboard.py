"""The live operator dashboard at /ui of `freshet serve`: its pages, login, live updates and feature browser.

Owns the /ui routes: a login form that trades the read credential for a signed session cookie,
the page and its local assets, server-sent events carrying LiveFeed's snapshots, and the browser.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs

import orjson

from freshet.settings import Settings

log = logging.getLogger("freshet.serving.dashboard")

PREFIX = "/ui"
COOKIE = "freshet_ui"
SESSION_S = 12 * 3600
STATIC = Path(__file__).with_name("static")
ASSETS = {"dashboard.js": b"text/javascript; charset=utf-8", "dashboard.css": b"text/css; charset=utf-8",
          "dashboard.html": b"text/html; charset=utf-8", "login.html": b"text/html; charset=utf-8"}
HTML = b"text/html; charset=utf-8"
JSON = b"application/json"
SECURITY_HEADERS = [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; "
                                                 b"style-src 'self'; script-src 'self'; frame-ancestors 'none'")]


class ReadCredential(Protocol):
    """What the dashboard asks of the API's auth: does this secret grant read access?"""

    def accepts(self, secret: str) -> bool: ...


class TokenCredential:
    """The API tokens that may read (the features token, and the admin token, which holds every scope).

    >>> read = TokenCredential("f-token", "a-token")
    >>> read.accepts("f-token"), read.accepts("a-token"), read.accepts("guess")
    (True, True, False)
    """

    def __init__(self, *tokens: str):
        self._tokens = [t.encode() for t in tokens]

    def accepts(self, secret: str) -> bool:
        given = secret.encode()
        # every token compared, in constant time each: no guessing by timing
        return sum(hmac.compare_digest(given, t) for t in self._tokens) > 0


class SessionCookies:
    """Signed, expiring session cookies: `<expiry>.<hmac>`, keyed by a server-side secret.

    >>> sessions = SessionCookies(b"key", lifetime_s=60)
    >>> cookie = sessions.issue(now=1000.0)
    >>> sessions.valid(cookie, now=1030.0), sessions.valid(cookie, now=1061.0)
    (True, False)
    >>> sessions.valid("1060." + "0" * 64, now=1030.0)
    False
    """

    def __init__(self, key: bytes, lifetime_s: int = SESSION_S):
        self._key = key
        self.lifetime_s = lifetime_s

    def _sign(self, expiry: str) -> str:
        return hmac.new(self._key, b"freshet-ui:" + expiry.encode(), hashlib.sha256).hexdigest()

    def issue(self, now: float | None = None) -> str:
        expiry = str(int((now or time.time()) + self.lifetime_s))
        return f"{expiry}.{self._sign(expiry)}"

    def valid(self, cookie: str, now: float | None = None) -> bool:
        expiry, _, mac = cookie.partition(".")
        if not expiry.isdigit() or not hmac.compare_digest(mac, self._sign(expiry)):
            return False
        return int(expiry) > (now or time.time())


def cookie_value(headers: list[tuple[bytes, bytes]], name: str = COOKIE) -> str:
    """The value of one cookie in a request's Cookie headers, '' when absent.

    >>> cookie_value([(b"cookie", b"a=1; freshet_ui=42.ab")])
    '42.ab'
    """
    for key, value in headers:
        if key == b"cookie":
            for part in value.decode("latin-1").split(";"):
                k, _, v = part.strip().partition("=")
                if k == name:
                    return v
    return ""


class Dashboard:
    """The /ui ASGI handler. `app` is the ServingApp (its reader, metrics and settings)."""

    def __init__(self, app: Any, credential: ReadCredential, session_key: bytes):
        self.app = app
        self.settings: Settings = app.settings
        self.credential = credential
        self.sessions = SessionCookies(session_key)
        self.feed = None
        self._assets = {name: (STATIC / name).read_bytes() for name in ASSETS}
        self._catalog: tuple[int, dict] | None = None

    # -- routing -------------------------------------------------------------------------

    async def __call__(self, scope, receive, send) -> None:
        path, method, headers = scope["path"], scope["method"], scope["headers"]
        sub = path[len(PREFIX):] or "/"
        if sub.startswith("/static/") and method == "GET":
            name = sub[len("/static/"):]
            if name in ASSETS and name.endswith((".js", ".css")):
                return await _respond(send, 200, self._assets[name], ASSETS[name], cache=True)
            return await _respond(send, 404, b"not found", b"text/plain")
        if sub == "/login" and method == "POST":
            return await self._login(receive, send)
        if sub == "/logout" and method == "POST":
            return await _respond(send, 303, b"", HTML, [(b"location", PREFIX.encode() + b"/"),
                                                          (b"set-cookie", self._cookie("", 0))])
        authorized = self._authorized(headers)
        if sub in ("/", "") and method == "GET":
            if not authorized:
                return await _respond(send, 200, self._assets["login.html"], HTML)
            return await _respond(send, 200, self._assets["dashboard.html"], HTML)
        if not authorized:
            return await _respond(send, 401, b'{"detail":"log in at /ui first, or send the API token"}', JSON)
        if sub == "/events" and method == "GET":
            return await self._events(receive, send)
        if sub == "/api/snapshot" and method == "GET":
            self.start_feed()
            return await _respond(send, 200, self.feed.snapshot, JSON)
        if sub == "/api/features" and method == "GET":
            catalog = await asyncio.to_thread(self.catalog)
            return await _respond(send, 200, orjson.dumps(catalog), JSON)
        if sub == "/api/entity" and method == "GET":
            status, body = await self._entity(scope)
            return await _respond(send, status, body, JSON)
        await _respond(send, 404, b'{"detail":"no such dashboard page"}', JSON)

    def _authorized(self, headers) -> bool:
        cookie = cookie_value(headers)
        if cookie and self.sessions.valid(cookie):
            return True
        for name, value in headers:
            if name == b"authorization":
                scheme, _, secret = value.decode("latin-1").partition(" ")
                return scheme == "Bearer" and self.credential.accepts(secret.strip())
        return False

    def _cookie(self, value: str, max_age: int) -> bytes:
        return (f"{COOKIE}={value}; Path={PREFIX}; Max-Age={max_age}; HttpOnly; SameSite=Strict").encode()

    async def _login(self, receive, send) -> None:
        body = await _read_body(receive, limit=4096)
        form = parse_qs(body.decode("utf-8", "replace"))
        secret = (form.get("token") or [""])[0].strip()
        if not secret or not self.credential.accepts(secret):
            await asyncio.sleep(0.5)  # a wrong guess costs time
            page = self._assets["login.html"].replace(b"<!--error-->",
                                                      b'<p class="error">That token is not accepted.</p>')
            return await _respond(send, 401, page, HTML)
        await _respond(send, 303, b"", HTML, [(b"location", PREFIX.encode() + b"/"),
                                              (b"set-cookie", self._cookie(self.sessions.issue(), SESSION_S))])

    # -- live updates --------------------------------------------------------------------

    def start_feed(self) -> None:
        """Start reading on the first dashboard visit: a serving process nobody watches pays nothing."""
        if self.feed is not None:
            return
        from freshet.serving.dashboard_feed import ApiStats, LiveFeed
        from freshet.serving.metrics import LATENCY_BUCKETS

        reader = self.app.reader
        self.feed = LiveFeed(self.settings, layout=lambda: reader.layout, registry=self._registry,
                             api=ApiStats(self.app.metrics, LATENCY_BUCKETS), stream_group=self.settings.dashboard_stream_group,
                             extra=self._extra)
        self.feed.start()

    def _registry(self):
        from freshet import features

        return features.load_registry(self.settings, store=self.app.reader._feature_store())

    def _extra(self) -> dict[str, Any]:
        """What the serving process itself knows: its model, and the consistency rate when exposed."""
        follower = self.app.follower
        model = follower.model if follower is not None else None
        consistency = []
        for family in self.app.metrics.registry.collect():
            if family.name.startswith("freshet_consistency_rate"):
                consistency += [{"labels": s.labels, "value": s.value} for s in family.samples]
        return {"serving": {"model": self.app.model_name, "version": model.version if model else None,
                            "error": (follower.last_error if follower is not None and model is None else None)},
                "consistency": consistency}

    async def _events(self, receive, send) -> None:
        """text/event-stream: one `snapshot` event a second until the browser goes away."""
        self.start_feed()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), *SECURITY_HEADERS]})
        gone = asyncio.Event()

        async def watch_disconnect():
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.get_running_loop().create_task(watch_disconnect())
        version = 0  # 0: nothing gathered yet
        try:
            await send({"type": "http.response.body", "body": b"retry: 2000\n\n", "more_body": True})
            while not gone.is_set():
                if self.feed.version > version:
                    version, blob = self.feed.version, self.feed.snapshot
                    await send({"type": "http.response.body", "body": b"event: snapshot\ndata: " + blob + b"\n\n",
                                "more_body": True})
                try:
                    await asyncio.wait_for(gone.wait(), 0.25)
                except asyncio.TimeoutError:
                    pass
        except OSError:
            pass
        finally:
            watcher.cancel()

    # -- feature browser -----------------------------------------------------------------

    def catalog(self) -> dict[str, Any]:
        """Views, their features, windows and descriptions, from the Feast registry (cached per registry version)."""
        reader = self.app.reader
        generation = getattr(reader, "generation", 0)
        if self._catalog is not None and self._catalog[0] == generation:
            return self._catalog[1]
        store = reader._feature_store()
        registry = self._registry()
        described = {}
        for sfv in store.list_stream_feature_views():
            described[sfv.name] = (sfv.description or "", {f.name: f.description or "" for f in sfv.features},
                                   [e for e in sfv.entities])
        entities = {e.name: e.description or "" for e in store.list_entities()}
        views = []
        for name, spec in sorted(registry.views.items()):
            text, feature_text, entity_names = described.get(name, ("", {}, []))
            views.append({
                "name": name, "description": text, "topic": spec.topic, "join_keys": list(spec.join_keys),
                "entities": [{"name": e, "description": entities.get(e, "")} for e in entity_names],
                "ttl_s": spec.ttl_s, "lateness_s": spec.lateness_s, "online": spec.online,
                "features": [{"name": a.name, "function": a.function, "column": a.column, "window_s": a.window_s,
                              "slide_s": a.slide_s, "dtype": a.dtype, "description": feature_text.get(a.name, "")}
                             for a in spec.aggregations]})
        out = {"project": registry.project, "views": views, "services": registry.feature_services}
        self._catalog = (generation, out)
        return out

    async def _entity(self, scope) -> tuple[int, bytes]:
        """One entity's current values in one view: ?view=<name>&<join key>=<value>..."""
        query = parse_qs(scope.get("query_string", b"").decode("utf-8", "replace"))
        view = (query.get("view") or [""])[0]
        catalog = await asyncio.to_thread(self.catalog)
        spec = next((v for v in catalog["views"] if v["name"] == view), None)
        if spec is None:
            return 404, orjson.dumps({"detail": f"no view {view!r}", "field": "view"})
        entities = {}
        for key in spec["join_keys"]:
            value = (query.get(key) or [""])[0].strip()
            if not value:
                return 422, orjson.dumps({"detail": f"give a value for {key!r}", "field": key})
            entities[key] = [value]
        reader = self.app.reader
        refs = [f"{view}:{f['name']}" for f in spec["features"]]
        plan = reader.plan(refs, None, True)
        result = await reader.read_async(plan, entities)
        return 200, orjson.dumps(result.to_feast_dict())


async def _read_body(receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b""
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b""
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _respond(send, status: int, body: bytes, content_type: bytes, headers: list | None = None,
                   cache: bool = False) -> None:
    base = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
    extra = [h for h in SECURITY_HEADERS if not (cache and h[0] == b"cache-control")]
    if cache:
        extra.append((b"cache-control", b"private, max-age=300"))
    await send({"type": "http.response.start", "status": status, "headers": [*base, *extra, *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def create_dashboard(app: Any, tokens: dict[str, str]) -> Dashboard:
    """The dashboard of a ServingApp; the features (read) token and the admin token log in."""
    key = hashlib.sha256(b"freshet-ui-session:" + tokens["admin"].encode()).digest()
    return Dashboard(app, TokenCredential(tokens["features"], tokens["admin"]), key)

