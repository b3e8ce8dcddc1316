"""Long-run benchmark: does the embedded stack stay flat under a constant load for N minutes?

Runs `freshet up` (embedded broker and Redis, stream, serve, monitor, retrain) in a fresh data
dir, feeds it with `freshet produce` (the seeded card workload, labels included) plus freshness
probes, and samples once a minute:
- the CPU share of the embedded broker, of the stream worker and of the whole machine's load;
- freshness of the probes sent in that minute: every 1/--probe-rate s a transaction of a fresh
  card, timed from produce() until the card's row is readable in Redis (p50, p99, max; probes
  not visible within 120 s are counted, not timed).

- the source events the stream worker committed, and the broker's CPU per 1,000 of them (a figure
  that other work on the machine disturbs less than cores: a starved worker fetches less).

The verdict compares the last 5 minutes with minutes 2-7 (the first minute is start-up): broker
CPU and freshness p99 should stay within 20% (`flat`). Progress goes to stderr; the last stdout
line is one JSON object with the per-minute curve.

    .venv/bin/python bench/longrun.py [--minutes 30] [--rate 1000] [--probe-rate 4]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import redis

from freshet import features, kafka
from freshet.app.stack import cpu_seconds, free_port
from freshet.endpoints import read_state
from freshet.redis_layout import OnlineLayout
from freshet.settings import load_settings

VISIBLE_WITHIN_S = 120.0
FLAT_WITHIN = 0.20


def say(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def component_pids(up_pid: int) -> dict[str, int]:
    """`freshet up`'s components by subcommand name (stream, serve, monitor, retrain)."""
    out = {}
    for pid in children(up_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"freshet.cli" in argv:
            out[argv[argv.index(b"freshet.cli") + 1].decode()] = pid
    return out


class Probes:
    """Transactions of fresh cards, timed from produce() until their card row is in Redis."""

    def __init__(self, settings, topic: str, layout: OnlineLayout, view: str, client):
        self.producer = kafka.producer(settings, **{"linger.ms": 0})
        self.topic, self.layout, self.view, self.client = topic, layout, view, client
        self.field = layout.ts_field(view)
        self.pending: dict[bytes, float] = {}  # Redis key -> monotonic send time
        self.done: list[tuple[float, float]] = []  # (send time, seconds until visible)
        self.lost: list[float] = []  # send times of probes not visible in time
        self.n = 0
        self.rnd = random.Random(7)

    def send(self) -> None:
        self.n += 1
        card = f"probe-{self.n}"
        value = orjson.dumps({"transaction_id": f"ptx-{self.n}", "card_id": card, "merchant_id": "m-probe",
                              "amount": round(self.rnd.uniform(1, 300), 2), "country": "DE",
                              "channel": "web", "event_ts": time.time()})
        self.pending[self.layout.entity_key(self.view, (card,))] = time.monotonic()
        self.producer.produce(self.topic, key=card.encode(), value=value)
        self.producer.poll(0)

    def poll(self) -> None:
        if not self.pending:
            return
        keys = list(self.pending)
        pipe = self.client.pipeline(transaction=False)
        for k in keys:
            pipe.hexists(k, self.field)
        now = time.monotonic()
        for k, seen in zip(keys, pipe.execute()):
            sent = self.pending[k]
            if seen:
                self.done.append((sent, now - sent))
                del self.pending[k]
            elif now - sent > VISIBLE_WITHIN_S:
                self.lost.append(sent)
                del self.pending[k]

    def minute(self, start: float, end: float) -> dict:
        ms = [s * 1000 for sent, s in self.done if start <= sent < end]
        return {"probes": len(ms), "not_visible": sum(start <= s < end for s in self.lost),
                "freshness_p50_ms": _r(percentile(ms, 50)), "freshness_p99_ms": _r(percentile(ms, 99)),
                "freshness_max_ms": _r(max(ms, default=None))}


def _r(v, digits: int = 1):
    return None if v is None else round(v, digits)


class Committed:
    """Source events the stream worker has committed so far (its group's offsets, summed)."""

    def __init__(self, settings, topic: str, group: str = "freshet-stream"):
        from confluent_kafka import TopicPartition

        self.consumer = kafka.consumer(settings, group)
        self.partitions = [TopicPartition(topic, p) for p in range(settings.kafka_partitions)]

    def total(self) -> int | None:
        try:
            return sum(max(tp.offset, 0) for tp in self.consumer.committed(self.partitions, timeout=10))
        except Exception:  # noqa: BLE001 - a busy broker may not answer in time: no figure this minute
            return None


def wait_for_worker(probes: Probes, timeout: float = 600) -> None:
    """Until the stream worker serves a probe: the load starts on a worker that is up (on a
    busy machine importing Feast and Faust alone can take minutes)."""
    deadline = time.monotonic() + timeout
    while not probes.done:
        if time.monotonic() > deadline:
            raise SystemExit(f"the stream worker served no probe within {timeout:.0f} s")
        probes.send()
        for _ in range(100):
            probes.poll()
            time.sleep(0.01)
    probes.done.clear()
    probes.pending.clear()


def ratio(curve: list[dict], field: str) -> float | None:
    """Mean of `field` over the last 5 minutes / its mean over minutes 2-7."""
    early = [m[field] for m in curve if 2 <= m["minute"] <= 7 and m[field] is not None]
    late = [m[field] for m in curve[-5:] if m[field] is not None]
    if not early or not late or not sum(early):
        return None
    return round((sum(late) / len(late)) / (sum(early) / len(early)), 3)


async def _count_batches(bootstrap: str, ends: dict[str, dict[int, int]]) -> dict[str, int]:
    """Record batches the broker stores per topic, read with raw Fetch requests (a client's
    consumer hides batch boundaries) up to each partition's listed end. The embedded broker's
    cost per fetch grows with them."""
    from aiokafka import AIOKafkaClient
    from aiokafka.protocol.fetch import FetchRequest
    from aiokafka.record.memory_records import MemoryRecords

    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        node = next(iter(client.cluster.brokers())).nodeId
        out = {}
        for topic, partitions in ends.items():
            total = 0
            for p, end in partitions.items():
                offset = 0
                while offset < end:  # the listed end is the last batch's base offset + 1
                    # a long wait: the broker stops listing a partition's batches when the wait is
                    # over, and 10 ms returned nothing from a partition of 30 minutes' batches
                    resp = await client.send(node, FetchRequest(10_000, 1, 4 << 20, 0, [(topic, [(p, offset, 4 << 20)])]))
                    records = MemoryRecords(resp.topics[0][1][0][-1] or b"")
                    n, nxt = 0, offset
                    while (batch := records.next_batch()) is not None:
                        n += 1
                        nxt = max(nxt, batch.next_offset)
                    if n == 0 or nxt <= offset:
                        break
                    total += n
                    offset = nxt
            out[topic] = total
        return out
    finally:
        await client.close()


def count_batches(settings) -> dict[str, int]:
    import asyncio

    from confluent_kafka import TopicPartition

    meta = kafka.admin(settings).list_topics(timeout=10).topics
    c = kafka.consumer(settings, "longrun-batches")
    try:
        ends = {t: {p: c.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1] for p in sorted(m.partitions)}
                for t, m in sorted(meta.items()) if not t.startswith("__")}
    finally:
        c.close()
    return asyncio.run(_count_batches(settings.kafka_bootstrap_servers, ends))


def start_up(data: Path, env: dict) -> subprocess.Popen:
    log = open(data.parent / "up.log", "ab")  # noqa: SIM115 - the child owns it
    up = subprocess.Popen([sys.executable, "-m", "freshet.cli", "up"], env=env, stdout=log,
                          stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if up.poll() is not None:
            raise SystemExit(f"freshet up exited with {up.returncode}; see {data.parent / 'up.log'}")
        if "freshet is up" in (data.parent / "up.log").read_text(errors="replace"):
            return up
        time.sleep(0.5)
    raise SystemExit("freshet up did not come up within 180 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=int, default=30)
    ap.add_argument("--rate", type=float, default=1000, help="events/s offered in total (probes included)")
    ap.add_argument("--probe-rate", type=float, default=4, help="freshness probes per second")
    ap.add_argument("--keep", action="store_true", help="keep the data dir (its logs) after the run")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="freshet-longrun-"))
    data = tmp / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
    env.update(FRESHET_DATA_DIR=str(data), FRESHET_HTTP_PORT=str(free_port()))
    say(f"data dir {data}")
    up = start_up(data, env)
    producer = None
    batches: dict[str, int] = {}
    try:
        state = read_state(data)
        settings = load_settings(env, kafka_bootstrap_servers=state.kafka, redis_url=state.redis_url)
        registry = features.load_registry(settings)
        (topic,) = registry.views_by_topic()
        view = next(v.name for v in registry.views.values() if v.keyed_by_message)
        layout = OnlineLayout(registry.project, registry.views)
        probes = Probes(settings, topic, layout, view, redis.Redis.from_url(state.redis_url))
        pids = {"broker": state.kafka_pid, "redis": state.redis_pid, **component_pids(up.pid)}
        say(f"components {pids}")
        wait_for_worker(probes)
        committed = Committed(settings, topic)
        committed_at = committed.total()
        producer = subprocess.Popen(
            [sys.executable, "-m", "freshet.cli", "produce", "--rate", str(args.rate - args.probe_rate),
             "--duration", str(args.minutes * 60 + 5), "--quiet"],
            env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "produce.log", "ab"))  # noqa: SIM115
        pids["produce"] = producer.pid

        curve = []
        start = time.monotonic()
        next_probe = start
        cpu_at = {n: cpu_seconds(p) for n, p in pids.items()}
        minute_start = start
        while len(curve) < args.minutes:
            now = time.monotonic()
            if now >= next_probe:
                probes.send()
                next_probe += 1 / args.probe_rate
            probes.poll()
            if now - minute_start >= 60:
                cpu = {}
                for n, p in pids.items():
                    try:
                        cpu[n] = cpu_seconds(p)
                    except OSError:
                        cpu[n] = cpu_at[n]
                wall = now - minute_start
                done = committed.total()
                events = done - committed_at if done is not None and committed_at is not None else None
                row = {"minute": len(curve) + 1,
                       **{f"{n}_cores": round((cpu[n] - cpu_at[n]) / wall, 3) for n in pids},
                       "events_committed": events,
                       # the broker's CPU per event the worker got through: steadier than its cores
                       # when other work on the machine slows the worker down
                       "broker_ms_per_1k_events": round((cpu["broker"] - cpu_at["broker"]) * 1e6 / events, 1)
                       if events else None,
                       **probes.minute(minute_start, now),
                       "load1": round(os.getloadavg()[0], 2)}
                curve.append(row)
                say(json.dumps(row))
                cpu_at, minute_start = cpu, now
                committed_at = done if done is not None else committed_at
                if up.poll() is not None:
                    raise SystemExit(f"freshet up exited with {up.returncode} at minute {len(curve)}")
            time.sleep(0.005)
        # probes of the last minute that are still pending get their chance
        deadline = time.monotonic() + 5
        while probes.pending and time.monotonic() < deadline:
            probes.poll()
            time.sleep(0.01)
        if producer.poll() is None:
            producer.terminate()
        say("counting the batches the broker holds per topic")
        batches = count_batches(settings)
    finally:
        if producer is not None and producer.poll() is None:
            producer.terminate()
        up.terminate()  # `freshet up` stops its components and the stack on SIGTERM
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)

    result = {
        "bench": "longrun", "minutes": args.minutes, "rate": args.rate, "probe_rate": args.probe_rate,
        "broker_cores_ratio_last5_vs_2to7": ratio(curve, "broker_cores"),
        "freshness_p99_ratio_last5_vs_2to7": ratio(curve, "freshness_p99_ms"),
        "broker_ms_per_1k_events_ratio_last5_vs_2to7": ratio(curve, "broker_ms_per_1k_events"),
        "not_visible": sum(m["not_visible"] for m in curve),
        "freshness_p99_ms_last5": max((m["freshness_p99_ms"] for m in curve[-5:] if m["freshness_p99_ms"] is not None), default=None),
        "batches_at_end": batches,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "data_dir": str(data) if args.keep else None,
        "curve": curve,
    }
    ratios = [result["broker_cores_ratio_last5_vs_2to7"], result["freshness_p99_ratio_last5_vs_2to7"]]
    result["flat"] = all(r is not None and r <= 1 + FLAT_WITHIN for r in ratios)
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
