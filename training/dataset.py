"""The training set: labels joined to their events, the window of event time, point-in-time features, the split.

Owns `FeaturePlan`, `join_labels_to_events`, `TrainingWindow`, `point_in_time_features` and `TrainingSet`.

A label is joined to its transaction in the offline raw log by request id (= transaction id):
the event gives the entity keys, the event time the features are taken at, and request-time
fields such as `amount`. Labels without their event fall back to their own `entities` and
`event_ts`; with neither they are counted and dropped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from freshet.features import FeatureRegistry, ViewSpec
from freshet.settings import Settings
from freshet.times import epoch_or_none, epoch_seconds, iso_utc
from freshet.training.pipeline import input_column, input_matrix


class RetrainError(RuntimeError):
    """Training cannot proceed; the message says what is missing and how to get it."""


@dataclass(frozen=True)
class FeaturePlan:
    """The features a feature service reads: its refs, their views, and the one event topic labels join to."""

    registry: FeatureRegistry
    refs: list[str]
    views: list[ViewSpec]
    topic: str

    @classmethod
    def of(cls, registry: FeatureRegistry, service: str) -> "FeaturePlan":
        services = registry.feature_services
        if service not in services:
            raise RetrainError(f"unknown feature service {service!r}; known: "
                               f"{', '.join(services) or 'none'} (run 'freshet apply')")
        refs = list(services[service])
        views = [registry.views[v] for v in dict.fromkeys(r.split(":")[0] for r in refs)]
        topics = {v.topic for v in views}
        if len(topics) != 1:
            raise RetrainError(f"feature service {service!r} reads several topics ({sorted(topics)}); "
                               "the retrainer joins labels to one event topic")
        return cls(registry, refs, views, topics.pop())

    @property
    def join_keys(self) -> list[str]:
        return list(dict.fromkeys(k for v in self.views for k in v.join_keys))

    @property
    def timestamp_field(self) -> str:
        return self.views[0].timestamp_field

    @property
    def horizon_s(self) -> int:
        """How far back in event time the longest window reaches."""
        return max(v.max_window_s for v in self.views)

    def knows(self, ref: str) -> bool:
        """Whether the registry still has the feature "view:feature" (an older model may read one it dropped)."""
        view, _, feature = ref.partition(":")
        return view in self.registry.views and feature in self.registry.views[view].feature_names


@dataclass(frozen=True)
class TrainingWindow:
    """Which labelled events to train on, by event time.

    Absolute bounds (`start` <= t < `end`, epoch seconds) and/or the last `last_s` seconds
    or the last `last_n` examples. Relative windows end at the newest labelled event, not
    at the wall clock: event time may be simulated or replayed.

    >>> ts = np.array([10.0, 20.0, 30.0, 40.0])
    >>> TrainingWindow(last_s=15).select(ts)[0].tolist()
    [False, False, True, True]
    >>> TrainingWindow(start=15, end=40).select(ts)[0].tolist()
    [False, True, True, False]
    >>> TrainingWindow(last_n=1).select(ts)[0].tolist()
    [False, False, False, True]
    """

    start: float | None = None
    end: float | None = None
    last_s: float | None = None
    last_n: int | None = None

    def __post_init__(self) -> None:
        if self.last_s is not None and not self.last_s > 0:
            raise ValueError(f"the window's last_s must be > 0 seconds, got {self.last_s}")
        if self.last_n is not None and self.last_n < 1:
            raise ValueError(f"the window's last_n must be >= 1, got {self.last_n}")
        if self.start is not None and self.end is not None and self.start >= self.end:
            raise ValueError(f"the window's start ({self.start}) must be before its end ({self.end})")

    @classmethod
    def of(cls, window: Any) -> "TrainingWindow":
        """From a TrainingWindow, None (everything), (start, end), {"start","end","last_s","last_n"}."""
        if window is None:
            return cls()
        if isinstance(window, TrainingWindow):
            return window
        if isinstance(window, Mapping):
            start, end = _epoch_or_none(window.get("start")), _epoch_or_none(window.get("end"))
            last_s = window.get("last_s") or (window.get("last_hours") and float(window["last_hours"]) * 3600)
            return cls(start, end, float(last_s) if last_s else None,
                       int(window["last_n"]) if window.get("last_n") else None)
        if isinstance(window, (tuple, list)) and len(window) == 2:
            return cls(_epoch_or_none(window[0]), _epoch_or_none(window[1]))
        raise ValueError(f"a training window is (start, end) or a dict with start/end/last_s/last_n, got {window!r}")

    def select(self, ts: np.ndarray) -> tuple[np.ndarray, float | None, float | None]:
        """(mask of the rows inside, resolved start, resolved end) for event times `ts`."""
        ts = np.asarray(ts, dtype=float)
        mask = np.isfinite(ts)
        if self.start is not None:
            mask &= ts >= self.start
        if self.end is not None:
            mask &= ts < self.end
        if self.last_s is not None and mask.any():
            mask &= ts > ts[mask].max() - self.last_s
        if self.last_n is not None and mask.sum() > self.last_n:
            idx = np.flatnonzero(mask)
            keep = idx[np.argsort(ts[idx], kind="stable")[-self.last_n:]]
            mask = np.zeros_like(mask)
            mask[keep] = True
        if not mask.any():
            return mask, self.start, self.end
        return mask, float(ts[mask].min()), float(ts[mask].max())

    def describe(self) -> str:
        parts = []
        if self.start is not None or self.end is not None:
            parts.append(f"[{iso_or_blank(self.start) if self.start is not None else '...'}, "
                         f"{iso_or_blank(self.end) if self.end is not None else '...'})")
        if self.last_s is not None:
            parts.append(f"last {self.last_s / 3600:g} h")
        if self.last_n is not None:
            parts.append(f"last {self.last_n} labels")
        return " and ".join(parts) or "every label"


def _epoch_or_none(value: Any) -> float | None:
    if value is None or value == "":
        return None
    out = epoch_or_none(value)
    if out is None:
        raise ValueError(f"{value!r} is not a time: use epoch seconds or ISO-8601")
    return out


def iso_or_blank(ts: float | None) -> str:
    """A window bound for people: ISO-8601, or "" when there is none."""
    return "" if ts is None else iso_utc(ts, "auto")


def time_split(ts: np.ndarray, holdout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (train, holdout): the holdout is the newest `holdout_fraction` by event time.

    Rows sharing the boundary time all go to the holdout, so no instant is on both sides.

    >>> train, hold = time_split(np.array([5.0, 1.0, 3.0, 3.0, 2.0]), 0.4)
    >>> train.tolist(), hold.tolist()
    ([False, True, False, False, True], [True, False, True, True, False])
    """
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    ts = np.asarray(ts, dtype=float)
    n = len(ts)
    if n == 0:
        return np.zeros(0, bool), np.zeros(0, bool)
    n_hold = max(1, math.ceil(n * holdout_fraction))
    cut = np.sort(ts, kind="stable")[n - n_hold]
    holdout = ts >= cut
    return ~holdout, holdout


def blocked_folds(ts: np.ndarray, n_folds: int) -> np.ndarray:
    """Each row's block (0 = oldest) when the rows are cut into `n_folds` contiguous spans of event time.

    The blocks are as equal in rows as the times allow: rows sharing an instant are never cut
    apart, so a block may be smaller (or empty) when many rows share one.

    >>> blocked_folds(np.array([5.0, 1.0, 3.0, 3.0, 2.0, 6.0]), 3).tolist()
    [2, 0, 1, 1, 0, 2]
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    ts = np.asarray(ts, dtype=float)
    n = len(ts)
    if n == 0:
        return np.zeros(0, int)
    ordered = np.sort(ts, kind="stable")
    cuts = ordered[[min(n - 1, math.ceil(k * n / n_folds)) for k in range(1, n_folds)]]
    return np.searchsorted(cuts, ts, side="right")


def fold_problem(y: np.ndarray, folds: np.ndarray, n_folds: int, min_class_rows: int) -> str:
    """Why out-of-fold judging cannot work on these rows ("" when it can): every block must hold
    rows, and every fold's training rows (the other blocks) `min_class_rows` of each class.

    >>> y = np.array([0, 1, 0, 1, 0, 0, 1, 1])
    >>> fold_problem(y, np.array([0, 0, 0, 0, 1, 1, 1, 1]), 2, 2)
    ''
    >>> fold_problem(y, np.array([0, 0, 0, 1, 1, 1, 1, 1]), 2, 2)
    'fold 2 of 2 is fitted on 3 rows with 1 positive and 2 negative (need 2 of each)'
    """
    y = np.asarray(y).astype(int)
    for k in range(n_folds):
        held = folds == k
        if not held.any():
            return f"block {k + 1} of {n_folds} holds no rows (too many rows share an instant)"
        pos, rows = int(y[~held].sum()), int((~held).sum())
        if min(pos, rows - pos) < min_class_rows:
            return (f"fold {k + 1} of {n_folds} is fitted on {rows} rows with {pos} positive and {rows - pos} "
                    f"negative (need {min_class_rows} of each)")
    return ""


def dataset_fingerprint(df: pd.DataFrame, columns: Sequence[str]) -> str:
    """sha256 of the rows and columns a model was trained and evaluated on (order-independent of input)."""
    h = hashlib.sha256()
    h.update(json.dumps(list(columns)).encode())
    if len(df):
        hashed = pd.util.hash_pandas_object(df[list(columns)], index=False).to_numpy()
        h.update(np.sort(hashed).tobytes())
    return "sha256:" + h.hexdigest()


def join_labels_to_events(labels: pd.DataFrame, events: pd.DataFrame, join_keys: Sequence[str],
                          request_fields: Sequence[str], id_field: str = "transaction_id",
                          ts_field: str = "event_ts") -> tuple[pd.DataFrame, dict[str, int]]:
    """Labelled examples: request_id, label, event time (epoch s), join keys, request fields.

    Entity keys, event time and request fields come from the labelled event (found by
    request id in the raw log); labels whose event is not there fall back to their own
    `entities` and `event_ts`. Returns (examples, counts: from_events, from_labels, dropped).
    """
    n = len(labels)
    out = pd.DataFrame({"request_id": labels["request_id"].to_numpy(dtype=object),
                        "label": labels["label"].to_numpy(dtype=float)})
    ts = epoch_seconds(labels["event_ts"]) if n else np.zeros(0)
    keys = {k: np.full(n, None, dtype=object) for k in join_keys}
    fields = {f: np.full(n, np.nan) for f in request_fields}
    found = np.zeros(n, bool)
    if n and len(events) and id_field in events.columns:
        found = _fill_from_events(out["request_id"], events, id_field, ts_field, ts, keys, fields)
    if n and "entities" in labels.columns:
        _fill_keys_from_labels(labels["entities"].to_numpy(dtype=object), keys)
    out["event_ts"] = ts
    for k in join_keys:
        out[k] = keys[k]
    for f in request_fields:
        out[f] = fields[f]
    usable = np.isfinite(ts) & np.all([pd.notna(keys[k]) for k in join_keys], axis=0) if n else np.zeros(0, bool)
    counts = {"from_events": int((usable & found).sum()), "from_labels": int((usable & ~found).sum()),
              "dropped": int(n - usable.sum())}
    return out[usable].reset_index(drop=True), counts


def _fill_from_events(request_ids: pd.Series, events: pd.DataFrame, id_field: str, ts_field: str,
                      ts: np.ndarray, keys: dict[str, np.ndarray], fields: dict[str, np.ndarray]) -> np.ndarray:
    """Fill each label's event time, keys and request fields from its event; returns where one was found."""
    cols = [c for c in dict.fromkeys([id_field, ts_field, *keys, *fields]) if c in events.columns]
    ev = events[cols].drop_duplicates(id_field, keep="last").set_index(id_field)
    pos = ev.index.get_indexer(request_ids)
    found = pos >= 0
    if found.any():
        hit = ev.iloc[pos[found]]
        if ts_field in hit.columns:
            ts[found] = epoch_seconds(hit[ts_field])
        for k in keys:
            if k in hit.columns:
                keys[k][found] = hit[k].to_numpy(dtype=object)
        for f in fields:
            if f in hit.columns:
                fields[f][found] = pd.to_numeric(hit[f], errors="coerce").to_numpy(dtype=float)
    return found


def _fill_keys_from_labels(entities: np.ndarray, keys: dict[str, np.ndarray]) -> None:
    """Fill the keys still missing from the label's own `entities` (a JSON object, or None)."""
    for i, ents in enumerate(entities):
        if ents is None or all(keys[k][i] is not None for k in keys):
            continue
        try:
            parsed = json.loads(ents)
        except ValueError:
            continue
        for k in keys:
            if keys[k][i] is None and parsed.get(k) is not None:
                keys[k][i] = str(parsed[k])


def point_in_time_features(settings: Settings, plan: FeaturePlan, examples: pd.DataFrame, events: pd.DataFrame,
                           refs: Sequence[str], progress: bool = False, source: str = "recomputed") -> pd.DataFrame:
    """The examples with each feature of `refs`, oldest first (`_t`: the event time, epoch s).

    An example with a `request_ts` (serving answered its request then; see
    `freshet.training.served.attach_requests`) gets its features as served at that time,
    recomputed from the raw log with the stream's code (`freshet.stream.pointintime`); one
    without gets them as of its event time. With `source` "served", only examples with a
    logged request are kept and each feature is the value logged with it (recomputed where
    the served model did not read that feature).
    """
    from freshet.stream.backfill import training_set
    from freshet.training.served import SERVED, use_served

    requested = examples["request_ts"].to_numpy(dtype=float) if "request_ts" in examples.columns else np.zeros(0)
    if source == SERVED:
        examples = examples[np.isfinite(requested)].reset_index(drop=True) if len(requested) else examples.iloc[:0]
        requested = examples["request_ts"].to_numpy(dtype=float) if len(examples) else np.zeros(0)
    asked = requested[np.isfinite(requested)] if len(requested) else requested
    if len(events) and len(examples):
        # events outside every example's windows change no feature; skipping them saves the replay
        ev_ts = epoch_seconds(events[plan.timestamp_field])
        first = min(examples["event_ts"].min(), asked.min() if len(asked) else math.inf)
        keep = ev_ts >= first - plan.horizon_s - max(v.lateness_s for v in plan.views)
        if not len(asked):  # by event time only: nothing after the newest example counts
            keep &= ev_ts <= examples["event_ts"].max()
        events = events[keep]
    frame = examples.assign(event_ts=pd.to_datetime(examples["event_ts"], unit="s", utc=True))
    data = training_set(settings, plan.registry, frame, list(refs), timestamp_field="event_ts",
                        events={plan.topic: events}, progress=progress)
    if source == SERVED:
        use_served(data, refs)
    data["_t"] = examples["event_ts"].to_numpy()
    return data.sort_values(["_t", "request_id"], kind="stable").reset_index(drop=True)


@dataclass
class TrainingSet:
    """Point-in-time examples, oldest first, split in event time: the older part to fit, the newest to score.

    `inputs` are the model's inputs (feature refs, then request fields); `y` the 0/1 labels.
    Judged out-of-fold (`n_folds` > 0), every row is in `train` (the version is fitted on all of
    them), none in `holdout`, and `folds` gives each row's block: each block is scored by a model
    fitted on the others. `folds_skipped` says why folds were asked for but the holdout judges.
    """

    data: pd.DataFrame
    inputs: list[str]
    y: np.ndarray
    train: np.ndarray
    holdout: np.ndarray
    folds: np.ndarray | None = None
    folds_skipped: str = ""

    @classmethod
    def split(cls, data: pd.DataFrame, inputs: Sequence[str], holdout_fraction: float, n_folds: int = 0,
              min_class_rows: int = 1) -> "TrainingSet":
        """The newest `holdout_fraction` held out or, with `n_folds`, `n_folds` blocks of event time; when a
        fold could not be fitted (`fold_problem`), the holdout after all, and `folds_skipped` says why."""
        y = (data["label"].to_numpy(dtype=float) > 0.5).astype(int)
        ts = data["_t"].to_numpy()
        skipped = ""
        if n_folds:
            folds = blocked_folds(ts, n_folds)
            skipped = fold_problem(y, folds, n_folds, min_class_rows)
            if not skipped:
                return cls(data, list(inputs), y, np.ones(len(y), bool), np.zeros(len(y), bool), folds)
        train, holdout = time_split(ts, holdout_fraction)
        return cls(data, list(inputs), y, train, holdout, folds_skipped=skipped)

    @property
    def n_folds(self) -> int:
        """How many blocks judge the candidate out-of-fold (0: the holdout judges)."""
        return 0 if self.folds is None else int(self.folds.max()) + 1

    @property
    def judged(self) -> np.ndarray:
        """The rows a candidate is scored on: the holdout, or every row out-of-fold."""
        return self.holdout if self.folds is None else np.ones(len(self.y), bool)

    @functools.cached_property
    def X(self) -> np.ndarray:
        """Every example's inputs, as the pipeline takes them."""
        return input_matrix(self.data, self.inputs)

    def rows(self) -> dict[str, int]:
        rows = {"train": int(self.train.sum()), "holdout": int(self.holdout.sum()),
                "train_positives": int(self.y[self.train].sum()),
                "holdout_positives": int(self.y[self.holdout].sum())}
        return rows | ({"folds": self.n_folds} if self.n_folds else {})

    def holdout_start(self) -> str:
        """When the rows the candidate is judged on begin (the first row, out-of-fold)."""
        ts = self.data["_t"].to_numpy()
        judged = self.judged
        return iso_or_blank(float(ts[judged].min())) if judged.any() else ""

    def fingerprint(self) -> str:
        """What the model was trained and evaluated on: the examples' ids, labels, times and inputs."""
        return dataset_fingerprint(self.data, ["request_id", "label", "_t", *map(input_column, self.inputs)])
