"""Stream engine benchmark: backlog throughput and freshness of one worker, per feature view.

Starts the embedded stack and one `freshet stream` worker, then
1. backlog: publishes a backlog of events as fast as the producer can, then marker events,
   and times, for every view of the registry, until its markers are visible in Redis and
   their rows are in the view's offline part files (and the raw log's parts hold them).
   Markers carry fresh entities: for the view keyed by the message key one per source
   partition, for a repartitioned view one per (source partition, owner partition) pair,
   since each owner partition merges several source partitions. A marker is produced
   after every backlog event of its partition, so once all are applied every event is.
   The backlog ends when the last view's last marker is in Redis and on disk;
   `events_per_s` is delivered events over that time;
2. freshness: publishes at a fixed offered rate; every 50th event is a probe with a fresh
   card and a fresh merchant, timed per view from produce() to its row being readable in
   Redis (the merchant row goes through the repartition topic first);
3. expiry: moves the stream's clock through the day after the events with one clock event
   per slide boundary at which some tile leaves a window (ahead of the wall clock: the
   worker runs with FRESHET_STREAM_MAX_FUTURE_S and FRESHET_STREAM_CLOCK_AHEAD_S of two
   days), so every entity's rows are
   re-evaluated as live time would re-evaluate them, none coalesced by a jump.

Write amplification is Redis rows written per event, per view and phase: rows are counted
in each view's offline feature log (every online row is written there too) and the total
is checked against Redis' own count of HSET calls.

Every send's delivery is checked: failed sends are reported (`delivery`) and not counted,
and a run with any is marked `"ok": false`.

Progress goes to stderr; the last stdout line is one JSON object.
    .venv/bin/python bench/stream.py [--quick] [--rate 5000] [--seconds 20] [--backlog 200000] [--cards 20000]
                                     [--workers N] [--skew] [--partitions P]
                                     [--snapshot-interval-s S] [--fetch-wait-ms MS]

`--workers N` runs N workers in one consumer group (each topic needs at least N partitions:
`--partitions`, default max(4, N)); `--skew` sends half of the events to 1% of the merchants
(the repartition hop and busy-entity tiles are the costs there). `phases` breaks the backlog
down by the engine's own phase timers (wall time inside each phase, awaits included, per
event, summed over the workers), read from the workers' periodic counter lines.

CPU seconds of the worker, the broker, Redis and this script are measured over each
phase (/proc): `events_per_worker_cpu_s` is what the worker would sustain with a core
to itself, `broker_cpu_us_per_event` what the embedded broker spends per event.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import redis
from aiokafka.partitioner import murmur2

from freshet import features, kafka
from freshet.app.stack import EmbeddedStack, cpu_seconds
from freshet.redis_layout import OnlineLayout, decode_timestamp
from freshet.settings import load_settings
from freshet.stream.aggregations import leaves_at
from freshet.stream.offline import raw_log_path

PROBE_EVERY = 50
MERCHANTS = 500
HOT_SHARE, HOT_MERCHANTS = 0.5, MERCHANTS // 100  # --skew: half of the events go to 1% of the merchants


def say(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def event(tx: str, card: str, merchant: str, ts: float, rnd: random.Random) -> bytes:
    return orjson.dumps({"transaction_id": tx, "card_id": card, "merchant_id": merchant,
                         "amount": round(rnd.uniform(1, 300), 2), "country": "DE", "channel": "web",
                         "event_ts": ts})


def partition_of(key: str, partitions: int) -> int:
    """Where the producer (murmur2) and the engine's repartition put this key."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def key_in_partition(prefix: str, partition: int, partitions: int) -> str:
    """The first `prefix<n>` that lands in `partition`."""
    n = 0
    while partition_of(f"{prefix}{n}", partitions) != partition:
        n += 1
    return f"{prefix}{n}"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


class MerchantChoice:
    """Which merchant an event goes to: uniform, or (`skew`) half of them to 1% of the merchants."""

    def __init__(self, rnd: random.Random, skew: bool):
        self.rnd, self.skew = rnd, skew

    def __call__(self) -> str:
        if self.skew and self.rnd.random() < HOT_SHARE:
            return f"m{self.rnd.randrange(HOT_MERCHANTS)}"
        return f"m{self.rnd.randrange(HOT_MERCHANTS if self.skew else 0, MERCHANTS)}"


class Delivery:
    """Counts failed sends from librdkafka's delivery reports (it reports only errors here)."""

    def __init__(self):
        self.failed = 0
        self.failed_keys: set[bytes] = set()
        self.errors: dict[str, int] = {}

    def report(self, err, msg) -> None:
        if err is not None:
            self.failed += 1
            self.failed_keys.add(msg.key())
            self.errors[str(err)] = self.errors.get(str(err), 0) + 1

    def phase(self, sent: int, undelivered: int, failed_before: int) -> dict:
        """One phase's figures: `undelivered` still queued after flush(), failures since `failed_before`."""
        failed = self.failed - failed_before
        return {"sent": sent, "failed": failed, "undelivered_after_flush": undelivered,
                "delivered": sent - failed - undelivered}


class CpuMeter:
    """CPU seconds each named process (or group of processes) spends between `start()` and `stop()`."""

    def __init__(self, pids: dict[str, int | list[int]]):
        self.pids = {name: pid if isinstance(pid, list) else [pid] for name, pid in pids.items()}
        self.used: dict[str, float] = {}

    def _cpu(self) -> dict[str, float]:
        return {name: sum(cpu_seconds(p) for p in pids) for name, pids in self.pids.items()}

    def start(self) -> None:
        self._at = self._cpu()
        self._wall = time.monotonic()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._wall
        self.used = {name: v - self._at[name] for name, v in self._cpu().items()}
        return {**{f"{name}_cpu_s": round(v, 2) for name, v in self.used.items()},
                **{f"{name}_cores": round(v / wall, 2) for name, v in self.used.items()}}


class OnlineWatch:
    """When each of a view's entities first has a row in Redis."""

    def __init__(self, client, layout: OnlineLayout, view: str, entities: list[str]):
        self.client = client
        self.field = layout.ts_field(view)
        self.pending = {layout.entity_key(view, (e,)): e for e in entities}

    def poll(self) -> bool:
        """True once every entity is visible."""
        if self.pending:
            keys = list(self.pending)
            pipe = self.client.pipeline(transaction=False)
            for k in keys:
                pipe.hexists(k, self.field)
            for k, seen in zip(keys, pipe.execute()):
                if seen:
                    del self.pending[k]
        return not self.pending


class OfflineWatch:
    """When rows with given values of one column are in a dataset's part files (read once each)."""

    def __init__(self, root: Path, column: str, values: list[str]):
        self.root = Path(root)
        self.column = column
        self.pending = set(values)
        self.read: set[Path] = set()

    def poll(self) -> bool:
        if self.pending and self.root.exists():
            for path in self.root.rglob("*.parquet"):
                if path.name.startswith(".") or path in self.read:
                    continue  # hidden: a part still being written (renamed into place when done)
                self.read.add(path)
                self.pending -= set(pq.read_table(path, columns=[self.column]).column(0).to_pylist())
        return not self.pending


class ViewClock:
    """Seconds from a start until a view's markers are in Redis and in its offline parts."""

    def __init__(self, online: OnlineWatch | None, offline: OfflineWatch):
        self.online, self.offline = online, offline
        self.online_s: float | None = None if online else 0.0
        self.offline_s: float | None = None

    def poll(self, elapsed: float, offline_too: bool) -> bool:
        if self.online_s is None and self.online.poll():
            self.online_s = elapsed
        if offline_too and self.offline_s is None and self.offline.poll():
            self.offline_s = elapsed
        return self.online_s is not None and self.offline_s is not None

    def figures(self, events: int) -> dict:
        done = max(self.online_s, self.offline_s) if self.online_s is not None and self.offline_s is not None \
            else None
        return {"online_s": _r(self.online_s), "offline_s": _r(self.offline_s), "done_s": _r(done),
                "online_events_per_s": _r(events / self.online_s if self.online_s else None, 1),
                "events_per_s": _r(events / done if done else None, 1)}


class RowCount:
    """Rows each view has written so far (its offline feature log), and Redis' HSET calls."""

    def __init__(self, bench: "Bench"):
        self.bench = bench

    def rows(self) -> dict[str, int]:
        out = {}
        for view in self.bench.views:
            root = Path(view.offline_path)
            out[view.name] = sum(pq.ParquetFile(p).metadata.num_rows for p in root.rglob("*.parquet")
                                 if not p.name.startswith(".")) if root.exists() else 0
        return out

    def hset_calls(self) -> int:
        return int(self.bench.client.info("commandstats").get("cmdstat_hset", {}).get("calls", 0))

    def settled(self, quiet_s: float = 1.5, timeout: float = 60) -> dict[str, int]:
        """Row counts once they have not moved for `quiet_s` (parts are flushed at each commit)."""
        deadline = time.monotonic() + timeout
        last, since = self.rows(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.25)
            now = self.rows()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                break
        return last


def _r(v: float | None, digits: int = 2) -> float | None:
    return None if v is None else round(v, digits)


class PhaseClock:
    """The engine's cumulative phase timers, from the counter line each worker logs every 10 s."""

    LINE = re.compile(rb"accepted (\d+), .*; seconds (\{.*\})")

    def __init__(self, logs: list[Path]):
        self.logs = logs

    def read(self) -> list[tuple[int, dict[str, float]] | None]:
        """Each worker's latest (accepted, seconds per phase), None before its first line."""
        out = []
        for path in self.logs:
            last = None
            for m in self.LINE.finditer(path.read_bytes() if path.exists() else b""):
                last = (int(m.group(1)), ast.literal_eval(m.group(2).decode()))
            out.append(last)
        return out

    def next_lines(self, timeout: float = 30) -> list[tuple[int, dict[str, float]]]:
        """Each worker's next counter line (every one written after this call)."""
        before = self.read()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = self.read()
            if all(n is not None and n != b for n, b in zip(now, before)):
                return now
            time.sleep(0.2)
        raise RuntimeError(f"no new counter line in {timeout:.0f}s from every worker: {self.logs}")

    @staticmethod
    def per_event(before: list, after: list) -> dict:
        """Microseconds of each phase per accepted event between two readings, over all workers."""
        accepted = sum(a[0] for a in after) - sum(b[0] for b in before)
        phases: dict[str, float] = {}
        for b, a in zip(before, after):
            for name, secs in a[1].items():
                phases[name] = phases.get(name, 0.0) + secs - b[1].get(name, 0.0)
        total = sum(phases.values())
        return {"accepted": accepted,
                "us_per_event": {k: round(1e6 * v / accepted, 2) for k, v in sorted(phases.items())} if accepted
                else {}, "share": {k: round(v / total, 3) for k, v in sorted(phases.items())} if total else {}}


class Bench:
    """The workers under test, their stack, and how to see what they wrote."""

    def __init__(self, settings, registry, endpoints, tmp: Path):
        self.settings = settings
        self.registry = registry
        self.endpoints = endpoints
        self.tmp = tmp
        (self.topic,) = registry.views_by_topic()  # the example repo reads one events topic
        self.views = registry.views_by_topic()[self.topic]
        self.partitions = settings.kafka_partitions
        self.layout = OnlineLayout(registry.project, registry.views)
        self.client = redis.Redis.from_url(endpoints.redis_url)
        self.delivery = Delivery()
        self.producer = kafka.producer(settings, **{"delivery.report.only.error": True,
                                                    "on_delivery": self.delivery.report})
        self.workers: list[subprocess.Popen] = []

    def key_of(self, view) -> str:
        (key,) = view.join_keys
        return key

    def log_of(self, i: int) -> Path:
        return self.tmp / f"worker-{i}.log"

    def start_workers(self, env: dict, n: int) -> None:
        """`n` workers of one consumer group, started together so they join one generation."""
        for i in range(n):
            self.workers.append(subprocess.Popen(
                [sys.executable, "-m", "freshet.cli", "stream"], env={**env, **self.settings.to_env()},
                stdout=open(self.log_of(i), "ab"), stderr=subprocess.STDOUT))

    def worker_died(self) -> bool:
        return any(w.poll() is not None for w in self.workers)

    def where(self) -> str:
        return f"see {self.tmp}/worker-*.log"

    def stop_workers(self) -> None:
        for w in self.workers:
            w.send_signal(signal.SIGTERM)
        for w in self.workers:
            try:
                w.wait(timeout=20)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()

    def markers(self, tag: str, ts: float, rnd: random.Random) -> tuple[list[tuple[str, bytes]], dict[str, list[str]]]:
        """Marker events behind everything produced so far, and each view's marker entities.

        One per (source partition, owner partition of every repartitioned view); their
        fresh cards and merchants are new entities, so a row in Redis means "applied"."""
        events, entities = [], {v.name: [] for v in self.views}
        for p in range(self.partitions):
            for q in range(self.partitions):
                card = key_in_partition(f"{tag}-c{p}-{q}-", p, self.partitions)
                merchant = key_in_partition(f"{tag}-m{p}-{q}-", q, self.partitions)
                events.append((card, event(f"{tag}-{p}-{q}", card, merchant, ts, rnd)))
                for view in self.views:
                    entities[view.name].append({"card_id": card, "merchant_id": merchant}[self.key_of(view)])
        return events, entities

    def clocks(self, tag: str, entities: dict[str, list[str]]) -> dict[str, ViewClock]:
        data = self.settings.data_path
        out = {}
        for view in self.views:
            keys = sorted(set(entities[view.name]))
            out[view.name] = ViewClock(OnlineWatch(self.client, self.layout, view.name, keys),
                                       OfflineWatch(Path(view.offline_path), self.key_of(view), keys))
        txs = [f"{tag}-{p}-{q}" for p in range(self.partitions) for q in range(self.partitions)]
        out["raw_log"] = ViewClock(None, OfflineWatch(raw_log_path(data, self.topic), "transaction_id", txs))
        return out

    def produce(self, key: str, value: bytes) -> None:
        while True:
            try:
                self.producer.produce(self.topic, key=key.encode(), value=value)
                return
            except BufferError:  # the local queue is full: let deliveries drain it
                self.producer.poll(0.05)

    def flush(self, timeout: float) -> int:
        return self.producer.flush(timeout)


def warm_up(bench: Bench, t: float, rnd: random.Random) -> None:
    """Until the worker applies events of every view (its group joined, its tables recovered)."""
    events, entities = bench.markers("warm", t, rnd)
    for card, value in events:
        bench.produce(card, value)
    bench.flush(10)
    watches = [OnlineWatch(bench.client, bench.layout, v.name, entities[v.name]) for v in bench.views]
    deadline = time.monotonic() + 120
    while not all(w.poll() for w in watches):
        if time.monotonic() > deadline or bench.worker_died():
            raise RuntimeError(f"workers did not start; {bench.where()}")
        time.sleep(0.05)


def backlog_phase(bench: Bench, args, cards: list[str], t: float, rnd: random.Random, meter: CpuMeter) -> dict:
    pick_merchant = MerchantChoice(rnd, args.skew)
    payloads = [(c, event(f"b{i}", c, pick_merchant(), t + i * 1e-3, rnd))
                for i, c in enumerate(rnd.choice(cards) for _ in range(args.backlog))]
    t_end = t + args.backlog * 1e-3 + 1
    markers, entities = bench.markers("end", t_end, rnd)
    clocks = bench.clocks("end", entities)
    failed_before = bench.delivery.failed
    phase_clock = PhaseClock([bench.log_of(i) for i in range(len(bench.workers))])
    phases_before = phase_clock.next_lines()
    meter.start()
    started = time.monotonic()
    for c, value in payloads:
        bench.produce(c, value)
    for c, value in markers:
        bench.produce(c, value)
    undelivered = bench.flush(60)
    produced_s = time.monotonic() - started
    delivery = bench.delivery.phase(len(payloads) + len(markers), undelivered, failed_before)
    lost_markers = {c.encode() for c, _ in markers} & bench.delivery.failed_keys
    if lost_markers or undelivered:
        raise RuntimeError(f"backlog sends failed: {delivery}, errors {bench.delivery.errors}")
    deadline = started + max(120, args.backlog / 200)
    last_offline_poll = 0.0
    while True:
        now = time.monotonic()
        # the part files are read only when a new one may be there (~every 0.1 s); Redis every 10 ms
        offline_too = now - last_offline_poll >= 0.1
        if offline_too:
            last_offline_poll = now
        if all([c.poll(now - started, offline_too) for c in clocks.values()]):
            break
        if now > deadline or bench.worker_died():
            raise RuntimeError(f"backlog not drained in time: {({n: c.figures(0) for n, c in clocks.items()})}; "
                               f"{bench.where()}")
        time.sleep(0.01)
    cpu = meter.stop()
    phases_after = phase_clock.next_lines()
    delivered = delivery["delivered"]
    elapsed = max(max(c.online_s, c.offline_s) for c in clocks.values())
    # what one worker does with a core to itself: on this machine it shares two with the
    # broker (which works for every message it stores and serves), Redis and this script
    per_core = delivered / meter.used["worker"] if meter.used["worker"] > 0 else None
    return {"events_per_s": round(delivered / elapsed, 1), "backlog_events": delivered,
            "backlog_seconds": round(elapsed, 2), "produce_seconds": round(produced_s, 2),
            "backlog_delivery": delivery,
            "backlog_views": {name: c.figures(delivered) for name, c in clocks.items()},
            "events_per_worker_cpu_s": round(per_core, 1) if per_core else None,
            "worker_cpu_us_per_event": round(1e6 / per_core, 1) if per_core else None,
            "broker_cpu_us_per_event": round(1e6 * meter.used["broker"] / delivered, 1),
            "backlog_cpu": cpu, "t_end": t_end,
            "phases": PhaseClock.per_event(phases_before, phases_after),
            # how the work spread over the workers (a hot merchant's owner partition shows here)
            "accepted_per_worker": [a[0] - b[0] for b, a in zip(phases_before, phases_after)]}


class FreshnessProbes:
    """Probe events in flight: per view, the Redis key each probe's row appears under."""

    def __init__(self, bench: Bench):
        self.bench = bench
        self.pending: dict[str, dict[bytes, tuple[bytes, float]]] = {v.name: {} for v in bench.views}
        self.fresh: dict[str, list[float]] = {v.name: [] for v in bench.views}

    def sent(self, entities: dict[str, str], message_key: bytes, at: float) -> None:
        for view, entity in entities.items():
            self.pending[view][self.bench.layout.entity_key(view, (entity,))] = (message_key, at)

    def collect(self) -> None:
        """Move every probe row now readable in Redis from `pending` to `fresh` (ms since produce)."""
        client, layout = self.bench.client, self.bench.layout
        for view, pending in self.pending.items():
            if not pending:
                continue
            keys = list(pending)
            pipe = client.pipeline(transaction=False)
            field = layout.ts_field(view)
            for k in keys:
                pipe.hexists(k, field)
            seen = time.monotonic()
            for k, ok in zip(keys, pipe.execute()):
                if ok:
                    self.fresh[view].append((seen - pending.pop(k)[1]) * 1000)

    def outstanding(self) -> int:
        return sum(len(p) for p in self.pending.values())

    def drop_undelivered(self, failed_keys: set[bytes]) -> None:
        """Probes whose send failed are not waited for, and counted apart."""
        self.not_delivered = {}
        for view, pending in self.pending.items():
            gone = [k for k, (message_key, _) in pending.items() if message_key in failed_keys]
            for k in gone:
                del pending[k]
            self.not_delivered[view] = len(gone)

    def figures(self) -> dict[str, dict]:
        out = {}
        for view, fresh in self.fresh.items():
            out[view] = {"freshness_p50_ms": _r(percentile(fresh, 50), 1),
                         "freshness_p99_ms": _r(percentile(fresh, 99), 1),
                         "freshness_max_ms": _r(max(fresh) if fresh else None, 1),
                         "probes": len(fresh), "probes_never_seen": len(self.pending[view]),
                         "probes_not_delivered": self.not_delivered.get(view, 0)}
        return out


def freshness_phase(bench: Bench, args, cards: list[str], t2: float, rnd: random.Random, meter: CpuMeter) -> dict:
    """Every PROBE_EVERY-th event at a fixed offered rate is a probe with a new card and merchant."""
    interval = 1.0 / args.rate
    n = int(args.rate * args.seconds)
    pick_merchant = MerchantChoice(rnd, args.skew)
    probes = FreshnessProbes(bench)
    failed_before = bench.delivery.failed
    card_view = next(v.name for v in bench.views if bench.key_of(v) == "card_id")
    merchant_views = [v.name for v in bench.views if bench.key_of(v) == "merchant_id"]
    meter.start()
    start = time.monotonic()
    next_poll = start
    for i in range(n):
        due = start + i * interval
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        if i % PROBE_EVERY == 0:
            card, merchant = f"probe{i}", f"probe-m{i}"
            bench.produce(card, event(f"p{i}", card, merchant, t2 + i * interval, rnd))
            bench.producer.poll(0)
            probes.sent({card_view: card, **{v: merchant for v in merchant_views}}, card.encode(), time.monotonic())
        else:
            c = rnd.choice(cards)
            bench.produce(c, event(f"f{i}", c, pick_merchant(), t2 + i * interval, rnd))
        if time.monotonic() >= next_poll and probes.outstanding():
            bench.producer.poll(0)
            probes.collect()
            next_poll = time.monotonic() + 0.005
    achieved = n / (time.monotonic() - start)
    cpu = meter.stop()
    undelivered = bench.flush(30)
    delivery = bench.delivery.phase(n, undelivered, failed_before)
    probes.drop_undelivered(bench.delivery.failed_keys)
    deadline = time.monotonic() + 60
    while probes.outstanding() and time.monotonic() < deadline:
        probes.collect()
        time.sleep(0.005)
    views = probes.figures()
    worst = max(views.values(), key=lambda v: v["freshness_p99_ms"] or float("inf"))
    return {"freshness_views": views, "freshness_delivery": delivery, "freshness_cpu": cpu,
            # the headline is the slower view's: a feature vector is as fresh as its stalest part
            "freshness_p50_ms": max((v["freshness_p50_ms"] or 0) for v in views.values()),
            "freshness_p99_ms": worst["freshness_p99_ms"],
            "freshness_max_ms": max((v["freshness_max_ms"] or 0) for v in views.values()),
            "probes": min(v["probes"] for v in views.values()),
            "probes_never_seen": sum(v["probes_never_seen"] for v in views.values()),
            "achieved_offered_rate": round(achieved, 1), "freshness_seconds": args.seconds}


def expiry_boundaries(views, first_ts: float, last_ts: float) -> list[int]:
    """Every slide boundary at which a tile holding an event in [first_ts, last_ts] leaves a window."""
    out = set()
    for view in views:
        tile = view.tile_s
        for a in view.aggregations:
            for t in range(int(first_ts // tile * tile), int(last_ts) + 1, tile):
                out.add(int(leaves_at(t, a.window_s, a.slide_s)))
    return sorted(out)


def expiry_phase(bench: Bench, first_ts: float, last_ts: float, rnd: random.Random, counts: RowCount) -> dict:
    """Move the stream's clock through every boundary where a tile leaves a window, one clock
    event (one card, one merchant, both fresh) per boundary, each once the previous one's
    re-evaluations have settled in Redis."""
    boundaries = expiry_boundaries(bench.views, first_ts, last_ts)
    card, merchant = "clock-card", "clock-merchant"
    watch = {v.name: bench.layout.entity_key(v.name, ({"card_id": card, "merchant_id": merchant}[bench.key_of(v)],))
             for v in bench.views}
    settle = []
    for i, b in enumerate(boundaries):
        started = time.monotonic()
        bench.produce(card, event(f"clock{i}", card, merchant, float(b), rnd))
        bench.flush(10)
        deadline = started + 120
        while True:  # the clock event applied in every view: the clock is at b
            stamps = [bench.client.hget(key, bench.layout.ts_field(view)) for view, key in watch.items()]
            if all(s is not None and decode_timestamp(s) >= b - 1e-6 for s in stamps):
                break
            if time.monotonic() > deadline or bench.worker_died():
                raise RuntimeError(f"clock event at {b} not applied; {bench.where()}")
            time.sleep(0.01)
        calls, quiet = counts.hset_calls(), time.monotonic()
        while time.monotonic() - quiet < 1.5:  # the re-evaluations it made due, written (ticks of 0.1 s)
            time.sleep(0.05)
            now = counts.hset_calls()
            if now != calls:
                calls, quiet = now, time.monotonic()
        settle.append(quiet - started)  # clock event produced -> the last re-evaluation it caused
    return {"expiry_boundaries": len(boundaries), "expiry_clock_events": len(boundaries),
            "expiry_settle_s_max": _r(max(settle) if settle else None),
            "expiry_settle_s_median": _r(percentile(settle, 50))}


def write_amplification(phases: dict[str, tuple[int, dict[str, int]]], clock_events: int) -> dict:
    """Rows per event, per view: each phase's rows over its events; the expiry phase's rows
    (minus the clock events' own) over every event before it."""
    out: dict[str, dict] = {}
    events = sum(n for phase, (n, _) in phases.items() if phase != "expiry")
    for view in next(iter(phases.values()))[1]:
        figures = {}
        for phase, (n, rows) in phases.items():
            if phase == "expiry":
                figures["expiry_rows"] = rows[view] - clock_events
                figures["expiry_rows_per_event"] = round((rows[view] - clock_events) / events, 3)
            else:
                figures[f"{phase}_rows_per_event"] = round(rows[view] / n, 3) if n else None
        total = sum(rows[view] for _, rows in phases.values()) - clock_events
        figures.update(events=events, rows=total, rows_per_event=round(total / events, 3))
        out[view] = figures
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small run, under a minute")
    ap.add_argument("--rate", type=float, default=5000.0, help="offered events/s for the freshness phase")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the freshness phase")
    ap.add_argument("--backlog", type=int, default=200000, help="events in the throughput phase")
    ap.add_argument("--cards", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--commit-interval-ms", type=int, help="the worker's FRESHET_STREAM_COMMIT_INTERVAL_MS "
                                                           "(default: the setting's default)")
    ap.add_argument("--snapshot-interval-s", type=int, help="the worker's FRESHET_STREAM_SNAPSHOT_INTERVAL_S "
                                                            "(default: the setting's default; 0: no table snapshots)")
    ap.add_argument("--fetch-wait-ms", type=int, help="the worker's FRESHET_KAFKA_FETCH_MAX_WAIT_MS "
                                                      "(default: the setting's default)")
    ap.add_argument("--no-expiry", action="store_true", help="skip the expiry phase")
    ap.add_argument("--workers", type=int, default=1, help="stream workers in one consumer group")
    ap.add_argument("--partitions", type=int, help="partitions per topic (default: max(4, --workers))")
    ap.add_argument("--skew", action="store_true", help="half of the events go to 1%% of the merchants")
    args = ap.parse_args()
    if args.workers < 1:
        ap.error("--workers must be at least 1")
    args.partitions = args.partitions or max(4, args.workers)
    if args.partitions < args.workers:
        ap.error(f"--partitions {args.partitions} leaves workers idle: a topic's partition goes to one worker "
                 f"of the group, so {args.workers} workers need at least {args.workers}")
    if args.quick:
        args.rate, args.seconds, args.backlog = min(args.rate, 1000.0), 8.0, 8000
    rnd = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="freshet-bench-"))
    stack = EmbeddedStack(tmp)
    bench = None
    result: dict = {"bench": "stream", "offered_rate": args.rate, "quick": args.quick, "seed": args.seed,
                    "workers": args.workers, "partitions": args.partitions, "skew": args.skew}
    try:
        ep = stack.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
        # the expiry phase's clock events run up to a day ahead of the wall clock
        settings = load_settings(env, kafka_bootstrap_servers=ep.kafka, redis_url=ep.redis_url,
                                 data_dir=str(tmp / "data"), stream_commit_interval_ms=args.commit_interval_ms,
                                 stream_snapshot_interval_s=args.snapshot_interval_s,
                                 kafka_fetch_max_wait_ms=args.fetch_wait_ms,
                                 kafka_partitions=args.partitions,
                                 stream_max_future_s=2 * 86400, stream_clock_ahead_s=2 * 86400)
        result["commit_interval_ms"] = settings.stream_commit_interval_ms
        result["snapshot_interval_s"] = settings.stream_snapshot_interval_s
        result["fetch_wait_ms"] = settings.kafka_fetch_max_wait_ms
        say("applying the feature repo ...")
        features.apply(settings)
        bench = Bench(settings, features.load_registry(settings), ep, tmp)
        kafka.ensure_topics(settings, [bench.topic, settings.topic_deadletter])
        bench.start_workers(env, args.workers)
        t = time.time()
        warm_up(bench, t, rnd)
        say("worker is up")
        each = {f"worker{i}": w.pid for i, w in enumerate(bench.workers)} if len(bench.workers) > 1 else {}
        meter = CpuMeter({**each, "worker": [w.pid for w in bench.workers], "broker": ep.kafka_pid, "redis": ep.redis_pid,
                          "bench": os.getpid()})
        cards = [f"card{i}" for i in range(args.cards)]
        counts = RowCount(bench)
        rows_before, hset_before = counts.settled(), counts.hset_calls()

        backlog = backlog_phase(bench, args, cards, t, rnd, meter)
        rows_backlog = counts.rows()
        t_end = backlog.pop("t_end")
        result.update(backlog)
        cpu = backlog["backlog_cpu"]
        say(f"backlog: {backlog['backlog_events']} events delivered, every view in Redis and on disk after "
            f"{backlog['backlog_seconds']:.1f}s = {backlog['events_per_s']:.0f} events/s; per view "
            + "; ".join(f"{n} online {v['online_s']}s offline {v['offline_s']}s"
                        for n, v in backlog["backlog_views"].items())
            + f"; worker {cpu['worker_cores']} cores ({backlog['worker_cpu_us_per_event']} us/event), "
              f"broker {cpu['broker_cores']} cores, redis {cpu['redis_cores']}, bench {cpu['bench_cores']}")
        say("phases (us per event, wall time inside each, awaits included): " + ", ".join(
            f"{k} {v}" for k, v in backlog["phases"]["us_per_event"].items())
            + f"; events per worker {backlog['accepted_per_worker']}")

        fresh = freshness_phase(bench, args, cards, t_end + 10, rnd, meter)
        result.update(fresh)
        rows_fresh = counts.settled()
        phases = {"backlog": (backlog["backlog_events"],
                              {v: rows_backlog[v] - rows_before[v] for v in rows_before}),
                  "freshness": (fresh["freshness_delivery"]["delivered"],
                                {v: rows_fresh[v] - rows_backlog[v] for v in rows_before})}
        clock_events = 0
        if not args.no_expiry:
            expiry = expiry_phase(bench, t, t_end + 10 + args.seconds, rnd, counts)
            result.update(expiry)
            clock_events = expiry["expiry_clock_events"]
            rows_expiry = counts.settled()
            phases["expiry"] = (clock_events, {v: rows_expiry[v] - rows_fresh[v] for v in rows_before})
        result["write_amplification"] = write_amplification(phases, clock_events)
        rows_all = sum(sum(rows.values()) for _, rows in phases.values())
        result["redis_hset_calls"] = counts.hset_calls() - hset_before
        result["offline_rows"] = rows_all
        say("write amplification (Redis rows per event): " + "; ".join(
            f"{n} {w['rows_per_event']} ({', '.join(f'{k} {v}' for k, v in w.items() if k.endswith('per_event'))})"
            for n, w in result["write_amplification"].items()))
        say(f"freshness at {fresh['achieved_offered_rate']:.0f} events/s offered: "
            + "; ".join(f"{n} p50 {v['freshness_p50_ms']} ms p99 {v['freshness_p99_ms']} ms "
                        f"({v['probes']} probes, {v['probes_never_seen']} never seen)"
                        for n, v in fresh["freshness_views"].items()))
        result["delivery_errors"] = bench.delivery.errors
        result["ok"] = bench.delivery.failed == 0 and fresh["probes_never_seen"] == 0 and \
            fresh["freshness_delivery"]["undelivered_after_flush"] == 0
    except Exception as exc:  # noqa: BLE001 - the JSON line says why the run failed
        result.update(ok=False, error=f"{type(exc).__name__}: {exc}", logs=str(tmp))
        say(result["error"])
    finally:
        if bench is not None:
            bench.stop_workers()
            bench.producer = None  # librdkafka's threads end with it, before the broker goes away
        stack.stop()
    result["machine"] = f"{os.cpu_count()} cores"
    result["load_average_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
