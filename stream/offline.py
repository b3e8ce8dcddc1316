"""The offline store as the stream writes it: immutable Parquet part files.

Feast's file store rewrites the whole file on every write (docs/architecture.md), so the stream
appends part files instead (write, then atomic rename) under `date=YYYY-MM-DD/`
directories that Feast's FileSource and pyarrow datasets read as one table.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

PARTITION = "date"
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 1.0
WAITING_LOG_S = 5.0

log = logging.getLogger("freshet.stream")


def raw_log_path(data_dir: Path, topic: str) -> Path:
    return Path(data_dir) / "offline" / "raw" / topic


def append_parts(root: Path, table: pa.Table, ts_column: str, prefix: str = "part") -> list[Path]:
    """Append `table` as one part file per UTC date of `ts_column`; returns the files written."""
    if table.num_rows == 0:
        return []
    root = Path(root)
    span = pc.min_max(table[ts_column])
    first, last = (pc.strftime(span[end], format="%Y-%m-%d").as_py() for end in ("min", "max"))
    if first == last:  # the usual case: no per-row date strings
        parts = [(first, table)]
    else:
        dates = pc.strftime(table[ts_column], format="%Y-%m-%d")
        parts = [(d, table.filter(pc.equal(dates, d))) for d in pc.unique(dates).to_pylist()]
    written = []
    for date, part in parts:
        directory = root / f"{PARTITION}={date}"
        directory.mkdir(parents=True, exist_ok=True)
        name = f"{prefix}-{uuid.uuid4().hex}.parquet"
        tmp = directory / f".{name}.tmp"
        try:
            pq.write_table(part, tmp, compression="zstd")
            os.replace(tmp, directory / name)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk must not keep half a part
            raise
        written.append(directory / name)
    return written


def part_files(root: Path) -> list[Path]:
    """The part files under `root` in the order `read_parts` reads them (hidden temp files skipped)."""
    root = Path(root)
    if not root.exists():
        return []
    return sorted((p for p in root.rglob("*.parquet") if not p.name.startswith(".")), key=str)


def read_parts(root: Path, columns: list[str] | None = None, files: list[Path] | None = None) -> pa.Table | None:
    """All part files under `root` (or exactly `files`, in that order) as one table, or None if empty."""
    paths = [str(p) for p in (part_files(root) if files is None else files)]
    if not paths:
        return None
    dataset = ds.dataset(paths, format="parquet")
    return dataset.to_table(columns=columns)


class PartBuffer:
    """Collects tables per dataset; `take` empties it and `write` makes the part files.

    The engine writes what it took before every offset commit, so whatever Kafka considers
    consumed is already on disk; a crash before that replays into new parts, and
    readers drop the duplicates by (partition, offset).
    """

    def __init__(self, max_rows: int = 200_000):
        self.max_rows = max_rows
        self._pending: dict[tuple[str, str], list[pa.Table]] = {}
        self.rows = 0

    def add(self, root: Path | str, table: pa.Table, ts_column: str) -> bool:
        """Queue a table; True when the buffer is full and should be written now."""
        self._pending.setdefault((str(root), ts_column), []).append(table)
        self.rows += table.num_rows
        return self.rows >= self.max_rows

    def take(self) -> dict:
        """What is queued (for `write`), leaving the buffer empty."""
        pending, self._pending, self.rows = self._pending, {}, 0
        return pending

    @staticmethod
    def write(pending: dict) -> list[Path]:
        """Write what `take` returned; Arrow leaves the GIL while it encodes, so another thread may."""
        written = []
        for (root, ts_column), tables in pending.items():
            written += append_parts(Path(root), pa.concat_tables(tables, promote_options="permissive"), ts_column)
        return written

    @staticmethod
    def write_patiently(pending: dict) -> list[Path]:
        """`write`, each dataset retried with capped backoff while the disk refuses it (full,
        read-only for a while): the caller, and the offset commit after it, wait, logging why."""
        written, delay, since, logged = [], RETRY_FIRST_S, None, 0.0
        pending = dict(pending)
        while pending:
            (root, ts_column), tables = next(iter(pending.items()))
            try:
                written += append_parts(Path(root), pa.concat_tables(tables, promote_options="permissive"),
                                        ts_column)
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
