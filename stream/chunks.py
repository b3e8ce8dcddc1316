"""Changelog records under the broker's message limit: a large entity state as chunks.

The broker and Faust refuse messages over about 1 MB, and an entity's state can grow past
that (a merchant's exact distinct cards before the sketch takes over, long distinct
values). A value over CHUNK_BYTES is written as numbered chunk records followed by a
header record under the entity's own key naming them; the chunks carry a fresh
generation in their keys, so a crash between a state's chunks and its header leaves the
previous header pointing at the previous, intact chunks. Chunks a newer state no longer
uses are deleted (tombstones) after its header.
"""

from __future__ import annotations

import os
from typing import Iterator, MutableMapping

import orjson

CHUNK_BYTES = 400 * 1024  # below the producer's 512 KiB batches and the broker's ~1 MB
HEADER = b"\x00chunks "  # encoded states start with "[", never with a NUL byte


def chunk_key(key: bytes, generation: str, i: int) -> bytes:
    return b"%s\x00chunk\x00%s\x00%d" % (key, generation.encode(), i)


def is_header(value: bytes | None) -> bool:
    return value is not None and value[:len(HEADER)] == HEADER


def header_of(value: bytes) -> tuple[str, int]:
    generation, n = orjson.loads(value[len(HEADER):])
    return generation, n


def records(key: bytes, value: bytes, previous: tuple[str, int] | None) -> Iterator[tuple[bytes, bytes | None]]:
    """The changelog records of `key` = `value`: chunks then a header when the value is
    large, else the value itself; then tombstones for the chunks of `previous`.

    >>> list(records(b"k", b"[1,2]", None))
    [(b'k', b'[1,2]')]
    >>> recs = list(records(b"k", b"x" * (2 * CHUNK_BYTES + 1), ("old", 1)))
    >>> [len(v) if v else v for _, v in recs][:3], recs[3][1][:8], recs[4]
    ([409600, 409600, 1], b'\\x00chunks ', (b'k\\x00chunk\\x00old\\x000', None))
    """
    if len(value) <= CHUNK_BYTES:
        yield key, value
    else:
        generation = os.urandom(4).hex()
        n = 0
        for n, start in enumerate(range(0, len(value), CHUNK_BYTES), 1):
            yield chunk_key(key, generation, n - 1), value[start:start + CHUNK_BYTES]
        yield key, HEADER + orjson.dumps([generation, n])
    if previous is not None:
        generation, n = previous
        for i in range(n):
            yield chunk_key(key, generation, i), None


def joined(data: MutableMapping[bytes, bytes], key: bytes, value: bytes) -> tuple[bytes, tuple[str, int]]:
    """A recovered header's value put back together from its chunks in `data` (a table);
    the chunks leave `data` (the whole value replaces the header). Returns (value, header).

    >>> data = dict(records(b"k", b"ab" * CHUNK_BYTES, None))
    >>> value, (gen, n) = joined(data, b"k", data[b"k"])
    >>> value == b"ab" * CHUNK_BYTES, n, list(data)
    (True, 2, [b'k'])
    """
    generation, n = header_of(value)
    whole = b"".join(data.pop(chunk_key(key, generation, i)) for i in range(n))
    data[key] = whole
    return whole, (generation, n)
