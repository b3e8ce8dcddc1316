"""Models are versions in MLflow (sqlite) with lineage; promotion and rollback are events servers follow."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from freshet import kafka
from freshet.contracts import ModelEvent
from freshet.models import (
    CHAMPION, ModelFollower, ModelNotFound, ModelRegistry,
)

pytestmark = pytest.mark.integration

FEATURES = ["card_txn_stats:sum_amount_300s", "card_txn_stats:count_amount_300s", "amount"]


@pytest.fixture(scope="module")
def base_settings(services, tmp_path_factory):
    from freshet.settings import load_settings

    return load_settings({}, kafka_bootstrap_servers=services.kafka, redis_url=services.redis_url,
                         data_dir=str(tmp_path_factory.mktemp("models")))


@pytest.fixture
def settings(base_settings, unique):
    return dataclasses.replace(base_settings, topic_models=f"{unique}.models")


def _fit(seed: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, 3)) * [50, 3, 20]
    y = (x[:, 0] + rng.normal(size=300) * 30 > 0).astype(int)
    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0 + seed)).fit(x, y), x


def _register(settings, name: str, seed: int) -> str:
    pipe, _ = _fit(seed)
    return ModelRegistry(settings).register_sklearn(
        name, pipe, FEATURES,
        lineage={"feature_service": "fraud_model_v1", "training_window": ("2024-01-01", "2024-01-31"),
                 "dataset_fingerprint": f"sha256:{seed:08d}", "seed": seed, "params": {"C": 1.0 + seed}},
        metrics={"auc": 0.8 + seed / 100, "logloss": 0.4},
    )


def _events(settings, timeout=20.0, want=1) -> list[ModelEvent]:
    c = kafka.consumer(settings, f"{settings.topic_models}-reader")
    c.subscribe([settings.topic_models])
    got, deadline = [], time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        msg = c.poll(0.2)
        if msg is not None and not msg.error():
            got.append(ModelEvent.decode(msg.value()))
    c.close()
    return got


def test_registered_version_keeps_lineage_metrics_and_scores_like_the_pipeline(settings, unique):
    name = f"{unique}-fraud"
    assert _register(settings, name, 1) == "1"
    [v] = ModelRegistry(settings).versions(name)
    assert v["version"] == "1" and v["aliases"] == [] and v["stage"] == "registered"
    assert v["feature_service"] == "fraud_model_v1"
    assert v["feature_names"] == FEATURES
    assert v["training_window"] == {"start": "2024-01-01", "end": "2024-01-31"}
    assert v["dataset_fingerprint"] == "sha256:00000001" and v["seed"] == "1"
    assert v["metrics"] == {"auc": pytest.approx(0.81), "logloss": pytest.approx(0.4)}
    assert v["params"]["C"] == "2.0" and v["params"]["model.C"] == "2.0"

    pipe, x = _fit(1)
    model = ModelRegistry(settings).load(name, "1")
    assert model.version == "1" and model.feature_names == FEATURES
    np.testing.assert_allclose(model.predict_proba(x.tolist()), pipe.predict_proba(x)[:, 1], rtol=1e-12)


def test_feast_resolves_the_feature_service_of_a_registered_model(settings, unique):
    from mlflow import MlflowClient

    name = f"{unique}-fraud"
    _register(settings, name, 1)
    mv = MlflowClient(settings.mlflow_uri, settings.mlflow_uri).get_model_version(name, "1")
    assert mv.tags["feast.feature_service"] == "fraud_model_v1"  # what feast.mlflow's resolver reads


def test_promote_and_rollback_move_the_champion_and_publish_model_events(settings, unique):
    name = f"{unique}-fraud"
    reg = ModelRegistry(settings)
    for seed in (1, 2, 3):
        _register(settings, name, seed)
    reg.promote(name, "1")
    reg.promote(name, "3")
    assert reg.current_version(name) == "3"
    assert ModelRegistry(settings).load(name, CHAMPION).version == "3"
    event = reg.rollback(name)
    assert (event.version, event.stage) == ("1", CHAMPION)
    assert reg.current_version(name) == "1"
    with pytest.raises(ModelNotFound, match="earlier"):
        reg.rollback(name)

    events = _events(settings, want=3)
    assert [(e.model, e.version, e.stage) for e in events] == [(name, "1", CHAMPION), (name, "3", CHAMPION),
                                                               (name, "1", CHAMPION)]
    assert events[1].metrics["auc"] == pytest.approx(0.83)
    versions = {v["version"]: v for v in reg.versions(name)}
    assert versions["1"]["stage"] == CHAMPION and versions["3"]["stage"] == "registered"


def test_unknown_model_version_or_alias_is_not_found_naming_it(settings, unique):
    reg = ModelRegistry(settings)
    with pytest.raises(ModelNotFound, match=f"{unique}-nope"):
        reg.load(f"{unique}-nope")
    _register(settings, f"{unique}-m", 1)
    with pytest.raises(ModelNotFound, match="version '7'"):
        reg.load(f"{unique}-m", 7)
    with pytest.raises(ModelNotFound, match="alias 'champion'"):
        reg.load(f"{unique}-m")


def test_follower_switches_on_the_event_without_waiting_for_its_poll(settings, unique):
    name = f"{unique}-fraud"
    reg = ModelRegistry(settings)
    _register(settings, name, 1)
    _register(settings, name, 2)
    reg.promote(name, "1")
    changes = []
    follower = ModelFollower(settings, name, poll_s=3600, on_change=lambda old, new: changes.append(new.version))
    follower.start()
    try:
        assert follower.model.version == "1"
        _wait_until_reading_events(settings, follower, name, "1")
        reg.promote(name, "2")
        deadline = time.monotonic() + 15
        while follower.model.version != "2" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert follower.model.version == "2"
        assert changes == ["1", "2"]
    finally:
        follower.stop()


def _wait_until_reading_events(settings, follower, name: str, served: str, timeout: float = 30) -> None:
    """Until the follower's consumer reads the models topic (it starts at the topic's end once
    assigned): an event naming the version it serves already makes it check the registry,
    and nothing else calls `check` here (its poll is an hour away)."""
    from freshet.models import publish_model_event

    checks = []
    check = follower.check
    follower.check = lambda: checks.append(1) or check()
    try:
        deadline = time.monotonic() + timeout
        while not checks:
            assert time.monotonic() < deadline, "the follower never read an event"
            publish_model_event(settings, ModelEvent(model=name, version=served, stage=CHAMPION, metrics={}))
            wait_until = time.monotonic() + 0.5
            while not checks and time.monotonic() < wait_until:
                time.sleep(0.02)
    finally:
        del follower.check  # the method again
    assert follower.model.version == served


def test_follower_polls_the_registry_when_kafka_is_unreachable(settings, unique):
    name = f"{unique}-fraud"
    reg = ModelRegistry(settings, publish_events=False)
    _register(settings, name, 1)
    _register(settings, name, 2)
    reg.promote(name, "1")
    offline = dataclasses.replace(settings, kafka_bootstrap_servers="127.0.0.1:1")
    follower = ModelFollower(offline, name, poll_s=0.5)
    follower.start()
    try:
        reg.promote(name, "2")
        deadline = time.monotonic() + 15
        while follower.model.version != "2" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert follower.model.version == "2"
    finally:
        follower.stop()
