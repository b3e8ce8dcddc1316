"""The Feast registry as freshet reads it: stream feature views turned into plain specs.

`feature_repo/` is the only place features are declared; every stage (stream,
backfill, serving, monitor) gets names, types, windows and sources from here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from freshet.settings import Settings
from freshet.endpoints import feast_connection_string
from freshet.redis_layout import stored_name  # a version's names, online and offline

log = logging.getLogger("freshet.features")

FUNCTIONS = ("count", "sum", "mean", "min", "max", "last", "count_distinct")

# Spark DDL types (as in Feast's JsonFormat) -> the python types freshet accepts.
DDL_TYPES = {
    "string": "string", "varchar": "string",
    "int": "int", "integer": "int", "bigint": "int", "long": "int", "smallint": "int",
    "double": "float", "float": "float", "decimal": "float",
    "boolean": "bool", "bool": "bool",
    "timestamp": "timestamp",
}


class FeatureRepoError(ValueError):
    """The feature repo or registry cannot be used; the message names the object and the fix."""


@dataclass(frozen=True)
class AggregationSpec:
    name: str  # output feature name (Feast's resolved_name)
    column: str
    function: str
    window_s: int
    slide_s: int
    dtype: str  # Feast value type name: INT64, DOUBLE, STRING


@dataclass(frozen=True)
class ViewSpec:
    name: str
    join_keys: tuple[str, ...]
    join_key_types: tuple[str, ...]  # Feast ValueType names
    ttl_s: int
    topic: str
    timestamp_field: str
    source_schema: dict[str, str]  # column -> string/int/float/bool/timestamp
    lateness_s: int
    aggregations: tuple[AggregationSpec, ...]
    offline_path: str
    online: bool = True
    message_key: str = ""  # the event field producers key messages by (KafkaSource tag)
    version: int = 0  # the Feast version number of this definition (freshet.feature_versions)
    fingerprint: str = ""  # what the definition computes, hashed (`fingerprint` below)

    @property
    def stored_name(self) -> str:
        """The name the version's rows are stored under: the view's for v0, `<view>_v<N>` after
        (Feast's online naming with versioning on, so Feast reads the same Redis fields)."""
        return stored_name(self.name, self.version)

    @property
    def keyed_by_message(self) -> bool:
        """True when events arrive in the partition that owns their entity: no repartition."""
        return self.join_keys == (self.message_key,)

    @property
    def feature_names(self) -> list[str]:
        return [a.name for a in self.aggregations]

    @property
    def tile_s(self) -> int:
        """Tile width: the gcd of every window and slide, so each window is whole tiles."""
        from math import gcd

        g = 0
        for a in self.aggregations:
            g = gcd(gcd(g, a.window_s), a.slide_s)
        return g

    @property
    def max_window_s(self) -> int:
        return max(a.window_s for a in self.aggregations)


@dataclass
class FeatureRegistry:
    project: str
    views: dict[str, ViewSpec]
    feature_services: dict[str, list[str]] = field(default_factory=dict)  # service -> "view:feature"
    # the stream's registry only (feature_versions.stream_registry): stored name -> (view, version,
    # "active" or "pending"), for the views keyed by stored name there
    versions: dict[str, tuple[str, int, str]] = field(default_factory=dict)

    def views_by_topic(self) -> dict[str, list[ViewSpec]]:
        out: dict[str, list[ViewSpec]] = {}
        for v in self.views.values():
            out.setdefault(v.topic, []).append(v)
        return out


def feast_env(settings: Settings) -> dict[str, str]:
    """The env vars feature_store.yaml and definitions.py read."""
    return {
        "FRESHET_DATA_DIR": str(settings.data_path),
        "FRESHET_FEAST_REDIS": feast_connection_string(settings.redis_url or "redis://localhost:6379"),
        "FRESHET_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers or "localhost:9092",
        # the feature views' batch sources (their feature logs) live here: freshet.offline_store
        "FRESHET_OFFLINE_STORE": offline_root(settings),
    }


def offline_root(settings: Settings) -> str:
    """The offline store's root as a path or s3:// URI (without reaching it)."""
    if settings.offline_store.startswith("s3://"):
        return settings.offline_store.rstrip("/")
    return str(Path(settings.offline_store).expanduser().resolve() if settings.offline_store
               else settings.data_path / "offline")


def repo_path(settings: Settings) -> Path:
    path = Path(settings.feature_repo).expanduser().resolve()
    if not (path / "feature_store.yaml").is_file():
        raise FeatureRepoError(
            f"no feature_store.yaml in {path}; set FRESHET_FEATURE_REPO to the Feast repo directory"
        )
    return path


def repo_config(settings: Settings):
    """Feast's RepoConfig for this deployment, endpoints substituted from settings."""
    from feast.repo_config import RepoConfig

    path = repo_path(settings)
    env = feast_env(settings)
    text = (path / "feature_store.yaml").read_text()
    text = re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), os.environ.get(m.group(1), m.group(0))), text)
    raw = _online_store(yaml.safe_load(text), settings)
    if settings.feast_registry:
        raw["registry"] = {**SQL_REGISTRY, "path": sqlalchemy_url(settings.feast_registry)}
    return RepoConfig(repo_path=path, **raw)


def _online_store(raw: dict, settings: Settings) -> dict:
    """feature_store.yaml's online store as this deployment needs it: Feast's Redis Cluster client
    (`redis_type: redis_cluster`, seeded from the one address) with FRESHET_REDIS_CLUSTER=on."""
    if settings.redis_cluster == "on":
        raw["online_store"] = {**(raw.get("online_store") or {"type": "redis"}), "redis_type": "redis_cluster"}
    return raw


# Feast's SQL registry (FRESHET_FEAST_REGISTRY), in place of feature_store.yaml's registry file
SQL_REGISTRY = {"registry_type": "sql", "cache_ttl_seconds": 60, "enable_online_feature_view_versioning": True,
                "sqlalchemy_config_kwargs": {"echo": False, "pool_pre_ping": True}}


def sqlalchemy_url(url: str) -> str:
    """A postgresql:// URL with psycopg 3 named as its driver (what SQLAlchemy 2.1 and Feast pick
    anyway; Feast warns unless it is explicit).

    >>> sqlalchemy_url("postgresql://u:p@db:5432/feast"), sqlalchemy_url("postgresql+psycopg2://db/f")
    ('postgresql+psycopg://u:p@db:5432/feast', 'postgresql+psycopg2://db/f')
    """
    return "postgresql+psycopg://" + url[len("postgresql://"):] if url.startswith("postgresql://") else url


def _repo_for_sql_registry(repo: Path, into: Path, settings: Settings | None = None) -> Path:
    """A copy of the feature repo whose feature_store.yaml names this deployment: the SQL registry
    (its URL from the env var FRESHET_FEAST_REGISTRY, which Feast substitutes: no password in the
    file) when one is set, and a Redis Cluster online store with FRESHET_REDIS_CLUSTER=on."""
    import shutil

    shutil.copytree(repo, into, ignore=shutil.ignore_patterns("__pycache__", "data", ".*"))
    raw = yaml.safe_load((repo / "feature_store.yaml").read_text())
    if settings is None or settings.feast_registry:
        raw["registry"] = {**SQL_REGISTRY, "path": "${FRESHET_FEAST_REGISTRY}"}
    if settings is not None:
        raw = _online_store(raw, settings)
    (into / "feature_store.yaml").write_text(yaml.safe_dump(raw))
    return into


def feature_store(settings: Settings):
    from feast import FeatureStore

    settings.data_path.mkdir(parents=True, exist_ok=True)
    return FeatureStore(config=repo_config(settings), repo_path=str(repo_path(settings)))


def apply(settings: Settings, extra_env: dict[str, str] | None = None) -> None:
    """`feast apply` the repo against this deployment (a subprocess, so definitions see fresh env).

    A view whose definition changed becomes a new version, pending until the stream has built
    it (freshet.feature_versions); unchanged views stay as registered."""
    import tempfile

    settings.data_path.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **feast_env(settings), **(extra_env or {})}
    with tempfile.TemporaryDirectory(prefix="freshet-repo-") as tmp:
        repo = repo_path(settings)
        if settings.feast_registry or settings.redis_cluster == "on":
            repo = _repo_for_sql_registry(repo, Path(tmp) / repo.name, settings)
        if settings.feast_registry:
            env["FRESHET_FEAST_REGISTRY"] = sqlalchemy_url(settings.feast_registry)
        # `feast apply --no-promote` that leaves unchanged views be (freshet.feature_apply)
        proc = subprocess.run([sys.executable, "-m", "freshet.feature_apply", str(repo)], env=env,
                              capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise FeatureRepoError(f"feast apply failed:\n{proc.stderr.strip()[-2000:]}")
    log.info("feast apply: %s", proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "ok")


def load_registry(settings: Settings, store=None) -> FeatureRegistry:
    """Read every stream feature view from the Feast registry and check freshet can run it."""
    store = store or feature_store(settings)
    views = {}
    for sfv in store.list_stream_feature_views():
        views[sfv.name] = _view_spec(sfv)
    if not views:
        raise FeatureRepoError(
            "the Feast registry has no stream feature views; run 'freshet apply' "
            f"(or 'feast -c {settings.feature_repo} apply') first"
        )
    services = {}
    for svc in store.list_feature_services():
        services[svc.name] = [
            f"{proj.name}:{f.name}" for proj in svc.feature_view_projections for f in proj.features
        ]
    return FeatureRegistry(store.project, views, services)


def parse_ddl(ddl: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in ddl.split(","))):
        name, _, kind = part.partition(" ")
        kind = kind.strip().lower()
        if kind not in DDL_TYPES:
            raise FeatureRepoError(f"column {name!r} has type {kind!r}; supported: {sorted(DDL_TYPES)}")
        out[name] = DDL_TYPES[kind]
    return out


def _seconds(td: timedelta | None) -> int:
    return int(td.total_seconds()) if td else 0


def _view_spec(sfv: Any) -> ViewSpec:
    src = sfv.stream_source
    opts = getattr(src, "kafka_options", None)
    if opts is None:
        raise FeatureRepoError(f"stream feature view {sfv.name!r}: source {src.name!r} is not a KafkaSource")
    schema = parse_ddl(opts.message_format.schema_json)
    ts_field = src.timestamp_field
    if schema.get(ts_field) not in ("timestamp", "int", "float"):
        raise FeatureRepoError(f"view {sfv.name!r}: timestamp field {ts_field!r} is not in the source schema")
    dtypes = {f.name: str(f.dtype.to_value_type().name) for f in sfv.features}
    join_keys = tuple(sfv.entities and [c.name for c in sfv.entity_columns] or [])
    if not join_keys:
        raise FeatureRepoError(f"view {sfv.name!r} has no entities")
    key_types = tuple(str(c.dtype.to_value_type().name) for c in sfv.entity_columns)
    for k in join_keys:
        if k not in schema:
            raise FeatureRepoError(f"view {sfv.name!r}: join key {k!r} is not a field of topic {opts.topic!r}")
    aggs = []
    for a in sfv.aggregations:
        name = a.resolved_name(a.time_window)
        if a.function not in FUNCTIONS:
            raise FeatureRepoError(f"view {sfv.name!r}: aggregation {name!r} uses function {a.function!r}; "
                                   f"supported: {', '.join(FUNCTIONS)}")
        if a.column not in schema:
            raise FeatureRepoError(f"view {sfv.name!r}: aggregation {name!r} reads column {a.column!r}, "
                                   f"which the source schema lacks")
        if name not in dtypes:
            raise FeatureRepoError(f"view {sfv.name!r}: aggregation {name!r} has no Field in the schema; "
                                   f"add Field(name={name!r}, dtype=...)")
        window_s, slide_s = _seconds(a.time_window), _seconds(a.slide_interval) or _seconds(a.time_window)
        if window_s <= 0 or window_s % slide_s:
            raise FeatureRepoError(f"view {sfv.name!r}: aggregation {name!r} needs a time_window that is a "
                                   f"whole multiple of its slide_interval")
        aggs.append(AggregationSpec(name, a.column, a.function, window_s, slide_s, dtypes[name]))
    if not aggs:
        raise FeatureRepoError(f"view {sfv.name!r} declares no aggregations")
    batch = src.batch_source
    version = int(getattr(sfv, "current_version_number", None) or 0)
    offline_path = getattr(batch, "path", "") if batch else ""
    return ViewSpec(
        name=sfv.name, join_keys=join_keys, join_key_types=key_types, ttl_s=_seconds(sfv.ttl),
        topic=opts.topic, timestamp_field=ts_field, source_schema=schema,
        lateness_s=_seconds(opts.watermark_delay_threshold), aggregations=tuple(aggs),
        # each version its own feature log: their columns differ
        offline_path=stored_name(offline_path, version) if offline_path else offline_path,
        online=sfv.online, message_key=(src.tags or {}).get("freshet.message_key", ""),
        version=version, fingerprint=fingerprint(sfv),
    )


def fingerprint(fv: Any) -> str:
    """What a stream feature view computes, hashed: its aggregations, features, entities and
    source (topic, schema, event time, lateness). Metadata (description, tags, owner), the TTL,
    the online/offline flags and the batch source do not count: changing them needs no rebuild.

    The same for a view as defined in feature_repo/ and as read back from the registry (where
    Feast moves the join key among the features)."""
    src = fv.stream_source
    opts = getattr(src, "kafka_options", None)
    fields = {(f.name, str(f.dtype)) for f in [*fv.features, *fv.entity_columns]}
    described = {
        "aggregations": sorted((a.column, a.function, _seconds(a.time_window), _seconds(a.slide_interval))
                               for a in fv.aggregations),
        "fields": sorted(fields),
        "entities": sorted(fv.entities),
        "timestamp_field": fv.timestamp_field,
        "topic": getattr(opts, "topic", None),
        "schema": getattr(getattr(opts, "message_format", None), "schema_json", None),
        "source_timestamp": getattr(src, "timestamp_field", None),
        "lateness": _seconds(getattr(opts, "watermark_delay_threshold", None)),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:12]
