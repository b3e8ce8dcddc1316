"""The retrainer under faults, on the real broker and MLflow: it never replaces a champion it could not
compare with, and a training that fails is retried with back-off and never dropped.

Faults are real: the champion's artifact file goes missing, a corrupt part file lands in the raw log.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

import pytest
from confluent_kafka import TopicPartition

from freshet import kafka
from freshet.demo.workload import TransactionWorkload
from freshet.models import ModelRegistry
from freshet.settings import load_settings
from freshet.stream.offline import raw_log_path
from freshet.training.retrain import RetrainConfig, Retrainer
from freshet.training.worker import RetrainWorker, request_retrain
from test_retrain import publish_labels, write_raw_log

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "fraud"
TOPIC = "transactions"


@pytest.fixture(scope="module")
def scenario(services, tmp_path_factory, apply_feature_repo):
    tmp = tmp_path_factory.mktemp("retrain-control")
    uid = "rc" + os.urandom(4).hex()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
    settings = load_settings(env, kafka_bootstrap_servers=services.kafka, redis_url=services.redis_url,
                             data_dir=str(tmp / "data"), topic_labels=f"{uid}.labels",
                             topic_retrain=f"{uid}.retrain", topic_models=f"{uid}.models", kafka_partitions=1)
    registry = apply_feature_repo(settings)
    batch = TransactionWorkload(seed=5, cards=300, merchants=60, rate=1.0).batch(2500)
    write_raw_log(settings, registry, batch, TOPIC)
    publish_labels(settings, batch)
    outcome = Retrainer(settings, registry, RetrainConfig(seed=1)).run(bootstrap=True)
    assert outcome["status"] == "promoted", outcome
    return {"settings": settings, "registry": registry, "uid": uid}


@pytest.mark.timeout(900)  # the module's bootstrap training runs in the first test's set-up
def test_a_champion_that_does_not_load_is_not_replaced_without_a_comparison(scenario):
    settings = scenario["settings"]
    models = ModelRegistry(settings, publish_events=False)
    champion = models.current_version(MODEL)
    mv = models.client.get_model_version(MODEL, champion)
    artifact = settings.data_path / "mlartifacts" / mv.run_id / "artifacts" / "model" / "model.skops"
    assert artifact.is_file()
    hidden = artifact.with_suffix(".hidden")
    artifact.rename(hidden)  # the champion's artifact goes missing
    try:
        outcome = Retrainer(settings, scenario["registry"], RetrainConfig(seed=2)).run(["alert-unloadable"])
    finally:
        hidden.rename(artifact)
    assert outcome["status"] == "not_promoted", outcome
    assert "not promoted without a comparison" in outcome["decision"]
    assert models.current_version(MODEL) == champion


def _committed(settings, group: str) -> int:
    c = kafka.consumer(settings, group)
    try:
        [tp] = c.committed([TopicPartition(settings.topic_retrain, 0)], timeout=10)
        return tp.offset
    finally:
        c.close()


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.1)


@pytest.mark.timeout(900)
def test_a_failed_training_is_retried_with_back_off_and_its_request_stays_uncommitted(scenario):
    settings, uid = scenario["settings"], scenario["uid"]
    group = f"{uid}-worker"
    corrupt = Path(raw_log_path(settings.data_path, TOPIC)) / "part-corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not a parquet file")  # a real fault: every training fails to read
    outcomes: list[dict] = []
    worker = RetrainWorker(settings, {MODEL: Retrainer(settings, scenario["registry"], RetrainConfig(seed=3))},
                           group=group, on_outcome=outcomes.append, label_sync_every_s=0, retry_base_s=0.5,
                           retry_max_s=2.0)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        request_retrain(settings, MODEL, ["alert-retry"])
        _wait(lambda: len(outcomes) >= 3, 300, "three failed attempts")
        failed = outcomes[:3]
        assert [o["status"] for o in failed] == ["failed"] * 3
        assert [o["attempt"] for o in failed] == [1, 2, 3]
        assert [o["retry_in_s"] for o in failed] == [0.5, 1.0, 2.0]  # doubling, capped
        assert all(o["reason"] == ["alert-retry"] for o in failed)
        assert _committed(settings, group) < 0  # not dropped: a crash now replays the request

        corrupt.unlink()  # the fault goes away: the next retry trains
        _wait(lambda: any(o["status"] in ("promoted", "not_promoted") for o in outcomes), 300, "a training")
        done = next(o for o in outcomes if o["status"] in ("promoted", "not_promoted"))
        assert done["reason"] == ["alert-retry"] and done["version"] is not None
        _wait(lambda: _committed(settings, group) == 1, 30, "the request committed after it trained")
        assert worker.counts["failed"] >= 3 and worker.counts["retries"] >= 3
    finally:
        worker.stop()
        thread.join(30)
        if corrupt.exists():
            corrupt.unlink()


class _WatchedRetrainer(Retrainer):
    """A real Retrainer that says when it starts (or starts again) waiting for labels."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.waiting = threading.Event()

    def _start_wait(self, *args, **kwargs):
        wait = super()._start_wait(*args, **kwargs)
        self.waiting.set()
        return wait


def test_a_training_for_alerts_learns_only_from_labels_after_the_newest_alert(scenario):
    registry, uid = scenario["registry"], scenario["uid"]
    # a retrain topic of its own: the module's earlier requests are not this training's
    settings = dataclasses.replace(scenario["settings"], topic_retrain=f"{uid}.retrain-since")
    group = f"{uid}-since"
    known = TransactionWorkload(seed=5, cards=300, merchants=60, rate=1.0)
    old = known.batch(2500)  # the scenario's events: labelled before any alert
    new = known.batch(2000)  # the traffic after the alerts (with ~25 frauds: 5 folds of it can be fitted)
    cfg = RetrainConfig(seed=4, wait_labels=300, wait_positives=5, wait_max_s=120, since_request=True, folds=5)
    retrainer = _WatchedRetrainer(settings, registry, cfg)
    outcomes: list[dict] = []
    worker = RetrainWorker(settings, {MODEL: retrainer}, group=group, on_outcome=outcomes.append,
                           label_sync_every_s=0)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        request_retrain(settings, MODEL, ["alert-first"])
        assert retrainer.waiting.wait(120), "the training never started waiting for labels"
        retrainer.waiting.clear()
        request_retrain(settings, MODEL, ["alert-newer"])  # a drift reported while it waits
        assert retrainer.waiting.wait(120), "the newer alert did not start the wait again"
        write_raw_log(settings, registry, new, TOPIC)
        publish_labels(settings, new)
        _wait(lambda: outcomes, 300, "the training")
    finally:
        worker.stop()
        thread.join(30)
    done = outcomes[0]
    assert done["status"] in ("promoted", "not_promoted"), done
    assert sorted(done["reason"]) == ["alert-first", "alert-newer"] and done["wait_restarts"] == 1, done
    assert done["waited_for_labels"] >= 300 and done["waited_for_positives"] >= 5, done
    # trained and judged on the events after the newest alert only: none of the 2,500 before it
    assert done["examples"]["in_window"] == len(new), done["examples"]
    assert done["window"]["since_request"], done["window"]
    assert float(new.event_ts.min()) > float(old.event_ts.max())
    _wait(lambda: _committed(settings, group) == 2, 30, "both requests committed with the one training")
    assert len(outcomes) == 1, outcomes  # the newer alert was answered by that training, not by another
    _judged_out_of_fold_and_fitted_on_every_row(settings, registry, done, len(new))


def _judged_out_of_fold_and_fitted_on_every_row(settings, registry, done: dict, rows: int) -> None:
    """--folds 5: judged on all the post-request rows out-of-fold, the version fitted on all of them, its
    miss-rate reference from the out-of-fold scores, and --reproduce rebuilds it the same."""
    from freshet.training.reproduce import reproduce

    assert done["judging"] == {"folds": 5}, done.get("judging")
    assert done["rows"]["train"] == rows and done["rows"]["holdout"] == 0 and done["rows"]["folds"] == 5, done["rows"]
    assert "out-of-fold, 5 folds" in done["decision"] or done["status"] == "promoted", done["decision"]
    positives = done["rows"]["train_positives"]
    assert done["reference"]["outcomes"]["positives"] == positives  # every post-request fraud, scored out-of-fold
    models = ModelRegistry(settings, publish_events=False)
    mv = models.client.get_model_version(MODEL, done["version"])
    run = models.client.get_run(mv.run_id)
    assert run.data.metrics["folds"] == 5 and run.data.params["folds"] == "5", (run.data.metrics, run.data.params)
    report = reproduce(settings, MODEL, done["version"], registry, models)
    assert report["status"] in ("identical", "equivalent"), report
    assert report["rows"] == done["rows"], report
