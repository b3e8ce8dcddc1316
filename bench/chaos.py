"""Chaos benchmark: a randomized schedule of real faults while events flow; nothing may be lost or doubled.

Starts the embedded broker, a Redis-protocol server of its own (to pause, kill and start
again empty on the same port) and one `freshet stream` worker (restarted whenever it
dies), with the offline store on a tmpfs when one can be mounted (root). It produces
`--rate` events/s (default 2,000; 5% up to 20 s out of order, one in 1,000 truly late)
for `--minutes` (default 10; `--quick`: 2) while injecting, in a shuffled schedule that
holds every kind about equally often (at least `--faults`, default 30):
- worker-sigkill: SIGKILL of the worker from outside, at a random moment;
- worker-crash-point: the worker restarted with FRESHET_STREAM_TEST_CRASH_AT at a random
  point of its commit cycle and pass, so it SIGKILLs itself there;
- redis-sigstop: Redis paused (SIGSTOP) for `--outage-s` (10) seconds, then SIGCONT;
- redis-restart-empty: Redis killed, started again empty on the same port after `--outage-s`;
- disk-full: the offline store's file system filled for `--outage-s` (tmpfs only).
Then production stops, the worker catches up, and everything is counted against what
was produced: each card's and merchant's event count and sum in Redis (the day window
holds the whole run), the distinct (partition, offset) pairs of the raw log, each
entity's latest row of the Parquet feature logs, and the dead-letter topic.
`lost` and `doubled` must be 0. Freshness: every 200th event is a probe with a new card,
timed from produce() to its row in Redis; `freshness_during_faults_max_ms` covers probes
sent during a fault or within 5 s after it ended, `freshness_after_faults_max_ms` the
others (steady state, which must stay under 1 s).

Recovery: every worker start is matched with the worker's "tables recovered" log line:
`recoveries` lists, per start, seconds from the process start to its tables recovered
(`restart_to_recovered_s`), from the partition assignment (`recovery_s`), and how many
changelog partitions started from a table snapshot. `--fetch-wait-ms` sets the worker's
FRESHET_KAFKA_FETCH_MAX_WAIT_MS (how long a fetch waits for data: fewer, fuller fetches of a
broker whose every fetch costs in proportion to what a partition holds), and
`--snapshot-interval-s` its FRESHET_STREAM_SNAPSHOT_INTERVAL_S; both default to the settings'.

Progress goes to stderr; the last stdout line is one JSON object.
    .venv/bin/python bench/chaos.py [--quick] [--minutes 10] [--rate 2000] [--faults 30] [--seed 1]
                                    [--fetch-wait-ms 20] [--snapshot-interval-s 30]
"""

from __future__ import annotations

import argparse
import array
import datetime
import re
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson
import redis

from freshet import features, kafka
from freshet.app.stack import EmbeddedStack, RedisServer
from freshet.contracts import DeadLetter
from freshet.redis_layout import OnlineLayout
from freshet.settings import load_settings
from freshet.stream.crashpoints import POINTS
from freshet.stream.offline import raw_log_path, read_parts

T0 = 1_790_000_000.0  # event time origin; events advance 1/rate s each, like a live stream
PROBE_EVERY = 200
LATE_EVERY = 1000
SETTLE_S = 5.0  # a probe this long after a fault ended counts as steady state
KINDS = ["worker-sigkill", "worker-crash-point", "redis-sigstop", "redis-restart-empty", "disk-full"]


def say(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, file=sys.stderr, flush=True)


class Supervisor:
    """Keeps one worker running: restarts it whenever it exits (counted)."""

    def __init__(self, env: dict, log: Path):
        self.env, self.log = env, log
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.lock = threading.Lock()
        self.next_crash_at = ""
        self.starts: list[float] = []  # wall clock of each start

    def start(self) -> None:
        env = dict(self.env)
        if self.next_crash_at:
            env["FRESHET_STREAM_TEST_CRASH_AT"] = self.next_crash_at
            self.next_crash_at = ""
        self.starts.append(time.time())
        self.proc = subprocess.Popen([sys.executable, "-m", "freshet.cli", "stream"], env=env,
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)

    def tick(self) -> None:
        with self.lock:
            if self.proc.poll() is not None:
                say(f"worker exited ({self.proc.returncode}); restarting")
                self.restarts += 1
                self.start()

    def kill(self) -> None:
        with self.lock:
            if self.proc.poll() is None:
                self.proc.kill()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Produced:
    """Every event produced, compactly: card, merchant, amount, event time, late or not."""

    def __init__(self):
        self.card, self.merchant = array.array("i"), array.array("i")
        self.amount, self.late = array.array("d"), array.array("b")
        self.probes: list[tuple[str, float]] = []  # (card, monotonic send time)
        self.failed = 0

    def report(self, err, msg) -> None:
        if err is not None:
            self.failed += 1


def produce(settings, topic: str, rate: float, seconds: float, cards: int, merchants: int, out: Produced,
            stop: threading.Event, rnd: random.Random) -> None:
    p = kafka.producer(settings, **{"delivery.report.only.error": True, "on_delivery": out.report})
    start = time.monotonic()
    i = 0
    while not stop.is_set():
        due = int((time.monotonic() - start) * rate)
        if time.monotonic() - start >= seconds:
            break
        while i < due:
            t = T0 + i / rate
            late = i % LATE_EVERY == LATE_EVERY - 1
            if i % PROBE_EVERY == 0:
                card = f"probe{i}"
                c = -1
            else:
                c = rnd.randrange(cards)
                card = f"card{c}"
            m = rnd.randrange(merchants)
            amount = round(rnd.uniform(1, 300), 2)
            ts = t - 200 if late else t - (rnd.uniform(0, 20) if rnd.random() < 0.05 else 0.0)
            value = orjson.dumps({"transaction_id": f"tx{i}", "card_id": card, "merchant_id": f"m{m}",
                                  "amount": amount, "country": "DE", "channel": "web", "event_ts": ts})
            while True:
                try:
                    p.produce(topic, key=card.encode(), value=value)
                    break
                except BufferError:
                    p.poll(0.05)
            if c < 0:
                out.probes.append((card, time.monotonic()))
            out.card.append(c)
            out.merchant.append(m)
            out.amount.append(amount)
            out.late.append(1 if late else 0)
            i += 1
        p.poll(0)
        time.sleep(0.005)
    p.flush(60)


class ProbeWatch:
    """When each probe card's row first appears in Redis (polled every 50 ms, Redis outages survived)."""

    def __init__(self, url: str, layout: OnlineLayout, produced: Produced):
        self.client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        self.layout, self.produced = layout, produced
        self.seen: dict[str, float] = {}
        self.next = 0
        self.stop = threading.Event()

    def run(self) -> None:
        field = self.layout.ts_field("card_txn_stats")
        while not self.stop.is_set():
            pending = [(c, t) for c, t in self.produced.probes[self.next:] if c not in self.seen]
            if pending:
                try:
                    pipe = self.client.pipeline(transaction=False)
                    for c, _ in pending:
                        pipe.hexists(self.layout.entity_key("card_txn_stats", (c,)), field)
                    now = time.monotonic()
                    for (c, t), ok in zip(pending, pipe.execute()):
                        if ok:
                            self.seen[c] = now - t
                except redis.RedisError:
                    pass
                while self.next < len(self.produced.probes) and self.produced.probes[self.next][0] in self.seen:
                    self.next += 1
            time.sleep(0.05)


def mount_tmpfs(path: Path, size_mb: int) -> str | None:
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if done.returncode == 0 else done.stderr.strip() or f"mount exited {done.returncode}"


def fill(path: Path) -> Path:
    filler = path / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing left to fail at close
        for block in (1 << 20, 4096):
            try:
                while True:
                    f.write(b"\0" * block)
            except OSError:
                pass
    return filler


def inject(kind: str, outage_s: float, worker: Supervisor, own: RedisServer, offline: Path, rnd: random.Random) -> str:
    """Run one fault to its end; returns what was done."""
    if kind == "worker-sigkill":
        worker.kill()
        return "SIGKILL"
    if kind == "worker-crash-point":
        point = rnd.choice(sorted(POINTS))
        worker.next_crash_at = f"{point}:{rnd.randint(1, 4)}"
        what = worker.next_crash_at
        worker.kill()  # restarted by the supervisor with the hook armed
        return what
    if kind == "redis-sigstop":
        own.signal(signal.SIGSTOP)
        time.sleep(outage_s)
        own.signal(signal.SIGCONT)
        return f"SIGSTOP {outage_s:g}s"
    if kind == "redis-restart-empty":
        own.kill()
        time.sleep(outage_s)
        own.start()
        return f"down {outage_s:g}s, restarted empty"
    if kind == "disk-full":
        filler = fill(offline)
        time.sleep(outage_s)
        filler.unlink()
        return f"full {outage_s:g}s"
    raise ValueError(kind)


RECOVERED = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\].*tables recovered in ([\d.]+) s after the "
                       r"assignment.*\((\d+) of (\d+) changelog partitions from a snapshot\)")


def recoveries(log: Path, starts: list[float]) -> list[dict]:
    """Per worker start, its first "tables recovered" line: seconds from the start and from the
    assignment, and the changelog partitions started from a snapshot (None: never recovered,
    e.g. killed first)."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        m = RECOVERED.match(line)
        if m:
            at = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1000
            found.append((at, float(m.group(3)), int(m.group(4)), int(m.group(5))))
    out = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else float("inf")
        hit = next(((at, s, n, of) for at, s, n, of in found if start - 1 <= at < end), None)
        out.append(None if hit is None else {"restart_to_recovered_s": round(hit[0] - start, 2),
                                             "recovery_s": hit[1], "from_snapshots": f"{hit[2]}/{hit[3]}"})
    return out


def uncommitted(settings, group: str, topics: list[str]) -> int:
    """Records of these topics the group has not committed yet."""
    behind = 0
    for name in topics:
        ends = kafka.partition_ends(settings, name)
        committed = kafka.committed_offsets(settings, group, name, ends)
        behind += sum(max(0, end - committed[p]) for p, end in ends.items())
    return behind


def read_redis_counts(url: str, layout: OnlineLayout, view: str, keys: list[str]) -> dict[str, tuple]:
    client = redis.Redis.from_url(url)
    out = {}
    names = ["count_amount_86400s", "sum_amount_86400s"]
    for start in range(0, len(keys), 2000):
        part = keys[start:start + 2000]
        for k, (_, values) in zip(part, layout.read_rows(client, view, [(k,) for k in part], names)):
            out[k] = (values.get(names[0]), values.get(names[1]))
    return out


def dead_letter_positions(settings) -> tuple[set, int]:
    """Distinct (partition, offset) of the dead-letter topic's records, and the record count."""
    from confluent_kafka import TopicPartition

    c = kafka.consumer(settings, f"chaos-check-{os.urandom(3).hex()}")
    positions, n = set(), 0
    try:
        c.assign([TopicPartition(settings.topic_deadletter, p, 0) for p in range(settings.kafka_partitions)])
        idle = time.monotonic()
        while time.monotonic() - idle < 5:
            m = c.poll(0.5)
            if m is not None and not m.error():
                r = DeadLetter.decode(m.value())
                positions.add((r.partition, r.offset, orjson.loads(r.original())["transaction_id"]))
                n += 1
                idle = time.monotonic()
    finally:
        c.close()
    return positions, n


def account(settings, registry, layout, url: str, topic: str, produced: Produced, cards: int,
            merchants: int) -> dict:
    """Produced events against Redis, Parquet and the dead letters."""
    n = len(produced.card)
    want_card: dict[str, list] = {}
    want_merchant: dict[str, list] = {}
    late_ids = set()
    for i in range(n):
        if produced.late[i]:
            late_ids.add(f"tx{i}")
            continue
        c = produced.card[i]
        card = f"probe{i}" if c < 0 else f"card{c}"
        for want, key in ((want_card, card), (want_merchant, f"m{produced.merchant[i]}")):
            w = want.setdefault(key, [0, 0.0])
            w[0] += 1
            w[1] += produced.amount[i]
    accepted = n - len(late_ids)
    result = {"events_produced": n, "produce_failed": produced.failed, "truly_late": len(late_ids)}
    lost = doubled = 0  # the largest count of any one place (Redis per view, Parquet, dead letters)
    for view, want in (("card_txn_stats", want_card), ("merchant_txn_stats", want_merchant)):
        got = read_redis_counts(url, layout, view, sorted(want))
        counted = sum((got[k][0] or 0) for k in want)
        view_lost = sum(max(0, w[0] - (got[k][0] or 0)) for k, w in want.items())
        view_doubled = sum(max(0, (got[k][0] or 0) - w[0]) for k, w in want.items())
        wrong_sums = sum(1 for k, w in want.items()
                         if got[k][1] is None or abs(got[k][1] - w[1]) > 1e-6 * max(1.0, w[1]))
        result[f"redis_{view}"] = {"events_counted": counted, "lost": view_lost, "doubled": view_doubled,
                                   "entities_with_wrong_sum": wrong_sums}
        lost, doubled = max(lost, view_lost), max(doubled, view_doubled)
        rows = read_parts(Path(registry.views[view].offline_path))
        key = registry.views[view].join_keys[0]
        latest: dict[str, int] = {}
        if rows is not None:
            df = rows.select([key, "event_ts", "created", "count_amount_86400s"]).to_pandas()
            df = df.sort_values(["event_ts", "created"], kind="stable").groupby(key).tail(1)
            latest = dict(zip(df[key], df["count_amount_86400s"]))
        off_lost = sum(max(0, w[0] - int(latest.get(k) or 0)) for k, w in want.items())
        off_doubled = sum(max(0, int(latest.get(k) or 0) - w[0]) for k, w in want.items())
        result[f"parquet_{view}"] = {"events_in_latest_rows": int(sum(int(latest.get(k) or 0) for k in want)),
                                     "lost": off_lost, "doubled": off_doubled}
        lost, doubled = max(lost, off_lost), max(doubled, off_doubled)
    raw = read_parts(raw_log_path(settings.data_path, topic), ["transaction_id", "_partition", "_offset"])
    raw_ids = set(raw.column("transaction_id").to_pylist()) if raw is not None else set()
    positions = {(p, o) for p, o in zip(raw.column("_partition").to_pylist(), raw.column("_offset").to_pylist())} \
        if raw is not None else set()
    raw_lost = accepted - len(raw_ids - late_ids)
    result["parquet_raw_log"] = {"events": len(raw_ids), "rows": raw.num_rows if raw is not None else 0,
                                 "distinct_positions": len(positions), "lost": raw_lost,
                                 "late_events_in_it": len(raw_ids & late_ids),
                                 "replayed_copies_collapsed_by_readers": (raw.num_rows if raw is not None else 0)
                                 - len(positions)}
    lost = max(lost, raw_lost)
    doubled = max(doubled, len(raw_ids & late_ids))
    dead, records = dead_letter_positions(settings)
    dead_ids = {tx for _, _, tx in dead}
    result["dead_letters"] = {"records": records, "distinct_events": len(dead_ids),
                              "late_events_missing": len(late_ids - dead_ids),
                              "accepted_events_dead_lettered": len(dead_ids - late_ids)}
    lost = max(lost, len(late_ids - dead_ids))
    doubled = max(doubled, len(dead_ids - late_ids))
    result["accounted_for"] = {"redis_card_view": result["redis_card_txn_stats"]["events_counted"],
                               "parquet_raw_log": len(raw_ids - late_ids), "dead_letters": len(dead_ids)}
    # an event missing from several places is one event lost: the worst place counts
    result["lost"], result["doubled"] = lost, doubled
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 minutes, one fault of each kind")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=2000.0)
    ap.add_argument("--faults", type=int, default=30, help="at least this many faults")
    ap.add_argument("--outage-s", type=float, default=10.0)
    ap.add_argument("--cards", type=int, default=5000)
    ap.add_argument("--merchants", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fetch-wait-ms", type=int, default=None,
                    help="the worker's FRESHET_KAFKA_FETCH_MAX_WAIT_MS (default: the setting's, 20)")
    ap.add_argument("--snapshot-interval-s", type=int, default=None,
                    help="the worker's FRESHET_STREAM_SNAPSHOT_INTERVAL_S (default: the setting's, 30; 0: off)")
    ap.add_argument("--catch-up-s", type=float, default=180.0,
                    help="after production, give up once no probe has appeared for this long")
    args = ap.parse_args()
    if args.quick:
        args.minutes, args.faults = 2.0, len(KINDS)  # one of each kind
    rnd = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="freshet-chaos-"))
    seconds = args.minutes * 60
    result: dict = {"bench": "chaos", "minutes": args.minutes, "rate": args.rate, "seed": args.seed,
                    "load_avg_start": [round(x, 2) for x in os.getloadavg()]}
    stack, own, worker, watch, offline = EmbeddedStack(tmp / "stack"), RedisServer(tmp / "redis.log"), None, None, None
    mounted = False
    try:
        ep = stack.start()
        own.start()
        offline = tmp / "data" / "offline"
        unmountable = mount_tmpfs(offline, 512)
        mounted = unmountable is None
        kinds = KINDS if mounted else [k for k in KINDS if k != "disk-full"]
        if not mounted:
            result["disk_full_skipped"] = f"no tmpfs for the offline store: {unmountable}"
            say(result["disk_full_skipped"])
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
        settings = load_settings(env, kafka_bootstrap_servers=ep.kafka, redis_url=own.url, data_dir=str(tmp / "data"),
                                 kafka_fetch_max_wait_ms=args.fetch_wait_ms,
                                 stream_snapshot_interval_s=args.snapshot_interval_s)
        result.update(fetch_wait_ms=settings.kafka_fetch_max_wait_ms,
                      snapshot_interval_s=settings.stream_snapshot_interval_s)
        features.apply(settings)
        registry = features.load_registry(settings)
        (topic,) = registry.views_by_topic()
        kafka.ensure_topics(settings, [topic, settings.topic_deadletter])
        layout = OnlineLayout(registry.project, registry.views)
        worker = Supervisor({**env, **settings.to_env()}, tmp / "worker.log")
        worker.start()
        produced, stop = Produced(), threading.Event()
        feeder = threading.Thread(target=produce, args=(settings, topic, args.rate, seconds, args.cards,
                                                        args.merchants, produced, stop, random.Random(args.seed)))
        watch = ProbeWatch(own.url, layout, produced)
        watcher = threading.Thread(target=watch.run, daemon=True)
        watcher.start()
        say(f"waiting for the worker; then {args.minutes:g} min at {args.rate:g} events/s with faults")
        feeder.start()
        started = time.monotonic()
        # the schedule: every kind equally often, shuffled, spread over the run's middle
        n = max(args.faults, len(kinds))
        schedule = [kinds[i % len(kinds)] for i in range(n)]
        rnd.shuffle(schedule)
        gap = (seconds - 20) / n
        faults: dict[str, int] = {}
        windows: list[tuple[float, float]] = []
        for i, kind in enumerate(schedule):
            due = started + 10 + i * gap + rnd.uniform(0, gap * 0.3)
            while time.monotonic() < due:
                worker.tick()
                time.sleep(0.1)
            begun = time.monotonic()
            what = inject(kind, args.outage_s, worker, own, offline, rnd)
            windows.append((begun, time.monotonic()))
            faults[kind] = faults.get(kind, 0) + 1
            say(f"fault {i + 1}/{n}: {kind} ({what})")
            worker.tick()
        while feeder.is_alive():
            worker.tick()
            time.sleep(0.1)
        say("production done; waiting for the worker to catch up")
        # until every probe is in Redis and the group has committed every source and repartition
        # record (the last probe alone is one partition's: others may still lag after a restart),
        # or nothing new has been seen or committed for --catch-up-s
        topics = [topic] + [f"freshet-stream-{name}-repartition" for name in registry.views]
        seen, behind, progressed = len(watch.seen), None, time.monotonic()
        while time.monotonic() - progressed < args.catch_up_s:
            worker.tick()
            time.sleep(0.5)
            if len(watch.seen) > seen:
                seen, progressed = len(watch.seen), time.monotonic()
            if seen < len(produced.probes):
                continue
            now_behind = uncommitted(settings, "freshet-stream", topics)
            if now_behind == 0:
                break
            if behind is None or now_behind < behind:
                behind, progressed = now_behind, time.monotonic()
        result["caught_up"] = len(watch.seen) == len(produced.probes) and \
            uncommitted(settings, "freshet-stream", topics) == 0
        time.sleep(5)  # the last commit's Parquet parts
        worker.tick()
        during, after = [], []
        for card, sent in produced.probes:
            fresh = watch.seen.get(card)
            if fresh is None:
                continue
            hit = any(b - 1 <= sent <= e + SETTLE_S for b, e in windows) or \
                any(b <= sent + fresh and sent <= e for b, e in windows)
            (during if hit else after).append(fresh * 1000)
        result.update(faults_by_kind=faults, faults=sum(faults.values()), worker_restarts=worker.restarts,
                      probes=len(produced.probes), probes_never_seen=len(produced.probes) - len(watch.seen),
                      freshness_during_faults_max_ms=round(max(during, default=0), 1),
                      freshness_after_faults_max_ms=round(max(after, default=0), 1),
                      freshness_after_faults_p99_ms=round(sorted(after)[int(0.99 * (len(after) - 1))], 1)
                      if after else None)
        worker.stop()
        recovered = recoveries(tmp / "worker.log", worker.starts)
        times = [r["restart_to_recovered_s"] for r in recovered if r]
        result.update(recoveries=recovered, restart_to_recovered_s_max=max(times, default=None),
                      restart_to_recovered_s_min=min(times, default=None))
        result.update(account(settings, registry, layout, own.url, topic, produced, args.cards, args.merchants))
        result["ok"] = result["lost"] == 0 and result["doubled"] == 0 and result["produce_failed"] == 0
    except Exception as exc:  # noqa: BLE001 - the JSON line says why the run failed
        result.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        say(result["error"])
    finally:
        if watch is not None:
            watch.stop.set()
        if worker is not None:
            worker.stop()
        own.stop()
        stack.stop()
        if mounted and result.get("ok"):  # a failed run's offline store is kept for a look
            subprocess.run(["umount", "-l", str(offline)], capture_output=True)
        result["logs"] = str(tmp)
        result["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result))
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
