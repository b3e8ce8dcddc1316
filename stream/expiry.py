"""When stored feature rows stop being true: the stream's clock and the re-evaluation of idle entities.

`StreamClock` is the instant the engine evaluates rows as of; `ExpirySchedule` says which
entities to look at when; `IdleRefresh` re-writes the rows whose windows lost a tile.

A row in Redis is the window rule (freshet.stream.aggregations) evaluated as of its
timestamp. It stays true until the next event of its entity or until one of its tiles
leaves a window (`ViewAggregator.next_change`), whichever comes first. Events rewrite the
row anyway; for the second case the engine asks this module, on a short wall-clock tick,
which entities are due and writes them again as of the clock. The extra writes are one per
tile expiry of an entity that has no newer event, however often the tick runs: an entity is
looked at when its oldest tile could first leave a window, then only at its exact next change.
"""

from __future__ import annotations

import heapq
import logging
import time
from typing import Any, Callable, Iterable

import orjson

log = logging.getLogger("freshet.stream")

TICK_S = 0.1  # how often the engine looks for due entities (wall clock)
REFRESH_MAX = 1000  # entities looked at per view and tick (~10-30 ms): the event loop stays responsive


class StreamClock:
    """The stream's "now": the newest event time seen, advanced at the wall clock's rate
    since it was seen, and at most `ahead_s` past the wall clock; it never goes back.

    Live, events come within the freshness bound of their own time, so this is the wall
    clock minus the freshness. Replayed history moves it at the speed of its events; once
    no newer event comes (an idle partition, the end of a replay) it keeps time with the
    wall clock from the last one. Event times older than the clock do not move it (late
    and out-of-order events), and neither do event times past the wall clock + `ahead_s`
    (FRESHET_STREAM_CLOCK_AHEAD_S, 0 by default): one event dated ahead must not age every
    other entity's windows early. A simulated clock running ahead of the wall clock (the
    demo's --time-scale) needs `ahead_s` raised, or its simulated time started in the past.

    >>> wall = [1000.0]
    >>> clock = StreamClock(lambda: wall[0])
    >>> clock.now() is None
    True
    >>> clock.observe(500.0); clock.now()   # replayed history: the events' time
    500.0
    >>> wall[0] += 60; clock.now()          # idle for a minute of wall time
    560.0
    >>> clock.observe(530.0); clock.now()   # an older event does not move it
    560.0
    >>> clock.observe(900.0); clock.now()   # a newer one does
    900.0
    >>> clock.observe(1500.0); clock.now()  # but not past the wall clock
    1060.0
    """

    def __init__(self, wall: Callable[[], float] = time.time, ahead_s: float = 0.0):
        self._wall = wall
        self.ahead_s = ahead_s
        self._high: float | None = None  # newest event time that moved the clock
        self._at = 0.0  # wall clock when it did

    def observe(self, event_ts: float) -> None:
        """An event time applied to some entity (the newest of a batch suffices)."""
        now = self.now()
        if now is None or event_ts > now:
            self._high, self._at = event_ts, self._wall()

    def now(self) -> float | None:
        """The current stream time; None before any event."""
        if self._high is None:
            return None
        wall = self._wall()
        return min(self._high + max(0.0, wall - self._at), wall + self.ahead_s)


class ExpirySchedule:
    """Entity keys of one view to look at, by stream time.

    `written` notes rows just written as of a time: they are looked at the first slide
    boundary after it (nothing can leave a window sooner). `at` notes an exact time.
    `due` hands out what is due as (due time, key), at most `limit`; the rest stays due.

    >>> schedule = ExpirySchedule(slides=(60, 300))
    >>> schedule.written([b"c1", b"c2"], 130.0)   # rows as of 130: nothing changes before 180
    >>> schedule.due(179.9), len(schedule)
    ([], 2)
    >>> sorted(schedule.due(180.0))
    [(180.0, b'c1'), (180.0, b'c2')]
    >>> schedule.at(b"c1", 420); schedule.at(b"c2", 3720)
    >>> schedule.due(500.0), schedule.next_due()
    ([(420, b'c1')], 3720)
    """

    def __init__(self, slides: Iterable[int]):
        self.slides = sorted(set(slides))
        self._keys: dict[float, set[bytes]] = {}  # due time -> keys
        self._times: list[float] = []  # heap of the due times in _keys

    def __len__(self) -> int:
        return sum(len(keys) for keys in self._keys.values())

    def boundary_after(self, t: float) -> float:
        """The first slide boundary after `t`: no window starts moving sooner."""
        return min((t // s + 1) * s for s in self.slides)

    def written(self, keys: Iterable[bytes], as_of: float) -> None:
        self.add(self.boundary_after(as_of), keys)

    def at(self, key: bytes, due: float) -> None:
        self.add(due, (key,))

    def add(self, due: float, keys: Iterable[bytes]) -> None:
        bucket = self._keys.get(due)
        if bucket is None:
            bucket = self._keys[due] = set()
            heapq.heappush(self._times, due)
        bucket.update(keys)

    def next_due(self) -> float | None:
        return self._times[0] if self._times else None

    def due(self, now: float, limit: int = REFRESH_MAX) -> list[tuple[float, bytes]]:
        out: list[tuple[float, bytes]] = []
        while self._times and self._times[0] <= now and len(out) < limit:
            at = self._times[0]
            bucket = self._keys[at]
            while bucket and len(out) < limit:
                out.append((at, bucket.pop()))
            if not bucket:
                del self._keys[heapq.heappop(self._times)]
        return out

    def clear(self) -> None:
        self._keys.clear()
        self._times.clear()


class IdleRefresh:
    """Re-evaluates one view's due entities as of the clock and writes the rows that changed.

    `processor` is the engine's ViewProcessor (its `view`, `agg`, `sink`, `lock` and
    `_state`); `owns(key)` says whether this worker still writes the entity. A state
    remembers the time its row was last written as of (`AS_OF`, never persisted: a state
    read back from the changelog counts from its latest event, which may rewrite a row
    once more than needed, never less).
    """

    AS_OF = "_as_of"

    def __init__(self, processor: Any, clock: StreamClock):
        self.processor = processor
        self.clock = clock
        view = processor.view
        self.schedule = ExpirySchedule(a.slide_s for a in view.aggregations)
        self.rows_written = 0  # rows written because a tile left a window
        self.looked_at = 0

    def as_of(self, state: dict, now: float | None) -> float:
        """The time a row of `state` is evaluated as of: the clock, never before its latest event."""
        latest = state["max_ts"]
        return latest if now is None or (latest is not None and latest > now) else now

    def written(self, keys: Iterable[bytes], states: Iterable[dict], now: float) -> None:
        """Rows of these entities (keys, and their states in the same order) were just written
        as of the clock's `now` (each as of `as_of(state, now)`): each is looked at when its
        oldest tile could first leave a window (`ViewAggregator.change_bound`)."""
        bound = self.processor.agg.change_bound
        looks: dict[float, list[bytes]] = {}
        field = self.AS_OF
        for key, state in zip(keys, states):
            latest = state["max_ts"]
            as_of = latest if latest is not None and latest > now else now  # dated ahead: its own time
            state[field] = as_of
            due = bound(state, as_of)
            if due is not None:
                batch = looks.get(due)
                if batch is None:
                    looks[due] = [key]
                else:
                    batch.append(key)
        for due, batch in looks.items():
            self.schedule.add(due, batch)

    async def run(self, owns: Callable[[bytes], bool], counters: Any, limit: int = REFRESH_MAX) -> int:
        """Write every due entity's row again as of the clock; returns the rows written."""
        now = self.clock.now()
        due = self.schedule.next_due()
        if due is None or (now is not None and due > now):
            return 0
        p = self.processor
        if now is None:  # recovered entities and no event yet: their latest events set the clock
            async with p.lock:
                for _, key in self.schedule.due(due, limit):
                    latest = p._state(key)["max_ts"]
                    if latest is not None:
                        self.clock.observe(latest)
                    self.schedule.at(key, due)
            return 0
        async with p.lock:
            now = self.clock.now()  # again: a batch applied while this waited may have moved it
            keys = self.schedule.due(now, limit)
            rows, agg = [], p.agg
            try:
                for due, key in keys:
                    if not owns(key):
                        continue
                    state = p._state(key)
                    since = state.get(self.AS_OF)
                    if since is not None and since >= due:
                        continue  # written again since it was scheduled: that write scheduled its own look
                    self.looked_at += 1
                    if state["max_ts"] is None:
                        continue
                    if since is None:  # read back from the changelog: its row is as of its latest event at least
                        since = state["max_ts"]
                    change = agg.next_change(state, since)
                    if change is None:
                        continue  # nothing left in any window: the row stays as it is
                    if change > now:
                        self.schedule.at(key, change)
                        continue
                    as_of = self.as_of(state, now)
                    rows.append((_join_values(key, p.view), agg.result(state, as_of), as_of))
                    state[self.AS_OF] = as_of
                    following = agg.next_change(state, as_of)
                    if following is not None:
                        self.schedule.at(key, following)
                if rows:
                    await p.sink.write(p.view, rows, counters)
            except BaseException:
                for _, key in keys:  # looked at again next tick (the states did not change)
                    self.schedule.at(key, now)
                raise
        self.rows_written += len(rows)
        return len(rows)

    def recovered(self, keys: Iterable[bytes]) -> None:
        """Entities read back from the changelog: look at each at once."""
        now = self.clock.now()
        self.schedule.add(now if now is not None else float("-inf"), keys)


def _join_values(key: bytes, view: Any) -> tuple:
    """The join key values of an entity key (freshet.stream.engine.entity_key's inverse)."""
    if len(view.join_keys) == 1:
        text = key.decode()
        return (int(text) if view.join_key_types[0] in _INTEGER_KEYS else text,)
    return tuple(orjson.loads(key))


_INTEGER_KEYS = {"INT64", "INT32", "UNIX_TIMESTAMP"}
