"""Table snapshots: each changelog partition's table state in a file, so recovery replays only its tail.

The embedded broker cannot trim a changelog (its DeleteRecords is unimplemented) and each of
its fetches costs time in proportion to the batches a partition holds, so a worker restarted
late in a long run spent minutes reading its changelogs from the start. A snapshot holds every
key and value of one changelog partition as of a changelog offset: recovery loads the newest
valid one and reads the changelog from that offset on (engine.py says when they are taken).

A file is Arrow IPC (keys and values are the changelog's own bytes; no pickle), written to a
temporary file, fsynced and renamed, so a crash leaves the previous snapshot or the new one,
never half of one. Its metadata names the changelog partition, the offset, the broker
incarnation (freshet.kafka.broker_incarnation) and a CRC32 of its contents: a file from another
broker, or one that does not read back whole, is logged and passed over for an older one, or
a full replay.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa

log = logging.getLogger("freshet.stream")

FORMAT = "freshet.table-snapshot/1"
KEEP = 2  # per partition: the newest, and one to fall back on if the newest does not read
SUFFIX = ".arrow"
SCHEMA = pa.schema([("key", pa.binary()), ("value", pa.large_binary()),
                    # the chunk header (chunks.py) of a value whose changelog record was chunked
                    ("chunks", pa.binary())])


class SnapshotError(ValueError):
    """A snapshot file that cannot be used (why, in words)."""


@dataclass
class Snapshot:
    """One changelog partition's table state: every record before `offset` is reflected in
    `rows` (key, value, chunk header or None), so the changelog is read from `offset` on."""

    topic: str
    partition: int
    offset: int
    incarnation: str
    rows: list[tuple[bytes, bytes, bytes | None]]
    sources: dict[str, int] = field(default_factory=dict)  # committed source offsets then (for the log)
    created: float = 0.0


def _crc(table: pa.Table) -> int:
    """CRC32 of every key, value and header with their lengths (what a reader gets back)."""
    crc = 0
    for name in SCHEMA.names:
        column = table.column(name).combine_chunks()
        if len(column) == 0:
            continue
        _, offsets, data = column.buffers()
        width = np.int64 if pa.types.is_large_binary(column.type) else np.int32
        ends = np.frombuffer(offsets, dtype=width)[column.offset:column.offset + len(column) + 1]
        crc = zlib.crc32((ends - ends[0]).tobytes(), crc)
        crc = zlib.crc32(column.is_null().to_numpy(zero_copy_only=False).tobytes(), crc)
        if data is not None and ends[-1] > ends[0]:
            crc = zlib.crc32(memoryview(data)[int(ends[0]):int(ends[-1])], crc)
    return crc


def encode(snapshot: Snapshot) -> tuple[pa.Table, dict[bytes, bytes]]:
    keys, values, headers = zip(*snapshot.rows) if snapshot.rows else ((), (), ())
    table = pa.table([pa.array(keys, pa.binary()), pa.array(values, pa.large_binary()),
                      pa.array(headers, pa.binary())], schema=SCHEMA)
    meta = {"format": FORMAT, "topic": snapshot.topic, "partition": snapshot.partition, "offset": snapshot.offset,
            "incarnation": snapshot.incarnation, "created": snapshot.created or time.time(),
            "rows": table.num_rows, "crc32": _crc(table), "sources": snapshot.sources}
    return table, {b"freshet": orjson.dumps(meta)}


def read(path: Path) -> Snapshot:
    """The snapshot in `path`; SnapshotError when it is not a whole, valid one."""
    try:
        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.open_file(source)
            meta = orjson.loads((reader.schema.metadata or {})[b"freshet"])
            table = reader.read_all()
    except (OSError, pa.ArrowException, KeyError, orjson.JSONDecodeError) as exc:
        raise SnapshotError(f"unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SnapshotError(f"not a {FORMAT} file")
    if not table.schema.equals(SCHEMA):
        raise SnapshotError(f"unexpected columns {table.schema.names}")
    if table.num_rows != meta.get("rows") or _crc(table) != meta.get("crc32"):
        raise SnapshotError("contents do not match their checksum (a damaged file)")
    return Snapshot(meta["topic"], meta["partition"], meta["offset"], meta["incarnation"],
                    list(zip(*(table.column(n).to_pylist() for n in SCHEMA.names))) if table.num_rows else [],
                    meta.get("sources") or {}, meta.get("created") or 0.0)


class TableSnapshots:
    """The snapshot files of one worker's tables under `root`, for one broker incarnation.

    >>> import tempfile
    >>> snaps = TableSnapshots(Path(tempfile.mkdtemp()), incarnation="b1")
    >>> path = snaps.write(Snapshot("app-state-v-changelog", 2, 120, "b1", [(b"card1", b"[2,5.0]", None)]))
    >>> path.name
    '00000000000000000120.arrow'
    >>> found = snaps.newest("app-state-v-changelog", 2)
    >>> found.offset, found.rows
    (120, [(b'card1', b'[2,5.0]', None)])
    >>> TableSnapshots(snaps.root, incarnation="b2").newest("app-state-v-changelog", 2) is None  # another broker
    True
    """

    def __init__(self, root: Path, incarnation: str, keep: int = KEEP):
        self.root = Path(root)
        self.incarnation = incarnation
        self.keep = max(1, keep)
        self._others_removed = False

    def folder(self, topic: str, partition: int) -> Path:
        """Each broker incarnation has its own folder: a new broker's offsets start from 0 again,
        so its snapshots must not be pruned as older than the last broker's."""
        return self.root / self.incarnation / topic / str(partition)

    def files(self, topic: str, partition: int) -> list[Path]:
        """This partition's snapshot files, newest (highest offset) first."""
        try:
            found = [p for p in self.folder(topic, partition).iterdir()
                     if p.suffix == SUFFIX and p.stem.isdigit()]
        except FileNotFoundError:
            return []
        return sorted(found, key=lambda p: int(p.stem), reverse=True)

    def write(self, snapshot: Snapshot) -> Path:
        """Write `snapshot` whole or not at all (temp file, fsync, rename), then prune older ones."""
        folder = self.folder(snapshot.topic, snapshot.partition)
        folder.mkdir(parents=True, exist_ok=True)
        table, meta = encode(snapshot)
        path = folder / f"{snapshot.offset:020d}{SUFFIX}"
        tmp = folder / f".{path.name}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                with pa.ipc.new_file(f, SCHEMA.with_metadata(meta)) as writer:
                    writer.write_table(table)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(folder)
        self.prune(snapshot.topic, snapshot.partition)
        if not self._others_removed:
            self._remove_other_incarnations()
        return path

    def _remove_other_incarnations(self) -> None:
        """Snapshots of a broker that is gone can never be used again: removed, once a
        snapshot of this one exists."""
        self._others_removed = True
        for other in self.root.iterdir():
            if other.is_dir() and other.name != self.incarnation:
                shutil.rmtree(other, ignore_errors=True)
                log.info("removed the table snapshots of an earlier broker incarnation (%s)", other.name)

    def prune(self, topic: str, partition: int) -> None:
        """Keep the newest `keep` snapshots of a partition (and no leftover temp files)."""
        for old in self.files(topic, partition)[self.keep:]:
            old.unlink(missing_ok=True)
        for tmp in self.folder(topic, partition).glob(".*.tmp"):
            if tmp.stat().st_mtime < time.time() - 3600:  # a writer killed mid-write, long ago
                tmp.unlink(missing_ok=True)

    def newest(self, topic: str, partition: int, at_most: int | None = None) -> Snapshot | None:
        """The newest usable snapshot of a partition whose offset is at most `at_most` (the
        changelog's end: a snapshot past it belongs to other data); None for a full replay.
        Files that cannot be used are logged and passed over."""
        for path in self.files(topic, partition):
            try:
                snapshot = read(path)
            except SnapshotError as exc:
                log.warning("table snapshot %s ignored: %s; trying an older one (else the changelog is read "
                            "from its start)", path, exc)
                continue
            if (snapshot.topic, snapshot.partition) != (topic, partition):
                log.warning("table snapshot %s ignored: it holds %s[%d], not %s[%d]", path, snapshot.topic,
                            snapshot.partition, topic, partition)
                continue
            if snapshot.incarnation != self.incarnation:
                log.warning("table snapshot %s ignored: taken on another broker incarnation (%s, now %s), whose "
                            "changelog offsets mean nothing here", path, snapshot.incarnation, self.incarnation)
                continue
            if at_most is not None and snapshot.offset > at_most:
                log.warning("table snapshot %s ignored: its offset %d is past the changelog's end %d (the topic "
                            "was recreated?)", path, snapshot.offset, at_most)
                continue
            return snapshot
        return None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- a table's partitions as snapshot rows, and back -----------------------------------------
#
# Faust's memory store (`table.data`) keeps every key in `.data` and the changelog partition
# each key was recovered from in `._key_partition`; the engine records there, too, the partition
# of each key its checkpoints write, so both directions work per partition.


def table_image(store, chunked: dict, partitions: set[int]) -> dict[int, list[tuple[bytes, bytes, bytes | None]]]:
    """The rows of these partitions of a table's store: (key, value, chunk header of a whole
    value whose changelog record was chunked, else None). Synchronous: a consistent image.

    >>> from types import SimpleNamespace
    >>> store = SimpleNamespace(data={b"a": b"1", b"b": b"2", b"c": b"3"}, _key_partition={b"a": 0, b"b": 1, b"c": 0, b"gone": 0})
    >>> table_image(store, {b"c": ("g1", 2)}, {0})
    {0: [(b'a', b'1', None), (b'c', b'3', b'\\x00chunks ["g1",2]')]}
    """
    from freshet.stream import chunks

    rows: dict[int, list] = {p: [] for p in partitions}
    data = store.data
    for key, partition in list(store._key_partition.items()):
        if partition not in rows:
            continue
        value = data.get(key)
        if value is None:
            continue  # deleted, or joined into its entity's value (chunks.joined)
        header = chunked.get(key)
        rows[partition].append((key, value, None if header is None or chunks.is_header(value)
                                else chunks.HEADER + orjson.dumps(list(header))))
    return rows


def load_partition(store, chunked: dict, partition: int, rows) -> int:
    """Replace one partition's keys in a table's store by a snapshot's rows; returns the rows.

    >>> from types import SimpleNamespace
    >>> store = SimpleNamespace(data={b"a": b"old", b"z": b"9"}, _key_partition={b"a": 0, b"z": 1})
    >>> chunked = {}
    >>> load_partition(store, chunked, 0, [(b"b", b"2", b'\\x00chunks ["g1",2]')])
    1
    >>> store.data, store._key_partition, chunked
    ({b'z': b'9', b'b': b'2'}, {b'z': 1, b'b': 0}, {b'b': ('g1', 2)})
    """
    from freshet.stream import chunks

    data, index = store.data, store._key_partition
    for key in [k for k, p in index.items() if p == partition]:  # what replaying from the start would not give
        data.pop(key, None)
        chunked.pop(key, None)
        del index[key]
    n = 0
    for key, value, header in rows:
        data[key] = value
        index[key] = partition
        if header is not None:
            chunked[key] = chunks.header_of(header)
        n += 1
    return n
