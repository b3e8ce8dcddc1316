"""count_distinct past DISTINCT_EXACT_MAX: HyperLogLog tiles, within the documented error,
bounded in size, and the same whether the stream (evicting per batch) or the backfill
(never evicting) computes it."""

from __future__ import annotations

import random

import pytest

from freshet.features import AggregationSpec, ViewSpec
from freshet.stream import aggregations
from freshet.stream.aggregations import ViewAggregator, window_start

SHAPES = ((300, 60), (3600, 60), (86400, 300))
T0 = 1_700_000_000


def _view() -> ViewSpec:
    aggs = [AggregationSpec(f"count_distinct_c_{w}", "c", "count_distinct", w, s, "INT64") for w, s in SHAPES]
    aggs.append(AggregationSpec("count_x_86400", "x", "count", 86400, 300, "INT64"))
    return ViewSpec("v", ("k",), ("STRING",), 0, "t", "ts", {"k": "string", "c": "string", "x": "float",
                                                             "ts": "timestamp"}, 30, tuple(aggs), "")


def _events(n: int, span_s: float, distinct: int, seed: int = 1):
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        ts = T0 + span_s * i / n + rnd.uniform(-20, 0)  # out of order within the lateness
        out.append((ts, {"k": "m", "c": f"card{rnd.randrange(distinct)}", "x": 1.0}))
    return out


def _truth(events, view, as_of):
    out = {}
    for spec in view.aggregations:
        start = window_start(as_of, spec)
        inside = [r for ts, r in events if start <= ts <= as_of]
        out[spec.name] = len({r["c"] for r in inside}) if spec.function == "count_distinct" else len(inside)
    return out


@pytest.fixture
def small_threshold(monkeypatch):
    monkeypatch.setattr(aggregations, "DISTINCT_EXACT_MAX", 500)


def test_count_distinct_is_exact_up_to_the_threshold(small_threshold):
    view = _view()
    agg = ViewAggregator(view)
    state = agg.new_state()
    events = _events(3000, 86400, 480)
    for ts, row in events:
        agg.update(state, ts, row)
    assert "sketches" not in state
    assert agg.result(state) == _truth(events, view, state["max_ts"])


def test_past_the_threshold_every_window_is_within_three_standard_errors(small_threshold):
    view = _view()
    agg = ViewAggregator(view)
    state = agg.new_state()
    events = _events(40_000, 86400, 30_000)
    for i, (ts, row) in enumerate(events):
        agg.update(state, ts, row)
        if i % 2000 == 1999:
            got, want = agg.result(state), _truth(events[:i + 1], view, state["max_ts"])
            assert got["count_x_86400"] == want["count_x_86400"]
            for name in ("count_distinct_c_300", "count_distinct_c_3600", "count_distinct_c_86400"):
                assert abs(got[name] - want[name]) <= 3 * 0.0162 * want[name] + 2, (i, name, got[name], want[name])
    assert "c" in state["sketches"]


def test_stream_and_backfill_switch_at_the_same_event_and_agree(small_threshold):
    view = _view()
    agg = ViewAggregator(view)
    streamed, replayed = agg.new_state(), agg.new_state()
    events = _events(20_000, 3 * 86400, 4000, seed=3)
    for i, (ts, row) in enumerate(events):
        agg.update(streamed, ts, row)
        agg.update(replayed, ts, row)
        if i % 97 == 0:  # the stream evicts once per micro-batch; the backfill never
            agg.evict(streamed)
        assert ("sketches" in streamed) == ("sketches" in replayed), i
        if i % 500 == 0:
            assert agg.result(streamed) == agg.result(replayed), i


def test_a_sketched_state_survives_the_changelog_encoding(small_threshold):
    view = _view()
    agg = ViewAggregator(view)
    state = agg.new_state()
    for ts, row in _events(5000, 7200, 5000):
        agg.update(state, ts, row)
    state["offsets"]["t:0"] = 4999
    restored = agg.decode(agg.encode(state))
    assert "sketches" in restored and restored["offsets"] == {"t:0": 4999}
    # the same values in every tile; a window's estimate may move by a fraction of the error
    # (a decoded sparse sketch lists its values in another order, which HLL's running
    # estimator of a union can see)
    for c, (latest, by_width) in state["sketches"].items():
        assert restored["sketches"][c][0] == latest
        for w, tiles in by_width.items():
            assert {t: s.get_estimate() for t, s in tiles.items()} == \
                {t: s.get_estimate() for t, s in restored["sketches"][c][1][w].items()}
    for ts, row in _events(100, 60, 100, seed=9):
        agg.update(state, ts + 7200, row)
        agg.update(restored, ts + 7200, row)
    a, b = agg.result(restored), agg.result(state)
    assert all(abs(a[k] - b[k]) <= 0.005 * b[k] + 1 for k in a), (a, b)


def test_a_column_counts_exactly_again_once_a_horizon_passes_without_values(small_threshold):
    view = _view()
    agg = ViewAggregator(view)
    state = agg.new_state()
    for ts, row in _events(2000, 3600, 2000):
        agg.update(state, ts, row)
    assert "sketches" in state
    later = [(T0 + 3 * 86400 + i, {"k": "m", "c": f"new{i % 7}", "x": 1.0}) for i in range(50)]
    for ts, row in later:
        agg.update(state, ts, row)
    assert "sketches" not in state
    assert agg.result(state) == _truth(later, view, state["max_ts"])


def test_a_day_of_distinct_values_keeps_the_state_bounded(small_threshold):
    view = _view()
    agg = ViewAggregator(view)
    state = agg.new_state()
    n = 0
    for ts, row in _events(200_000, 2 * 86400, 10 ** 9, seed=5):
        agg.update(state, ts, row)
        n += 1
        if n % 5000 == 0:
            agg.evict(state)
    agg.evict(state)
    tiles = state["sketches"]["c"][1]
    assert len(tiles[60]) <= 3600 // 60 + 2 and len(tiles[300]) <= 86400 // 300 + 2
    assert len(agg.encode(state)) < 800_000
