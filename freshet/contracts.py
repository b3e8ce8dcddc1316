"""The Kafka message contracts every freshet process speaks (docs/architecture.md).

Each message is UTF-8 JSON carrying `"schema": "<name>/<major>"`; `decode` checks
the schema and required fields and raises `ContractError` naming what is wrong.
"""

from __future__ import annotations

import base64
import dataclasses
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import orjson

DRIFT_KINDS = ("feature", "prediction", "performance", "data_quality")


class ContractError(ValueError):
    """A message does not follow its contract; the message names the field."""


def json_object(raw: bytes | str | Mapping[str, Any]) -> dict[str, Any]:
    """A message's JSON object as a new dict; ContractError if it is not valid JSON or not an object.

    >>> json_object(b'{"a": 1}'), json_object({"a": 1})
    ({'a': 1}, {'a': 1})
    >>> json_object(b'[1]')
    Traceback (most recent call last):
    ...
    freshet.contracts.ContractError: message must be a JSON object
    """
    if isinstance(raw, Mapping):
        return dict(raw)
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ContractError(f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ContractError("message must be a JSON object")
    return data


def now_ts() -> float:
    return time.time()


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Message:
    """Base of every contract: JSON encoding, schema tag and field checks."""

    SCHEMA: ClassVar[str] = ""
    KEY_FIELD: ClassVar[str] = ""
    # field name -> accepted python types, checked on decode
    TYPES: ClassVar[dict[str, tuple[type, ...]]] = {}

    def to_dict(self) -> dict[str, Any]:
        out = {"schema": self.SCHEMA}
        out.update(dataclasses.asdict(self))
        return out

    def encode(self) -> bytes:
        return orjson.dumps(self.to_dict(), option=orjson.OPT_SERIALIZE_NUMPY)

    def key(self) -> bytes:
        return str(getattr(self, self.KEY_FIELD)).encode()

    @classmethod
    def decode(cls, raw: bytes | str | Mapping[str, Any]):
        data = json_object(raw)
        schema = data.pop("schema", None)
        if schema is None:
            raise ContractError("missing field 'schema'")
        name, _, major = str(schema).partition("/")
        want_name, _, want_major = cls.SCHEMA.partition("/")
        if name != want_name or major != want_major:
            raise ContractError(f"field 'schema' is {schema!r}, expected {cls.SCHEMA!r}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for fname, f in known.items():
            if fname in data:
                value = data[fname]
                allowed = cls.TYPES.get(fname)
                if allowed and value is not None and not isinstance(value, allowed):
                    names = "/".join(t.__name__ for t in allowed)
                    raise ContractError(f"field {fname!r} must be {names}, got {type(value).__name__}")
                kwargs[fname] = value
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ContractError(f"missing field {fname!r}")
        obj = cls(**kwargs)
        obj.check()
        return obj

    def check(self) -> None:
        """Per-contract rules beyond presence and type."""


_NUM = (int, float)


@dataclass
class DeadLetter(Message):
    SCHEMA: ClassVar[str] = "freshet.deadletter/1"
    TYPES: ClassVar = {"topic": (str,), "partition": (int,), "offset": (int,), "error": (str,), "payload": (str,)}

    topic: str
    partition: int
    offset: int
    error: str
    payload: str  # original bytes, base64
    ts: float = field(default_factory=now_ts)

    @classmethod
    def for_event(cls, topic: str, partition: int, offset: int, error: str, raw: bytes) -> "DeadLetter":
        return cls(topic, partition, offset, error, base64.b64encode(raw or b"").decode("ascii"))

    def original(self) -> bytes:
        return base64.b64decode(self.payload)


@dataclass
class Prediction(Message):
    SCHEMA: ClassVar[str] = "freshet.predictions/1"
    KEY_FIELD: ClassVar[str] = "request_id"
    TYPES: ClassVar = {
        "request_id": (str,), "model": (str,), "model_version": (str, int), "entities": (dict,),
        "features": (dict,), "prediction": (dict, int, float), "ts": _NUM, "role": (str,), "shadow": (dict,),
    }

    request_id: str
    model: str
    model_version: str
    entities: dict[str, Any]
    features: dict[str, Any]
    # {"score": p, "label": 0/1} for classifiers; a bare number is accepted too
    prediction: Any
    ts: float = field(default_factory=now_ts)
    # optional: "canary" when a canary version answered (absent: the champion)
    role: str | None = None
    # optional: the shadow version's answer to the same request, never returned to the caller:
    # {"model_version": "3", "prediction": {"score": p, "label": 0/1}}
    shadow: dict[str, Any] | None = None

    @property
    def score(self) -> float:
        p = self.prediction
        return float(p["score"]) if isinstance(p, dict) else float(p)


@dataclass
class Label(Message):
    SCHEMA: ClassVar[str] = "freshet.labels/1"
    TYPES: ClassVar = {"request_id": (str,), "entities": (dict,), "label": (int, float, bool), "ts": _NUM}

    label: Any
    request_id: str | None = None
    entities: dict[str, Any] | None = None
    ts: float = field(default_factory=now_ts)

    def key(self) -> bytes:
        if self.request_id:
            return self.request_id.encode()
        return "|".join(f"{k}={v}" for k, v in sorted((self.entities or {}).items())).encode()

    def check(self) -> None:
        if not self.request_id and not self.entities:
            raise ContractError("a label needs field 'request_id' or field 'entities'")


@dataclass
class DriftAlert(Message):
    SCHEMA: ClassVar[str] = "freshet.drift/1"
    KEY_FIELD: ClassVar[str] = "model"
    TYPES: ClassVar = {
        "alert_id": (str,), "model": (str,), "kind": (str,), "subject": (str,), "detector": (str,),
        "statistic": _NUM, "threshold": _NUM, "window": (int, dict, str), "ts": _NUM,
    }

    alert_id: str
    model: str
    model_version: str
    kind: str
    subject: str
    detector: str
    statistic: float
    threshold: float
    window: Any  # observations the detector looked at, or {"start": .., "end": ..}
    ts: float = field(default_factory=now_ts)

    def check(self) -> None:
        if self.kind not in DRIFT_KINDS:
            raise ContractError(f"field 'kind' is {self.kind!r}; allowed: {', '.join(DRIFT_KINDS)}")


@dataclass
class RetrainRequest(Message):
    SCHEMA: ClassVar[str] = "freshet.retrain/1"
    KEY_FIELD: ClassVar[str] = "model"
    TYPES: ClassVar = {"request_id": (str,), "model": (str,), "reason": (list,), "ts": _NUM}

    request_id: str
    model: str
    reason: list[str]  # alert ids
    ts: float = field(default_factory=now_ts)


@dataclass
class ModelEvent(Message):
    SCHEMA: ClassVar[str] = "freshet.models/1"
    KEY_FIELD: ClassVar[str] = "model"
    TYPES: ClassVar = {"model": (str,), "version": (str, int), "stage": (str,), "metrics": (dict,), "ts": _NUM}

    model: str
    version: str
    stage: str
    metrics: dict[str, float]
    ts: float = field(default_factory=now_ts)
