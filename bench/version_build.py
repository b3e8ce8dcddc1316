"""How fast a stream worker builds a new feature view version from the offline raw log.

    python bench/version_build.py [--events 300000] [--cards 20000] [--merchants 2000] [--partitions 4]

A raw log of `--events` card transactions over the last day (random cards and merchants, as the
stream writes it: Parquet parts through the stream's PartBuffer) is built into the states of the
feature repo's two views, every partition at once, by the function a worker runs
(`freshet.stream.versions.replay_partitions`, in the worker's thread). The feature repo is
registered in a private Feast registry (SQLite online store: no Redis or Kafka needed here).

Progress goes to stderr; the last stdout line is one JSON object: per view the events built,
entities, seconds and events per second, the process's peak RSS and the load average before and
after.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

REPO = Path(__file__).resolve().parents[1] / "feature_repo"
TOPIC = "transactions"


def _registry(data: Path):
    import importlib.util

    from feast import FeatureStore
    from feast.repo_config import RepoConfig

    from freshet import features

    os.environ["FRESHET_DATA_DIR"] = str(data)
    spec = importlib.util.spec_from_file_location("_bench_definitions", REPO / "definitions.py")
    defs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(defs)
    config = RepoConfig(project="bench", provider="local", registry=str(data / "registry.db"),
                        online_store={"type": "sqlite", "path": str(data / "online.db")},
                        offline_store={"type": "file"}, entity_key_serialization_version=3)
    store = FeatureStore(config=config)
    store.apply([defs.card, defs.merchant, defs.card_txn_stats, defs.merchant_txn_stats])
    return [features._view_spec(store.get_stream_feature_view(n)) for n in ("card_txn_stats", "merchant_txn_stats")]


def _raw_log(settings, events: int, cards: int, merchants: int, partitions: int, seed: int) -> None:
    from freshet.offline_store import OfflineStore
    from freshet.stream.offline import PartBuffer

    rng = random.Random(seed)
    now = time.time()
    start = now - 86_400
    buffer = PartBuffer()
    root = OfflineStore.of(settings).raw(TOPIC)
    chunk = 50_000
    for first in range(0, events, chunk):
        n = min(chunk, events - first)
        ts = sorted(start + rng.random() * 86_400 for _ in range(n))
        table = pa.table({
            "transaction_id": [f"t{first + i}" for i in range(n)],
            "card_id": [f"c{rng.randrange(cards)}" for _ in range(n)],
            "merchant_id": [f"m{rng.randrange(merchants)}" for _ in range(n)],
            "amount": [round(rng.uniform(1, 500), 2) for _ in range(n)],
            "country": ["DE"] * n, "channel": ["web"] * n,
            "event_ts": pa.array([int(t * 1e6) for t in ts], pa.timestamp("us", tz="UTC")),
            "_partition": pa.array([(first + i) % partitions for i in range(n)], pa.int32()),
            "_offset": pa.array([(first + i) // partitions for i in range(n)], pa.int64()),
        })
        buffer.add(root, table, "event_ts")
    buffer.write(buffer.take())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, default, meaning in (("--events", 300_000, "raw-log events, over the last day"),
                                   ("--cards", 20_000, "distinct cards"), ("--merchants", 2_000, "distinct merchants"),
                                   ("--partitions", 4, "source partitions (all built at once)"),
                                   ("--seed", 1, "the workload's random seed")):
        parser.add_argument(flag, type=int, default=default, help=f"{meaning} (default: %(default)s)")
    args = parser.parse_args()

    from aiokafka.partitioner import murmur2

    from freshet.settings import load_settings
    from freshet.stream.engine import entity_key
    from freshet.stream.versions import replay_partitions

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="freshet-version-build-") as tmp:
        data = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
        settings = load_settings(env, data_dir=str(data))
        views = _registry(data)
        print(f"writing a raw log of {args.events} events", file=sys.stderr)
        _raw_log(settings, args.events, args.cards, args.merchants, args.partitions, args.seed)
        results = {}
        for view in views:
            def owner(key: bytes) -> int:
                return (murmur2(key) & 0x7FFFFFFF) % args.partitions

            t0 = time.perf_counter()
            states, n = replay_partitions(settings, view, lambda ps: {p: 2 ** 62 for p in ps}, owner,
                                          set(range(args.partitions)), entity_key)
            seconds = time.perf_counter() - t0
            results[view.name] = {"events": n, "entities": len(states), "seconds": round(seconds, 2),
                                  "events_per_s": round(n / seconds)}
            print(f"{view.name}: {n} events, {len(states)} entities in {seconds:.1f} s", file=sys.stderr)
    print(json.dumps({"events": args.events, "partitions": args.partitions, "views": results,
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                      "load_before": [round(x, 2) for x in load_before],
                      "load_after": [round(x, 2) for x in os.getloadavg()]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
