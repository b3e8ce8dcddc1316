"""docker-compose.yml, deploy/three-brokers.yml and deploy/ checked against the code.

No Docker engine runs here, so this is the compose file's guard: it parses; every freshet
service runs a command the CLI accepts with settings that load and validate; each component
gets the settings it cannot start without; Prometheus scrapes each service on the port it
exports metrics on; the Grafana dashboard asks only for metrics the code exports.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from freshet.app.commands import UP_COMPONENTS
from freshet.cli import build_parser
from freshet.settings import PASSTHROUGH, Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
THREE_BROKERS = ROOT / "deploy" / "three-brokers.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"

# What each component cannot start without when the embedded stack is not there to fill
# it in (freshet.endpoints.resolve_endpoints), beyond the data dir every one of them shares.
NEEDS = {
    "apply": {"FRESHET_KAFKA_BOOTSTRAP_SERVERS", "FRESHET_REDIS_URL"},
    "stream": {"FRESHET_KAFKA_BOOTSTRAP_SERVERS", "FRESHET_REDIS_URL", "FRESHET_STREAM_METRICS_PORT"},
    "serve": {"FRESHET_KAFKA_BOOTSTRAP_SERVERS", "FRESHET_REDIS_URL", "FRESHET_API_TOKEN"},
    "monitor": {"FRESHET_KAFKA_BOOTSTRAP_SERVERS"},
    "consistency": {"FRESHET_KAFKA_BOOTSTRAP_SERVERS"},
    "retrain": {"FRESHET_KAFKA_BOOTSTRAP_SERVERS"},
}


def _merge(base, override):
    """docker compose's merge of an override file: mappings key by key, anything else replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = _merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(override)


def _load(*files: Path) -> dict:
    doc: dict = {}
    for f in files:
        doc = _merge(doc, yaml.safe_load(f.read_text()))
    return doc


def _interpolated(value) -> str:
    """${VAR:?message} / ${VAR:-default} as compose would fill them (a token stands in for secrets)."""
    return re.sub(r"\$\{(\w+)(?::?[-?]([^}]*))?\}",
                  lambda m: m.group(2) if m.group(0).find(":-") > 0 else f"value-of-{m.group(1)}", str(value))


def _freshet_services(doc: dict) -> dict[str, dict]:
    return {name: svc for name, svc in doc["services"].items() if svc.get("image") == "freshet:latest"}


def _env(svc: dict) -> dict[str, str]:
    return {k: _interpolated(v) for k, v in (svc.get("environment") or {}).items()}


def _dockerfile_env() -> dict[str, str]:
    env = {}
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("ENV "):
            env.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    return env


COMPOSITIONS = {"one broker": (COMPOSE,), "three brokers": (COMPOSE, THREE_BROKERS)}


@pytest.fixture(scope="module", params=list(COMPOSITIONS))
def composition(request) -> dict:
    return _load(*COMPOSITIONS[request.param])


def test_every_freshet_service_runs_a_command_the_cli_accepts(composition):
    parser, handlers = build_parser()
    services = _freshet_services(composition)
    assert {"init", "stream", "serve", "monitor", "consistency", "retrain"} <= set(services)
    for name, svc in services.items():
        command = [str(c) for c in svc["command"]]
        assert command[0] in handlers, f"{name}: 'freshet {command[0]}' is no command"
        try:
            parser.parse_args(command)
        except SystemExit:
            pytest.fail(f"{name}: 'freshet {' '.join(command)}' is not accepted by the CLI")


def test_retrain_bootstraps_the_first_model_as_freshet_up_does(composition):
    """A fresh deployment has no champion: without the bootstrap, /predict answers 503 forever."""
    services = _freshet_services(composition)
    assert [str(c) for c in services["retrain"]["command"]] == UP_COMPONENTS["retrain"]
    # and the model store exists before serve, monitor and retrain race to create it
    assert "--model-store" in services["init"]["command"]
    for name in ("stream", "serve", "monitor", "consistency", "retrain"):
        assert services[name]["depends_on"]["init"]["condition"] == "service_completed_successfully"


def test_every_freshet_variable_is_a_setting_that_loads_and_each_component_has_what_it_needs(composition):
    known = {f"FRESHET_{name.upper()}" for name in Settings.__dataclass_fields__} | PASSTHROUGH
    image_env = _dockerfile_env()
    for name, svc in _freshet_services(composition).items():
        env = {**image_env, **_env(svc)}
        unknown = {k for k in env if k.startswith("FRESHET_")} - known
        assert not unknown, f"{name} sets unknown settings {unknown}"
        settings = load_settings(env)  # validates: a bad value fails here as it would at start-up
        component = str(svc["command"][0])
        missing = NEEDS[component] - {k for k, v in env.items() if v}
        assert not missing, f"{name} ({component}) lacks {missing}"
        assert settings.data_dir == "/data", f"{name}: the image's data dir"
        # what components share is in services, never on a shared disk (docs/deploy.md)
        assert settings.offline_store.startswith("s3://") and settings.mlflow_artifact_store.startswith("s3://"), name
        assert urlparse(settings.s3_endpoint_url).hostname in composition["services"], name
        for uri in (settings.mlflow_uri, settings.feast_registry):
            assert uri.startswith("postgresql://") and urlparse(uri).hostname in composition["services"], (name, uri)
        assert settings.http_host == "0.0.0.0", f"{name}: metrics and API must listen beyond the container"
        for host in settings.kafka_bootstrap_servers.split(","):
            assert host.split(":")[0] in composition["services"], f"{name}: no service {host}"
        assert settings.redis_url.split("//")[1].split(":")[0] in composition["services"]


def test_no_volume_is_shared_between_freshet_services(composition):
    """Any component can run on another host: a volume of its own at most, for its own state."""
    owners: dict[str, list[str]] = {}
    for name, svc in _freshet_services(composition).items():
        for volume in svc.get("volumes") or []:
            owners.setdefault(str(volume).split(":")[0], []).append(name)
    assert all(len(names) == 1 for names in owners.values()), owners
    assert "freshet-data" not in (composition.get("volumes") or {})
    assert {"s3", "postgres"} <= set(composition["services"])


def test_topic_replication_fits_the_brokers(composition):
    brokers = [n for n, s in composition["services"].items() if str(s.get("image", "")).startswith("apache/kafka")]
    for name, svc in _freshet_services(composition).items():
        settings = load_settings({**_dockerfile_env(), **_env(svc)})
        assert settings.kafka_replication_factor == len(brokers), name
        # one broker may be down and writes still succeed; never more replicas in sync than exist
        expected = 2 if len(brokers) == 3 else 1
        assert settings.kafka_min_insync_replicas == expected, name
        assert set(settings.kafka_bootstrap_servers.split(",")) == {f"{b}:9092" for b in brokers}, name
    if len(brokers) == 3:
        voters = {s["environment"]["KAFKA_CONTROLLER_QUORUM_VOTERS"] for n, s in composition["services"].items()
                  if n in brokers}
        assert voters == {"1@kafka:9093,2@kafka-2:9093,3@kafka-3:9093"}
        assert {composition["services"][b]["environment"]["KAFKA_NODE_ID"] for b in brokers} == {1, 2, 3}


def _metrics_ports(doc: dict) -> dict[str, int]:
    """Where each freshet service exports Prometheus metrics, read as the code reads it."""
    ports = {}
    for name, svc in _freshet_services(doc).items():
        command = [str(c) for c in svc["command"]]
        settings = load_settings({**_dockerfile_env(), **_env(svc)})
        if command[0] == "serve":
            ports[name] = settings.http_port
        elif command[0] == "stream" and settings.stream_metrics_port:
            ports[name] = settings.stream_metrics_port
        elif "--metrics-port" in command:
            ports[name] = int(command[command.index("--metrics-port") + 1])
    return ports


def _scrape_targets() -> dict[str, int]:
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets = {}
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.split(":")
                targets[host] = int(port)
        for dns in job.get("dns_sd_configs", []):
            for host in dns["names"]:
                targets[host] = int(dns["port"])
    return targets


def test_prometheus_scrapes_every_service_on_its_metrics_port():
    doc = _load(COMPOSE)
    assert _scrape_targets() == _metrics_ports(doc)
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in doc["services"]["prometheus"]["volumes"]


def test_grafana_is_provisioned_with_the_prometheus_service_and_the_dashboard():
    doc = _load(COMPOSE)
    grafana = doc["services"]["grafana"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    for local in mounts:
        if local.startswith("./"):
            assert (ROOT / local).is_dir(), local
    (source,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    host, port = source["url"].split("//")[1].split(":")
    assert host in doc["services"] and f"{port}:{port}" in doc["services"]["prometheus"]["ports"]
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "freshet.yml").read_text())["providers"]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    dashboard = json.loads((GRAFANA / "dashboards" / "freshet.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == source["uid"], panel["title"]


def _exported_names() -> set[str]:
    """Every sample name the code's registries expose: each process's own metrics, collected."""
    from types import SimpleNamespace

    from freshet.monitor.consistency import ConsistencyMetrics
    from freshet.monitor.service import MonitorMetrics
    from freshet.serving.metrics import ServingMetrics
    from freshet.stream.engine import Counters
    from freshet.stream.metrics import StreamMetrics

    stream = StreamMetrics()
    stream.attach(SimpleNamespace(counters=Counters()))
    serving = ServingMetrics(reader=None)
    serving.expose_predictions(SimpleNamespace(counts={}, shadow_counts={}, prediction_log=None))
    names = set()
    for registry in (stream.registry, serving.registry, MonitorMetrics().registry, ConsistencyMetrics().registry):
        for family in registry.collect():
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
            names.update(family.name + s for s in suffixes)
    return names


def test_the_dashboard_asks_only_for_metrics_the_code_exports_and_covers_each_part():
    dashboard = json.loads((GRAFANA / "dashboards" / "freshet.json").read_text())
    exported = _exported_names()
    asked: dict[str, set[str]] = {}
    row = None
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            continue
        for target in panel["targets"]:
            asked.setdefault(row, set()).update(re.findall(r"\bfreshet_[a-z0-9_]+", target["expr"]))
    unknown = set().union(*asked.values()) - exported
    assert not unknown, f"the dashboard asks for metrics nothing exports: {sorted(unknown)}"
    assert set(asked) == {"Stream", "API", "Drift", "Models"}
    assert {"freshet_stream_lag", "freshet_stream_events_total", "freshet_stream_freshness_seconds_bucket",
            "freshet_stream_deadletters_total"} <= asked["Stream"]
