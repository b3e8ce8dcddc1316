"""Each source partition's watermark as of every offset a replay may start from.

Lateness is judged against the partition's latest event time so far; a replay (after a
crash, a rebalance or a seek) must judge each event against the watermark as it was
before that event in the first run, not against the later one in memory, or already
counted events become "late". The watermark after each micro-batch is kept, keyed by
the offset the next batch starts at, from the last committed offset on; the commit
checkpoints these marks with the table states, so a new owner resumes exactly.
"""

from __future__ import annotations

import logging

import orjson

log = logging.getLogger("freshet.stream")

MAX_MARKS = 4096  # per partition between two commits (batches are ~50 ms: minutes of them)
RECORD_PREFIX = b"\x00freshet:watermarks:"  # never an entity key: those are UTF-8 text or JSON


def record_key(topic: str, partition: int) -> bytes:
    """The changelog key a source partition's marks are checkpointed under.

    >>> record_key("tx", 3)
    b'\\x00freshet:watermarks:tx:3'
    """
    return RECORD_PREFIX + f"{topic}:{partition}".encode()


class WatermarkMarks:
    """Marks (next offset, watermark before it) of the source partitions one worker reads.

    >>> marks = WatermarkMarks()
    >>> marks.resume("tx", 0, 0, None, None)            # a fresh partition: no watermark yet
    >>> marks.after("tx", 0, 10, 100.0); marks.after("tx", 0, 20, 150.0)
    >>> marks.resume("tx", 0, 20, 150.0, None)          # the next batch: the watermark goes on
    150.0
    >>> stored = marks.record("tx", 0)                  # checkpointed, read back by a new owner
    >>> WatermarkMarks().resume("tx", 0, 20, None, stored)
    150.0
    >>> marks.resume("tx", 0, 10, 150.0, None)          # replayed from offset 10: as it was then
    100.0
    """

    def __init__(self):
        self.marks: dict[tuple[str, int], list[tuple[int, float | None]]] = {}
        self.changed: set[tuple[str, int]] = set()

    def resume(self, topic: str, partition: int, offset: int, current: float | None,
               stored: bytes | None) -> float | None:
        """The watermark the event at `offset` is judged by, given the one in memory and the
        checkpointed record (`record`) of this partition."""
        marks = self.marks.get((topic, partition))
        if marks and marks[-1][0] == offset:
            return current  # the batch after the last one: nothing replayed or skipped
        known = list(marks or ())
        if stored:
            known += [tuple(m) for m in orjson.loads(stored)]
        exact = [wm for n, wm in known if n == offset]
        if exact:
            wm = exact[-1]
        else:
            # no mark there (no checkpoint from its last owner): the highest one before it is
            # a lower bound, so nothing the first run accepted is judged late now
            below = [wm for n, wm in known if n <= offset and wm is not None]
            wm = max(below, default=None)
            if any(n > offset for n, _ in known):  # a replay the marks do not reach back to
                log.info("watermark of %s[%d] at offset %d: no mark there, resuming from %s",
                         topic, partition, offset, wm)
        self.marks[(topic, partition)] = [(offset, wm)]
        return wm

    def after(self, topic: str, partition: int, next_offset: int, watermark: float | None) -> None:
        """Record the watermark after a batch whose last event was at `next_offset` - 1."""
        marks = self.marks.setdefault((topic, partition), [])
        if marks and marks[-1][0] == next_offset:
            marks[-1] = (next_offset, watermark)
        else:
            marks.append((next_offset, watermark))
        if len(marks) > MAX_MARKS:
            del marks[1:len(marks) - MAX_MARKS + 1]  # the oldest (the committed one) stays
        self.changed.add((topic, partition))

    def committed(self, topic: str, partition: int, offset: int) -> None:
        """The group committed `offset`: no replay starts before it any more."""
        marks = self.marks.get((topic, partition))
        if marks:
            kept = [m for m in marks if m[0] >= offset]
            self.marks[(topic, partition)] = kept or marks[-1:]

    def record(self, topic: str, partition: int) -> bytes:
        """The checkpoint of one partition's marks (JSON [[next offset, watermark], ...])."""
        self.changed.discard((topic, partition))
        return orjson.dumps(self.marks.get((topic, partition), []))

    def forget(self, topic: str, partition: int) -> None:
        """The partition left this worker: whoever reads it next resumes from the checkpoint."""
        self.marks.pop((topic, partition), None)
        self.changed.discard((topic, partition))
