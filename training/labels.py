"""The label log: the labels topic copied into Parquet, so a retrain never rereads the whole topic.

Owns the label-log row (`label_row`), where the log lives and `LabelLog` (`sync` copies, `read` reads).

The labels topic is the source of truth. Before each training the worker copies what is new
on it into `offline/labels/<topic>/` of the offline store (freshet.offline_store): part files, then an offsets checkpoint. A
crash in between replays into duplicates that readers drop by (partition, offset). The labels
a model saw can be inspected afterwards.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Mapping

import pandas as pd
import pyarrow as pa

from freshet.contracts import ContractError, Label, json_object
from freshet.offline_store import Location, OfflineStore
from freshet.settings import Settings
from freshet.times import epoch_or_none

log = logging.getLogger("freshet.retrain")

LABEL_COLUMNS = pa.schema([
    ("request_id", pa.string()),
    ("entities", pa.string()),  # JSON object, or null
    ("label", pa.float64()),
    ("ts", pa.timestamp("us", tz="UTC")),  # when the label became known
    ("event_ts", pa.timestamp("us", tz="UTC")),  # the labelled event's own time, when the label says
    ("_partition", pa.int32()),
    ("_offset", pa.int64()),
])


def label_log_path(store: OfflineStore, topic: str) -> Location:
    return store.labels(topic)


def label_row(raw: bytes) -> dict[str, Any]:
    """One freshet.labels/1 message as a label-log row; raises ContractError naming what is wrong.

    >>> r = label_row(b'{"schema": "freshet.labels/1", "request_id": "tx1", "label": 1, "ts": 20, "event_ts": 10}')
    >>> r["request_id"], r["label"], r["ts"], r["event_ts"]
    ('tx1', 1.0, 20.0, 10.0)
    """
    data = json_object(raw)
    event_ts = data.get("event_ts")  # not in the contract: the workload and most producers add it
    label = Label.decode(data)
    value = float(label.label)
    if not math.isfinite(value):
        raise ContractError(f"field 'label' must be finite, got {label.label!r}")
    return {"request_id": label.request_id, "entities": json.dumps(label.entities) if label.entities else None,
            "label": value, "ts": epoch_or_none(label.ts), "event_ts": epoch_or_none(event_ts)}


def _micros(values: list[float | None]) -> pa.Array:
    return pa.array([None if v is None else int(round(v * 1e6)) for v in values], pa.timestamp("us", tz="UTC"))


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.table({
        "request_id": pa.array([r["request_id"] for r in rows], pa.string()),
        "entities": pa.array([r["entities"] for r in rows], pa.string()),
        "label": pa.array([r["label"] for r in rows], pa.float64()),
        "ts": _micros([r["ts"] for r in rows]),
        "event_ts": _micros([r["event_ts"] for r in rows]),
        "_partition": pa.array([r["_partition"] for r in rows], pa.int32()),
        "_offset": pa.array([r["_offset"] for r in rows], pa.int64()),
    }, schema=LABEL_COLUMNS)


class LabelLog:
    """The labels topic as Parquet part files: `sync` appends what is new, `read` gives each label once."""

    CHECKPOINT = "_offsets.json"
    PREFIX = "labels"  # part file names
    GROUP = "freshet-label-log"

    def __init__(self, settings: Settings, topic: str | None = None):
        self.settings = settings
        self.topic = topic or settings.topic_labels
        self.root = label_log_path(OfflineStore.of(settings), self.topic)
        self.rejected = 0
        self.copied: list[dict[str, Any]] = []  # the rows the last sync copied

    def offsets(self) -> dict[int, int]:
        """The next offset to copy, per partition."""
        path = self.root / self.CHECKPOINT
        if not path.is_file():
            return {}
        return {int(p): int(o) for p, o in json.loads(path.read_text()).items()}

    def _save_offsets(self, offsets: Mapping[int, int]) -> None:
        (self.root / self.CHECKPOINT).write_text(json.dumps({str(p): o for p, o in sorted(offsets.items())}))

    def sync(self, timeout: float = 60.0) -> int:
        """Copy the labels published since the last sync, up to the topic's end; returns how many."""
        from freshet import kafka
        from freshet.stream.offline import append_parts

        kafka.ensure_topics(self.settings, [self.topic])
        consumer = kafka.consumer(self.settings, self.GROUP, **{"enable.partition.eof": True})
        try:
            offsets = self.offsets()
            pending = self._assign(consumer, offsets)
            rows = self._copy(consumer, offsets, pending, timeout)
            self.copied = rows
            if rows:
                append_parts(self.root, self._table(rows), "ts", prefix=self.PREFIX)
            self._save_offsets(offsets)  # after the parts: a crash in between only duplicates
            return len(rows)
        finally:
            consumer.close()

    def try_sync(self, timeout: float = 60.0) -> int:
        """Like `sync`, but a failure copies nothing and is logged: a training goes on with the labels it has."""
        try:
            return self.sync(timeout)
        except Exception as exc:  # noqa: BLE001 - train on the labels already copied
            log.warning("could not copy new labels from %s (%s); using the label log as it is", self.topic, exc)
            return 0

    def _assign(self, consumer: Any, offsets: Mapping[int, int]) -> set[int]:
        """Assign every partition from where the last sync stopped (or its first offset); returns them."""
        from confluent_kafka import TopicPartition

        meta = consumer.list_topics(self.topic, timeout=10).topics[self.topic]
        assignment = []
        for p in sorted(meta.partitions):
            low, _ = consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10)
            assignment.append(TopicPartition(self.topic, p, max(offsets.get(p, low), low)))
        consumer.assign(assignment)
        return {tp.partition for tp in assignment}

    def _copy(self, consumer: Any, offsets: dict[int, int], pending: set[int], timeout: float) -> list[dict]:
        """Label-log rows of what the consumer reads, advancing `offsets`, until the `pending` partitions end.

        Reads until every partition reports its end or nothing comes for a moment; not up to the
        end offsets listed first: the embedded broker lists a topic's end as its last batch's base
        offset + 1.
        """
        from confluent_kafka import KafkaError

        rows: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            msgs = consumer.consume(10_000, 0.3)
            if not msgs:
                break
            for msg in msgs:
                err = msg.error()
                if err is None:
                    row = self._row(msg, offsets)
                    if row is not None:
                        rows.append(row)
                elif err.code() == KafkaError._PARTITION_EOF:
                    # a partition that reached its end once is done: labels keep arriving while the
                    # copy runs, and chasing them would hold a training back until the timeout
                    pending.discard(msg.partition())
                else:
                    log.warning("label log: %s", err)
        if pending and time.monotonic() >= deadline:
            log.warning("label log: %s not fully copied within %.0fs; the next sync continues", self.topic, timeout)
        return rows

    def _row(self, msg: Any, offsets: dict[int, int]) -> dict[str, Any] | None:
        """The message as a row, or None (counted and logged) if it breaks the contract; its offset counts as copied."""
        p, off = msg.partition(), msg.offset()
        offsets[p] = off + 1
        try:
            row = self._decode(msg.value())
        except (ContractError, TypeError, ValueError) as exc:
            self.rejected += 1
            if self.rejected <= 10 or self.rejected % 1000 == 0:
                log.warning("label log: skipping %s[%d]@%d (%s); %d skipped so far",
                            self.topic, p, off, exc, self.rejected)
            return None
        row["_partition"], row["_offset"] = p, off
        return row

    # what a subclass copying another topic changes: the row of a message, the table of rows
    _decode = staticmethod(label_row)
    _table = staticmethod(_table)

    def read(self, files: list[Location] | None = None) -> pd.DataFrame:
        """Every label once (a later label for the same request id replaces an earlier one)."""
        from freshet.stream.offline import read_parts

        table = read_parts(self.root, files=files)  # files: only these parts (a snapshot)
        if table is None:
            return pd.DataFrame({f.name: pd.Series(dtype=object) for f in LABEL_COLUMNS})
        df = table.to_pandas()
        df = df.drop_duplicates(["_partition", "_offset"]).sort_values(["_partition", "_offset"], kind="stable")
        keyed = df["request_id"].notna()
        return pd.concat([df[keyed].drop_duplicates("request_id", keep="last"), df[~keyed]]).reset_index(drop=True)
