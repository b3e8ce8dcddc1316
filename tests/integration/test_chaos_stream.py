"""Faults never lose or double: the stream engine under real kills, pauses, restarts and a full disk.

One scenario feeds every test in this module, each fault in its own phase with entities of
its own (cards and merchants no other phase touches), so each phase's outcome is its
fault's. Events flow (~200/s) while:
1. workers SIGKILL themselves (FRESHET_STREAM_TEST_CRASH_AT, a real SIGKILL) at each point of
   a micro-batch's way to durability: after its Redis write, after a commit's Parquet
   write, with a commit's changelog durable in one partition only, with the changelog
   durable but the offsets not committed (mid-commit), and right after the offsets commit.
   Two workers armed at different points run at once (they share the partitions; when one
   dies the other takes its partitions over), each generation recovers and replays the
   last one's tail; before the last generation Redis is killed and started again empty
   while no worker runs, so its worker must find that out at start;
2. the last worker runs on while this module's own Redis is paused (SIGSTOP/SIGCONT),
   then killed and started again empty on the same port, and while the file system of
   the offline store (a tmpfs) is full.
Every phase mixes in events up to 20 s out of order (within the 30 s lateness, so a
replay judging them by a later watermark would dead-letter them) and a few truly late
ones. At the end Redis, the Parquet feature logs, the raw log and the dead-letter topic
must equal an independent recomputation of the events (as of each row's own time: rows
follow the stream's clock, stream/expiry.py): nothing lost, nothing doubled.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import orjson
import pandas as pd
import pytest

from freshet import kafka
from freshet.app.stack import RedisServer
from freshet.stream.offline import raw_log_path, read_parts
from stream_checks import dead_letters, differences, expected, isolated_stream, online_differences, read_view, settled

# One scenario of a few minutes feeds the module (FRESHET_TEST_CHAOS_POINTS=a,b runs a subset);
# a partition that stops being committable fails it after 600 s rather than hanging
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(3600)]

CARD, MERCHANT = "card_txn_stats", "merchant_txn_stats"
CRASH_POINTS = {  # the pass of each point a worker dies at: a few in, with events in flight
    "redis-written": 12, "offline-written": 3, "changelog-partial": 3, "changelog-flushed": 3, "committed": 3,
}
# Workers started together, each armed at its own point: two in the group share the
# partitions (a rebalance when one dies), and their imports overlap (seconds each)
GENERATIONS = [("redis-written", "offline-written"), ("changelog-partial", "changelog-flushed"), ("committed",)]
# FRESHET_TEST_CHAOS_POINTS=a,b runs only those crash points (a shorter run; the others skip)
if os.environ.get("FRESHET_TEST_CHAOS_POINTS"):
    CRASH_POINTS = {p: n for p, n in CRASH_POINTS.items() if p in os.environ["FRESHET_TEST_CHAOS_POINTS"].split(",")}
GENERATIONS = [g for g in (tuple(p for p in gen if p in CRASH_POINTS) for gen in GENERATIONS) if g]
# Redis is killed and started again empty after the generation before this point died: the
# workers of this point find it so at start (no run id of the old server to compare with)
RESTART_REDIS_BEFORE = "committed"
OUTAGE_S = 3.0
T0 = 1_790_000_000.0
TMPFS_BYTES = 48 * 1024 * 1024


class Feed:
    """Produces a phase's events (~200/s) in a thread until stopped; remembers every event."""

    def __init__(self, settings, topic: str, phase: str, rnd: random.Random, clock: list[float]):
        self.settings, self.topic, self.phase, self.rnd, self.clock = settings, topic, phase, rnd, clock
        self.valid: list[dict] = []
        self.late: list[dict] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _event(self, i: int) -> dict:
        self.clock[0] += 0.5
        t = self.clock[0] - (self.rnd.uniform(0, 20) if self.rnd.random() < 0.1 else 0.0)
        return {"transaction_id": f"{self.phase}-tx{i}", "card_id": f"{self.phase}-c{self.rnd.randrange(300)}",
                "merchant_id": f"{self.phase}-m{self.rnd.randrange(40)}", "amount": round(self.rnd.uniform(1, 300), 2),
                "country": "DE", "channel": "web", "event_ts": t}

    def _run(self) -> None:
        p = kafka.producer(self.settings)
        i = 0
        while not self.stop.is_set() and i < 20_000:
            for _ in range(10):
                e = self._event(i)
                i += 1
                if i % 250 == 0:  # truly late: 200 s behind its partition's latest events
                    e = dict(e, transaction_id=f"{self.phase}-late{i}", event_ts=self.clock[0] - 200)
                    self.late.append(e)
                else:
                    self.valid.append(e)
                p.produce(self.topic, key=e["card_id"].encode(), value=orjson.dumps(e))
            p.poll(0)
            time.sleep(0.05)
        assert p.flush(30) == 0

    def __enter__(self) -> "Feed":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def _mount_tmpfs(path: Path) -> str | None:
    """Mount a small tmpfs at `path`; None when done, else why it could not be."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(path)],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"mount failed: {exc}"
    return None if done.returncode == 0 else f"mount -t tmpfs not permitted here: {done.stderr.strip()}"


def _fill(path: Path) -> Path:
    """Fill the file system of `path` to the last byte; returns the filler to delete."""
    filler = path / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing left to fail at close
        try:
            while True:
                f.write(b"\0" * (1 << 20))
        except OSError:
            pass
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


class Workers:
    """`freshet stream` processes of one group, started one at a time."""

    def __init__(self, env: dict, tmp: Path, app_id: str):
        self.env, self.tmp, self.app_id = env, tmp, app_id
        self.logs: dict[str, Path] = {}

    def start(self, name: str, crash_at: str = "") -> subprocess.Popen:
        log = self.logs[name] = self.tmp / f"worker-{name}.log"
        env = {**self.env, "FRESHET_STREAM_TEST_CRASH_AT": crash_at} if crash_at else self.env
        return subprocess.Popen([sys.executable, "-m", "freshet.cli", "stream", "--app-id", self.app_id], env=env,
                                stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def _wait(condition, timeout: float, worker: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        if worker is not None:
            assert worker.poll() is None, f"{log.name} exited: " + log.read_text()[-3000:]
        got = condition()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.3)


def chaos_stream(services, own: RedisServer, tmp: Path, prefix: str):
    """`isolated_stream` on the scenario's own Redis (to pause, kill and restart), its workers
    committing every 0.5 s and leaving the group 6 s after they die."""
    uid, topic, settings, env, registry, layout, client = isolated_stream(
        types.SimpleNamespace(kafka=services.kafka, redis_url=own.url), tmp, prefix)
    env = {**env, "FRESHET_STREAM_COMMIT_INTERVAL_MS": "500", "FRESHET_KAFKA_SESSION_TIMEOUT_MS": "6000"}
    return uid, topic, settings, env, registry, layout, client


@pytest.fixture(scope="module")
def chaos(services, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chaos")
    own = RedisServer(tmp / "redis.log")
    own.start()
    tmpfs = tmp / "data" / "offline"
    unmountable = _mount_tmpfs(tmpfs)
    workers_seen = []
    try:
        uid, topic, settings, env, registry, layout, client = chaos_stream(services, own, tmp, "chaos")
        workers = Workers(env, tmp, f"{uid}-stream")
        rnd, clock = random.Random(11), [T0]
        phases: dict[str, Feed] = {}
        exits: dict[str, int] = {}

        restored_after_down, phase_of = None, {}
        for points in GENERATIONS:  # each generation recovers the last one's tail, then dies
            phase = "+".join(points)
            if RESTART_REDIS_BEFORE in points and phases:
                # Redis restarted empty while no worker runs: the next ones must notice at start
                own.kill()
                own.start()
            started = {point: workers.start(point, f"{point}:{CRASH_POINTS[point]}") for point in points}
            workers_seen += started.values()
            with Feed(settings, topic, phase, rnd, clock) as feed:
                phases[phase] = feed
                deadline = time.monotonic() + 600  # a worker's start alone took two minutes at load average 30
                for point, worker in started.items():
                    phase_of[point] = phase
                    try:
                        exits[point] = worker.wait(timeout=max(1.0, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        worker.kill()
                        exits[point] = None
            if RESTART_REDIS_BEFORE in points and len(phases) > 1:
                # the earlier phases' entities had no event since: only a write-back restores them
                restored_after_down = _online_problems(
                    (layout, client, registry), [e for name, feed in phases.items() if name != phase for e in feed.valid])
        worker = workers.start("last")
        workers_seen.append(worker)
        last_log = workers.logs["last"]

        def outage(name: str, fault, repair, observed: str) -> None:
            with Feed(settings, topic, name, rnd, clock) as feed:
                phases[name] = feed
                # the worker is applying this phase's events before the fault
                _wait(lambda: feed.valid and read_view(layout, client, CARD, [feed.valid[0]["card_id"]])
                      [feed.valid[0]["card_id"]].get("count_amount_86400s"), 120, worker, last_log)
                fault()
                time.sleep(OUTAGE_S)
                repair()
                _wait(lambda: observed in last_log.read_text(), 60, worker, last_log)
                time.sleep(0.5)

        outage("redis-paused", lambda: own.signal(signal.SIGSTOP), lambda: own.signal(signal.SIGCONT),
               "has not answered a write")
        outage("redis-restarted-empty", own.kill, own.start, "writing every live entity's current row back")
        fills = []
        if unmountable is None:
            outage("offline-disk-full", lambda: fills.append(_fill(tmpfs)), lambda: None,
                   "offline store: cannot write parts")
            fills[0].unlink()

        everything = [e for feed in phases.values() for e in feed.valid]
        done = _wait(lambda: settled(settings, workers.app_id, [topic])
                     and not _online_problems((layout, client, registry), everything),
                     600, worker, last_log)  # the replays of five crashes: minutes on a busy machine
        # the Parquet parts of the last rows are written at the next commit
        _wait(lambda: not _offline_problems(registry, everything), 30, worker, last_log)
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
        yield dict(settings=settings, registry=registry, layout=layout, client=client, topic=topic, phases=phases,
                   exits=exits, logs=workers.logs, settled=done, unmountable=unmountable, tmp=tmp,
                   restored_after_down=restored_after_down, phase_of=phase_of)
    finally:
        for w in workers_seen:
            if w.poll() is None:
                w.kill()
                w.wait()
        own.stop()
        if unmountable is None:
            subprocess.run(["umount", "-l", str(tmpfs)], capture_output=True)


def _latest_offline_rows(view, keys: set[str] | None) -> dict[str, tuple[float, dict]]:
    """Each entity's latest row in the view's Parquet feature log (greatest event time,
    then the latest written) with the time it is as of: what a point-in-time read after
    everything returns."""
    table = read_parts(Path(view.offline_path))
    if table is None:
        return {}
    df = table.to_pandas().sort_values([view.timestamp_field, "created"], kind="stable")
    (key,) = view.join_keys
    if keys is not None:
        df = df[df[key].isin(keys)]
    last = df.groupby(key).tail(1)
    return {row[key]: (row[view.timestamp_field].timestamp(), {n: None if pd.isna(row[n]) else row[n]
                                                               for n in view.feature_names})
            for _, row in last.iterrows()}  # an empty window's mean, min, ... is null (NaN in pandas)


def _offline_problems(registry, events: list[dict]) -> list:
    """Where each entity's latest Parquet row differs from the window rule over `events` as of
    the row's own time (rows are evaluated as of the stream's clock, stream/expiry.py); a row
    missing or older than its entity's latest event is a problem too."""
    out = []
    for name, key in ((CARD, "card_id"), (MERCHANT, "merchant_id")):
        latest: dict[str, float] = {}
        for e in events:
            latest[e[key]] = max(latest.get(e[key], e["event_ts"]), e["event_ts"])
        rows = _latest_offline_rows(registry.views[name], set(latest))
        as_of, got = {}, {}
        for entity, t in latest.items():
            ts, values = rows.get(entity, (None, None))
            if ts is None or ts < t - 2e-6:  # microseconds
                out.append((name, entity, "_ts", ts, t))
                continue
            as_of[entity], got[entity] = ts, values
        want = expected([e for e in events if e[key] in as_of], registry.views[name], key, as_of)
        out += [(name, *d) for d in differences(got, want)]
    return out


def _online_problems(chaos_or_parts, events: list[dict]) -> list:
    layout, client, registry = chaos_or_parts
    return [(name, *d) for name, key in ((CARD, "card_id"), (MERCHANT, "merchant_id"))
            for d in online_differences(layout, client, registry.views[name], events, key)]


def _assert_phase_exact(chaos, name: str) -> None:
    """Redis and the latest Parquet row of every entity of the phase equal the recomputation
    as of the row's time, the raw log holds each of its events (once, after readers'
    (partition, offset) dedup)."""
    events = chaos["phases"][name].valid
    assert chaos["settled"], "the group never committed every event and reached the expected values"
    online = _online_problems((chaos["layout"], chaos["client"], chaos["registry"]), events)
    assert not online, online[:10]
    offline = _offline_problems(chaos["registry"], events)
    assert not offline, offline[:10]
    raw = read_parts(raw_log_path(chaos["settings"].data_path, chaos["topic"]),
                     ["transaction_id", "_partition", "_offset"]).to_pandas()
    raw = raw[raw["transaction_id"].str.startswith(f"{name}-")]
    per_position = raw.groupby(["_partition", "_offset"])["transaction_id"].nunique()
    assert (per_position == 1).all(), "two events share a (partition, offset)"
    assert set(raw["transaction_id"]) == {e["transaction_id"] for e in events}


def _assert_killed_at(chaos, point: str) -> None:
    """The worker armed at `point` died there, and its phase's events came out exact."""
    if point not in chaos["exits"]:
        pytest.skip(f"FRESHET_TEST_CHAOS_POINTS leaves out {point}")
    assert chaos["exits"][point] == -signal.SIGKILL, f"worker for {point} exited with {chaos['exits'][point]}"
    assert f"test hook: SIGKILL at {point}" in chaos["logs"][point].read_text()
    _assert_phase_exact(chaos, chaos["phase_of"][point])


def test_sigkill_after_a_batch_reached_redis_before_its_offline_rows_and_checkpoint(chaos):
    _assert_killed_at(chaos, "redis-written")


def test_sigkill_after_the_commit_wrote_parquet_before_any_changelog_record(chaos):
    _assert_killed_at(chaos, "offline-written")


def test_sigkill_with_the_changelog_durable_in_one_partition_only(chaos):
    _assert_killed_at(chaos, "changelog-partial")


def test_sigkill_mid_commit_changelog_durable_offsets_not_committed(chaos):
    _assert_killed_at(chaos, "changelog-flushed")


def test_sigkill_right_after_the_offsets_commit(chaos):
    _assert_killed_at(chaos, "committed")


def test_redis_paused_by_sigstop_is_waited_for_and_nothing_is_lost(chaos):
    assert "has not answered a write" in chaos["logs"]["last"].read_text()
    _assert_phase_exact(chaos, "redis-paused")


def test_redis_restarted_empty_gets_every_live_entity_back_from_state(chaos):
    # the earlier phases' entities had no event since: only the write-back restores them
    log = chaos["logs"]["last"].read_text()
    assert "unavailable" in log and "writing every live entity's current row back" in log
    for name, feed in chaos["phases"].items():
        problems = _online_problems((chaos["layout"], chaos["client"], chaos["registry"]), feed.valid)
        assert not problems, (name, problems[:5])
    _assert_phase_exact(chaos, "redis-restarted-empty")


def test_a_full_offline_disk_holds_the_commit_until_parts_can_be_written(chaos):
    if chaos["unmountable"]:
        pytest.skip(f"no tmpfs for the offline store: {chaos['unmountable']}")
    assert "offline store: cannot write parts" in chaos["logs"]["last"].read_text()
    _assert_phase_exact(chaos, "offline-disk-full")


def test_redis_restarted_empty_while_no_worker_ran_is_refilled_by_the_next_worker(chaos):
    if chaos["restored_after_down"] is None:
        pytest.skip(f"FRESHET_TEST_CHAOS_POINTS leaves out {RESTART_REDIS_BEFORE} or every point before it")
    assert "writing every live entity's current row back" in chaos["logs"][RESTART_REDIS_BEFORE].read_text()
    assert not chaos["restored_after_down"], chaos["restored_after_down"][:10]


def test_replays_dead_letter_exactly_the_truly_late_events_never_a_counted_one(chaos):
    # events up to 20 s out of order are within the lateness of every first run; a replay
    # judged by a later watermark would dead-letter them although their effects were counted
    records = dead_letters(chaos["settings"])
    late = {e["transaction_id"] for feed in chaos["phases"].values() for e in feed.late}
    got = {orjson.loads(r.original())["transaction_id"] for r in records}
    assert got == late, (sorted(got - late)[:10], sorted(late - got)[:10])
    assert all(r.error.startswith("late") for r in records)
