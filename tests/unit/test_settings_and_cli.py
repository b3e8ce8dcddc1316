"""Settings fail fast with one line naming the setting; the CLI has help for everything."""

from __future__ import annotations

import subprocess
import sys

import pytest

from freshet.contracts import ContractError, DeadLetter, DriftAlert, Label, Prediction
from freshet.settings import SettingsError, load_settings


def test_defaults_load_without_any_environment():
    s = load_settings({})
    assert s.topic_deadletter == "freshet.deadletter"
    assert s.kafka_session_timeout_ms <= 10000  # a join on Tansu takes session/2
    assert s.kafka_fetch_max_wait_ms <= 50
    assert s.stream_snapshot_interval_s == 0  # table snapshots are opt-in until the chaos bench passes with them


@pytest.mark.parametrize("env, fragment", [
    ({"FRESHET_KAFKA_BOOSTRAP_SERVERS": "x:1"}, "unknown setting FRESHET_KAFKA_BOOSTRAP_SERVERS"),
    ({"FRESHET_HTTP_PORT": "eighty"}, "FRESHET_HTTP_PORT must be an integer"),
    ({"FRESHET_HTTP_PORT": "70000"}, "FRESHET_HTTP_PORT=70000 must be a TCP port"),
    ({"FRESHET_REDIS_URL": "localhost:6379"}, "FRESHET_REDIS_URL must look like redis://"),
    ({"FRESHET_REDIS_URL": "unix:///run/redis.sock"}, "got scheme 'unix'"),  # Feast's store takes host:port
    ({"FRESHET_KAFKA_SECURITY_PROTOCOL": "TLS"}, "use one of"),
    ({"FRESHET_KAFKA_SASL_MECHANISM": "PLAIN"}, "use SASL_PLAINTEXT or SASL_SSL"),
    ({"FRESHET_TOPIC_DRIFT": ""}, "FRESHET_TOPIC_DRIFT must not be empty"),
    ({"FRESHET_REDIS_POLL_US": "-1"}, "FRESHET_REDIS_POLL_US=-1 must be 0..10000 microseconds"),
    ({"FRESHET_KAFKA_REPLICATION_FACTOR": "0"}, "FRESHET_KAFKA_REPLICATION_FACTOR must be a positive integer"),
    ({"FRESHET_KAFKA_REPLICATION_FACTOR": "3", "FRESHET_KAFKA_MIN_INSYNC_REPLICAS": "4"},
     "FRESHET_KAFKA_MIN_INSYNC_REPLICAS=4 is more than FRESHET_KAFKA_REPLICATION_FACTOR=3"),
    ({"FRESHET_KAFKA_MIN_INSYNC_REPLICAS": "2"}, "FRESHET_KAFKA_MIN_INSYNC_REPLICAS=2 is more than"),
    ({"FRESHET_KAFKA_IDEMPOTENCE": "yes"}, "FRESHET_KAFKA_IDEMPOTENCE='yes' is not allowed; use one of"),
    ({"FRESHET_STREAM_METRICS_PORT": "70000"}, "FRESHET_STREAM_METRICS_PORT=70000 must be a TCP port"),
    ({"FRESHET_STREAM_SNAPSHOT_INTERVAL_S": "-1"}, "FRESHET_STREAM_SNAPSHOT_INTERVAL_S=-1 must be 0..86400"),
    ({"FRESHET_STREAM_SNAPSHOT_INTERVAL_S": "often"}, "FRESHET_STREAM_SNAPSHOT_INTERVAL_S must be an integer"),
    ({"FRESHET_REDIS_CLUSTER": "yes"}, "FRESHET_REDIS_CLUSTER='yes' is not allowed; use one of"),
    ({"FRESHET_REDIS_CLUSTER": "on"}, "FRESHET_REDIS_CLUSTER=on needs FRESHET_REDIS_URL set to a node of the cluster"),
    ({"FRESHET_REDIS_CLUSTER": "on", "FRESHET_REDIS_URL": "redis://r1:7000/2"},
     "FRESHET_REDIS_CLUSTER=on but FRESHET_REDIS_URL selects database 2: a Redis Cluster has database 0 only"),
])
def test_invalid_setting_names_the_setting_and_what_is_allowed(env, fragment):
    with pytest.raises(SettingsError, match=fragment):
        load_settings(env)


def test_config_file_is_read_and_env_wins(tmp_path):
    cfg = tmp_path / "freshet.toml"
    cfg.write_text('http_port = 9001\nlog_level = "DEBUG"\n')
    s = load_settings({"FRESHET_CONFIG": str(cfg), "FRESHET_HTTP_PORT": "9002"})
    assert (s.http_port, s.log_level) == (9002, "DEBUG")
    cfg.write_text("bogus = 1\n")
    with pytest.raises(SettingsError, match="unknown setting 'bogus'"):
        load_settings({"FRESHET_CONFIG": str(cfg)})


def test_secrets_are_masked_and_passed_to_children_through_env():
    s = load_settings({"FRESHET_API_TOKEN": "s3cret", "FRESHET_KAFKA_SASL_PASSWORD": "pw"})
    assert s.public_view()["api_token"] == "***"
    assert "s3cret" not in repr(s)
    assert s.to_env()["FRESHET_API_TOKEN"] == "s3cret"
    import dataclasses

    assert load_settings(s.to_env()) == dataclasses.replace(s, data_dir=str(s.data_path))


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "freshet.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_version_and_help_for_every_subcommand(capsys):
    assert _cli("--version").stdout.startswith("freshet ")
    from freshet.cli import build_parser

    parser, handlers = build_parser()
    for name in ("stack", "up", "apply", "config", "stream", "backfill", "training-set", "produce", "serve"):
        assert name in handlers
    for name in handlers:
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([name, "--help"])
        assert exit_.value.code == 0
        assert f"usage: freshet {name}" in capsys.readouterr().out


def test_bad_setting_exits_2_with_one_line():
    import os

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}, "FRESHET_HTTP_PORT": "x"}
    out = _cli("config", env=env)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["freshet: error: FRESHET_HTTP_PORT must be an integer, got 'x'"]


def test_contracts_round_trip_and_name_the_bad_field():
    p = Prediction("r1", "fraud", "3", {"card_id": "c1"}, {"f": 1.0}, {"score": 0.2, "label": 0})
    assert Prediction.decode(p.encode()) == p
    assert p.key() == b"r1"
    with pytest.raises(ContractError, match="missing field 'model'"):
        Prediction.decode(b'{"schema": "freshet.predictions/1", "request_id": "r"}')
    with pytest.raises(ContractError, match="expected 'freshet.labels/1'"):
        Label.decode(b'{"schema": "freshet.labels/2", "label": 1, "request_id": "r"}')
    with pytest.raises(ContractError, match="needs field 'request_id' or field 'entities'"):
        Label.decode(b'{"schema": "freshet.labels/1", "label": 1}')
    with pytest.raises(ContractError, match="field 'kind'"):
        DriftAlert("a", "m", "1", "weather", "x", "adwin", 1.0, 0.5, 100).check()
    d = DeadLetter.for_event("tx", 1, 7, "bad", b"\x00raw")
    assert DeadLetter.decode(d.encode()).original() == b"\x00raw"
