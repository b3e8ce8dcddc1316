"""Windowed aggregations: tiles must give what brute force over raw events gives."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest

from freshet.features import AggregationSpec, ViewSpec
from freshet.stream.aggregations import ViewAggregator, window_start
from freshet.stream.events import EventDecoder, EventError, parse_timestamp

FUNCS = ("count", "sum", "mean", "min", "max", "last", "count_distinct")
SHAPES = ((300, 60), (3600, 60), (600, 600), (86400, 300))  # sliding and tumbling


def _view(lateness: int = 30) -> ViewSpec:
    aggs = []
    for w, s in SHAPES:
        for f in FUNCS:
            col = "m" if f == "count_distinct" else "x"
            aggs.append(AggregationSpec(f"{f}_{col}_{w}s_{s}", col, f, w, s, "DOUBLE"))
    return ViewSpec("v", ("k",), ("STRING",), 0, "t", "ts", {"k": "string", "x": "float", "m": "string",
                                                             "ts": "timestamp"}, lateness, tuple(aggs), "")


def _window_start(as_of: float, spec) -> Fraction:
    """The README's window, in exact arithmetic: the slide holding `as_of` and the slides
    before it that fit in the window, i.e. floor(t/S)*S + S - W <= ts <= t."""
    slide = math.floor(Fraction(as_of) / spec.slide_s)
    return (slide + 1) * spec.slide_s - spec.window_s


def _brute(events, spec, as_of):
    start = _window_start(as_of, spec)
    inside = [(ts, r) for ts, r in events if start <= Fraction(ts) <= as_of]
    vals = [r[spec.column] for _, r in inside]
    if spec.function == "count":
        return len(vals)
    if spec.function == "sum":
        return float(sum(vals))
    if spec.function == "count_distinct":
        return len(set(vals))
    if not vals:
        return None
    if spec.function == "last":
        return max(enumerate(inside), key=lambda p: (p[1][0], p[0]))[1][1][spec.column]
    return {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)}[spec.function]


@pytest.mark.parametrize("seed", range(5))
def test_out_of_order_events_within_lateness_give_the_brute_force_answer(seed):
    rnd = random.Random(seed)
    view = _view()
    agg = ViewAggregator(view)
    state = agg.new_state()
    events, t = [], 1_700_000_000.0
    for _ in range(400):
        t += rnd.expovariate(1 / 40)
        ts = t - (rnd.uniform(0, 25) if rnd.random() < 0.2 else 0)
        row = {"k": "a", "x": round(rnd.uniform(-5, 50), 2), "m": f"m{rnd.randrange(9)}"}
        events.append((ts, row))
        agg.update(state, ts, row)
        if rnd.random() < 0.1:
            agg.evict(state)
            _assert_brute_force(agg, state, events, abs_tol=1e-9)


def _assert_brute_force(agg, state, events, abs_tol):
    got = agg.result(state)
    for spec in agg.view.aggregations:
        want = _brute(events, spec, state["max_ts"])
        if isinstance(want, float):
            assert math.isclose(got[spec.name], want, abs_tol=abs_tol), spec.name
        else:
            assert got[spec.name] == want, spec.name


def test_window_start_covers_whole_slides_ending_with_the_current_one():
    spec = AggregationSpec("s", "x", "sum", 300, 60, "DOUBLE")
    assert window_start(1000.0, spec) == 720.0   # minutes 720..960: the one holding 1000 and 4 before
    tumbling = AggregationSpec("s", "x", "sum", 600, 600, "DOUBLE")
    assert window_start(1000.0, tumbling) == 600.0


@pytest.mark.parametrize("newest", ["on a slide boundary", "just before it"])
def test_an_event_at_the_window_start_is_inside_and_one_just_before_it_is_not(newest):
    boundary = 1_700_000_100.0  # a whole minute and a whole 5 minutes
    as_of = boundary if newest == "on a slide boundary" else math.nextafter(boundary, 0)
    start = boundary - 240 if newest == "on a slide boundary" else boundary - 300  # of the 300 s window by 60 s
    view = _view()
    agg = ViewAggregator(view)
    state = agg.new_state()
    events = [(math.nextafter(start, 0), {"k": "a", "x": 100.0, "m": "before"}),
              (start, {"k": "a", "x": 10.0, "m": "start"}),
              (as_of, {"k": "a", "x": 1.0, "m": "newest"})]
    for ts, row in events:
        agg.update(state, ts, row)
    got = agg.result(state)
    assert (got["count_x_300s_60"], got["sum_x_300s_60"], got["count_distinct_m_300s_60"]) == (2, 11.0, 2)
    _assert_brute_force(agg, state, events, abs_tol=0)


def test_windows_empty_out_when_time_passes_without_events():
    view = _view()
    agg = ViewAggregator(view)
    state = agg.new_state()
    agg.update(state, 1000.0, {"k": "a", "x": 2.0, "m": "z"})
    later = agg.result(state, as_of=1000.0 + 2 * 86400)
    assert all(later[s.name] in (0, 0.0, None) for s in view.aggregations)


def test_state_survives_a_json_round_trip_as_the_changelog_does():
    import json

    view = _view()
    agg = ViewAggregator(view)
    state = agg.new_state()
    for i in range(50):
        agg.update(state, 1000.0 + i * 17, {"k": "a", "x": float(i), "m": f"m{i % 4}"})
    state["offsets"]["t:0"] = 49
    restored = agg.from_json(json.loads(json.dumps(state)))
    assert agg.result(restored) == agg.result(state)
    assert restored["offsets"] == {"t:0": 49}


def test_decoder_reports_each_kind_of_bad_event():
    d = EventDecoder([_view()])
    cases = {
        b"": "empty message",
        b"{oops": "not valid JSON",
        b'{"k": "a", "x": 1.0, "m": "z"}': "missing field 'ts'",
        b'{"k": "a", "x": true, "m": "z", "ts": 1}': "field 'x' must be float",
        b'{"k": 5, "x": 1.0, "m": "z", "ts": 1}': "field 'k' must be string",
        b'{"k": "a", "x": 1.0, "m": "z", "ts": "soon"}': "not an ISO-8601 timestamp",
        b'{"k": "a", "x": 1.0, "m": "z", "ts": true}': "'ts' must be a timestamp, got bool",
        b'[{"k": "a"}]': "event must be a JSON object",
    }
    for raw, reason in cases.items():
        with pytest.raises(EventError, match=reason):
            d.decode(raw)


def test_decoder_accepts_an_integer_for_a_float_field_and_returns_it_as_a_float():
    ts, row = EventDecoder([_view()]).decode(b'{"k": "a", "x": 3, "m": "z", "ts": 1700000000123}')
    assert (ts, row["x"], type(row["x"])) == (1700000000.123, 3.0, float)


def test_timestamps_in_seconds_milliseconds_and_iso_agree():
    assert parse_timestamp(1_700_000_000, "ts") == parse_timestamp(1_700_000_000_000, "ts") == \
        parse_timestamp("2023-11-14T22:13:20Z", "ts")


def test_state_survives_the_compact_changelog_encoding_with_its_types():
    view = _view()
    agg = ViewAggregator(view)
    state = agg.new_state()
    for i in range(50):
        agg.update(state, 1000.0 + i * 17, {"k": "a", "x": float(i), "m": i % 4 if i % 2 else f"m{i % 4}"})
    state["offsets"]["t:0"] = 49
    restored = agg.decode(agg.encode(state))
    assert restored == state
    assert agg.result(restored) == agg.result(state)


def test_a_busy_entity_over_more_than_a_day_gives_the_brute_force_answer():
    # every minute holds events, so windows read their tiles by lookup, not by a scan
    rnd = random.Random(11)
    view = _view()
    agg = ViewAggregator(view)
    state = agg.new_state()
    events, t = [], 1_700_000_000.0
    checks = {2000, 5000, 7999}
    for i in range(8000):
        t += rnd.uniform(5, 25)
        ts = t - (rnd.uniform(0, 25) if rnd.random() < 0.1 else 0)
        row = {"k": "a", "x": round(rnd.uniform(-5, 50), 2), "m": f"m{rnd.randrange(40)}"}
        events.append((ts, row))
        agg.update(state, ts, row)
        if i % 500 == 0:
            agg.evict(state)
        if i in checks:
            agg.evict(state)
            _assert_brute_force(agg, state, events, abs_tol=1e-6)
    assert len(state["tiles"]["x"][60]) > 1440  # a day of minutes and the lateness: the busy case


def test_a_state_in_the_older_one_map_format_reads_back_with_the_same_results():
    import orjson

    view = _view()
    agg = ViewAggregator(view)
    state = agg.new_state()
    fine: dict[int, list] = {}  # what format 2 stored: tiles of view.tile_s for the column
    rnd = random.Random(3)
    for i in range(300):
        ts, x = 1_700_000_000.0 + i * 37, round(rnd.uniform(0, 9), 2)
        agg.update(state, ts, {"k": "a", "x": x, "m": f"m{i % 7}"})
        tile = int(ts // view.tile_s) * view.tile_s
        p = fine.setdefault(tile, [0, 0.0, x, x])
        p[0], p[1], p[2], p[3] = p[0] + 1, p[1] + x, min(p[2], x), max(p[3], x)
    old = orjson.dumps([2, state["max_ts"], {"x": [list(fine), list(fine.values())]},
                        {"m": [list(state["distinct"]["m"]), list(state["distinct"]["m"].values())]},
                        state["last"], {"t:0": 299}])
    restored = agg.decode(old)
    got, want = agg.result(restored), agg.result(state)
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name] == value or math.isclose(got[name], value, rel_tol=1e-12), name


@pytest.mark.parametrize("seed", range(4))
def test_result_holds_until_next_change_and_moves_there(seed):
    """The expiry schedule's contract: between as_of and next_change nothing moves without
    an event; at next_change some window has lost a tile; None means it never moves again."""
    rnd = random.Random(seed)
    view = _view()
    agg = ViewAggregator(view)
    state = agg.new_state()
    t = 1_700_000_000.0
    for _ in range(rnd.randrange(1, 60)):
        t += rnd.expovariate(1 / 200)
        agg.update(state, t, {"x": rnd.uniform(-5, 5), "m": f"m{rnd.randrange(8)}"})
    as_of, changes = t, 0
    while True:
        due = agg.next_change(state, as_of)
        if due is None:
            assert agg.result(state, as_of + 3 * 86400) == agg.result(state, as_of)
            break
        assert due > as_of
        before = agg.result(state, as_of)
        for probe in (as_of + (due - as_of) * f for f in (0.25, 0.5, 0.999)):
            assert agg.result(state, probe) == before
        assert agg.result(state, due) != before
        as_of, changes = due, changes + 1
    assert changes > 0
    assert all(v in (0, 0.0, None) for v in agg.result(state, as_of).values())


def test_an_event_exactly_on_a_slide_boundary_counts_for_exactly_one_window_length():
    view = _view()
    agg = ViewAggregator(view)
    state = agg.new_state()
    agg.update(state, 1_700_000_100.0, {"x": 2.0, "m": "a"})  # a multiple of 60 and of 300
    name = "count_x_300s_60"
    assert agg.result(state, 1_700_000_100.0)[name] == 1
    assert agg.result(state, 1_700_000_399.999)[name] == 1
    assert agg.result(state, 1_700_000_400.0)[name] == 0
    assert agg.next_change(state, 1_700_000_100.0) == 1_700_000_400.0
