"""Messages fetched while the stream's flow is stopped are processed once, unless fetched again."""

from __future__ import annotations

from dataclasses import dataclass

from freshet.stream.engine import HeldMessages


@dataclass(frozen=True)
class Message:
    topic: str
    partition: int
    offset: int

    @property
    def tp(self) -> tuple[str, int]:
        return (self.topic, self.partition)


class Consumer:
    def __init__(self):
        self._unacked_messages: set = set()
        self.tracked: list[Message] = []

    def track_message(self, message: Message) -> None:
        self._unacked_messages.add(message)
        self.tracked.append(message)


def held(positions: dict, owned=lambda m: True) -> tuple[HeldMessages, Consumer]:
    consumer = Consumer()
    return HeldMessages(consumer, owned, positions.get), consumer


def test_messages_behind_the_fetch_position_are_released_once_each_and_tracked_again():
    h, consumer = held({("t", 0): 5})
    first = [Message("t", 0, o) for o in range(3)]
    consumer._unacked_messages.update(first)
    h.hold({"t": first})
    assert consumer._unacked_messages == set()  # a rebalance does not wait for them meanwhile
    h.hold({"t": [Message("t", 0, 2), Message("t", 0, 3), Message("t", 0, 4)]})  # 2 fetched twice
    released = h.release()
    assert [m.offset for m in released["t"]] == [0, 1, 2, 3, 4]
    assert consumer.tracked == released["t"]
    assert h.release() == {}


def test_a_partition_with_no_commit_keeps_what_it_held_since_the_client_did_not_seek_back():
    # the client's position is past the held messages: nobody fetches them again
    h, _ = held({("t", 1): 4})
    h.hold({"t": [Message("t", 1, o) for o in range(4)]})
    assert [m.offset for m in h.release()["t"]] == [0, 1, 2, 3]


def test_messages_at_or_past_a_sought_position_are_left_to_be_fetched_again():
    h, consumer = held({("t", 0): 2, ("t", 1): None})  # sought back to 2; 1: no valid position
    h.hold({"t": [Message("t", 0, o) for o in range(4)] + [Message("t", 1, 0)]})
    assert [(m.partition, m.offset) for m in h.release()["t"]] == [(0, 0), (0, 1)]


def test_messages_of_a_partition_no_longer_owned_are_dropped():
    h, consumer = held({("t", 0): 9, ("t", 1): 9}, owned=lambda m: m.partition == 1)
    h.hold({"t": [Message("t", 0, 0), Message("t", 1, 0)]})
    assert [m.partition for m in h.release()["t"]] == [1]
    assert consumer.tracked == [Message("t", 1, 0)]
