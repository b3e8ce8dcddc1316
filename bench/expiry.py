"""Re-evaluation of idle entities, without a broker: write amplification and its CPU cost.

The example repo's two views (feature_repo/definitions.py, read the way the registry
reads them) run through the stream engine's own pieces, `ViewAggregator`, `StreamClock`
and `IdleRefresh`, on a simulated clock: events arrive in micro-batches as the engine
applies them (each changed entity written once per batch, as of the clock), then the
stream falls idle and the wall clock alone moves it through the next day in ticks of
`--tick` seconds. Rows are counted as the engine's sink would write them.

Reports, per view: rows written per event by events and by tile expiries, looks per
event, and CPU microseconds per event spent on re-evaluation next to those spent applying
events. Deterministic for a seed, so builds compare without a quiet machine; the last
stdout line is one JSON object.
    .venv/bin/python bench/expiry.py [--cards 20000] [--events 200000] [--span-s 3600] [--batch 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import sys
import time
from pathlib import Path

from freshet.features import _view_spec
from freshet.stream.expiry import IdleRefresh, StreamClock

REPO = Path(__file__).resolve().parent.parent / "feature_repo"


def example_views() -> list:
    """The example repo's stream feature views as the registry would give them (no feast apply)."""
    os.environ.setdefault("FRESHET_DATA_DIR", "/tmp/freshet-bench-expiry")
    spec = importlib.util.spec_from_file_location("_bench_definitions", REPO / "definitions.py")
    defs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(defs)
    from feast.stream_feature_view import StreamFeatureView

    return [_view_spec(o) for o in vars(defs).values() if isinstance(o, StreamFeatureView)]


class Wall:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


class CountingSink:
    def __init__(self):
        self.rows = 0

    async def write(self, view, rows, counters) -> None:
        self.rows += len(rows)


class View:
    """One view's states, as a ViewProcessor holds them, with an IdleRefresh on them."""

    def __init__(self, spec, clock: StreamClock):
        from freshet.stream.aggregations import ViewAggregator

        self.view = spec
        self.agg = ViewAggregator(spec)
        self.sink = CountingSink()
        self.lock = asyncio.Lock()
        self.live: dict[bytes, dict] = {}
        self.refresh = IdleRefresh(self, clock)
        self.key = spec.join_keys[0]
        self.event_rows = 0
        self.apply_s = 0.0
        self.refresh_s = 0.0

    def _state(self, key: bytes) -> dict:
        state = self.live.get(key)
        if state is None:
            state = self.live[key] = self.agg.new_state()
        return state

    def apply(self, batch: list[tuple[float, dict]], clock: StreamClock) -> None:
        """What ViewProcessor._apply does: update, evict, write each changed entity as of the clock."""
        t0 = time.process_time()
        changed: dict[bytes, dict] = {}
        for ts, row in batch:
            key = row[self.key].encode()
            state = self._state(key)
            self.agg.update(state, ts, row)
            changed[key] = state
        clock.observe(max(s["max_ts"] for s in changed.values()))
        now = clock.now()
        for state in changed.values():
            self.agg.evict(state)
            self.agg.result(state, self.refresh.as_of(state, now))
        self.event_rows += len(changed)
        self.refresh.written(changed, changed.values(), now)
        self.apply_s += time.process_time() - t0

    async def tick(self) -> None:
        """Every due entity, as the engine's ticks would take them; CPU counted for ticks that
        looked at something (an empty tick is ~1 us, ten a second in the engine)."""
        looked = self.refresh.looked_at
        t0 = time.process_time()
        while await self.refresh.run(lambda key: True, None):
            pass
        if self.refresh.looked_at != looked:
            self.refresh_s += time.process_time() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cards", type=int, default=20000)
    ap.add_argument("--merchants", type=int, default=500)
    ap.add_argument("--events", type=int, default=200000)
    ap.add_argument("--span-s", type=float, default=3600.0, help="event time the events spread over")
    ap.add_argument("--batch", type=int, default=2000, help="events per micro-batch")
    ap.add_argument("--tick", type=float, default=1.0, help="seconds of the idle phase between re-evaluations")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    t0 = 1_800_000_000.0
    wall = Wall(t0)
    clock = StreamClock(wall)
    views = [View(spec, clock) for spec in example_views()]
    step = args.span_s / args.events

    async def run() -> None:
        batch = []
        for i in range(args.events):
            ts = t0 + i * step
            batch.append((ts, {"card_id": f"card{rnd.randrange(args.cards)}",
                               "merchant_id": f"m{rnd.randrange(args.merchants)}",
                               "amount": round(rnd.uniform(1, 300), 2)}))
            if len(batch) == args.batch:
                wall.t = ts  # live: the wall clock is the events' time
                for v in views:
                    v.apply(batch, clock)
                    await v.tick()
                batch = []
        end = t0 + args.span_s + 86400 + 3600  # idle: every window of every entity empties
        while wall.t < end:
            wall.t += args.tick
            for v in views:
                await v.tick()

    started = time.process_time()
    asyncio.run(run())
    result = {"bench": "expiry", "cards": args.cards, "events": args.events, "span_s": args.span_s,
              "batch": args.batch, "tick_s": args.tick, "seed": args.seed, "views": {}}
    for v in views:
        expired = v.refresh.rows_written
        result["views"][v.view.name] = {
            "entities": len(v.live),
            "rows_by_events_per_event": round(v.event_rows / args.events, 3),
            "rows_by_expiry_per_event": round(expired / args.events, 3),
            "rows_per_event": round((v.event_rows + expired) / args.events, 3),
            "rows_by_expiry_per_entity": round(expired / max(1, len(v.live)), 2),
            "looks_per_event": round(v.refresh.looked_at / args.events, 3),
            "apply_cpu_us_per_event": round(1e6 * v.apply_s / args.events, 2),
            "refresh_cpu_us_per_event": round(1e6 * v.refresh_s / args.events, 2),
        }
    result["cpu_s"] = round(time.process_time() - started, 1)
    result["load_average_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
