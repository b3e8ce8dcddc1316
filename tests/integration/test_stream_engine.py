"""The stream engine end to end on the real broker and Redis.

One scenario feeds every test in this module: events (out of order, late and
malformed ones included) are produced; a worker is killed with SIGKILL mid-stream,
after it wrote part of the work, and two workers in one consumer group (sharing the
partitions, recovering the dead one's tables) finish the job: the rest of the events
is produced once each of them owns partitions. The online store must then equal an
independent pandas recomputation (nothing lost, nothing counted twice), Feast must
read it, and the dead-letter topic must hold exactly the bad events.
FRESHET_TEST_CRASH=0 runs one uninterrupted worker instead.
"""

from __future__ import annotations

import ast
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pandas as pd
import pytest
import redis

from freshet import features, kafka
from freshet.settings import load_settings
from stream_checks import dead_letters, stop_workers

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CRASH = os.environ.get("FRESHET_TEST_CRASH", "1") != "0"
N_RESTARTED = int(os.environ.get("FRESHET_TEST_RESTARTED_WORKERS", "2"))
STOP_SIGNAL = getattr(signal, os.environ.get("FRESHET_TEST_STOP_SIGNAL", "SIGKILL"))
T0 = 1_790_000_000.0  # event time origin (2026-09), any fixed instant works
N_CARDS, N_MERCHANTS = 40, 12


def _events(rnd: random.Random, start_i: int, n: int, t_start: float) -> list[dict]:
    out, t = [], t_start
    for i in range(start_i, start_i + n):
        t += rnd.expovariate(1 / 1.5)  # ~1.5 s apart: 2.5 h of event time in 6000 events
        jitter = -rnd.uniform(0, 20) if rnd.random() < 0.1 else 0.0  # out of order, within lateness
        out.append({
            "transaction_id": f"tx{i}", "card_id": f"card{rnd.randrange(N_CARDS)}",
            "merchant_id": f"m{rnd.randrange(N_MERCHANTS)}", "amount": round(rnd.lognormvariate(3, 1), 2),
            "country": rnd.choice(["DE", "FR", "US"]), "channel": rnd.choice(["web", "pos"]),
            "event_ts": t + jitter,
        })
    return out


MALFORMED = [
    (b"{not json", "not valid JSON"),
    (orjson.dumps({"transaction_id": "bad1", "merchant_id": "m1", "amount": 1.0, "event_ts": T0}), "missing field 'card_id'"),
    (orjson.dumps({"transaction_id": "bad2", "card_id": "card1", "merchant_id": "m1", "amount": "12", "event_ts": T0}),
     "field 'amount' must be float"),
    (orjson.dumps({"transaction_id": "bad3", "card_id": "card1", "merchant_id": "m1", "amount": 1.0, "event_ts": "yesterday"}),
     "not an ISO-8601 timestamp"),
    (orjson.dumps([1, 2, 3]), "event must be a JSON object"),
]


class Sent:
    """Each partition's end offset, from the producers' delivery reports (Tansu's listed
    high watermark is its last batch's base offset + 1, not past its last record)."""

    def __init__(self):
        self.ends: dict[int, int] = {}

    def report(self, err, msg) -> None:
        assert err is None, err
        self.ends[msg.partition()] = max(self.ends.get(msg.partition(), 0), msg.offset() + 1)


def _produce(settings, topic: str, events: list[dict], sent: Sent) -> None:
    _send(settings, topic, [(e["card_id"].encode(), orjson.dumps(e)) for e in events], sent)


def _send(settings, topic: str, messages: list[tuple[bytes, bytes]], sent: Sent) -> None:
    p = kafka.producer(settings)
    for key, value in messages:
        p.produce(topic, key=key, value=value, on_delivery=sent.report)
    assert p.flush(30) == 0


def _worker(settings, env_extra: dict, log: Path, app_id: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
    env.update(settings.to_env())
    env.update(env_extra)
    return subprocess.Popen([sys.executable, "-m", "freshet.cli", "stream", "--app-id", app_id], env=env,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def _expected(events: list[dict], view, key_col: str, as_of: dict[str, float] | None = None) -> dict[str, dict]:
    """Independent recomputation with pandas, as of each entity's latest event or `as_of[entity]`."""
    df = pd.DataFrame(events)
    out = {}
    for key, g in df.groupby(key_col):
        if as_of is not None and key not in as_of:
            continue
        t = as_of[key] if as_of is not None else g["event_ts"].max()
        values = {}
        for a in view.aggregations:
            start = math.floor(t / a.slide_s) * a.slide_s + a.slide_s - a.window_s
            w = g[(g["event_ts"] >= start) & (g["event_ts"] <= t)]
            col = w[a.column]
            fn, n = a.function, len(col)
            if fn == "count":
                values[a.name] = n
            elif fn == "sum":
                values[a.name] = float(col.sum())
            elif fn == "count_distinct":
                values[a.name] = col.nunique()
            elif fn == "last":
                values[a.name] = w.sort_values("event_ts", kind="stable")[a.column].iloc[-1] if n else None
            else:
                values[a.name] = getattr(col, fn)() if n else None
        out[key] = values
    return out


@pytest.fixture(scope="module")
def scenario(services, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream")
    uid = "s" + os.urandom(4).hex()
    topic = f"{uid}.transactions"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
    settings = load_settings(env, kafka_bootstrap_servers=services.kafka, redis_url=services.redis_url,
                             data_dir=str(tmp / "data"), topic_deadletter=f"{uid}.deadletter",
                             kafka_partitions=4, stream_commit_interval_ms=1000)
    extra = {"FRESHET_TRANSACTIONS_TOPIC": topic}
    features.apply(settings, extra_env=extra)
    registry = features.load_registry(settings)
    kafka.ensure_topics(settings, [topic, settings.topic_deadletter])

    rnd = random.Random(7)
    first = _events(rnd, 0, 3000, T0)
    second = _events(rnd, 3000, 3000, max(e["event_ts"] for e in first))
    # late: 200 s behind the newest event of a busy partition (lateness is 30 s)
    late = [dict(e, transaction_id=f"late{i}", event_ts=e["event_ts"] - 200.0)
            for i, e in enumerate(second[-5:])]

    app_id = f"{uid}-stream"
    killed = {}
    sent = Sent()
    if CRASH:
        killed = _kill_mid_stream(settings, topic, first, extra, tmp / "worker1.log", app_id, registry, sent)
    else:
        _produce(settings, topic, first, sent)

    logs = [tmp / f"worker{i}.log" for i in range(2, 2 + (N_RESTARTED if CRASH else 1))]
    workers = [_worker(settings, extra, log, app_id) for log in logs]
    valid = first + second
    from freshet.redis_layout import OnlineLayout

    layout = OnlineLayout(registry.project, registry.views)
    client = redis.Redis.from_url(services.redis_url)
    views = (("card_txn_stats", "card_id"), ("merchant_txn_stats", "merchant_id"))
    ownership = {}
    try:
        # the rest of the events once the group has settled with every worker in it and the
        # first part is applied (tables recovered, the killed worker's tail replayed), so that
        # each worker applies some of them: they land in every partition, each with one owner
        _wait_until(lambda: _settled(logs, topic, settings.kafka_partitions), 60, workers, logs)
        _wait_until(lambda: all(_online_equals(layout, client, registry, name, first, key)
                                for name, key in views), 150, workers, logs)
        ownership["before"] = [_owned(log, topic) for log in logs]
        _produce(settings, topic, second, sent)
        _produce(settings, topic, late, sent)
        _send(settings, topic, [(b"card1", raw) for raw, _ in MALFORMED], sent)
        # every message consumed (the group committed past it: its effects are durable), and
        # the merchant rows, which take a hop through the repartition topic, in Redis
        _wait_until(lambda: all(at >= sent.ends.get(p, 0) for p, at in _committed(settings, app_id, topic).items()),
                    150, workers, logs)
        _wait_until(lambda: all(_online_equals(layout, client, registry, name, valid, key)
                                for name, key in views), 150, workers, logs)
        ownership["after"] = [_owned(log, topic) for log in logs]
    finally:
        stop_workers(workers)
    yield dict(settings=settings, registry=registry, layout=layout, client=client, valid=valid, second=second,
               late=late, topic=topic, tmp=tmp, extra=extra, killed=killed, ownership=ownership)


def _wait_until(condition, timeout: float, workers, logs):
    """Poll `condition` until it returns something truthy (returned), or None after `timeout`:
    then the specifications that depend on it fail with their own details. A worker that
    exits meanwhile fails the scenario."""
    deadline = time.monotonic() + timeout
    while True:
        for w, log in zip(workers, logs):
            assert w.poll() is None, f"{log.name} exited: " + log.read_text()[-3000:]
        got = condition()
        if got or time.monotonic() > deadline:
            return got or None
        time.sleep(0.2)


def _owned(log: Path, topic: str) -> set[int]:
    """Partitions of `topic` a worker owns by its log, replaying its assignments and revocations."""
    owned: set[tuple[str, int]] = set()
    for line in log.read_text().splitlines():
        for what in ("partitions assigned: ", "partitions revoked: "):
            if what in line:
                tps = set(ast.literal_eval(line.split(what, 1)[1].strip()))
                owned = tps if what.startswith("partitions assigned") else owned - tps
    return {p for t, p in owned if t == topic}


def _settled(logs: list[Path], topic: str, partitions: int) -> list[set[int]] | None:
    """Each worker's source partitions once every worker owns some and together they own all."""
    owned = [_owned(log, topic) for log in logs]
    if all(owned) and set().union(*owned) == set(range(partitions)) and sum(map(len, owned)) == partitions:
        return owned
    return None


def _online_equals(layout, client, registry, view: str, events: list[dict], key_col: str) -> bool:
    got, want = _online_and_expected(layout, client, registry, view, events, key_col)
    return want is not None and not _mismatches(got, want)


def _online_and_expected(layout, client, registry, view: str, events: list[dict], key_col: str):
    """(Redis rows, the recomputation as of each row's own timestamp); want is None while some
    entity's row is missing or older than its latest event."""
    latest = pd.DataFrame(events).groupby(key_col)["event_ts"].max().to_dict()
    rows = _read_as_of(layout, client, view, sorted(latest), registry)
    if any(ts is None or ts < latest[k] - 2e-6 for k, (ts, _) in rows.items()):  # _ts has microseconds
        return {}, None
    as_of = {k: max(ts, latest[k]) for k, (ts, _) in rows.items()}
    return {k: values for k, (_, values) in rows.items()}, _expected(events, registry.views[view], key_col, as_of)


def _applied_card_events(settings, registry, cards) -> int:
    """Events reflected in Redis: the day-window counts of every card (the data spans hours)."""
    from freshet.redis_layout import OnlineLayout

    client = redis.Redis.from_url(settings.redis_url)
    got = _read(OnlineLayout(registry.project, registry.views), client, "card_txn_stats", cards, registry)
    return sum(v["count_amount_86400s"] or 0 for v in got.values())


def _committed(settings, app_id: str, topic: str) -> dict[int, int]:
    """The group's committed offset per partition: the next one to read (a fresh topic's start at 0)."""
    from confluent_kafka import TopicPartition

    c = kafka.consumer(settings, app_id)
    try:
        parts = c.committed([TopicPartition(topic, p) for p in range(settings.kafka_partitions)], timeout=10)
    finally:
        c.close()
    return {tp.partition: max(tp.offset, 0) for tp in parts}


def _kill_mid_stream(settings, topic, events, extra, log, app_id, registry, sent: Sent) -> dict:
    """Start a worker, feed it `events` at ~1,000/s and SIGKILL it while they flow.

    Offsets are committed once a second here; the kill comes once a commit has covered
    some of the paced events and Redis shows more events applied than committed: the
    ones a restart reads again and must not count twice."""
    import threading

    cards = sorted({e["card_id"] for e in events})
    head, rest = events[:100], events[100:]
    _produce(settings, topic, head, sent)
    worker = _worker(settings, extra, log, app_id)
    deadline = time.monotonic() + 120
    try:
        # joined its group, caught up and committed the head
        while sum(_committed(settings, app_id, topic).values()) < len(head):
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
    except BaseException:
        worker.kill()  # a failed start must not leave the worker running past the suite
        worker.wait()
        raise

    def paced() -> None:
        p = kafka.producer(settings)
        for i in range(0, len(rest), 50):
            for e in rest[i:i + 50]:
                p.produce(topic, key=e["card_id"].encode(), value=orjson.dumps(e), on_delivery=sent.report)
            p.poll(0)
            time.sleep(0.05)
        assert p.flush(30) == 0

    def past_a_commit_with_uncommitted_effects() -> bool:
        committed = sum(_committed(settings, app_id, topic).values())
        return committed > len(head) and _applied_card_events(settings, registry, cards) > committed

    feeder = threading.Thread(target=paced)
    feeder.start()
    while feeder.is_alive() and not past_a_commit_with_uncommitted_effects():
        assert worker.poll() is None, log.read_text()[-3000:]
        time.sleep(0.02)
    worker.send_signal(STOP_SIGNAL)
    worker.wait(timeout=60)
    feeder.join()
    committed = _committed(settings, app_id, topic)
    return {"applied": _applied_card_events(settings, registry, cards), "committed": sum(committed.values()),
            "committed_by_partition": committed, "produced": len(events)}


def _read(layout, client, view, keys, registry) -> dict[str, dict]:
    return {k: values for k, (_, values) in _read_as_of(layout, client, view, keys, registry).items()}


def _read_as_of(layout, client, view, keys, registry) -> dict[str, tuple[float | None, dict]]:
    """Each entity's row: (the time its values are as of, `_ts:<view>`; the values)."""
    names = registry.views[view].feature_names
    out = {}
    for k in keys:
        key = layout.entity_key(view, (k,))
        raw = client.hmget(key, [layout.field(view, n) for n in names] + [layout.ts_field(view)])
        ts, values = layout.decode_row(view, names, raw)
        out[k] = (ts, dict(zip(names, values)))
    return out


def _close(a: dict, b: dict) -> bool:
    for name, want in b.items():
        got = a.get(name)
        if want is None or got is None:
            if want is not None or got is not None:
                return False
        elif isinstance(want, float) or isinstance(got, float):
            if not math.isclose(float(got), float(want), rel_tol=1e-9, abs_tol=1e-6):
                return False
        elif got != want:
            return False
    return True


def _mismatches(got: dict, want: dict) -> list:
    return [(k, n, got[k].get(n), v) for k in want for n, v in want[k].items()
            if not _close({n: got[k].get(n)}, {n: v})][:10]


@pytest.mark.skipif(not CRASH, reason="FRESHET_TEST_CRASH=0: no worker was killed")
def test_the_killed_worker_had_applied_events_beyond_its_committed_offsets(scenario):
    # what makes the other specifications a test of replay: the restarted workers read
    # these events again, and the online values must still count each once
    k = scenario["killed"]
    assert 0 < k["committed"] < k["applied"] < k["produced"], k


def test_each_worker_owns_source_partitions_while_the_second_half_of_the_events_is_applied(scenario):
    # the second half was produced once every worker owned partitions, into all of them, and the
    # assignment did not change until the online values were complete: each partition's events were
    # applied by its one owner, so every worker applied events
    before, after = scenario["ownership"]["before"], scenario["ownership"]["after"]
    assert len(before) == (N_RESTARTED if CRASH else 1)
    assert all(before) and after == before
    partitions = scenario["settings"].kafka_partitions
    assert sorted(p for owned in before for p in owned) == list(range(partitions))
    from aiokafka.partitioner import murmur2

    hit = {(murmur2(e["card_id"].encode()) & 0x7FFFFFFF) % partitions for e in scenario["second"]}
    assert hit == set(range(partitions)), "the second half must reach every partition"


def test_online_card_features_equal_pandas_recomputation_for_every_function_and_window(scenario):
    reg = scenario["registry"]
    view = reg.views["card_txn_stats"]
    assert {a.function for a in view.aggregations} == {"count", "sum", "mean", "min", "max", "last", "count_distinct"}
    got, want = _online_and_expected(scenario["layout"], scenario["client"], reg, view.name, scenario["valid"],
                                     "card_id")
    assert want is not None, "a card's row is missing or predates its latest event"
    assert not _mismatches(got, want)


def test_merchant_features_computed_through_repartition_equal_recomputation(scenario):
    reg = scenario["registry"]
    view = reg.views["merchant_txn_stats"]
    got, want = _online_and_expected(scenario["layout"], scenario["client"], reg, view.name, scenario["valid"],
                                     "merchant_id")
    assert want is not None, "a merchant's row is missing or predates its latest event"
    assert not _mismatches(got, want)


def test_online_features_equal_the_backfill_recomputation_from_the_raw_log(scenario):
    from freshet.stream.backfill import load_events, replay_view

    settings, reg = scenario["settings"], scenario["registry"]
    events = load_events(settings, scenario["topic"])
    assert sorted(events["transaction_id"]) == sorted(e["transaction_id"] for e in scenario["valid"])
    view = reg.views["card_txn_stats"]
    agg, states, _ = replay_view(events, view)
    rows = _read_as_of(scenario["layout"], scenario["client"], view.name, [k[0] for k in states], reg)
    # the backfill's state of each card, answered as of the time the stream's row is as of
    recomputed = {k[0]: agg.result(state, max(rows[k[0]][0], state["max_ts"])) for k, state in states.items()}
    assert not _mismatches({k: values for k, (_, values) in rows.items()}, recomputed)


def test_the_raw_log_holds_each_event_once_but_what_a_replay_after_the_kill_appended_again(scenario):
    # the parts as written, before the (partition, offset) deduplication of load_events: an event
    # the group had committed at the kill is never appended twice, and nothing is lost
    from freshet.stream.offline import raw_log_path, read_parts

    raw = read_parts(raw_log_path(scenario["settings"].data_path, scenario["topic"]),
                     ["transaction_id", "_partition", "_offset"]).to_pandas()
    assert set(raw["transaction_id"]) == {e["transaction_id"] for e in scenario["valid"]}
    copies = raw.groupby(["_partition", "_offset"])["transaction_id"].agg(["nunique", "size"])
    assert (copies["nunique"] == 1).all(), "two events share a (partition, offset)"
    assert len(copies) == len(scenario["valid"])
    again = copies[copies["size"] > 1].reset_index()
    if not CRASH:
        assert again.empty, again.head(10)
    else:
        committed = scenario["killed"]["committed_by_partition"]
        below = again[again["_offset"] < again["_partition"].map(committed)]
        assert below.empty, f"committed events appended again: {below.head(10)}"
    assert len(raw) == len(scenario["valid"]) + int((again["size"] - 1).sum())


def test_feast_get_online_features_returns_every_stream_feature_of_both_views(scenario):
    reg = scenario["registry"]
    store = features.feature_store(scenario["settings"])
    # the workers have stopped: each row stays as of its timestamp, which Feast reads too
    want = {name: _online_and_expected(scenario["layout"], scenario["client"], reg, name, scenario["valid"], key)[1]
            for name, key in (("card_txn_stats", "card_id"), ("merchant_txn_stats", "merchant_id"))}
    cards, merchants = sorted(want["card_txn_stats"]), sorted(want["merchant_txn_stats"])
    rows = [{"card_id": c, "merchant_id": merchants[i % len(merchants)]}
            for i, c in enumerate(cards)]  # every card and every merchant, each at least once
    refs = [f"{name}:{f}" for name in want for f in reg.views[name].feature_names]
    resp = store.get_online_features(features=refs, entity_rows=rows, full_feature_names=True).to_dict()
    wrong = []
    for i, row in enumerate(rows):
        for name, key in (("card_txn_stats", "card_id"), ("merchant_txn_stats", "merchant_id")):
            for f, expected in want[name][row[key]].items():
                got = resp[f"{name}__{f}"][i]
                if not _close({f: got}, {f: expected}):
                    wrong.append((row[key], f, got, expected))
    assert not wrong, wrong[:10]


def test_malformed_and_late_events_reach_the_dead_letter_topic_with_reasons(scenario):
    # the workers have stopped: the topic holds every dead letter there will be
    records = dead_letters(scenario["settings"])  # to the true end: Tansu lists one batch short
    by_payload = {r.original(): r for r in records}
    for raw, reason in MALFORMED:
        assert raw in by_payload, f"no dead letter for {raw!r}"
        assert reason in by_payload[raw].error
    late_ids = {e["transaction_id"] for e in scenario["late"]}
    late_records = [r for r in records if r.error.startswith("late")]
    unexpected = [(orjson.loads(r.original())["transaction_id"], r.partition, r.offset, r.error)
                  for r in late_records if orjson.loads(r.original())["transaction_id"] not in late_ids]
    assert not unexpected, (len(unexpected), unexpected[:5])
    assert {orjson.loads(r.original())["transaction_id"] for r in late_records} == late_ids
    assert len(records) == len(MALFORMED) + len(late_ids)
    assert all(r.topic == scenario["topic"] and r.offset >= 0 for r in records)


def test_training_set_rows_are_point_in_time_correct_and_never_dropped(scenario):
    from freshet.stream.backfill import training_set

    settings, reg = scenario["settings"], scenario["registry"]
    valid = pd.DataFrame(scenario["valid"])
    labels = pd.DataFrame({
        "card_id": ["card1", "card2", "no-such-card", "card3"],
        "merchant_id": ["m1", "m2", "m3", "no-such-merchant"],
        "event_ts": [T0 + 600, T0 + 3600, T0 + 3600, T0 - 10],  # the last is before any event
        "label": [0, 1, 0, 1],
    })
    refs = ["card_txn_stats:count_amount_3600s", "card_txn_stats:sum_amount_300s",
            "merchant_txn_stats:count_distinct_card_id_3600s"]
    out = training_set(settings, reg, labels, refs, progress=False)
    assert len(out) == len(labels)
    for i, lab in labels.iterrows():
        t = lab["event_ts"]
        start_h = math.floor(t / 60) * 60 + 60 - 3600
        start_5 = math.floor(t / 60) * 60 + 60 - 300
        card = valid[(valid.card_id == lab.card_id) & (valid.event_ts <= t)]
        merch = valid[(valid.merchant_id == lab.merchant_id) & (valid.event_ts <= t)]
        assert out.at[i, "card_txn_stats__count_amount_3600s"] == (card.event_ts >= start_h).sum()
        assert math.isclose(out.at[i, "card_txn_stats__sum_amount_300s"],
                            card[card.event_ts >= start_5].amount.sum(), abs_tol=1e-6)
        assert out.at[i, "merchant_txn_stats__count_distinct_card_id_3600s"] == \
            merch[merch.event_ts >= start_h].card_id.nunique()
