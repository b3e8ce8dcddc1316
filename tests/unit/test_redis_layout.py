"""freshet's hand-written Feast Redis layout is byte-equal to Feast's own protobuf encoding."""

from __future__ import annotations

import doctest
import math
from datetime import datetime, timezone

import pytest
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import _mmh3
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value
from feast.type_map import feast_value_type_to_python_type, python_values_to_proto_values
from feast.value_type import ValueType
from google.protobuf.timestamp_pb2 import Timestamp

from freshet import redis_layout
from freshet.redis_layout import (
    LayoutError, OnlineLayout, ViewLayout, decode_timestamp, decode_value, encode_timestamp, encode_value,
    field_hash,
)

SAMPLES = {
    "DOUBLE": [0.0, -0.0, 1.5, -123456.789, 1e-300, 1e300, math.inf, -math.inf, 3],
    "FLOAT": [0.0, 1.5, -2.25, 3.4e38, 1e-3],
    "INT64": [0, 1, 127, 128, 300, 16383, 16384, 2**31, 2**63 - 1, -1, -2**63, -300],
    "INT32": [0, 1, 127, 128, 2**31 - 1, -1, -2**31],
    "BOOL": [True, False],
    "STRING": ["", "a", "card-123", "ünïcødé €", "x" * 200, "y" * 20000],
    "BYTES": [b"", b"\x00\x01", b"z" * 300],
    "UNIX_TIMESTAMP": [datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)],
    "DOUBLE_LIST": [[1.0, 2.5]],
    "STRING_LIST": [["a", "b"]],
}


def _feast_bytes(value, dtype: str) -> bytes:
    return python_values_to_proto_values([value], ValueType[dtype])[0].SerializeToString()


@pytest.mark.parametrize("dtype", list(SAMPLES))
def test_value_bytes_equal_feast_protobuf_serialization(dtype):
    for value in SAMPLES[dtype]:
        assert encode_value(value, dtype) == _feast_bytes(value, dtype), (dtype, value)


@pytest.mark.parametrize("dtype", list(SAMPLES))
def test_decoded_value_equals_what_feast_returns(dtype):
    for value in SAMPLES[dtype]:
        raw = _feast_bytes(value, dtype)
        assert decode_value(raw) == feast_value_type_to_python_type(Value.FromString(raw)), (dtype, value)


def test_nan_round_trips_and_null_is_an_empty_value():
    assert math.isnan(decode_value(encode_value(math.nan, "DOUBLE")))
    assert encode_value(None, "DOUBLE") == Value().SerializeToString() == b""
    assert decode_value(b"") is None and decode_value(None) is None


def test_float_value_decodes_to_the_float32_feast_returns():
    raw = encode_value(0.1, "FLOAT")
    assert decode_value(raw) == feast_value_type_to_python_type(Value.FromString(raw))


@pytest.mark.parametrize("when", [
    datetime(2024, 1, 1, tzinfo=timezone.utc),
    datetime(2024, 1, 1, 12, 30, 1, 123456, tzinfo=timezone.utc),
    datetime(1970, 1, 1, tzinfo=timezone.utc),
    datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=timezone.utc),
    datetime(2024, 6, 1, 8, 0, 0, 999999),  # naive means UTC, as in Feast's make_tzaware
])
def test_timestamp_bytes_equal_feast_from_datetime_and_float_seconds(when):
    ts = Timestamp()
    ts.FromDatetime(when if when.tzinfo else when.replace(tzinfo=timezone.utc))
    assert encode_timestamp(when) == ts.SerializeToString()
    aware = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    assert encode_timestamp(aware.timestamp()) == ts.SerializeToString()
    assert decode_timestamp(ts.SerializeToString()) == pytest.approx(aware.timestamp(), abs=1e-6)


def test_float_seconds_round_to_the_microsecond_datetime_would():
    for t in (1700000000.1234565, 1700000000.9999996, 1.5e9 + 1e-7):
        assert encode_timestamp(t) == encode_timestamp(datetime.fromtimestamp(t, tz=timezone.utc))


def test_absent_timestamp_field_is_none_but_epoch_zero_is_zero():
    assert decode_timestamp(None) is None
    assert decode_timestamp(b"") == 0.0


def test_field_hash_equals_feast_mmh3():
    for name in ("card_txn_stats:sum_amount_300s", "v:ü", "a" * 100 + ":b"):
        assert field_hash(*name.split(":", 1)) == _mmh3(name)


def _entity_key(keys: dict) -> EntityKey:
    values = []
    for v in keys.values():
        values.append(Value(string_val=v) if isinstance(v, str) else Value(int64_val=v))
    return EntityKey(join_keys=list(keys), entity_values=values)


@pytest.mark.parametrize("keys,types", [
    ({"card_id": "c1"}, ("STRING",)),
    ({"card_id": "ünï"}, ("STRING",)),
    ({"user": 42}, ("INT64",)),
    ({"user": -7}, ("INT64",)),
    ({"merchant_id": "m9", "card_id": "c1"}, ("STRING", "STRING")),  # sorted by join key name
    ({"z": 5, "a": "x", "m": 6}, ("INT64", "STRING", "INT64")),
])
def test_entity_key_equals_feast_serialization_v3_plus_project(keys, types):
    view = ViewLayout("v", tuple(keys), types, {"f": "DOUBLE"})
    layout = OnlineLayout("freshet", {"v": view})
    expected = serialize_entity_key(_entity_key(keys), entity_key_serialization_version=3) + b"freshet"
    assert layout.entity_key("v", tuple(keys.values())) == expected


def test_row_fields_equal_what_feast_online_write_batch_sets():
    view = ViewLayout("card_txn_stats", ("card_id",), ("STRING",),
                      {"count_5m": "INT64", "sum_5m": "DOUBLE", "country": "STRING"})
    layout = OnlineLayout("freshet", {"card_txn_stats": view})
    when = datetime(2024, 3, 1, 10, 0, 0, 250000, tzinfo=timezone.utc)
    row = layout.encode_row("card_txn_stats", {"count_5m": 4, "sum_5m": None, "country": "FR"}, when)
    ts = Timestamp()
    ts.FromDatetime(when)
    assert row == {
        b"_ts:card_txn_stats": ts.SerializeToString(),
        _mmh3("card_txn_stats:count_5m"): Value(int64_val=4).SerializeToString(),
        _mmh3("card_txn_stats:sum_5m"): Value().SerializeToString(),
        _mmh3("card_txn_stats:country"): Value(string_val="FR").SerializeToString(),
    }


def test_unknown_view_feature_or_bad_key_are_errors_naming_them():
    layout = OnlineLayout("p", {"v": ViewLayout("v", ("card_id",), ("STRING",), {"f": "DOUBLE"})})
    with pytest.raises(LayoutError, match="'nope'"):
        layout.encode_row("nope", {}, 0)
    with pytest.raises(LayoutError, match="'g'"):
        layout.encode_row("v", {"g": 1.0}, 0)
    with pytest.raises(LayoutError, match="card_id"):
        layout.entity_key("v", (12,))


def test_layout_builds_from_registry_view_specs():
    from freshet.features import AggregationSpec, ViewSpec

    spec = ViewSpec(
        name="card_txn_stats", join_keys=("card_id",), join_key_types=("STRING",), ttl_s=60, topic="t",
        timestamp_field="event_ts", source_schema={}, lateness_s=0, offline_path="",
        aggregations=(AggregationSpec("sum_amount_300s", "amount", "sum", 300, 60, "DOUBLE"),),
    )
    layout = OnlineLayout("freshet", {"card_txn_stats": spec})
    assert layout.views["card_txn_stats"].features == {"sum_amount_300s": "DOUBLE"}
    assert layout.views["card_txn_stats"].ttl_s == 60


def test_module_examples_run():
    failures, _ = doctest.testmod(redis_layout)
    assert failures == 0


def test_encoding_keeps_up_with_the_stream_engine():
    """20 features per row: encoding alone must leave room for >= 20k rows/s on one core."""
    import time

    features = {f"f{i}": ("INT64" if i % 3 == 0 else "DOUBLE") for i in range(20)}
    layout = OnlineLayout("freshet", {"v": ViewLayout("v", ("card_id",), ("STRING",), features)})
    row = {f: (i if features[f] == "INT64" else i * 1.5) for i, f in enumerate(features)}
    n = 5000
    start = time.perf_counter()
    for i in range(n):
        layout.entity_key("v", (f"card-{i}",))
        layout._codecs["v"].encode(row, 1.7e9 + i)
    rate = n / (time.perf_counter() - start)
    assert rate > 40_000, f"{rate:.0f} rows/s"
