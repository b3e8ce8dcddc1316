"""Shadow, canary and automatic rollback on a real uvicorn, Redis, Kafka and MLflow.

One server serves a model whose champion is version 1; the tests set a shadow or a canary
through the registry (as `freshet models shadow|canary` does) and read what the server answered
and logged. The rollback spec serves a second model: version 2 is promoted over version 1,
labels say it errs far more, a real `MonitorService` reads the prediction log and the labels,
and the champion goes back to version 1 — in the registry and in the running server.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import httpx
import orjson
import pytest

from freshet import kafka
from freshet.challengers import EVIDENCE_TAG, RollbackRule, goes_to_canary
from freshet.contracts import DriftAlert, ModelEvent, Prediction
from freshet.models import ModelRegistry
from freshet.monitor import service
from freshet.serving.app import create_app
from freshet.serving.online import OnlineFeatureReader
from test_monitor_service import free_port, read_topic
from test_serving_support import (  # noqa: F401 - fixtures
    applied_settings, feast_store, fit_fraud_pipeline, serve, with_topics,
)

pytestmark = pytest.mark.integration

TOKEN = {"Authorization": "Bearer challengers-admin"}
MODEL_FEATURES = ["card_txn_stats:sum_amount_300s", "merchant_txn_stats:count_amount_3600s", "amount"]


@pytest.fixture(scope="module")
def uid():
    return "chl" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def settings(applied_settings, uid):  # noqa: F811
    s = with_topics(applied_settings, uid, api_token="challengers-admin", max_rows_per_request=100)
    kafka.ensure_topics(s, [s.topic_predictions, s.topic_models, s.topic_labels, s.topic_drift, s.topic_retrain])
    return s


@pytest.fixture(scope="module")
def registry(settings):
    return ModelRegistry(settings)


def _register(registry, name: str, seeds=(0, 1)) -> None:
    for seed in seeds:
        registry.register_sklearn(name, fit_fraud_pipeline(seed), MODEL_FEATURES, {"feature_service": "fraud_model_v1"})


@pytest.fixture(scope="module")
def served(settings, feast_store, registry, uid):  # noqa: F811
    name = f"{uid}-fraud"
    _register(registry, name)
    registry.promote(name, "1")
    app = create_app(settings, model_name=name, reader=OnlineFeatureReader(settings, store=feast_store),
                     model_poll_s=0.5)
    with serve(app) as url:
        yield url, app, name


def _instance(i: int, rid: str | None = None) -> dict:
    inst = {"entities": {"card_id": f"card-{i % 37}", "merchant_id": f"m-{i % 11}"}, "fields": {"amount": 10.0 + i % 90}}
    if rid is not None:
        inst["request_id"] = rid
    return inst


def _predict_batch(url: str, instances: list[dict]) -> dict:
    resp = httpx.post(f"{url}/predict", json={"instances": instances}, headers=TOKEN, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _until(check, timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _logged(settings, request_ids: set[str], timeout: float = 15.0) -> dict[str, Prediction]:
    found: dict[str, Prediction] = {}
    deadline = time.monotonic() + timeout
    while set(found) != request_ids and time.monotonic() < deadline:
        for raw in read_topic(settings, settings.topic_predictions, timeout=3):
            p = Prediction.decode(raw)
            if p.request_id in request_ids:
                found[p.request_id] = p
    return found


def test_a_shadow_is_scored_on_live_requests_logged_with_its_version_and_never_returned(served, registry, settings):
    url, app, name = served
    registry.set_challenger(name, "shadow", "2")
    _until(lambda: app.follower.challengers.shadow is not None, what="the server to load the shadow")
    rid = f"req-{uuid.uuid4().hex[:6]}"
    resp = httpx.post(f"{url}/predict", json=_instance(3, rid), headers=TOKEN, timeout=30)
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["model_version"] == "1"
    # nothing of the shadow reaches the caller
    assert set(answer) == {"model", "model_version", "request_id", "score", "label", "features", "missing"}
    assert "shadow" not in resp.text
    logged = _logged(settings, {rid})[rid]
    assert logged.model_version == "1" and logged.role is None
    assert logged.prediction["score"] == pytest.approx(answer["score"])
    shadow_model = registry.load(name, "2")
    row = [answer["features"][f] for f in shadow_model.feature_names]
    assert logged.shadow["model_version"] == "2"
    assert logged.shadow["prediction"]["score"] == pytest.approx(shadow_model.score_one(row))
    assert logged.shadow["prediction"]["score"] != pytest.approx(answer["score"])  # another model's answer
    metrics = httpx.get(f"{url}/metrics", headers=TOKEN, timeout=10).text
    assert f'freshet_shadow_predictions_total{{model="{name}",version="2"}}' in metrics
    registry.clear_challenger(name, "shadow")
    _until(lambda: app.follower.challengers.shadow is None, what="the server to drop the shadow")


def test_a_canary_answers_its_share_by_request_hash_and_says_which_version_answered(served, registry, settings):
    url, app, name = served
    share, n = 0.2, 600
    registry.set_challenger(name, "canary", "2", share)
    _until(lambda: app.follower.challengers.canary is not None, what="the server to load the canary")
    prefix = uuid.uuid4().hex[:6]
    instances = [_instance(i, f"{prefix}-{i}") for i in range(n)]
    answered = {}
    for start in range(0, n, 100):
        doc = _predict_batch(url, instances[start:start + 100])
        assert doc["model_version"] == "1"  # the batch's head: the champion
        for inst, p in zip(instances[start:start + 100], doc["predictions"]):
            answered[inst["request_id"]] = p["model_version"]
    canary_ids = {rid for rid, v in answered.items() if v == "2"}
    assert set(answered.values()) == {"1", "2"}
    # the share within its binomial interval (4 standard deviations) ...
    sd = (n * share * (1 - share)) ** 0.5
    assert abs(len(canary_ids) - n * share) < 4 * sd, len(canary_ids)
    # ... and exactly the requests the routing rule picks: reproducible, here and in any other server
    assert canary_ids == {i["request_id"] for i in instances if goes_to_canary(i, share)}
    # a single request says who answered, and the same request id meets the same version again
    rid = sorted(canary_ids)[0]
    single = httpx.post(f"{url}/predict", json=_instance(0, rid), headers=TOKEN, timeout=30).json()
    assert single["model_version"] == "2"
    logged = _logged(settings, set(answered))
    assert len(logged) == n
    assert {rid for rid, p in logged.items() if p.role == "canary" and p.model_version == "2"} == canary_ids
    assert all(p.role is None and p.model_version == "1" for rid, p in logged.items() if rid not in canary_ids)
    registry.clear_challenger(name, "canary")
    _until(lambda: app.follower.challengers.canary is None, what="the server to drop the canary")


def _scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def _sample(text: str, metric: str, model: str, version: str) -> float:
    head = f'{metric}{{model="{model}",role="champion",version="{version}"}} '
    line = next(ln for ln in text.splitlines() if ln.startswith(head))
    return float(line[len(head):])


def _labels(settings, truth: dict[str, int]) -> None:
    p = kafka.producer(settings)
    for rid, label in truth.items():
        p.produce(settings.topic_labels, key=rid.encode(),
                  value=orjson.dumps({"schema": "freshet.labels/1", "request_id": rid, "label": label,
                                      "ts": time.time()}))
    assert p.flush(30) == 0


def _traffic(url: str, tag: str, n: int, wrong_every: int) -> dict[str, int]:
    """n predictions through the server; the truth is the answer, except for every `wrong_every`-th."""
    instances = [_instance(i, f"{tag}-{i}") for i in range(n)]
    truth = {}
    for start in range(0, n, 100):
        doc = _predict_batch(url, instances[start:start + 100])
        for k, p in enumerate(doc["predictions"]):
            i = start + k
            truth[p["request_id"]] = 1 - p["label"] if i % wrong_every == 0 else p["label"]
    return truth


def test_a_promoted_champion_worse_than_its_predecessor_is_rolled_back_with_an_alert_and_an_event(
        settings, feast_store, registry, uid):  # noqa: F811
    name = f"{uid}-rollback"
    _register(registry, name)
    registry.promote(name, "1")
    config = {"seed": 1, "models": [{"model": name, "numeric_features": ["amount"], "warmup": 100,
                                     "estimate": False, "watch_score": False, "label_warmup": 100}]}
    monitor, policy = service.build(config, None)
    monitor.online.use_rule(RollbackRule(alpha=0.01, min_outcomes=100, looks=1))
    metrics = service.MonitorMetrics()
    port = free_port()
    metrics.serve(port)
    svc = service.MonitorService(settings, monitor, policy, state_file=settings.data_path / f"{uid}-monitor.json",
                                 idle_flush_s=0.2, rollback=service.ChampionRollback(settings, registry),
                                 evidence=service.EvidenceRecorder(settings, registry), metrics=metrics)
    app = create_app(settings, model_name=name, reader=OnlineFeatureReader(settings, store=feast_store),
                     model_poll_s=0.5)
    thread = threading.Thread(target=svc.run, kwargs={"group": f"{uid}-monitor"}, daemon=True)
    with serve(app) as url:
        thread.start()
        try:
            registry.set_challenger(name, "shadow", "2")  # judged live first: its evidence lands on the version
            _until(lambda: app.follower.challengers.shadow is not None, what="the server to load the shadow")
            _labels(settings, _traffic(url, f"{uid}-v1", 300, wrong_every=25))       # 4% errors
            _until(lambda: registry.versions(name)[0]["online_evidence"] is not None, timeout=60,
                   what="the monitor to record the shadow's online evidence")
            evidence = registry.versions(name)[0]["online_evidence"]
            assert (evidence["role"], evidence["champion"], evidence["n"]) == ("shadow", "1", 100)
            registry.promote(name, "2")
            assert registry.challengers(name)["shadow"] is None  # promoted: no longer a shadow
            _until(lambda: app.follower.model.version == "2", what="the server to serve version 2")
            _labels(settings, _traffic(url, f"{uid}-v2", 200, wrong_every=3))        # 33% errors
            _until(lambda: svc.counts["rollbacks_rolled_back"] == 1, timeout=60,
                   what=f"the monitor to roll back ({dict(svc.counts)})")
            assert registry.current_version(name) == "1"
            _until(lambda: app.follower.model.version == "1", what="the server to serve version 1 again")
            # the monitor's /metrics: both versions' labelled error rates, and the rollback
            _until(lambda: 'role="champion",version="2"' in _scrape(port), what="the version gauges")
            scraped = _scrape(port)
        finally:
            svc.stop()
            thread.join(30)
            metrics.close()
    rates = {v: _sample(scraped, "freshet_monitor_version_error_rate", name, v) for v in ("1", "2")}
    assert rates["2"] > rates["1"]
    assert _sample(scraped, "freshet_monitor_version_outcomes", name, "1") == 300
    assert f'freshet_monitor_rollbacks_total{{model="{name}",outcome="rolled_back",version="2"}} 1.0' in scraped
    alerts = [DriftAlert.decode(r) for r in read_topic(settings, settings.topic_drift)]
    rollbacks = [a for a in alerts if a.model == name and a.detector == "rollback"]
    assert len(rollbacks) == 1
    assert rollbacks[0].model_version == "2" and rollbacks[0].subject == "champion:v2 vs v1"
    window = rollbacks[0].window
    assert window["new"]["n"] == 100 and window["old"]["n"] == 300
    assert window["new"]["errors"] / 100 > window["old"]["errors"] / 300
    events = [ModelEvent.decode(r) for r in read_topic(settings, settings.topic_models)]
    mine = [(e.stage, e.version) for e in events if e.model == name]
    # promotions of 1, the shadow, 2, then the rollback: the champion event servers follow and the demoted one's
    assert mine == [("champion", "1"), ("shadow", "2"), ("champion", "2"), ("champion", "1"), ("rolled_back", "2")]
    demoted = next(e for e in events if e.model == name and e.stage == "rolled_back")
    assert demoted.metrics["predecessor"] == 1 and demoted.metrics["error_rate"] > demoted.metrics[
        "predecessor_error_rate"]
    retrain = [json.loads(r) for r in read_topic(settings, settings.topic_retrain)]
    assert not [r for r in retrain if r["model"] == name]  # a rollback is no reason to retrain


def test_models_shadow_and_canary_commands_set_show_and_clear_and_name_the_fix_on_errors(settings, registry, uid,
                                                                                         monkeypatch, capsys):
    from freshet.cli import main

    name = f"{uid}-cli"
    _register(registry, name)
    registry.promote(name, "1")
    for k in [k for k in os.environ if k.startswith("FRESHET_")]:
        monkeypatch.delenv(k)
    for k, v in settings.to_env().items():
        monkeypatch.setenv(k, v)

    assert main(["models", "shadow", name, "2"]) == 0
    assert "scores every /predict request in shadow" in capsys.readouterr().out
    assert main(["models", "--model", name, "shadow"]) == 0
    assert f"shadow of {name}: version 2" in capsys.readouterr().out
    assert main(["models", "canary", name, "2", "--share", "1.5"]) == 2
    assert "--share must be a fraction above 0 and at most 1" in capsys.readouterr().err
    assert main(["models", "canary", name, "1"]) == 2
    assert "is the champion already" in capsys.readouterr().err
    assert main(["models", "canary", name, "9"]) == 2
    assert "has no version 9" in capsys.readouterr().err
    assert main(["models", "canary", name, "2", "--share", "0.25"]) == 0
    assert "answers 25.0% of /predict traffic" in capsys.readouterr().out
    assert registry.challengers(name) == {"shadow": "2", "canary": "2", "canary_share": 0.25}
    assert main(["models", "--model", name, "canary", "--clear"]) == 0
    assert main(["models", "--model", name, "shadow", "--clear"]) == 0
    assert main(["models", "--model", name, "shadow", "--clear"]) == 0
    assert "nothing to clear" in capsys.readouterr().out
    assert registry.challengers(name) == {"shadow": None, "canary": None, "canary_share": 0.0}
    events = [ModelEvent.decode(r) for r in read_topic(settings, settings.topic_models)]
    assert [(e.stage, e.version) for e in events if e.model == name] == [
        ("champion", "1"), ("shadow", "2"), ("canary", "2"), ("canary_cleared", "2"), ("shadow_cleared", "2")]

    # promotion on online evidence: refused without it, naming the fix; taken with the monitor's verdict
    assert main(["models", "--model", name, "promote", "2", "--online-evidence"]) == 2
    err = capsys.readouterr().err
    assert "it has no online evidence" in err and "freshet models shadow 2" in err
    evidence = {"role": "shadow", "champion": "1", "n": settings.rollback_min_outcomes, "errors": 9,
                "error_rate": 0.045, "champion_error_rate": 0.05, "difference": [-0.04, 0.03],
                "verdict": "no difference"}
    registry.client.set_model_version_tag(name, "2", EVIDENCE_TAG, json.dumps({**evidence, "verdict": "worse"}))
    assert main(["models", "--model", name, "promote", "2", "--online-evidence"]) == 2
    assert "found it worse than champion v1" in capsys.readouterr().err
    registry.client.set_model_version_tag(name, "2", EVIDENCE_TAG, json.dumps(evidence))
    assert main(["models", "--model", name, "show", "2"]) == 0
    assert "as shadow vs champion v1: 4.50% vs 5.00%" in capsys.readouterr().out
    assert main(["models", "--model", name, "promote", "2", "--online-evidence"]) == 0
    assert registry.current_version(name) == "2"
