"""Windowed aggregations over event time: one implementation for stream and backfill.

`ViewAggregator` compiles a view's aggregations once; `update` folds an event into
an entity's state (tiles of partial aggregates, never raw events) and `result`
answers every aggregation as of a time. The stream engine and the backfill both
call it, so the two cannot drift apart.

The window rule, shared by every path and every reader (stream, backfill, training sets,
Redis rows read through Feast or freshet): an aggregation with window W and slide S, read
as of time t, covers the events with

    start(t) <= event_ts <= t,    start(t) = floor(t / S) * S + S - W

both ends inclusive. With S == W (tumbling) that is the current window so far; with S < W
it is the last W/S slide-aligned steps, the current one included. So an event at x counts
for reads from x on and leaves the window at the slide boundary `leaves_at(x)` =
floor((x + W - S) / S) * S + S: an event exactly on a boundary (x a multiple of S) stays
exactly W seconds, any other between W - S and W. An entity with no event left in a window
reads count 0, count_distinct 0, sum 0.0 and null (None) for mean, min, max and last.

A stored row is this rule evaluated as of one instant, the row's timestamp (Feast's
`_ts:<view>`, returned as its event_timestamp): the stream engine writes a row when one of
the entity's events is applied and again when `next_change` says a tile leaves a window,
so a read at t returns the value as of t up to the freshness bound (events not applied
yet) and the re-evaluation delay after a slide boundary. Which instant is "now" for the
stream is freshet.stream.expiry's StreamClock.

count_distinct is exact while an entity holds at most DISTINCT_EXACT_MAX distinct
values of the column within the view's horizon (longest window + lateness). Past that,
the column switches to HyperLogLog sketches per tile (Apache DataSketches, lg_k =
SKETCH_LG_K, 4-bit registers) and each window is the estimate of the union of its tiles'
sketches: relative standard error 1.6%, within 3.3% for 95% of windows. The switch (and
the way back, once a horizon passes without a value) happens inside `update`, so the
stream and the backfill switch at the same event.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from operator import itemgetter
from typing import Any, Iterable

import datasketches
import orjson

from freshet.features import AggregationSpec, ViewSpec


# Count, sum, mean, min and max are answered from per-tile partials
# [count, sum, min, max]; merging tiles is adding counts and sums and taking
# min/max, so every one of them costs one pass over the window's tiles.
_TILED = ("count", "sum", "mean", "min", "max")
_CODES = {name: i for i, name in enumerate(_TILED)}  # how `result` reads an accumulator
STATE_FORMAT = 3  # first element of an encoded state record (2: one tile map per column)
SKETCH_FORMAT = 4  # STATE_FORMAT + sketches: JSON, a NUL byte, then the sketches' bytes
DISTINCT_EXACT_MAX = 10_000  # distinct values per entity and column kept exactly
SKETCH_LG_K = 12  # 4,096 registers: relative standard error 1.04 / sqrt(4096) = 1.6%
_SKETCH_TYPE = datasketches.tgt_hll_type.HLL_4  # 2 KiB per dense tile


def _new_sketch() -> datasketches.hll_sketch:
    return datasketches.hll_sketch(SKETCH_LG_K, _SKETCH_TYPE)


def window_start(as_of: float, spec: AggregationSpec) -> float:
    # floor division, not floor(as_of / slide): the quotient can round up to a whole number
    return as_of // spec.slide_s * spec.slide_s + spec.slide_s - spec.window_s


def leaves_at(x: float, window_s: int, slide_s: int) -> float:
    """The first read time at which an event (or tile) at `x` is out of the window: the slide
    boundary after which the window starts past `x`.

    >>> leaves_at(300, 300, 60), leaves_at(330, 300, 60), leaves_at(599.5, 600, 600)
    (600, 600, 600.0)
    """
    return (x + window_s - slide_s) // slide_s * slide_s + slide_s


class ViewAggregator:
    """The aggregations of one view, compiled once: which columns need tiles, which need
    distinct or last state, and the tile width.

    >>> from freshet.features import AggregationSpec, ViewSpec
    >>> spec = lambda f, c: AggregationSpec(f"{f}_{c}_300s", c, f, 300, 60, "DOUBLE")
    >>> view = ViewSpec("v", ("card_id",), ("STRING",), 0, "tx", "ts", {}, 0,
    ...                 (spec("sum", "amount"), spec("count_distinct", "merchant_id")), "")
    >>> agg = ViewAggregator(view); state = agg.new_state()
    >>> for ts, amount, m in [(0, 5.0, "a"), (70, 1.0, "b"), (400, 2.0, "a")]:
    ...     agg.update(state, ts, {"amount": amount, "merchant_id": m})
    >>> agg.result(state)   # as of ts 400 the window starts at 120
    {'sum_amount_300s': 2.0, 'count_distinct_merchant_id_300s': 1}
    >>> agg.result(state, as_of=1000)   # nothing since 760
    {'sum_amount_300s': 0.0, 'count_distinct_merchant_id_300s': 0}
    """

    def __init__(self, view: ViewSpec):
        self.view = view
        self.tile_s = view.tile_s
        self.horizon_s = view.max_window_s + view.lateness_s
        self.tiled_columns = sorted({a.column for a in view.aggregations if a.function in _TILED})
        self.distinct_columns = sorted({a.column for a in view.aggregations if a.function == "count_distinct"})
        self.last_columns = sorted({a.column for a in view.aggregations if a.function == "last"})
        self.specs = view.aggregations
        # Every column keeps tiles of the view's tile width, which answer every window. Once
        # an entity is busy (more than COARSEN_AT such tiles) it also keeps, for each wider
        # gcd(window, slide) its shapes use, a map of that width: a day sliding by 5 minutes
        # is then 288 lookups instead of a walk over 1,440 one-minute tiles.
        # column -> (widths, [(slide, slide - window, tile width)] per (window, slide) shape,
        # [(name, function code, shape index)]): specs of one shape share an accumulator
        self._tiled_windows: dict[str, tuple[list, list, list]] = {}
        for column in self.tiled_columns:
            specs = [a for a in view.aggregations if a.column == column and a.function in _TILED]
            widths, shapes, index = _windows(specs)
            self._tiled_windows[column] = (widths, shapes, [(a.name, _CODES[a.function], i)
                                                            for a, i in zip(specs, index)])
        # the same for distinct counts: column -> (widths, shapes, [(name, shape index)])
        self._distinct_windows: dict[str, tuple[list, list, list]] = {}
        for column in self.distinct_columns:
            specs = [a for a in view.aggregations if a.column == column and a.function == "count_distinct"]
            widths, shapes, index = _windows(specs)
            self._distinct_windows[column] = (widths, shapes, [(a.name, i) for a, i in zip(specs, index)])
        # a sketched column keeps tiles of each width only as long as that width's longest window
        self._sketch_horizons = {
            column: {width: max(slide - offset for slide, offset, w in shapes if w == width) + view.lateness_s
                     for width in widths}
            for column, (widths, shapes, _) in self._distinct_windows.items()}
        self._last = [(a.column, a.slide_s, a.slide_s - a.window_s)
                      for a in view.aggregations if a.function == "last"]
        self._names = [a.name for a in view.aggregations]
        # every (slide, slide - window) of the view: `change_bound` tries each
        self._all_shapes = sorted({(a.slide_s, a.slide_s - a.window_s) for a in view.aggregations})
        # `result` fills a flat list of slots, shape by shape: five per tiled shape (count,
        # sum, mean, min, max), one per distinct shape, one per last; each name reads one
        slot: dict[str, int] = {}
        n = 0
        for _, shapes, outputs in self._tiled_windows.values():
            slot.update((name, n + 5 * i + code) for name, code, i in outputs)
            n += 5 * len(shapes)
        for _, shapes, outputs in self._distinct_windows.values():
            slot.update((name, n + i) for name, i in outputs)
            n += len(shapes)
        slot.update((a.name, n + i) for i, a in enumerate(a for a in view.aggregations if a.function == "last"))
        order = [slot[name] for name in self._names]
        self._gather = itemgetter(*order) if len(order) > 1 else (lambda slots: (slots[order[0]],))

    def new_state(self) -> dict:
        return {
            "max_ts": None,
            # column -> {tile width: {tile_start: [count, sum, min, max]}}
            "tiles": {c: {self.tile_s: {}} for c in self.tiled_columns},
            "distinct": {c: {} for c in self.distinct_columns},  # column -> {value: latest sighting}
            # column -> {tile width: {tile_start: values whose latest sighting is in that
            # tile}}: a window's distinct count is a sum over its tiles, not a scan of every value
            "distinct_tiles": {c: {self.tile_s: {}} for c in self.distinct_columns},
            "last": {c: None for c in self.last_columns},
            "offsets": {},  # "topic:partition" -> last applied offset (exactly-once effects)
            # and, once a column has too many distinct values, "sketches": column -> [latest
            # sighting, {tile width: {tile_start: HLL sketch}}] instead of its distinct entries
        }

    def update(self, state: dict, ts: float, row: dict[str, Any]) -> None:
        """Apply one event (already validated) to an entity's state."""
        for column, by_width in state["tiles"].items():
            v = row.get(column)
            if v is None:
                continue
            for width, tiles in by_width.items():
                tile = int(ts // width) * width
                part = tiles.get(tile)
                if part is None:
                    tiles[tile] = [1, v, v, v]
                else:
                    part[0] += 1
                    part[1] += v
                    if v < part[2]:
                        part[2] = v
                    if v > part[3]:
                        part[3] = v
        if "sketches" in state:
            self._update_sketches(state, ts, row)
        crowded = None
        for column, seen in state["distinct"].items():
            v = row.get(column)
            if v is None:
                continue
            before = seen.get(v)
            if before is None or before < ts:
                seen[v] = ts
                for width, counts in state["distinct_tiles"][column].items():
                    tile = int(ts // width) * width
                    counts[tile] = counts.get(tile, 0) + 1
                    if before is not None:
                        _decrement(counts, int(before // width) * width)
                if before is None and len(seen) > DISTINCT_EXACT_MAX:
                    crowded = column
        for column in self.last_columns:
            v = row.get(column)
            cur = state["last"][column]
            if v is not None and (cur is None or ts >= cur[0]):
                state["last"][column] = [ts, v]
        if state["max_ts"] is None or ts > state["max_ts"]:
            state["max_ts"] = ts
        if crowded is not None:
            for column in [c for c, seen in state["distinct"].items() if len(seen) > DISTINCT_EXACT_MAX]:
                self._bound_distinct(state, column)

    def _update_sketches(self, state: dict, ts: float, row: dict[str, Any]) -> None:
        expired = []
        for column, entry in state["sketches"].items():
            v = row.get(column)
            if v is None:
                continue
            if ts - entry[0] > self.horizon_s + self.tile_s:  # no window reaches a sketched value
                expired.append(column)
                continue
            if ts > entry[0]:
                entry[0] = ts
            for width, tiles in entry[1].items():
                tile = int(ts // width) * width
                sketch = tiles.get(tile)
                if sketch is None:
                    sketch = tiles[tile] = _new_sketch()
                sketch.update(v)
        for column in expired:  # back to exact counting; the loop over exact columns takes v
            del state["sketches"][column]
            state["distinct"][column] = {}
            state["distinct_tiles"][column] = {self.tile_s: {}}
        if not state["sketches"]:
            del state["sketches"]

    def _bound_distinct(self, state: dict, column: str) -> None:
        """Drop the column's values no window reaches; if more than DISTINCT_EXACT_MAX remain,
        switch the column to sketches, each value in the tiles of its latest sighting."""
        floor = state["max_ts"] - self.horizon_s - self.tile_s
        seen = state["distinct"][column]
        by_width = state["distinct_tiles"][column]
        for v in [v for v, ts in seen.items() if ts < floor]:
            ts = seen.pop(v)
            for width, counts in by_width.items():
                _decrement(counts, int(ts // width) * width)
        if len(seen) <= DISTINCT_EXACT_MAX:
            return
        sketches: dict[int, dict] = {width: {} for width in self._sketch_horizons[column]}
        for v, ts in seen.items():
            for width, tiles in sketches.items():
                tile = int(ts // width) * width
                sketch = tiles.get(tile)
                if sketch is None:
                    sketch = tiles[tile] = _new_sketch()
                sketch.update(v)
        state.setdefault("sketches", {})[column] = [max(seen.values()), sketches]
        del state["distinct"][column], state["distinct_tiles"][column]

    def evict(self, state: dict) -> None:
        """Drop tiles and distinct values no window can reach again."""
        if state["max_ts"] is None:
            return
        reach = state["max_ts"] - self.horizon_s
        for by_width in state["tiles"].values():
            for width, tiles in by_width.items():
                floor = reach - width
                if tiles and min(tiles) < floor:  # min() in C: most calls evict nothing
                    for t in [t for t in tiles if t < floor]:
                        del tiles[t]
        floor = reach - self.tile_s
        for column, seen in state["distinct"].items():
            by_width = state["distinct_tiles"][column]
            counts = by_width[self.tile_s]
            # scanning the values only pays once a whole tile has fallen behind the floor
            if counts and min(counts) + self.tile_s <= floor:
                for v in [v for v, ts in seen.items() if ts < floor]:
                    ts = seen.pop(v)
                    for width, c in by_width.items():
                        _decrement(c, int(ts // width) * width)
        for column, (_, by_width) in state.get("sketches", {}).items():
            for width, tiles in by_width.items():
                floor = state["max_ts"] - self._sketch_horizons[column][width] - width
                for t in [t for t in tiles if t < floor]:
                    del tiles[t]
        self._coarsen(state)

    def _coarsen(self, state: dict) -> None:
        """Give a busy entity's columns their wider tile maps (built once, then kept up)."""
        fine = self.tile_s
        for column, by_width in state["tiles"].items():
            if len(by_width) == 1 and len(by_width[fine]) > COARSEN_AT:
                for width in self._tiled_windows[column][0]:
                    if width != fine:
                        by_width[width] = _coarser(by_width[fine], width)
        for column, by_width in state["distinct_tiles"].items():
            if len(by_width) == 1 and len(by_width[fine]) > COARSEN_AT:
                for width in self._distinct_windows[column][0]:
                    if width != fine:
                        by_width[width] = _distinct_counts(state["distinct"][column], width)

    def result(self, state: dict, as_of: float | None = None) -> dict[str, Any]:
        """Every aggregation of the view as of `as_of` (default: the entity's latest event).

        `as_of` must not be earlier than the latest event applied: state keeps the
        latest sighting of a distinct value and of `last`, not the history.
        """
        as_of = state["max_ts"] if as_of is None else as_of
        if as_of is None:
            return {spec.name: 0 if spec.function in ("count", "count_distinct") else (
                0.0 if spec.function == "sum" else None) for spec in self.specs}
        fine = self.tile_s
        slots: list = []
        for column, (_, shapes, _) in self._tiled_windows.items():
            for n, total, lo, hi in _per_window(state["tiles"][column], shapes, fine, as_of, _scan_tiles, _fold):
                slots += (n, float(total), total / n, lo, hi) if n else (0, float(total), None, None, None)
        sketched = state.get("sketches") or {}
        for column, (_, shapes, _) in self._distinct_windows.items():
            if column in sketched:
                slots += _sketch_windows(sketched[column][1], shapes, as_of)
            else:
                slots += _per_window(state["distinct_tiles"][column], shapes, fine, as_of, _scan_counts, sum)
        for column, slide, offset in self._last:
            start = as_of // slide * slide + offset  # window_start, inlined
            cur = state["last"][column]
            slots.append(cur[1] if cur is not None and start <= cur[0] <= as_of else None)
        return dict(zip(self._names, self._gather(slots)))

    def change_bound(self, state: dict, as_of: float) -> float | None:
        """A time no later than `next_change(state, as_of)`, from the entity's oldest tile alone:
        a few min() calls, cheap enough for every write. None when the entity holds nothing.

        >>> from freshet.features import AggregationSpec, ViewSpec
        >>> view = ViewSpec("v", ("k",), ("STRING",), 0, "t", "ts", {}, 0, (
        ...     AggregationSpec("count_x_300s", "x", "count", 300, 60, "INT64"),), "")
        >>> agg = ViewAggregator(view); state = agg.new_state()
        >>> agg.update(state, 130.0, {"x": 1.0}); agg.update(state, 250.0, {"x": 1.0})
        >>> agg.change_bound(state, 250.0), agg.next_change(state, 250.0)  # a young entity: exact
        (420, 420)
        """
        fine = self.tile_s
        oldest = None
        for by_width in state["tiles"].values():
            tiles = by_width[fine]
            if tiles:
                t = min(tiles)
                if oldest is None or t < oldest:
                    oldest = t
        for column, counts in state["distinct_tiles"].items():
            tiles = counts[fine]
            if tiles:
                t = min(tiles)
                if oldest is None or t < oldest:
                    oldest = t
        for cur in state["last"].values():
            if cur is not None and (oldest is None or cur[0] < oldest):
                oldest = cur[0]
        if oldest is None:
            return None if not state.get("sketches") else as_of // fine * fine + fine
        if state.get("sketches"):
            oldest = min(oldest, as_of - self.horizon_s)  # not worth a scan: as early as possible
        due = None
        for slide, offset in self._all_shapes:
            start = as_of // slide * slide + offset  # window_start, inlined
            x = oldest if oldest > start else start
            leave = (x - offset) // slide * slide + slide  # leaves_at, inlined
            if due is None or leave < due:
                due = leave
        return due

    def next_change(self, state: dict, as_of: float) -> float | None:
        """The first time after `as_of` at which `result` changes with no new event: the
        earliest `leaves_at` of a tile (or a last value) inside some window as of `as_of`.
        None when no window holds anything (the entity reads 0 / null until its next event).

        >>> from freshet.features import AggregationSpec, ViewSpec
        >>> view = ViewSpec("v", ("k",), ("STRING",), 0, "t", "ts", {}, 0, (
        ...     AggregationSpec("count_x_300s", "x", "count", 300, 60, "INT64"),
        ...     AggregationSpec("last_x_3600s", "x", "last", 3600, 60, "DOUBLE")), "")
        >>> agg = ViewAggregator(view); state = agg.new_state()
        >>> agg.update(state, 130.0, {"x": 1.0})
        >>> agg.next_change(state, 130.0)   # the tile [120, 180) leaves the 5-minute window at 420
        420
        >>> agg.result(state, as_of=419.9), agg.result(state, as_of=420)
        ({'count_x_300s': 1, 'last_x_3600s': 1.0}, {'count_x_300s': 0, 'last_x_3600s': 1.0})
        >>> agg.next_change(state, 420), agg.next_change(state, 3720)   # the last value at 130 leaves the hour
        (3720.0, None)
        """
        fine = self.tile_s
        due = None
        for column, (_, shapes, _) in self._tiled_windows.items():
            due = _earliest_leave(state["tiles"][column][fine], shapes, as_of, due)
        sketched = state.get("sketches") or {}
        for column, (_, shapes, _) in self._distinct_windows.items():
            if column in sketched:
                by_width = sketched[column][1]
                for shape in shapes:
                    due = _earliest_leave(by_width.get(shape[2], ()), (shape,), as_of, due)
            else:
                due = _earliest_leave(state["distinct_tiles"][column][fine], shapes, as_of, due)
        for column, slide, offset in self._last:
            cur = state["last"][column]
            if cur is not None and cur[0] >= as_of // slide * slide + offset:  # in its window
                leave = (cur[0] - offset) // slide * slide + slide  # leaves_at, inlined
                if due is None or leave < due:
                    due = leave
        return due

    # The changelog record of one entity. Tiles and distinct values are pairs of lists
    # (keys, values), not JSON objects, so integer tile starts and non-string distinct
    # values keep their type; per-tile distinct counts are derived, not stored.
    def encode(self, state: dict) -> bytes:
        """The entity's state as one compact changelog value."""
        # plain loops, not nested comprehensions: each comprehension is a call (a checkpoint
        # encodes every changed entity, ~0.7 per event in bench/stream.py)
        tiles = {}
        for c, by_width in state["tiles"].items():
            tiles[c] = [[w, list(t), list(t.values())] for w, t in by_width.items()]
        distinct = {}
        for c, seen in state["distinct"].items():
            distinct[c] = [list(seen), list(seen.values())]
        fields = [STATE_FORMAT, state["max_ts"], tiles, distinct, state["last"], state["offsets"]]
        if "sketches" not in state:
            # a copy: orjson's bytes keep a 4 KiB allocation however short the JSON, and
            # tables hold one encoded state per entity (4.1 KB instead of ~0.2 KB each)
            return memoryview(orjson.dumps(fields)).tobytes()
        # sketches as bytes after the JSON (which never holds a raw NUL), indexed in it
        fields[0] = SKETCH_FORMAT
        blobs, index = [], {}
        for c, (latest, by_width) in state["sketches"].items():
            widths = []
            for w, tiles in by_width.items():
                parts = [sketch.serialize_compact() for sketch in tiles.values()]
                widths.append([w, list(tiles), [len(p) for p in parts]])
                blobs += parts
            index[c] = [latest, widths]
        fields.append(index)
        return orjson.dumps(fields) + b"\x00" + b"".join(blobs)

    def decode(self, data: bytes | dict) -> dict:
        """Inverse of `encode`; also reads the older forms (one tile map per column)."""
        if isinstance(data, dict):
            return self.from_json(data)
        text, _, blob = data.partition(b"\x00")
        fmt, max_ts, tiles, distinct, last, offsets, *sketched = orjson.loads(text)
        if fmt not in (2, STATE_FORMAT, SKETCH_FORMAT):
            raise ValueError(f"unknown state format {fmt!r}")
        state = self.new_state()
        state["max_ts"] = max_ts
        for c, stored in tiles.items():
            if fmt == 2:  # only the map of view.tile_s tiles
                state["tiles"][c][self.tile_s] = dict(zip(*stored))
            else:
                for w, starts, parts in stored:
                    state["tiles"][c][w] = dict(zip(starts, parts))
        for c, (values, stamps) in distinct.items():
            state["distinct"][c] = dict(zip(values, stamps))
        for c, cur in last.items():
            state["last"][c] = cur
        state["offsets"] = offsets
        if sketched:
            view = memoryview(blob)
            at = 0
            state["sketches"] = {}
            for c, (latest, widths) in sketched[0].items():
                by_width = {}
                for w, starts, lengths in widths:
                    tiles = by_width[w] = {}
                    for t, n in zip(starts, lengths):
                        tiles[t] = datasketches.hll_sketch.deserialize(bytes(view[at:at + n]))
                        at += n
                state["sketches"][c] = [latest, by_width]
                del state["distinct"][c], state["distinct_tiles"][c]
        self._count_distinct_tiles(state)
        return state

    def _count_distinct_tiles(self, state: dict) -> None:
        for c, seen in state["distinct"].items():
            state["distinct_tiles"][c] = {self.tile_s: _distinct_counts(seen, self.tile_s)}
        self._coarsen(state)

    # JSON round trip (tile keys become strings in JSON); kept to read old changelogs
    @staticmethod
    def to_json(state: dict) -> dict:
        return state

    def from_json(self, data: dict) -> dict:
        state = self.new_state()
        state["max_ts"] = data.get("max_ts")
        for c, tiles in data.get("tiles", {}).items():
            if tiles and all(isinstance(v, dict) for v in tiles.values()):  # {width: {tile: part}}
                for w, by_start in tiles.items():
                    state["tiles"][c][int(w)] = {int(t): list(p) for t, p in by_start.items()}
            else:  # the oldest form: only the map of view.tile_s tiles
                state["tiles"][c][self.tile_s] = {int(t): list(p) for t, p in tiles.items()}
        for c, seen in data.get("distinct", {}).items():
            state["distinct"][c] = dict(seen)
        for c, cur in data.get("last", {}).items():
            state["last"][c] = list(cur) if cur is not None else None
        state["offsets"] = dict(data.get("offsets", {}))
        self._count_distinct_tiles(state)
        return state


_SCAN_MAX = 16  # up to this many tiles a map is scanned, not looked up window by window
COARSEN_AT = 96  # tiles of the view's width past which an entity keeps wider maps too


def _coarser(fine: dict, width: int) -> dict:
    """Tiles of `width` (a multiple of the fine width) from fine [count, sum, min, max] tiles."""
    out: dict[int, list] = {}
    for t, (n, total, lo, hi) in fine.items():
        key = int(t) // width * width
        part = out.get(key)
        if part is None:
            out[key] = [n, total, lo, hi]
        else:
            part[0] += n
            part[1] += total
            part[2] = min(part[2], lo)
            part[3] = max(part[3], hi)
    return out


def _per_window(by_width: dict, shapes: list, fine: int, as_of: float, scan, fold) -> list:
    """One value per shape's window as of `as_of`: a sparse entity's few tiles in one pass
    for every window (`scan`), a busy one's tiles looked up window by window and folded."""
    starts = [as_of // slide * slide + offset for slide, offset, _ in shapes]  # window_start, inlined
    if len(by_width) == 1 and len(by_width[fine]) <= _SCAN_MAX:
        return scan(by_width[fine], starts, as_of)
    return [fold(_window_tiles(by_width, width, fine, start, as_of)) for (_, _, width), start in zip(shapes, starts)]


def _scan_tiles(tiles: dict, starts: list, as_of: float) -> list[tuple]:
    """(count, sum, min, max) of every window [start, as_of] in one pass over the tiles per
    window (a sparse entity has a few), folded as a busy entity's windows are (`_fold`)."""
    return [_fold(v for t, v in tiles.items() if start <= t <= as_of) for start in starts]


def _scan_counts(counts: dict, starts: list, as_of: float) -> list[int]:
    """Distinct counts of every window [start, as_of] in one pass over per-tile counts."""
    out = [0] * len(starts)
    for t, n in counts.items():
        if t <= as_of:
            for i, start in enumerate(starts):
                if t >= start:
                    out[i] += n
    return out


def _windows(specs: list[AggregationSpec]) -> tuple[list[int], list[tuple], list[int]]:
    """(tile widths used, [(slide, slide - window, tile width)] of each (window, slide) shape,
    each spec's shape index); a shape's width is gcd(window, slide), so its window is whole
    tiles, and its window starts at as_of // slide * slide + slide - window (window_start)."""
    shapes = list(dict.fromkeys((a.window_s, a.slide_s) for a in specs))
    steps = [(slide, slide - window, math.gcd(window, slide)) for window, slide in shapes]
    return sorted({w for _, _, w in steps}), steps, [shapes.index((a.window_s, a.slide_s)) for a in specs]


def _sketch_windows(by_width: dict, shapes: list, as_of: float) -> list[int]:
    """Estimated distinct counts of every window [start, as_of]: the union of its tiles' sketches."""
    out = []
    for slide, offset, width in shapes:
        start = as_of // slide * slide + offset  # window_start, inlined
        union = datasketches.hll_union(SKETCH_LG_K)
        for t, sketch in by_width[width].items():
            if start <= t <= as_of:
                union.update(sketch)
        out.append(round(union.get_estimate()))
    return out


def _earliest_leave(items, shapes, as_of: float, due: float | None) -> float | None:
    """min(`due`, the earliest time an item (tile start or event time) inside a shape's
    window as of `as_of` leaves it); shapes are (slide, slide - window, tile width)."""
    if not items:
        return due
    ordered = sorted(items)  # a few tiles for most entities: cheaper than a scan per shape
    last = len(ordered)
    for slide, offset, _ in shapes:
        start = as_of // slide * slide + offset  # window_start, inlined
        i = bisect_left(ordered, start)
        if i < last:  # items are never past as_of: state holds nothing later than its latest event
            leave = (ordered[i] - offset) // slide * slide + slide  # leaves_at, inlined
            if due is None or leave < due:
                due = leave
    return due


def _distinct_counts(seen: dict, width: int) -> dict[int, int]:
    """Per tile of `width`: how many distinct values have their latest sighting in it."""
    counts: dict[int, int] = {}
    for ts in seen.values():
        tile = int(ts // width) * width
        counts[tile] = counts.get(tile, 0) + 1
    return counts


def _fold(parts: Iterable) -> tuple:
    """(count, sum, min, max) of [count, sum, min, max] tile partials."""
    n, total, lo, hi = 0, 0.0, math.inf, -math.inf
    for tn, tsum, tlo, thi in parts:
        n += tn
        total += tsum
        if tlo < lo:
            lo = tlo
        if thi > hi:
            hi = thi
    return n, total, lo, hi


def _window_tiles(by_width: dict, width: int, fine: int, start: float, as_of: float) -> list:
    """The values of the tiles in [start, as_of], from the map of `width` if the entity keeps
    one, else from the view's `fine` tiles (which answer every window). Looked up one by one
    when the window holds fewer tiles than the map (a busy entity), else by a scan of the map."""
    tiles = by_width.get(width)
    if tiles is None:
        tiles, width = by_width[fine], fine
    first = math.ceil(start / width) * width
    last = int(as_of // width) * width
    if (last - first) // width + 1 < len(tiles):
        get = tiles.get
        return [p for t in range(first, last + 1, width) if (p := get(t)) is not None]
    return [p for t, p in tiles.items() if start <= t <= as_of]


def _decrement(counts: dict, tile: int) -> None:
    n = counts[tile] - 1
    if n:
        counts[tile] = n
    else:
        del counts[tile]


def replay(view: ViewSpec, events: Iterable[tuple[tuple, float, dict]]) -> dict[tuple, dict]:
    """Aggregate (entity key, event_ts, row) events in the given order; entity key -> state."""
    agg = ViewAggregator(view)
    states: dict[tuple, dict] = {}
    for key, ts, row in events:
        state = states.get(key)
        if state is None:
            state = states[key] = agg.new_state()
        agg.update(state, ts, row)
    return states
