"""Decoding and validating source events against the KafkaSource schema.

A bad event is never dropped: `EventDecoder.decode` returns the reason, and the
engine sends the original bytes with that reason to the dead-letter topic.
"""

from __future__ import annotations

from typing import Any

import orjson

from freshet.features import ViewSpec
from freshet.times import to_epoch


class EventError(ValueError):
    """Why an event cannot be used; becomes the dead-letter record's `error`."""


def parse_timestamp(value: Any, field: str) -> float:
    """Epoch seconds (milliseconds recognised by size) or ISO-8601 -> epoch seconds (freshet.times)."""
    try:
        return to_epoch(value)
    except TypeError:
        raise EventError(f"field {field!r} must be a timestamp, got {type(value).__name__}") from None
    except ValueError:
        raise EventError(f"field {field!r} is not an ISO-8601 timestamp: {value[:40]!r}") from None


# The exact types JSON decodes to that each schema kind accepts (so bool is no int here)
_TYPES = {
    "string": (str,),
    "int": (int,),
    "float": (float, int),
    "bool": (bool,),
}


class EventDecoder:
    """Validates the events of one topic for every view that reads it.

    Required: the timestamp field, every view's join keys and aggregated columns.
    Other schema fields are optional but must have the declared type when present.

    >>> from freshet.features import AggregationSpec, ViewSpec
    >>> v = ViewSpec("v", ("card_id",), ("STRING",), 0, "tx", "ts",
    ...              {"card_id": "string", "amount": "float", "ts": "timestamp"}, 0,
    ...              (AggregationSpec("sum_amount_60s", "amount", "sum", 60, 60, "DOUBLE"),), "")
    >>> d = EventDecoder([v])
    >>> d.decode(b'{"card_id": "c1", "amount": 3, "ts": 1700000000}')
    (1700000000.0, {'card_id': 'c1', 'amount': 3.0, 'ts': 1700000000})
    >>> d.decode(b'{"card_id": "c1", "amount": "3", "ts": 1}')
    Traceback (most recent call last):
    ...
    freshet.stream.events.EventError: field 'amount' must be float, got str
    """

    def __init__(self, views: list[ViewSpec]):
        first = views[0]
        self.topic = first.topic
        self.timestamp_field = first.timestamp_field
        schema: dict[str, str] = {}
        for v in views:
            schema.update(v.source_schema)
            if v.timestamp_field != self.timestamp_field:
                raise ValueError(f"views on topic {self.topic!r} disagree on the timestamp field")
        self.schema = schema
        required = {self.timestamp_field}
        for v in views:
            required.update(v.join_keys)
            required.update(a.column for a in v.aggregations)
        self.required = tuple(sorted(required))
        self.typed = tuple((name, kind, _TYPES[kind]) for name, kind in schema.items()
                           if kind != "timestamp" and name != self.timestamp_field)

    def decode(self, raw: bytes | None) -> tuple[float, dict[str, Any]]:
        if not raw:
            raise EventError("empty message")
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise EventError(f"not valid JSON: {exc}") from None
        if type(event) is not dict:
            raise EventError("event must be a JSON object")
        get = event.get
        for name in self.required:
            if get(name) is None:
                raise EventError(f"missing field {name!r}")
        for name, kind, types in self.typed:
            value = get(name)
            if value is None:
                continue
            t = type(value)
            if t not in types:
                raise EventError(f"field {name!r} must be {kind}, got {t.__name__}")
            if t is float:
                if value - value:  # NaN or an infinity: 0.0 for every finite float
                    raise EventError(f"field {name!r} must be a finite number")
            elif kind == "float":
                event[name] = float(value)
        return parse_timestamp(event[self.timestamp_field], self.timestamp_field), event
