"""The offline store as the stream writes it: immutable Parquet part files.

Feast's file store rewrites the whole file on every write (docs/architecture.md), so the stream
appends part files instead (each appearing whole: freshet.offline_store) under `date=YYYY-MM-DD/`
directories that Feast's FileSource and pyarrow datasets read as one table, on this host's disk
or on an S3-compatible object store.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from freshet.offline_store import Location, OfflineStore, as_location, read_table

PARTITION = "date"
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 1.0
WAITING_LOG_S = 5.0
# Rows queued as Python objects (RowBatches) are made into an Arrow table once this many wait
# for a write: a commit held up (a full disk) then holds ~200 bytes a row, not ~1.5 KB
ROWS_AS_OBJECTS = 50_000

log = logging.getLogger("freshet.stream")


def raw_log_path(where: OfflineStore | Path | str, topic: str) -> Location:
    """The raw log of `topic` in an offline store, or under `<where>/offline` when given a data dir."""
    store = where if isinstance(where, OfflineStore) else OfflineStore.local(Path(where) / "offline")
    return store.raw(topic)


def append_parts(root: Location | Path | str, table: pa.Table, ts_column: str, prefix: str = "part") -> list[Location]:
    """Append `table` as one part file per UTC date of `ts_column`; returns the files written."""
    if table.num_rows == 0:
        return []
    root = as_location(root)
    span = pc.min_max(table[ts_column])
    first, last = (pc.strftime(span[end], format="%Y-%m-%d").as_py() for end in ("min", "max"))
    if first == last:  # the usual case: no per-row date strings
        parts = [(first, table)]
    else:
        dates = pc.strftime(table[ts_column], format="%Y-%m-%d")
        parts = [(d, table.filter(pc.equal(dates, d))) for d in pc.unique(dates).to_pylist()]
    written = []
    for date, part in parts:
        file = root / f"{PARTITION}={date}" / f"{prefix}-{uuid.uuid4().hex}.parquet"
        file.write_parquet(part)  # whole or not at all, on a disk or an object store
        written.append(file)
    return written


def part_files(root: Location | Path | str) -> list[Location]:
    """The part files under `root` in the order `read_parts` reads them (hidden temp files skipped)."""
    return as_location(root).parts()


def read_parts(root: Location | Path | str, columns: list[str] | None = None,
               files: list[Location] | None = None) -> pa.Table | None:
    """All part files under `root` (or exactly `files`, in that order) as one table, or None if empty."""
    return read_table(part_files(root) if files is None else [as_location(f) for f in files], columns)


class RowBatches:
    """Rows of several micro-batches for one dataset, made into one table when written.

    `build(segments)` turns [(rows, created), ...] into a table: one Arrow conversion per column
    per write instead of per micro-batch, whose fixed cost (a `pa.array` per column, the
    timestamp casts) was most of a small batch's offline cost. Rows whose values Arrow cannot
    hold (the Redis encoding of the same row refuses them first) are left out with an error
    rather than holding up every commit after them.
    """

    def __init__(self, build: Callable[[list], pa.Table]):
        self.build = build
        self.segments: list[tuple[list, float]] = []
        self.rows = 0

    def table(self) -> pa.Table | None:
        try:
            return self.build(self.segments)
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
            kept = [([row], created) for rows, created in self.segments for row in rows if self._fits(row, created)]
            log.error("offline rows: %d of %d cannot be written (%s: %s); the rest are",
                      sum(len(rows) for rows, _ in self.segments) - len(kept),
                      sum(len(rows) for rows, _ in self.segments), type(exc).__name__, exc)
            return self.build(kept) if kept else None

    def _fits(self, row, created: float) -> bool:
        try:
            self.build([([row], created)])
            return True
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            return False


def tables_of(entries: list) -> list[pa.Table]:
    """The queued tables, rows made into tables (none for rows that all failed)."""
    tables = [e.table() if isinstance(e, RowBatches) else e for e in entries]
    return [t for t in tables if t is not None]


class PartBuffer:
    """Collects tables (or rows, RowBatches) per dataset; `take` empties it and `write` makes the part files.

    The engine writes what it took before every offset commit, so whatever Kafka considers
    consumed is already on disk; a crash before that replays into new parts, and
    readers drop the duplicates by (partition, offset).
    """

    def __init__(self, max_rows: int = 200_000):
        self.max_rows = max_rows
        self._pending: dict[tuple[Location, str], list[pa.Table]] = {}
        self.rows = 0

    def add(self, root: Location | Path | str, table: pa.Table, ts_column: str) -> bool:
        """Queue a table; True when the buffer is full and should be written now."""
        self._pending.setdefault((as_location(root), ts_column), []).append(table)
        self.rows += table.num_rows
        return self.rows >= self.max_rows

    def add_rows(self, root: Location | Path | str, rows: list, created: float, ts_column: str,
                 build: Callable[[list], pa.Table]) -> bool:
        """Queue rows that `build` makes into a table when written (RowBatches); rows queued
        one after another with the same `build` become one table. True when the buffer is full."""
        entries = self._pending.setdefault((as_location(root), ts_column), [])
        if not (entries and isinstance(entries[-1], RowBatches) and entries[-1].build is build):
            entries.append(RowBatches(build))
        last = entries[-1]
        last.segments.append((rows, created))
        last.rows += len(rows)
        if last.rows >= ROWS_AS_OBJECTS:  # a stalled commit keeps Arrow tables, not Python rows
            entries[-1] = last.table()
            if entries[-1] is None:
                entries.pop()
        self.rows += len(rows)
        return self.rows >= self.max_rows

    def take(self) -> dict:
        """What is queued (for `write`), leaving the buffer empty."""
        pending, self._pending, self.rows = self._pending, {}, 0
        return pending

    @staticmethod
    def write(pending: dict) -> list[Location]:
        """Write what `take` returned; Arrow leaves the GIL while it encodes, so another thread may."""
        written = []
        for (root, ts_column), tables in pending.items():
            made = tables_of(tables)
            if made:
                written += append_parts(root, pa.concat_tables(made, promote_options="permissive"), ts_column)
        return written

    @staticmethod
    def write_patiently(pending: dict) -> list[Location]:
        """`write`, each dataset retried with capped backoff while the disk refuses it (full,
        read-only for a while): the caller, and the offset commit after it, wait, logging why."""
        written, delay, since, logged = [], RETRY_FIRST_S, None, 0.0
        pending = {dataset: made for dataset, entries in pending.items() if (made := tables_of(entries))}
        while pending:
            (root, ts_column), tables = next(iter(pending.items()))
            try:
                written += append_parts(root, pa.concat_tables(tables, promote_options="permissive"), ts_column)
            except OSError as exc:
                now = time.monotonic()
                if since is None or now - logged >= WAITING_LOG_S:
                    log.warning("offline store: cannot write parts under %s (%s); the offset commit waits, "
                                "retrying%s", root, exc, "" if since is None else f" ({now - since:.0f} s so far)")
                    since = since or now
                    logged = now
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            del pending[(root, ts_column)]
        if since is not None:
            log.warning("offline store: parts written again after %.1f s", time.monotonic() - since)
        return written
