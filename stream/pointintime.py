"""Features as serving answered them at a request's time, recomputed from the offline raw log.

Owns the one definition training sets and the consistency check share: `StreamTime` (the
stream's clock at a wall-clock instant), `features_at_requests` (many requests in one sweep,
for training sets) and `ServedFeatures` (one entity at a time, for sampled predictions).

A request answered at wall-clock time R read every feature over the events the stream had
accepted by R (the raw log's `_ingested_at`), each window as of the stream's clock at R, never
before the entity's latest event (the time the engine evaluates rows as of), with the stream's
own `ViewAggregator`. The stream's clock is the newest event time applied plus the wall time
since (freshet.stream.expiry.StreamClock), so its value at R is R plus the largest
(event time - acceptance time) of the events accepted by R: `StreamTime` keeps that running
maximum. Events the stream accepted just before R may not have reached Redis yet, and a slide
boundary just passed may not be re-evaluated yet (the freshness bound):
`ServedFeatures.candidates` also gives the values without those, so a check can tell "not
yet visible" from "different". Raw logs written before `_ingested_at` existed, and labels
without a served request, fall back to event time: the events up to the label's event time,
as of that time.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from freshet.features import ViewSpec
from freshet.times import epoch_seconds
from freshet.stream.aggregations import ViewAggregator

INGESTED_AT = "_ingested_at"  # raw-log column: wall clock of the batch the stream accepted the event in
BEFORE_BOUNDARY_S = 1e-4  # "just before a slide boundary" (event times are kept to the microsecond)


class StreamTime:
    """The stream's clock as a function of the wall clock, from events and when they were accepted.

    Like the engine's clock it never runs more than `ahead_s` (FRESHET_STREAM_CLOCK_AHEAD_S)
    past the wall clock.

    >>> clock = StreamTime(ahead_s=3600)
    >>> clock.add([100.0, 90.0], [100.2, 100.3])    # live: accepted 0.2 s after their time
    >>> clock.at(105.0), clock.at(50.0)             # before any event: the wall clock
    (104.8, 50.0)
    >>> clock.add([5000.0], [106.0])                # simulated time running ahead
    >>> clock.at(105.0), clock.at(107.0)
    (104.8, 3707.0)
    """

    def __init__(self, ahead_s: float = 0.0):
        self.ahead_s = ahead_s
        self._seen = np.zeros(0)  # acceptance times, sorted
        self._gap = np.zeros(0)  # event time - acceptance time, in the same order
        self._lead = np.zeros(0)  # running maximum of `_gap`

    def add(self, event_ts, seen) -> None:
        """Events (their times and when the stream accepted them), in any order."""
        seen = np.asarray(seen, dtype=float)
        gap = np.asarray(event_ts, dtype=float) - seen
        all_seen, all_gap = np.concatenate([self._seen, seen]), np.concatenate([self._gap, gap])
        order = np.argsort(all_seen, kind="stable")
        self._seen, self._gap = all_seen[order], all_gap[order]
        self._lead = np.maximum.accumulate(self._gap) if len(self._gap) else self._gap

    def at(self, wall_ts: float) -> float:
        """The stream's "now" at wall-clock `wall_ts` (the wall clock itself before any event)."""
        i = int(np.searchsorted(self._seen, wall_ts, side="right"))
        return float(wall_ts) + (min(float(self._lead[i - 1]), self.ahead_s) if i else 0.0)


def evaluated_at(clock: float, state: dict) -> float:
    """The time the engine evaluates an entity's row as of: the clock, never before its latest event."""
    latest = state["max_ts"]
    return latest if latest is not None and latest > clock else clock


def applied_order(df: pd.DataFrame, view: ViewSpec) -> pd.DataFrame:
    """The view's events with `_ts` (event time, epoch s) and `_seen` (when the stream accepted
    them; event time where the raw log does not say), in the order the stream applied them.

    A replay after a crash may have logged an event twice: the first acceptance counts."""
    ts = epoch_seconds(df[view.timestamp_field]) if len(df) else np.zeros(0)
    seen = df[INGESTED_AT].to_numpy(dtype=float, na_value=np.nan) if INGESTED_AT in df.columns else np.full(len(df), np.nan)
    seen = np.where(np.isnan(seen), ts, seen)
    out = df.assign(_ts=ts, _seen=seen)
    order = ["_seen"] + [c for c in ("_partition", "_offset") if c in out.columns]
    out = out.sort_values(order, kind="stable")
    if {"_partition", "_offset"} <= set(out.columns):
        out = out.drop_duplicates(["_partition", "_offset"], keep="first")
    return out


def _rows(df: pd.DataFrame, columns: list[str]) -> list[dict[str, Any]]:
    clean = df[columns].astype(object).where(df[columns].notna(), None)
    return [dict(zip(columns, values)) for values in clean.itertuples(index=False, name=None)]


def view_columns(view: ViewSpec) -> list[str]:
    return sorted({*view.join_keys, *(a.column for a in view.aggregations)})


def features_at_requests(events: pd.DataFrame, view: ViewSpec, keys: Sequence[tuple],
                         request_ts: np.ndarray, served: np.ndarray | None = None,
                         clock_ahead_s: float = 0.0) -> list[dict[str, Any]]:
    """Every feature of `view` for each request (entity key, time), in one sweep over the events.

    Where `served[i]` is true, request i was answered by serving at wall-clock time
    `request_ts[i]`: it gets the features over the events accepted by then, as of the
    stream's clock then (`StreamTime`, `evaluated_at`). Elsewhere `request_ts[i]` is an event
    time (a label without a served request): the features over the events up to it, as of it. No request is dropped: an
    entity without events gets every window's empty value.
    """
    n = len(keys)
    out: list[dict[str, Any] | None] = [None] * n
    served = np.zeros(n, bool) if served is None else np.asarray(served, bool)
    request_ts = np.asarray(request_ts, dtype=float)
    ordered = applied_order(events, view) if len(events) else None
    for mode in (True, False):
        wanted = np.flatnonzero(served == mode)
        if not len(wanted):
            continue
        ev, cut, clock = [], np.zeros(0), None
        if ordered is not None:
            # served: in the order the stream accepted them, up to the request's time; else by event time
            by = ordered if mode else ordered.sort_values(["_ts"], kind="stable")
            ev = list(zip(by["_ts"].to_numpy(), _rows(by, view_columns(view))))
            cut = by["_seen" if mode else "_ts"].to_numpy()
            if mode:
                clock = StreamTime(clock_ahead_s)
                clock.add(ordered["_ts"].to_numpy(), ordered["_seen"].to_numpy())
        _sweep(view, ev, cut, [keys[i] for i in wanted], request_ts[wanted], clock, out, wanted)
    return out  # type: ignore[return-value]


def _sweep(view: ViewSpec, events: list, cut: np.ndarray, keys: list[tuple], times: np.ndarray,
           clock: StreamTime | None, out: list, index: np.ndarray) -> None:
    agg = ViewAggregator(view)
    states: dict[tuple, dict] = {}
    i = 0
    for j in np.argsort(times, kind="stable"):
        t = float(times[j])
        while i < len(events) and cut[i] <= t:
            ts, row = events[i]
            key = tuple(row[k] for k in view.join_keys)
            state = states.get(key)
            if state is None:
                state = states[key] = agg.new_state()
            agg.update(state, float(ts), row)
            i += 1
        state = states.get(tuple(keys[j])) or agg.new_state()
        out[index[j]] = agg.result(state, as_of=evaluated_at(clock.at(t), state) if clock is not None else t)


class ServedFeatures:
    """One view's raw-log events kept per entity, to recompute what a request was served.

    `add` takes new raw-log rows (any order); `candidates(key, request_ts, grace_s)` gives the
    features over the events accepted by `request_ts`, then over those minus the last one,
    two, ... accepted within `grace_s` before it: what serving may have shown while those
    were on their way to Redis. `forget` drops what no window of a later request reaches.

    >>> from freshet.features import AggregationSpec, ViewSpec
    >>> view = ViewSpec("v", ("card_id",), ("STRING",), 0, "tx", "ts", {}, 0,
    ...                 (AggregationSpec("count_amount_300s", "amount", "count", 300, 60, "INT64"),), "")
    >>> served = ServedFeatures(view)
    >>> n = served.add(pd.DataFrame({"card_id": ["a", "a"], "amount": [1.0, 2.0], "ts": [100.0, 110.0],
    ...                              "_ingested_at": [100.5, 110.5]}))
    >>> served.candidates(("a",), 111.0, grace_s=1.0)   # the second event may not be in Redis yet
    [{'count_amount_300s': 2}, {'count_amount_300s': 1}]
    >>> served.candidates(("a",), 105.0, grace_s=1.0)
    [{'count_amount_300s': 1}]
    >>> served.candidates(("a",), 360.6, grace_s=1.0)   # clock 360.1: their tile left at 360, maybe not re-read
    [{'count_amount_300s': 0}, {'count_amount_300s': 2}]
    """

    def __init__(self, view: ViewSpec, clock_ahead_s: float = 0.0):
        self.view = view
        self.agg = ViewAggregator(view)
        self.columns = view_columns(view)
        # entity key -> [(accepted at, partition, offset, event time, row)], kept sorted
        self.events: dict[tuple, list[tuple]] = {}
        self._seen: set[tuple[int, int]] = set()
        self.reach_s = view.max_window_s + view.lateness_s + view.tile_s
        self.clock = StreamTime(clock_ahead_s)
        self.slides = sorted({a.slide_s for a in view.aggregations})

    def add(self, df: pd.DataFrame) -> int:
        """Take raw-log rows; returns how many were new (a duplicate (partition, offset) is skipped)."""
        if not len(df):
            return 0
        df = applied_order(df, self.view)
        has_offsets = {"_partition", "_offset"} <= set(df.columns)
        parts = df["_partition"].to_numpy() if has_offsets else np.full(len(df), -1)
        offsets = df["_offset"].to_numpy() if has_offsets else np.arange(len(df))
        touched = set()
        n = 0
        for seen, ts, p, o, row in zip(df["_seen"].to_numpy(), df["_ts"].to_numpy(), parts, offsets,
                                       _rows(df, self.columns)):
            if has_offsets:
                if (int(p), int(o)) in self._seen:
                    continue
                self._seen.add((int(p), int(o)))
            key = tuple(row[k] for k in self.view.join_keys)
            self.events.setdefault(key, []).append((float(seen), int(p), int(o), float(ts), row))
            touched.add(key)
            n += 1
        for key in touched:
            self.events[key].sort(key=lambda e: e[:3])
        self.clock.add(df["_ts"].to_numpy(), df["_seen"].to_numpy())
        return n

    def candidates(self, key: tuple, request_ts: float, grace_s: float = 0.0) -> list[dict[str, Any]]:
        """Features over the events accepted by `request_ts`, as of the stream's clock then; then
        the same without the newest events accepted within `grace_s` before it (one more at a
        time), and as of just before each slide boundary the clock passed within `grace_s`."""
        events = [e for e in self.events.get(tuple(key), ()) if e[0] <= request_ts]
        in_flight = sum(1 for e in events if e[0] > request_ts - grace_s)
        clock = self.clock.at(request_ts)
        out = []
        for drop in range(in_flight + 1):
            state = self.agg.new_state()
            for _, _, _, ts, row in events[:len(events) - drop]:
                self.agg.update(state, ts, row)
            as_of = evaluated_at(clock, state)
            out.append(self.agg.result(state, as_of=as_of))
            for boundary in sorted({as_of // s * s for s in self.slides}, reverse=True):
                if as_of - grace_s < boundary and (state["max_ts"] is None or boundary > state["max_ts"]):
                    out.append(self.agg.result(state, as_of=boundary - BEFORE_BOUNDARY_S))
            if drop == len(events):  # no row in Redis yet: serving reads null (NOT_FOUND) for every feature
                out.append(dict.fromkeys(self.view.feature_names))
        return out

    def forget(self, before_ts: float) -> None:
        """Drop events no window of a request whose stream clock is at or after `before_ts` (event
        time) can reach, and the duplicate check's memory of them."""
        floor = before_ts - self.reach_s
        for key in list(self.events):
            kept = [e for e in self.events[key] if e[3] >= floor]
            if kept:
                self.events[key] = kept
            else:
                del self.events[key]
        self._seen = {(e[1], e[2]) for events in self.events.values() for e in events}


def same_value(served: Any, recomputed: Any, rel_tol: float = 1e-9, abs_tol: float = 1e-9) -> bool:
    """Whether a served feature value is the recomputed one: both null, or equal numbers (sums
    may add in another order), or equal otherwise.

    >>> same_value(0.1 + 0.2, 0.3), same_value(None, None), same_value(None, 0), same_value(3, 3.0)
    (True, True, False, True)
    """
    if served is None or recomputed is None:
        return served is None and recomputed is None
    if isinstance(served, (int, float)) and isinstance(recomputed, (int, float)):
        if isinstance(served, float) and math.isnan(served):
            return isinstance(recomputed, float) and math.isnan(recomputed)
        return math.isclose(float(served), float(recomputed), rel_tol=rel_tol, abs_tol=abs_tol)
    return served == recomputed


def judge(served: dict[str, Any], candidates: Iterable[dict[str, Any]], names: Sequence[str]) -> dict[str, bool]:
    """Per feature name: whether the served value equals the recomputed one.

    Serving read one row per view, so one candidate is judged against: the one most
    features agree with (the first, i.e. every accepted event, on a tie).

    >>> judge({"n": 1, "s": 2.0}, [{"n": 2, "s": 3.0}, {"n": 1, "s": 2.0}], ["n", "s"])
    {'n': True, 's': True}
    >>> judge({"n": 1, "s": 9.0}, [{"n": 2, "s": 3.0}, {"n": 1, "s": 2.0}], ["n", "s"])
    {'n': True, 's': False}
    """
    best: dict[str, bool] | None = None
    for cand in candidates:
        verdict = {name: same_value(served.get(name), cand.get(name)) for name in names}
        if best is None or sum(verdict.values()) > sum(best.values()):
            best = verdict
    return best if best is not None else {name: False for name in names}
