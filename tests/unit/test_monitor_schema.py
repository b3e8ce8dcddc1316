"""The JSON Schema for freshet.drift/1 says what freshet.contracts.DriftAlert and the monitor produce."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from freshet.contracts import DRIFT_KINDS, DriftAlert
from freshet.monitor import DriftMonitor, ModelConfig

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "freshet" / "schemas" / "drift_alert.schema.json"
TYPES = {"string": str, "integer": int, "number": (int, float), "object": dict}


def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def violations(value, rule: dict, path: str = "$") -> list[str]:
    """The subset of JSON Schema the alert schema uses (no jsonschema dependency)."""
    found = []
    if "const" in rule and value != rule["const"]:
        found.append(f"{path}: {value!r} is not {rule['const']!r}")
    if "enum" in rule and value not in rule["enum"]:
        found.append(f"{path}: {value!r} not in {rule['enum']}")
    if "type" in rule:
        wanted = TYPES[rule["type"]]
        if not isinstance(value, wanted) or isinstance(value, bool):
            found.append(f"{path}: {type(value).__name__} is not {rule['type']}")
            return found
    if "minLength" in rule and len(value) < rule["minLength"]:
        found.append(f"{path}: shorter than {rule['minLength']}")
    if "minimum" in rule and value < rule["minimum"]:
        found.append(f"{path}: below {rule['minimum']}")
    if "oneOf" in rule and sum(not violations(value, option, path) for option in rule["oneOf"]) != 1:
        found.append(f"{path}: matches no single option of oneOf")
    for name in rule.get("required", []):
        if name not in value:
            found.append(f"{path}: missing {name!r}")
    for name, sub in rule.get("properties", {}).items():
        if isinstance(value, dict) and name in value:
            found += violations(value[name], sub, f"{path}.{name}")
    return found


def test_schema_requires_exactly_the_contract_fields():
    fields = {f.name for f in dataclasses.fields(DriftAlert)}
    assert set(schema()["required"]) == fields | {"schema"}
    assert set(schema()["properties"]) == fields | {"schema"}
    assert schema()["properties"]["schema"]["const"] == DriftAlert.SCHEMA


def test_schema_kinds_are_the_contract_kinds():
    assert tuple(schema()["properties"]["kind"]["enum"]) == DRIFT_KINDS


def test_an_alert_the_monitor_raises_satisfies_the_schema():
    monitor = DriftMonitor([ModelConfig("fraud", numeric_features=["x"], warmup=100)])
    (alert,) = monitor.observe_deadletter_rate(0.5, model="fraud", ts=1.0, window=200)
    message = json.loads(alert.encode())
    assert violations(message, schema()) == []
    assert DriftAlert.decode(alert.encode()) == alert


@pytest.mark.parametrize("field, bad", [("kind", "vibes"), ("statistic", "high"), ("window", -1), ("schema", "freshet.drift/2")])
def test_the_schema_rejects_a_broken_alert(field, bad):
    message = DriftAlert("a1", "fraud", "1", "feature", "x", "adwin", 1.0, 0.001, 64, ts=1.0).to_dict()
    assert violations(message, schema()) == []
    message[field] = bad
    assert violations(message, schema()) != []
