"""The embedded broker restarted on an existing data dir: it keeps nothing on disk, so its
partitions count offsets from 0 again while the data dir still remembers the old ones.
New events and labels must arrive all the same, and nothing is silently dropped."""

from __future__ import annotations

import random
import time

import orjson
import pytest

from freshet import kafka
from freshet.settings import load_settings
from freshet.stream.backfill import load_events
from freshet.training.labels import LabelLog

from own_stack import TOPIC, OwnStack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

APP_ID = "restart-stream"


def _events(tag: str, n: int, t0: float) -> list[dict]:
    rnd = random.Random(tag)
    out, t = [], t0
    for i in range(n):
        t += rnd.uniform(0.5, 5.0)
        out.append({"transaction_id": f"{tag}-tx{i}", "card_id": f"{tag}-card{rnd.randrange(12)}",
                    "merchant_id": f"{tag}-m{rnd.randrange(4)}", "amount": round(rnd.lognormvariate(3, 1), 2),
                    "country": "DE", "channel": "web", "event_ts": t})
    return out


def _publish(settings, events: list[dict]) -> None:
    """The events, then a fraud label for each (keyed and named by its transaction id)."""
    p = kafka.producer(settings, log_level=0)
    for e in events:
        p.produce(TOPIC, key=e["card_id"].encode(), value=orjson.dumps(e))
    for e in events:
        label = {"schema": "freshet.labels/1", "request_id": e["transaction_id"], "label": e["amount"] > 50,
                 "ts": e["event_ts"] + 30, "event_ts": e["event_ts"]}
        p.produce(settings.topic_labels, key=e["transaction_id"].encode(), value=orjson.dumps(label))
    assert p.flush(30) == 0


@pytest.fixture(scope="module")
def restarted(tmp_path_factory, apply_feature_repo):
    tmp = tmp_path_factory.mktemp("broker-restart")
    data = tmp / "data"
    t0 = time.time() - 2 * 3600
    before, after = _events("before", 240, t0), _events("after", 240, t0 + 1800)

    first = OwnStack(data, tmp / "worker-1.log", APP_ID)
    try:
        registry = apply_feature_repo(first.settings)
        first.start_worker()
        _publish(first.settings, before)
        first.wait_applied(registry, before)
        copied_before = LabelLog(first.settings).sync()
    finally:
        first.stop()

    second = OwnStack(data, tmp / "worker-2.log", APP_ID)  # a new broker: offsets from 0 again
    try:
        second.start_worker()
        _publish(second.settings, after)
        second.wait_applied(registry, after)
        copied_after = LabelLog(second.settings).sync()
        yield dict(data=data, before=before, after=after, settings=second.settings, copied_before=copied_before,
                   copied_after=copied_after)
    finally:
        second.stop()


def _transactions(df) -> set[str]:
    return set(df["transaction_id"]) if len(df) else set()


def test_events_published_after_the_restart_reach_the_raw_log_though_their_offsets_were_used_before(restarted):
    raw = load_events(restarted["settings"], TOPIC)
    assert _transactions(raw) == {e["transaction_id"] for e in restarted["after"]}


def test_labels_published_after_the_restart_reach_the_label_log(restarted):
    assert restarted["copied_before"] == len(restarted["before"])
    assert restarted["copied_after"] == len(restarted["after"])
    labels = LabelLog(restarted["settings"]).read()
    assert set(labels["request_id"]) == {e["transaction_id"] for e in restarted["after"]}


def test_the_previous_brokers_raw_and_label_logs_are_moved_aside_whole_not_deleted(restarted):
    data = restarted["data"]
    (previous,) = (data / "previous-broker").iterdir()
    old = load_events(load_settings({}, data_dir=str(previous)), TOPIC)
    assert _transactions(old) == {e["transaction_id"] for e in restarted["before"]}
    old_labels = LabelLog(load_settings({}, data_dir=str(previous), topic_labels=restarted["settings"].topic_labels))
    assert set(old_labels.read()["request_id"]) == {e["transaction_id"] for e in restarted["before"]}


def test_the_data_dir_records_the_incarnation_of_the_broker_now_running(restarted):
    from freshet.app.incarnation import BrokerRecord

    record = BrokerRecord.read(restarted["data"])
    assert record.kafka == restarted["settings"].kafka_bootstrap_servers
    assert record.incarnation == kafka.broker_incarnation(restarted["settings"])
