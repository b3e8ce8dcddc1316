"""The HTTP API: feature vectors, predictions, model admin, health and metrics.

Owns routing, prediction and the mapping of errors to statuses. The hot
endpoints (/get-online-features, /predict, /health, /ready, /metrics)
are answered by a small ASGI router in front of FastAPI; FastAPI (freshet.serving.admin)
serves the model admin endpoints and the OpenAPI docs, which describe every endpoint.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import secrets
import time
from bisect import bisect_left
from typing import Awaitable, Callable

import orjson
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from freshet.settings import DEFAULT_MODEL_NAME, Settings
from freshet.models import LinearModel, ModelFollower, ModelRegistry
from freshet.serving.admin import admin_api
from freshet.serving.auth import BearerAuth, resolve_token
from freshet.serving.errors import ANSWERED, JSON, HTTPError, as_http_error
from freshet.serving.online import (
    PRESENT, OnlineFeatureReader, ReadPlan, RedisUnavailable, RequestError, UnknownFeature,
)
from freshet.serving.predictions import PredictionLog
from freshet.serving.validation import features_request, parse_instances, predict_request

log = logging.getLogger("freshet.serving")

LATENCY_BUCKETS = (.0001, .00025, .0005, .00075, .001, .0015, .0025, .005, .0075, .01, .025, .05, .1, .25, .5, 1, 2.5)
AGE_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 6 * 3600, 86400, 2 * 86400, 7 * 86400)


class _PredictPlan:
    """How one model version reads its inputs: feature refs from Redis, the rest from the request."""

    def __init__(self, model: LinearModel, reader: OnlineFeatureReader):
        refs = [f for f in model.feature_names if ":" in f]
        self.read: ReadPlan | None = reader.plan(refs, full_feature_names=True) if refs else None
        self.fields = [f for f in model.feature_names if ":" not in f]
        position = {r: i for i, r in enumerate(self.read.refs)} if self.read else {}
        # per model input: (True, index into the read result, index of its view) or (False, field name, -1)
        self.inputs = [(True, position[f], self.read.feature_view[position[f]]) if ":" in f else (False, f, -1)
                       for f in model.feature_names]
        self.key_types: dict[str, str] = {}
        for vr in (self.read.views if self.read else []):
            self.key_types.update(zip(vr.view.join_keys, vr.view.join_key_types))
        self.generation = reader.generation


def _model_inputs(plan: _PredictPlan, result, fields_rows: list[dict]) -> list[list]:
    """One row of model inputs per instance; missing and stale features are None (the model fills them)."""
    inputs = plan.inputs
    if result is None:
        return [[fields.get(ref) for _, ref, _ in inputs] for fields in fields_rows]
    values, row_status = result.values, result.row_status
    rows = []
    for r, fields in enumerate(fields_rows):
        present = [statuses[r] is PRESENT for statuses in row_status]  # per view
        rows.append([(values[ref][r] if present[view] else None) if from_store else fields.get(ref)
                     for from_store, ref, view in inputs])
    return rows


class ServingApp:
    """The ASGI application. Build it with `create_app`."""

    def __init__(self, settings: Settings, reader: OnlineFeatureReader, registry: ModelRegistry | None,
                 follower: ModelFollower | None, prediction_log: PredictionLog | None, token: str,
                 model_name: str = DEFAULT_MODEL_NAME):
        self.settings = settings
        self.reader = reader
        self.registry = registry
        self.follower = follower
        self.prediction_log = prediction_log
        self.model_name = model_name
        self.auth = BearerAuth(token)
        self.max_body = settings.max_body_bytes
        self._predict_plans: dict[tuple[str, str], _PredictPlan] = {}
        self._tasks: list[asyncio.Task] = []
        # request ids: 64 random bits per process + a counter, unique without a syscall per request
        self._id_prefix = secrets.token_hex(8)
        self._ids = itertools.count()
        self._init_metrics()
        self.routes: dict[tuple[str, str], Callable[[bytes], Awaitable[tuple[int, bytes, bytes]]]] = {
            ("POST", "/get-online-features"): self.get_online_features,
            ("POST", "/predict"): self.predict,
            ("GET", "/health"): self.health,
            ("GET", "/ready"): self.ready,
            ("GET", "/metrics"): self.metrics,
        }
        self.api = admin_api(self)
        if follower is not None:
            follower.on_change = self._model_changed

    # -- metrics ---------------------------------------------------------------

    def _init_metrics(self) -> None:
        r = self.metrics_registry = CollectorRegistry(auto_describe=True)
        # Per-request metrics are plain counters exposed by a collector: prometheus_client's own
        # children cost several microseconds each (more in multiprocess mode, which importing
        # feast switches on), on the path every request takes.
        self.latency: dict[str, _Histogram] = {}
        self.requests: dict[tuple[str, int], int] = {}
        self.feature_age: dict[str, _Histogram] = {}
        self.feature_rows: dict[tuple[str, str], int] = {}
        self.predictions: dict[tuple[str, str], int] = {}
        self._model_version = Gauge("freshet_model_version", "Model version in use", ["model"], registry=r)
        self._model_info = Gauge("freshet_model_info", "1 for the model version in use, 0 for versions "
                                 "served before", ["model", "version"], registry=r)
        r.register(_HotMetrics(self))

    def _observe(self, endpoint: str, status: int, seconds: float) -> None:
        hist = self.latency.get(endpoint)
        if hist is None:
            hist = self.latency[endpoint] = _Histogram(LATENCY_BUCKETS)
        hist.observe(seconds)
        key = (endpoint, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def _observe_features(self, result) -> None:
        now = time.time()
        views = self.reader.layout.views
        rows = self.feature_rows
        for view, stamps in result.view_ts.items():
            hist = self.feature_age.get(view)
            if hist is None:
                hist = self.feature_age[view] = _Histogram(AGE_BUCKETS)
            ttl = views[view].ttl_s if view in views else 0
            for ts in stamps:
                if ts is None:
                    status = "not_found"
                else:
                    age = now - ts
                    hist.observe(age)
                    status = "stale" if ttl and age > ttl else "present"
                key = (view, status)
                rows[key] = rows.get(key, 0) + 1

    def _model_changed(self, old: LinearModel | None, new: LinearModel) -> None:
        if old is not None:
            self._model_info.labels(old.name, old.version).set(0)
        self._model_info.labels(new.name, new.version).set(1)
        if new.version.isdigit():
            self._model_version.labels(new.name).set(int(new.version))

    # -- ASGI ------------------------------------------------------------------

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "http":
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
            self.auth.check(path, headers)
            if handler is None:
                status = await self._delegate(scope, receive, send)
                return
            body = await self._read_body(headers, receive) if method == "POST" else b""
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
            self._observe(endpoint, status, time.perf_counter() - started)

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
        if self.prediction_log is not None:
            self.prediction_log.start()
        if self.follower is not None:
            await asyncio.to_thread(self.follower.start)
        self._tasks.append(asyncio.get_running_loop().create_task(self._refresh_registry()))
        # Feast, MLflow and their imports leave ~300k long-lived objects; a full collection
        # over them pauses the loop for hundreds of ms. Everything allocated so far stays.
        gc.collect()
        gc.freeze()
        log.info("serving on %s:%s (model %s %s)", self.settings.http_host, self.settings.http_port,
                 self.model_name, self.follower.model.version if self.follower and self.follower.model else "none")

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.follower is not None:
            await asyncio.to_thread(self.follower.stop)
        if self.prediction_log is not None:
            await asyncio.to_thread(self.prediction_log.close)
        await self.reader.aio.close()

    async def _refresh_registry(self) -> None:
        # a file registry is a stat per check; any other kind is a query, so ask less often
        every = (self.reader.refresh_s or 1.0) if self.reader.watches_file else 30.0
        while True:
            await asyncio.sleep(every)
            try:
                await asyncio.to_thread(self.reader.refresh_if_changed)
            except Exception as exc:  # noqa: BLE001 - keep serving with the registry we have
                log.warning("feature registry refresh failed: %s", exc)

    # -- endpoints -------------------------------------------------------------

    async def get_online_features(self, body: bytes) -> tuple[int, bytes, bytes]:
        """Feast's /get-online-features: the same request and response JSON."""
        features, service, full, entities = features_request(body)
        try:
            plan = self.reader.plan(features, service, full)
            result = await self.reader.read_async(plan, entities)
        except TypeError:  # unhashable feature refs
            raise HTTPError(422, "must be a list of 'view:feature' strings", "features") from None
        self._observe_features(result)
        return 200, orjson.dumps(result.to_feast_dict()), JSON

    async def predict(self, body: bytes) -> tuple[int, bytes, bytes]:
        """Score one instance or a batch with the served model version."""
        model = self.follower.model if self.follower is not None else None
        if model is None:
            reason = self.follower.last_error if self.follower is not None else "model serving is off"
            raise HTTPError(503, f"no model to serve: {reason}; promote a version of {self.model_name!r} "
                                 "(freshet retrain --bootstrap)", headers=[(b"retry-after", b"5")])
        instances, batch = predict_request(body, model.name)
        plan = self._predict_plan(model)
        columns, fields_rows, request_ids = parse_instances(instances, batch, plan.key_types, plan.fields,
                                                            model.name)
        result = await self.reader.read_async(plan.read, columns) if plan.read else None
        rows = _model_inputs(plan, result, fields_rows)
        scores = [model.score_one(rows[0])] if len(rows) == 1 else model.predict_proba(rows)
        now = time.time()
        names = model.feature_names
        out = []
        log_ = self.prediction_log
        for r, x in enumerate(rows):
            score = float(scores[r])
            label = model.label(score)
            request_id = request_ids[r] or f"{self._id_prefix}{next(self._ids):016x}"
            features = dict(zip(names, x))
            entities = {k: col[r] for k, col in columns.items()}
            prediction = {"score": score, "label": label}
            if log_ is not None:
                log_.publish(request_id, model.name, model.version, entities, features, prediction, now)
            out.append({"request_id": request_id, "score": score, "label": label, "features": features,
                        "missing": [n for n, v in zip(names, x) if v is None]})
        served = (model.name, model.version)
        self.predictions[served] = self.predictions.get(served, 0) + len(out)
        if result is not None:
            self._observe_features(result)
        head = {"model": model.name, "model_version": model.version}
        doc = {**head, "predictions": out} if batch else {**head, **out[0]}
        return 200, orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY), JSON

    def _predict_plan(self, model: LinearModel) -> _PredictPlan:
        plan = self._predict_plans.get((model.name, model.version))
        if plan is None or plan.generation != self.reader.generation:
            try:
                plan = _PredictPlan(model, self.reader)
            except (UnknownFeature, RequestError) as exc:
                raise HTTPError(503, f"model {model.name!r} version {model.version} needs features the "
                                     f"registry does not serve: {exc}") from None
            if len(self._predict_plans) > 16:
                self._predict_plans.clear()
            self._predict_plans[(model.name, model.version)] = plan
        return plan

    async def health(self, body: bytes) -> tuple[int, bytes, bytes]:
        return 200, b'{"status":"ok"}', JSON

    async def ready(self, body: bytes) -> tuple[int, bytes, bytes]:
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
        return (200 if ok else 503), orjson.dumps(doc), JSON

    async def metrics(self, body: bytes) -> tuple[int, bytes, bytes]:
        return 200, generate_latest(self.metrics_registry), CONTENT_TYPE_LATEST.encode()


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


class _Histogram:
    """A Prometheus histogram without locks: observed from the event loop thread only."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # buckets are "<= le"
        self.sum += value

    def buckets(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts):
            total += n
            out.append((bound, total))
        return out


class _HotMetrics:
    """Prometheus view of the per-request counters and of the prediction log."""

    def __init__(self, app: ServingApp):
        self.app = app

    def describe(self):
        return []

    def collect(self):
        app = self.app
        latency = HistogramMetricFamily("freshet_http_request_duration_seconds", "HTTP request latency by endpoint",
                                        labels=["endpoint"])
        for endpoint, h in list(app.latency.items()):
            latency.add_metric([endpoint], h.buckets(), h.sum)
        yield latency
        requests = CounterMetricFamily("freshet_http_requests", "HTTP requests by endpoint and status",
                                       labels=["endpoint", "status"])
        for (endpoint, status), n in list(app.requests.items()):
            requests.add_metric([endpoint, str(status)], n)
        yield requests
        age = HistogramMetricFamily("freshet_feature_age_seconds", "Age of the feature rows served, by view",
                                    labels=["view"])
        for view, h in list(app.feature_age.items()):
            age.add_metric([view], h.buckets(), h.sum)
        yield age
        rows = CounterMetricFamily("freshet_feature_rows", "Entity rows read per view: present, stale (older "
                                   "than the view's TTL) or not_found", labels=["view", "status"])
        for (view, status), n in list(app.feature_rows.items()):
            rows.add_metric([view, status], n)
        yield rows
        preds = CounterMetricFamily("freshet_predictions", "Predictions answered", labels=["model", "version"])
        for (model, version), n in list(app.predictions.items()):
            preds.add_metric([model, version], n)
        yield preds
        plog = app.prediction_log
        if plog is not None:
            plog.hand_over()
        published = CounterMetricFamily("freshet_predictions_logged", "Predictions handed to the Kafka producer")
        dropped = CounterMetricFamily("freshet_predictions_dropped", "Predictions not logged, by reason",
                                      labels=["reason"])
        pending = GaugeMetricFamily("freshet_prediction_log_pending", "Predictions queued for Kafka")
        if plog is not None:
            published.add_metric([], plog.published)
            for reason, n in plog.dropped.items():
                dropped.add_metric([reason], n)
            pending.add_metric([], plog.pending)
        yield published
        yield dropped
        yield pending


# ---------------------------------------------------------------------------
# construction
# ---------------------------------------------------------------------------

def create_app(settings: Settings, *, model_name: str | None = None, reader: OnlineFeatureReader | None = None,
               registry: ModelRegistry | None = None, follow_models: bool = True, log_predictions: bool = True,
               model_poll_s: float = 30.0, token: str | None = None) -> ServingApp:
    """Build the ASGI app: feature reader, model registry and follower, prediction log, auth token.

    The model served is `model_name`, else settings.model_name (FRESHET_MODEL_NAME).
    """
    model_name = model_name or settings.model_name
    token = token or resolve_token(settings)
    reader = reader or OnlineFeatureReader(settings)
    follower = None
    if follow_models:
        registry = registry or ModelRegistry(settings)
        follower = ModelFollower(settings, model_name, registry=registry, poll_s=model_poll_s)
    plog = PredictionLog(settings) if log_predictions else None
    return ServingApp(settings, reader, registry, follower, plog, token, model_name)
