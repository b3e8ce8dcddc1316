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


def _hset_commands(blob: bytes) -> list[list[bytes]]:
    import hiredis

    reader = hiredis.Reader()
    reader.feed(blob)
    commands = []
    while (command := reader.gets()) is not False:
        commands.append(command)
    return commands


@pytest.mark.parametrize("values", [
    {"count_5m": 4, "sum_5m": 12.5, "max_5m": -0.0, "distinct_5m": 300, "last_5m": 7},      # every feature
    {"count_5m": 0, "sum_5m": None, "max_5m": math.nan, "distinct_5m": -1, "last_5m": 2**40},  # a null DOUBLE
    {"sum_5m": 1.0, "count_5m": 2**63 - 1},                                                  # some features
    {"count_5m": None, "sum_5m": math.inf, "max_5m": 3, "distinct_5m": None, "last_5m": 1.5},  # null ints
])
def test_packed_commands_set_the_fields_feast_would(values):
    view = ViewLayout("v", ("card_id",), ("STRING",), {"count_5m": "INT64", "sum_5m": "DOUBLE", "max_5m": "DOUBLE",
                                                       "distinct_5m": "INT64", "last_5m": "DOUBLE"})
    layout = OnlineLayout("freshet", {"v": view})
    rows = [(("c1",), values, 1700000000.25), (("c2",), values, 1700000001.5)]
    blob, replies, n = layout.pack_rows("v", rows)
    commands = _hset_commands(blob)
    assert (replies, n, len(commands)) == (2, 2, 2)
    for (key, row, ts), command in zip(rows, commands):
        assert command[:2] == [b"HSET", layout.entity_key("v", key)]
        fields = dict(zip(command[2::2], command[3::2]))
        assert len(fields) * 2 == len(command) - 2  # no field twice
        assert fields == layout.encode_row("v", row, ts)  # which equals Feast's, above (NaN: the same bytes)


def test_packed_commands_name_an_unknown_feature():
    layout = OnlineLayout("p", {"v": ViewLayout("v", ("card_id",), ("STRING",), {"f": "DOUBLE", "g": "INT64"})})
    with pytest.raises(LayoutError, match="'h'"):
        layout.pack_rows("v", [(("c",), {"f": 1.0, "h": 2}, 0.0)])


def test_varints_at_every_length_boundary_equal_protobuf():
    for bits in range(0, 64, 7):
        for v in {(1 << bits) - 1, 1 << bits, (1 << bits) + 1}:
            if v < 2**63:
                assert encode_value(v, "INT64") == _feast_bytes(v, "INT64"), v
                assert encode_value(-v, "INT64") == _feast_bytes(-v, "INT64"), -v


def test_timestamps_of_one_second_and_of_many_equal_protobuf():
    import random

    rnd = random.Random(3)
    stamps = [1700000000 + rnd.random() for _ in range(200)] + [rnd.uniform(0, 4e9) for _ in range(5000)]
    for t in stamps:
        ts = Timestamp()
        ts.FromDatetime(datetime.fromtimestamp(t, tz=timezone.utc))
        assert encode_timestamp(t) == ts.SerializeToString(), t
