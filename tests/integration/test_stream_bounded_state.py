"""Bounded state and messages, on the real broker and Redis.

Two merchants outgrow one Kafka message (~1 MB): one with 35,000 distinct cards within
minutes (the issue's probe: the worker used to die with MessageSizeTooLargeError on every
restart), one with 9,000 distinct cards whose ids are 110 characters long (kept exactly,
its state about 1.2 MB). A worker computes them, stops, more events arrive, and a second
worker recovers the states from the changelog and goes on. Redis must equal an
independent recomputation (the sketched distinct counts within the documented error),
and no changelog or repartition record may come near the broker's limit.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import orjson
import pytest
from confluent_kafka import TopicPartition

from freshet import kafka
from freshet.stream.aggregations import DISTINCT_EXACT_MAX
from stream_checks import isolated_stream, differences, expected, online_differences, partition_ends, rows_as_of, settled

pytestmark = [pytest.mark.integration]

CARD, MERCHANT = "card_txn_stats", "merchant_txn_stats"
SKETCH_ERROR = 0.0162  # relative standard error of HyperLogLog with lg_k = 12 (a union)


def _events(uid: str, merchant: str, cards: list[str], t0: float, span_s: float, tag: str) -> list[dict]:
    rnd = random.Random(tag)
    return [{"transaction_id": f"{uid}-{tag}{i}", "card_id": card, "merchant_id": merchant,
             "amount": round(rnd.uniform(1, 200), 2), "country": "DE", "channel": "pos",
             "event_ts": t0 + span_s * i / len(cards)} for i, card in enumerate(cards)]


def _produce(settings, topic: str, events: list[dict]) -> None:
    p = kafka.producer(settings)
    for e in events:
        p.produce(topic, key=e["card_id"].encode(), value=orjson.dumps(e))
        if len(p) > 20_000:
            p.poll(0.1)
    assert p.flush(60) == 0


def _largest_records(settings, topics: list[str]) -> dict[str, tuple[int, int]]:
    """topic -> (largest value in bytes, records whose key names a chunk), read to the end."""
    c = kafka.consumer(settings, f"check-{os.urandom(3).hex()}", **{"fetch.max.bytes": 4_000_000})
    out = {}
    try:
        for topic in topics:
            ends = partition_ends(settings, topic)
            c.assign([TopicPartition(topic, p, 0) for p in ends])
            largest = chunked = 0
            read = {p: 0 for p in ends}
            deadline = time.monotonic() + 60
            while any(read[p] < ends[p] for p in ends) and time.monotonic() < deadline:
                m = c.poll(0.5)
                if m is None or m.error():
                    continue
                read[m.partition()] = m.offset() + 1
                largest = max(largest, len(m.value() or b""))
                chunked += b"\x00chunk\x00" in (m.key() or b"")
            out[topic] = (largest, chunked)
    finally:
        c.close()
    return out


@pytest.fixture(scope="module")
def big_merchants(services, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bounded")
    uid, topic, settings, worker_env, registry, layout, client = isolated_stream(services, tmp, "m")

    sketched, exact = f"{uid}-m-busy", f"{uid}-m-long-ids"
    t0 = time.time() - 3600
    long_ids = [f"{uid}-L{i:05d}-" + "x" * 100 for i in range(9000)]
    first = (_events(uid, sketched, [f"{uid}-c{i}" for i in range(35_000)], t0, 600, "a")
             + _events(uid, exact, long_ids, t0, 600, "b"))
    first.sort(key=lambda e: e["event_ts"])
    # after a restart: the long-id merchant sees half of its cards again and as many new ones
    again = long_ids[::36] + [f"{uid}-L{i:05d}-" + "y" * 100 for i in range(250)]
    second = (_events(uid, sketched, [f"{uid}-d{i}" for i in range(2000)], t0 + 700, 100, "c")
              + _events(uid, exact, again, t0 + 700, 100, "d"))
    second.sort(key=lambda e: e["event_ts"])

    app_id = f"{uid}-stream"
    internal = [f"{app_id}-{view}-repartition" for view in (CARD, MERCHANT)]
    runs = []

    def run(events, log_name):
        _produce(settings, topic, events)
        log_path = tmp / log_name
        worker = subprocess.Popen([sys.executable, "-m", "freshet.cli", "stream", "--app-id", app_id],
                                  env=worker_env, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while not settled(settings, app_id, [topic, *internal]):
                assert worker.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "the worker did not finish in time"
                time.sleep(0.5)
            runs.append(worker.poll() is None)
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
        return log_path.read_text()

    logs = [run(first, "worker1.log"), run(second, "worker2.log")]
    events = first + second
    yield dict(settings=settings, registry=registry, layout=layout, client=client, events=events,
               sketched=sketched, exact=exact, logs=logs, runs=runs, app_id=app_id,
               records=_largest_records(settings, [*internal, f"{app_id}-state-{MERCHANT}-changelog",
                                                   f"{app_id}-state-{CARD}-changelog"]))


def test_the_workers_stay_up_and_finish_both_rounds(big_merchants):
    assert big_merchants["runs"] == [True, True]
    assert not any("Traceback" in log or "MessageSizeTooLarge" in log for log in big_merchants["logs"])


def test_no_record_comes_near_the_brokers_limit_and_the_large_state_was_chunked(big_merchants):
    records = big_merchants["records"]
    assert all(largest < 600_000 for largest, _ in records.values()), records
    merchant_changelog = records[f"{big_merchants['app_id']}-state-{MERCHANT}-changelog"]
    assert merchant_changelog[1] > 0, "the long-id merchant's state should have been written in chunks"


def test_a_merchant_within_the_exact_threshold_is_exact_across_a_restart(big_merchants):
    r = big_merchants
    mine = [e for e in r["events"] if e["merchant_id"] == r["exact"]]
    assert len({e["card_id"] for e in mine}) == 9250 < DISTINCT_EXACT_MAX
    assert not online_differences(r["layout"], r["client"], r["registry"].views[MERCHANT], mine, "merchant_id")


def test_a_merchant_past_the_threshold_is_estimated_within_three_standard_errors(big_merchants):
    r = big_merchants
    mine = [e for e in r["events"] if e["merchant_id"] == r["sketched"]]
    as_of, got = rows_as_of(r["layout"], r["client"], MERCHANT, [r["sketched"]])[r["sketched"]]
    assert as_of >= max(e["event_ts"] for e in mine) - 2e-6
    want = expected(mine, r["registry"].views[MERCHANT], "merchant_id", {r["sketched"]: as_of})[r["sketched"]]
    assert want["count_distinct_card_id_86400s"] == 37_000
    for name, value in want.items():
        if name.startswith("count_distinct"):
            assert abs(got[name] - value) <= 3 * SKETCH_ERROR * value + 2, (name, got[name], value)
        else:  # every other function stays exact
            assert not differences({0: {name: got[name]}}, {0: {name: value}}), (name, got[name], value)


def test_every_card_of_the_big_merchants_has_its_exact_features(big_merchants):
    r = big_merchants
    assert not online_differences(r["layout"], r["client"], r["registry"].views[CARD], r["events"], "card_id")
