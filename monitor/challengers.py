"""Versions compared online: shadow and canary against the champion, a new champion against its predecessor.

Owns the labelled error rate per version and role, the join of shadow and canary answers to their
labels, the challenger verdicts (alerts) and the rollback decisions the service carries out.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Mapping

from freshet.challengers import CANARY, SHADOW, Comparison, RollbackRule, compare
from freshet.contracts import DriftAlert, Prediction

CHAMPION = "champion"
CHALLENGER_DETECTOR = "challenger"  # an alert comparing a shadow or canary with the champion
ROLLBACK_DETECTOR = "rollback"      # an alert that a new champion is worse than its predecessor
COMPARISON_DETECTORS = (CHALLENGER_DETECTOR, ROLLBACK_DETECTOR)  # not retraining triggers


def binary(v: Any) -> int | None:
    if v is True or v is False:
        return int(v)
    if type(v) in (int, float) and v in (0, 1):
        return int(v)
    return None


def predicted_label(prediction: Any, threshold: float = 0.5) -> int | None:
    """The 0/1 a prediction's answer says: its label, else its score against `threshold`."""
    if isinstance(prediction, Mapping):
        label = binary(prediction.get("label"))
        if label is not None:
            return label
        prediction = prediction.get("score")
    if type(prediction) in (int, float) and 0.0 <= prediction <= 1.0:
        return int(prediction >= threshold)
    return None


class Tally:
    """Labelled outcomes of one version in one role: all of them, and the latest `keep` as 0/1."""

    def __init__(self, keep: int = 2000):
        self.n = 0
        self.errors = 0
        self.recent: deque[int] = deque(maxlen=keep)

    def add(self, error: int) -> None:
        self.n += 1
        self.errors += error
        self.recent.append(error)

    def recent_counts(self) -> tuple[int, int]:
        return sum(self.recent), len(self.recent)

    @property
    def rate(self) -> float:
        return self.errors / self.n if self.n else float("nan")

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "errors": self.errors, "recent": "".join(map(str, self.recent))}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], keep: int) -> "Tally":
        t = cls(keep)
        t.n, t.errors = int(state["n"]), int(state["errors"])
        t.recent.extend(int(c) for c in state.get("recent", ""))
        return t


@dataclass
class Evidence:
    """A challenger judged against the champion at one of the rule's looks (`verdict`: worse, better or
    no difference), for the model registry: what promotion with online evidence reads."""

    model: str
    role: str
    version: str
    champion: str
    comparison: Comparison
    verdict: str

    def as_tag(self, ts: float) -> dict[str, Any]:
        c = self.comparison
        return {"role": self.role, "champion": self.champion, "n": c.new_n, "errors": c.new_errors,
                "champion_n": c.old_n, "champion_errors": c.old_errors, "error_rate": round(c.new_rate, 6),
                "champion_error_rate": round(c.old_rate, 6), "difference": [round(c.low, 6), round(c.high, 6)],
                "z": round(c.z, 4), "verdict": self.verdict, "ts": ts}


@dataclass
class RollbackDecision:
    """A champion to roll back: `version` of `model` is worse than `predecessor` by `comparison`."""

    model: str
    version: str
    predecessor: str
    comparison: Comparison
    alert_id: str


class OnlineComparison:
    """Error rates per (model, version, role) on joined labels, and what they decide.

    - Shadow answers ride in the champion's prediction record and are judged by the label that
      judges the champion's answer (the same requests: `basis` is the champion on those).
    - Canary answers are their own records, joined to labels by request id; their basis is the
      champion's outcomes on requests made since the canary's first one.
    - A champion version that follows another in the prediction log is on probation: at the rule's
      checkpoints its error rate is tested against the predecessor's latest outcomes; worse, it
      becomes a `RollbackDecision` (in `rollbacks`) and an alert.

    >>> from freshet.challengers import RollbackRule
    >>> from freshet.monitor.labels import Outcome
    >>> online = OnlineComparison(RollbackRule(alpha=0.01, min_outcomes=100, looks=1))
    >>> def serve(version, i):
    ...     p = Prediction(f"r{version}-{i}", "fraud", version, {}, {}, {"score": 0.9, "label": 1}, ts=float(i))
    ...     online.observe_prediction(p, [])
    >>> def judge(version, i, wrong):
    ...     online.observe_outcome(Outcome(f"r{version}-{i}", "fraud", version, 0.9, 1, 0 if wrong else 1,
    ...                                    float(i), float(i)), out)
    >>> out = []
    >>> for i in range(200):
    ...     serve("1", i); judge("1", i, wrong=i % 20 == 0)   # 5% errors
    >>> for i in range(200, 300):
    ...     serve("2", i); judge("2", i, wrong=i % 4 == 0)    # 25% errors
    >>> [(a.detector, a.subject) for a in out]
    [('rollback', 'champion:v2 vs v1')]
    >>> [(d.version, d.predecessor) for d in online.rollbacks]
    [('2', '1')]
    """

    def __init__(self, rule: RollbackRule | None = None, *, label_wait_s: float = 3600.0,
                 max_pending: int = 100_000, keep: int = 2000, seed: int = 0):
        self.rule = rule or RollbackRule()
        self.label_wait_s = float(label_wait_s)
        self.max_pending = int(max_pending)
        self.keep = max(int(keep), self.rule.min_outcomes)
        self.seed = seed
        self.tallies: dict[tuple[str, str, str], Tally] = {}
        # (model, role, challenger version) -> {"champion": version, "since": ts, "basis": Tally, "looks": n}
        self.pairs: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.champions: dict[str, str] = {}
        # model -> {"version", "predecessor", "looks"}: a new champion being judged
        self.probation: dict[str, dict[str, Any]] = {}
        # request id -> (role, model, version, predicted 0/1, ts): shadow and canary answers awaiting labels
        self.pending: OrderedDict[str, tuple] = OrderedDict()
        self.rollbacks: list[RollbackDecision] = []
        self.evidence: list[Evidence] = []
        self.clock = float("-inf")
        self.counts = {"shadow_answers": 0, "canary_answers": 0, "expired": 0, "rollbacks": 0, "confirmed": 0}

    def use_rule(self, rule: RollbackRule) -> None:
        """Judge by `rule` from now on (set before the first record: the kept outcomes follow it)."""
        self.rule = rule
        self.keep = max(self.keep, rule.min_outcomes)

    # -- records in ---------------------------------------------------------------------

    def observe_prediction(self, p: Prediction, out: list[DriftAlert]) -> bool:
        """Note a prediction record; True when it is a canary's (not the champion's: keep it out of
        the champion's watches)."""
        ts = float(p.ts)
        if ts > self.clock:
            self.clock = ts
            self._expire()
        version = str(p.model_version)
        if p.role == CANARY:
            self._wait(p.request_id, CANARY, p.model, version, predicted_label(p.prediction), ts)
            self.counts["canary_answers"] += 1
            pair = self.pairs.setdefault((p.model, CANARY, version), self._new_pair(ts))
            pair["since"] = min(pair["since"], ts)
            return True
        previous = self.champions.get(p.model)
        if previous != version:
            self.champions[p.model] = version
            if previous is not None:
                self.probation[p.model] = {"version": version, "predecessor": previous, "looks": 0}
        if isinstance(p.shadow, Mapping) and p.shadow.get("model_version") is not None:
            shadow_version = str(p.shadow["model_version"])
            self._wait(p.request_id, SHADOW, p.model, shadow_version, predicted_label(p.shadow.get("prediction")), ts)
            self.counts["shadow_answers"] += 1
            self.pairs.setdefault((p.model, SHADOW, shadow_version), self._new_pair(ts))
        return False

    def observe_label(self, request_id: str | None, label: Any, out: list[DriftAlert], ts: float) -> bool:
        """Judge a canary answer waiting for this label; True when the label was a canary's."""
        waiting = self.pending.get(request_id) if request_id else None
        if waiting is None or waiting[0] != CANARY:
            return False
        del self.pending[request_id]
        _, model, version, predicted, _ = waiting
        actual = binary(label)
        if actual is not None and predicted is not None:
            error = int(actual != predicted)
            self._tally(model, version, CANARY).add(error)
            self._judge_challenger(model, CANARY, version, out, ts)
        return True

    def observe_outcome(self, o: Any, out: list[DriftAlert]) -> None:
        """A champion answer joined to its label (a `monitor.labels.Outcome`): its version's tally, the
        shadow answer to the same request, the canaries' basis and the probation of a new champion."""
        actual, predicted = binary(o.label), binary(o.predicted)
        if actual is None or predicted is None:
            return
        error = int(actual != predicted)
        model, version = o.model, str(o.model_version)
        self._tally(model, version, CHAMPION).add(error)
        shadow = self.pending.get(o.request_id)
        if shadow is not None and shadow[0] == SHADOW:
            del self.pending[o.request_id]
            if shadow[3] is not None:
                self._tally(model, shadow[2], SHADOW).add(int(actual != shadow[3]))
                pair = self.pairs.get((model, SHADOW, shadow[2]))
                if pair is not None:
                    pair["basis"].add(error)
                    pair["champion"] = version
                self._judge_challenger(model, SHADOW, shadow[2], out, o.label_ts)
        for (m, role, _), pair in self.pairs.items():
            if m == model and role == CANARY and o.prediction_ts >= pair["since"]:
                pair["basis"].add(error)
                pair["champion"] = version
        self._judge_champion(model, version, out, o.label_ts)

    # -- verdicts -----------------------------------------------------------------------

    def _judge_champion(self, model: str, version: str, out: list[DriftAlert], ts: float) -> None:
        trial = self.probation.get(model)
        if trial is None or trial["version"] != version:
            return
        n = self.tallies[(model, version, CHAMPION)].n
        checkpoints = self.rule.checkpoints
        if trial["looks"] >= len(checkpoints) or n < checkpoints[trial["looks"]]:
            return
        trial["looks"] += 1
        new = self.tallies[(model, version, CHAMPION)]
        old = self.tallies.get((model, trial["predecessor"], CHAMPION), Tally())
        old_errors, old_n = old.recent_counts()
        c = compare(new.errors, new.n, old_errors, old_n)
        if self.rule.judge(c):
            alert = self._alert(model, version, ROLLBACK_DETECTOR, f"champion:v{version} vs v{trial['predecessor']}",
                                c, ts)
            out.append(alert)
            self.rollbacks.append(RollbackDecision(model, version, trial["predecessor"], c, alert.alert_id))
            self.counts["rollbacks"] += 1
            del self.probation[model]
        elif trial["looks"] >= len(checkpoints):
            self.counts["confirmed"] += 1
            del self.probation[model]

    def _judge_challenger(self, model: str, role: str, version: str, out: list[DriftAlert], ts: float) -> None:
        pair = self.pairs.get((model, role, version))
        if pair is None or pair["looks"] >= len(self.rule.checkpoints):
            return
        challenger = self.tallies[(model, version, role)]
        if challenger.n < self.rule.checkpoints[pair["looks"]]:
            return
        pair["looks"] += 1
        basis = pair["basis"]
        worse = compare(challenger.errors, challenger.n, basis.errors, basis.n)
        better = compare(basis.errors, basis.n, challenger.errors, challenger.n)
        verdict = "worse" if self.rule.judge(worse) else "better" if self.rule.judge(better) else None
        self.evidence.append(Evidence(model, role, version, pair["champion"], worse, verdict or "no difference"))
        if verdict is not None:
            subject = f"{role}:v{version} {verdict} than champion:v{pair['champion']}"
            out.append(self._alert(model, version, CHALLENGER_DETECTOR, subject, worse, ts))
            pair["looks"] = len(self.rule.checkpoints)  # decided: reported once

    def _alert(self, model: str, version: str, detector: str, subject: str, c: Comparison, ts: float) -> DriftAlert:
        digest = hashlib.blake2b(f"{self.seed}|{model}|{detector}|{subject}|{c.new_n}".encode(),
                                 digest_size=16).hexdigest()
        return DriftAlert(alert_id=digest, model=model, model_version=version, kind="performance", subject=subject,
                          detector=detector, statistic=round(c.z, 6), threshold=round(self.rule.threshold, 6),
                          window={"new": {"errors": c.new_errors, "n": c.new_n},
                                  "old": {"errors": c.old_errors, "n": c.old_n},
                                  "difference": [round(c.low, 6), round(c.high, 6)],
                                  "p_value": c.p_value}, ts=float(ts))

    # -- bookkeeping --------------------------------------------------------------------

    def _new_pair(self, ts: float) -> dict[str, Any]:
        return {"champion": "", "since": ts, "basis": Tally(self.keep), "looks": 0}

    def _tally(self, model: str, version: str, role: str) -> Tally:
        key = (model, version, role)
        t = self.tallies.get(key)
        if t is None:
            t = self.tallies[key] = Tally(self.keep)
        return t

    def _wait(self, request_id: str, role: str, model: str, version: str, predicted: int | None, ts: float) -> None:
        self.pending[request_id] = (role, model, version, predicted, ts)
        while len(self.pending) > self.max_pending:
            self.pending.popitem(last=False)
            self.counts["expired"] += 1

    def _expire(self) -> None:
        limit = self.clock - self.label_wait_s
        while self.pending:
            rid, entry = next(iter(self.pending.items()))
            if entry[4] >= limit:
                break
            del self.pending[rid]
            self.counts["expired"] += 1

    def take_evidence(self) -> list[Evidence]:
        out, self.evidence = self.evidence, []
        return out

    def take_rollbacks(self) -> list[RollbackDecision]:
        out, self.rollbacks = self.rollbacks, []
        return out

    def report(self) -> dict[str, Any]:
        """Per version and role: outcomes and error rate; per challenger: its difference from the champion."""
        versions = [{"model": m, "version": v, "role": r, "n": t.n, "errors": t.errors, "error_rate": t.rate}
                    for (m, v, r), t in self.tallies.items()]
        challengers = []
        for (m, role, v), pair in self.pairs.items():
            t = self.tallies.get((m, v, role))
            if t is None or not t.n or not pair["basis"].n:
                continue
            c = compare(t.errors, t.n, pair["basis"].errors, pair["basis"].n)
            challengers.append({"model": m, "role": role, "version": v, "champion": pair["champion"],
                                "n": t.n, "champion_n": c.old_n, "error_rate": c.new_rate,
                                "champion_error_rate": c.old_rate, "difference": c.difference,
                                "low": c.low, "high": c.high, "z": c.z})
        probation = {m: dict(t) for m, t in self.probation.items()}
        return {"versions": versions, "challengers": challengers, "probation": probation, **self.counts}

    # -- restart ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "tallies": [[m, v, r, t.state_dict()] for (m, v, r), t in self.tallies.items()],
            "pairs": [[m, r, v, {**p, "basis": p["basis"].state_dict()}] for (m, r, v), p in self.pairs.items()],
            "champions": dict(self.champions), "probation": {m: dict(t) for m, t in self.probation.items()},
            "pending": [[rid, *entry] for rid, entry in self.pending.items()],
            "clock": self.clock if self.clock != float("-inf") else None, "counts": dict(self.counts),
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self.tallies = {(m, v, r): Tally.from_state(t, self.keep) for m, v, r, t in state.get("tallies", [])}
        self.pairs = {(m, r, v): {**p, "basis": Tally.from_state(p["basis"], self.keep)}
                      for m, r, v, p in state.get("pairs", [])}
        self.champions = dict(state.get("champions", {}))
        self.probation = {m: dict(t) for m, t in state.get("probation", {}).items()}
        self.pending = OrderedDict((e[0], tuple(e[1:])) for e in state.get("pending", []))
        clock = state.get("clock")
        self.clock = float("-inf") if clock is None else float(clock)
        self.counts.update(state.get("counts", {}))
