"""What one training read, exactly, so that it can be read again: the training snapshot.

Owns `Snapshot` (taken before a training reads anything, then the only thing it reads),
`PartFile`, `feature_definitions_hash`, `code_version` and `SnapshotChanged`.

The offline logs are immutable Parquet part files that only ever grow by new files, so a
list of part files (each with its row count and its partition and offset range) pins the
raw events, the label log and the served-prediction archive as they were. With the
feature definitions' hash, the fit's settings and the seed, that is enough to rebuild the
training set row for row (`freshet retrain --reproduce`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow.parquet as pq

from freshet.features import ViewSpec
from freshet.offline_store import Location, OfflineStore
from freshet.settings import Settings

FORMAT = "freshet.training-snapshot/1"


class SnapshotChanged(RuntimeError):
    """The data or definitions a snapshot names are not there as they were; the message lists what changed."""


def _range(meta: pq.FileMetaData, column: str) -> list[int] | None:
    """[min, max] of an integer column from the Parquet statistics (no data read), or None."""
    names = meta.schema.names
    if column not in names:
        return None
    i = names.index(column)
    lo, hi = None, None
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(i).statistics
        if stats is None or not stats.has_min_max:
            return None
        lo = stats.min if lo is None else min(lo, stats.min)
        hi = stats.max if hi is None else max(hi, stats.max)
    return None if lo is None else [int(lo), int(hi)]


@dataclass(frozen=True)
class PartFile:
    """One immutable part file: where it is (relative to the offline store's parent: "offline/..."),
    its rows and the Kafka positions it holds."""

    path: str
    rows: int
    partitions: list[int] | None = None  # [min, max] of _partition
    offsets: list[int] | None = None  # [min, max] of _offset

    @classmethod
    def of(cls, file: Location) -> "PartFile":
        meta = file.metadata()
        return cls(file.relative(), meta.num_rows, _range(meta, "_partition"), _range(meta, "_offset"))

    def problem(self, store: OfflineStore) -> str:
        """What differs from the file in the store ("" when nothing)."""
        file = store.at(self.path)
        if not file.is_file():
            return f"part file {self.path} is missing"
        rows = file.metadata().num_rows
        return "" if rows == self.rows else f"part file {self.path} has {rows} rows, the snapshot {self.rows}"


@dataclass(frozen=True)
class LogSnapshot:
    """The part files of one offline log (raw events, labels or served predictions) a training read."""

    topic: str
    root: str  # relative to the offline store's parent ("offline/...", as PartFile.path)
    parts: tuple[PartFile, ...] = ()
    positions: dict[str, int] = field(default_factory=dict)  # partition -> next offset copied (label logs)

    @classmethod
    def take(cls, root: Location, topic: str, positions: Mapping[int, int] | None = None) -> "LogSnapshot":
        parts = tuple(PartFile.of(f) for f in root.parts())
        return cls(topic, root.relative(), parts, {str(p): int(o) for p, o in sorted((positions or {}).items())})

    def files(self, store: OfflineStore) -> list[Location]:
        return [store.at(p.path) for p in self.parts]

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    def problems(self, store: OfflineStore) -> list[str]:
        return [x for x in (p.problem(store) for p in self.parts) if x]

    def to_dict(self) -> dict[str, Any]:
        return {"topic": self.topic, "root": self.root, "rows": self.rows, "positions": self.positions,
                "parts": [dataclasses.asdict(p) for p in self.parts]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LogSnapshot":
        return cls(d["topic"], d["root"], tuple(PartFile(**p) for p in d.get("parts", [])),
                   dict(d.get("positions", {})))


def feature_definitions_hash(views: Sequence[ViewSpec], refs: Sequence[str]) -> str:
    """sha256 of what the training set's features are computed from: the views' definitions and the refs.

    The views' offline paths are left out: they name the data dir, not the definition.

    >>> from freshet.features import AggregationSpec
    >>> agg = AggregationSpec("count_amount_60s", "amount", "count", 60, 60, "INT64")
    >>> v = ViewSpec("v", ("card_id",), ("STRING",), 3600, "tx", "event_ts", {"amount": "float"}, 5, (agg,), "/a")
    >>> h = feature_definitions_hash([v], ["v:count_amount_60s"])
    >>> h == feature_definitions_hash([dataclasses.replace(v, offline_path="/b")], ["v:count_amount_60s"])
    True
    >>> h == feature_definitions_hash([dataclasses.replace(v, lateness_s=6)], ["v:count_amount_60s"])
    False
    """
    doc = {"refs": list(refs),
           "views": [{k: val for k, val in dataclasses.asdict(v).items() if k != "offline_path"} for v in views]}
    return "sha256:" + hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def code_version() -> dict[str, Any]:
    """freshet's package version and, from a git checkout, its revision and whether it had local changes."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("freshet")
    except PackageNotFoundError:
        package = ""
    out: dict[str, Any] = {"freshet": package, "git_revision": "", "git_dirty": None}
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            out["git_revision"] = rev.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=5)
            out["git_dirty"] = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass  # not a checkout, or no git: the package version alone
    return out


@dataclass(frozen=True)
class Snapshot:
    """Everything a training read and how it fitted: `digest` names it; `check` says whether it is still there."""

    events: LogSnapshot
    labels: LogSnapshot
    predictions: LogSnapshot
    feature_service: str
    feature_definitions: str
    config: dict[str, Any]  # what rebuilds the training set and the fit (freshet.training.retrain.RetrainConfig)
    training_features: str  # FRESHET_TRAINING_FEATURES: recomputed or served
    code: dict[str, Any]
    taken_at: float = 0.0

    @classmethod
    def take(cls, settings: Settings, plan: Any, config: Mapping[str, Any], labels: Any, predictions: Any) -> "Snapshot":
        """The part files as they are now (a training then reads only these) and the definitions and code.

        `labels` and `predictions` are the label log and the prediction archive
        (`freshet.training.labels.LabelLog`, `freshet.training.served.PredictionArchive`)."""
        return cls(
            events=LogSnapshot.take(OfflineStore.of(settings).raw(plan.topic), plan.topic),
            labels=LogSnapshot.take(labels.root, labels.topic, labels.offsets()),
            predictions=LogSnapshot.take(predictions.root, predictions.topic, predictions.offsets()),
            feature_service=str(config.get("feature_service", "")),
            feature_definitions=feature_definitions_hash(plan.views, plan.refs),
            config=dict(config), training_features=settings.training_features, code=code_version(),
            taken_at=time.time())

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def digest(self) -> str:
        """sha256 of what was read and how (not when, nor by which code): equal snapshots read equal data."""
        doc = self.to_dict()
        for k in ("taken_at", "code", "digest"):
            doc.pop(k, None)
        return "sha256:" + hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def problems(self, settings: Settings, plan: Any) -> list[str]:
        """What is not as the snapshot says: part files missing or changed, feature definitions changed."""
        store = OfflineStore.of(settings)
        out = [*self.events.problems(store), *self.labels.problems(store), *self.predictions.problems(store)]
        now = feature_definitions_hash(plan.views, plan.refs)
        if now != self.feature_definitions:
            rev = self.code.get("git_revision") or "the revision that trained it"
            out.append(f"the feature definitions of {self.feature_service!r} changed ({now[:19]} now, "
                       f"{self.feature_definitions[:19]} then): check out feature_repo/ at {rev} and "
                       "run 'freshet apply'")
        return out

    def check(self, settings: Settings, plan: Any) -> None:
        problems = self.problems(settings, plan)
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise SnapshotChanged(f"the training snapshot no longer matches {OfflineStore.of(settings).root}: "
                                  f"{'; '.join(problems[:5])}{more}")

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "events": self.events.to_dict(), "labels": self.labels.to_dict(),
                "predictions": self.predictions.to_dict(), "feature_service": self.feature_service,
                "feature_definitions": self.feature_definitions, "config": self.config,
                "training_features": self.training_features, "code": self.code, "taken_at": self.taken_at}

    def document(self) -> dict[str, Any]:
        """to_dict with its digest, as logged with the version."""
        return {**self.to_dict(), "digest": self.digest}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Snapshot":
        if d.get("format") != FORMAT:
            raise ValueError(f"not a training snapshot: expected format {FORMAT!r}, got {d.get('format')!r}")
        return cls(LogSnapshot.from_dict(d["events"]), LogSnapshot.from_dict(d["labels"]),
                   LogSnapshot.from_dict(d["predictions"]), d["feature_service"], d["feature_definitions"],
                   dict(d["config"]), d["training_features"], dict(d.get("code", {})), float(d.get("taken_at", 0)))

    def summary(self) -> dict[str, Any]:
        """The snapshot in a few numbers, for people (`freshet models show`)."""
        return {"digest": self.digest, "events": {"topic": self.events.topic, "parts": len(self.events.parts),
                                                  "rows": self.events.rows},
                "labels": {"topic": self.labels.topic, "parts": len(self.labels.parts), "rows": self.labels.rows,
                           "positions": self.labels.positions},
                "predictions": {"parts": len(self.predictions.parts), "rows": self.predictions.rows},
                "feature_definitions": self.feature_definitions, "seed": self.seed, **self.code}
