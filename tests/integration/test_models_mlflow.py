"""Versions as MLflow models, reproducible from their training snapshot, and `freshet models` on the
real stack: MLflow's sqlite registry, the real broker (labels, model events) and Redis (/predict).

One module-wide training: a small seeded workload in the offline raw log, its labels on the labels
topic, version 1 bootstrapped by the retrainer. The tests then load it with MLflow's own pyfunc
loader, rebuild it from its snapshot, and move the champion alias with the CLI.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import redis

from freshet.cli import main
from freshet.demo.workload import TransactionWorkload
from freshet.models import CHAMPION, FORMAT, MLFLOW_FORMAT, ModelRegistry, UnsupportedModel, export_sklearn
from freshet.settings import load_settings
from freshet.training.retrain import RetrainConfig, Retrainer
from test_retrain import model_events, publish_labels, write_raw_log
from test_serving_support import serve

pytestmark = pytest.mark.integration

N_EVENTS = 2000
MODEL = "fraud"
TOKENS = {"admin": "adm-token-1", "predict": "pred-token-1", "features": "feat-token-1"}


@pytest.fixture(scope="module")
def trained(services, tmp_path_factory, apply_feature_repo):
    tmp = tmp_path_factory.mktemp("mlmodels")
    uid = "m" + os.urandom(4).hex()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
    settings = load_settings(env, kafka_bootstrap_servers=services.kafka, redis_url=services.redis_url,
                             data_dir=str(tmp / "data"), kafka_partitions=2,
                             **{f"topic_{t}": f"{uid}.{t}" for t in
                                ("predictions", "labels", "drift", "retrain", "deadletter", "models")})
    registry = apply_feature_repo(settings)
    (topic,) = registry.views_by_topic()
    workload = TransactionWorkload(seed=11, cards=200, merchants=40, rate=1.0)
    batch = workload.batch(N_EVENTS)
    write_raw_log(settings, registry, batch, topic)
    publish_labels(settings, batch)
    outcome = Retrainer(settings, registry, RetrainConfig(seed=7, min_rows=100)).run(bootstrap=True)
    assert outcome["status"] == "promoted" and outcome["version"] == "1", outcome
    return {"settings": settings, "registry": registry, "topic": topic, "uid": uid, "outcome": outcome,
            "workload": workload}


@pytest.fixture
def cli_env(trained, monkeypatch):
    for k in [k for k in os.environ if k.startswith("FRESHET_")]:
        monkeypatch.delenv(k)
    for k, v in trained["settings"].to_env().items():
        monkeypatch.setenv(k, v)


def _features_in_redis(settings, reader, uid: str) -> dict:
    """A card and a merchant with feature rows now; another card that was never seen."""
    client = redis.Redis.from_url(settings.redis_url)
    now = time.time()
    views = reader.layout.views
    card = {f: (3 + j if t == "INT64" else 17.5 * (j + 1)) for j, (f, t) in
            enumerate(views["card_txn_stats"].features.items())}
    merchant = {f: (40 + j if t == "INT64" else 9.25 * (j + 1)) for j, (f, t) in
                enumerate(views["merchant_txn_stats"].features.items())}
    reader.layout.write(client, "card_txn_stats", [((f"{uid}-c1",), card, now - 5)])
    reader.layout.write(client, "merchant_txn_stats", [((f"{uid}-m1",), merchant, now - 5)])
    return {"card": f"{uid}-c1", "merchant": f"{uid}-m1", "unseen": f"{uid}-c9"}


def test_the_champion_loads_with_mlflow_pyfunc_and_scores_what_predict_answers(trained):
    import mlflow

    from freshet.serving.app import create_app
    from freshet.serving.online import OnlineFeatureReader

    settings, uid = trained["settings"], trained["uid"]
    reader = OnlineFeatureReader(settings)
    ids = _features_in_redis(settings, reader, uid)
    app = create_app(settings, model_name=MODEL, reader=reader, log_predictions=False, tokens=TOKENS)
    with serve(app) as url:
        resp = httpx.post(f"{url}/predict", headers={"Authorization": f"Bearer {TOKENS['predict']}"}, timeout=10,
                          json={"instances": [
                              {"entities": {"card_id": ids["card"], "merchant_id": ids["merchant"]},
                               "fields": {"amount": 250.0}},
                              {"entities": {"card_id": ids["unseen"], "merchant_id": ids["merchant"]},
                               "fields": {"amount": 12.0}}]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model_version"] == "1"
    predictions = body["predictions"]
    assert predictions[1]["missing"] and not predictions[0]["missing"]  # the unseen card's features are imputed

    old = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(settings.mlflow_uri)
    mlflow.set_registry_uri(settings.mlflow_uri)
    try:
        pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL}@{CHAMPION}")
    finally:
        mlflow.set_tracking_uri(old[0])
        mlflow.set_registry_uri(old[1])
    names = pyfunc.metadata.get_input_schema().input_names()
    frame = pd.DataFrame([[p["features"][n] for n in names] for p in predictions], columns=names, dtype=float)
    scores = pyfunc.predict(frame)[:, 1]
    np.testing.assert_allclose(scores, [p["score"] for p in predictions], rtol=1e-12)
    flavor = pyfunc.metadata.flavors["sklearn"]
    assert flavor["serialization_format"] == "skops" and flavor["pickled_model"] == "model.skops"
    assert pyfunc.metadata.saved_input_example_info is not None


def test_each_version_logs_its_training_data_as_a_dataset_input_with_its_snapshot(trained):
    reg = ModelRegistry(trained["settings"], publish_events=False)
    [dataset] = reg.training_inputs(MODEL, "1")
    fingerprint = reg.versions(MODEL)[0]["dataset_fingerprint"]
    assert dataset["tags"]["mlflow.data.context"] == "training"
    assert dataset["digest"] == fingerprint.partition(":")[2][:32]
    assert json.loads(dataset["profile"])["num_rows"] == sum(trained["outcome"]["rows"][k] for k in ("train", "holdout"))

    snap = reg.training_snapshot(MODEL, "1")
    assert dataset["tags"]["freshet.snapshot"] == snap["digest"] == trained["outcome"]["snapshot"]
    data = trained["settings"].data_path
    assert snap["events"]["rows"] == N_EVENTS and all((data / p["path"]).is_file() for p in snap["events"]["parts"])
    assert snap["labels"]["rows"] == N_EVENTS
    assert sum(snap["labels"]["positions"].values()) == N_EVENTS  # next offset per partition of the labels topic
    assert all(p["offsets"] is not None for p in snap["events"]["parts"])
    assert snap["feature_definitions"].startswith("sha256:") and snap["config"]["seed"] == 7
    assert snap["code"]["freshet"] == "0.1.0"
    if (Path(__file__).resolve().parents[2] / ".git").exists():  # run from a checkout: its revision is named
        assert len(snap["code"]["git_revision"]) == 40 and snap["code"]["git_dirty"] in (True, False)
    assert reg.versions(MODEL)[0]["format"] == MLFLOW_FORMAT


def test_reproduce_rebuilds_identical_data_coefficients_and_scores_despite_newer_data(trained, cli_env, capsys):
    settings = trained["settings"]
    # data that arrived after the training: in the logs, but not in version 1's snapshot
    later = trained["workload"].batch(300)
    write_raw_log(settings, trained["registry"], later, trained["topic"])
    assert main(["retrain", "--reproduce", f"{MODEL}/1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["status"] == "identical", report
    assert report["dataset_fingerprint"]["equal"] and report["rows"] == trained["outcome"]["rows"]
    assert report["max_difference"]["coef"] == 0.0 and report["max_difference"]["intercept"] == 0.0
    assert report["max_difference"]["scores"] == 0.0 and report["scored_rows"] > 0


def test_reproduce_of_a_snapshot_whose_part_file_is_gone_fails_naming_it(trained, cli_env, capsys):
    reg = ModelRegistry(trained["settings"], publish_events=False)
    part = trained["settings"].data_path / reg.training_snapshot(MODEL, "1")["events"]["parts"][0]["path"]
    away = part.with_name(f".{part.name}.away")  # hidden: the log does not read it
    part.rename(away)
    try:
        assert main(["retrain", "--reproduce", f"{MODEL}/1"]) == 2
    finally:
        away.rename(part)
    err = capsys.readouterr().err
    assert "cannot reproduce fraud version 1" in err and f"{part.name} is missing" in err
    assert main(["retrain", "--reproduce", "fraud"]) == 2
    assert "NAME/VERSION" in capsys.readouterr().err


def test_models_list_and_show_give_aliases_metrics_and_the_snapshot(trained, cli_env, capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    header, row = out.splitlines()[:2]
    assert header.split()[:4] == ["VERSION", "ALIASES", "CREATED", "AUC"]
    assert row.split()[:2] == ["1", "champion"] and f"{trained['outcome']['metrics']['auc']:.4f}" in row

    assert main(["models", "show", "1"]) == 0
    out = capsys.readouterr().out
    assert trained["outcome"]["snapshot"] in out and f"models:/{MODEL}/1" in out
    assert f"freshet retrain --reproduce {MODEL}/1" in out and f"{N_EVENTS} rows" in out

    assert main(["models", "show", "9"]) == 2
    assert "has no version 9" in capsys.readouterr().err
    assert main(["models", "--model", "nope", "list"]) == 2
    assert "no registered model 'nope'" in capsys.readouterr().err


def _register(settings, names: list[str], seed: int) -> str:
    from freshet.training.pipeline import fit_pipeline

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(200, len(names)))
    pipe = fit_pipeline(x, (x[:, 0] > 0).astype(int), seed, names=names)
    return ModelRegistry(settings, publish_events=False).register_sklearn(
        MODEL, pipe, names, {"feature_service": "fraud_model_v1", "seed": seed}, {"auc": 0.5})


def test_promote_goes_through_the_model_gate_and_rollback_returns_publishing_the_event(trained, cli_env, capsys):
    settings = trained["settings"]
    reg = ModelRegistry(settings, publish_events=False)
    names = reg.versions(MODEL)[-1]["feature_names"]
    good = _register(settings, names, 1)
    bad = _register(settings, ["card_txn_stats:no_such_feature", "amount"], 2)

    assert main(["models", "promote", bad]) == 2
    err = capsys.readouterr().err
    assert "fails the model gate" in err and "card_txn_stats:no_such_feature" in err and "--force" in err
    assert reg.current_version(MODEL) == "1"

    assert main(["models", "promote", good]) == 0
    assert f"event sent on {settings.topic_models}" in capsys.readouterr().out
    assert reg.current_version(MODEL) == good
    assert main(["models", "rollback"]) == 0
    assert reg.current_version(MODEL) == "1"
    assert main(["models", "promote", bad, "--force"]) == 0
    assert reg.current_version(MODEL) == bad
    assert reg.client.get_model_version(MODEL, bad).tags["freshet.gate"].endswith("(promoted with --force)")

    events = model_events(settings, want=4)  # the bootstrap's, then the CLI's three
    assert [(e["version"], e["stage"]) for e in events] == [("1", CHAMPION), (good, CHAMPION), ("1", CHAMPION),
                                                            (bad, CHAMPION)]
    assert main(["models", "promote", "99"]) == 2
    assert "freshet models list" in capsys.readouterr().err


def test_a_version_registered_before_mlflow_models_still_serves_and_says_how_to_replace_it(trained, cli_env, capsys):
    from freshet.training.pipeline import fit_pipeline

    settings = trained["settings"]
    reg = ModelRegistry(settings, publish_events=False)
    name, names = f"{trained['uid']}-legacy", ["card_txn_stats:sum_amount_300s", "amount"]
    x = np.random.default_rng(0).normal(size=(100, 2))
    pipe = fit_pipeline(x, (x[:, 1] > 0).astype(int), 0)
    run = reg.client.create_run(reg._experiment_id())  # as versions were registered before: JSON, no MLmodel
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "model.json").write_text(json.dumps(export_sklearn(pipe, names)))
        reg.client.log_artifacts(run.info.run_id, tmp, artifact_path="model")
    reg.client.create_registered_model(name)
    reg.client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                    tags={"freshet.format": FORMAT})

    np.testing.assert_allclose(reg.load(name, "1").predict_proba(x.tolist()), pipe.predict_proba(x)[:, 1],
                               rtol=1e-12)
    with pytest.raises(UnsupportedModel, match="no MLmodel.*freshet retrain --once --force"):
        reg.load_pipeline(name, "1")
    assert main(["models", "--model", name, "show", "1"]) == 0
    assert "not an MLflow model: retrain to replace it" in capsys.readouterr().out
    assert main(["retrain", "--reproduce", f"{name}/1"]) == 2
    assert "no training snapshot" in capsys.readouterr().err
