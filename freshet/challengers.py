"""Challengers: the shadow and canary aliases, how a canary's share of traffic is picked, and the
rule that judges one version's live error rate against another's.

Shared by serving (which version answers, which one scores in shadow), the monitor (the online
comparison, automatic rollback) and the model admin commands.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Mapping

SHADOW = "shadow"  # scores live traffic beside the champion; logged, never returned
CANARY = "canary"  # answers a share of live traffic
ROLES = (SHADOW, CANARY)
CANARY_SHARE_TAG = "freshet.canary_share"  # on the registered model: the canary's share, "0.1"
# freshet.models stages beyond the aliases: a challenger cleared, a champion rolled back by the monitor
CLEARED = "cleared"
ROLLED_BACK = "rolled_back"
# on a model version: the monitor's latest online comparison of it with the champion (JSON)
EVIDENCE_TAG = "freshet.online_evidence"


def parse_share(raw: Any, what: str = "--share") -> float:
    """A canary share: a number in (0, 1]; ValueError naming `what` otherwise.

    >>> parse_share("0.1")
    0.1
    >>> parse_share(0)
    Traceback (most recent call last):
    ...
    ValueError: --share must be a fraction above 0 and at most 1 (0.1 sends a tenth of traffic), got 0
    """
    try:
        share = float(raw)
    except (TypeError, ValueError):
        share = float("nan")
    if not 0.0 < share <= 1.0:
        raise ValueError(f"{what} must be a fraction above 0 and at most 1 (0.1 sends a tenth of traffic), got {raw}")
    return share


def routing_position(key: str) -> float:
    """Where `key` falls in [0, 1): the same for the same key in every process and run.

    >>> routing_position("tx-1") == routing_position("tx-1")
    True
    >>> 0.0 <= routing_position("tx-2") < 1.0
    True
    """
    digest = hashlib.blake2b(key.encode(), digest_size=8, person=b"freshet-canary").digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def routing_key(instance: Mapping[str, Any]) -> str:
    """What a /predict instance is routed by: its request id when the client sent one, else its
    entities (so one card and merchant meet the same version on every request).

    >>> routing_key({"request_id": "tx-9", "entities": {"card_id": "c1"}})
    'id:tx-9'
    >>> routing_key({"entities": {"merchant_id": "m", "card_id": "c1"}})
    'entities:card_id=c1|merchant_id=m'
    """
    rid = instance.get("request_id")
    if isinstance(rid, str):
        return f"id:{rid}"
    entities = instance.get("entities")
    if isinstance(entities, dict):
        return "entities:" + "|".join(f"{k}={entities[k]}" for k in sorted(entities))
    return ""


def goes_to_canary(instance: Mapping[str, Any], share: float) -> bool:
    """Whether the canary answers this instance, at `share` of traffic (deterministic)."""
    return share > 0.0 and routing_position(routing_key(instance)) < share


# ---------------------------------------------------------------------------
# judging error rates online
# ---------------------------------------------------------------------------

def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def normal_quantile(p: float) -> float:
    """z with P(Z <= z) = p, by bisection on erfc (enough for thresholds)."""
    lo, hi = -12.0, 12.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 1.0 - normal_sf(mid) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass(frozen=True)
class Comparison:
    """Error rates of a `new` version and an `old` one, and the one-sided test that `new` is worse.

    `z` is the pooled two-proportion statistic (positive: new errs more), `p_value` its
    one-sided p-value, `low`/`high` the Wald interval of new - old at `confidence`."""

    new_errors: int
    new_n: int
    old_errors: int
    old_n: int
    z: float
    p_value: float
    low: float
    high: float

    @property
    def new_rate(self) -> float:
        return self.new_errors / self.new_n if self.new_n else float("nan")

    @property
    def old_rate(self) -> float:
        return self.old_errors / self.old_n if self.old_n else float("nan")

    @property
    def difference(self) -> float:
        return self.new_rate - self.old_rate


def compare(new_errors: int, new_n: int, old_errors: int, old_n: int, confidence: float = 0.95) -> Comparison:
    """Two-proportion z-test (pooled) that the new error rate exceeds the old one.

    >>> c = compare(30, 200, 10, 200)
    >>> round(c.z, 2), round(c.p_value, 4), round(c.difference, 3)
    (3.33, 0.0004, 0.1)
    >>> compare(0, 200, 0, 200).p_value  # no errors either side: no evidence
    1.0
    """
    if new_n <= 0 or old_n <= 0:
        return Comparison(new_errors, new_n, old_errors, old_n, 0.0, 1.0, -1.0, 1.0)
    p1, p2 = new_errors / new_n, old_errors / old_n
    pooled = (new_errors + old_errors) / (new_n + old_n)
    se0 = math.sqrt(pooled * (1 - pooled) * (1 / new_n + 1 / old_n))
    z = (p1 - p2) / se0 if se0 > 0 else 0.0
    se = math.sqrt(p1 * (1 - p1) / new_n + p2 * (1 - p2) / old_n)
    half = normal_quantile(0.5 + confidence / 2) * se
    return Comparison(new_errors, new_n, old_errors, old_n, z, normal_sf(z) if se0 > 0 else 1.0,
                      p1 - p2 - half, p1 - p2 + half)


@dataclass(frozen=True)
class RollbackRule:
    """When a newly promoted champion's live error rate is significantly worse than its predecessor's.

    The new champion is judged at `looks` checkpoints, when it has `min_outcomes`, twice as many,
    four times as many ... labelled outcomes, each time against its predecessor's latest (at least
    `min_outcomes`) outcomes, by a one-sided two-proportion z-test at `alpha / looks` (Bonferroni
    over the looks: repeated looks keep the chance of rolling back a champion that is not worse
    below `alpha`). It also has to be worse by at least `min_difference` (absolute). After the
    last look without evidence the champion is confirmed and no longer judged.

    >>> rule = RollbackRule(alpha=0.01, min_outcomes=200, looks=3)
    >>> rule.checkpoints
    (200, 400, 800)
    >>> rule.judge(compare(30, 200, 10, 200))        # 15% vs 5%: p = 0.0004 < 0.01 / 3
    True
    >>> rule.judge(compare(15, 200, 10, 200))        # 7.5% vs 5%: not significant
    False
    >>> rule.judge(compare(30, 200, 10, 150))        # too few outcomes of the predecessor
    False
    """

    alpha: float = 0.01
    min_outcomes: int = 200
    looks: int = 4
    min_difference: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"rollback alpha must be in (0, 1), got {self.alpha}")
        if self.min_outcomes < 10:
            raise ValueError(f"rollback min_outcomes must be at least 10, got {self.min_outcomes}")
        if not 1 <= self.looks <= 20:
            raise ValueError(f"rollback looks must be 1..20, got {self.looks}")
        if not 0.0 <= self.min_difference < 1.0:
            raise ValueError(f"rollback min_difference must be in [0, 1), got {self.min_difference}")

    @classmethod
    def from_settings(cls, settings: Any) -> "RollbackRule":
        return cls(settings.rollback_alpha, settings.rollback_min_outcomes, settings.rollback_looks,
                   settings.rollback_min_difference)

    @property
    def checkpoints(self) -> tuple[int, ...]:
        return tuple(self.min_outcomes * 2 ** k for k in range(self.looks))

    @property
    def threshold(self) -> float:
        """The z a look must exceed."""
        return normal_quantile(1.0 - self.alpha / self.looks)

    def judge(self, c: Comparison) -> bool:
        """True when the new version is worse: enough outcomes both sides, significant, large enough."""
        if c.new_n < self.min_outcomes or c.old_n < self.min_outcomes:
            return False
        return c.p_value < self.alpha / self.looks and c.difference >= self.min_difference


def evidence_problem(evidence: Mapping[str, Any] | None, champion: str | None, min_outcomes: int) -> str:
    """Why a version's online evidence (the monitor's EVIDENCE_TAG, parsed) does not support promoting it
    over `champion`; "" when it does: compared with that champion on at least `min_outcomes` labelled
    outcomes and not found worse.

    >>> ev = {"role": "shadow", "champion": "3", "n": 400, "verdict": "no difference"}
    >>> evidence_problem(ev, "3", 200)
    ''
    >>> evidence_problem({**ev, "verdict": "worse"}, "3", 200)
    'the monitor found it worse than champion v3 on 400 labelled outcomes'
    >>> evidence_problem(ev, "5", 200)
    'its online evidence compares it with v3, not the current champion v5'
    >>> evidence_problem(None, "3", 200)
    'it has no online evidence'
    """
    if not evidence:
        return "it has no online evidence"
    if str(evidence.get("champion")) != str(champion):
        return f"its online evidence compares it with v{evidence.get('champion')}, not the current champion v{champion}"
    n = int(evidence.get("n", 0))
    if n < min_outcomes:
        return f"it has {n} labelled outcomes of the {min_outcomes} needed (FRESHET_ROLLBACK_MIN_OUTCOMES)"
    if evidence.get("verdict") == "worse":
        return f"the monitor found it worse than champion v{champion} on {n} labelled outcomes"
    return ""
