"""The serving app: the ASGI router in front of FastAPI, start-up and shutdown, and create_app.

Owns the hot endpoints (/get-online-features, /predict through the Predictor, /health, /ready,
/metrics), request bodies and their limit, and errors as statuses; FastAPI (admin.py) answers the rest.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Awaitable, Callable

import orjson
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from freshet.settings import DEFAULT_MODEL_NAME, Settings
from freshet.models import ModelFollower, ModelRegistry
from freshet.serving.admin import admin_api
from freshet.serving.auth import ADMIN, ScopedAuth, resolve_credentials
from freshet.serving.dashboard import PREFIX as DASHBOARD, create_dashboard
from freshet.serving.errors import ANSWERED, JSON, HTTPError, as_http_error
from freshet.serving.gate import ServingGate
from freshet.serving.metrics import ServingMetrics
from freshet.serving.online import OnlineFeatureReader, RedisUnavailable
from freshet.serving.predictions import PredictionLog
from freshet.serving.scoring import Predictor
from freshet.serving.validation import features_request

log = logging.getLogger("freshet.serving")

# how often a worker of `serve --workers N` copies its counters to the shared metrics directory:
# another worker's /metrics includes them at most this late
METRICS_PUBLISH_S = 1.0

# (status, body, content type) of a request body
Handler = Callable[[bytes], Awaitable[tuple[int, bytes, bytes]]]


class ServingApp:
    """The ASGI application. Build it with `create_app`."""

    def __init__(self, settings: Settings, reader: OnlineFeatureReader, registry: ModelRegistry | None,
                 follower: ModelFollower | None, prediction_log: PredictionLog | None, tokens: dict[str, str],
                 model_name: str = DEFAULT_MODEL_NAME):
        self.settings = settings
        self.reader = reader
        self.registry = registry
        self.follower = follower
        self.model_name = model_name
        self.auth = ScopedAuth(tokens)
        self.max_body = settings.max_body_bytes
        self._tasks: list[asyncio.Task] = []
        self.metrics = ServingMetrics(reader)
        self.predictor = Predictor(reader, follower, prediction_log, self.metrics, model_name)
        self.metrics.expose_predictions(self.predictor)
        self.routes: dict[tuple[str, str], Handler] = {
            ("POST", "/get-online-features"): self.get_online_features,
            ("POST", "/predict"): self.predictor.predict,
            ("GET", "/health"): self.health,
            ("GET", "/ready"): self.ready,
            ("GET", "/metrics"): self.scrape,
        }
        # every version is gated before this server serves it, and before a promotion it is asked for
        self.gate = ServingGate(reader, registry)
        self.api = admin_api(self)
        self.dashboard = create_dashboard(self, tokens)  # /ui: its own login, guarded by the read credential
        if follower is not None:
            follower.on_change = self.metrics.model_changed
            follower.gate = follower.gate or self.gate

    # -- ASGI ------------------------------------------------------------------

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "http" and scope["path"].startswith(DASHBOARD):
            await self.dashboard(scope, receive, send)
        elif kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self.api(scope, receive, send)

    async def _http(self, scope, receive, send) -> None:
        started = time.perf_counter()
        path = scope["path"]
        method = scope["method"]
        handler = self.routes.get((method, path))
        endpoint = path if handler is not None else _endpoint_label(path)
        headers = scope["headers"]
        status = 500
        try:
            scopes = self.auth.check(path, headers)
            if handler is None:
                status = await self._delegate(scope, receive, send)
                return
            body = await self._read_body(headers, receive) if method == "POST" else b""
            if handler == self.ready and ADMIN in scopes:
                handler = self.ready_in_detail
            status, payload, content_type = await handler(body)
            await _respond(send, status, payload, content_type)
        except ANSWERED as exc:
            err = as_http_error(exc)
            status = err.status
            await _respond(send, status, err.body(), JSON, err.headers)
        except _Disconnected:
            status = 499
        except Exception:  # noqa: BLE001 - answer 500 and keep serving
            log.exception("%s %s failed", method, path)
            status = 500
            await _respond(send, 500, HTTPError(500, "internal error; see the server log").body(), JSON)
        finally:
            self.metrics.observe(endpoint, status, time.perf_counter() - started)

    async def _read_body(self, headers, receive) -> bytes:
        for name, value in headers:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise HTTPError(400, "Content-Length is not a number", "content-length") from None
                if declared > self.max_body:
                    raise HTTPError(413, f"request body of {declared} bytes exceeds the limit of "
                                         f"{self.max_body} (FRESHET_MAX_BODY_BYTES)", "body")
                break
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise HTTPError(413, f"request body exceeds the limit of {self.max_body} bytes "
                                     "(FRESHET_MAX_BODY_BYTES)", "body")
            chunks.append(chunk)
            if not message.get("more_body"):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _delegate(self, scope, receive, send) -> int:
        status = 500

        async def capture(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.api(scope, receive, capture)
        return status

    # -- start-up and shutdown -------------------------------------------------

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:  # noqa: BLE001 - report, uvicorn exits
                    log.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        if self.predictor.prediction_log is not None:
            self.predictor.prediction_log.start()
        if self.follower is not None:
            await asyncio.to_thread(self.follower.start)
        self._tasks.append(asyncio.get_running_loop().create_task(self._refresh_registry()))
        if self.metrics.share is not None:
            self._tasks.append(asyncio.get_running_loop().create_task(self._publish_metrics()))
        # Feast, MLflow and their imports leave ~300k long-lived objects; a full collection
        # over them pauses the loop for hundreds of ms. Everything allocated so far stays.
        gc.collect()
        gc.freeze()
        log.info("serving on %s:%s (model %s %s)", self.settings.http_host, self.settings.http_port,
                 self.model_name, self.follower.model.version if self.follower and self.follower.model else "none")

    async def shutdown(self) -> None:
        if self.dashboard.feed is not None:
            await asyncio.to_thread(self.dashboard.feed.stop)
        for task in self._tasks:
            task.cancel()
        if self.follower is not None:
            await asyncio.to_thread(self.follower.stop)
        if self.predictor.prediction_log is not None:
            await asyncio.to_thread(self.predictor.prediction_log.close)
        await self.reader.aio.close()
        if self.metrics.share is not None:
            self.metrics.share.publish()  # this worker's final counts stay in the other workers' sums
            self.metrics.share.close()

    async def _publish_metrics(self) -> None:
        # on the loop, like the request path that updates the counters: no lock needed
        while True:
            await asyncio.sleep(METRICS_PUBLISH_S)
            try:
                self.metrics.share.publish()
            except OSError as exc:
                log.warning("could not publish this worker's metrics to %s: %s", self.metrics.share.directory, exc)

    async def _refresh_registry(self) -> None:
        # a file registry is a stat per check; any other kind is a query, so ask less often
        every = (self.reader.refresh_s or 1.0) if self.reader.watches_file else 30.0
        while True:
            await asyncio.sleep(every)
            try:
                await asyncio.to_thread(self.reader.refresh_if_changed)
            except Exception as exc:  # noqa: BLE001 - keep serving with the registry we have
                log.warning("feature registry refresh failed: %s", exc)

    # -- endpoints (/predict is the Predictor's) -------------------------------

    async def get_online_features(self, body: bytes) -> tuple[int, bytes, bytes]:
        """Feast's /get-online-features: the same request and response JSON."""
        features, service, full, entities = features_request(body, self.settings.max_rows_per_request,
                                                             self.settings.max_features_per_request)
        try:
            plan = self.reader.plan(features, service, full)
            result = await self.reader.read_async(plan, entities)
        except TypeError:  # unhashable feature refs
            raise HTTPError(422, "must be a list of 'view:feature' strings", "features") from None
        self.metrics.observe_features(result)
        return 200, orjson.dumps(result.to_feast_dict()), JSON

    async def health(self, body: bytes) -> tuple[int, bytes, bytes]:
        return 200, b'{"status":"ok"}', JSON

    async def ready(self, body: bytes) -> tuple[int, bytes, bytes]:
        """Ready or not, and nothing else: hosts, errors and versions are for the admin scope."""
        status, _, _ = await self.ready_in_detail(body)
        return status, b'{"ready":true}' if status == 200 else b'{"ready":false}', JSON

    async def ready_in_detail(self, body: bytes) -> tuple[int, bytes, bytes]:
        """/ready with the admin credential: each check, the version served, and why the champion is not."""
        checks: dict[str, str] = {}
        try:
            await self.reader.aio.ping()
            checks["redis"] = "ok"
        except (RedisUnavailable, asyncio.TimeoutError) as exc:
            checks["redis"] = str(exc) or "timed out"
        if self.follower is None:
            checks["model"] = "model serving is off"
        elif self.follower.model is None:
            checks["model"] = self.follower.last_error or "no model loaded yet"
        else:
            checks["model"] = "ok"
        ok = all(v == "ok" for v in checks.values())
        model = self.follower.model if self.follower else None
        doc = {"ready": ok, "checks": checks,
               "model": {"name": model.name, "version": model.version} if model else None}
        if self.follower is not None and self.follower.last_error:
            doc["model_error"] = self.follower.last_error
        if self.follower is not None:
            doc["challengers"] = self.follower.challengers.describe()
            if self.follower.challenger_error:
                doc["challenger_error"] = self.follower.challenger_error
        return (200 if ok else 503), orjson.dumps(doc), JSON

    async def scrape(self, body: bytes) -> tuple[int, bytes, bytes]:
        """/metrics: what a Prometheus scrape reads."""
        return 200, self.metrics.exposition(), CONTENT_TYPE_LATEST.encode()


class _Disconnected(Exception):
    pass


def _endpoint_label(path: str) -> str:
    if path.startswith("/models/"):
        parts = path.strip("/").split("/")
        return "/models/{name}" + ("/" + parts[2] if len(parts) > 2 else "")
    if path in ("/models", "/docs", "/openapi.json", "/redoc"):
        return path
    return "other"


async def _respond(send, status: int, body: bytes, content_type: bytes, headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", b"%d" % len(body)),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def create_app(settings: Settings, *, model_name: str | None = None, reader: OnlineFeatureReader | None = None,
               registry: ModelRegistry | None = None, follow_models: bool = True, log_predictions: bool = True,
               model_poll_s: float = 30.0, tokens: dict[str, str] | None = None,
               metrics_dir: str | None = None) -> ServingApp:
    """Build the ASGI app: feature reader, model registry and follower, prediction log, scoped credentials.

    The model served is `model_name`, else settings.model_name (FRESHET_MODEL_NAME); `tokens`
    maps each scope to its token (default: the settings, else the token files in the data dir).
    With `metrics_dir` (serve --workers N), /metrics answers for every worker sharing it.
    """
    model_name = model_name or settings.model_name
    tokens = tokens or resolve_credentials(settings)
    reader = reader or OnlineFeatureReader(settings)
    follower = None
    if follow_models:
        registry = registry or ModelRegistry(settings)
        follower = ModelFollower(settings, model_name, registry=registry, poll_s=model_poll_s)
    plog = PredictionLog(settings) if log_predictions else None
    app = ServingApp(settings, reader, registry, follower, plog, tokens, model_name)
    if metrics_dir is not None:
        app.metrics.share_with(metrics_dir)
    return app
