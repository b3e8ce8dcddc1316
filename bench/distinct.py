"""A merchant with a million distinct cards in a day: the worker stays up, memory bounded.

Starts the embedded stack and one `freshet stream` worker, publishes `--cards` events
(default 1,000,000) of one merchant, each from a new card, spread over the last day of
event time, and waits until the merchant's day count in Redis covers all of them. Reports
the merchant's distinct-card estimates per window against the exact counts, the worker's
resident memory (sampled every half second) and CPU, how long it took, and the largest
record on the merchant's changelog.

Every event is also a new card, so the card view gains `--cards` entities; their states
(not the merchant's) are most of the worker's memory.

Progress goes to stderr; the last stdout line is one JSON object.
    .venv/bin/python bench/distinct.py [--cards 1000000]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson
import redis
from confluent_kafka import TopicPartition

from freshet import features, kafka
from freshet.app.stack import EmbeddedStack, cpu_seconds
from freshet.redis_layout import OnlineLayout
from freshet.settings import load_settings

VIEW = "merchant_txn_stats"
MERCHANT = "m-busy"


def say(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class RssSampler(threading.Thread):
    """The worker's resident memory every half second: (seconds since start, MB)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.samples, self.stopped = pid, [], threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stopped.wait(0.5):
            try:
                self.samples.append((round(time.monotonic() - self.t0, 1), round(rss_mb(self.pid), 1)))
            except OSError:
                return


def largest_record(settings, topic: str) -> tuple[int, int]:
    """(largest value in bytes, records) of a topic, read to the end of each partition."""
    c = kafka.consumer(settings, f"bench-{os.urandom(3).hex()}", **{"fetch.max.bytes": 4_000_000})
    largest = n = 0
    try:
        for p in range(settings.kafka_partitions):
            listed = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            if listed <= 0:
                continue
            c.assign([TopicPartition(topic, p, 0)])
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                m = c.poll(1.0)
                if m is None:  # past the listed end (Tansu lists its last batch's base + 1)
                    break
                if not m.error():
                    largest, n = max(largest, len(m.value() or b"")), n + 1
    finally:
        c.close()
    return largest, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cards", type=int, default=1_000_000, help="events, each from a new card")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="freshet-distinct-"))
    stack = EmbeddedStack(tmp)
    worker = producer = None
    result: dict = {"cards": args.cards}
    try:
        ep = stack.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
        settings = load_settings(env, kafka_bootstrap_servers=ep.kafka, redis_url=ep.redis_url,
                                 data_dir=str(tmp / "data"))
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
        sampler = RssSampler(worker.pid)
        sampler.start()

        t_end = time.time() - 60
        stamps = [t_end - 86400 * (1 - (i + 1) / args.cards) for i in range(args.cards)]
        cpu0 = cpu_seconds(worker.pid)
        started = time.monotonic()
        for i, ts in enumerate(stamps):
            card = f"card{i:07d}"
            producer.produce(topic, key=card.encode(), value=orjson.dumps({
                "transaction_id": f"t{i}", "card_id": card, "merchant_id": MERCHANT, "amount": 1.0 + i % 100,
                "country": "DE", "channel": "web", "event_ts": ts}))
            if len(producer) > 50_000:
                producer.poll(0.05)
        producer.flush(60)
        result["produce_seconds"] = round(time.monotonic() - started, 1)
        say(f"produced {args.cards:,} events in {result['produce_seconds']} s")

        # exact counts per window as of the last event: every event is a new card
        view = registry.views[VIEW]
        as_of = stamps[-1]
        truth = {}
        for a in view.aggregations:
            if a.function == "count_distinct":
                start = math.floor(as_of / a.slide_s) * a.slide_s + a.slide_s - a.window_s
                truth[a.name] = sum(1 for ts in stamps if start <= ts)
        day = "count_amount_86400s"
        want_day = truth["count_distinct_card_id_86400s"]
        names = [*truth, day]
        deadline = time.monotonic() + 1800
        got = {}
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited; see {tmp / 'worker.log'}")
            _, got = layout.read_rows(client, VIEW, [(MERCHANT,)], names)[0]
            if got and got.get(day) == want_day:
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"the merchant's day count did not reach {want_day}: {got}")
        elapsed = time.monotonic() - started
        cpu = cpu_seconds(worker.pid) - cpu0
        sampler.stopped.set()
        sampler.join()
        rss = [mb for _, mb in sampler.samples]
        result.update(
            seconds=round(elapsed, 1), events_per_s=round(args.cards / elapsed, 1),
            worker_cpu_us_per_event=round(1e6 * cpu / args.cards, 1),
            worker_rss_mb_max=max(rss), worker_rss_mb_end=rss[-1],
            worker_rss_mb_by_quarter=[rss[min(len(rss) - 1, len(rss) * q // 4)] for q in range(1, 5)],
            distinct={name: {"exact": truth[name], "estimate": got[name],
                             "relative_error": round(got[name] / truth[name] - 1, 4)} for name in truth},
        )
        say(f"{args.cards:,} events in {elapsed:.0f} s ({result['events_per_s']:,.0f}/s); worker RSS max "
            f"{max(rss):.0f} MB; distinct {result['distinct']}")
        worker.send_signal(signal.SIGTERM)  # its last commit writes the final checkpoint
        worker.wait(timeout=60)
        largest, n = largest_record(settings, f"freshet-stream-state-{VIEW}-changelog")
        result.update(merchant_changelog_largest_record_bytes=largest, merchant_changelog_records=n)
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
        producer = None
        stack.stop()
    result["machine"] = f"{os.cpu_count()} cores"
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
