"""The FastAPI side of the server: model admin endpoints and the OpenAPI docs of every endpoint.

Owns /models (list, versions, promote, rollback) and the request bodies as the docs show them.
"""

from __future__ import annotations

from typing import Any

from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from freshet.gates import GateFailed
from freshet.models import ModelNotFound, ModelRegistry
from freshet.serving.errors import ANSWERED, HTTPError, as_http_error
from freshet.serving.validation import MAX_REQUEST_ID

DESCRIPTION = ("Feature vectors (Feast's feature-server shapes), predictions from the model version the registry "
               "serves, model admin, health and metrics. Every endpoint but /health, /ready and /metrics needs "
               "'Authorization: Bearer <token>' holding its scope: 'features' for /get-online-features, 'predict' for "
               "/predict, 'admin' (every scope) for /models; 401 without a valid token, 403 naming the scope. "
               "/ready says only whether the server is ready, unless asked with the admin token.")


# Request bodies as the OpenAPI docs show them (the hot paths validate by hand, naming the field).
class GetOnlineFeaturesRequest(BaseModel):
    entities: dict[str, list[Any]] = Field(..., examples=[{"card_id": ["c1"], "merchant_id": ["m1"]}])
    features: list[str] = Field([], examples=[["card_txn_stats:sum_amount_300s"]])
    feature_service: str | None = None
    full_feature_names: bool = False


_REQUEST_ID_DOC = ("the prediction's id in the response and on the predictions topic (e.g. the transaction "
                   "id), so labels published later under it join the prediction; generated when left out")


class Instance(BaseModel):
    entities: dict[str, Any] = Field(..., examples=[{"card_id": "c1", "merchant_id": "m1"}])
    fields: dict[str, float | None] = Field({}, examples=[{"amount": 42.5}])
    request_id: str | None = Field(None, min_length=1, max_length=MAX_REQUEST_ID, description=_REQUEST_ID_DOC,
                                   examples=["tx-0001"])


class PredictRequest(BaseModel):
    entities: dict[str, Any] | None = Field(None, examples=[{"card_id": "c1", "merchant_id": "m1"}])
    fields: dict[str, float | None] | None = None
    request_id: str | None = Field(None, min_length=1, max_length=MAX_REQUEST_ID,
                                   description=_REQUEST_ID_DOC + "; in the batch form, set it per instance")
    instances: list[Instance] | None = Field(None, description="the batch form; then leave entities out")
    model: str | None = None


class PromoteRequest(BaseModel):
    version: str = Field(..., examples=["3"])


class ErrorBody(BaseModel):
    """Every answer other than 200: what is wrong, the status, and the request field it concerns."""

    detail: str
    status: int
    field: str | None = None


class HealthBody(BaseModel):
    status: str


class ReadyBody(BaseModel):
    """Without the admin credential only `ready`; with it each check and the version served."""

    ready: bool
    checks: dict[str, str] | None = None
    model: dict[str, str] | None = None
    model_error: str | None = None


_WHY = {400: "The body is not JSON", 401: "No or an unknown bearer token", 403: "The token lacks the scope needed",
        404: "Unknown model, view, feature or service", 413: "The body, rows or features exceed a limit",
        422: "A field is wrong (named in `field`), or the version fails the model gate",
        503: "The online store, the model or the prediction log is unavailable; retry"}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody, "description": _WHY[code]} for code in codes}


HOT_ERRORS = _errors(400, 401, 403, 404, 413, 422, 503)
ADMIN_ERRORS = _errors(400, 401, 403, 404, 413, 422, 503)


def admin_api(app: Any) -> FastAPI:
    """The FastAPI app behind a ServingApp: what its own router does not answer, and the docs."""
    api = FastAPI(title="freshet serving", description=DESCRIPTION, version="1")

    @api.exception_handler(HTTPError)
    async def _http_error(request, exc: HTTPError):
        return Response(exc.body(), exc.status, media_type="application/json")

    @api.exception_handler(ModelNotFound)
    async def _not_found(request, exc: ModelNotFound):
        return JSONResponse({"detail": str(exc), "status": 404}, 404)

    @api.exception_handler(StarletteHTTPException)
    async def _starlette_error(request, exc: StarletteHTTPException):  # e.g. a body that is not JSON: one shape
        return JSONResponse({"detail": str(exc.detail), "status": exc.status_code}, exc.status_code,
                            headers=getattr(exc, "headers", None))

    @api.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):  # the hot paths' error shape, field named
        first = exc.errors()[0] if exc.errors() else {}
        field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return JSONResponse({"detail": str(first.get("msg", "invalid request")), "status": 422, "field": field}, 422)

    _declare_hot_routes(api, app.routes)
    _add_model_routes(api, app)
    return api


def _declare_hot_routes(api: FastAPI, routes: dict) -> None:
    """The routes ServingApp answers before FastAPI sees them, declared here for the docs."""

    async def answer(method: str, path: str, request: Request):
        try:
            status, body, ctype = await routes[(method, path)](await request.body())
        except ANSWERED as exc:
            err = as_http_error(exc)
            return Response(err.body(), err.status, media_type="application/json")
        return Response(body, status, media_type=ctype.decode())

    @api.post("/get-online-features", tags=["features"], summary="Feature vectors (Feast's request/response)",
              responses=HOT_ERRORS)
    async def get_online_features(request: Request, _: GetOnlineFeaturesRequest = Body(...)):
        return await answer("POST", "/get-online-features", request)

    @api.post("/predict", tags=["predictions"], responses=HOT_ERRORS,
              summary="Score one instance (entities + fields) or a batch (instances) with the served model")
    async def predict(request: Request, _: PredictRequest = Body(...)):
        return await answer("POST", "/predict", request)

    @api.get("/health", tags=["operations"], summary="Liveness", response_model=HealthBody)
    async def health(request: Request):
        return await answer("GET", "/health", request)

    @api.get("/ready", tags=["operations"], summary="Readiness: Redis reachable and a model loaded",
             response_model=ReadyBody, responses={503: {"model": ReadyBody, "description": "Not ready"}})
    async def ready(request: Request):
        return await answer("GET", "/ready", request)

    @api.get("/metrics", tags=["operations"], summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics(request: Request):
        return await answer("GET", "/metrics", request)


def _add_model_routes(api: FastAPI, app: Any) -> None:
    """/models: what is registered and served, and the admin's promote and rollback."""

    def registry() -> ModelRegistry:
        if app.registry is None:
            raise HTTPError(503, "no model registry configured")
        return app.registry

    def served():
        return app.follower.model if app.follower else None

    @api.get("/models", tags=["models"], summary="Registered models and what their aliases point at",
             responses=ADMIN_ERRORS)
    def list_models():
        model = served()
        return {"models": registry().models(),
                "serving": {"name": model.name, "version": model.version} if model else None}

    @api.get("/models/{name}", tags=["models"], responses=ADMIN_ERRORS,
             summary="Versions of a model: stage, metrics, parameters, training lineage")
    def get_model(name: str):
        reg = registry()
        model = served()
        return {"name": name, "champion": reg.current_version(name),
                "serving": model.version if model and model.name == name else None, "versions": reg.versions(name)}

    @api.post("/models/{name}/promote", tags=["models"], responses=ADMIN_ERRORS,
              summary="Serve this version (admin); 422 naming the reason when it fails the model gate")
    def promote(name: str, req: PromoteRequest):
        reg = registry()
        try:
            model = reg.load(name, req.version)
        except ModelNotFound:
            raise
        except (ValueError, KeyError, TypeError) as exc:  # a malformed artifact
            raise HTTPError(422, f"not promoted: version {req.version} does not load: {exc}", "version") from None
        try:
            app.gate(model)
        except GateFailed as exc:
            raise HTTPError(422, f"not promoted: {exc}", "version") from None
        event = reg.promote(name, req.version)
        if app.follower is not None and name == app.follower.name:
            app.follower.check()  # this server switches now; others follow the event
        return event.to_dict()

    @api.post("/models/{name}/rollback", tags=["models"], summary="Serve the previously promoted version (admin)",
              responses=ADMIN_ERRORS)
    def rollback(name: str):
        event = registry().rollback(name)
        if app.follower is not None and name == app.follower.name:
            app.follower.check()
        return event.to_dict()
