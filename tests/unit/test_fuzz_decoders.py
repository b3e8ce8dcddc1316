"""Properties of what reads untrusted bytes: the event decoder and the message contracts take any
input to a value or their own clear error (EventError, ContractError), never another exception."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from freshet.contracts import (
    ContractError, DeadLetter, DriftAlert, Label, Message, ModelEvent, Prediction, RetrainRequest,
)
from freshet.features import AggregationSpec, ViewSpec
from freshet.stream.events import EventDecoder, EventError

BOUNDED = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NOW = 1_800_000_000.0
VIEW = ViewSpec("card_txn_stats", ("card_id",), ("STRING",), 0, "transactions", "event_ts",
                {"card_id": "string", "merchant_id": "string", "amount": "float", "count": "int",
                 "online": "bool", "event_ts": "timestamp", "settled_at": "timestamp"}, 0,
                (AggregationSpec("sum_amount_60s", "amount", "sum", 60, 60, "DOUBLE"),), "")
DECODER = EventDecoder([VIEW], max_future_s=300, max_event_bytes=10_000)
FIELDS = ["card_id", "merchant_id", "amount", "count", "online", "event_ts", "settled_at", "schema", "request_id",
          "model", "label", "ts", "kind", "alert_id", "entities", "features", "prediction", "reason", "version"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=30), st.sampled_from(["2026-01-01T00:00:00Z", "not a time", "1e999", ""]))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=8)), inner,
                                                 max_size=5)), max_leaves=20)
objects = st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=8)), json_values, max_size=10)


def as_bytes(value) -> bytes:
    """JSON text as a producer might send it: NaN, Infinity and integers beyond 64 bits included."""
    return json.dumps(value).encode()


# -- the event decoder --------------------------------------------------------------------------

def _decodes_or_says_why(raw: bytes) -> None:
    try:
        ts, event = DECODER.decode(raw, now=NOW)
    except EventError as exc:
        assert str(exc)
        return
    assert isinstance(event, dict) and math.isfinite(ts) and 0.0 <= ts <= NOW + 300
    assert isinstance(event["card_id"], str) and -1e100 <= event["amount"] <= 1e100


@BOUNDED
@given(st.binary(max_size=300))
@example(b"")
@example(b'{"card_id": "c", "amount": 1, "event_ts": 1}' + b" " * 20_000)
@example(b'{"card_id": "c", "amount": 1, "event_ts": 1, "x": ' + b"[" * 1000 + b"]" * 1000 + b"}")
@example(b'{"card_id": "c", "amount": NaN, "event_ts": 1}')
@example(b'{"card_id": "c", "amount": 1, "event_ts": 99999999999999999999999}')
def test_any_bytes_decode_to_an_event_or_an_event_error(raw):
    _decodes_or_says_why(raw)


@BOUNDED
@given(objects)
@example({"card_id": "c", "amount": 1e308, "event_ts": NOW})
@example({"card_id": "c", "amount": 3, "event_ts": [1]})
@example({"card_id": "c", "amount": 3, "event_ts": True, "settled_at": {"a": 1}})
def test_any_json_object_decodes_to_an_event_or_an_event_error(obj):
    _decodes_or_says_why(as_bytes(obj))


@BOUNDED
@given(card=st.text(min_size=1, max_size=50), amount=st.floats(-1e100, 1e100), ts=st.floats(0, NOW))
def test_a_well_formed_event_always_decodes_with_its_own_time(card, amount, ts):
    decoded_ts, event = DECODER.decode(as_bytes({"card_id": card, "amount": amount, "event_ts": ts}), now=NOW)
    assert event["card_id"] == card and event["amount"] == amount
    assert decoded_ts == pytest.approx(ts if ts <= 1e11 else ts / 1000.0)


# -- the message contracts ----------------------------------------------------------------------

CONTRACTS: list[type[Message]] = [DeadLetter, Prediction, Label, DriftAlert, RetrainRequest, ModelEvent]


def _message_or_contract_error(cls: type[Message], raw) -> None:
    try:
        msg = cls.decode(raw)
    except ContractError as exc:
        assert str(exc)
        return
    assert isinstance(msg, cls)
    assert cls.decode(msg.encode()) == msg  # what decodes, encodes back to itself


@pytest.mark.parametrize("cls", CONTRACTS, ids=lambda c: c.__name__)
@BOUNDED
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200)))
def test_any_bytes_or_text_decode_to_a_message_or_a_contract_error(cls, raw):
    _message_or_contract_error(cls, raw)


@pytest.mark.parametrize("cls", CONTRACTS, ids=lambda c: c.__name__)
@BOUNDED
@given(obj=objects, tagged=st.booleans())
def test_any_json_object_decodes_to_a_message_or_a_contract_error(cls, obj, tagged):
    if tagged:
        obj = {**obj, "schema": cls.SCHEMA}
    _message_or_contract_error(cls, as_bytes(obj))
    _message_or_contract_error(cls, obj)
