"""Settings for every freshet process, read once at start-up.

Values come from `FRESHET_*` environment variables, then an optional TOML file
(`FRESHET_CONFIG`), then defaults. Anything unknown or invalid fails fast with one
line naming the setting and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

PREFIX = "FRESHET_"
# Read by feature_repo/ (feature_store.yaml, definitions.py) or the test harness,
# not by this object; freshet sets the Feast ones itself from the settings below.
PASSTHROUGH = {"FRESHET_CONFIG", "FRESHET_FEAST_REDIS", "FRESHET_TRANSACTIONS_TOPIC", "FRESHET_TESTCONTAINERS"}


# The example model and the feature service it reads (feature_repo/): the defaults of
# FRESHET_MODEL_NAME and of every --feature-service option.
DEFAULT_MODEL_NAME = "fraud"
DEFAULT_FEATURE_SERVICE = "fraud_model_v1"


class SettingsError(ValueError):
    """A setting is unknown or has a value freshet cannot use."""


def _secret(default: str = "") -> Any:
    return field(default=default, repr=False, metadata={"secret": True})


def _with_password(default: str = "") -> Any:
    """A URL that may carry a password (`postgresql://user:password@host/db`): shown without it."""
    return field(default=default, repr=False, metadata={"secret": "password"})


def without_password(url: str) -> str:
    """
    >>> without_password("postgresql://mlflow:s3cret@db:5432/mlflow")
    'postgresql://mlflow:***@db:5432/mlflow'
    >>> without_password("sqlite:///data/mlflow.db")
    'sqlite:///data/mlflow.db'
    """
    parts = urlparse(url)
    if not parts.password:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


@dataclass(frozen=True)
class Settings:
    """Every knob freshet has; the env var is `FRESHET_` + the upper-cased name."""

    # Kafka. Empty bootstrap servers mean "use the embedded broker".
    kafka_bootstrap_servers: str = ""
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str = ""
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = _secret()
    kafka_ssl_cafile: str = ""
    # Tansu holds a JoinGroup for session_timeout/2: keep this short (docs/architecture.md).
    kafka_session_timeout_ms: int = 8000
    # Faust's hard-coded 1.5 s fetch wait would cost seconds of freshness.
    kafka_fetch_max_wait_ms: int = 20
    kafka_partitions: int = 4
    # Copies of every topic freshet creates (its own, the stream's changelogs and repartition
    # topics), and how many of them must acknowledge a write (acks=all). One broker: 1 and 1;
    # three brokers: 3 and 2, so one broker may be down without refusing writes or losing any.
    kafka_replication_factor: int = 1
    kafka_min_insync_replicas: int = 1
    # Idempotent producers (a retried send is written once). "auto": on for librdkafka's
    # producers (they work against every broker, the embedded Tansu included) and for the
    # stream's aiokafka producer where the broker grants it a producer id (Tansu does not: the
    # stream worker probes once at start and logs it); "on" insists (a broker that refuses
    # fails the start), "off" never asks.
    kafka_idempotence: str = "auto"
    # How often a stream worker commits offsets, checkpointing each entity it changed to
    # its table's changelog first. Features reach Redis per micro-batch regardless; a
    # longer interval means fewer changelog records and larger Parquet parts, but a
    # longer pause per commit (freshness p99 at 5,000 events/s: 330 ms at 1 s, 610 ms at
    # 5 s; bench/stream.py) and a longer replay after a crash.
    stream_commit_interval_ms: int = 1000
    # How far ahead of the wall clock an event's time may be. Further ahead it goes to the
    # dead-letter topic instead of becoming its partition's watermark (which would make the
    # partition's on-time events "late"). Producers whose simulated clock runs ahead of the
    # wall clock (`freshet produce --time-scale` from now) need it raised, or start in the past.
    stream_max_future_s: int = 300
    # Larger source messages go to the dead-letter topic unparsed (the broker takes ~1 MB).
    stream_max_event_bytes: int = 100_000
    # Test hook for the chaos tests, never for production: "<point>:<n>" makes a stream
    # worker SIGKILL itself the n-th time it passes that point (freshet.stream.crashpoints).
    stream_test_crash_at: str = ""
    # How far the stream's clock (the "now" rows are evaluated as of: the newest event time,
    # kept going by the wall clock while idle) may run ahead of the wall clock. 0: never, so
    # one event dated minutes ahead cannot age every other entity's windows early. A
    # simulated clock running ahead of the wall clock (with FRESHET_STREAM_MAX_FUTURE_S) raises it.
    stream_clock_ahead_s: int = 0
    # How often a stream worker writes each of its table partitions to a snapshot file in the
    # data dir (after a commit, in a thread), so a restarted worker replays its changelogs only
    # from the newest snapshot instead of from their start: the embedded broker cannot trim
    # them, and its every fetch costs time in proportion to what a partition holds (a worker
    # restarted late in a long run spent minutes recovering). 0 (the default): off, full replays.
    # Off by default and experimental: bench/chaos.py --seed 2 --fetch-wait-ms 200 lost events
    # with it on (every 30 s), through a fetch-order race since fixed but not re-run (README,
    # "Table snapshots"); a worker warns at start.
    stream_snapshot_interval_s: int = 0
    # Port of a stream worker's Prometheus metrics (lag per partition, events, dead letters,
    # freshness) at FRESHET_HTTP_HOST; 0: off.
    stream_metrics_port: int = 0

    # Redis. Empty means "use the embedded server".
    redis_url: str = _secret()
    # In-process reads (OnlineFeatureReader.read) poll for Redis's reply this long before
    # the thread sleeps: a sleeping thread's wake-up costs more than a local Redis's answer
    # (read p50 71 -> 41-47 us here). Raise it for a remote Redis, 0 to never poll.
    redis_poll_us: int = 100
    # "on": FRESHET_REDIS_URL is one node of a Redis Cluster (any primary); every component then
    # talks to the cluster (slots -> nodes, MOVED/ASK followed) and Feast's online store is
    # configured with `redis_type: redis_cluster`. Needs an explicit URL (the embedded stack is one
    # Redis) on db 0 (a cluster has no other). "off": one Redis (with replicas behind the address).
    redis_cluster: str = "off"

    data_dir: str = "data"
    # Where the offline logs (raw events, feature rows, labels, served predictions) live: empty for
    # <data dir>/offline on this host; another directory; or s3://bucket/prefix on an S3-compatible
    # object store that workers on several hosts share (reached with the FRESHET_S3_* settings;
    # without keys, pyarrow's AWS chain: AWS_* env vars, ~/.aws). Checked at start-up.
    offline_store: str = ""
    s3_endpoint_url: str = ""  # http(s)://host:port of an S3-compatible server; empty: AWS S3
    s3_region: str = ""  # empty: us-east-1
    s3_access_key_id: str = ""
    s3_secret_access_key: str = _secret()
    s3_secret_access_key_file: str = ""  # instead of the key itself: a file only its owner may read (0600)
    feature_repo: str = "feature_repo"
    mlflow_tracking_uri: str = _with_password()
    # Where MLflow keeps the model versions' artifacts: empty for <data dir>/mlartifacts; or
    # s3://bucket/prefix on the object store the FRESHET_S3_* settings reach, so that retrainers and
    # servers on other hosts share them (with a database FRESHET_MLFLOW_TRACKING_URI, e.g. PostgreSQL).
    mlflow_artifact_store: str = ""
    # Feast's registry: empty for the file <data dir>/registry.db; or postgresql://user:password@host:port/db
    # for Feast's SQL registry, which every host reads (apply once, from any host).
    feast_registry: str = _secret()
    # the registered model `freshet serve` answers /predict with (its champion alias)
    model_name: str = DEFAULT_MODEL_NAME

    topic_deadletter: str = "freshet.deadletter"
    topic_predictions: str = "freshet.predictions"
    topic_labels: str = "freshet.labels"
    topic_drift: str = "freshet.drift"
    topic_retrain: str = "freshet.retrain"
    topic_models: str = "freshet.models"

    http_host: str = "127.0.0.1"
    http_port: int = 8000
    # bearer tokens by scope: api_token is the admin's (every scope); empty -> generated into the data dir
    api_token: str = _secret()
    api_token_predict: str = _secret()
    api_token_features: str = _secret()
    max_body_bytes: int = 1_000_000
    # rows (entity rows, /predict instances) and features one request may ask for: 413 above
    max_rows_per_request: int = 1000
    max_features_per_request: int = 500
    # HTTPS for the HTTP API: both set, or neither (plain HTTP)
    http_tls_certfile: str = ""
    http_tls_keyfile: str = ""

    log_level: str = "INFO"

    # Training sets: features recomputed as serving answered each request ("recomputed": every
    # label, reproducible from the raw log) or the values logged with it ("served").
    training_features: str = "recomputed"
    # Consistency check (`freshet consistency`): the share of served predictions it recomputes,
    # the rate per feature below which it raises a data_quality alert, and how long an event
    # may take from acceptance to Redis (the freshness bound it allows for).
    consistency_sample: float = 0.1
    consistency_min_rate: float = 0.99
    consistency_grace_ms: int = 2000
    # Automatic rollback (`freshet monitor`): a newly promoted champion whose labelled error rate is
    # worse than its predecessor's by a one-sided two-proportion test at rollback_alpha (split over
    # rollback_looks looks, at rollback_min_outcomes, twice, four times ... as many outcomes), and by
    # at least rollback_min_difference, is rolled back to it. "off": only reported.
    rollback_auto: str = "on"
    rollback_alpha: float = 0.01
    rollback_min_outcomes: int = 200
    rollback_looks: int = 4
    rollback_min_difference: float = 0.0
    # Test hook for the crash tests, never for production: "<point>:<n>" makes `freshet monitor`
    # SIGKILL itself the n-th time it passes that point (freshet.monitor.service.CRASH_POINTS).
    monitor_test_crash_at: str = ""
    # The consumer group whose offsets and lag the dashboard (/ui) shows: `freshet stream --app-id`.
    dashboard_stream_group: str = "freshet-stream"

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser().resolve()

    @property
    def mlflow_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.data_path / 'mlflow.db'}"

    def kafka_client_config(self) -> dict[str, str]:
        """librdkafka (confluent-kafka) client options, security passed through."""
        conf = {
            "bootstrap.servers": self.kafka_bootstrap_servers,
            "security.protocol": self.kafka_security_protocol,
        }
        if self.kafka_sasl_mechanism:
            conf["sasl.mechanism"] = self.kafka_sasl_mechanism
            conf["sasl.username"] = self.kafka_sasl_username
            conf["sasl.password"] = self.kafka_sasl_password
        if self.kafka_ssl_cafile:
            conf["ssl.ca.location"] = self.kafka_ssl_cafile
        return conf

    def with_endpoints(self, kafka: str, redis_url: str) -> "Settings":
        return dataclasses.replace(self, kafka_bootstrap_servers=kafka, redis_url=redis_url)

    def to_env(self) -> dict[str, str]:
        """FRESHET_* variables that make a child process load these same settings."""
        env = {_env_name(f.name): str(getattr(self, f.name)) for f in dataclasses.fields(self)
               if getattr(self, f.name) != f.default}
        env[_env_name("data_dir")] = str(self.data_path)
        if self.offline_store and "://" not in self.offline_store:
            env[_env_name("offline_store")] = str(Path(self.offline_store).expanduser().resolve())
        return env

    def public_view(self) -> dict[str, Any]:
        """The settings with secrets masked, for logs and `freshet config`."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            secret = f.metadata.get("secret")
            if secret == "password" and value:
                value = without_password(value)
            elif secret and value:
                value = "***"
            out[f.name] = value
        return out


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_CHOICES = {
    "kafka_security_protocol": {"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"},
    "kafka_sasl_mechanism": {"", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"},
    "log_level": {"DEBUG", "INFO", "WARNING", "ERROR"},
    "training_features": {"recomputed", "served"},
    "kafka_idempotence": {"auto", "on", "off"},
    "rollback_auto": {"on", "off"},
    "redis_cluster": {"on", "off"},
}
_POSITIVE = {"kafka_session_timeout_ms", "kafka_partitions", "max_body_bytes", "stream_commit_interval_ms",
             "stream_max_future_s", "stream_max_event_bytes", "max_rows_per_request", "max_features_per_request",
             "kafka_replication_factor", "kafka_min_insync_replicas"}


def _env_name(name: str) -> str:
    return PREFIX + name.upper()


def _validate(s: Settings) -> None:
    for name, allowed in _CHOICES.items():
        if getattr(s, name) not in allowed:
            raise SettingsError(
                f"{_env_name(name)}={getattr(s, name)!r} is not allowed; use one of {sorted(allowed)}"
            )
    for name in _POSITIVE:
        if getattr(s, name) <= 0:
            raise SettingsError(f"{_env_name(name)} must be a positive integer, got {getattr(s, name)}")
    if not 0 <= s.kafka_fetch_max_wait_ms <= 5000:
        raise SettingsError(
            f"{_env_name('kafka_fetch_max_wait_ms')}={s.kafka_fetch_max_wait_ms} must be 0..5000 "
            "(about 10-50 ms keeps features fresh)"
        )
    if s.stream_max_future_s > 10 * 366 * 86400:
        raise SettingsError(f"{_env_name('stream_max_future_s')}={s.stream_max_future_s} must be at most ten years "
                            "in seconds (a few minutes suits live producers)")
    if not 0 <= s.stream_clock_ahead_s <= 10 * 366 * 86400:
        raise SettingsError(f"{_env_name('stream_clock_ahead_s')}={s.stream_clock_ahead_s} must be 0..ten years "
                            "in seconds (0: the stream's clock never runs ahead of the wall clock)")
    if s.stream_max_event_bytes > 1_000_000:
        raise SettingsError(f"{_env_name('stream_max_event_bytes')}={s.stream_max_event_bytes} must be at most "
                            "1000000 (the broker refuses larger messages)")
    if not 0 <= s.redis_poll_us <= 10_000:
        raise SettingsError(f"{_env_name('redis_poll_us')}={s.redis_poll_us} must be 0..10000 microseconds "
                            "(0 never polls; ~100 suits a Redis on the same host)")
    if not 0 < s.http_port < 65536:
        raise SettingsError(f"{_env_name('http_port')}={s.http_port} must be a TCP port 1..65535")
    if not 0 <= s.stream_snapshot_interval_s <= 86400:
        raise SettingsError(f"{_env_name('stream_snapshot_interval_s')}={s.stream_snapshot_interval_s} must be "
                            "0..86400 seconds (0: no table snapshots, a restarted worker replays whole changelogs)")
    if not 0 <= s.stream_metrics_port < 65536:
        raise SettingsError(f"{_env_name('stream_metrics_port')}={s.stream_metrics_port} must be a TCP port "
                            "1..65535, or 0 for no metrics endpoint")
    if s.kafka_min_insync_replicas > s.kafka_replication_factor:
        raise SettingsError(
            f"{_env_name('kafka_min_insync_replicas')}={s.kafka_min_insync_replicas} is more than "
            f"{_env_name('kafka_replication_factor')}={s.kafka_replication_factor}: no write could ever be "
            "acknowledged (three brokers: 3 replicas, 2 in sync)")
    # not unix://: Feast's Redis online store (feast apply, Feast's readers) takes host:port only
    if s.redis_url and urlparse(s.redis_url).scheme not in ("redis", "rediss"):
        raise SettingsError(
            f"{_env_name('redis_url')} must look like redis://[:password@]host:port/db or rediss://... "
            f"(got scheme {urlparse(s.redis_url).scheme!r})"
        )
    _validate_redis_cluster(s)
    if s.kafka_sasl_mechanism and not s.kafka_security_protocol.startswith("SASL"):
        raise SettingsError(
            f"{_env_name('kafka_sasl_mechanism')} is set but {_env_name('kafka_security_protocol')}="
            f"{s.kafka_security_protocol}; use SASL_PLAINTEXT or SASL_SSL"
        )
    for name in ("consistency_sample", "consistency_min_rate"):
        if not 0 <= getattr(s, name) <= 1:
            raise SettingsError(f"{_env_name(name)}={getattr(s, name)} must be a fraction 0..1")
    if s.consistency_grace_ms < 0:
        raise SettingsError(f"{_env_name('consistency_grace_ms')} must be >= 0, got {s.consistency_grace_ms}")
    _validate_http_security(s)
    _validate_offline_store(s)
    _validate_rollback(s)
    if not s.dashboard_stream_group:
        raise SettingsError(f"{_env_name('dashboard_stream_group')} must not be empty (freshet stream's --app-id)")
    if not s.model_name:
        raise SettingsError(f"{_env_name('model_name')} must not be empty")
    for topic in ("deadletter", "predictions", "labels", "drift", "retrain", "models"):
        if not getattr(s, f"topic_{topic}"):
            raise SettingsError(f"{_env_name('topic_' + topic)} must not be empty")


def _validate_redis_cluster(s: Settings) -> None:
    if s.redis_cluster != "on":
        return
    if not s.redis_url:
        raise SettingsError(f"{_env_name('redis_cluster')}=on needs {_env_name('redis_url')} set to a node of the "
                            "cluster (redis://host:port/0); the embedded stack runs one Redis, not a cluster")
    db = (urlparse(s.redis_url).path or "/").lstrip("/")
    if db not in ("", "0"):
        raise SettingsError(f"{_env_name('redis_cluster')}=on but {_env_name('redis_url')} selects database {db}: "
                            "a Redis Cluster has database 0 only; end the URL with /0")


def _validate_rollback(s: Settings) -> None:
    if not 0 < s.rollback_alpha < 1:
        raise SettingsError(f"{_env_name('rollback_alpha')}={s.rollback_alpha} must be in (0, 1) (0.01 suits)")
    if s.rollback_min_outcomes < 10:
        raise SettingsError(f"{_env_name('rollback_min_outcomes')}={s.rollback_min_outcomes} must be at least 10 "
                            "labelled outcomes per version (a few hundred suit)")
    if not 1 <= s.rollback_looks <= 20:
        raise SettingsError(f"{_env_name('rollback_looks')}={s.rollback_looks} must be 1..20")
    if not 0 <= s.rollback_min_difference < 1:
        raise SettingsError(f"{_env_name('rollback_min_difference')}={s.rollback_min_difference} must be an error "
                            "rate difference in [0, 1)")


def _validate_http_security(s: Settings) -> None:
    tokens = {n: getattr(s, n) for n in ("api_token", "api_token_predict", "api_token_features") if getattr(s, n)}
    if len(set(tokens.values())) != len(tokens):
        raise SettingsError(f"{', '.join(_env_name(n) for n in tokens)} must differ from each other: "
                            "each token grants its own scope")
    if bool(s.http_tls_certfile) != bool(s.http_tls_keyfile):
        raise SettingsError(f"{_env_name('http_tls_certfile')} and {_env_name('http_tls_keyfile')} go together: "
                            "set both for HTTPS, or neither")
    for name in ("http_tls_certfile", "http_tls_keyfile"):
        if getattr(s, name) and not Path(getattr(s, name)).expanduser().is_file():
            raise SettingsError(f"{_env_name(name)}={getattr(s, name)} is not a readable file")


def _validate_offline_store(s: Settings) -> None:
    store = s.offline_store
    scheme = urlparse(store).scheme if "://" in store else ""
    if scheme not in ("", "s3"):
        raise SettingsError(f"{_env_name('offline_store')}={store!r}: use a directory or s3://bucket/prefix "
                            f"(scheme {scheme!r} is not supported)")
    if s.feast_registry and urlparse(s.feast_registry).scheme.split("+")[0] != "postgresql":
        raise SettingsError(f"{_env_name('feast_registry')} must look like postgresql://user:password@host:port/db "
                            f"(got scheme {urlparse(s.feast_registry).scheme!r}), or be empty for the registry file")
    artifacts = s.mlflow_artifact_store
    if artifacts and not (artifacts.startswith("s3://") and urlparse(artifacts).netloc):
        raise SettingsError(f"{_env_name('mlflow_artifact_store')}={artifacts!r}: use s3://bucket/prefix, or leave it "
                            "empty for <data dir>/mlartifacts")
    s3 = [n for n in ("s3_endpoint_url", "s3_region", "s3_access_key_id", "s3_secret_access_key",
                      "s3_secret_access_key_file") if getattr(s, n)]
    if scheme != "s3" and not artifacts:
        if s3:
            raise SettingsError(f"{_env_name(s3[0])} is set but neither {_env_name('offline_store')} nor "
                                f"{_env_name('mlflow_artifact_store')} is an s3:// location: set both, or neither")
        return
    if scheme == "s3" and not urlparse(store).netloc:
        raise SettingsError(f"{_env_name('offline_store')}={store!r} names no bucket; use s3://bucket/prefix")
    if s.s3_endpoint_url and (urlparse(s.s3_endpoint_url).scheme not in ("http", "https")
                              or not urlparse(s.s3_endpoint_url).netloc):
        raise SettingsError(f"{_env_name('s3_endpoint_url')}={s.s3_endpoint_url!r} must look like "
                            "http(s)://host:port")
    if s.s3_secret_access_key and s.s3_secret_access_key_file:
        raise SettingsError(f"{_env_name('s3_secret_access_key')} and {_env_name('s3_secret_access_key_file')} "
                            "are both set: use one")
    has_secret = bool(s.s3_secret_access_key or s.s3_secret_access_key_file)
    if bool(s.s3_access_key_id) != has_secret:
        raise SettingsError(f"{_env_name('s3_access_key_id')} and a secret key ({_env_name('s3_secret_access_key')} "
                            f"or {_env_name('s3_secret_access_key_file')}) go together: set both, or neither")
    if s.s3_secret_access_key_file:
        path = Path(s.s3_secret_access_key_file).expanduser()
        if not path.is_file():
            raise SettingsError(f"{_env_name('s3_secret_access_key_file')}={path} is not a readable file")
        if path.stat().st_mode & 0o077:
            raise SettingsError(f"{_env_name('s3_secret_access_key_file')}={path} may be read by others "
                                f"(mode {path.stat().st_mode & 0o777:o}): chmod 600 it")


def _coerce(name: str, raw: Any, source: str) -> Any:
    kind = _FIELDS[name].type
    if kind == "int" or kind is int:
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise SettingsError(f"{source} must be an integer, got {raw!r}") from None
    if kind == "float" or kind is float:
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise SettingsError(f"{source} must be a number, got {raw!r}") from None
    return str(raw)


def load_settings(
    env: Mapping[str, str] | None = None, **overrides: Any
) -> Settings:
    """Build Settings from env vars, the optional FRESHET_CONFIG file and overrides."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    config_file = env.get(PREFIX + "CONFIG")
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise SettingsError(f"FRESHET_CONFIG={config_file} does not exist; point it at a TOML file")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"FRESHET_CONFIG={config_file} is not valid TOML: {exc}") from None
        for key, raw in data.items():
            if key not in _FIELDS:
                raise SettingsError(f"{config_file}: unknown setting {key!r}; known: {', '.join(_FIELDS)}")
            values[key] = _coerce(key, raw, f"{config_file}: {key}")
    for key, raw in env.items():
        if not key.startswith(PREFIX) or key in PASSTHROUGH:
            continue
        name = key[len(PREFIX):].lower()
        if name not in _FIELDS:
            raise SettingsError(
                f"unknown setting {key}; known: {', '.join(_env_name(n) for n in _FIELDS)}"
            )
        values[name] = _coerce(name, raw, key)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)


def settings_table() -> list[tuple[str, str]]:
    """(env var, default) for every setting, for docs and `freshet config --help`."""
    defaults = Settings()
    return [(_env_name(n), str(getattr(defaults, n))) for n in _FIELDS]
