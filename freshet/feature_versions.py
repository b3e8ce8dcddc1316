"""Feature view versions: a changed definition is a new version, built before it serves.

Feast numbers the versions of a feature view in its registry (v0, v1, ...) and reads
`view@vN:feature` from that version's own online rows (`view_vN`, with
`enable_online_feature_view_versioning`). freshet adds what a streaming store needs around it:

- `freshet apply` registers a view whose definition changed as a new version without making
  it active (Feast's no-promote), and leaves a view whose definition did not change as it is.
  What counts as the definition is `fingerprint`: what the view computes, not its metadata.
  (Feast 0.67 itself sees a change in every stream feature view it reads back from its
  registry, so its plain `feast apply` numbers a new version at every run.)
- Stream workers compute each view's active version and its newest pending one. A version
  after v0 is built from the offline raw log, partition by partition, before the worker applies
  any new event to it (stream/versions.py); when every partition is built the worker promotes
  it (a Feast pin) and servers switch at their next registry refresh. Reads without a version
  get the old one until then.
- `freshet features revert` registers an old definition again, as the next version: it is built
  and switched to like any change.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from freshet.features import FeatureRegistry, FeatureRepoError, ViewSpec, fingerprint, load_registry, stored_name

ACTIVE, PENDING, OLDER, SUPERSEDED = "active", "pending", "older", "superseded"


def active_number(fv: Any) -> int:
    return int(getattr(fv, "current_version_number", None) or 0)


@dataclass(frozen=True)
class Version:
    view: str
    number: int
    created: datetime | None
    state: str  # active, pending (built by the stream, switched to when complete), older, superseded
    spec: ViewSpec

    @property
    def stored_name(self) -> str:
        return stored_name(self.view, self.number)


def history(store: Any, view: str) -> list[Version]:
    """Every version of a stream feature view, oldest first, with its state."""
    from freshet.features import _view_spec

    try:
        active = store.registry.get_stream_feature_view(view, store.project)
    except Exception as exc:  # noqa: BLE001 - Feast's not-found error names the view
        raise FeatureRepoError(f"no stream feature view {view!r} in the registry: {exc}") from None
    current, current_fp = active_number(active), fingerprint(active)
    records = store.list_feature_view_versions(view) or [{"version_number": current, "created_timestamp": None}]
    newest_pending = max((r["version_number"] for r in records if r["version_number"] > current), default=None)
    out = []
    for record in records:
        n = record["version_number"]
        fv = active if n == current else store.registry.get_feature_view_by_version(view, store.project, n)
        spec = _view_spec(fv)  # its version number is fv's (Feast sets it on every version it returns)
        if n == current:
            state = ACTIVE
        elif n == newest_pending and spec.fingerprint != current_fp:
            state = PENDING
        elif n > current:
            state = SUPERSEDED  # a newer pending version replaced it, or it computes what the active one does
        else:
            state = OLDER
        out.append(Version(view, n, record.get("created_timestamp"), state, spec))
    return out


def pending(store: Any, view: str) -> Version | None:
    return next((v for v in history(store, view) if v.state == PENDING), None)


def stream_registry(settings, store: Any = None) -> FeatureRegistry:
    """What a stream worker computes: each view's active version and its pending one, keyed by
    the name each is stored under (the views renamed so: the engine knows no other name)."""
    from freshet.features import feature_store

    store = store or feature_store(settings)
    registry = load_registry(settings, store)
    views: dict[str, ViewSpec] = {}
    versions: dict[str, tuple[str, int, str]] = {}
    for name, spec in registry.views.items():
        views[spec.stored_name] = replace(spec, name=spec.stored_name, version=0)
        versions[spec.stored_name] = (name, spec.version, ACTIVE)
    for name in registry.views:  # pending versions after every active one: a topic's first view keeps its marks
        version = pending(store, name)
        if version is not None:
            views[version.stored_name] = replace(version.spec, name=version.stored_name, version=0)
            versions[version.stored_name] = (name, version.number, PENDING)
    return FeatureRegistry(registry.project, views, registry.feature_services, versions)


def promote(store: Any, view: str, number: int) -> bool:
    """Make version `number` the active one (Feast's pin); False when it already is."""
    active = store.registry.get_stream_feature_view(view, store.project)
    if active_number(active) == number:
        return False
    active.version = f"v{number}"
    store.registry.apply_feature_view(active, store.project, commit=True)
    return True


def revert(store: Any, view: str, to: int) -> int | None:
    """Register version `to`'s definition again as the newest version, pending: built and switched
    to like any change. Returns its number, or None when the active version computes the same."""
    active = store.registry.get_stream_feature_view(view, store.project)
    old = store.registry.get_feature_view_by_version(view, store.project, to)
    if fingerprint(old) == fingerprint(active):
        return None
    old.version = "latest"
    store.registry.apply_feature_view(old, store.project, commit=True, no_promote=True)
    return max(r["version_number"] for r in store.list_feature_view_versions(view))


def diff(a: ViewSpec, b: ViewSpec) -> list[str]:
    """What changes from definition `a` to `b`, a line each ("+" added, "-" removed, "~" changed).

    >>> from freshet.features import AggregationSpec as A
    >>> v = ViewSpec("v", ("card_id",), ("STRING",), 0, "tx", "ts", {}, 30, (A("sum_amount_300s", "amount", "sum", 300, 60, "DOUBLE"),), "")
    >>> w = replace(v, lateness_s=60, aggregations=(A("sum_amount_600s", "amount", "sum", 600, 60, "DOUBLE"),))
    >>> print("\\n".join(diff(v, w)))
    - sum_amount_300s: sum of amount over 300s, sliding by 60s
    + sum_amount_600s: sum of amount over 600s, sliding by 60s
    ~ lateness: 30s -> 60s
    """
    def described(agg) -> str:
        return f"{agg.function} of {agg.column} over {agg.window_s}s, sliding by {agg.slide_s}s"

    before = {x.name: x for x in a.aggregations}
    after = {x.name: x for x in b.aggregations}
    lines = [f"- {n}: {described(before[n])}" for n in before if n not in after]
    lines += [f"+ {n}: {described(after[n])}" for n in after if n not in before]
    lines += [f"~ {n}: {described(before[n])} -> {described(after[n])}" for n in before
              if n in after and before[n] != after[n]]
    for label, attr, unit in (("join keys", "join_keys", ""), ("topic", "topic", ""),
                              ("event time", "timestamp_field", ""), ("lateness", "lateness_s", "s"),
                              ("source schema", "source_schema", ""), ("ttl", "ttl_s", "s")):
        x, y = getattr(a, attr), getattr(b, attr)
        if x != y:
            lines.append(f"~ {label}: {x}{unit} -> {y}{unit}")
    return lines


def built_key(group: str, stored: str) -> str:
    """The Redis set of the partitions of a version the stream workers of consumer group `group`
    (`freshet stream --app-id`) have built (stream/versions.py).

    >>> built_key("freshet-stream", "card_txn_stats_v1")
    'freshet:feature-versions:freshet-stream:card_txn_stats_v1:built'
    """
    return f"freshet:feature-versions:{group}:{stored}:built"
