"""Feast's Redis online-store layout, encoded and decoded without Feast on the hot path.

Owns the bytes: entity keys (serialization v3 + project), hash fields (mmh3 of
`view:feature`, `_ts:view`) and ValueProto / Timestamp values, byte-equal to
feast/infra/online_stores/redis.py, so Feast and freshet read each other's rows.

The common scalar types (DOUBLE, FLOAT, INT64, INT32, BOOL, STRING, BYTES) are
hand-encoded in protobuf wire format because the stream engine writes ~20k rows/s
and `ValueProto.SerializeToString` per value would dominate; anything else goes
through Feast's own converters.

>>> layout = OnlineLayout("freshet", {"card_txn_stats": ViewLayout(
...     "card_txn_stats", ("card_id",), ("STRING",), {"count_amount_300s": "INT64"}, ttl_s=3600)})
>>> layout.entity_key("card_txn_stats", ("c1",))
b'\\x01\\x00\\x00\\x00\\x02\\x00\\x00\\x00\\x07\\x00\\x00\\x00card_id\\x02\\x00\\x00\\x00\\x02\\x00\\x00\\x00c1freshet'
>>> fields = layout.encode_row("card_txn_stats", {"count_amount_300s": 3}, 1700000000.5)
>>> layout.decode_row("card_txn_stats", ["count_amount_300s"],
...                   [fields[layout.field("card_txn_stats", "count_amount_300s")], fields[b"_ts:card_txn_stats"]])
(1700000000.5, [3])
"""

from __future__ import annotations

import asyncio
import math
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Generator, Iterable, Mapping, Sequence

import mmh3
import redis
from redis.commands.core import Script
from redis.crc import key_slot

_U32 = struct.Struct("<I")
_U32x2 = struct.Struct("<II")
_I64 = struct.Struct("<q")
_I32 = struct.Struct("<i")
_F64 = struct.Struct("<d")
_F32 = struct.Struct("<f")

# feast.types.Value ValueType numbers (Value.proto), as written into entity keys.
VALUE_TYPES = {"BYTES": 1, "STRING": 2, "INT32": 3, "INT64": 4, "DOUBLE": 5, "FLOAT": 6, "BOOL": 7,
               "UNIX_TIMESTAMP": 8}

# Protobuf tags (field number << 3 | wire type) of the Value oneof members encoded by hand.
_TAG_BYTES, _TAG_STRING, _TAG_INT32, _TAG_INT64 = 0x0A, 0x12, 0x18, 0x20
_TAG_DOUBLE, _TAG_FLOAT, _TAG_BOOL = 0x29, 0x35, 0x38

_MASK64 = (1 << 64) - 1
_SMALL_VARINTS = [bytes((i,)) for i in range(128)]
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


# (join key values in the view's join key order, {feature: value}, event time)
Row = tuple[Sequence[Any], Mapping[str, Any], "float | datetime"]


class LayoutError(ValueError):
    """A row does not fit the registry: unknown view or feature, or a key of the wrong shape."""


# ---------------------------------------------------------------------------
# protobuf wire format, just the parts Value and Timestamp use
# ---------------------------------------------------------------------------

def _varint(v: int) -> bytes:
    if 0 <= v < 0x800000000:  # up to five bytes (any timestamp's seconds and nanos), unrolled
        if v < 0x80:
            return _SMALL_VARINTS[v]
        if v < 0x4000:
            return bytes((v & 0x7F | 0x80, v >> 7))
        if v < 0x200000:
            return bytes((v & 0x7F | 0x80, v >> 7 & 0x7F | 0x80, v >> 14))
        if v < 0x10000000:
            return bytes((v & 0x7F | 0x80, v >> 7 & 0x7F | 0x80, v >> 14 & 0x7F | 0x80, v >> 21))
        return bytes((v & 0x7F | 0x80, v >> 7 & 0x7F | 0x80, v >> 14 & 0x7F | 0x80, v >> 21 & 0x7F | 0x80,
                      v >> 28))
    v &= _MASK64  # negative ints are ten-byte two's complement, as protobuf writes them
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _read_varint(b: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = b[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= (1 << 63) else v


def _enc_double(v: Any) -> bytes:
    return b"\x29" + _F64.pack(v)


def _enc_float(v: Any) -> bytes:
    return b"\x35" + _F32.pack(v)


def _enc_int64(v: Any) -> bytes:
    return b"\x20" + _varint(int(v))


def _enc_int32(v: Any) -> bytes:
    return b"\x18" + _varint(int(v))


def _enc_bool(v: Any) -> bytes:
    return b"\x38\x01" if v else b"\x38\x00"


def _enc_string(v: Any) -> bytes:
    raw = v.encode("utf-8")
    return b"\x12" + _varint(len(raw)) + raw


def _enc_bytes(v: Any) -> bytes:
    raw = bytes(v)
    if not raw:
        return b""  # Feast's converter stores empty bytes as null
    return b"\x0a" + _varint(len(raw)) + raw


def _proto_encoder(dtype: str) -> Callable[[Any], bytes]:
    from feast.type_map import python_values_to_proto_values
    from feast.value_type import ValueType

    value_type = ValueType[dtype]

    def encode(v: Any) -> bytes:
        return python_values_to_proto_values([v], value_type)[0].SerializeToString()

    return encode


_ENCODERS: dict[str, Callable[[Any], bytes]] = {
    "DOUBLE": _enc_double, "FLOAT": _enc_float, "INT64": _enc_int64, "INT32": _enc_int32,
    "BOOL": _enc_bool, "STRING": _enc_string, "BYTES": _enc_bytes,
}


def value_encoder(dtype: str) -> Callable[[Any], bytes]:
    """The function turning a python value of Feast type `dtype` into ValueProto bytes (not None)."""
    return _ENCODERS.get(dtype) or _proto_encoder(dtype)


def encode_value(value: Any, dtype: str) -> bytes:
    """ValueProto bytes for one value; None is Feast's null (an empty Value, zero bytes)."""
    return b"" if value is None else value_encoder(dtype)(value)


def _decode_proto(b: bytes) -> Any:
    from feast.protos.feast.types.Value_pb2 import Value
    from feast.type_map import feast_value_type_to_python_type

    return feast_value_type_to_python_type(Value.FromString(b))


def decode_value(b: bytes | None) -> Any:
    """The python value of ValueProto bytes as Feast's get_online_features returns it (None for null)."""
    if not b:
        return None
    tag = b[0]
    if tag == _TAG_DOUBLE and len(b) == 9:
        return _F64.unpack_from(b, 1)[0]
    if tag == _TAG_INT64 or tag == _TAG_INT32:
        v, end = _read_varint(b, 1)
        if end == len(b):
            return _signed64(v)
    elif tag == _TAG_STRING or tag == _TAG_BYTES:
        n, start = _read_varint(b, 1)
        if start + n == len(b):
            raw = b[start:]
            return raw.decode("utf-8") if tag == _TAG_STRING else raw
    elif tag == _TAG_FLOAT and len(b) == 5:
        return _F32.unpack_from(b, 1)[0]
    elif tag == _TAG_BOOL and len(b) == 2:
        return b[1] != 0
    return _decode_proto(b)


def _ts_parts(ts: float | int | datetime) -> tuple[int, int]:
    if isinstance(ts, datetime):
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=timezone.utc)  # Feast's make_tzaware treats naive as UTC
        delta = ts - _EPOCH
        return delta.days * 86400 + delta.seconds, delta.microseconds * 1000
    # Same rounding as datetime.fromtimestamp, so a float written here and a datetime
    # written by Feast land on the same microsecond.
    frac, whole = math.modf(ts)
    us = round(frac * 1e6)
    seconds = int(whole)
    if us >= 1_000_000:
        seconds, us = seconds + 1, us - 1_000_000
    elif us < 0:
        seconds, us = seconds - 1, us + 1_000_000
    return seconds, us * 1000


def encode_timestamp(ts: float | int | datetime, _seconds: dict = {}) -> bytes:  # noqa: B006 - a memo
    """google.protobuf.Timestamp bytes at microsecond precision, as Feast writes `_ts:<view>`."""
    seconds, nanos = _ts_parts(ts)
    head = _seconds.get(seconds)
    if head is None:  # the rows of a batch mostly share their second
        if len(_seconds) > 4096:
            _seconds.clear()
        head = _seconds[seconds] = b"\x08" + _varint(seconds) if seconds else b""
    return head + b"\x10" + _varint(nanos) if nanos else head


def timestamp_parts(b: bytes | None) -> tuple[int, int] | None:
    """(seconds, nanos) of Timestamp bytes; None when the field is absent."""
    if b is None:
        return None
    seconds = nanos = 0
    pos, end = 0, len(b)
    while pos < end:
        tag = b[pos]
        value, pos = _read_varint(b, pos + 1)
        if tag == 0x08:
            seconds = _signed64(value)
        elif tag == 0x10:
            nanos = value
    return seconds, nanos


def decode_timestamp(b: bytes | None) -> float | None:
    """Seconds since the epoch of Timestamp bytes; None when the field is absent."""
    parts = timestamp_parts(b)
    return None if parts is None else parts[0] + parts[1] / 1e9


# ---------------------------------------------------------------------------
# keys and fields
# ---------------------------------------------------------------------------

def field_hash(view: str, feature: str) -> bytes:
    """The hash field of one feature: murmur3_32 of "view:feature", little endian (Feast's _mmh3)."""
    return mmh3.hash(f"{view}:{feature}", signed=False).to_bytes(4, "little")


def ts_field(view: str) -> bytes:
    return f"_ts:{view}".encode()


def _key_value_bytes(value: Any, value_type: str) -> bytes:
    if value_type == "STRING":
        if not isinstance(value, str):
            raise LayoutError(f"join key value {value!r} must be a string")
        return value.encode("utf-8")
    if value_type in ("INT64", "UNIX_TIMESTAMP", "INT32"):
        if isinstance(value, bool) or not isinstance(value, int):
            try:
                import numpy as np

                if isinstance(value, np.integer):
                    value = int(value)
                else:
                    raise TypeError
            except TypeError:
                raise LayoutError(f"join key value {value!r} must be an integer") from None
        return (_I32 if value_type == "INT32" else _I64).pack(value)
    if value_type == "BYTES":
        return bytes(value)
    raise LayoutError(f"join keys of type {value_type} are not supported by Feast's entity key encoding")


def stored_name(view: str, version: int) -> str:
    """Where version `version` of `view` is stored online: Feast's name for it with online
    versioning on (freshet.feature_versions; the version's feature log is named so too).

    >>> stored_name("card_txn_stats", 0), stored_name("card_txn_stats", 2)
    ('card_txn_stats', 'card_txn_stats_v2')
    """
    return f"{view}_v{version}" if version > 0 else view


@dataclass(frozen=True)
class ViewLayout:
    """What the layout needs to know of one feature view."""

    name: str
    join_keys: tuple[str, ...]
    join_key_types: tuple[str, ...]  # Feast ValueType names
    features: dict[str, str] = field(default_factory=dict)  # feature -> Feast ValueType name
    ttl_s: int = 0
    # the name its rows are stored under when not `name`: `<view>_v<N>` for version N of a view
    # (Feast's versioned online naming; freshet.feature_versions)
    stored: str = ""

    @property
    def stored_name(self) -> str:
        return self.stored or self.name

    @classmethod
    def from_spec(cls, spec: Any) -> "ViewLayout":
        """From a freshet.features.ViewSpec (or anything that already is a ViewLayout)."""
        if isinstance(spec, ViewLayout):
            return spec
        stored = getattr(spec, "stored_name", spec.name)
        return cls(spec.name, tuple(spec.join_keys), tuple(spec.join_key_types),
                   {a.name: a.dtype for a in spec.aggregations}, spec.ttl_s, "" if stored == spec.name else stored)

    @classmethod
    def from_feast(cls, fv: Any) -> "ViewLayout":
        """From a Feast FeatureView / StreamFeatureView."""
        cols = list(fv.entity_columns)
        keys = tuple(c.name for c in cols)
        # a stream feature view's schema lists its join keys among its features: they are not
        version = int(getattr(fv, "current_version_number", None) or 0)
        return cls(
            fv.name, keys, tuple(c.dtype.to_value_type().name for c in cols),
            {f.name: f.dtype.to_value_type().name for f in fv.features if f.name not in keys},
            int(fv.ttl.total_seconds()) if fv.ttl else 0, stored_name(fv.name, version) if version > 0 else "",
        )


class _ViewCodec:
    """Per-view precomputed bytes: key prefix, hash fields and encoders."""

    def __init__(self, view: ViewLayout, project: bytes):
        self.view = view
        self.project = project
        order = sorted(range(len(view.join_keys)), key=lambda i: view.join_keys[i])
        self.key_order = order
        self.key_types = [view.join_key_types[i] for i in order]
        prefix = [_U32.pack(len(order))]
        for i in order:
            k = view.join_keys[i].encode("utf-8")
            prefix += [_U32x2.pack(VALUE_TYPES["STRING"], len(k)), k]
        self.key_prefix = b"".join(prefix)
        self.type_codes = []
        for t in self.key_types:
            if t not in VALUE_TYPES:
                raise LayoutError(f"view {view.name!r}: join key type {t} is not supported by Feast's "
                                  "entity key encoding")
            self.type_codes.append(VALUE_TYPES[t])
        self.single_string = len(order) == 1 and self.key_types[0] == "STRING"
        self.ts_field = ts_field(view.stored_name)
        self.ts_field_resp = _bulk(self.ts_field)
        self.fields = {f: field_hash(view.stored_name, f) for f in view.features}
        # feature -> (hash field, the same as a RESP bulk string, kind, encoder); kind 1 and 2
        # (DOUBLE, INT64) are inlined in the loops below: a call per value costs more than the work
        self.encoders = {
            f: (self.fields[f], _bulk(self.fields[f]), _KINDS.get(t, 0), value_encoder(t))
            for f, t in view.features.items()
        }
        # A row holding every feature, its DOUBLEs all set (the stream engine's rows), packs
        # them with one precompiled struct: the framing and hash fields between the values
        # are constant, so the DOUBLEs are [chunk, value, chunk, value, ..., chunk].
        self.doubles = [f for f, t in view.features.items() if t == "DOUBLE"]
        self.others = [f for f, t in view.features.items() if t != "DOUBLE"]
        self.other_codes = [self.encoders[f] for f in self.others]
        chunks, glue = [], b""
        for f in self.doubles:
            chunks.append(glue + _bulk(self.fields[f]) + b"$9\r\n\x29")
            glue = b"\r\n"
        chunks.append(glue)
        self.double_row = struct.Struct("<" + "".join(f"{len(c)}sd" for c in chunks[:-1]) + f"{len(glue)}s")
        self.double_args: list = [None] * (2 * len(chunks) - 1)
        self.double_args[0::2] = chunks

    def key(self, values: Sequence[Any]) -> bytes:
        if self.single_string:
            v = values[0]
            if type(v) is not str:
                raise LayoutError(f"view {self.view.name!r}: join key {self.view.join_keys[0]!r} "
                                  f"value {v!r} must be a string")
            raw = v.encode("utf-8")
            return b"".join((self.key_prefix, _U32x2.pack(2, len(raw)), raw, self.project))
        if len(values) != len(self.key_order):
            raise LayoutError(f"view {self.view.name!r} needs {len(self.key_order)} join key values "
                              f"{self.view.join_keys}, got {len(values)}")
        out = [self.key_prefix]
        for i, t, code in zip(self.key_order, self.key_types, self.type_codes):
            raw = _key_value_bytes(values[i], t)
            out += [_U32x2.pack(code, len(raw)), raw]
        out.append(self.project)
        return b"".join(out)

    def _lookup(self, name: str) -> tuple:
        try:
            return self.encoders[name]
        except KeyError:
            raise LayoutError(f"view {self.view.name!r} has no feature {name!r}") from None

    def encode(self, values: Mapping[str, Any], event_ts: Any) -> list[bytes]:
        """Flat [field, value, field, value, ...] for HSET, timestamp first."""
        args = [self.ts_field, encode_timestamp(event_ts)]
        append = args.append
        encoders = self.encoders
        for name, value in values.items():
            fkey, _, kind, enc = encoders.get(name) or self._lookup(name)
            append(fkey)
            if value is None:
                append(b"")
            elif kind == 1:
                append(b"\x29" + _F64.pack(value))
            elif kind == 2 and type(value) is int and 0 <= value < 0x80:
                append(_SMALL_INT64[value])
            else:
                append(enc(value))
        return args

    def pack(self, head: tuple[bytes, int], key: bytes, values: Mapping[str, Any], event_ts: Any,
             out: list[bytes]) -> None:
        """Append one `<command> key ts-field ts field value ...` in RESP to `out`.

        `head` is (the command's RESP prefix with a %d for the element count, the count
        without the feature pairs).
        """
        ts = encode_timestamp(event_ts)
        append = out.append
        append(b"%s$%d\r\n%s\r\n%s$%d\r\n%s\r\n" % (
            head[0] % (head[1] + 2 * len(values)), len(key), key, self.ts_field_resp, len(ts), ts))
        pairs = None  # ((hash field, RESP field, kind, encoder), value) still to append
        if self.doubles and len(values) == len(self.encoders):
            try:
                doubles = [values[f] for f in self.doubles]
                others = [values[f] for f in self.others]
            except KeyError:  # another feature in its place: the general path names it
                pass
            else:
                if None not in doubles:
                    args = self.double_args.copy()
                    args[1::2] = doubles
                    append(self.double_row.pack(*args))
                    pairs = zip(self.other_codes, others)
        if pairs is None:
            encoders = self.encoders
            pairs = ((encoders.get(name) or self._lookup(name), value) for name, value in values.items())
        for (_, fresp, kind, enc), value in pairs:
            append(fresp)
            if value is None:
                append(b"$0\r\n\r\n")
            elif kind == 1:
                append(b"$9\r\n\x29" + _F64.pack(value) + b"\r\n")
            elif kind == 2 and type(value) is int and 0 <= value < 0x80:
                append(_SMALL_INT64_RESP[value])
            else:
                raw = enc(value)
                append(b"$%d\r\n%s\r\n" % (len(raw), raw))


def _bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


_KINDS = {"DOUBLE": 1, "INT64": 2}
_SMALL_INT64 = [b"\x20" + v for v in _SMALL_VARINTS]
_SMALL_INT64_RESP = [_bulk(v) for v in _SMALL_INT64]


# Writes the row only when its timestamp is not older than the stored one, in one
# round trip; Feast's online_write_batch does the same in two (read, then write).
_WRITE_IF_NEWER = """
local function varint(s, pos)
  local result, mul = 0, 1
  while true do
    local b = string.byte(s, pos)
    result = result + (b % 128) * mul
    pos = pos + 1
    if b < 128 then return result, pos end
    mul = mul * 128
  end
end
local function parse(s)
  local sec, nanos, pos = 0, 0, 1
  while pos <= #s do
    local tag = string.byte(s, pos)
    local v
    v, pos = varint(s, pos + 1)
    if tag == 8 then sec = v elseif tag == 16 then nanos = v end
  end
  return sec, nanos
end
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local osec, onanos = parse(old)
  local nsec, nnanos = parse(ARGV[2])
  if nsec < osec or (nsec == osec and nnanos < onanos) then return 0 end
end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""


# ---------------------------------------------------------------------------
# one round trip, written once for the redis-py client and its asyncio twin
# ---------------------------------------------------------------------------

def _exchange(pool: Any, blob: bytes, replies: int) -> Generator:
    """Send `blob` on one pooled connection and read its `replies`; raises the first error reply.

    Yields each connection call's result: run it with `_run` or `_run_async`.
    """
    conn = yield pool.get_connection()
    try:
        yield conn.send_packed_command([blob])
        error = None
        for _ in range(replies):
            try:
                yield conn.read_response()
            except redis.ResponseError as exc:  # read every reply so the connection stays in sync
                error = error or exc
        if error:
            raise error
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        yield conn.disconnect()
        raise
    finally:
        yield pool.release(conn)


async def _exchange_node(node: Any, blob: bytes, replies: int) -> None:
    """`_exchange` on one primary of a redis.asyncio cluster client (its ClusterNode's connections)."""
    conn = node.acquire_connection()
    error = None
    try:
        await conn.send_packed_command([blob])
        for _ in range(replies):
            try:
                await conn.read_response()
            except redis.ResponseError as exc:  # read every reply so the connection stays in sync
                error = error or exc
    except BaseException:  # failed or cancelled mid-reply: the connection is out of step with its replies
        await conn.disconnect()
        raise
    finally:
        node.release(conn)
    if error:
        raise error


def _run(steps: Generator) -> Any:
    """The value of `steps` on a sync client, whose calls return their result."""
    try:
        result = next(steps)
        while True:
            result = steps.send(result)
    except StopIteration as done:
        return done.value


async def _run_async(steps: Generator) -> Any:
    """The value of `steps` on an asyncio client: each call's awaitable is awaited and its result,
    or its error, handed back, so the steps' own except and finally clauses run as in sync code."""
    try:
        step = next(steps)
        while True:
            try:
                result = await step
            except BaseException as exc:  # cancellation too: the steps release their connection
                step = steps.throw(exc)
            else:
                step = steps.send(result)
    except StopIteration as done:
        return done.value


class OnlineLayout:
    """Feast's Redis layout for one project's feature views: the writer and the decoder.

    `views` maps view name to a freshet ViewSpec, a ViewLayout or a Feast FeatureView.
    `key_ttl_s` mirrors Feast's `key_ttl_seconds` (expire whole entity keys).
    """

    def __init__(self, project: str, views: Mapping[str, Any], key_ttl_s: int | None = None):
        self.project = project
        self.key_ttl_s = key_ttl_s
        project_b = project.encode("utf-8")
        self._codecs: dict[str, _ViewCodec] = {}
        for name, v in views.items():
            lay = ViewLayout.from_spec(v) if hasattr(v, "aggregations") or isinstance(v, ViewLayout) \
                else ViewLayout.from_feast(v)
            self._codecs[name] = _ViewCodec(lay, project_b)
        # what a redis-py pipeline loads before executing (its `scripts`), and the EVALSHA digest
        self._write_if_newer = Script(None, _WRITE_IF_NEWER.encode())

    @classmethod
    def from_registry(cls, registry: Any, key_ttl_s: int | None = None) -> "OnlineLayout":
        """From freshet.features.FeatureRegistry (every stream feature view)."""
        return cls(registry.project, registry.views, key_ttl_s)

    @property
    def views(self) -> dict[str, ViewLayout]:
        return {n: c.view for n, c in self._codecs.items()}

    def _codec(self, view: str) -> _ViewCodec:
        try:
            return self._codecs[view]
        except KeyError:
            raise LayoutError(f"unknown feature view {view!r}; known: {', '.join(self._codecs)}") from None

    # -- keys and fields ----------------------------------------------------

    def entity_key(self, view: str, key_values: Sequence[Any]) -> bytes:
        """The Redis key of one entity of `view`; values in the view's join key order."""
        return self._codec(view).key(key_values)

    def field(self, view: str, feature: str) -> bytes:
        try:
            return self._codec(view).fields[feature]
        except KeyError:
            raise LayoutError(f"view {view!r} has no feature {feature!r}") from None

    def ts_field(self, view: str) -> bytes:
        return self._codec(view).ts_field

    # -- writing ------------------------------------------------------------

    def encode_row(self, view: str, values: Mapping[str, Any], event_ts: float | datetime) -> dict[bytes, bytes]:
        """The hash fields and values one row sets (what HSET gets)."""
        args = self._codec(view).encode(values, event_ts)
        return dict(zip(args[::2], args[1::2]))

    def write_rows(self, pipe: Any, view: str, rows: Iterable[Row], only_newer: bool = False) -> int:
        """Queue one HSET per row on a redis-py pipeline, sync or asyncio (Redis Cluster too).

        A row is (join key values in the view's join key order, {feature: value}, event
        time as epoch seconds or datetime). Features left out keep their stored value; a
        None value is written as Feast's null. With `only_newer`, a row older than the
        stored `_ts:<view>` is skipped inside Redis (a Lua script), so a replay after a crash
        cannot move a feature back in time. The caller executes the pipeline; returns the
        number of rows queued.
        """
        codec = self._codec(view)
        ttl = self.key_ttl_s
        command = self._row_command(pipe) if only_newer else ("HSET",)
        n = 0
        for key_values, values, event_ts in rows:
            key = codec.key(key_values)
            pipe.execute_command(*command, key, *codec.encode(values, event_ts))
            if ttl:
                pipe.expire(key, ttl)
            n += 1
        return n

    def _row_command(self, pipe: Any) -> tuple:
        """The only_newer command on `pipe`, before a row's key and fields."""
        scripts = getattr(pipe, "scripts", None)
        if scripts is None:  # a cluster pipeline cannot load a script first: EVAL (cached by Redis)
            return ("EVAL", _WRITE_IF_NEWER, 1)
        scripts.add(self._write_if_newer)  # a redis-py pipeline loads its scripts before executing
        return ("EVALSHA", self._write_if_newer.sha, 1)

    def write(self, client: Any, view: str, rows: Iterable[Row], only_newer: bool = False) -> int:
        """Write rows now, in one round trip on one pooled connection; returns the rows written.

        Same rows and semantics as `write_rows`, about twice as fast: the commands are
        packed here instead of by redis-py. A Redis Cluster client goes through a pipeline.
        """
        return _run(self._writing(client, view, rows, only_newer))

    async def write_async(self, client: Any, view: str, rows: Iterable[Row], only_newer: bool = False) -> int:
        """`write` for a redis.asyncio client (the stream engine's event loop), Redis Cluster too."""
        if hasattr(client, "nodes_manager") and not only_newer:
            return await self._write_cluster(client, view, rows)
        return await _run_async(self._writing(client, view, rows, only_newer))

    async def _write_cluster(self, client: Any, view: str, rows: Iterable[Row]) -> int:
        """Rows grouped by the primary that owns their key's slot, each group packed as `write`
        packs and sent on one of that primary's connections, every primary at once.

        A group its primary redirects (MOVED after a resharding or a failover, ASK while its
        slot migrates) is written again through redis-py's cluster pipeline, which follows
        redirections and refreshes the slot map: rows are whole, so writing one twice leaves
        the same row.
        """
        await client.initialize()
        codec = self._codec(view)
        slots = client.nodes_manager.slots_cache  # slot -> [primary, replicas...]
        key_of = codec.key
        groups: dict[str, list] = {}  # by node name: a ClusterNode hashes in Python, per row
        primaries: dict[str, Any] = {}
        for key_values, values, event_ts in rows:
            key = key_of(key_values)
            owners = slots.get(key_slot(key))
            if not owners:
                raise redis.exceptions.SlotNotCoveredError(f"slot {key_slot(key)} has no primary in the Redis Cluster")
            name = owners[0].name
            group = groups.get(name)
            if group is None:
                group = groups[name] = []
                primaries[name] = owners[0]
            group.append((key, values, event_ts))
        if not groups:
            return 0
        ttl = self.key_ttl_s
        one_at_a_time = asyncio.Lock()

        async def redirected(keyed: list) -> None:
            # One redirected share at a time: two pipelines refreshing the slot map at once while
            # a slot migrates made redis-py bounce between ASK and the old owner until its
            # redirection budget ran out ("TTL exhausted", seen once under load). A slot in flux
            # settles: tried again twice, after 0.1 and 0.3 s.
            async with one_at_a_time:
                for pause in (0.1, 0.3, None):
                    pipe = client.pipeline(transaction=False)
                    for key, values, event_ts in keyed:
                        pipe.execute_command("HSET", key, *codec.encode(values, event_ts))
                        if ttl:
                            pipe.expire(key, ttl)
                    try:
                        await pipe.execute()
                        return
                    except (redis.exceptions.ClusterError, redis.exceptions.AskError, redis.exceptions.MovedError,
                            redis.exceptions.TryAgainError):
                        if pause is None:
                            raise
                        await asyncio.sleep(pause)

        async def send(node: Any, keyed: list) -> int:
            blob, replies, n = self._pack_keyed(codec, keyed, False)
            try:
                await _exchange_node(node, blob, replies)
            except (redis.exceptions.MovedError, redis.exceptions.AskError, redis.exceptions.TryAgainError):
                await redirected(keyed)
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                client._initialize = True  # a primary gone (failed over?): read the slot map again
                raise
            return n

        done = await asyncio.gather(*(send(primaries[name], keyed) for name, keyed in groups.items()),
                                    return_exceptions=True)
        for result in done:
            if isinstance(result, BaseException):
                raise result
        return sum(done)

    def _writing(self, client: Any, view: str, rows: Iterable[Row], only_newer: bool) -> Generator:
        """`write` for either client: yields each client call's result (an awaitable from asyncio's)."""
        if not hasattr(client, "connection_pool"):  # Redis Cluster: no one connection to pack for
            pipe = client.pipeline(transaction=False)
            n = self.write_rows(pipe, view, rows, only_newer)
            yield pipe.execute()
            return n
        blob, replies, n = self.pack_rows(view, rows, only_newer)
        if n:
            try:
                yield from _exchange(client.connection_pool, blob, replies)
            except redis.exceptions.NoScriptError:
                # every EVALSHA failed alike, so nothing was written: load the script and resend
                yield client.script_load(_WRITE_IF_NEWER)
                yield from _exchange(client.connection_pool, blob, replies)
        return n

    def pack_rows(self, view: str, rows: Iterable[Row], only_newer: bool = False) -> tuple[bytes, int, int]:
        """The rows as RESP commands: (bytes to send, replies to read, rows) for any transport."""
        codec = self._codec(view)
        return self._pack_keyed(codec, ((codec.key(r[0]), r[1], r[2]) for r in rows), only_newer)

    def _pack_keyed(self, codec: _ViewCodec, rows: Iterable[tuple[bytes, Mapping[str, Any], Any]],
                    only_newer: bool) -> tuple[bytes, int, int]:
        """`pack_rows` of rows whose entity keys are made already: (key, {feature: value}, event time)."""
        sha = self._write_if_newer.sha.encode()
        head = (b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n" + sha + b"\r\n$1\r\n1\r\n", 6) if only_newer \
            else (b"*%d\r\n$4\r\nHSET\r\n", 4)
        ttl = _bulk(str(self.key_ttl_s).encode()) if self.key_ttl_s else None
        out: list[bytes] = []
        replies = n = 0
        for key, values, event_ts in rows:
            codec.pack(head, key, values, event_ts, out)
            replies += 1
            if ttl:
                out.append(b"*3\r\n$6\r\nEXPIRE\r\n%s%s" % (_bulk(key), ttl))
                replies += 1
            n += 1
        return b"".join(out), replies, n

    # -- reading ------------------------------------------------------------

    def read_fields(self, view: str, features: Sequence[str]) -> list[bytes]:
        """The HMGET field list for `features` of `view`, the `_ts:<view>` field last."""
        codec = self._codec(view)
        try:
            return [codec.fields[f] for f in features] + [codec.ts_field]
        except KeyError as exc:
            raise LayoutError(f"view {view!r} has no feature {exc.args[0]!r}") from None

    def decode_row(self, view: str, features: Sequence[str],
                   reply: Sequence[bytes | None]) -> tuple[float | None, list[Any]]:
        """(event time in epoch seconds or None if the entity has no row, values) of one HMGET reply."""
        ts = decode_timestamp(reply[len(features)])
        return ts, [decode_value(b) for b in reply[: len(features)]]

    def read_rows(self, client: Any, view: str, keys: Iterable[Sequence[Any]],
                  features: Sequence[str] | None = None) -> list[tuple[float | None, dict[str, Any]]]:
        """Read entities back (one pipelined round trip); a missing entity gives (None, {})."""
        codec = self._codec(view)
        features = list(features or codec.view.features)
        fields = self.read_fields(view, features)
        pipe = client.pipeline(transaction=False)
        for k in keys:
            pipe.hmget(codec.key(k), fields)
        out = []
        for reply in pipe.execute():
            ts, values = self.decode_row(view, features, reply)
            out.append((ts, dict(zip(features, values)) if ts is not None else {}))
        return out
