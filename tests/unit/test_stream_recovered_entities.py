"""Entities read back from the changelog after a restart are re-evaluated on the stream's
clock; the table also holds records that are no entity's state (the recovery fence, chunks
of a large state, each source partition's checkpointed watermark marks), and those must
never be taken for one: decoding the marks as a state failed every re-evaluation tick, and
the worker's idle entities were never re-evaluated again."""

from __future__ import annotations

import asyncio
import types

from freshet.features import AggregationSpec, ViewSpec
from freshet.stream.engine import FENCE_KEY, ViewProcessor
from freshet.stream.expiry import StreamClock
from freshet.stream.watermarks import WatermarkMarks, record_key

T0 = 1_700_000_000.0


class Sink:
    def __init__(self):
        self.rows: list[tuple] = []

    async def write(self, view, rows, counters) -> None:
        self.rows.extend(rows)


def _processor(wall=lambda: T0 + 10_000) -> tuple[ViewProcessor, Sink]:
    aggs = tuple(AggregationSpec(f"{f}_x_300s", "x", f, 300, 60, "DOUBLE") for f in ("count", "sum"))
    view = ViewSpec("v", ("k",), ("STRING",), 0, "t", "ts", {}, 30, aggs, "")
    sink = Sink()
    processor = ViewProcessor(view, types.SimpleNamespace(data={}), sink, StreamClock(wall=wall))
    for key, ts in ((b"a", T0), (b"b", T0 + 30)):  # checkpointed by an earlier worker
        state = processor.agg.new_state()
        processor.agg.update(state, ts, {"x": 2.0})
        processor.table.data[key] = processor.agg.encode(state)
    marks = WatermarkMarks()
    marks.after("t", 0, 10, T0 + 30)
    processor.table.data[record_key("t", 0)] = marks.record("t", 0)
    processor.table.data[FENCE_KEY] = b"1"
    return processor, sink


def test_only_entity_states_count_as_recovered_entities():
    processor, _ = _processor()
    assert sorted(processor.stored_entities(lambda key: True)) == [b"a", b"b"]
    assert processor.stored_entities(lambda key: key != b"a") == [b"b"]


def test_recovered_entities_are_re_evaluated_although_the_table_holds_watermark_marks():
    wall = [T0 + 10_000]
    processor, sink = _processor(lambda: wall[0])
    processor.refresh.recovered(processor.stored_entities(lambda key: True))
    counters = types.SimpleNamespace()

    async def ticks():
        await processor.refresh.run(lambda key: True, counters)  # sets the clock from the states read back
        wall[0] += 1000  # idle for 1,000 s of wall time: every tile left its 5-minute window
        for _ in range(2):
            await processor.refresh.run(lambda key: True, counters)

    asyncio.run(ticks())
    # both rows as of the clock, past their 5-minute windows: the tiles left, counts are 0
    assert sorted((keys, values["count_x_300s"]) for keys, values, _ in sink.rows) == [(("a",), 0), (("b",), 0)]
