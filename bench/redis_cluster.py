"""Feature rows written per second by the stream's writer: one Redis against a three-primary Redis Cluster.

    python bench/redis_cluster.py [--rows 200000] [--batch 2000] [--rounds 3] [--in-flight 4] [--quick]

Everything runs on this machine, on loopback: one Redis-protocol server (the embedded
stack's binary) and a local cluster of three primaries started here (freshet.app.stack).
The rows are the feature repo's card_txn_stats rows (36 features would be both views;
this is the 7-feature card view the stream writes most), written as the stream's sink
writes them: `OnlineLayout.write_async` on a redis.asyncio client from
`freshet.endpoints.redis_client`, `--batch` rows per call, `--in-flight` calls at a time
(the stream's views and partitions write concurrently). On the cluster each call splits
its rows by the primary owning their key and sends every primary its share at once.

One Redis and the cluster are measured in alternating rounds (this machine's speed drifts);
the medians are compared. Progress goes to stderr; the last stdout line is one JSON object:
single_rows_per_s, cluster_rows_per_s (medians), cluster_vs_single, the rounds, the load
average before and after, and each server's CPU seconds during the cluster rounds
(cluster_cpu_s per primary) and the single rounds (single_cpu_s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# bench/stream.py would shadow the `stream` package: this folder is sys.path[0] when run as a script
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from freshet.app.stack import LocalRedisCluster, cpu_seconds, free_port, redis_command, wait_for_redis  # noqa: E402
from freshet.endpoints import redis_client  # noqa: E402
from freshet.redis_layout import OnlineLayout, ViewLayout  # noqa: E402
from freshet.settings import load_settings  # noqa: E402

VIEW = ViewLayout("card_txn_stats", ("card_id",), ("STRING",),
                  {"count_amount_300s": "INT64", "sum_amount_300s": "DOUBLE", "mean_amount_300s": "DOUBLE",
                   "min_amount_300s": "DOUBLE", "max_amount_300s": "DOUBLE", "last_amount_300s": "DOUBLE",
                   "count_distinct_merchant_id_300s": "INT64"}, ttl_s=3600)


def log(msg: str) -> None:
    print(f"[redis_cluster] {msg}", file=sys.stderr, flush=True)


def make_rows(n: int, entities: int, seed: int) -> list:
    rng, now = random.Random(seed), time.time()
    return [((f"card-{rng.randrange(entities):07d}",),
             {"count_amount_300s": rng.randint(0, 50), "sum_amount_300s": rng.uniform(0, 5000),
              "mean_amount_300s": rng.uniform(0, 500), "min_amount_300s": rng.uniform(0, 50),
              "max_amount_300s": rng.uniform(50, 900), "last_amount_300s": rng.uniform(0, 900),
              "count_distinct_merchant_id_300s": rng.randint(0, 9)}, now - rng.uniform(0, 300))
            for _ in range(n)]


async def write_all(settings, layout: OnlineLayout, rows: list, batch: int, in_flight: int) -> float:
    """Seconds to write every row, `in_flight` batches at a time."""
    client = redis_client(settings, asyncio=True)
    try:
        await layout.write_async(client, VIEW.name, rows[:batch])  # connections and slot map first
        batches = [rows[i:i + batch] for i in range(0, len(rows), batch)]
        queue = iter(batches)

        async def lane():
            for part in queue:
                await layout.write_async(client, VIEW.name, part)

        started = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(in_flight)))
        return time.perf_counter() - started
    finally:
        await client.aclose()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--entities", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=2000, help="rows per write call (a stream micro-batch's share)")
    ap.add_argument("--in-flight", type=int, default=4, help="write calls at a time")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of each")
    ap.add_argument("--quick", action="store_true", help="20k rows, 2 rounds")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    if args.quick:
        args.rows, args.rounds = 20_000, 2
    workdir = Path(tempfile.mkdtemp(prefix="freshet-bench-cluster-"))
    load_before = os.getloadavg()[0]
    log(f"work dir {workdir}; {os.cpu_count()} CPUs; load average {load_before:.2f}")
    port = free_port()
    single_proc = subprocess.Popen(redis_command(port, workdir), stdout=open(workdir / "single.log", "wb"),
                                   stderr=subprocess.STDOUT)
    cluster = None
    try:
        single_url = f"redis://127.0.0.1:{port}/0"
        wait_for_redis(single_url)
        cluster = LocalRedisCluster(workdir / "cluster").start()
        log(f"one Redis on {port}; cluster primaries on {cluster.ports}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
        single = load_settings(env, redis_url=single_url, data_dir=str(workdir))
        clustered = load_settings(env, redis_url=cluster.url, redis_cluster="on", data_dir=str(workdir))
        layout = OnlineLayout("freshet", {VIEW.name: VIEW})
        rows = make_rows(args.rows, args.entities, args.seed)
        rates: dict[str, list[float]] = {"single": [], "cluster": []}
        cpu = {"single": 0.0, "cluster": [0.0] * len(cluster.procs)}
        for r in range(args.rounds):
            for name, settings in (("single", single), ("cluster", clustered)):
                procs = [single_proc] if name == "single" else cluster.procs
                before = [cpu_seconds(p.pid) for p in procs]
                took = asyncio.run(write_all(settings, layout, rows, args.batch, args.in_flight))
                used = [cpu_seconds(p.pid) - b for p, b in zip(procs, before)]
                if name == "single":
                    cpu["single"] += used[0]
                else:
                    cpu["cluster"] = [c + u for c, u in zip(cpu["cluster"], used)]
                rates[name].append(len(rows) / took)
                log(f"round {r + 1} {name}: {len(rows)} rows in {took:.2f}s = {len(rows) / took:,.0f} rows/s")
        s, c = statistics.median(rates["single"]), statistics.median(rates["cluster"])
        print(json.dumps({
            "rows": args.rows, "batch": args.batch, "in_flight": args.in_flight, "rounds": args.rounds,
            "single_rows_per_s": round(s), "cluster_rows_per_s": round(c), "cluster_vs_single": round(c / s, 3),
            "single_runs": [round(x) for x in rates["single"]], "cluster_runs": [round(x) for x in rates["cluster"]],
            "single_cpu_s": round(cpu["single"], 2), "cluster_cpu_s": [round(x, 2) for x in cpu["cluster"]],
            "primaries": len(cluster.ports), "cpus": os.cpu_count(),
            "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}))
        return 0
    finally:
        if cluster is not None:
            cluster.stop()
        single_proc.terminate()
        single_proc.wait(10)


if __name__ == "__main__":
    sys.exit(main())
