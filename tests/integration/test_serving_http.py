"""The HTTP API on a real uvicorn, Redis, Kafka and MLflow: Feast's shapes, predictions, auth, bad input."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import stat
import subprocess
import time
import uuid

import httpx
import pytest
import redis

from freshet import kafka
from freshet.contracts import Prediction
from freshet.app.stack import free_port, redis_binary, wait_for_redis
from freshet.serving.app import create_app
from freshet.models import ModelRegistry
from freshet.serving.online import OnlineFeatureReader
from test_serving_support import (  # noqa: F401 - fixtures
    applied_settings, feast_store, fit_fraud_pipeline, serve, with_topics,
)

pytestmark = pytest.mark.integration

TOKEN = "test-token-123"
MODEL_FEATURES = ["card_txn_stats:sum_amount_300s", "merchant_txn_stats:count_amount_3600s", "amount"]


@pytest.fixture(scope="module")
def uid():
    return "h" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def settings(applied_settings, uid):  # noqa: F811
    s = with_topics(applied_settings, uid, api_token=TOKEN)
    kafka.ensure_topics(s, [s.topic_predictions, s.topic_models])
    return s


@pytest.fixture(scope="module")
def model_name(settings, uid):
    reg = ModelRegistry(settings)
    for seed in (0, 1):
        reg.register_sklearn(f"{uid}-fraud", fit_fraud_pipeline(seed), MODEL_FEATURES,
                             {"feature_service": "fraud_model_v1", "seed": seed}, {"auc": 0.7 + seed / 10})
    reg.promote(f"{uid}-fraud", "1")
    return f"{uid}-fraud"


@pytest.fixture(scope="module")
def reader(settings, feast_store):  # noqa: F811
    return OnlineFeatureReader(settings, store=feast_store)


@pytest.fixture(scope="module")
def server(settings, reader, model_name):
    app = create_app(settings, model_name=model_name, reader=reader, model_poll_s=1.0)
    with serve(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server[0], headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def data(reader, uid):
    """Two cards and a merchant with feature rows; a third card that was never seen."""
    client = redis.Redis.from_url(reader.settings.redis_url)
    now = time.time()
    views = reader.layout.views
    cards = {}
    for i, card in enumerate((f"{uid}-c1", f"{uid}-c2")):
        cards[card] = {f: (i + j if t == "INT64" else (i + 1) * 10.5 + j) for j, (f, t) in
                       enumerate(views["card_txn_stats"].features.items())}
        reader.layout.write(client, "card_txn_stats", [((card,), cards[card], now - 5)])
    merchant = {f: (7 if t == "INT64" else 3.25) for f, t in views["merchant_txn_stats"].features.items()}
    reader.layout.write(client, "merchant_txn_stats", [((f"{uid}-m",), merchant, now - 5)])
    return {"cards": cards, "merchant": merchant, "m": f"{uid}-m", "unseen": f"{uid}-c9"}


# -- /get-online-features ------------------------------------------------------------------------

def test_feast_shaped_request_returns_feast_shaped_response_with_feasts_values(http, data, feast_store):  # noqa: F811
    cards = list(data["cards"])
    refs = ["card_txn_stats:sum_amount_300s", "card_txn_stats:count_amount_300s", "merchant_txn_stats:max_amount_300s"]
    resp = http.post("/get-online-features", json={
        "features": refs, "entities": {"card_id": cards, "merchant_id": [data["m"]] * 2}})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["metadata"]["feature_names"] == ["card_id", "merchant_id", "sum_amount_300s", "count_amount_300s",
                                                 "max_amount_300s"]
    feast = feast_store.get_online_features(
        features=refs, entity_rows=[{"card_id": c, "merchant_id": data["m"]} for c in cards]).to_dict()
    for name, result in zip(body["metadata"]["feature_names"], body["results"]):
        assert result["values"] == feast[name], name
        assert result["statuses"] == ["PRESENT", "PRESENT"]
        assert len(result["event_timestamps"]) == 2
    assert body["results"][2]["event_timestamps"][0].endswith("Z")


def test_feature_service_with_full_feature_names(http, data):
    card = next(iter(data["cards"]))
    resp = http.post("/get-online-features", json={
        "feature_service": "fraud_model_v1", "full_feature_names": True,
        "entities": {"card_id": [card], "merchant_id": [data["m"]]}})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    values = dict(zip(body["metadata"]["feature_names"], (r["values"][0] for r in body["results"])))
    assert values["card_txn_stats__mean_amount_300s"] == data["cards"][card]["mean_amount_300s"]
    assert values["merchant_txn_stats__count_amount_300s"] == 7
    assert len(values) == 2 + 36


def test_feast_python_client_shape_is_accepted_by_pydantic_model_of_feast(http, data):
    from feast.feature_server import OnlineFeaturesResponse

    resp = http.post("/get-online-features", json={"features": ["card_txn_stats:sum_amount_300s"],
                                                   "entities": {"card_id": [next(iter(data["cards"]))]}})
    parsed = OnlineFeaturesResponse.model_validate(resp.json())
    assert parsed.metadata.feature_names == ["card_id", "sum_amount_300s"]


def test_unknown_entity_is_not_found(http, data):
    resp = http.post("/get-online-features", json={"features": ["card_txn_stats:sum_amount_300s"],
                                                   "entities": {"card_id": [data["unseen"]]}})
    assert resp.status_code == 200
    assert resp.json()["results"][1] == {"values": [None], "statuses": ["NOT_FOUND"],
                                         "event_timestamps": ["1970-01-01T00:00:00Z"]}


# -- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("body,status,field", [
    (b"{not json", 400, "body"),
    (b"", 400, "body"),
    (b"[1, 2]", 422, "body"),
    (b'{"features": "card_txn_stats:sum_amount_300s", "entities": {"card_id": ["a"]}}', 422, "features"),
    (b'{"features": [3], "entities": {"card_id": ["a"]}}', 422, "features[0]"),
    (b'{"features": ["card_txn_stats:sum_amount_300s"]}', 422, "entities"),
    (b'{"features": ["card_txn_stats:sum_amount_300s"], "entities": {"card_id": [1]}}', 422, "entities.card_id[0]"),
    (b'{"features": ["card_txn_stats:sum_amount_300s"], "entities": {"card_id": "a"}}', 422, "entities.card_id"),
    (b'{"features": ["card_txn_stats:sum_amount_300s"], "entities": {"merchant_id": ["a"]}}', 422,
     "entities.card_id"),
    (b'{"features": ["card_txn_stats:sum_amount_300s"], "entities": {"card_id": ["a"]}, "full_feature_names": 1}',
     422, "full_feature_names"),
    (b'{"feature_service": 5, "entities": {"card_id": ["a"]}}', 422, "feature_service"),
])
def test_malformed_or_mistyped_requests_are_400_or_422_naming_the_field(http, body, status, field):
    resp = http.post("/get-online-features", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == status, resp.text
    assert resp.json()["field"] == field


@pytest.mark.parametrize("request_body,name", [
    ({"features": ["no_such_view:x"], "entities": {"card_id": ["a"]}}, "no_such_view"),
    ({"features": ["card_txn_stats:no_such_feature"], "entities": {"card_id": ["a"]}}, "card_txn_stats:no_such_feature"),
    ({"feature_service": "no_such_service", "entities": {"card_id": ["a"]}}, "no_such_service"),
])
def test_unknown_view_feature_or_service_is_404_naming_it(http, request_body, name):
    resp = http.post("/get-online-features", json=request_body)
    assert resp.status_code == 404
    assert name in resp.json()["detail"]


def test_oversized_body_is_413(http, settings):
    big = b'{"features": [], "entities": {"card_id": ["' + b"x" * settings.max_body_bytes + b'"]}}'
    resp = http.post("/get-online-features", content=big, headers={"content-type": "application/json"})
    assert resp.status_code == 413

    def chunks():  # no Content-Length: the limit applies while reading
        for _ in range(settings.max_body_bytes // 65536 + 2):
            yield b"x" * 65536

    resp = http.post("/get-online-features", content=chunks(), headers={"content-type": "application/json"})
    assert resp.status_code == 413


# -- auth --------------------------------------------------------------------------------------

def test_every_endpoint_but_health_ready_and_metrics_needs_the_bearer_token(server, model_name):
    url = server[0]
    for method, path in (("POST", "/get-online-features"), ("POST", "/predict"), ("GET", "/models"),
                         ("GET", f"/models/{model_name}"), ("POST", f"/models/{model_name}/promote"),
                         ("POST", f"/models/{model_name}/rollback"), ("GET", "/docs"), ("GET", "/nope")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            resp = httpx.request(method, url + path, headers=headers, json={})
            assert resp.status_code == 401, (method, path, headers)
            assert resp.headers["www-authenticate"] == "Bearer"
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(url + path).status_code == 200, path


def test_without_a_configured_token_one_is_generated_into_the_data_dir_readable_by_owner_only(settings, tmp_path):
    from freshet.serving.auth import resolve_token

    s = dataclasses.replace(settings, api_token="", data_dir=str(tmp_path))
    token = resolve_token(s)
    path = tmp_path / "api-token"
    assert path.read_text().strip() == token and len(token) >= 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert resolve_token(s) == token  # a restart (or a second server on this data dir) keeps it


# -- predictions -------------------------------------------------------------------------------

def test_predict_scores_with_the_served_model_and_logs_to_the_topic(http, data, settings, model_name):
    card = next(iter(data["cards"]))
    resp = http.post("/predict", json={"entities": {"card_id": card, "merchant_id": data["m"]},
                                       "fields": {"amount": 42.0}})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == model_name and body["model_version"] == "1"
    assert body["features"] == {"card_txn_stats:sum_amount_300s": data["cards"][card]["sum_amount_300s"],
                                "merchant_txn_stats:count_amount_3600s": 7, "amount": 42.0}
    model = ModelRegistry(settings).load(model_name, "1")
    expected = model.score_one([data["cards"][card]["sum_amount_300s"], 7, 42.0])
    assert body["score"] == pytest.approx(expected, rel=1e-12)
    assert body["label"] == model.label(expected) and body["missing"] == []

    batch = http.post("/predict", json={"instances": [
        {"entities": {"card_id": c, "merchant_id": data["m"]}, "fields": {"amount": 1.0}}
        for c in [*data["cards"], data["unseen"]]]})
    assert batch.status_code == 200, batch.text
    preds = batch.json()["predictions"]
    assert len(preds) == 3 and len({p["request_id"] for p in preds}) == 3
    assert preds[2]["missing"] == ["card_txn_stats:sum_amount_300s"]  # an unseen card: filled by the model

    want = {body["request_id"], *(p["request_id"] for p in preds)}
    consumer = kafka.consumer(settings, f"{settings.topic_predictions}-check")
    consumer.subscribe([settings.topic_predictions])
    seen: dict[str, Prediction] = {}
    deadline = time.monotonic() + 30
    while not want <= set(seen) and time.monotonic() < deadline:
        msg = consumer.poll(0.2)
        if msg is not None and not msg.error():
            p = Prediction.decode(msg.value())
            seen[p.request_id] = p
            assert msg.key() == p.request_id.encode()
    consumer.close()
    assert want <= set(seen)
    logged = seen[body["request_id"]]
    assert logged.model == model_name and logged.model_version == "1"
    assert logged.entities == {"card_id": card, "merchant_id": data["m"]}
    assert logged.features == body["features"] and logged.score == pytest.approx(body["score"])


def _logged_predictions(settings, want: set[str], timeout: float = 30.0) -> dict[str, tuple[bytes, Prediction]]:
    """(key, message) of the predictions on the topic with these request ids."""
    consumer = kafka.consumer(settings, f"{settings.topic_predictions}-check-{uuid.uuid4().hex[:6]}")
    consumer.subscribe([settings.topic_predictions])
    seen: dict[str, tuple[bytes, Prediction]] = {}
    deadline = time.monotonic() + timeout
    try:
        while not want <= set(seen) and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error():
                p = Prediction.decode(msg.value())
                if p.request_id in want:
                    seen[p.request_id] = (msg.key(), p)
    finally:
        consumer.close()
    return seen


def test_predict_uses_the_clients_request_id_in_the_answer_and_on_the_topic(http, data, settings, model_name, uid):
    card = next(iter(data["cards"]))
    one = http.post("/predict", json={"entities": {"card_id": card, "merchant_id": data["m"]},
                                      "fields": {"amount": 3.0}, "request_id": f"{uid}-tx-1"})
    assert one.status_code == 200, one.text
    assert one.json()["request_id"] == f"{uid}-tx-1"

    batch = http.post("/predict", json={"instances": [
        {"entities": {"card_id": card, "merchant_id": data["m"]}, "request_id": f"{uid}-tx-2"},
        {"entities": {"card_id": data["unseen"], "merchant_id": data["m"]}},  # no id: one is generated
        {"entities": {"card_id": card, "merchant_id": data["m"]}, "request_id": f"{uid}-tx-3"}]})
    assert batch.status_code == 200, batch.text
    ids = [p["request_id"] for p in batch.json()["predictions"]]
    assert ids[0] == f"{uid}-tx-2" and ids[2] == f"{uid}-tx-3"
    assert ids[1] and not ids[1].startswith(uid)

    logged = _logged_predictions(settings, {f"{uid}-tx-1", f"{uid}-tx-2", f"{uid}-tx-3", ids[1]})
    assert set(logged) == {f"{uid}-tx-1", f"{uid}-tx-2", f"{uid}-tx-3", ids[1]}
    for rid, (key, p) in logged.items():
        assert key == rid.encode() and p.model == model_name  # keyed by the id labels will carry
    assert logged[f"{uid}-tx-1"][1].score == pytest.approx(one.json()["score"])
    assert logged[ids[1]][1].entities == {"card_id": data["unseen"], "merchant_id": data["m"]}


@pytest.mark.parametrize("request_body,field", [
    ({"request_id": 17}, "request_id"),
    ({"request_id": ""}, "request_id"),
    ({"request_id": "x" * 129}, "request_id"),
    ({"request_id": "tx\n1"}, "request_id"),
    ({"instances": [{"entities": {"card_id": "c", "merchant_id": "m"}, "request_id": ["a"]}]},
     "instances[0].request_id"),
    ({"instances": [{"entities": {"card_id": "c", "merchant_id": "m"}, "request_id": "a"},
                    {"entities": {"card_id": "d", "merchant_id": "m"}, "request_id": "a"}]},
     "instances[1].request_id"),
    ({"instances": [{"entities": {"card_id": "c", "merchant_id": "m"}}], "request_id": "a"}, "request_id"),
])
def test_a_bad_client_request_id_is_422_naming_the_field(http, request_body, field):
    body = {"entities": {"card_id": "c", "merchant_id": "m"}, **request_body}
    resp = http.post("/predict", json=body)
    assert resp.status_code == 422, resp.text
    assert resp.json()["field"] == field


@pytest.mark.parametrize("request_body,status,field", [
    ({"entities": {"merchant_id": "m"}, "fields": {"amount": 1}}, 422, "entities.card_id"),
    ({"entities": {"card_id": 5, "merchant_id": "m"}}, 422, "entities.card_id"),
    ({"entities": {"card_id": "c", "merchant_id": "m"}, "fields": {"amount": "lots"}}, 422, "fields.amount"),
    ({"instances": [{"entities": {"card_id": "c", "merchant_id": "m"}}, {"entities": {"card_id": "c"}}]}, 422,
     "instances[1].entities.merchant_id"),
    ({"instances": {}}, 422, "instances"),
    ({"instances": []}, 422, "instances"),
    ({"entities": {"card_id": "c", "merchant_id": "m"}, "model": "other"}, 404, "model"),
])
def test_predict_bad_input_names_the_field(http, request_body, status, field):
    resp = http.post("/predict", json=request_body)
    assert resp.status_code == status, resp.text
    assert resp.json()["field"] == field


def test_predictions_still_answer_when_kafka_is_down_and_losses_are_counted(settings, feast_store, model_name,  # noqa: F811
                                                                             data):
    offline = dataclasses.replace(settings, kafka_bootstrap_servers="127.0.0.1:1")
    # its own reader: the module's server runs on another event loop, and a loop's connections are its own
    app = create_app(offline, model_name=model_name, reader=OnlineFeatureReader(settings, store=feast_store),
                     registry=ModelRegistry(settings), model_poll_s=3600)
    app.predictor.prediction_log.close()
    from freshet.serving.predictions import PredictionLog

    app.predictor.prediction_log = PredictionLog(offline, max_pending=5, delivery_timeout_s=1)
    with serve(app) as url:
        card = next(iter(data["cards"]))
        for _ in range(20):  # each answers although no message can leave (the timeout guards a hang)
            resp = httpx.post(url + "/predict", headers={"Authorization": f"Bearer {TOKEN}"},
                              json={"entities": {"card_id": card, "merchant_id": data["m"]}}, timeout=5)
            assert resp.status_code == 200
        metrics = httpx.get(url + "/metrics").text
    log = app.predictor.prediction_log
    # every prediction is handed to the producer or counted lost; the buffer holds 5, and a
    # slot frees only when a message times out undelivered (1 s: a slow machine sees some)
    assert log.published + log.dropped["buffer_full"] == 20, (log.published, log.dropped)
    assert log.published - log.dropped["undelivered"] <= 5 and log.dropped["buffer_full"] >= 5, \
        (log.published, log.dropped)
    assert f'freshet_predictions_dropped_total{{reason="buffer_full"}} {float(log.dropped["buffer_full"])}' in metrics


# -- models ------------------------------------------------------------------------------------

def test_models_endpoints_show_versions_lineage_and_what_is_served(http, model_name):
    listed = http.get("/models").json()
    assert any(m["name"] == model_name for m in listed["models"])
    detail = http.get(f"/models/{model_name}").json()
    assert detail["champion"] == detail["serving"]
    assert {v["version"] for v in detail["versions"]} == {"1", "2"}
    v1 = next(v for v in detail["versions"] if v["version"] == "1")
    assert v1["feature_service"] == "fraud_model_v1" and v1["feature_names"] == MODEL_FEATURES
    assert v1["metrics"]["auc"] == pytest.approx(0.7)
    assert http.get("/models/nope").status_code == 404
    assert http.post(f"/models/{model_name}/promote", json={"version": "99"}).status_code == 404
    assert http.post(f"/models/{model_name}/promote", json={}).status_code == 422


def test_promotion_under_concurrent_load_switches_versions_with_zero_failed_requests(server, data, model_name):
    url, app = server
    card = next(iter(data["cards"]))
    body = {"entities": {"card_id": card, "merchant_id": data["m"]}, "fields": {"amount": 3.0}}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    before = app.follower.model.version
    after = "2" if before == "1" else "1"

    async def load(stop: asyncio.Event, results: list):
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as c:
            async def worker():
                while not stop.is_set():
                    sent = time.monotonic()
                    r = await c.post("/predict", json=body)
                    results.append((sent, r.status_code, r.json().get("model_version")))
            await asyncio.gather(*(worker() for _ in range(16)))

    async def until(condition, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)

    async def scenario():
        results: list = []
        stop = asyncio.Event()
        task = asyncio.ensure_future(load(stop, results))
        await until(lambda: len(results) >= 100, 30)  # under load, answered by the old version
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as admin:
            promoted = await admin.post(f"/models/{model_name}/promote", json={"version": after})
        promoted_at = time.monotonic()
        answered = len(results)
        await until(lambda: len(results) >= answered + 100, 30)  # and as many sent after the promotion
        stop.set()
        await task
        return results, promoted, promoted_at

    results, promoted, promoted_at = asyncio.run(scenario())
    assert promoted.status_code == 200, promoted.text
    assert [r for r in results if r[1] != 200] == []
    versions = [v for _, _, v in results]
    assert versions[0] == before and versions[-1] == after
    # the promoting server switches before it answers the promotion: a request sent after that
    # answer is served by the new version, with no grace period
    assert all(v == after for sent, _, v in results if sent > promoted_at)


def test_rollback_over_http_serves_the_previous_version_again(http, server, model_name):
    app = server[1]
    current = app.follower.model.version
    http.post(f"/models/{model_name}/promote", json={"version": "2" if current == "1" else "1"})
    resp = http.post(f"/models/{model_name}/rollback")
    assert resp.status_code == 200, resp.text
    assert resp.json()["version"] == current and app.follower.model.version == current


# -- operations --------------------------------------------------------------------------------

def test_health_ready_and_metrics(server, http, data, model_name):
    url = server[0]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert httpx.get(url + "/ready").json() == {"ready": True}  # nothing internal without a credential
    ready = http.get("/ready").json()  # the admin credential sees each check
    assert ready["ready"] is True and ready["checks"] == {"redis": "ok", "model": "ok"}
    http.post("/get-online-features", json={"features": ["card_txn_stats:sum_amount_300s"],
                                            "entities": {"card_id": list(data["cards"])}})
    text = httpx.get(url + "/metrics").text
    assert 'freshet_http_request_duration_seconds_bucket{endpoint="/get-online-features"' in text
    assert 'freshet_http_requests_total{endpoint="/get-online-features",status="200"}' in text
    assert 'freshet_http_requests_total{endpoint="/get-online-features",status="404"}' in text
    assert 'freshet_feature_age_seconds_count{view="card_txn_stats"}' in text
    assert f'freshet_model_info{{model="{model_name}",version="{server[1].follower.model.version}"}} 1.0' in text
    assert f'freshet_model_version{{model="{model_name}"}}' in text


def test_openapi_describes_every_endpoint(http):
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/get-online-features", "/predict", "/health", "/ready", "/metrics", "/models", "/models/{name}",
            "/models/{name}/promote", "/models/{name}/rollback"} <= set(paths)


def test_redis_down_is_503_with_the_reason_and_recovers_without_restart(settings, feast_store, tmp_path):  # noqa: F811
    port = free_port()
    s = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{port}/0")
    app = create_app(s, reader=OnlineFeatureReader(s, store=feast_store), follow_models=False,
                     log_predictions=False)
    request = {"features": ["card_txn_stats:sum_amount_300s"], "entities": {"card_id": ["x"]}}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with serve(app) as url:
        resp = httpx.post(url + "/get-online-features", json=request, headers=headers)
        assert resp.status_code == 503
        assert f"127.0.0.1:{port}" in resp.json()["detail"]
        assert httpx.get(url + "/ready").status_code == 503
        proc = subprocess.Popen([redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(tmp_path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_redis(s.redis_url)
            deadline = time.monotonic() + 10
            # the reader reconnects (after its back-off) without a restart: until then 503s
            while (resp := httpx.post(url + "/get-online-features", json=request, headers=headers)).status_code == 503:
                assert time.monotonic() < deadline, resp.text
                time.sleep(0.05)
            assert resp.status_code == 200, resp.text
            assert resp.json()["results"][1]["statuses"] == ["NOT_FOUND"]
        finally:
            proc.terminate()
            proc.wait(5)
        resp = httpx.post(url + "/get-online-features", json=request, headers=headers)
        assert resp.status_code == 503
