"""`freshet produce` on a real broker: every event and label arrives, keyed and shaped as promised."""

from __future__ import annotations

import argparse
import time

import orjson
import pytest

from freshet import kafka
from freshet.contracts import Label
from freshet.demo import cli
from freshet.demo.workload import EVENT_FIELDS, TransactionWorkload, publish

pytestmark = pytest.mark.integration

OPTIONS = dict(cards=500, merchants=50, label_delay_s=5.0)


def consume(settings, topic: str, want: int, timeout: float = 30.0) -> list:
    """Read a topic from the beginning by assignment (no group join to wait for)."""
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    c = kafka.consumer(settings, f"{topic}-reader")
    partitions = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    got = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < want and time.monotonic() < deadline:
            got.extend(m for m in c.consume(1000, 0.2) if not m.error())
    finally:
        c.close()
    return got


def test_published_events_and_labels_come_back_keyed_and_valid(settings, unique):
    topic = f"{unique}.transactions"
    summary = publish(settings, topic, rate=20_000, count=3000, seed=11, start_ts=1_700_000_000.0,
                      malformed_fraction=0.02, late_fraction=0.02, **OPTIONS)
    expected = TransactionWorkload(seed=11, rate=20_000, start_ts=1_700_000_000.0, malformed_fraction=0.02,
                                   late_fraction=0.02, **OPTIONS).batch(3000)
    intact = expected.malformed == ""
    assert summary["sent"] == 3000 and summary["failed"] == 0
    assert summary["malformed"] == (~intact).sum() > 0
    assert summary["late"] == expected.late.sum() > 0
    assert summary["labels"] == intact.sum()
    assert summary["fraud"] == expected.label[intact].sum()

    events = consume(settings, topic, 3000)
    assert len(events) == 3000
    assert sorted(m.key() for m in events) == sorted(c.encode() for c in expected.card_id), "keyed by card"
    by_id, partitions_of_card = {}, {}
    for msg in events:
        partitions_of_card.setdefault(msg.key(), set()).add(msg.partition())
        try:
            event = orjson.loads(msg.value())
        except orjson.JSONDecodeError:
            continue  # a bad_json event
        if list(event) == list(EVENT_FIELDS) and isinstance(event["amount"], float) \
                and isinstance(event["card_id"], str):
            assert msg.key() == event["card_id"].encode()
            by_id[event["transaction_id"]] = event
    assert all(len(p) == 1 for p in partitions_of_card.values()), "one card, one partition"
    assert sorted(by_id) == sorted(expected.transaction_id[intact])
    for event in expected.events()[:200]:
        if event["transaction_id"] in by_id:
            assert by_id[event["transaction_id"]] == event

    labels = consume(settings, settings.topic_labels, int(intact.sum()))
    assert len(labels) == intact.sum()
    decoded = {Label.decode(m.value()).request_id: (m.key(), Label.decode(m.value())) for m in labels}
    assert sorted(decoded) == sorted(by_id), "one label per intact event, joined by transaction id"
    for tx, (key, label) in decoded.items():
        assert key == tx.encode()
        assert label.entities == {"card_id": by_id[tx]["card_id"], "merchant_id": by_id[tx]["merchant_id"]}


def test_publish_paces_to_the_offered_rate(settings, unique):
    summary = publish(settings, f"{unique}.transactions", rate=2000, count=1000, labels=False, **OPTIONS)
    assert summary["sent"] == 1000 and summary["labels"] == 0 and summary["failed"] == 0
    assert 0.4 < summary["elapsed_s"] < 2.0
    assert summary["rate"] == pytest.approx(2000, rel=0.25)


def test_produce_command_prints_a_json_summary_and_progress(settings, unique, capsys):
    parser = argparse.ArgumentParser()
    cli.add_produce_arguments(parser)
    args = parser.parse_args(["--rate", "5000", "--count", "500", "--seed", "3", "--topic", f"{unique}.tx",
                              "--drift", "concept@0", "--cards", "100", "--label-delay", "0"])
    assert cli.cmd_produce(args, settings) == 0
    out, err = capsys.readouterr()
    summary = orjson.loads(out.strip().splitlines()[-1])
    assert summary["sent"] == 500 and summary["labels"] == 500 and summary["drift"] == ["concept@0"]
    assert "500 events" in err


def test_labels_are_published_after_their_delay(settings, unique):
    topic = f"{unique}.transactions"
    publish(settings, topic, rate=2000, count=2000, seed=5, **{**OPTIONS, "label_delay_s": 0.5})
    sent_at = {orjson.loads(m.value())["transaction_id"]: m.timestamp()[1] for m in consume(settings, topic, 2000)}
    labels = consume(settings, settings.topic_labels, 2000)
    assert len(labels) == 2000
    early = [m.timestamp()[1] - sent_at[Label.decode(m.value()).request_id] for m in labels
             if sent_at[Label.decode(m.value()).request_id] - min(sent_at.values()) < 400]
    assert early, "labels of the first 0.4 s were published during the run"
    # message timestamps are wall-clock ms; a stalled producer may send an event late, never a label early
    assert min(early) >= 250 and sorted(early)[len(early) // 2] >= 450, "a label follows its event by the delay"
