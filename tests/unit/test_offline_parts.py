"""Offline part files: one per UTC date, written then renamed, read back as one table."""

from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa

from freshet.stream.offline import PartBuffer, append_parts, read_parts


def _table(stamps: list[datetime], ids: list[int]) -> pa.Table:
    return pa.table({"id": pa.array(ids, pa.int64()), "event_ts": pa.array(stamps, pa.timestamp("us", tz="UTC"))})


def test_rows_of_one_date_make_one_part_and_rows_across_midnight_one_per_date(tmp_path):
    day = datetime(2026, 3, 1, 12, tzinfo=timezone.utc)
    late, early = datetime(2026, 3, 1, 23, 59, 59, 999999, tzinfo=timezone.utc), datetime(2026, 3, 2, tzinfo=timezone.utc)
    one = append_parts(tmp_path / "one", _table([day, late], [1, 2]), "event_ts")
    assert [p.parent.name for p in one] == ["date=2026-03-01"]
    two = append_parts(tmp_path / "two", _table([late, early, day], [1, 2, 3]), "event_ts")
    assert sorted(p.parent.name for p in two) == ["date=2026-03-01", "date=2026-03-02"]
    by_date = {p.parent.name: sorted(read_parts(p.parent)["id"].to_pylist()) for p in two}
    assert by_date == {"date=2026-03-01": [1, 3], "date=2026-03-02": [2]}
    assert not list(tmp_path.rglob(".*.tmp"))  # temp files renamed, none left behind


def test_taken_buffer_is_empty_and_its_tables_are_written_by_whoever_holds_them(tmp_path):
    buf = PartBuffer(max_rows=3)
    day = datetime(2026, 3, 1, tzinfo=timezone.utc)
    assert buf.add(tmp_path / "a", _table([day], [1]), "event_ts") is False
    assert buf.add(tmp_path / "a", _table([day, day], [2, 3]), "event_ts") is True  # full: write now
    pending = buf.take()
    assert buf.rows == 0 and buf.take() == {}
    assert buf.add(tmp_path / "a", _table([day], [4]), "event_ts") is False  # queued after the take
    PartBuffer.write(pending)
    assert sorted(read_parts(tmp_path / "a")["id"].to_pylist()) == [1, 2, 3]
    PartBuffer.write(buf.take())
    assert sorted(read_parts(tmp_path / "a")["id"].to_pylist()) == [1, 2, 3, 4]
