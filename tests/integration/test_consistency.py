"""Online equals offline: a seeded end-to-end run on the real broker, Redis, a stream worker and the HTTP API.

Rounds of card transactions in simulated time (out of order within the lateness, late beyond
it, cards and merchants idle for rounds) are applied by a `freshet stream` worker; after each
round every transaction is scored over HTTP and idle entities are probed. Then:
- the training set built from the labels and the raw log equals, for the same requests, the
  features serving logged on the prediction topic;
- every served value equals its recomputation from the raw log (`freshet consistency`'s judge);
- a feature skewed in Redis on purpose is flagged with a data_quality alert on the drift
  topic, while a clean one reads 1.0.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import threading
import time
from pathlib import Path

import pytest

from freshet.training.consistency import ConsistencyService, ServedConsistency
from freshet.monitor.consistency import ConsistencyRate
from freshet.stream.pointintime import same_value
from stream_checks import isolated_stream

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SKEWED, CLEAN = "card_txn_stats:sum_amount_300s", "card_txn_stats:count_amount_300s"


def _bench():
    """bench/consistency.py: the live run (worker, HTTP API, seeded rounds) the benchmark drives."""
    spec = importlib.util.spec_from_file_location("consistency_bench", ROOT / "bench" / "consistency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(services, tmp_path_factory):
    bench = _bench()
    tmp = tmp_path_factory.mktemp("consistency")
    uid, topic, settings, worker_env, registry, layout, client = isolated_stream(services, tmp, "cs")
    settings = dataclasses.replace(settings, topic_predictions=f"{uid}.predictions", topic_labels=f"{uid}.labels",
                                   topic_drift=f"{uid}.drift")
    rounds = bench.Rounds(seed=5, rounds=3, events=40, idle=15, step_s=450.0, cards=200, merchants=20)
    with bench.LiveConsistencyRun(settings, topic, worker_env, tmp / "worker.log", f"{uid}-stream") as live:
        played = live.play(rounds, label_topic=settings.topic_labels)
        clean = live.logged_predictions()
        skewed = _skew_and_predict(live, layout, client, clean)
        yield dict(settings=settings, registry=registry, live=live, played=played, clean=clean, skewed=skewed)


def _skew_and_predict(live, layout, client, clean) -> list[str]:
    """Raise the 5-minute amount sum of the last round's cards in Redis by half, then score them again."""
    cards = sorted({p.entities["card_id"] for p in clean[-55:] if not p.request_id.startswith("idle")})
    rows = layout.read_rows(client, "card_txn_stats", [(c,) for c in cards], ["sum_amount_300s"])
    layout.write(client, "card_txn_stats", [((card,), {"sum_amount_300s": (values["sum_amount_300s"] or 0) * 1.5 + 1}, ts)
                                            for card, (ts, values) in zip(cards, rows) if ts is not None])
    instances = [{"request_id": f"skew-{i}", "entities": {"card_id": c, "merchant_id": "m0"}, "fields": {"amount": 1.0}}
                 for i, c in enumerate(cards)]
    made = live.predict(instances, live.last_produced_at)
    return [i["request_id"] for i in instances[:made]]


def test_the_run_scored_every_transaction_and_idle_entities_with_late_events_dead_lettered(run):
    played = run["played"]
    assert played["predictions"] == 3 * 40 + 2 * 15 and played["skipped"] == 0
    assert len(run["clean"]) == played["predictions"]


def test_training_set_as_served_equals_the_features_logged_for_the_same_requests(run):
    from freshet.stream.backfill import load_events
    from freshet.training.dataset import FeaturePlan, join_labels_to_events, point_in_time_features
    from freshet.training.labels import LabelLog
    from freshet.training.served import PredictionArchive, attach_served_requests

    settings, registry = run["settings"], run["registry"]
    labels = LabelLog(settings)
    labels.sync()
    plan = FeaturePlan.of(registry, "fraud_model_v1")
    events = load_events(settings, plan.topic)
    examples, _ = join_labels_to_events(labels.read(), events, plan.join_keys, ["amount"], "transaction_id",
                                        plan.timestamp_field)
    archive = PredictionArchive(settings)
    archive.sync()
    examples = attach_served_requests(settings, examples, archive.read())
    assert len(examples) == 3 * 40 and examples["request_ts"].notna().all()
    data = point_in_time_features(settings, plan, examples, events, plan.refs)
    logged = {p.request_id: p.features for p in run["clean"]}
    different = [(row["request_id"], ref, row[ref.replace(":", "__")], logged[row["request_id"]][ref])
                 for _, row in data.iterrows() for ref in plan.refs
                 if not same_value(logged[row["request_id"]][ref], row[ref.replace(":", "__")])]
    assert different == []
    # and as of each transaction's own event time (the old definition) they would not be
    by_event_time = point_in_time_features(settings, plan, examples.drop(columns=["request_ts"]), events, plan.refs)
    assert any(not same_value(logged[row["request_id"]][ref], row[ref.replace(":", "__")])
               for _, row in by_event_time.iterrows() for ref in plan.refs)


def test_every_served_value_equals_its_recomputation_from_the_raw_log_idle_entities_included(run):
    checker = run["live"].judge(run["clean"])
    summary = checker.rate.summary()
    assert summary["features_compared"] == len(run["clean"]) * 36
    assert list(checker.mismatches) == [] and summary["consistency_rate"] == 1.0


def test_the_consistency_service_alerts_on_a_skewed_feature_and_reads_a_clean_one_at_one(run):
    settings, registry = run["settings"], run["registry"]
    skewed_ids = set(run["skewed"])
    assert len(skewed_ids) >= 15
    rate = ConsistencyRate(min_rate=0.99, window=1000, min_compared=20)
    checker = ServedConsistency(settings, registry, rate, sample=1.0, settle_s=0.5)
    alerts = []
    service = ConsistencyService(settings, checker, start="earliest", on_alert=alerts.append)
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    want = len(run["clean"]) + len(skewed_ids)
    deadline = time.monotonic() + 60
    while checker.judged < want and time.monotonic() < deadline:
        time.sleep(0.2)
    service.stop()
    thread.join(30)
    assert checker.judged == want
    assert rate.rate(CLEAN) == 1.0
    assert rate.rate(SKEWED) < 0.99
    assert {m["request_id"] for m in checker.mismatches} == skewed_ids
    assert [(a.kind, a.subject, a.detector) for a in alerts] == [("data_quality", SKEWED, "consistency")]
    from freshet.monitor.service import read_alerts

    on_topic = [a for a in read_alerts(settings, idle_timeout_s=5) if not isinstance(a, str)]
    assert [(a.kind, a.subject) for a in on_topic] == [("data_quality", SKEWED)]
