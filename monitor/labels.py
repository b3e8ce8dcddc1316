"""Label join: labels matched to the predictions they judge, within a bounded wait.

By request id, or by entity and time when a label carries entity keys only. The wait is
measured in the predictions' event time (their `ts`), so a replay joins the same way; late and
missing labels are counted.
"""

from __future__ import annotations

import math
from collections import OrderedDict, defaultdict, deque
from dataclasses import dataclass
from typing import Any, Iterable, Mapping


@dataclass(slots=True)
class Outcome:
    """A prediction together with the label that judged it."""

    request_id: str
    model: str
    model_version: str
    score: float | None
    predicted: Any
    label: Any
    prediction_ts: float
    label_ts: float


# pending entry: (model, model_version, score, predicted, ts, entity_key)
_MODEL, _VERSION, _SCORE, _PREDICTED, _TS, _ENTITY = range(6)


class LabelJoin:
    """Buffers predictions until their label arrives, for at most `max_wait_s` of event time.

    - joined: a label matched a waiting prediction.
    - missing: a prediction waited `max_wait_s` (or was pushed out by `max_pending`) unlabelled.
    - late: a label for a prediction that had already given up waiting.
    - early: a label that arrived before its prediction waits for it, as long as a prediction would.
    - unmatched: a label for no prediction seen (or an early one whose prediction never came).
    - duplicate: a second label for a prediction already joined, or a repeated request id.

    Only predictions move the join's clock. A label's `ts` may be on another clock (when the
    label became known, in the labelling system's time), and the labels topic is read at its own
    pace: a label read before its prediction waits `max_wait_s` of prediction time from when it
    was read, however far its own `ts` is from the predictions'.

    Labels without a request id match, by the configured `entity_keys`, the most recent
    waiting prediction of that entity made at or before the label's time.

    Examples
    --------
    >>> join = LabelJoin(max_wait_s=60)
    >>> join.add("r1", "fraud", "1", score=0.9, predicted=1, ts=0.0)
    []
    >>> join.add("r2", "fraud", "1", score=0.2, predicted=0, ts=1.0)
    []
    >>> [o.request_id for o in join.match("r1", label=0, ts=5.0)]
    ['r1']
    >>> join.add("r3", "fraud", "1", score=0.1, predicted=0, ts=100.0)   # r2 waited too long
    []
    >>> join.match("r2", label=1, ts=101.0)
    []
    >>> join.counters()["joined"], join.counters()["missing"], join.counters()["late"]
    (1, 1, 1)

    """

    def __init__(self, max_wait_s: float = 3600.0, max_pending: int = 200_000,
                 entity_keys: Iterable[str] = (), remember: int = 100_000):
        self.max_wait_s = float(max_wait_s)
        self.max_pending = int(max_pending)
        self.entity_keys = tuple(entity_keys)
        self.remember = int(remember)
        self.clock = float("-inf")
        # OrderedDict, not dict: both are queues popped from the front, and a plain dict's
        # first item is found by scanning past every slot deleted before it (quadratic)
        self._pending: OrderedDict[str, tuple] = OrderedDict()
        # request id -> (label, label ts, prediction clock when it was read), in arrival order
        self._early: OrderedDict[str, tuple[Any, float, float]] = OrderedDict()
        self._expired: OrderedDict[str, None] = OrderedDict()
        self._joined: OrderedDict[str, None] = OrderedDict()
        # joined while their prediction still sat in the monitor's unfinished batch
        self._joined_ahead: set[str] = set()
        self._by_entity: dict[tuple, deque[str]] = defaultdict(deque)
        self._counts = {"joined": 0, "missing": 0, "late": 0, "early": 0, "unmatched": 0, "duplicate": 0}

    def entity_key(self, entities: Mapping[str, Any] | None) -> tuple | None:
        if not self.entity_keys or not isinstance(entities, Mapping):
            return None
        try:
            key = tuple(entities[k] for k in self.entity_keys)
            hash(key)
        except (KeyError, TypeError):
            return None
        return key

    def add(self, request_id: str, model: str, model_version: str, score: float | None, predicted: Any,
            ts: float, entities: Mapping[str, Any] | None = None) -> list[Outcome]:
        """Start waiting for a prediction's label; outcomes for labels that were already waiting."""
        if ts > self.clock:
            self._advance(ts)
        if score is not None and not math.isfinite(score):
            score = None
        if request_id in self._joined_ahead:
            self._joined_ahead.discard(request_id)
            return []
        if request_id in self._pending or request_id in self._joined:
            self._counts["duplicate"] += 1
            return []
        early = self._early.pop(request_id, None) if self._early else None
        if early is not None:
            self._counts["joined"] += 1
            self._remember(self._joined, request_id)
            return [Outcome(request_id, model, model_version, score, predicted, early[0], ts, early[1])]
        key = self.entity_key(entities)
        self._pending[request_id] = (model, model_version, score, predicted, ts, key)
        if key is not None:
            self._by_entity[key].append(request_id)
            self._prune(key)
        if len(self._pending) > self.max_pending:
            self._give_up(next(iter(self._pending)))
        return []

    def add_block(self, predictions: Iterable[Any], model_version: str, scores: Iterable[float],
                  predicted: Iterable[Any], threshold: float = 0.5) -> list[Outcome]:
        """`add` for a block of `freshet.contracts.Prediction`s of one model version; a NaN score
        is kept as None, a missing predicted label is the score against `threshold`."""
        out: list[Outcome] = []
        pending, early, joined = self._pending, self._early, self._joined
        entity_key = self.entity_key if self.entity_keys else None
        by_entity = self._by_entity
        clock = self.clock
        for p, s, label in zip(predictions, scores, predicted):
            if s != s:
                s = None
            if label is None and s is not None:
                label = int(s >= threshold)
            rid, ts = p.request_id, p.ts
            if ts > clock:
                clock = ts
            if rid in self._joined_ahead:
                self._joined_ahead.discard(rid)
                continue
            if rid in pending or rid in joined:
                self._counts["duplicate"] += 1
                continue
            if early:
                waiting = early.pop(rid, None)
                if waiting is not None:
                    self._counts["joined"] += 1
                    self._remember(joined, rid)
                    out.append(Outcome(rid, p.model, model_version, s, label, waiting[0], ts, waiting[1]))
                    continue
            key = entity_key(p.entities) if entity_key is not None else None
            pending[rid] = (p.model, model_version, s, label, ts, key)
            if key is not None:
                by_entity[key].append(rid)
                self._prune(key)
        while len(pending) > self.max_pending:
            self._give_up(next(iter(pending)))
        if clock > self.clock:
            self._advance(clock)
        return out

    def match(self, request_id: str | None, label: Any, ts: float,
              entities: Mapping[str, Any] | None = None) -> list[Outcome]:
        """The outcome this label completes, if its prediction is waiting; counts it otherwise."""
        if not request_id:
            request_id = self._find_by_entity(entities, ts)
            if request_id is None:
                self._counts["unmatched"] += 1
                return []
        entry = self._pending.pop(request_id, None)
        if entry is None:
            if request_id in self._expired:
                self._counts["late"] += 1
            elif request_id in self._joined or request_id in self._early:
                self._counts["duplicate"] += 1
            else:
                self._counts["early"] += 1
                self._early[request_id] = (label, ts, self.clock)
                if len(self._early) > self.max_pending:
                    self._early.popitem(last=False)
                    self._counts["unmatched"] += 1
            return []
        self._counts["joined"] += 1
        self._remember(self._joined, request_id)
        if entry[_ENTITY] is not None:
            self._prune(entry[_ENTITY])
        return [Outcome(request_id, entry[_MODEL], entry[_VERSION], entry[_SCORE], entry[_PREDICTED],
                        label, entry[_TS], ts)]

    def tick(self, ts: float) -> None:
        """Predictions up to `ts` were seen (the caller holds some not `add`ed yet): end the waits that are over."""
        if ts > self.clock:
            self._advance(ts)

    def is_waiting_label(self, request_id: str) -> bool:
        """Whether a label for this request id waits for its prediction."""
        return request_id in self._early

    def take_early(self, request_id: str) -> tuple[Any, float] | None:
        """Take the waiting label of a prediction this join never holds (a canary's answer, judged
        elsewhere): (label, label ts), counted as joined."""
        waiting = self._early.pop(request_id, None)
        if waiting is None:
            return None
        self._counts["early"] -= 1
        self._counts["joined"] += 1
        return waiting[0], waiting[1]

    def join_ahead(self, request_id: str) -> tuple[Any, float] | None:
        """Take the waiting label of a prediction the caller holds but has not `add`ed yet
        (the monitor's unfinished batch); its later `add` is then skipped, not a duplicate."""
        waiting = self._early.pop(request_id, None)
        if waiting is None:
            return None
        self._counts["early"] -= 1
        self._counts["joined"] += 1
        self._remember(self._joined, request_id)
        self._joined_ahead.add(request_id)
        return waiting[0], waiting[1]

    def _find_by_entity(self, entities: Mapping[str, Any] | None, ts: float) -> str | None:
        key = self.entity_key(entities)
        if key is None or key not in self._by_entity:
            return None
        waiting = self._by_entity[key]
        for rid in reversed(waiting):
            entry = self._pending.get(rid)
            if entry is not None and entry[_TS] <= ts:
                return rid
        return None

    def _remember(self, seen: OrderedDict, request_id: str) -> None:
        seen[request_id] = None
        if len(seen) > self.remember:
            seen.popitem(last=False)

    def _give_up(self, request_id: str) -> None:
        entry = self._pending.pop(request_id)
        self._counts["missing"] += 1
        self._remember(self._expired, request_id)
        if entry[_ENTITY] is not None:
            self._prune(entry[_ENTITY])

    def _prune(self, key: tuple) -> None:
        """Drop an entity's oldest request ids that no longer wait, and the entity once none do."""
        waiting = self._by_entity.get(key)
        if waiting is None:
            return
        pending = self._pending
        while waiting and waiting[0] not in pending:
            waiting.popleft()
        if not waiting:
            del self._by_entity[key]

    def _advance(self, ts: float) -> None:
        """Move the prediction clock to `ts` (later than now) and end the waits it completes."""
        if self.clock == float("-inf") and self._early:
            # labels read before any prediction start waiting with the first one
            self._early = OrderedDict((rid, (label, lts, ts)) for rid, (label, lts, _) in self._early.items())
        self.clock = ts
        self._expire()

    def _expire(self) -> None:
        horizon = self.clock - self.max_wait_s
        pending = self._pending
        while pending:
            rid = next(iter(pending))
            if pending[rid][_TS] >= horizon:
                break
            self._give_up(rid)
        early = self._early
        while early:
            rid = next(iter(early))
            if early[rid][2] >= horizon:
                break
            early.popitem(last=False)
            self._counts["unmatched"] += 1

    def counters(self) -> dict[str, int]:
        """Join outcomes so far, plus how many predictions and labels are waiting now."""
        return {**self._counts, "pending": len(self._pending), "waiting_labels": len(self._early)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "clock": self.clock if self.clock != float("-inf") else None,
            "pending": [[rid, *entry[:5], list(entry[5]) if entry[5] is not None else None]
                        for rid, entry in self._pending.items()],
            "early": [[rid, label, ts, None if read_at == float("-inf") else read_at]
                      for rid, (label, ts, read_at) in self._early.items()],
            "expired": list(self._expired), "joined_ids": list(self._joined), "counts": dict(self._counts),
            "joined_ahead": sorted(self._joined_ahead),
        }

    def load_state(self, state: Mapping[str, Any]) -> "LabelJoin":
        clock = state.get("clock")
        self.clock = float("-inf") if clock is None else float(clock)
        self._pending.clear()
        self._by_entity.clear()
        for rid, model, version, score, predicted, ts, key in state.get("pending", []):
            key = tuple(key) if key is not None else None
            self._pending[rid] = (model, version, score, predicted, ts, key)
            if key is not None:
                self._by_entity[key].append(rid)
        self._early = OrderedDict()
        for rid, label, ts, *read_at in state.get("early", []):
            # state from before the clock was the predictions' alone: the label's own time
            at = read_at[0] if read_at else ts
            self._early[rid] = (label, ts, float("-inf") if at is None else float(at))
        self._expired = OrderedDict((rid, None) for rid in state.get("expired", []))
        self._joined = OrderedDict((rid, None) for rid in state.get("joined_ids", []))
        self._joined_ahead = set(state.get("joined_ahead", []))
        self._counts.update({k: int(v) for k, v in state.get("counts", {}).items() if k in self._counts})
        return self
