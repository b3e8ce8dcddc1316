"""Backfill and training sets: the stream's aggregations replayed over the offline raw log.

Both run the same `ViewAggregator` as the stream engine, in event-time order, so
the feature values they produce are the ones the stream would have served.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from freshet.features import FeatureRegistry, ViewSpec
from freshet.settings import Settings
from freshet.times import epoch_seconds
from freshet.stream.aggregations import ViewAggregator
from freshet.offline_store import Location, OfflineStore
from freshet.stream.offline import read_parts

log = logging.getLogger("freshet.backfill")


def load_events(settings: Settings, topic: str, path: str | None = None,
                files: list[Location] | None = None) -> pd.DataFrame:
    """Events of a topic, deduplicated by (partition, offset) and sorted by event time.

    From `path` (Parquet or CSV) when given, else the offline raw log the stream wrote (only
    its part `files`, when given: a training's snapshot).
    """
    if path:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"--input {path} does not exist")
        df = pd.read_csv(p) if p.suffix.lower() == ".csv" else pd.read_parquet(p)
    else:
        table = read_parts(OfflineStore.of(settings).raw(topic), files=files)
        if table is None:
            return pd.DataFrame()
        df = table.to_pandas()
    if {"_partition", "_offset"} <= set(df.columns):
        # at-least-once: a replay after a crash may have appended the same events again
        df = df.drop_duplicates(["_partition", "_offset"], keep="first")
    return df


def _ordered(df: pd.DataFrame, view: ViewSpec) -> tuple[np.ndarray, pd.DataFrame]:
    ts = epoch_seconds(df[view.timestamp_field])
    df = df.assign(_ts=ts)
    order = ["_ts"] + [c for c in ("_partition", "_offset") if c in df.columns]
    df = df.sort_values(order, kind="stable")
    return df["_ts"].to_numpy(), df


def _records(df: pd.DataFrame, columns: list[str]) -> Iterator[dict[str, Any]]:
    clean = df[columns].astype(object).where(df[columns].notna(), None)
    for values in clean.itertuples(index=False, name=None):
        yield dict(zip(columns, values))


def replay_view(df: pd.DataFrame, view: ViewSpec, emit_rows: bool = False):
    """Aggregate the events of one view; returns (aggregator, final states, point-in-time rows or None).

    Point-in-time rows hold, for every event, the entity's features right after it.
    """
    agg = ViewAggregator(view)
    states: dict[tuple, dict] = {}
    rows = [] if emit_rows else None
    if df.empty:
        return agg, states, rows
    ts, df = _ordered(df, view)
    columns = sorted({*view.join_keys, *(a.column for a in view.aggregations)})
    for t, row in zip(ts, _records(df, columns)):
        key = tuple(row[k] for k in view.join_keys)
        state = states.get(key)
        if state is None:
            state = states[key] = agg.new_state()
        agg.update(state, float(t), row)
        if emit_rows:
            rows.append({**dict(zip(view.join_keys, key)), **agg.result(state),
                         view.timestamp_field: pd.Timestamp(t, unit="s", tz="UTC")})
    return agg, states, rows


def latest_features(df: pd.DataFrame, view: ViewSpec) -> dict[tuple, tuple[float, dict]]:
    """Entity key -> (latest event time, features as of it): what the online store should hold."""
    agg, states, _ = replay_view(df, view)
    return {key: (state["max_ts"], agg.result(state)) for key, state in states.items()}


def training_set(settings: Settings, registry: FeatureRegistry, labels: pd.DataFrame,
                 feature_refs: list[str], timestamp_field: str = "event_ts",
                 events: dict[str, pd.DataFrame] | None = None, progress: bool = True,
                 request_ts_field: str = "request_ts") -> pd.DataFrame:
    """For every label row, each requested feature as serving answered (or would have) its request.

    `feature_refs` are "view:feature". A label whose row has a `request_ts_field` (the
    wall-clock time serving answered its request, epoch s) gets the features as served then:
    the events the stream had accepted by that time, windows as of it
    (`freshet.stream.pointintime`). Other labels get them as of their own `timestamp_field`
    over the events up to it. An entity without events in a window gets that window's empty
    value (count 0, mean None): no row is dropped.
    """
    from freshet.stream.pointintime import features_at_requests

    wanted: dict[str, list[str]] = {}
    for ref in feature_refs:
        view_name, _, feature = ref.partition(":")
        if view_name not in registry.views:
            raise KeyError(f"unknown feature view {view_name!r} in {ref!r}")
        if feature not in registry.views[view_name].feature_names:
            raise KeyError(f"unknown feature {feature!r} in view {view_name!r}")
        wanted.setdefault(view_name, []).append(feature)
    label_ts = epoch_seconds(labels[timestamp_field])
    served = np.zeros(len(labels), bool)
    if request_ts_field in labels.columns:
        request_ts = pd.to_numeric(labels[request_ts_field], errors="coerce").to_numpy(dtype=float)
        served = np.isfinite(request_ts)
        label_ts = np.where(served, request_ts, label_ts)
    out = labels.reset_index(drop=True).copy()
    for view_name, features in wanted.items():
        view = registry.views[view_name]
        missing = [k for k in view.join_keys if k not in labels.columns]
        if missing:
            raise KeyError(f"labels lack join key(s) {missing} of view {view_name!r}")
        df = (events or {}).get(view.topic)
        if df is None:
            df = load_events(settings, view.topic)
        keys = list(zip(*(out[k].tolist() for k in view.join_keys)))
        if progress:
            print(f"training set {view_name}: {len(out)} rows ({int(served.sum())} as served)", file=sys.stderr)
        results = features_at_requests(df, view, keys, label_ts, served, settings.stream_clock_ahead_s)
        for f in features:
            out[f"{view_name}__{f}"] = [r[f] for r in results]
    return out


def _feature_refs(registry: FeatureRegistry, service: str | None, views: list[str] | None = None) -> list[str]:
    if service:
        if service not in registry.feature_services:
            raise KeyError(f"unknown feature service {service!r}; known: {', '.join(registry.feature_services)}")
        return registry.feature_services[service]
    if registry.feature_services and not views:
        return next(iter(registry.feature_services.values()))
    return [f"{v.name}:{f}" for v in registry.views.values() if not views or v.name in views
            for f in v.feature_names]


def main(args, settings: Settings) -> int:
    from freshet import features
    from freshet.endpoints import resolve_endpoints
    from freshet.errors import CliError

    if args.online:
        settings = resolve_endpoints(settings)
    registry = features.load_registry(settings)
    views = [v for v in registry.views.values() if not args.view or v.name in args.view]
    if args.view and len(views) != len(args.view):
        raise CliError(f"unknown view in {args.view}; known: {', '.join(registry.views)}")
    cache: dict[str, pd.DataFrame] = {}
    for view in views:
        if view.topic not in cache:
            cache[view.topic] = load_events(settings, view.topic, args.input)
        df = cache[view.topic]
        agg, states, rows = replay_view(df, view, emit_rows=bool(args.output))
        print(f"{view.name}: {len(df)} events, {len(states)} entities", file=sys.stderr)
        if args.output:
            out = Path(args.output)
            target = out if len(views) == 1 else out.with_name(f"{out.stem}.{view.name}{out.suffix}")
            pq.write_table(pa.Table.from_pylist(rows), target)
            print(f"wrote {len(rows)} point-in-time rows to {target}")
        if args.online:
            from freshet.endpoints import redis_client
            from freshet.redis_layout import OnlineLayout

            layout = OnlineLayout(registry.project, registry.views)
            client = redis_client(settings)
            # as of the replay's newest event, as the stream evaluates rows as of its clock (stream/expiry.py)
            as_of = max((state["max_ts"] for state in states.values()), default=0.0)
            batch = [(key, agg.result(state, as_of), as_of) for key, state in states.items()]
            for start in range(0, len(batch), 5000):
                layout.write(client, view.name, batch[start:start + 5000], only_newer=True)
            print(f"wrote {len(batch)} entities of {view.name} to Redis")
    return 0


def training_set_main(args, settings: Settings) -> int:
    from freshet import features

    registry = features.load_registry(settings)
    p = Path(args.labels)
    labels = pd.read_csv(p) if p.suffix.lower() == ".csv" else pd.read_parquet(p)
    refs = _feature_refs(registry, args.feature_service)
    out = training_set(settings, registry, labels, refs)
    out.to_parquet(args.output, index=False)
    empty = int(out.filter(like="__count").eq(0).all(axis=1).sum()) if len(out) else 0
    print(f"wrote {len(out)} rows x {len(refs)} features to {args.output} "
          f"({empty} rows had no events in any window; kept, with empty-window values)")
    return 0
