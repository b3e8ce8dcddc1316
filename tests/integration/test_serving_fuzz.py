"""Schemathesis against the OpenAPI document of the running server, every route, with the admin,
predict and features credentials, a wrong one and none: no answer is a 5xx, and every answer has a
status the document declares and a body valid against its schema."""

from __future__ import annotations

import uuid

import httpx
import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from freshet import kafka
from freshet.models import ModelRegistry
from freshet.serving.app import create_app
from freshet.serving.online import OnlineFeatureReader
from test_serving_support import (  # noqa: F401 - fixtures
    applied_settings, feast_store, fit_fraud_pipeline, serve, with_topics,
)

pytestmark = pytest.mark.integration

TOKENS = {"admin": "fuzz-admin", "predict": "fuzz-predict", "features": "fuzz-features"}
CREDENTIALS = {**{scope: {"Authorization": f"Bearer {t}"} for scope, t in TOKENS.items()},
               "wrong": {"Authorization": "Bearer not-a-token"}, "none": {}}
MODEL_FEATURES = ["card_txn_stats:sum_amount_300s", "merchant_txn_stats:count_amount_3600s", "amount"]
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_server(applied_settings, feast_store):  # noqa: F811
    uid = "fz" + uuid.uuid4().hex[:8]
    s = with_topics(applied_settings, uid, api_token=TOKENS["admin"], api_token_predict=TOKENS["predict"],
                    api_token_features=TOKENS["features"], model_name=f"{uid}-fraud", max_rows_per_request=100)
    kafka.ensure_topics(s, [s.topic_predictions, s.topic_models])
    reg = ModelRegistry(s)
    for seed in (0, 1):
        reg.register_sklearn(s.model_name, fit_fraud_pipeline(seed), MODEL_FEATURES,
                             {"feature_service": "fraud_model_v1"})
    reg.promote(s.model_name, "1")
    app = create_app(s, reader=OnlineFeatureReader(s, store=feast_store), model_poll_s=5)
    with serve(app) as url:
        yield url


OPERATIONS = [("POST", "/get-online-features"), ("POST", "/predict"), ("GET", "/health"), ("GET", "/ready"),
              ("GET", "/metrics"), ("GET", "/models"), ("GET", "/models/{name}"), ("POST", "/models/{name}/promote"),
              ("POST", "/models/{name}/rollback")]


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    doc = httpx.get(fuzz_server + "/openapi.json", headers=CREDENTIALS["admin"], timeout=10).json()
    return schemathesis.openapi.from_dict(doc)


def test_the_fuzzed_operations_are_every_route_the_document_declares(api_schema):
    declared = {(method.upper(), path) for path, ops in api_schema.raw_schema["paths"].items() for method in ops}
    assert declared == set(OPERATIONS)


# negative: bodies that break the document (a path parameter is any string, rollback has no body: neither has a negative)
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST" and not p.endswith("/rollback")]


@pytest.mark.parametrize("method,path,mode", CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_no_route_answers_5xx_or_outside_its_documented_schema_whatever_the_credential(api_schema, fuzz_server,
                                                                                       method, path, mode):
    strategy = api_schema[path][method].as_strategy(mode)
    calls = []

    @given(case=strategy)
    @settings(max_examples=12, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    def answers_within_the_document(case):
        for name, headers in CREDENTIALS.items():
            response = case.call(base_url=fuzz_server, headers=headers, timeout=15)
            calls.append(response.status_code)
            case.validate_response(response, checks=CHECKS)
            if name in ("wrong", "none") and path not in ("/health", "/ready", "/metrics"):
                assert response.status_code == 401, (name, method, path)

    answers_within_the_document()
    assert len(calls) >= len(CREDENTIALS)
