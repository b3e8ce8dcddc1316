"""Decoding and validating source events against the KafkaSource schema.

A bad event is never dropped: `EventDecoder.decode` returns the reason, and the
engine sends the original bytes with that reason to the dead-letter topic.

Every value is bounded here, before it reaches state or the offline log: timestamps lie
between 1970 and the wall clock plus `FRESHET_STREAM_MAX_FUTURE_S`, numbers are finite
and at most MAX_MAGNITUDE (so sums of them stay finite), integers fit 64 bits, strings
hold at most MAX_STRING_CHARS characters, messages at most FRESHET_STREAM_MAX_EVENT_BYTES
and JSON nests at most MAX_DEPTH levels.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from freshet.features import ViewSpec
from freshet.times import MILLIS_ABOVE, to_epoch


class EventError(ValueError):
    """Why an event cannot be used; becomes the dead-letter record's `error`."""


def parse_timestamp(value: Any, field: str) -> float:
    """Epoch seconds (milliseconds recognised by size) or ISO-8601 -> epoch seconds (freshet.times)."""
    try:
        return to_epoch(value)
    except TypeError:
        raise EventError(f"field {field!r} must be a timestamp, got {type(value).__name__}") from None
    except (ValueError, OverflowError):
        raise EventError(f"field {field!r} is not an ISO-8601 timestamp: {value[:40]!r}") from None


MAX_STRING_CHARS = 1024  # join keys become Redis keys and distinct values live in state
MAX_MAGNITUDE = 1e100  # a window may add up to ~1e200 such values and stay finite
MAX_DEPTH = 32  # levels of JSON nesting (orjson itself stops at 1024)
INT64 = (-(2 ** 63), 2 ** 63 - 1)  # the raw log's int columns are int64


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether JSON `value` nests more than `limit` levels; a loop, not recursion, which JSON
    nested ~1000 deep (orjson decodes up to 1024) would exhaust before any limit is checked.

    >>> _deeper_than({"a": [[1]]}, 3), _deeper_than({"a": [[1]]}, 2)
    (False, True)
    """
    level = [value]  # the values at one nesting level; the depth is the deepest level holding a container
    for _ in range(limit):
        nested = []
        for v in level:
            t = type(v)
            if t is dict:
                nested.extend(v.values())
            elif t is list:
                nested.extend(v)
        if not nested:
            return False
        level = nested
    return any(type(v) in (dict, list) for v in level)


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
    >>> d.decode(b'{"card_id": "c1", "amount": 3, "ts": 1e300}', now=1700000000.0)
    Traceback (most recent call last):
    ...
    freshet.stream.events.EventError: field 'ts' is 1e+297 s ahead of the wall clock (FRESHET_STREAM_MAX_FUTURE_S=300)
    """

    def __init__(self, views: list[ViewSpec], max_future_s: float = 300, max_event_bytes: int = 100_000):
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
        self.other_times = tuple(name for name, kind in schema.items()
                                 if kind == "timestamp" and name != self.timestamp_field)
        self.max_future_s = max_future_s
        self.max_event_bytes = max_event_bytes

    def decode(self, raw: bytes | None, now: float | None = None) -> tuple[float, dict[str, Any]]:
        """(event time in epoch seconds, the event) or EventError; `now` is the wall clock
        (time.time() when not given: the engine passes one reading per micro-batch)."""
        if not raw:
            raise EventError("empty message")
        if len(raw) > self.max_event_bytes:
            raise EventError(f"message of {len(raw)} bytes is larger than FRESHET_STREAM_MAX_EVENT_BYTES="
                             f"{self.max_event_bytes}")
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise EventError(f"not valid JSON: {exc}") from None
        if type(event) is not dict:
            raise EventError("event must be a JSON object")
        # a flat object has one "{" and no "[" (two memchr calls): only events with nested
        # (or bracketed text) values are walked
        if (91 in raw or raw.find(123, 1) != -1) and _deeper_than(event, MAX_DEPTH):
            raise EventError(f"JSON nests deeper than {MAX_DEPTH} levels")
        long = len(raw) > MAX_STRING_CHARS  # else no string in it can be
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
            if t is str:
                if long and len(value) > MAX_STRING_CHARS:
                    raise EventError(f"field {name!r} has {len(value)} characters, more than {MAX_STRING_CHARS}")
            elif t is float or kind == "float":
                if not -MAX_MAGNITUDE <= value <= MAX_MAGNITUDE:  # false for NaN too
                    raise EventError(f"field {name!r} must be a finite number of magnitude at most "
                                     f"{MAX_MAGNITUDE:g}, got {value:.6g}")
                if t is int:
                    event[name] = float(value)
            elif t is int and not INT64[0] <= value <= INT64[1]:
                raise EventError(f"field {name!r} does not fit a 64-bit integer")
        if now is None:
            now = time.time()
        for name in self.other_times:  # stored as epoch seconds, like the event time
            if get(name) is not None:
                event[name] = self._time(event[name], name, now)
        value = event[self.timestamp_field]
        t = type(value)
        if t is float or t is int:  # to_epoch's rule, inlined for the usual case
            ts = value / 1000.0 if value > MILLIS_ABOVE else float(value)
            if 0.0 <= ts <= now + self.max_future_s:
                return ts, event
        return self._time(value, self.timestamp_field, now), event

    def _time(self, value: Any, name: str, now: float) -> float:
        ts = parse_timestamp(value, name)
        if 0.0 <= ts <= now + self.max_future_s:
            return ts
        if ts < 0.0:
            raise EventError(f"field {name!r} is before 1970 ({ts:.6g})")
        if ts == ts:
            raise EventError(f"field {name!r} is {ts - now:.6g} s ahead of the wall clock "
                             f"(FRESHET_STREAM_MAX_FUTURE_S={self.max_future_s:g})")
        raise EventError(f"field {name!r} must be a finite time")
