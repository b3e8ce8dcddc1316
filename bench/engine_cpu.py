"""The stream engine's per-event Python, in process: no broker, no Redis, no disk.

Feeds bench/stream.py's default workload (20,000 cards, 500 merchants, events 1 ms apart) to
the example repo's two views through the engine's own ViewProcessor: aggregation, results,
Redis packing (the RESP bytes are made, not sent), offline feature rows (queued per batch, made
into Arrow tables at each checkpoint as the writer thread makes them, not written: phase
`offline_tables`) and a checkpoint (every changed state encoded as changelog records) every
`--checkpoint-every` events, as a worker at ~16,000 events/s commits once a second. The
cyclic garbage collector is set as a worker sets it (freshet.stream.cli.tune_collector).

It times what bench/stream.py's phases time minus every await on Kafka, Redis and disk, and
minus the fetch, decode, raw log and repartition hop, so a change to those loops shows here
without the noise of a shared machine's broker and tests. For a figure that does not depend
on the machine's load at all, count instructions (valgrind, any load):

    PYTHONHASHSEED=0 valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \\
        .venv/bin/python bench/engine_cpu.py --events 40000     # and again with --events 0:
    # (I refs at 40000 - I refs at 0) / 40000 = instructions per event

    .venv/bin/python bench/engine_cpu.py [--events 200000] [--batch 20000] [--checkpoint-every 16000]

The last stdout line is one JSON object: CPU microseconds per event in all and per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import inspect
import json
import random
import sys
import time
import types
import warnings
from functools import partial
from pathlib import Path

from freshet.features import FeatureRegistry, _view_spec
from freshet.redis_layout import OnlineLayout
from freshet.stream.cli import tune_collector
from freshet.stream.crashpoints import stream_crash_points
from freshet.stream.engine import Counters, FeatureSink, ViewProcessor, entity_key, feature_table
from freshet.stream.offline import PartBuffer, tables_of

ROOT = Path(__file__).resolve().parent.parent


def example_views():
    """The example feature repo's views, read from its definitions (no Feast registry)."""
    spec = importlib.util.spec_from_file_location("definitions", ROOT / "feature_repo" / "definitions.py")
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Feast: stream feature views are alpha
        spec.loader.exec_module(module)
    return [_view_spec(module.card_txn_stats), _view_spec(module.merchant_txn_stats)]


class PackOnly:
    """The Redis writer's work up to the socket: the rows packed as RESP commands."""

    def __init__(self, layout: OnlineLayout):
        self.layout = layout

    async def write(self, view: str, rows: list) -> int:
        return self.layout.pack_rows(view, rows)[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=200000)
    ap.add_argument("--batch", type=int, default=20000, help="events per micro-batch (the engine's BATCH_MAX)")
    ap.add_argument("--checkpoint-every", type=int, default=16000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    views = example_views()
    registry = FeatureRegistry("freshet", {v.name: v for v in views}, {})
    sink = FeatureSink.__new__(FeatureSink)  # its write(), without Redis or an offline store
    sink.layout = OnlineLayout(registry.project, registry.views)
    sink.online = PackOnly(sink.layout)
    sink.offline = PartBuffer(max_rows=1 << 40)
    sink.offline_roots = {v.name: f"/nonexistent/{v.name}" for v in views}
    sink.crash, sink.metrics = stream_crash_points(""), None
    sink.offline_tables = {v.name: partial(feature_table, v) for v in views}
    processors = {v.name: ViewProcessor(v, types.SimpleNamespace(data={}), sink) for v in views}
    keys = {v.name: (lambda v: lambda row: entity_key(v, row))(v) for v in views}
    # ViewProcessor.checkpoint(owns) before 2026-12-03's commit-path change, (owner, owned, index) since:
    # this file copied into an older checkout measures it too
    old_checkpoint = "owned" not in inspect.signature(ViewProcessor.checkpoint).parameters

    rnd = random.Random(args.seed)
    t = 1_800_000_000.0
    events = [{"transaction_id": f"b{i}", "card_id": f"c{rnd.randrange(20000)}", "merchant_id": f"m{rnd.randrange(500)}",
               "amount": round(rnd.uniform(1, 300), 2), "country": "DE", "channel": "web", "event_ts": t + i * 1e-3}
              for i in range(args.events)]
    counters = Counters()
    everyone = {0}
    records = [0]

    async def run() -> None:
        since = 0
        for start in range(0, len(events), args.batch):
            batch = events[start:start + args.batch]
            for v in views:
                key = keys[v.name]
                items = [(key(row), row["event_ts"], row, "transactions:0", start + i) for i, row in enumerate(batch)]
                await processors[v.name].apply(items, counters)
            since += len(batch)
            if since >= args.checkpoint_every:
                since = 0
                t0 = time.perf_counter()
                for p in processors.values():
                    out = p.checkpoint(lambda key: True) if old_checkpoint else p.checkpoint(lambda key: 0, everyone, {})
                    records[0] += len(out) if old_checkpoint else sum(len(r) for r in out.values())
                counters.timed("checkpoint_encode", t0)
                t0 = time.perf_counter()
                for entries in sink.offline.take().values():  # the writer thread's Arrow tables, not written
                    tables_of(entries)
                counters.timed("offline_tables", t0)

    tune_collector()  # as `freshet stream` does: without it the collector's walks over the states cost 15-30% more
    cpu0, wall0 = time.process_time(), time.perf_counter()
    asyncio.run(run())
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    n = max(1, args.events)
    result = {"bench": "engine_cpu", "events": args.events, "batch": args.batch,
              "checkpoint_every": args.checkpoint_every, "cpu_us_per_event": round(1e6 * cpu / n, 2),
              "wall_us_per_event": round(1e6 * wall / n, 2),
              "phases_us_per_event": {k: round(1e6 * v / n, 2) for k, v in sorted(counters.seconds.items())},
              "rows_per_event": round(counters.rows_online / n, 3), "changelog_records": records[0]}
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
