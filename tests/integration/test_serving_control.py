"""The control plane on a real uvicorn, Redis, Kafka and MLflow: scoped credentials, quiet probes, model gates."""

from __future__ import annotations

import dataclasses
import os
import stat
import uuid

import httpx
import pytest

from freshet import kafka
from freshet.gates import VERDICT_TAG
from freshet.models import ModelRegistry
from freshet.serving.app import create_app
from freshet.serving.online import OnlineFeatureReader
from freshet.settings import SettingsError, load_settings
from test_serving_support import (  # noqa: F401 - fixtures
    applied_settings, feast_store, fit_fraud_pipeline, serve, with_topics,
)

pytestmark = pytest.mark.integration

TOKENS = {"admin": "admin-token-1", "predict": "predict-token-1", "features": "features-token-1"}
MODEL_FEATURES = ["card_txn_stats:sum_amount_300s", "merchant_txn_stats:count_amount_3600s", "amount"]


def bearer(scope: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[scope]}"}


@pytest.fixture(scope="module")
def uid():
    return "ctl" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def settings(applied_settings, uid):  # noqa: F811
    s = with_topics(applied_settings, uid, api_token=TOKENS["admin"], api_token_predict=TOKENS["predict"],
                    api_token_features=TOKENS["features"], max_rows_per_request=50, max_features_per_request=5)
    kafka.ensure_topics(s, [s.topic_predictions, s.topic_models])
    return s


def _register_broken(registry: ModelRegistry, name: str, feature_names: list[str] | None = None,
                     scale: list[float] | None = None, coef: list[float] | None = None) -> str:
    """A version whose fitted scaler scale or coefficients are replaced, or whose inputs are renamed
    (what a bad fit or a bad export would register)."""
    import numpy as np

    pipe = fit_fraud_pipeline(0)  # StandardScaler -> LogisticRegression
    if scale is not None:
        pipe[0].scale_ = np.asarray(scale, dtype=float)
    if coef is not None:
        pipe[-1].coef_ = np.asarray([coef], dtype=float)
    return registry.register_sklearn(name, pipe, feature_names or MODEL_FEATURES, {"feature_service": "fraud_model_v1"})


@pytest.fixture(scope="module")
def models(settings, uid):
    """Version 1 good (the champion), 2 good, 3 with every scale 0, 4 reading a feature no service has."""
    reg = ModelRegistry(settings)
    name = f"{uid}-fraud"
    for seed in (0, 1):
        reg.register_sklearn(name, fit_fraud_pipeline(seed), MODEL_FEATURES, {"feature_service": "fraud_model_v1"})
    _register_broken(reg, name, scale=[0.0, 0.0, 0.0])
    _register_broken(reg, name, feature_names=["card_txn_stats:no_such_feature", *MODEL_FEATURES[1:]])
    reg.promote(name, "1")
    return reg, name


@pytest.fixture(scope="module")
def server(settings, feast_store, models):  # noqa: F811
    app = create_app(settings, model_name=models[1], reader=OnlineFeatureReader(settings, store=feast_store),
                     model_poll_s=0.5)
    with serve(app) as url:
        yield url, app


# -- scopes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("scope,method,path,allowed", [
    ("features", "POST", "/get-online-features", True),
    ("features", "POST", "/predict", False),
    ("features", "GET", "/models", False),
    ("predict", "POST", "/predict", True),
    ("predict", "POST", "/get-online-features", False),
    ("predict", "POST", "/models/{name}/promote", False),
    ("predict", "POST", "/models/{name}/rollback", False),
    ("predict", "GET", "/models/{name}", False),
    ("admin", "POST", "/get-online-features", True),
    ("admin", "POST", "/predict", True),
    ("admin", "GET", "/models", True),
])
def test_each_credential_reaches_only_its_scope_and_403_names_the_scope_needed(server, models, scope, method, path,
                                                                               allowed):
    url = server[0] + path.format(name=models[1])
    body = {"entities": {"card_id": ["c"], "merchant_id": ["m"]}, "features": ["card_txn_stats:sum_amount_300s"]}
    if path == "/predict":
        body = {"entities": {"card_id": "c", "merchant_id": "m"}}
    resp = httpx.request(method, url, headers=bearer(scope), json=body, timeout=10)
    if allowed:
        assert resp.status_code == 200, resp.text
    else:
        assert resp.status_code == 403, resp.text
        needed = "features" if path == "/get-online-features" else "predict" if path == "/predict" else "admin"
        assert f"needs the '{needed}' scope" in resp.json()["detail"]
        assert scope in resp.json()["detail"]


def test_an_admin_call_with_the_predict_credential_changes_nothing(server, models):
    url, app = server
    before = app.follower.model.version
    resp = httpx.post(f"{url}/models/{models[1]}/promote", headers=bearer("predict"), json={"version": "2"})
    assert resp.status_code == 403
    assert models[0].current_version(models[1]) == before == "1"


def test_without_configured_tokens_each_scope_gets_its_own_generated_token_readable_by_owner_only(settings, tmp_path):
    from freshet.serving.auth import resolve_credentials

    s = dataclasses.replace(settings, api_token="", api_token_predict="", api_token_features="",
                            data_dir=str(tmp_path))
    tokens = resolve_credentials(s)
    assert len(set(tokens.values())) == 3
    for scope, file in (("admin", "api-token"), ("predict", "api-token-predict"), ("features", "api-token-features")):
        path = tmp_path / file
        assert path.read_text().strip() == tokens[scope] and len(tokens[scope]) >= 32
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert resolve_credentials(s) == tokens  # a restart keeps them


def test_one_token_for_two_scopes_fails_at_start_up_naming_the_settings():
    with pytest.raises(SettingsError, match="FRESHET_API_TOKEN.*FRESHET_API_TOKEN_PREDICT.*must differ"):
        load_settings({"FRESHET_API_TOKEN": "same", "FRESHET_API_TOKEN_PREDICT": "same"})


# -- quiet probes ------------------------------------------------------------------------------

def test_health_and_ready_say_only_ok_without_a_credential_and_details_to_the_admin(server, models):
    url = server[0]
    for headers in ({}, {"Authorization": "Bearer wrong"}, bearer("predict"), bearer("features")):
        assert httpx.get(url + "/health", headers=headers).json() == {"status": "ok"}
        resp = httpx.get(url + "/ready", headers=headers)
        assert resp.status_code == 200 and resp.json() == {"ready": True}, headers
    detail = httpx.get(url + "/ready", headers=bearer("admin")).json()
    assert detail["checks"] == {"redis": "ok", "model": "ok"}
    assert detail["model"]["name"] == models[1]


def test_ready_without_a_credential_hides_the_reason_it_is_not_ready(settings, feast_store, tmp_path):  # noqa: F811
    from freshet.app.stack import free_port

    down = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    app = create_app(down, reader=OnlineFeatureReader(down, store=feast_store), follow_models=False,
                     log_predictions=False, tokens=TOKENS)
    with serve(app) as url:
        quiet = httpx.get(url + "/ready")
        assert quiet.status_code == 503 and quiet.json() == {"ready": False}
        assert "127.0.0.1" not in quiet.text
        detail = httpx.get(url + "/ready", headers=bearer("admin"))
        assert detail.status_code == 503 and "127.0.0.1" in detail.json()["checks"]["redis"]


# -- model gates -------------------------------------------------------------------------------

@pytest.mark.parametrize("version,reason", [
    ("3", "scale must be finite and above 0"),
    ("4", "card_txn_stats:no_such_feature"),
])
def test_a_version_failing_the_gate_is_not_promoted_and_the_reason_is_recorded(server, models, version, reason):
    url, app = server
    registry, name = models
    resp = httpx.post(f"{url}/models/{name}/promote", headers=bearer("admin"), json={"version": version})
    assert resp.status_code == 422, resp.text
    assert reason in resp.json()["detail"] and resp.json()["field"] == "version"
    assert registry.current_version(name) == "1" and app.follower.model.version == "1"
    tag = registry.client.get_model_version(name, version).tags[VERDICT_TAG]
    assert tag.startswith("rejected: ") and reason in tag


def test_a_champion_failing_the_gate_is_never_served_and_ready_stays_true_to_what_is(server, models):
    """Promoted behind serving's back (straight in the registry), the broken version is refused at the swap."""
    url, app = server
    registry, name = models
    ok = httpx.post(f"{url}/predict", headers=bearer("predict"),
                    json={"entities": {"card_id": "c", "merchant_id": "m"}, "fields": {"amount": 1.0}})
    assert ok.json()["model_version"] == "1"
    registry.promote(name, "3")
    try:
        app.follower.check()
        assert app.follower.model.version == "1"  # still the version that passed
        resp = httpx.post(f"{url}/predict", headers=bearer("predict"),
                          json={"entities": {"card_id": "c", "merchant_id": "m"}, "fields": {"amount": 1.0}})
        assert resp.status_code == 200 and resp.json()["model_version"] == "1"
        detail = httpx.get(url + "/ready", headers=bearer("admin")).json()
        assert detail["ready"] is True and detail["model"]["version"] == "1"
        assert "version 3 failed the model gate" in detail["model_error"]
        assert registry.client.get_model_version(name, "3").tags[VERDICT_TAG].startswith("rejected: ")
    finally:
        registry.promote(name, "1")
        app.follower.check()


def test_a_server_whose_only_champion_fails_the_gate_is_not_ready(settings, feast_store, uid):  # noqa: F811
    registry = ModelRegistry(settings)
    name = f"{uid}-broken"
    version = _register_broken(registry, name, coef=[float("nan"), 0.0, 0.0])
    registry.promote(name, version)
    app = create_app(settings, model_name=name, reader=OnlineFeatureReader(settings, store=feast_store),
                     model_poll_s=3600, log_predictions=False)
    with serve(app) as url:
        assert httpx.get(url + "/ready").status_code == 503
        detail = httpx.get(url + "/ready", headers=bearer("admin")).json()
        assert detail["model"] is None and "coef must be finite" in detail["checks"]["model"]
        resp = httpx.post(url + "/predict", headers=bearer("predict"),
                          json={"entities": {"card_id": "c", "merchant_id": "m"}})
        assert resp.status_code == 503


def test_a_passing_version_is_promoted_and_its_verdict_recorded(server, models):
    url, app = server
    registry, name = models
    resp = httpx.post(f"{url}/models/{name}/promote", headers=bearer("admin"), json={"version": "2"})
    try:
        assert resp.status_code == 200, resp.text
        assert app.follower.model.version == "2"
        assert registry.client.get_model_version(name, "2").tags[VERDICT_TAG] == "passed"
    finally:
        httpx.post(f"{url}/models/{name}/promote", headers=bearer("admin"), json={"version": "1"})


# -- bounds ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path,body,field,setting", [
    ("/get-online-features", {"features": ["card_txn_stats:sum_amount_300s"],
                              "entities": {"card_id": [f"c{i}" for i in range(51)]}},
     "entities", "FRESHET_MAX_ROWS_PER_REQUEST"),
    ("/get-online-features", {"features": [f"card_txn_stats:f{i}" for i in range(6)], "entities": {"card_id": ["c"]}},
     "features", "FRESHET_MAX_FEATURES_PER_REQUEST"),
    ("/predict", {"instances": [{"entities": {"card_id": f"c{i}", "merchant_id": "m"}} for i in range(51)]},
     "instances", "FRESHET_MAX_ROWS_PER_REQUEST"),
])
def test_a_request_over_a_limit_is_413_naming_the_limit_and_its_setting(server, path, body, field, setting):
    resp = httpx.post(server[0] + path, headers=bearer("admin"), json=body, timeout=10)
    assert resp.status_code == 413, resp.text
    assert resp.json()["field"] == field
    assert setting in resp.json()["detail"] and ("limit of 50" in resp.json()["detail"] or "limit of 5" in resp.json()["detail"])


def test_one_clients_huge_batches_cannot_push_other_clients_predictions_out_of_the_log(settings, feast_store, models):  # noqa: F811
    """Kafka is unreachable, so the prediction log only fills: batches are refused before the last tenth."""
    from freshet.serving.predictions import PredictionLog

    offline = dataclasses.replace(settings, kafka_bootstrap_servers="127.0.0.1:1")
    app = create_app(offline, model_name=models[1], reader=OnlineFeatureReader(settings, store=feast_store),
                     registry=ModelRegistry(settings), model_poll_s=3600, tokens=TOKENS)
    app.predictor.prediction_log.close()
    app.predictor.prediction_log = log = PredictionLog(offline, max_pending=100, delivery_timeout_s=30)
    batch = {"instances": [{"entities": {"card_id": f"c{i}", "merchant_id": "m"}} for i in range(40)]}
    with serve(app) as url:
        statuses = [httpx.post(url + "/predict", headers=bearer("predict"), json=batch, timeout=10)
                    for _ in range(4)]
        assert [r.status_code for r in statuses] == [200, 200, 503, 503]
        assert "prediction log is backed up" in statuses[2].json()["detail"]
        assert statuses[2].headers["retry-after"] == "1"
        for i in range(20):  # another client's single predictions still find room and are logged
            resp = httpx.post(url + "/predict", headers=bearer("predict"),
                              json={"entities": {"card_id": f"other{i}", "merchant_id": "m"}}, timeout=10)
            assert resp.status_code == 200
        log.hand_over()
    assert log.dropped["buffer_full"] == 0 and log.published == 100
