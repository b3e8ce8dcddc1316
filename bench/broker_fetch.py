"""Why the embedded broker's CPU grows with what it holds: its cost per fetch, by batches stored.

Tansu 0.6's memory engine keeps one object per record batch and, for every fetch that finds
new data in a partition, lists all of that partition's batch objects to find where to read
(its `fetch` in tansu-storage/src/dynostore.rs). Nothing ever removes them: it has no
retention, and its DeleteRecords is unimplemented. This bench fills one partition with
single-record batches and, at each size, times the broker's CPU per fetch of the newest record
(a fresh assignment at the end each time, so every fetch lists the partition); the same on a
nearly empty partition is the baseline. It also asks the broker to delete records (aiokafka's
DeleteRecords) and reports what comes back.

    .venv/bin/python bench/broker_fetch.py [--sizes 1000,2000,4000,8000,16000] [--fetches 200]

Progress goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile

from confluent_kafka import TopicPartition

from freshet import kafka
from freshet.app.stack import EmbeddedStack, cpu_seconds
from freshet.settings import load_settings


def say(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def fill(producer, topic: str, n: int) -> None:
    """n more batches of one record each in partition 0."""
    for i in range(n):
        producer.produce(topic, key=b"k", value=b"x" * 100, partition=0)
        if i % 1000 == 999:
            producer.flush(60)
    producer.flush(60)


def cpu_ms_per_fetch(consumer, broker_pid: int, topic: str, fetches: int) -> float:
    """Broker CPU per fetch of a partition's newest record (each one lists the partition)."""
    high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1]
    started = cpu_seconds(broker_pid)
    for _ in range(fetches):
        consumer.assign([TopicPartition(topic, 0, high - 1)])
        msg = None
        while msg is None or msg.error():
            msg = consumer.poll(5)
    return (cpu_seconds(broker_pid) - started) / fetches * 1000


async def try_delete_records(bootstrap: str, topic: str, before: int) -> str:
    from aiokafka import TopicPartition as AioTP
    from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await admin.start()
    try:
        result = await asyncio.wait_for(admin.delete_records({AioTP(topic, 0): RecordsToDelete(before)}), 10)
        return f"answered: {result}"
    except Exception as exc:  # noqa: BLE001 - what the broker does is the result
        return f"refused: {type(exc).__name__}: {exc}"
    finally:
        await admin.close()


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of (batches, ms) in microseconds per stored batch."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    return 1000 * sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,2000,4000,8000,16000", help="batches stored at each measurement")
    ap.add_argument("--fetches", type=int, default=200)
    args = ap.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))

    stack = EmbeddedStack(tempfile.mkdtemp(prefix="freshet-broker-fetch-"))
    endpoints = stack.start()
    try:
        settings = load_settings({}, kafka_bootstrap_servers=endpoints.kafka)
        kafka.ensure_topics(settings, ["full", "empty"], partitions=1)
        # one record per batch, as a producer sending one event at a time makes them
        producer = kafka.producer(settings, **{"linger.ms": 0, "batch.num.messages": 1})
        consumer = kafka.consumer(settings, "broker-fetch-bench")
        fill(producer, "empty", 10)
        baseline = cpu_ms_per_fetch(consumer, endpoints.kafka_pid, "empty", args.fetches)
        say(f"baseline (10 batches): {baseline:.3f} ms broker CPU per fetch")
        points, stored = [], 0
        for size in sizes:
            fill(producer, "full", size - stored)
            stored = size
            ms = cpu_ms_per_fetch(consumer, endpoints.kafka_pid, "full", args.fetches)
            points.append((size, ms))
            say(f"{size} batches: {ms:.3f} ms broker CPU per fetch (load {os.getloadavg()[0]:.1f})")
        consumer.close()
        deleted = asyncio.run(try_delete_records(endpoints.kafka, "full", stored // 2))
        say(f"DeleteRecords: {deleted}")
    finally:
        stack.stop()
    print(json.dumps({
        "bench": "broker_fetch", "fetches": args.fetches, "baseline_ms_per_fetch": round(baseline, 3),
        "points": [{"batches": b, "broker_ms_per_fetch": round(ms, 3)} for b, ms in points],
        "us_per_stored_batch_per_fetch": round(slope(points), 3),
        "delete_records": deleted, "loadavg": [round(x, 2) for x in os.getloadavg()],
    }))


if __name__ == "__main__":
    main()
