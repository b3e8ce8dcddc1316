"""A training snapshot pins the offline part files a training read and says exactly what changed since."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest

from freshet.features import AggregationSpec, ViewSpec
from freshet.offline_store import OfflineStore
from freshet.settings import load_settings
from freshet.stream.offline import append_parts, raw_log_path
from freshet.training.labels import LabelLog
from freshet.training.served import PredictionArchive
from freshet.training.snapshot import Snapshot, SnapshotChanged

AGG = AggregationSpec("count_amount_60s", "amount", "count", 60, 60, "INT64")
VIEW = ViewSpec("card_txn_stats", ("card_id",), ("STRING",), 3600, "transactions", "event_ts",
                {"amount": "float"}, 5, (AGG,), "/offline/card_txn_stats")


def _events(first_offset: int, n: int) -> pa.Table:
    return pa.table({"event_ts": pa.array([1_700_000_000_000_000 + i for i in range(n)], pa.timestamp("us", tz="UTC")),
                     "amount": pa.array([float(i) for i in range(n)]),
                     "_partition": pa.array([i % 2 for i in range(n)], pa.int32()),
                     "_offset": pa.array(range(first_offset, first_offset + n), pa.int64())})


@pytest.fixture
def pinned(tmp_path):
    settings = load_settings({}, data_dir=str(tmp_path / "data"))
    root = raw_log_path(settings.data_path, "transactions")
    files = append_parts(root, _events(0, 30), "event_ts") + append_parts(root, _events(30, 12), "event_ts")
    plan = SimpleNamespace(topic="transactions", views=[VIEW], refs=["card_txn_stats:count_amount_60s"])
    snap = Snapshot.take(settings, plan, {"seed": 3, "feature_service": "svc"}, LabelLog(settings),
                         PredictionArchive(settings))
    return settings, plan, snap, files


def test_the_snapshot_lists_each_part_file_with_its_rows_and_offsets(pinned):
    settings, plan, snap, files = pinned
    assert snap.events.rows == 42 and len(snap.events.parts) == 2
    ranges = sorted((p.rows, p.offsets, p.partitions) for p in snap.events.parts)
    assert ranges == [(12, [30, 41], [0, 1]), (30, [0, 29], [0, 1])]
    assert sorted(snap.events.files(OfflineStore.of(settings))) == sorted(files)
    assert snap.labels.parts == () and snap.seed == 3
    assert snap.problems(settings, plan) == []


def test_a_new_part_file_does_not_change_what_the_snapshot_reads(pinned):
    settings, plan, snap, _ = pinned
    append_parts(raw_log_path(settings.data_path, "transactions"), _events(42, 5), "event_ts")
    assert snap.problems(settings, plan) == [] and snap.events.rows == 42


def test_a_missing_or_rewritten_part_file_and_changed_definitions_are_each_named(pinned):
    import pyarrow.parquet as pq

    settings, plan, snap, files = pinned
    Path(files[0]).unlink()
    pq.write_table(_events(30, 3), files[1])
    changed = SimpleNamespace(**{**vars(plan), "views": [dataclasses.replace(VIEW, lateness_s=10)]})
    problems = snap.problems(settings, changed)
    assert len(problems) == 3
    parts = " | ".join(problems[:2])  # in the order the parts are read
    assert f"{files[0].name} is missing" in parts and f"{files[1].name} has 3 rows, the snapshot 12" in parts
    assert "feature definitions of 'svc' changed" in problems[2] and "freshet apply" in problems[2]
    with pytest.raises(SnapshotChanged, match="is missing"):
        snap.check(settings, changed)


def test_the_digest_names_what_was_read_not_when_or_by_which_code(pinned):
    _, _, snap, _ = pinned
    again = Snapshot.from_dict(snap.document())
    assert again == snap and again.digest == snap.digest
    assert dataclasses.replace(snap, taken_at=1.0, code={"freshet": "9"}).digest == snap.digest
    assert dataclasses.replace(snap, config={"seed": 4, "feature_service": "svc"}).digest != snap.digest
