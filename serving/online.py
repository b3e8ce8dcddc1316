"""Online feature reads straight from Feast's Redis layout, one pipelined round trip per request.

Owns the read plan (feature refs -> views, hash fields and TTLs, resolved once from the
Feast registry and again when it changes), the requests of the hot path (their connections
are resp.py's, a Redis Cluster's cluster.py's) and the result, where every value carries a status: PRESENT, NULL_VALUE, NOT_FOUND (the
entity has no row for that view) or OUTSIDE_MAX_AGE (older than the view's TTL).
"""

from __future__ import annotations

import logging
import math
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import hiredis

from freshet.redis_layout import OnlineLayout, ViewLayout, decode_value, timestamp_parts
from freshet.serving.cluster import ClusterReads
# the connections' names, also imported from here
from freshet.serving.resp import AsyncRespClient, RedisEndpoint, RedisUnavailable, RespConnection  # noqa: F401
from freshet.settings import Settings

log = logging.getLogger("freshet.serving.online")

PRESENT, NULL_VALUE, NOT_FOUND, OUTSIDE_MAX_AGE = "PRESENT", "NULL_VALUE", "NOT_FOUND", "OUTSIDE_MAX_AGE"
EPOCH_RFC3339 = "1970-01-01T00:00:00Z"
_unpack_double = struct.Struct("<d").unpack_from


class RequestError(ValueError):
    """A read request is malformed; `field` names the part of the request that is wrong."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class UnknownFeature(LookupError):
    """A feature view, feature or feature service the registry does not have."""

    def __init__(self, kind: str, name: str, hint: str = ""):
        super().__init__(f"unknown {kind} {name!r}" + (f"; {hint}" if hint else ""))
        self.kind = kind
        self.name = name


# ---------------------------------------------------------------------------
# registry -> read plans
# ---------------------------------------------------------------------------

@dataclass
class ServingRegistry:
    """What serving needs of the Feast registry: every online view and feature service."""

    project: str
    views: dict[str, ViewLayout]
    feature_services: dict[str, list[tuple[str, str, str]]]  # service -> (view, feature, output prefix)

    @classmethod
    def from_store(cls, store: Any) -> "ServingRegistry":
        """Every online view under its name (its active version) and each of its versions
        under `view@vN` (Feast's version-qualified references; freshet.feature_versions)."""
        views: dict[str, ViewLayout] = {}
        for fv in [*store.list_feature_views(), *store.list_stream_feature_views()]:
            if getattr(fv, "online", True):
                views[fv.name] = ViewLayout.from_feast(fv)
                views.update(_versions(store, fv))
        services = {}
        for svc in store.list_feature_services():
            services[svc.name] = [(p.name, f.name, p.name_to_use())
                                  for p in svc.feature_view_projections for f in p.features]
        return cls(store.project, views, services)


def _versions(store: Any, fv: Any) -> dict[str, ViewLayout]:
    current = int(getattr(fv, "current_version_number", None) or 0)
    out = {}
    for record in store.list_feature_view_versions(fv.name) or []:
        n = record["version_number"]
        version = fv if n == current else store.registry.get_feature_view_by_version(fv.name, store.project, n)
        out[f"{fv.name}@v{n}"] = ViewLayout.from_feast(version)
    return out


@dataclass
class _ViewRead:
    view: ViewLayout
    codec: Any
    features: list[str]
    out_index: list[int]  # output position of each feature
    head: bytes  # "*<n>\r\n$5\r\nHMGET\r\n"
    fields_resp: bytes  # the hash fields, RESP-packed, `_ts:<view>` last
    join_keys: tuple[str, ...]
    # DOUBLE features are 9 bytes each (tag + little-endian double), or empty for null: a row
    # where all of them are present is decoded by one struct call
    double_pos: list[int] = field(default_factory=list)  # reply positions of DOUBLE features
    double_out: list[int] = field(default_factory=list)  # their output positions
    double_struct: Any = None
    double_tags: bytes = b""
    other_pos: list[int] = field(default_factory=list)
    other_out: list[int] = field(default_factory=list)


@dataclass
class ReadPlan:
    """How to read one set of features: which hashes, which fields, where each value goes."""

    feature_names: list[str]  # output names, in request order
    refs: list[str]  # "view:feature", in request order
    views: list[_ViewRead]
    join_keys: list[str]  # every join key the views need
    feature_view: list[int] = field(default_factory=list)  # output position -> index into views


def _pack_bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def _rfc3339(parts: tuple[int, int] | None, _cache: dict = {}) -> str:  # noqa: B006 - a deliberate memo
    if not parts or parts == (0, 0):
        return EPOCH_RFC3339
    s = _cache.get(parts)
    if s is None:
        seconds, nanos = parts
        base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        if nanos == 0:
            s = base + "Z"
        elif nanos % 1_000_000 == 0:
            s = f"{base}.{nanos // 1_000_000:03d}Z"
        elif nanos % 1000 == 0:
            s = f"{base}.{nanos // 1000:06d}Z"
        else:
            s = f"{base}.{nanos:09d}Z"
        if len(_cache) > 50_000:
            _cache.clear()
        _cache[parts] = s
    return s


def _json_float(v: Any) -> Any:
    # NaN/Infinity are not JSON numbers: protobuf's JSON mapping (and Feast) use strings
    if type(v) is float and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    return v


@dataclass
class OnlineFeatures:
    """Feature values for a batch of entity rows, column-major like Feast's response.

    A status and event time belong to an entity row of a view (all its features were
    written together), so they are kept per view and row; `statuses` spreads them over
    features (a stored null reads NULL_VALUE).
    """

    entity_names: list[str]
    entity_values: list[list[Any]]
    feature_names: list[str]
    values: list[list[Any]]  # [feature][row]
    feature_view: list[int]  # [feature] -> index into view_names
    view_names: list[str]
    row_status: list[list[str]]  # [view][row]: PRESENT, NOT_FOUND or OUTSIDE_MAX_AGE
    row_parts: list[list[tuple[int, int] | None]]  # [view][row]: (seconds, nanos) written, or None
    nonfinite: list[bool] = field(default_factory=list)  # [view]: a NaN or infinity was read

    @property
    def rows(self) -> int:
        return len(self.values[0]) if self.values else (len(self.entity_values[0]) if self.entity_values else 0)

    def row(self, i: int) -> dict[str, Any]:
        return {name: col[i] for name, col in zip(self.feature_names, self.values)}

    @property
    def statuses(self) -> list[list[str]]:
        """[feature][row] statuses, as Feast lays them out."""
        out = []
        for vals, vi in zip(self.values, self.feature_view):
            sts = self.row_status[vi]
            out.append([NULL_VALUE if v is None and s is PRESENT else s for v, s in zip(vals, sts)]
                       if None in vals else list(sts))
        return out

    @property
    def view_ts(self) -> dict[str, list[float | None]]:
        """Per view, the event time (epoch seconds) of each row; None where there is no row."""
        return {name: [None if p is None else p[0] + p[1] / 1e9 for p in parts]
                for name, parts in zip(self.view_names, self.row_parts)}

    def to_feast_dict(self) -> dict[str, Any]:
        """The JSON body Feast's feature server returns for /get-online-features."""
        n = self.rows
        results = [{"values": vals, "statuses": [PRESENT] * n, "event_timestamps": [EPOCH_RFC3339] * n}
                   for vals in self.entity_values]
        stamps = [[_rfc3339(p) for p in parts] for parts in self.row_parts]
        row_status = self.row_status
        nonfinite = self.nonfinite
        for vals, vi in zip(self.values, self.feature_view):
            sts = row_status[vi]
            if None in vals:
                sts = [NULL_VALUE if v is None and st is PRESENT else st for v, st in zip(vals, sts)]
            if nonfinite and nonfinite[vi]:
                vals = [_json_float(v) for v in vals]
            results.append({"values": vals, "statuses": sts, "event_timestamps": stamps[vi]})
        return {"metadata": {"feature_names": [*self.entity_names, *self.feature_names]}, "results": results}


_KEY_TYPES = {"STRING": (str,), "INT64": (int,), "INT32": (int,), "UNIX_TIMESTAMP": (int,), "BYTES": (bytes,)}


class OnlineFeatureReader:
    """Reads feature vectors from Redis in Feast's layout, without Feast on the request path.

    Used against a running Redis (so not a doctest)::

        reader = OnlineFeatureReader(settings)
        plan = reader.plan(["card_txn_stats:sum_amount_300s"])
        reader.read(plan, {"card_id": ["c1", "c2"]}).row(0)   # {'sum_amount_300s': 42.5}

    `read` blocks (in-process use); `read_async` runs on the server's event loop. The
    registry is re-read when its file changes (checked at most every `refresh_s`).
    """

    def __init__(self, settings: Settings, store: Any = None, registry: ServingRegistry | None = None,
                 timeout: float = 1.0, refresh_s: float = 1.0):
        self.settings = settings
        self.endpoint = RedisEndpoint.from_url(settings.redis_url or "redis://127.0.0.1:6379/0")
        self.timeout = timeout
        self.refresh_s = refresh_s
        self._store = store
        self._registry_path = self._file_registry_path()
        self._mtime = self._registry_mtime()
        self._checked = time.monotonic()
        self._lock = threading.Lock()
        self._install(registry or ServingRegistry.from_store(self._feature_store()))
        self.sync = RespConnection(self.endpoint, timeout, settings.redis_poll_us / 1e6)
        self.aio = AsyncRespClient(self.endpoint, timeout)
        # FRESHET_REDIS_CLUSTER=on: keys split by the primary owning them; `aio` pings every primary
        self.cluster: ClusterReads | None = None
        if settings.redis_cluster == "on":
            self.cluster = ClusterReads(self.endpoint, timeout, settings.redis_poll_us / 1e6)
            self.aio = self.cluster

    # -- registry -----------------------------------------------------------

    def _feature_store(self):
        if self._store is None:
            from freshet.features import feature_store

            self._store = feature_store(self.settings)
        return self._store

    def _file_registry_path(self) -> Path | None:
        try:
            from freshet.features import repo_config

            reg = repo_config(self.settings).registry
            path = reg if isinstance(reg, str) else getattr(reg, "path", "")
            if path and "://" not in str(path):
                return Path(path)
        except Exception as exc:  # noqa: BLE001 - no file registry means: refresh on a timer
            log.debug("registry path unknown (%s); refreshing on a timer", exc)
        return None

    @property
    def watches_file(self) -> bool:
        """True when the registry is a local file, so a change is seen by its mtime."""
        return self._registry_path is not None

    def _registry_mtime(self) -> float:
        if self._registry_path is None:
            return 0.0
        try:
            return os.stat(self._registry_path).st_mtime_ns
        except OSError:
            return 0.0

    def _install(self, registry: ServingRegistry) -> None:
        self.registry = registry
        self.layout = OnlineLayout(registry.project, registry.views)
        self._plans: dict[tuple, ReadPlan] = {}
        self.generation = getattr(self, "generation", 0) + 1

    def refresh_if_changed(self, force: bool = False) -> bool:
        """Re-read the registry if its file changed (or on every call for non-file registries)."""
        mtime = self._registry_mtime()
        if not force and self._registry_path is not None and mtime == self._mtime:
            return False
        with self._lock:
            store = self._feature_store()
            store.refresh_registry()
            registry = ServingRegistry.from_store(store)
            self._mtime = mtime
            if registry == self.registry:
                return False
            self._install(registry)
        log.info("feature registry changed: %d views, %d feature services now served",
                 len(registry.views), len(registry.feature_services))
        return True

    def _maybe_refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked >= self.refresh_s:
            self._checked = now
            self.refresh_if_changed()

    # -- planning -----------------------------------------------------------

    def plan(self, features: Sequence[str] = (), feature_service: str | None = None,
             full_feature_names: bool = False) -> ReadPlan:
        """Resolve feature refs ("view:feature") or a feature service into a read plan (cached)."""
        cache_key = (tuple(features), feature_service, full_feature_names)
        plan = self._plans.get(cache_key)
        if plan is None:
            plan = self._make_plan(features, feature_service, full_feature_names)
            if len(self._plans) >= 1024:  # bounded: clients choose the feature lists
                self._plans.clear()
            self._plans[cache_key] = plan
        return plan

    def _make_plan(self, features, feature_service, full) -> ReadPlan:
        reg = self.registry
        triples: list[tuple[str, str, str]] = []
        if feature_service:
            if feature_service not in reg.feature_services:
                raise UnknownFeature("feature service", feature_service,
                                     f"known: {', '.join(sorted(reg.feature_services)) or 'none'}")
            triples = list(reg.feature_services[feature_service])
        else:
            if not features:
                raise RequestError("features", "give a list of 'view:feature' refs or a feature_service")
            for i, ref in enumerate(features):
                if not isinstance(ref, str) or ref.count(":") != 1 or ref.startswith(":") or ref.endswith(":"):
                    raise RequestError(f"features[{i}]", f"{ref!r} is not a 'feature_view:feature' reference")
                view, feat = ref.split(":")
                triples.append((view, feat, view))
        by_view: dict[str, _ViewRead] = {}
        names: list[str] = []
        refs: list[str] = []
        for view, feat, prefix in triples:
            layout = reg.views.get(view)
            if layout is None:
                raise UnknownFeature("feature view", view, "known: " + ", ".join(sorted(n for n in reg.views if "@" not in n))
                                     + "; a version of one: 'view@vN' ('freshet features history' lists them)")
            if feat not in layout.features:
                raise UnknownFeature("feature", f"{view}:{feat}")
            vr = by_view.get(view)
            if vr is None:
                vr = by_view[view] = _ViewRead(layout, self.layout._codec(view), [], [], b"", b"",
                                               layout.join_keys)
            vr.features.append(feat)
            vr.out_index.append(len(names))
            names.append(f"{prefix}__{feat}" if full else feat)
            refs.append(f"{view}:{feat}")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise RequestError("features", f"duplicate feature names {dupes}; set full_feature_names=true "
                                           "or request each once")
        feature_view = [0] * len(names)
        for vi, vr in enumerate(by_view.values()):
            fields = self.layout.read_fields(vr.view.name, vr.features)
            vr.head = b"*%d\r\n$5\r\nHMGET\r\n" % (len(fields) + 2)
            vr.fields_resp = b"".join(_pack_bulk(f) for f in fields)
            for k, (feat, o) in enumerate(zip(vr.features, vr.out_index)):
                feature_view[o] = vi
                if vr.view.features[feat] == "DOUBLE":
                    vr.double_pos.append(k)
                    vr.double_out.append(o)
                else:
                    vr.other_pos.append(k)
                    vr.other_out.append(o)
            vr.double_struct = struct.Struct("<" + "xd" * len(vr.double_pos))
            vr.double_tags = b"\x29" * len(vr.double_pos)
        join_keys = list(dict.fromkeys(k for vr in by_view.values() for k in vr.join_keys))
        return ReadPlan(names, refs, list(by_view.values()), join_keys, feature_view)

    # -- reading ------------------------------------------------------------

    def _check_entities(self, plan: ReadPlan, entities: Mapping[str, Any]) -> int:
        if not isinstance(entities, dict) or not entities:
            raise RequestError("entities", "must be an object mapping each join key to a list of values")
        n = None
        for name, col in entities.items():
            if not isinstance(col, list):
                raise RequestError(f"entities.{name}", "must be a list of values")
            if n is None:
                n = len(col)
            elif len(col) != n:
                raise RequestError(f"entities.{name}", f"has {len(col)} values but other join keys have {n}")
        for vr in plan.views:
            for key, kind in zip(vr.view.join_keys, vr.view.join_key_types):
                col = entities.get(key)
                if col is None:
                    raise RequestError(f"entities.{key}", f"missing; feature view {vr.view.name!r} is keyed by "
                                                          f"{list(vr.view.join_keys)}")
                allowed = _KEY_TYPES.get(kind, (object,))
                for i, v in enumerate(col):
                    if not isinstance(v, allowed) or isinstance(v, bool):
                        raise RequestError(f"entities.{key}[{i}]", f"{v!r} is not a {kind.lower()}")
        return n or 0

    def _pack(self, plan: ReadPlan, entities: Mapping[str, list], n_rows: int) -> tuple[bytes, int, list]:
        """One Redis's read: every key's HMGET in one blob; (blob, number of keys, slots)."""
        keys, commands, slots = self._commands(plan, entities, n_rows)
        return b"".join(commands), len(keys), slots

    def _commands(self, plan: ReadPlan, entities: Mapping[str, list], n_rows: int) -> tuple[list, list, list]:
        """(keys, one packed HMGET per key, slots), each key once; `slots[v][r]` is row r's key index in view v."""
        keys: list[bytes] = []
        commands: list[bytes] = []
        slots: list[list[int]] = []
        for vr in plan.views:
            cols = [entities[k] for k in vr.join_keys]
            seen: dict[bytes, int] = {}
            row_slots = []
            key_of = vr.codec.key
            for r in range(n_rows):
                key = key_of([c[r] for c in cols])
                j = seen.get(key)
                if j is None:
                    j = seen[key] = len(keys)
                    keys.append(key)
                    commands.append(b"".join((vr.head, b"$%d\r\n" % len(key), key, b"\r\n", vr.fields_resp)))
                row_slots.append(j)
            slots.append(row_slots)
        return keys, commands, slots

    def _decode(self, plan: ReadPlan, entities: Mapping[str, list], n_rows: int, replies: list,
                slots: list) -> OnlineFeatures:
        values: list[list] = [[None] * n_rows for _ in plan.feature_names]
        row_status, row_parts, nonfinite = [], [], []
        now = time.time()
        for vr, row_slots in zip(plan.views, slots):
            nf = len(vr.features)
            ttl = vr.view.ttl_s
            out_index = vr.out_index
            statuses = [NOT_FOUND] * n_rows
            parts_of = [None] * n_rows
            total = 0.0
            for r, j in enumerate(row_slots):
                reply = replies[j]
                if isinstance(reply, hiredis.ReplyError):
                    raise RedisUnavailable(f"Redis at {self.cluster or self.endpoint} replied with an error: {reply}")
                parts = timestamp_parts(reply[nf])
                if parts is None:
                    continue  # no row for this entity in this view: NOT_FOUND
                parts_of[r] = parts
                statuses[r] = OUTSIDE_MAX_AGE if ttl and now - parts[0] - parts[1] / 1e9 > ttl else PRESENT
                doubles = None
                if vr.double_pos:
                    try:
                        raw = b"".join([reply[k] for k in vr.double_pos])
                    except TypeError:  # a field is absent (None)
                        raw = b""
                    # a DOUBLE value is 9 bytes or (null) 0: the total says all are present
                    if len(raw) == 9 * len(vr.double_pos) and raw[::9] == vr.double_tags:
                        doubles = vr.double_struct.unpack(raw)
                        total += sum(doubles)  # NaN or infinity anywhere makes the sum non-finite
                        for o, v in zip(vr.double_out, doubles):
                            values[o][r] = v
                pos, outs = (vr.other_pos, vr.other_out) if doubles is not None else (range(nf), out_index)
                for k, o in zip(pos, outs):
                    b = reply[k]
                    if b and len(b) == 2 and b[0] == 0x20:  # a small INT64
                        v = b[1]
                    else:
                        v = decode_value(b)
                        if type(v) is float:
                            total += v
                    values[o][r] = v
            row_status.append(statuses)
            row_parts.append(parts_of)
            nonfinite.append(not math.isfinite(total))
        names = list(entities)
        return OnlineFeatures(names, [entities[k] for k in names], plan.feature_names, values, plan.feature_view,
                              [vr.view.name for vr in plan.views], row_status, row_parts, nonfinite)

    def read(self, plan: ReadPlan, entities: Mapping[str, Any]) -> OnlineFeatures:
        """Read every entity row of `plan` in one round trip (blocking)."""
        self._maybe_refresh()
        n = self._check_entities(plan, entities)
        if self.cluster is not None:
            keys, commands, slots = self._commands(plan, entities, n)
            replies = self.cluster.execute(keys, commands) if keys else []
            return self._decode(plan, entities, n, replies, slots)
        blob, count, slots = self._pack(plan, entities, n)
        replies = self.sync.execute(blob, count) if count else []
        return self._decode(plan, entities, n, replies, slots)

    async def read_async(self, plan: ReadPlan, entities: Mapping[str, Any]) -> OnlineFeatures:
        """Read every entity row of `plan` in one round trip on the running event loop."""
        n = self._check_entities(plan, entities)
        if self.cluster is not None:
            keys, commands, slots = self._commands(plan, entities, n)
            replies = await self.cluster.execute_async(keys, commands) if keys else []
            return self._decode(plan, entities, n, replies, slots)
        blob, count, slots = self._pack(plan, entities, n)
        replies = await self.aio.execute(blob, count) if count else []
        return self._decode(plan, entities, n, replies, slots)

    def get_online_features(self, features: Sequence[str] = (), entity_rows: Sequence[Mapping] = (),
                            feature_service: str | None = None, full_feature_names: bool = False) -> OnlineFeatures:
        """Convenience with FeatureStore.get_online_features' argument shape (rows of dicts)."""
        plan = self.plan(features, feature_service, full_feature_names)
        entities: dict[str, list] = {}
        for row in entity_rows:
            for k, v in row.items():
                entities.setdefault(k, []).append(v)
        return self.read(plan, entities)

    def close(self) -> None:
        self.sync.close()
        if self.cluster is not None:
            self.cluster.close_sync()
