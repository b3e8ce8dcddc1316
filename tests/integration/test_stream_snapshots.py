"""A restarted stream worker recovers its tables from snapshots plus the changelog's tail, exactly.

The embedded broker cannot trim changelogs, so without snapshots a worker restarted late in a
long run reads every changelog from its start. One scenario on the real broker and Redis:
a worker snapshots its tables every second while events flow, is SIGKILLed mid-stream, and
its successor starts each changelog partition at its newest snapshot (the log says so, and
how many records it did not read again); then that worker is SIGKILLed, every snapshot file
is damaged, and the next one ignores them (logged) and replays the changelogs whole. After
each restart Redis and the Parquet feature logs equal an independent recomputation of the
events: a snapshot loses nothing and doubles nothing.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pandas as pd
import pytest

from freshet import kafka
from freshet.stream.offline import read_parts
from stream_checks import differences, expected, isolated_stream, online_differences, settled, stop_workers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CARD, MERCHANT = "card_txn_stats", "merchant_txn_stats"
T0 = 1_790_000_000.0


def _events(tag: str, n: int, clock: list[float], rnd: random.Random) -> list[dict]:
    out = []
    for i in range(n):
        clock[0] += 0.05
        out.append({"transaction_id": f"{tag}-tx{i}", "card_id": f"c{rnd.randrange(400)}",
                    "merchant_id": f"m{rnd.randrange(40)}", "amount": round(rnd.uniform(1, 300), 2),
                    "country": "DE", "channel": "web",
                    "event_ts": clock[0] - (rnd.uniform(0, 10) if rnd.random() < 0.1 else 0.0)})
    return out


def _produce(settings, topic: str, events: list[dict], per_second: float = 0) -> None:
    p = kafka.producer(settings)
    for i, e in enumerate(events):
        p.produce(topic, key=e["card_id"].encode(), value=orjson.dumps(e))
        if per_second and i % 50 == 49:
            p.poll(0)
            time.sleep(50 / per_second)
    assert p.flush(30) == 0


def _wait(condition, timeout: float, worker: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while True:
        assert worker.poll() is None, f"{log.name} exited: " + log.read_text()[-3000:]
        got = condition()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.3)


def _offline_problems(registry, events: list[dict]) -> list:
    """Each entity's latest Parquet row against the window rule as of the row's own time."""
    out = []
    for name, key in ((CARD, "card_id"), (MERCHANT, "merchant_id")):
        view = registry.views[name]
        table = read_parts(Path(view.offline_path))
        if table is None:
            return [(name, "no rows")]
        df = table.to_pandas().sort_values([view.timestamp_field, "created"], kind="stable")
        rows = {r[key]: (r[view.timestamp_field].timestamp(),
                         {n: None if pd.isna(r[n]) else r[n] for n in view.feature_names})
                for _, r in df.groupby(key).tail(1).iterrows()}
        latest: dict[str, float] = {}
        for e in events:
            latest[e[key]] = max(latest.get(e[key], e["event_ts"]), e["event_ts"])
        as_of, got = {}, {}
        for entity, t in latest.items():
            ts, values = rows.get(entity, (None, None))
            if ts is None or ts < t - 2e-6:
                out.append((name, entity, "_ts", ts, t))
                continue
            as_of[entity], got[entity] = ts, values
        out += [(name, *d) for d in differences(got, expected([e for e in events if e[key] in as_of], view, key, as_of))]
    return out


def _online_problems(layout, client, registry, events: list[dict]) -> list:
    return [(name, *d) for name, key in ((CARD, "card_id"), (MERCHANT, "merchant_id"))
            for d in online_differences(layout, client, registry.views[name], events, key)]


@pytest.fixture(scope="module")
def restarts(services, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("snapshots")
    uid, topic, settings, env, registry, layout, client = isolated_stream(services, tmp, "snap")
    env = {**env, "FRESHET_STREAM_SNAPSHOT_INTERVAL_S": "1", "FRESHET_STREAM_COMMIT_INTERVAL_MS": "500",
           "FRESHET_KAFKA_SESSION_TIMEOUT_MS": "6000"}
    app_id = f"{uid}-stream"
    snapshot_dir = settings.data_path / "snapshots"
    rnd, clock, events, logs, workers = random.Random(5), [T0], [], {}, []
    outcome = {}

    def start(name: str) -> subprocess.Popen:
        log = logs[name] = tmp / f"worker-{name}.log"
        worker = subprocess.Popen([sys.executable, "-m", "freshet.cli", "stream", "--app-id", app_id], env=env,
                                  stdout=open(log, "ab"), stderr=subprocess.STDOUT)
        workers.append(worker)
        return worker

    def exact(worker, name) -> bool:
        """The worker recovered its tables, committed every event, and Redis equals the recomputation."""
        return _wait(lambda: "tables recovered in" in logs[name].read_text() and settled(settings, app_id, [topic])
                     and not _online_problems(layout, client, registry, events), 240, worker, logs[name])

    try:
        first = start("first")
        batch = _events("a", 2000, clock, rnd)
        events += batch
        _produce(settings, topic, batch)
        assert exact(first, "first"), "the first worker never reached the expected values"
        # snapshots of every partition, then more events, the worker killed while they flow
        _wait(lambda: len(list(snapshot_dir.rglob("*.arrow"))) >= 8, 60, first, logs["first"])
        batch = _events("b", 2000, clock, rnd)
        events += batch
        _produce(settings, topic, batch[:1000])
        time.sleep(1.5)  # a few commits and snapshots of these
        first.send_signal(signal.SIGKILL)
        first.wait()
        _produce(settings, topic, batch[1000:])
        second = start("second")
        outcome["second_exact_online"] = exact(second, "second")
        _wait(lambda: not _offline_problems(registry, events), 30, second, logs["second"])
        outcome["second_offline"] = _offline_problems(registry, events)

        # every snapshot damaged: the next worker must notice, replay whole changelogs, and be exact
        batch = _events("c", 2000, clock, rnd)
        events += batch
        _produce(settings, topic, batch[:1000])
        time.sleep(2)
        second.send_signal(signal.SIGKILL)
        second.wait()
        _produce(settings, topic, batch[1000:])
        damaged = sorted(snapshot_dir.rglob("*.arrow"))
        for path in damaged:
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))
        outcome["damaged"] = len(damaged)
        third = start("third")
        outcome["third_exact_online"] = exact(third, "third")
        _wait(lambda: not _offline_problems(registry, events), 30, third, logs["third"])
        outcome["third_offline"] = _offline_problems(registry, events)
        stop_workers([third])
        yield dict(outcome, logs={k: v.read_text() for k, v in logs.items()}, events=events,
                   online=_online_problems(layout, client, registry, events))
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()


def test_a_worker_writes_snapshots_of_its_table_partitions_while_events_flow(restarts):
    log = restarts["logs"]["first"]
    assert "table snapshots: " in log
    assert "table recovery starts from snapshots" not in log  # nothing to start from yet


def test_a_restarted_worker_recovers_from_snapshots_and_reads_only_the_changelog_tail(restarts):
    log = restarts["logs"]["second"]
    line = next(ln for ln in log.splitlines() if "table recovery starts from snapshots" in ln)
    assert "for 8 of 8 changelog partitions" in line, line
    skipped = int(line.split("(")[1].split(" records not read again")[0])
    assert skipped > 0, line
    assert "tables recovered in" in log


def test_after_recovery_from_snapshots_redis_and_parquet_equal_a_recomputation(restarts):
    assert restarts["second_exact_online"], "Redis never equalled the recomputation after the restart"
    assert not restarts["second_offline"], restarts["second_offline"][:10]


def test_damaged_snapshots_are_ignored_and_the_changelog_replayed_whole_exactly(restarts):
    assert restarts["damaged"] >= 8
    log = restarts["logs"]["third"]
    assert "ignored" in log and "table recovery starts from snapshots" not in log
    assert restarts["third_exact_online"], "Redis never equalled the recomputation after the full replay"
    assert not restarts["third_offline"], restarts["third_offline"][:10]
    assert not restarts["online"], restarts["online"][:10]
