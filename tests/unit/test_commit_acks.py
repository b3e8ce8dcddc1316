"""A commit that does not happen gives back the acknowledgements it took.

Faust's own bookkeeping (`_filter_committable_offsets`, `_new_offset`, `_should_commit`,
`ack`'s rule) runs here on a consumer holding only the state those methods read: the
engine's commit takes offsets with them, and a commit that raises or is cancelled before
Faust records the offset must leave the partition committable again.
"""

from __future__ import annotations

from collections import defaultdict

from faust.transport.consumer import Consumer as FaustConsumer
from faust.types import TP
from intervaltree import IntervalTree

from freshet.stream.engine import first_acked, give_back_acks

T0, T1 = TP("events", 0), TP("events", 1)


class Bookkeeping:
    """The acknowledgement state of Faust's consumer, with Faust's methods over it."""

    _filter_committable_offsets = FaustConsumer._filter_committable_offsets
    _new_offset = FaustConsumer._new_offset
    _should_commit = FaustConsumer._should_commit

    def __init__(self, assigned=(T0, T1)):
        self._acked = defaultdict(list)
        self._acked_index = defaultdict(set)
        self._gap = defaultdict(IntervalTree)
        self._committed_offset = defaultdict(lambda: None)
        self.assigned = set(assigned)

    def assignment(self):
        return set(self.assigned)

    def ack(self, tp, *offsets):
        for offset in offsets:
            committed = self._committed_offset[tp]
            if (committed is None or offset >= committed) and offset not in self._acked_index[tp]:
                self._acked_index[tp].add(offset)
                self._acked[tp].append(offset)

    def take(self):
        first = first_acked(self)
        return first, self._filter_committable_offsets(list(self._acked))

    def committed(self, offsets):  # what Faust's _commit_offsets records, done or refused
        self._committed_offset.update({tp: o for tp, o in offsets.items() if tp in self.assigned})


def test_a_commit_that_failed_leaves_the_partition_committable_with_later_acks():
    c = Bookkeeping()
    c._committed_offset[T0] = 10
    c.ack(T0, *range(10, 20))
    first, offsets = c.take()
    assert offsets == {T0: 20} and not c._acked[T0]  # Faust took the run
    c.ack(T0, *range(20, 25))  # processing goes on while the commit awaits
    give_back_acks(c, first, offsets)  # ... which then raised
    assert c._acked[T0] == list(range(10, 25))
    assert c.take()[1] == {T0: 25}


def test_without_the_give_back_the_partition_is_stuck_for_good():
    # the failure the give-back prevents, on Faust's own rule: acks past a hole never commit
    c = Bookkeeping()
    c._committed_offset[T0] = 10
    c.ack(T0, *range(10, 20))
    c.take()
    c.ack(T0, *range(20, 25))
    assert c.take()[1] == {}
    c.ack(T0, *range(25, 30))
    assert c.take()[1] == {}


def test_a_commit_recorded_by_faust_is_not_given_back():
    c = Bookkeeping()
    c._committed_offset[T0] = 10
    c.ack(T0, *range(10, 20))
    first, offsets = c.take()
    c.committed(offsets)  # committed, or refused and recorded as Faust does
    give_back_acks(c, first, offsets)
    assert not c._acked[T0]
    c.ack(T0, 20, 21)
    assert c.take()[1] == {T0: 22}


def test_a_partition_revoked_during_the_commit_is_left_to_its_next_owner():
    c = Bookkeeping()
    c.ack(T0, *range(0, 5))
    c.ack(T1, *range(0, 3))
    first, offsets = c.take()
    assert offsets == {T0: 5, T1: 3}
    c.assigned.discard(T1)
    c._acked.pop(T1)  # Faust's revocation drops the partition's bookkeeping
    give_back_acks(c, first, offsets)
    assert c._acked[T0] == [0, 1, 2, 3, 4] and T1 not in c._acked


def test_offsets_a_gap_filled_are_given_back_too():
    c = Bookkeeping()
    c._committed_offset[T0] = 10
    c.ack(T0, 10, 11)
    c._gap[T0].addi(12, 15)  # e.g. transaction markers: not data
    c.ack(T0, 15, 16)
    first, offsets = c.take()
    assert offsets == {T0: 17}
    give_back_acks(c, first, offsets)
    assert c.take()[1] == {T0: 17}
