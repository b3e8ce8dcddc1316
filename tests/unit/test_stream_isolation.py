"""Bounded values and poison-pill isolation, in process (the broker-backed specs are in
tests/integration/test_stream_bad_input.py)."""

from __future__ import annotations

import asyncio
import types

import orjson
import pytest

from freshet.features import AggregationSpec, ViewSpec
from freshet.stream.aggregations import ViewAggregator
from freshet.stream.engine import Counters, ViewProcessor
from freshet.stream.events import MAX_DEPTH, EventDecoder, EventError
from freshet.stream.isolation import is_infrastructure, split_failures

NOW = 1_800_000_000.0
SCHEMA = {"k": "string", "x": "float", "n": "int", "m": "string", "ts": "timestamp", "seen": "timestamp"}


def _view() -> ViewSpec:
    aggs = tuple(AggregationSpec(f"{f}_{c}_300s", c, f, 300, 60, "DOUBLE")
                 for f, c in (("sum", "x"), ("count", "x"), ("last", "x"), ("count_distinct", "m")))
    return ViewSpec("v", ("k",), ("STRING",), 0, "t", "ts", SCHEMA, 30, aggs, "")


def _decode(event: dict | bytes, **limits):
    raw = event if isinstance(event, bytes) else orjson.dumps(event)
    return EventDecoder([_view()], **limits).decode(raw, now=NOW)


GOOD = {"k": "a", "x": 1.5, "m": "z", "ts": NOW - 10}


@pytest.mark.parametrize("change, reason", [
    ({"ts": 1e300}, "ahead of the wall clock"),
    ({"ts": NOW + 301}, "301 s ahead of the wall clock"),
    ({"ts": (NOW + 86400) * 1000}, "ahead of the wall clock"),
    ({"ts": "9999-01-01T00:00:00Z"}, "ahead of the wall clock"),
    ({"ts": -1}, "before 1970"),
    ({"ts": "1900-01-01T00:00:00+00:00"}, "before 1970"),
    ({"x": 1e101}, "'x' must be a finite number"),
    ({"x": -1e101}, "'x' must be a finite number"),
    ({"n": 2 ** 63}, "'n' does not fit a 64-bit integer"),
    ({"k": "k" * 1025}, "'k' has 1025 characters"),
    ({"seen": 1e300}, "'seen' is 1e\\+297 s ahead"),
    ({"seen": "yesterday"}, "'seen' is not an ISO-8601 timestamp"),
    ({"extra": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}, "nests deeper"),
])
def test_decoder_bounds_every_value_before_it_reaches_state(change, reason):
    with pytest.raises(EventError, match=reason):
        _decode({**GOOD, **change})


def test_decoder_rejects_a_message_over_the_size_limit_before_parsing_it():
    with pytest.raises(EventError, match="message of 20[0-9]+ bytes is larger than FRESHET_STREAM_MAX_EVENT_BYTES=1000"):
        _decode({**GOOD, "pad": "p" * 2000}, max_event_bytes=1000)


def test_decoder_accepts_values_at_the_bounds():
    at_bounds = {**GOOD, "ts": NOW + 300, "x": 1e100, "n": 2 ** 63 - 1, "k": "k" * 1024, "seen": "1970-01-01T00:00:00Z",
                 "extra": {"a": [1, {"b": "[{"}]}}
    ts, row = _decode(at_bounds)
    assert ts == NOW + 300 and row["seen"] == 0.0 and row["x"] == 1e100
    nested: list = []
    for _ in range(MAX_DEPTH - 2):  # the event object is a level, the innermost list another
        nested = [nested]
    assert _decode({**GOOD, "extra": nested})[0] == GOOD["ts"]


def test_decoder_allows_a_later_wall_clock_to_accept_what_was_ahead():
    d = EventDecoder([_view()], max_future_s=60)
    with pytest.raises(EventError):
        d.decode(orjson.dumps({**GOOD, "ts": NOW + 120}), now=NOW)
    assert d.decode(orjson.dumps({**GOOD, "ts": NOW + 120}), now=NOW + 60)[0] == NOW + 120


def test_split_failures_finds_each_failing_item_and_builds_the_rest():
    built, failed = split_failures(list(range(10)), lambda xs: [1 // (x % 7) for x in xs])
    assert sorted(x for x, _ in failed) == [0, 7]
    assert sorted(v for part in built for v in part) == sorted(1 // (x % 7) for x in range(10) if x % 7)


def test_service_failures_are_not_blamed_on_events():
    with pytest.raises(ConnectionResetError):
        split_failures([1, 2], lambda xs: (_ for _ in ()).throw(ConnectionResetError()))
    assert is_infrastructure(TimeoutError()) and not is_infrastructure(KeyError("x"))


class _Sink:
    """Writes rows to a dict; a row whose 5-minute sum passes 100 fails, as a store refusing a value would."""

    def __init__(self):
        self.rows: dict = {}
        self.metrics = None  # FeatureSink's: no metrics exported

    async def write(self, view, rows, counters) -> None:
        for key, values, ts in rows:
            if values["sum_x_300s"] > 100:
                raise ValueError(f"sum {values['sum_x_300s']} refused")
        for key, values, ts in rows:
            self.rows[key] = values


def test_a_failing_event_is_isolated_and_the_states_equal_those_of_the_other_events():
    view = _view()
    sink = _Sink()
    processor = ViewProcessor(view, types.SimpleNamespace(data={}), sink)
    agg = ViewAggregator(view)
    processor.table.data[b"a"] = agg.encode(agg.new_state())  # a checkpointed state to start from

    def item(i, key, x):
        return (key.encode(), NOW + i, {"k": key, "x": x, "m": f"m{i % 3}"}, "t:0", i)

    first = [item(0, "a", 10.0), item(1, "b", 1.0)]
    second = [item(2, "a", 20.0), item(3, "b", 2.0), item(4, "a", 500.0), item(5, "a", 30.0), item(6, "c", 3.0)]
    counters = Counters()
    assert asyncio.run(processor.apply(first, counters)) == []
    poison = asyncio.run(processor.apply(second, counters))
    assert [p[0] for p in poison] == [second[2]] and "ValueError: sum 530.0 refused" in poison[0][1]
    kept = [e for e in first + second if e is not second[2]]
    for key in (b"a", b"b", b"c"):
        want = agg.new_state()
        for k, ts, row, _, _ in kept:
            if k == key:
                agg.update(want, ts, row)
        assert processor.agg.result(processor.live[key]) == agg.result(want)
        assert sink.rows[(key.decode(),)] == agg.result(want)
    assert counters.unprocessable == 1


@pytest.mark.parametrize("env, message", [
    ({"FRESHET_STREAM_MAX_FUTURE_S": "0"}, "FRESHET_STREAM_MAX_FUTURE_S must be a positive integer"),
    ({"FRESHET_STREAM_MAX_FUTURE_S": "soon"}, "FRESHET_STREAM_MAX_FUTURE_S must be an integer"),
    ({"FRESHET_STREAM_MAX_FUTURE_S": str(20 * 365 * 86400)}, "at most ten years"),
    ({"FRESHET_STREAM_MAX_EVENT_BYTES": "2000000"}, "at most 1000000"),
])
def test_stream_bounds_are_checked_at_start_up(env, message):
    from freshet.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match=message):
        load_settings(env)
    assert load_settings({}).stream_max_future_s == 300
    assert load_settings({}).stream_max_event_bytes == 100_000


def test_checkpoint_groups_each_changed_entity_by_partition_and_skips_disowned_ones():
    """One encode per changed entity, its records under the partition `owner` gives (a large
    state as chunks then its header, in order); entities of a partition no longer owned are
    dropped, not written; the table and its key -> partition index learn the rest."""
    from freshet.stream import chunks

    view = _view()
    processor = ViewProcessor(view, types.SimpleNamespace(data={}), _Sink())
    big = [(b"big", NOW + i / 10, {"k": "big", "x": 0.0, "m": f"m{i}-" + "v" * 400}, "t:0", i) for i in range(1200)]
    small = [(k.encode(), NOW, {"k": k, "x": 0.0, "m": "z"}, "t:0", 0) for k in ("a", "b", "c")]
    asyncio.run(processor.apply(small + big, Counters()))
    owner = {b"a": 0, b"b": 1, b"c": 2, b"big": 1}.__getitem__
    index: dict = {}
    out = processor.checkpoint(owner, {0, 1}, index)
    assert sorted(out) == [0, 1] and out[0] == [(b"a", processor.table.data[b"a"])]
    big_records = [(k, v) for k, v in out[1] if k.startswith(b"big")]
    assert (b"b", processor.table.data[b"b"]) in out[1] and len(out[1]) == len(big_records) + 1
    assert len(big_records) >= 3 and big_records[-1][0] == b"big" and chunks.is_header(big_records[-1][1])
    whole, _ = chunks.joined(dict(big_records), b"big", big_records[-1][1])  # chunks in order, then the header
    assert whole == processor.table.data[b"big"] and processor.agg.decode(whole)["max_ts"] == NOW + 119.9
    assert index == {b"a": 0, b"b": 1, b"big": 1} and b"c" not in processor.live and processor.disowned == 1
    assert processor.checkpoint(owner, {0, 1}, index) == {} and not processor.dirty  # nothing changed since
