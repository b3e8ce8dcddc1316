"""The expiry scheduler: idle entities' rows are re-evaluated once per tile that leaves a
window, as of the stream's clock, and never more often however fast the engine ticks."""

from __future__ import annotations

import asyncio
import random

from freshet.features import AggregationSpec, ViewSpec
from freshet.stream.aggregations import ViewAggregator
from freshet.stream.expiry import ExpirySchedule, IdleRefresh, StreamClock

T0 = 1_700_000_000.0  # 20 s past a minute, 200 s past a 5-minute boundary


def _view() -> ViewSpec:
    aggs = tuple(AggregationSpec(f"{f}_x_{w}s", "x", f, w, s, "DOUBLE")
                 for w, s in ((300, 60), (3600, 60), (86400, 300)) for f in ("count", "sum", "mean", "last"))
    return ViewSpec("v", ("k",), ("STRING",), 0, "t", "ts", {}, 30, aggs, "")


class Wall:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Sink:
    """Rows the refresher wrote, in order (stands in for Redis and the offline log)."""

    def __init__(self):
        self.rows: list[tuple] = []

    async def write(self, view, rows, counters) -> None:
        self.rows.extend(rows)


class Processor:
    """What IdleRefresh needs of the engine's ViewProcessor: states, the lock, the sink."""

    def __init__(self, view: ViewSpec):
        self.view = view
        self.agg = ViewAggregator(view)
        self.sink = Sink()
        self.lock = asyncio.Lock()
        self.live: dict[bytes, dict] = {}

    def _state(self, key: bytes) -> dict:
        return self.live.setdefault(key, self.agg.new_state())


def _apply(processor: Processor, refresh: IdleRefresh, clock: StreamClock, events) -> None:
    """What the engine does per batch: update states, observe the clock, write as of it."""
    for key, ts, x in events:
        processor.agg.update(processor._state(key), ts, {"x": x})
        clock.observe(ts)
    keys = sorted({key for key, _, _ in events})
    refresh.written(keys, [processor.live[k] for k in keys], clock.now())


def _tick_until(refresh: IdleRefresh, wall: Wall, until: float, step: float) -> int:
    """The engine's timer: advance the wall clock by `step` and refresh, until `until`."""
    async def ticking() -> int:
        ticks = 0
        while wall.t < until:
            wall.t += step
            await refresh.run(lambda key: True, None)
            ticks += 1
        return ticks

    return asyncio.run(ticking())


def test_stream_clock_follows_newer_events_then_the_wall_clock_and_never_goes_back():
    wall = Wall(5000.0)
    clock = StreamClock(wall)
    clock.observe(100.0)
    wall.t += 10
    assert clock.now() == 110.0
    clock.observe(105.0)  # late, within lateness: not newer than the clock
    assert clock.now() == 110.0
    clock.observe(200.0)
    wall.t += 1
    assert clock.now() == 201.0


def test_schedule_hands_out_at_most_the_limit_and_keeps_the_rest_due():
    schedule = ExpirySchedule(slides=(60,))
    schedule.written([b"k%d" % i for i in range(5)], 10.0)
    assert schedule.next_due() == 60
    first = schedule.due(60.0, limit=3)
    rest = schedule.due(60.0, limit=3)
    assert len(first) == 3 and len(rest) == 2 and not set(first) & set(rest)
    assert schedule.due(1e9) == [] and len(schedule) == 0


def test_idle_entity_is_rewritten_once_per_tile_expiry_until_it_reads_zero_and_null():
    wall = Wall(T0)
    clock = StreamClock(wall)
    processor = Processor(_view())
    refresh = IdleRefresh(processor, clock)
    # three events in two one-minute tiles, then the entity goes idle
    _apply(processor, refresh, clock, [(b"c1", T0 - 70, 1.0), (b"c1", T0 - 65, 2.0), (b"c1", T0 - 5, 4.0)])
    ticks = _tick_until(refresh, wall, T0 + 2 * 86400, step=7.0)  # idle for two days at 7 s ticks
    rows = processor.sink.rows
    # 5-minute window: each of the two tiles leaves once; hour: twice; day (5-minute
    # steps): both tiles leave at the same step. Five writes in 24,686 ticks.
    assert len(rows) == 5 and ticks > 20_000
    for _, values, as_of in rows:  # each row is the window rule as of its own timestamp
        assert values == processor.agg.result(processor.live[b"c1"], as_of)
    _, last, _ = rows[-1]
    assert last["count_x_300s"] == 0 and last["sum_x_86400s"] == 0.0
    assert last["mean_x_86400s"] is None and last["last_x_3600s"] is None
    # and each row was written within one tick of the time it became due
    agg, state = processor.agg, processor.live[b"c1"]
    previous = T0
    for _, _, as_of in rows:
        assert 0 <= as_of - agg.next_change(state, previous) <= 7.0
        previous = as_of


def test_a_write_by_a_new_event_replaces_the_pending_expiry_of_the_old_row():
    wall = Wall(T0)
    clock = StreamClock(wall)
    processor = Processor(_view())
    refresh = IdleRefresh(processor, clock)
    _apply(processor, refresh, clock, [(b"c1", T0 - 10, 1.0)])
    _tick_until(refresh, wall, T0 + 200, step=1.0)
    _apply(processor, refresh, clock, [(b"c1", clock.now(), 2.0)])  # busy again before the tile leaves
    _tick_until(refresh, wall, T0 + 310, step=1.0)
    # the first tile [T0 - 20, T0 + 40) left the 5-minute window at T0 + 280: one rewrite
    assert [round(as_of) for _, _, as_of in processor.sink.rows] == [T0 + 280]
    assert processor.sink.rows[0][1]["count_x_300s"] == 1


def test_many_idle_entities_are_each_rewritten_exactly_at_their_own_change_points():
    rnd = random.Random(7)
    wall = Wall(T0)
    clock = StreamClock(wall)
    processor = Processor(_view())
    refresh = IdleRefresh(processor, clock)
    events = [(b"c%d" % rnd.randrange(500), T0 - rnd.uniform(0, 600), 1.0) for _ in range(2000)]
    _apply(processor, refresh, clock, sorted(events, key=lambda e: e[1]))
    written_as_of = clock.now()
    _tick_until(refresh, wall, T0 + 400, step=0.5)
    end = clock.now()
    agg = processor.agg
    expected = 0
    for state in processor.live.values():  # the change points of each card in (written, end]
        t = agg.next_change(state, written_as_of)
        while t is not None and t <= end:
            expected += 1
            t = agg.next_change(state, t)
    assert refresh.rows_written == expected > len(processor.live)
    # looked at: once each at the first boundary, then once per write (or per exact due time)
    assert refresh.looked_at <= 2 * len(processor.live) + refresh.rows_written
