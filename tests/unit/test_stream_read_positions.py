"""Which fetched messages the engine's fetch loop takes as new (engine.ReadPositions).

Faust's recovery seeks every partition back to its committed offset after the fetch loop
started, and the consumer fetches in another thread, so a fetch taken before the seek can
arrive after it. Taken for data past a gap, such a record marked the offsets up to it as
done: they were skipped when fetched again (lost), and every one of them was acknowledged
twice, so the partition's commits advanced one offset per commit (a "stalled" partition).
"""

from __future__ import annotations

import asyncio
from typing import NamedTuple

from freshet.stream.engine import ReadPositions



class TP(NamedTuple):
    topic: str
    partition: int


class Consumer:
    """The two seeks of Faust's consumer that move a partition's read position."""

    def __init__(self):
        self.committed = {TP("tx", 0): 5, TP("tx", 1): -1001}  # partition 1: nothing committed
        self.seeks: list[tuple] = []

    async def seek(self, partition, offset: int) -> None:
        self.seeks.append((partition, offset))

    async def seek_to_committed(self) -> dict:
        return dict(self.committed)


def _read(positions: ReadPositions, tp, offsets, before) -> list[str]:
    """The verdicts of a fetch's messages, reading the new ones as the fetch loop does."""
    verdicts = []
    for offset in offsets:
        verdict = positions.admit(tp, offset, None, before)
        if verdict in ("new", "gap"):
            positions.read(tp, offset)
        verdicts.append(verdict)
    return verdicts


def test_a_fetch_taken_before_a_seek_back_is_fetched_again_not_taken_for_a_gap():
    consumer = Consumer()
    positions = ReadPositions(consumer)
    tp = TP("tx", 0)
    before = positions.snapshot()  # a fetch starts ...
    asyncio.run(consumer.seek_to_committed())  # ... recovery seeks back to offset 5 meanwhile ...
    assert positions.admit(tp, 10, 9, before) == "stale"  # ... and the fetch hands over offset 10
    asyncio.run(positions.seek_again(tp))
    assert consumer.seeks == [(tp, 5)]
    # the next fetch reads from 5: every message is new, none is skipped, no gap is made
    assert _read(positions, tp, range(5, 12), positions.snapshot()) == ["new"] * 7


def test_what_was_read_before_a_seek_back_is_not_read_again_nor_made_a_gap():
    consumer = Consumer()
    positions = ReadPositions(consumer)
    tp = TP("tx", 0)
    asyncio.run(consumer.seek_to_committed())
    assert _read(positions, tp, range(5, 9), positions.snapshot()) == ["new"] * 4
    asyncio.run(consumer.seek_to_committed())  # recovery's seek back to the committed offset 5
    assert _read(positions, tp, range(5, 11), positions.snapshot()) == ["old"] * 4 + ["new"] * 2
    positions.forget([tp])  # revoked: the next owner's reads are its own
    asyncio.run(consumer.seek_to_committed())
    assert _read(positions, tp, [5], positions.snapshot()) == ["new"]


def test_a_message_handed_over_twice_is_read_once():
    consumer = Consumer()
    positions = ReadPositions(consumer)
    tp = TP("tx", 0)
    asyncio.run(consumer.seek_to_committed())
    before = positions.snapshot()
    assert _read(positions, tp, [5, 6, 7], before) == ["new"] * 3
    assert _read(positions, tp, [7, 6], before) == ["old", "old"]


def test_offsets_past_the_expected_one_are_a_gap_from_it():
    consumer = Consumer()
    positions = ReadPositions(consumer)
    tp = TP("tx", 0)
    asyncio.run(consumer.seek_to_committed())
    assert positions.admit(tp, 8, 5, positions.snapshot()) == "gap"  # e.g. transaction markers at 5-7
    assert positions.gap_from(tp, 5) == 5
    assert _read(positions, tp, [8, 9], positions.snapshot()) == ["gap", "new"]
    asyncio.run(consumer.seek_to_committed())  # back to 5: 8 and 9 were read, the gap starts after them
    assert positions.admit(tp, 12, None, positions.snapshot()) == "gap"
    assert positions.gap_from(tp, None) == 10


def test_a_partition_never_sought_follows_faust_read_offset():
    positions = ReadPositions(Consumer())
    tp = TP("tx", 1)
    before = positions.snapshot()
    assert positions.admit(tp, 0, None, before) == "new"
    assert positions.admit(tp, 3, 3, before) == "old"
    assert positions.admit(tp, 4, 3, before) == "new"
    assert positions.admit(tp, 6, 3, before) == "gap" and positions.gap_from(tp, 3) == 4


def test_held_messages_dropped_for_the_fetcher_to_deliver_again_are_read_then():
    consumer = Consumer()
    positions = ReadPositions(consumer)
    tp = TP("tx", 0)
    asyncio.run(consumer.seek_to_committed())
    assert _read(positions, tp, range(5, 10), positions.snapshot()) == ["new"] * 5  # then held
    positions.unread(tp, 7)  # released: 5 and 6 kept, 7-9 dropped (the fetcher's position is 7)
    assert _read(positions, tp, range(7, 11), positions.snapshot()) == ["new"] * 4
