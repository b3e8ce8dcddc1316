"""Offline feature rows queued per micro-batch and made into one Arrow table when written."""

from __future__ import annotations

import logging

import pyarrow.parquet as pq

from freshet.features import AggregationSpec, ViewSpec
from freshet.stream.engine import feature_table
from freshet.stream.offline import PartBuffer, part_files

NOW = 1_800_000_000.0


def _view() -> ViewSpec:
    aggs = (AggregationSpec("sum_x_300s", "x", "sum", 300, 60, "DOUBLE"),
            AggregationSpec("count_x_300s", "x", "count", 300, 60, "INT64"))
    return ViewSpec("v", ("k",), ("STRING",), 0, "t", "ts", {"k": "string", "x": "float", "ts": "timestamp"},
                    30, aggs, "v_log")


def _row(k: str, total, n: int, ts: float):
    return ((k,), {"sum_x_300s": total, "count_x_300s": n}, ts)


def test_rows_of_several_batches_become_one_part_with_each_batch_s_created_time(tmp_path):
    view, buffer = _view(), PartBuffer()
    build = lambda segments: feature_table(view, segments)  # noqa: E731 - one builder: its rows join up
    buffer.add_rows(tmp_path, [_row("a", 1.5, 1, NOW), _row("b", 2.0, 2, NOW + 1)], NOW + 2, "ts", build)
    buffer.add_rows(tmp_path, [_row("a", 4.0, 2, NOW + 3)], NOW + 4, "ts", build)
    assert buffer.rows == 3
    (part,) = PartBuffer.write_patiently(buffer.take())
    assert part_files(tmp_path) == [part] and buffer.rows == 0
    table = pq.read_table(str(part)).to_pydict()
    assert table["k"] == ["a", "b", "a"] and table["sum_x_300s"] == [1.5, 2.0, 4.0]
    assert table["count_x_300s"] == [1, 2, 2]
    assert [t.timestamp() for t in table["ts"]] == [NOW, NOW + 1, NOW + 3]
    assert [t.timestamp() for t in table["created"]] == [NOW + 2, NOW + 2, NOW + 4]


def test_a_row_arrow_cannot_hold_is_left_out_with_an_error_and_the_rest_are_written(tmp_path, caplog):
    view, buffer = _view(), PartBuffer()
    build = lambda segments: feature_table(view, segments)  # noqa: E731
    buffer.add_rows(tmp_path, [_row("a", 1.5, 1, NOW), _row("big", 1.0, 2 ** 70, NOW)], NOW, "ts", build)
    buffer.add_rows(tmp_path, [_row("c", 3.0, 3, NOW)], NOW, "ts", build)
    with caplog.at_level(logging.ERROR, "freshet.stream"):
        (part,) = PartBuffer.write_patiently(buffer.take())
    assert pq.read_table(str(part)).to_pydict()["k"] == ["a", "c"]
    assert "offline rows: 1 of 3 cannot be written" in caplog.text


def test_rows_waiting_long_are_kept_as_an_arrow_table(tmp_path, monkeypatch):
    from freshet.stream import offline

    monkeypatch.setattr(offline, "ROWS_AS_OBJECTS", 3)
    view, buffer = _view(), PartBuffer()
    build = lambda segments: feature_table(view, segments)  # noqa: E731
    for i in range(4):
        buffer.add_rows(tmp_path, [_row(f"k{i}", float(i), 1, NOW)], NOW, "ts", build)
    (entries,) = buffer._pending.values()
    assert [type(e).__name__ for e in entries] == ["Table", "RowBatches"] and entries[0].num_rows == 3
    (part,) = PartBuffer.write_patiently(buffer.take())
    assert pq.read_table(str(part)).to_pydict()["k"] == ["k0", "k1", "k2", "k3"]
