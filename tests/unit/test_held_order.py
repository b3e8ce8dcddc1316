"""The fetch loop hands a partition's messages to its handler in offset order, also when the
stream's flow resumes while a fetch is under way and messages of an earlier fetch are held.

Every view state keeps the last source offset it applied per source partition and skips
anything at or below it as a replay: a batch handed over before an earlier one makes the
earlier one's events "duplicates", lost for good. The chaos bench lost 31,228 merchant-view
events this way (README, "Table snapshots"): a worker's first fetch of each repartition
partition arrived while Faust's `on_recovery_completed` was still seeking (flow stopped, so it
was held); the flow resumed during the next fetch, whose messages were processed at once, and
the held ones were released one loop turn later, after them.
"""

from __future__ import annotations

import asyncio
import types
from collections import defaultdict
from freshet.stream.engine import Counters, StreamEngine
from test_held_messages import Message


class Consumer:
    """What the engine's fetch loop uses of Faust's consumer. Each `getmany` hands over the next
    scripted fetch; a fetch may resume the flow while it is under way (as Faust's recovery does
    from another task)."""

    def __init__(self, fetches: list[tuple[list[Message], bool]], position: int):
        self.fetches = list(fetches)  # (messages, resume the flow during this fetch)
        self.flow_active = False
        self._stopped = asyncio.Event()
        self._read_offset: dict = defaultdict(lambda: None)
        self._unacked_messages: set = set()
        self.acked: list[Message] = []
        state = types.SimpleNamespace(position=position, has_valid_position=True)
        assignment = types.SimpleNamespace(state_value=lambda tp: state)
        client = types.SimpleNamespace(_subscription=types.SimpleNamespace(
            subscription=types.SimpleNamespace(assignment=assignment)))
        self._thread = types.SimpleNamespace(_ensure_consumer=lambda: client)
        self.callback = None

    async def getmany(self, timeout: float):
        if not self.fetches:
            self._stopped.set()
            return
        messages, resumes = self.fetches.pop(0)
        if resumes:
            self.flow_active = True
        for m in messages:
            yield m.tp, m

    async def seek(self, tp, offset: int) -> None:
        pass

    async def seek_to_committed(self) -> dict:
        return {}

    def track_message(self, m: Message) -> None:
        self._unacked_messages.add(m)

    def ack(self, m: Message) -> None:
        self.acked.append(m)

    async def _add_gap(self, tp, start: int, end: int) -> None:
        raise AssertionError(f"no gap expected ({tp} {start}-{end})")


def run_fetch_loop(fetches, position: int) -> list[int]:
    """The offsets of topic "rep" partition 0 in the order the handler got them."""
    consumer = Consumer(fetches, position)
    handled: list[int] = []

    async def handler(batch):
        handled.extend(m.offset for m in batch)

    engine = types.SimpleNamespace(app=types.SimpleNamespace(consumer=consumer), handlers={"rep": handler},
                                   owned={("rep", 0)}, counters=Counters(), positions=None)
    StreamEngine._deliver_in_bulk(engine)
    fetcher = types.SimpleNamespace(_stopped=asyncio.Event())
    asyncio.run(asyncio.wait_for(consumer._drain_messages(fetcher), 5))
    return handled


def applied_once(offsets: list[int]) -> list[int]:
    """What a view state applies of them (ViewProcessor._apply's rule: at or below the last
    applied offset of the source partition is a replay)."""
    last, applied = -1, []
    for offset in offsets:
        if offset > last:
            applied.append(offset)
            last = offset
    return applied


def test_messages_held_while_the_flow_was_stopped_go_before_a_later_fetch():
    first = [Message("rep", 0, o) for o in range(0, 3)]  # fetched while the flow is stopped: held
    second = [Message("rep", 0, o) for o in range(3, 6)]  # the flow resumes while this one is fetched
    handled = run_fetch_loop([(first, False), (second, True), ([], False)], position=6)
    assert sorted(handled) == list(range(6))  # each message once ...
    assert handled == list(range(6))  # ... and in order
    assert applied_once(handled) == list(range(6))  # so no event is taken for a replay


def test_held_messages_are_released_first_when_the_flow_was_already_running():
    # the ordinary case, for contrast: the flow resumed between two fetches
    first = [Message("rep", 0, o) for o in range(0, 3)]
    second = [Message("rep", 0, o) for o in range(3, 6)]
    handled = run_fetch_loop([(first, False), ([], True), (second, False), ([], False)], position=6)
    assert handled == list(range(6))
