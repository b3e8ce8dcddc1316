"""Bad input never stops the stream, on the real broker and Redis.

One worker reads a topic that carries, among good transactions:
- poison values of every kind the validation bounds (a timestamp of 1e300 first of all,
  one a year ahead, before 1970, non-finite and huge numbers, over-long strings, deep
  JSON, a message over the size limit, one near the broker's own limit);
- events that break a later stage for real: a card and a merchant whose Redis keys hold
  a string, so writing their features fails with WRONGTYPE;
- half of the good events from a producer with librdkafka's default partitioner
  (`consistent_random`, CRC32), so most of them land outside their card's murmur2
  partition.
The worker must stay up; Redis must equal an independent recomputation of the events each
view accepted, and every rejected event must be in the dead-letter topic with its reason.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest

from freshet import kafka
from freshet.app.stack import free_port
from stream_checks import isolated_stream, dead_letters, online_differences, settled

pytestmark = [pytest.mark.integration]

CARD, MERCHANT = "card_txn_stats", "merchant_txn_stats"


def _good_events(rnd: random.Random, uid: str, n: int, t0: float) -> list[dict]:
    out, t = [], t0
    for i in range(n):
        t += rnd.uniform(0.5, 6.0)
        out.append({"transaction_id": f"{uid}-tx{i}", "card_id": f"{uid}-card{rnd.randrange(30)}",
                    "merchant_id": f"{uid}-m{rnd.randrange(8)}", "amount": round(rnd.lognormvariate(3, 1), 2),
                    "country": "DE", "channel": "web", "event_ts": t})
    return out


def _poison_values(uid: str, t: float) -> list[tuple[bytes, str]]:
    """(message, a substring of its dead-letter reason) for each kind of value validation bounds."""
    def event(i, **changes) -> dict:
        return {"transaction_id": f"{uid}-bad{i}", "card_id": f"{uid}-card1", "merchant_id": f"{uid}-m1",
                "amount": 1.0, "country": "DE", "channel": "web", "event_ts": t, **changes}

    def nested(depth: int):
        value: list = []
        for _ in range(depth):
            value = [value]
        return value

    dumps = orjson.dumps
    year = 365 * 86400
    return [
        (dumps(event(1, event_ts=1e300)), "ahead of the wall clock"),
        (dumps(event(2, event_ts=time.time() + year)), "ahead of the wall clock"),
        (dumps(event(3, event_ts=(time.time() + year) * 1000)), "ahead of the wall clock"),  # milliseconds
        (dumps(event(4, event_ts="9999-12-31T23:59:59Z")), "ahead of the wall clock"),
        (dumps(event(5, event_ts=-86400)), "before 1970"),
        (dumps(event(6, event_ts="0001-01-01T00:00:00Z")), "before 1970"),
        (dumps(event(7, amount=1e200)), "field 'amount' must be a finite number"),
        # an integer literal past 64 bits (JSON decodes it as a float)
        (dumps(event(8)).replace(b'"amount":1.0', b'"amount":-1' + b"0" * 120), "field 'amount' must be a finite"),
        (dumps(event(9)).replace(b'"amount":1.0', b'"amount":1e400'), "not valid JSON"),
        (dumps(event(10)).replace(b'"amount":1.0', b'"amount":NaN'), "not valid JSON"),
        (dumps(event(11, card_id="c" * 5000)), "field 'card_id' has 5000 characters"),
        (dumps(event(12, country="x" * 2000)), "field 'country' has 2000 characters"),
        (dumps(event(13, extra=nested(40))), "JSON nests deeper than"),
        (b'{"a":' + b"[" * 2000 + b"]" * 2000 + b"}", "not valid JSON"),  # orjson's own depth limit
        (dumps(event(15, padding="p" * 150_000)), "larger than FRESHET_STREAM_MAX_EVENT_BYTES"),
        # near the broker's ~1 MB limit: the dead letter carries the first 512 KiB
        (dumps(event(16, padding="p" * 900_000)), "payload: the first 524288 of"),
        (dumps(event(17, event_ts=True)), "must be a timestamp, got bool"),
    ]


@pytest.fixture(scope="module")
def bad_input_run(services, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-input")
    uid, topic, settings, worker_env, registry, layout, client = isolated_stream(services, tmp, "b")

    rnd = random.Random(11)
    good = _good_events(rnd, uid, 1200, time.time() - 3 * 3600)
    # a card and a merchant whose features cannot be written: their keys hold a string
    bad_card, bad_merchant = f"{uid}-card-wrongtype", f"{uid}-m-wrongtype"
    client.set(layout.entity_key(CARD, (bad_card,)), b"not a hash")
    client.set(layout.entity_key(MERCHANT, (bad_merchant,)), b"not a hash")
    for i in (100, 500, 900):
        good[i]["card_id"] = bad_card
        good[i + 1]["merchant_id"] = bad_merchant
    poison = _poison_values(uid, good[0]["event_ts"])

    offsets: dict[str, tuple[int, int]] = {}  # transaction id -> (partition, offset)

    def delivered(err, msg):
        assert err is None, err
        offsets[orjson.loads(msg.value())["transaction_id"]] = (msg.partition(), msg.offset())

    murmur2 = kafka.producer(settings, **{"message.max.bytes": 1_048_576})
    crc32 = kafka.producer(settings, partitioner="consistent_random")
    first, rest = poison[0], poison[1:]
    murmur2.produce(topic, key=good[0]["card_id"].encode(), value=first[0])  # 1e300 before every good event
    murmur2.flush(10)
    slots = sorted(rnd.sample(range(len(good)), len(rest)))
    for i, e in enumerate(good):
        # blocks of 40 from each producer in turn, each flushed before the next: a partition
        # then holds its events in time order, whichever producer sent them
        producer = crc32 if i // 40 % 2 else murmur2
        producer.produce(topic, key=e["card_id"].encode(), value=orjson.dumps(e), on_delivery=delivered)
        while slots and slots[0] == i:
            slots.pop(0)
            raw, _ = rest[len(rest) - len(slots) - 1]
            producer.produce(topic, key=e["card_id"].encode(), value=raw)
        if i % 40 == 39:
            assert producer.flush(30) == 0
    assert murmur2.flush(30) == 0 and crc32.flush(30) == 0

    app_id = f"{uid}-stream"
    log_path = tmp / "worker.log"
    metrics_port = free_port()
    worker = subprocess.Popen([sys.executable, "-m", "freshet.cli", "stream", "--app-id", app_id],
                              env={**worker_env, "FRESHET_STREAM_METRICS_PORT": str(metrics_port)},
                              stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)
    card_events = [e for e in good if e["card_id"] != bad_card]
    merchant_events = [e for e in good if e["merchant_id"] != bad_merchant]
    internal = [f"{app_id}-{view}-repartition" for view in (CARD, MERCHANT)]
    try:
        deadline = time.monotonic() + 180
        while True:
            assert worker.poll() is None, log_path.read_text()[-3000:]
            wrong_cards = online_differences(layout, client, registry.views[CARD], card_events, "card_id")
            wrong_merchants = online_differences(layout, client, registry.views[MERCHANT], merchant_events,
                                                 "merchant_id")
            if not wrong_cards and not wrong_merchants and settled(settings, app_id, [topic, *internal]):
                break
            assert time.monotonic() < deadline, (wrong_cards[:5], wrong_merchants[:5])
            time.sleep(0.5)
        scraped = _scrape_settled(metrics_port)
        alive = worker.poll() is None
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
    yield dict(settings=settings, registry=registry, layout=layout, client=client, good=good, poison=poison,
               offsets=offsets, bad_card=bad_card, bad_merchant=bad_merchant, alive=alive,
               card_events=card_events, merchant_events=merchant_events, topic=topic,
               log=Path(log_path).read_text(), records=dead_letters(settings), metrics=scraped)


def _samples(text: str) -> list:
    from prometheus_client.parser import text_string_to_metric_families

    return [s for f in text_string_to_metric_families(text) for s in f.samples]


def _scrape_settled(port: int, deadline_s: float = 15.0) -> list:
    """The worker's metrics once its lag gauges (updated every second) show every partition caught up."""
    deadline = time.monotonic() + deadline_s
    while True:
        samples = _samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
        lag = [s for s in samples if s.name == "freshet_stream_lag"]
        if (len(lag) == 4 and not any(s.value for s in lag)) or time.monotonic() > deadline:
            return samples
        time.sleep(0.3)


def test_the_worker_exports_events_dead_letters_lag_and_freshness(bad_input_run):
    r = bad_input_run
    samples = r["metrics"]

    def value(name: str, **labels) -> float:
        return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("freshet_stream_events_total", outcome="accepted") == len(r["good"])
    assert value("freshet_stream_events_total", outcome="deadlettered") == len(r["records"])
    assert value("freshet_stream_deadletters_total") == len(r["records"])
    assert value("freshet_stream_deadletters_total", reason="unprocessable") > 0
    lag = {s.labels["partition"]: s.value for s in samples if s.name == "freshet_stream_lag"}
    assert lag == {"0": 0, "1": 0, "2": 0, "3": 0}
    assert value("freshet_stream_partitions_owned") == 4
    # the events are dated 1-3 hours back: their features reached Redis that long after their time
    count = value("freshet_stream_freshness_seconds_count", view=CARD)
    assert count >= len(r["card_events"])
    assert 3600 < value("freshet_stream_freshness_seconds_sum", view=CARD) / count < 4 * 3600


def test_the_worker_stays_up_through_poison_values_a_failing_stage_and_any_partitioner(bad_input_run):
    assert bad_input_run["alive"]
    assert "Traceback" not in bad_input_run["log"]


def test_online_features_equal_a_recomputation_of_the_events_each_view_accepted(bad_input_run):
    r = bad_input_run
    for view, events, key in ((CARD, r["card_events"], "card_id"), (MERCHANT, r["merchant_events"], "merchant_id")):
        assert not online_differences(r["layout"], r["client"], r["registry"].views[view], events, key)


def test_every_poison_value_is_dead_lettered_with_its_reason(bad_input_run):
    records = bad_input_run["records"]
    by_payload = {}
    for record in records:
        by_payload.setdefault(record.original(), record)
    for raw, reason in bad_input_run["poison"]:
        if len(raw) > 524288:
            match = [r for r in records if raw.startswith(r.original()) and len(r.original()) == 524288]
            assert len(match) == 1 and reason in match[0].error, reason
            continue
        assert raw in by_payload, f"no dead letter for {raw[:80]!r}"
        assert reason in by_payload[raw].error, (reason, by_payload[raw].error)
        assert by_payload[raw].topic == bad_input_run["topic"]


def test_events_that_break_writing_a_view_are_dead_lettered_for_that_view_only(bad_input_run):
    r = bad_input_run
    unprocessable = [x for x in r["records"] if x.error.startswith("unprocessable")]
    where = {(x.partition, x.offset): x for x in unprocessable}
    for e in r["good"]:
        if e["card_id"] == r["bad_card"]:
            record = where.pop(r["offsets"][e["transaction_id"]])
            assert f"view {CARD} failed: ResponseError: WRONGTYPE" in record.error
            assert orjson.loads(record.original())["card_id"] == r["bad_card"]
        if e["merchant_id"] == r["bad_merchant"]:
            record = where.pop(r["offsets"][e["transaction_id"]])
            assert f"view {MERCHANT} failed: ResponseError: WRONGTYPE" in record.error
            assert orjson.loads(record.original())["merchant_id"] == r["bad_merchant"]
    assert not where, "dead letters for events no view failed on"
    # the other view counted them: the bad card's merchants and the bad merchant's cards
    assert any(e["card_id"] == r["bad_card"] for e in r["merchant_events"])
    assert any(e["merchant_id"] == r["bad_merchant"] for e in r["card_events"])


def test_nothing_else_is_dead_lettered_not_even_events_outside_their_murmur2_partition(bad_input_run):
    r = bad_input_run
    bad = sum(e["card_id"] == r["bad_card"] or e["merchant_id"] == r["bad_merchant"] for e in r["good"])
    assert len(r["records"]) == len(r["poison"]) + bad
    assert not [x for x in r["records"] if "misrouted" in x.error or x.error.startswith("late")]


def test_events_outside_their_murmur2_partition_are_rerouted_and_the_log_says_how_to_avoid_it(bad_input_run):
    from aiokafka.partitioner import murmur2

    r = bad_input_run
    elsewhere = sum((murmur2(e["card_id"].encode()) & 0x7FFFFFFF) % 4 != r["offsets"][e["transaction_id"]][0]
                    for e in r["good"])
    assert elsewhere > len(r["good"]) // 4  # the CRC32 half: most of it lands elsewhere
    assert r["log"].count("arrived outside the partition murmur2 gives") == 1
    assert "partitioner=murmur2_random" in r["log"]
    assert "rerouted" in r["log"]
