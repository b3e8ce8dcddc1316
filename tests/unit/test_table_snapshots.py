"""Table snapshot files: what is written reads back whole, and a file that cannot be trusted is passed over."""

from __future__ import annotations

import logging
import os

import pytest

from freshet.stream.snapshots import Snapshot, SnapshotError, TableSnapshots, read

TOPIC = "app-state-card_txn_stats-changelog"


def _rows(n: int, size: int = 40) -> list[tuple[bytes, bytes, bytes | None]]:
    return [(b"card%d" % i, os.urandom(size), b"\x00chunks [\"ab12\",2]" if i % 7 == 0 else None) for i in range(n)]


def test_a_snapshot_reads_back_key_for_key_with_its_offset_and_sources(tmp_path):
    snaps = TableSnapshots(tmp_path, "inc1")
    rows = _rows(1000) + [(b"\x00freshet:watermarks:tx:3", b"[[10,1.5]]", None), (b"big", os.urandom(1 << 20), None)]
    snaps.write(Snapshot(TOPIC, 3, 4567, "inc1", rows, sources={"tx:3": 991}))
    got = snaps.newest(TOPIC, 3)
    assert (got.topic, got.partition, got.offset, got.incarnation) == (TOPIC, 3, 4567, "inc1")
    assert got.rows == rows
    assert got.sources == {"tx:3": 991} and got.created > 0


def test_an_empty_partition_snapshots_and_reads_back_empty(tmp_path):
    snaps = TableSnapshots(tmp_path, "inc1")
    snaps.write(Snapshot(TOPIC, 0, 5, "inc1", []))
    assert snaps.newest(TOPIC, 0).rows == []


def test_the_newest_snapshot_wins_and_only_the_newest_two_are_kept(tmp_path):
    snaps = TableSnapshots(tmp_path, "inc1")
    for offset in (100, 300, 200, 400):
        snaps.write(Snapshot(TOPIC, 1, offset, "inc1", _rows(3)))
    assert [int(p.stem) for p in snaps.files(TOPIC, 1)] == [400, 300]
    assert snaps.newest(TOPIC, 1).offset == 400
    assert snaps.newest(TOPIC, 2) is None  # another partition: none


def test_a_damaged_snapshot_is_logged_and_the_older_one_used(tmp_path, caplog):
    snaps = TableSnapshots(tmp_path, "inc1")
    older = _rows(50)
    snaps.write(Snapshot(TOPIC, 1, 100, "inc1", older))
    newest = snaps.write(Snapshot(TOPIC, 1, 200, "inc1", _rows(50, size=400)))
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit inside the values
    newest.write_bytes(bytes(data))
    with pytest.raises(SnapshotError):
        read(newest)
    with caplog.at_level(logging.WARNING, "freshet.stream"):
        got = snaps.newest(TOPIC, 1)
    assert got.offset == 100 and got.rows == older
    assert "ignored" in caplog.text and str(newest) in caplog.text


def test_a_truncated_or_foreign_file_means_a_full_replay(tmp_path, caplog):
    snaps = TableSnapshots(tmp_path, "inc1")
    path = snaps.write(Snapshot(TOPIC, 2, 100, "inc1", _rows(100)))
    path.write_bytes(path.read_bytes()[:-200])  # the end of the file missing
    (path.parent / f"{50:020d}.arrow").write_bytes(b"not arrow at all")
    with caplog.at_level(logging.WARNING, "freshet.stream"):
        assert snaps.newest(TOPIC, 2) is None
    assert caplog.text.count("ignored") == 2 and "unreadable" in caplog.text


def test_a_snapshot_of_another_broker_incarnation_is_ignored(tmp_path, caplog):
    before = TableSnapshots(tmp_path, "before-restart")
    path = before.write(Snapshot(TOPIC, 0, 9000, "before-restart", _rows(5)))
    after = TableSnapshots(tmp_path, "after-restart")
    assert after.newest(TOPIC, 0) is None
    # even when its file is found where this broker's snapshots are
    after.folder(TOPIC, 0).mkdir(parents=True)
    path.rename(after.folder(TOPIC, 0) / path.name)
    with caplog.at_level(logging.WARNING, "freshet.stream"):
        assert after.newest(TOPIC, 0) is None
    assert "another broker incarnation" in caplog.text


def test_a_new_broker_incarnations_first_snapshot_removes_the_last_ones(tmp_path):
    # the new broker counts offsets from 0 again: its snapshots must not be pruned as older
    TableSnapshots(tmp_path, "old").write(Snapshot(TOPIC, 0, 9000, "old", _rows(5)))
    new = TableSnapshots(tmp_path, "new")
    new.write(Snapshot(TOPIC, 0, 12, "new", _rows(5)))
    assert new.newest(TOPIC, 0).offset == 12
    assert [p.name for p in tmp_path.iterdir()] == ["new"]


def test_a_snapshot_past_the_changelogs_end_is_ignored(tmp_path, caplog):
    snaps = TableSnapshots(tmp_path, "inc1")
    snaps.write(Snapshot(TOPIC, 0, 500, "inc1", _rows(5)))
    snaps.write(Snapshot(TOPIC, 0, 900, "inc1", _rows(5)))
    with caplog.at_level(logging.WARNING, "freshet.stream"):
        assert snaps.newest(TOPIC, 0, at_most=700).offset == 500
        assert snaps.newest(TOPIC, 0, at_most=100) is None
    assert "past the changelog's end" in caplog.text


def test_a_write_that_fails_leaves_the_previous_snapshot_and_no_temp_file(tmp_path, monkeypatch):
    snaps = TableSnapshots(tmp_path, "inc1")
    snaps.write(Snapshot(TOPIC, 0, 100, "inc1", _rows(5)))

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError):
        snaps.write(Snapshot(TOPIC, 0, 200, "inc1", _rows(5)))
    monkeypatch.undo()
    assert [p.name for p in snaps.folder(TOPIC, 0).iterdir()] == [f"{100:020d}.arrow"]
    assert snaps.newest(TOPIC, 0).offset == 100
