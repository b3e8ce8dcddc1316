"""Stream engine benchmark: sustained throughput and freshness of one worker.

Starts the embedded stack and one `freshet stream` worker, then
1. throughput: publishes a backlog of events as fast as the producer can and times
   until the last event of every partition is visible in Redis;
2. freshness: publishes at a fixed offered rate, with probe events for fresh cards
   mixed in, and times each probe from produce() to its value being readable in Redis.

Progress goes to stderr; the last stdout line is one JSON object.
    .venv/bin/python bench/stream.py [--quick] [--rate 5000] [--seconds 20] [--backlog 200000] [--cards 20000]

CPU seconds of the worker, the broker, Redis and this script are measured over each
phase (/proc): `events_per_worker_cpu_s` is what the worker would sustain with a core
to itself, `broker_cpu_us_per_event` what the embedded broker spends per event.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import redis

from freshet import features, kafka
from freshet.redis_layout import OnlineLayout
from freshet.settings import load_settings
from freshet.app.stack import EmbeddedStack, cpu_seconds

VIEW = "card_txn_stats"


def say(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def event(i: int, card: str, ts: float, rnd: random.Random) -> bytes:
    return orjson.dumps({"transaction_id": f"b{i}", "card_id": card, "merchant_id": f"m{rnd.randrange(500)}",
                         "amount": round(rnd.uniform(1, 300), 2), "country": "DE", "channel": "web",
                         "event_ts": ts})


def wait_visible(client, layout, cards: list[str], timeout: float) -> float | None:
    keys = [layout.entity_key(VIEW, (c,)) for c in cards]
    field = layout.ts_field(VIEW)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pipe = client.pipeline(transaction=False)
        for k in keys:
            pipe.hexists(k, field)
        if all(pipe.execute()):
            return time.monotonic()
        time.sleep(0.005)
    return None


def collect_visible(client, probes: dict[bytes, float], field: bytes, fresh: list[float]) -> None:
    """Move every probe now readable in Redis from `probes` to `fresh` (ms since produce)."""
    pipe = client.pipeline(transaction=False)
    keys = list(probes)
    for k in keys:
        pipe.hexists(k, field)
    seen = time.monotonic()
    for k, ok in zip(keys, pipe.execute()):
        if ok:
            fresh.append((seen - probes.pop(k)) * 1000)


class CpuMeter:
    """CPU seconds each named process spends between `start()` and `stop()`."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.used: dict[str, float] = {}

    def start(self) -> None:
        self._at = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._wall = time.monotonic()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._wall
        self.used = {name: cpu_seconds(pid) - self._at[name] for name, pid in self.pids.items()}
        return {**{f"{name}_cpu_s": round(v, 2) for name, v in self.used.items()},
                **{f"{name}_cores": round(v / wall, 2) for name, v in self.used.items()}}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


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
    args = ap.parse_args()
    if args.quick:
        args.rate, args.seconds, args.backlog = min(args.rate, 1000.0), 8.0, 8000
    rnd = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="freshet-bench-"))
    stack = EmbeddedStack(tmp)
    worker = producer = None
    result: dict = {"offered_rate": args.rate, "quick": args.quick, "seed": args.seed}
    try:
        ep = stack.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
        settings = load_settings(env, kafka_bootstrap_servers=ep.kafka, redis_url=ep.redis_url,
                                 data_dir=str(tmp / "data"), stream_commit_interval_ms=args.commit_interval_ms)
        result["commit_interval_ms"] = settings.stream_commit_interval_ms
        say("applying the feature repo ...")
        features.apply(settings)
        registry = features.load_registry(settings)
        topic = registry.views[VIEW].topic
        kafka.ensure_topics(settings, [topic, settings.topic_deadletter])
        layout = OnlineLayout(registry.project, registry.views)
        client = redis.Redis.from_url(ep.redis_url)
        producer = kafka.producer(settings)

        worker = subprocess.Popen([sys.executable, "-m", "freshet.cli", "stream"],
                                  env={**env, **settings.to_env()}, stdout=open(tmp / "worker.log", "ab"),
                                  stderr=subprocess.STDOUT)
        t = time.time()
        warm = [f"warm{p}" for p in range(8)]
        for i, c in enumerate(warm):
            producer.produce(topic, key=c.encode(), value=event(i, c, t, rnd))
        producer.flush(10)
        if wait_visible(client, layout, warm, 90) is None:
            raise RuntimeError(f"worker did not start; see {tmp / 'worker.log'}")
        say("worker is up")

        # 1. throughput: backlog, then one marker per partition (same key -> same partition order)
        cards = [f"card{i}" for i in range(args.cards)]
        by_partition: dict[int, str] = {}
        from aiokafka.partitioner import murmur2
        for c in cards:
            by_partition.setdefault((murmur2(c.encode()) & 0x7FFFFFFF) % settings.kafka_partitions, c)
        payloads = [(c, event(i, c, t + i * 1e-3, rnd)) for i, c in
                    enumerate(rnd.choice(cards) for _ in range(args.backlog))]
        t_end = t + args.backlog * 1e-3 + 1
        meter = CpuMeter({"worker": worker.pid, "broker": ep.kafka_pid, "redis": ep.redis_pid, "bench": os.getpid()})
        meter.start()
        started = time.monotonic()
        for c, value in payloads:
            producer.produce(topic, key=c.encode(), value=value)
            if len(producer) > 50000:
                producer.poll(0)
        markers = []
        for p, c in sorted(by_partition.items()):
            producer.produce(topic, key=c.encode(), value=event(-p - 1, c, t_end, rnd))
            markers.append(c)
        producer.flush(30)
        produced_s = time.monotonic() - started
        field = layout.ts_field(VIEW)
        deadline = time.monotonic() + max(120, args.backlog / 200)
        while time.monotonic() < deadline:
            stamps = [client.hget(layout.entity_key(VIEW, (c,)), field) for c in markers]
            from freshet.redis_layout import decode_timestamp
            if all(s is not None and decode_timestamp(s) >= t_end - 1e-6 for s in stamps):
                break
            time.sleep(0.02)
        else:
            raise RuntimeError("backlog not drained in time")
        elapsed = time.monotonic() - started
        cpu = meter.stop()
        # what one worker does with a core to itself: on this machine it shares two with the
        # broker (which works for every message it stores and serves), Redis and this script
        per_core = args.backlog / meter.used["worker"] if meter.used["worker"] > 0 else None
        result.update(events_per_s=round(args.backlog / elapsed, 1), backlog_events=args.backlog,
                      backlog_seconds=round(elapsed, 2), produce_seconds=round(produced_s, 2),
                      events_per_worker_cpu_s=round(per_core, 1) if per_core else None,
                      worker_cpu_us_per_event=round(1e6 / per_core, 1) if per_core else None,
                      broker_cpu_us_per_event=round(1e6 * meter.used["broker"] / args.backlog, 1),
                      backlog_cpu=cpu)
        say(f"throughput: {args.backlog} events in {elapsed:.1f}s = {args.backlog / elapsed:.0f} events/s; "
            f"worker {cpu['worker_cores']} cores ({result['worker_cpu_us_per_event']} us/event), "
            f"broker {cpu['broker_cores']} cores ({result['broker_cpu_us_per_event']} us/event), "
            f"redis {cpu['redis_cores']}, bench {cpu['bench_cores']}")

        # 2. freshness at a fixed offered rate: every 50th event is a probe for a new card
        interval = 1.0 / args.rate
        n = int(args.rate * args.seconds)
        probes: dict[bytes, float] = {}
        fresh: list[float] = []
        meter.start()
        start = time.monotonic()
        next_poll = start
        t2 = t_end + 10
        for i in range(n):
            due = start + i * interval
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            if i % 50 == 0:
                card = f"probe{i}"
                key = layout.entity_key(VIEW, (card,))
                producer.produce(topic, key=card.encode(), value=event(i, card, t2 + i * interval, rnd))
                producer.poll(0)
                probes[key] = time.monotonic()
            else:
                c = rnd.choice(cards)
                producer.produce(topic, key=c.encode(), value=event(i, c, t2 + i * interval, rnd))
            if time.monotonic() >= next_poll and probes:
                producer.poll(0)
                collect_visible(client, probes, field, fresh)
                next_poll = time.monotonic() + 0.005
        achieved = n / (time.monotonic() - start)
        result["freshness_cpu"] = meter.stop()
        producer.flush(30)
        deadline = time.monotonic() + 60
        while probes and time.monotonic() < deadline:
            collect_visible(client, probes, field, fresh)
            time.sleep(0.005)
        result.update(freshness_p50_ms=round(percentile(fresh, 50), 1) if fresh else None,
                      freshness_p99_ms=round(percentile(fresh, 99), 1) if fresh else None,
                      freshness_max_ms=round(max(fresh), 1) if fresh else None,
                      probes=len(fresh), probes_never_seen=len(probes), achieved_offered_rate=round(achieved, 1),
                      freshness_seconds=args.seconds)
        say(f"freshness at {achieved:.0f} events/s offered: p50 {result['freshness_p50_ms']} ms, "
            f"p99 {result['freshness_p99_ms']} ms over {len(fresh)} probes")
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
        producer = None  # librdkafka's threads end with it, before the broker goes away
        stack.stop()
    result["machine"] = f"{os.cpu_count()} cores"
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
