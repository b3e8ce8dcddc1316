"""Aggregation cost per entity: `ViewAggregator.result` for a sparse and a busy entity.

Also the cost of packing one result row into RESP for Redis (`OnlineLayout.pack_rows`), and
the rows/s `OnlineLayout.write` sends to the embedded Redis, round trips included (20,000
rows in writes of 2,000: `redis_write_rows_per_s`, best and median of 5; the stream engine
needs about 20,000 rows/s per worker).

The stream bench's entities hold a few tiles (its events span minutes); an entity with
events all day holds a day of one-minute tiles, and every changed entity costs one
`result` per micro-batch. This measures both, in-process, for each example view.

Starts the embedded stack to apply feature_repo/ (the views come from the Feast registry,
as in the engine) and for its Redis. The last stdout line is one JSON object.
    .venv/bin/python bench/aggregations.py [--repeat 300] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

# bench/stream.py would shadow the `stream` package: this folder is sys.path[0] when run as a script
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import redis  # noqa: E402

from freshet import features  # noqa: E402
from freshet.redis_layout import OnlineLayout  # noqa: E402
from freshet.settings import load_settings  # noqa: E402
from freshet.app.stack import EmbeddedStack  # noqa: E402
from freshet.stream.aggregations import ViewAggregator  # noqa: E402


def entity(agg: ViewAggregator, events: int, every_s: float, rnd: random.Random) -> dict:
    """One entity's state after `events` events `every_s` apart (evicted as the engine does)."""
    state, t0 = agg.new_state(), 1_790_000_000.0
    for i in range(events):
        agg.update(state, t0 + i * every_s, {"amount": rnd.uniform(1, 300), "merchant_id": f"m{rnd.randrange(500)}",
                                             "card_id": f"c{rnd.randrange(5000)}"})
        if i % 100 == 99:
            agg.evict(state)
    agg.evict(state)
    return state


def result_us(agg: ViewAggregator, state: dict, repeat: int) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        agg.result(state)
    return round((time.perf_counter() - started) / repeat * 1e6, 2)


def pack_us(layout: OnlineLayout, view: str, row: dict, repeat: int) -> float:
    """RESP bytes of one feature row (HSET of every feature), per row, in batches of 1,000."""
    rows = [((f"card-{i}",), row, 1_790_000_000.0 + i * 1e-3) for i in range(1000)]  # a batch: a second
    started = time.perf_counter()
    for _ in range(max(1, repeat // 30)):
        layout.pack_rows(view, rows)
    return round((time.perf_counter() - started) / (max(1, repeat // 30) * len(rows)) * 1e6, 2)


def write_rows_per_s(layout: OnlineLayout, client, view: str, row: dict, rows: int = 20_000, chunk: int = 2_000,
                     repeat: int = 5) -> dict:
    """Rows/s of `OnlineLayout.write` into Redis, in writes of `chunk` rows (new keys each repeat)."""
    rates = []
    for r in range(repeat):
        batch = [((f"w{r}-{i}",), row, 1_790_000_000.0 + i * 1e-3) for i in range(rows)]
        started = time.perf_counter()
        for at in range(0, rows, chunk):
            layout.write(client, view, batch[at:at + chunk])
        rates.append(rows / (time.perf_counter() - started))
    rates.sort()
    return {"best": round(rates[-1]), "median": round(rates[len(rates) // 2]), "rows": rows, "chunk": chunk}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=300, help="result() calls timed per case")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="freshet-bench-agg-"))
    stack = EmbeddedStack(tmp)
    try:
        ep = stack.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
        settings = load_settings(env, kafka_bootstrap_servers=ep.kafka, redis_url=ep.redis_url,
                                 data_dir=str(tmp / "data"))
        print("applying the feature repo ...", file=sys.stderr, flush=True)
        features.apply(settings)
        registry = features.load_registry(settings)
        client = redis.Redis.from_url(ep.redis_url)
        out: dict = {"bench": "aggregations", "repeat": args.repeat, "seed": args.seed}
        layout = OnlineLayout(registry.project, registry.views)
        for name, view in sorted(registry.views.items()):
            agg = ViewAggregator(view)
            sparse = entity(agg, 10, 20.0, rnd)  # ten events over a few minutes, like bench/stream.py
            busy = entity(agg, 86400 // 20, 20.0, rnd)  # an event every 20 s for a day
            tiles = {c: {w: len(t) for w, t in by_width.items()} for c, by_width in busy["tiles"].items()}
            out[name] = {"features": len(view.aggregations),
                         "sparse_result_us": result_us(agg, sparse, args.repeat),
                         "busy_result_us": result_us(agg, busy, args.repeat), "busy_tiles": tiles,
                         "pack_row_us": pack_us(layout, name, agg.result(busy), args.repeat),
                         "redis_write_rows_per_s": write_rows_per_s(layout, client, name, agg.result(busy))}
            print(f"{name}: sparse {out[name]['sparse_result_us']} us, busy {out[name]['busy_result_us']} us "
                  f"per result (busy tiles by width: {tiles}); {out[name]['pack_row_us']} us to pack its row "
                  f"for Redis; written to Redis at {out[name]['redis_write_rows_per_s']['median']:,} rows/s "
                  "(median)", file=sys.stderr, flush=True)
        client.close()
    finally:
        stack.stop()
    out["load_average_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
