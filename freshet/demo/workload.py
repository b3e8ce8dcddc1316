"""The example workload behind `freshet produce`: seeded card transactions, delayed fraud labels, drift.

`TransactionWorkload` generates it without Kafka (backfill tests, benchmarks, training);
`publish` sends it to Kafka at a fixed offered rate (`freshet produce`, in freshet.demo.cli).

Events (transactions topic, key = card_id, UTF-8 JSON, no schema tag: it is a user topic)::

    {"transaction_id": "tx0-42", "card_id": "card00017", "merchant_id": "m0003",
     "amount": 51.3, "country": "US", "channel": "pos", "event_ts": 1700000000.42}

`event_ts` is epoch seconds (float, UTC, microsecond resolution). Event time is simulated:
slot i happens at `start_ts + i / rate`, where `rate` counts events per *simulated* second;
`publish` offers `rate` events per wall-clock second and advances simulated time
`time_scale` times faster than the wall clock, so its simulated rate is rate / time_scale.

Labels (`settings.topic_labels`, key = request id, contract freshet.labels/1)::

    {"schema": "freshet.labels/1", "request_id": "tx0-42",
     "entities": {"card_id": "card00017", "merchant_id": "m0003"},
     "label": 1, "ts": 1700000030.42, "event_ts": 1700000000.42}

`request_id` is the transaction id: serving must use the transaction id as the request id
of a prediction so labels join to predictions. `ts` is when the label became known
(transaction time + `label_delay_s`, simulated); `event_ts` is the transaction's own
event time, for point-in-time training sets. A label is published once the simulated
clock passes `ts`; labels still pending when a run ends are published at once.

Fraud comes from a latent process a model can learn from windowed features:
"takeover bursts" (3-10 transactions within 2 minutes on one card, 4-12x the card's
typical amount, at several merchants, mostly risky ones, mostly abroad and on the web)
carry 85% of it; the rest is single transactions whose odds rise with the amount over
the card's typical spend, a foreign country, a risky merchant and the web channel.
Legitimate "shopping sprees" (2-8 ordinary purchases within 10 minutes) keep velocity
alone from being the answer. `fraud_rate` (default 3%) is the overall share.

Drift, from a simulated second on (`KIND@WHEN`, WHEN = seconds since the first event,
suffix s/m/h allowed):

- `covariate`: amounts x `covariate_factor` (default 2; again at each further
  covariate drift), foreign share 5% -> 25%, app channel 15% -> 35%. The fraud mechanism is unchanged (it reads amounts relative to the
  card's own, equally scaled, spend), but every amount feature shifts.
- `concept`: fraud moves to "card testing": 1-4 tiny amounts (0.50-4.99) spread over
  10 minutes, at home, mostly in the app, at a different set of risky merchants; the
  takeover bursts stop. A model trained before misses nearly all of it (its error rises
  by about the fraud rate) while a retrained one can learn it (tiny amount vs the card's
  usual spend). A second `concept` switches back.

Velocity is a signal only while a card makes few transactions per window: keep
simulated rate / cards at or below ~0.002/s (one transaction per card per ~8 minutes,
so bursts stand out), e.g. `--rate 2000 --time-scale 100 --cards 10000`.
"""

from __future__ import annotations

import heapq
import math
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import orjson

DRIFT_KINDS = ("covariate", "concept")
MALFORMED_KINDS = ("bad_json", "missing_field", "wrong_type")
# latent episode kind of each event (TransactionBatch.pattern)
PATTERNS = ("normal", "takeover_burst", "card_testing", "shopping_spree")
NORMAL, BURST, TESTING, SPREE = range(4)

COUNTRIES = ("US", "GB", "DE", "FR", "ES", "IT", "NL", "CA", "BR", "IN", "MX", "JP")
_HOME_WEIGHTS = np.array([30, 12, 10, 9, 7, 6, 5, 6, 5, 4, 3, 3], dtype=float)
CHANNELS = ("pos", "web", "app")
POS, WEB, APP = range(3)
EVENT_FIELDS = ("transaction_id", "card_id", "merchant_id", "amount", "country", "channel", "event_ts")
# fields the engine requires (join keys, aggregated columns, timestamp): what "missing_field" drops
REQUIRED_FIELDS = ("card_id", "merchant_id", "amount", "event_ts")

DEFAULT_START_TS = 1_700_000_000.0  # 2023-11-14T22:13:20Z, the iterator's clock unless told
DEFAULT_TOPIC = os.environ.get("FRESHET_TRANSACTIONS_TOPIC", "transactions")
LABEL_SCHEMA = "freshet.labels/1"

_BLOCK = 4096  # slots generated at a time; any split of calls yields the same stream
_BG_SHARE = 0.15  # share of fraud that is single transactions rather than episodes
_SPREE_SHARE = 0.03  # share of events in legitimate sprees
_FOREIGN_P = (0.05, 0.25)  # per covariate level (0, >=1)
_CHANNEL_P = ((0.55, 0.30, 0.15), (0.35, 0.30, 0.35))
_BURST_CHANNEL_P = (0.1, 0.7, 0.2)
_TESTING_CHANNEL_P = (0.2, 0.2, 0.6)
_SPREE_CHANNEL_P = (0.7, 0.1, 0.2)
_MEAN_K = {BURST: 6.0, TESTING: 2.4, SPREE: 4.0}


# --- drift specs -------------------------------------------------------------------

class DriftSpecError(ValueError):
    """A drift spec is not KIND@WHEN; the message shows the accepted form."""


@dataclass(frozen=True)
class DriftSpec:
    """One drift injection: `kind` from `at_s` simulated seconds after the first event on.

    >>> parse_drift("covariate@120")
    DriftSpec(kind='covariate', at_s=120.0)
    >>> parse_drift("concept@2m").at_s
    120.0
    """

    kind: str
    at_s: float


# A bare WHEN counts `unit`s; a suffixed one (30s, 2.5m, 1h) says its own.
_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0}


class _When(NamedTuple):
    name: str       # what the spec calls WHEN
    plural: str     # what a bare number counts
    examples: str


_WHEN = {"s": _When("WHEN", "seconds", "covariate@120 or concept@5m"),       # `freshet produce`: simulated s
         "m": _When("MINUTE", "minutes", "covariate@1.5 or concept@90s")}    # `freshet demo`: traffic minutes


def read_drift(text: str, unit: str = "s") -> tuple[str, float]:
    """Read "KIND@WHEN" as (kind, WHEN in `unit`): WHEN is a number of `unit`s ("s" or "m")
    or carries an s/m/h suffix.

    >>> read_drift(" Concept@2.5 ", unit="m")
    ('concept', 2.5)
    >>> read_drift("covariate@90s", unit="m")
    ('covariate', 1.5)
    """
    when_is = _WHEN[unit]
    form = f"use KIND@{when_is.name}, e.g. {when_is.examples}; kinds: {', '.join(DRIFT_KINDS)}"
    kind, sep, when = str(text).strip().partition("@")
    kind = kind.strip().lower()
    if not sep or not when.strip():
        raise DriftSpecError(f"drift spec {text!r} has no '@{when_is.name}'; {form}")
    if kind not in DRIFT_KINDS:
        raise DriftSpecError(f"drift spec {text!r}: unknown kind {kind!r}; {form}")
    when = when.strip().lower()
    suffix = when[-1] if when[-1] in _SECONDS else ""
    try:
        at = float(when[:-1] if suffix else when)
    except ValueError:
        raise DriftSpecError(f"drift spec {text!r}: {when!r} is not a time; {form}") from None
    if suffix:
        at = at * _SECONDS[suffix] / _SECONDS[unit]
    if not math.isfinite(at) or at < 0:
        raise DriftSpecError(f"drift spec {text!r}: the time must be >= 0 {when_is.plural}; {form}")
    return kind, at


def parse_drift(text: str) -> DriftSpec:
    """Parse "KIND@WHEN" (WHEN in simulated seconds, or with an s/m/h suffix)."""
    return DriftSpec(*read_drift(text, unit="s"))


def _as_spec(d: DriftSpec | str) -> DriftSpec:
    return d if isinstance(d, DriftSpec) else parse_drift(d)


# --- pacing ------------------------------------------------------------------------

class TokenBucket:
    """Admits `rate` events per second on average, at most `burst` at once.

    It starts empty, so a run never opens with a burst; time is passed in, so it is pure.

    >>> b = TokenBucket(rate=100, burst=10, now=0.0)
    >>> b.take(50, now=0.05)
    5
    >>> b.take(50, now=1.0)
    10
    >>> round(b.wait(10, now=1.0), 3)
    0.1
    """

    def __init__(self, rate: float, burst: float | None = None, now: float = 0.0):
        if not rate > 0:
            raise ValueError(f"rate must be > 0 events/s, got {rate}")
        self.rate = float(rate)
        self.burst = float(burst) if burst else max(1.0, self.rate * 0.1)
        self.tokens = 0.0
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, n: int, now: float) -> int:
        """Grant up to `n` events now; the caller sends exactly what is granted."""
        self._refill(now)
        granted = min(int(n), int(self.tokens))
        self.tokens -= granted
        return granted

    def wait(self, n: int, now: float) -> float:
        """Seconds until `n` events (at most a burst) can be granted."""
        self._refill(now)
        return max(0.0, (min(float(n), self.burst) - self.tokens) / self.rate)


# --- generated data ----------------------------------------------------------------

@dataclass
class TransactionBatch:
    """Consecutive slots of the workload as columns (numpy arrays), with ground truth.

    Event columns are `EVENT_FIELDS`; the rest is what a simulator knows and a
    consumer does not: `label` (1 = fraud), `label_ts` (when the label is known),
    `pattern` (index into PATTERNS), `late` (event_ts pushed back by late_by_s),
    `malformed` (a MALFORMED_KINDS name, or "" when the event is sent intact), `sim_s`
    (true simulated seconds since the first event) and `slot` (position in the stream).
    """

    slot: np.ndarray
    transaction_id: np.ndarray
    card_id: np.ndarray
    merchant_id: np.ndarray
    amount: np.ndarray
    country: np.ndarray
    channel: np.ndarray
    event_ts: np.ndarray
    label: np.ndarray
    label_ts: np.ndarray
    pattern: np.ndarray
    late: np.ndarray
    malformed: np.ndarray
    sim_s: np.ndarray

    def __len__(self) -> int:
        return len(self.slot)

    @classmethod
    def concat(cls, parts: Sequence["TransactionBatch"]) -> "TransactionBatch":
        if len(parts) == 1:
            return parts[0]
        names = cls.__dataclass_fields__
        return cls(**{n: np.concatenate([getattr(p, n) for p in parts]) for n in names})

    def _slice(self, start: int, stop: int) -> "TransactionBatch":
        return TransactionBatch(**{n: getattr(self, n)[start:stop] for n in self.__dataclass_fields__})

    def columns(self, ground_truth: bool = True) -> dict[str, np.ndarray]:
        names = self.__dataclass_fields__ if ground_truth else EVENT_FIELDS
        return {n: getattr(self, n) for n in names}

    def to_pandas(self, ground_truth: bool = True):
        import pandas as pd

        return pd.DataFrame(self.columns(ground_truth))

    def events(self) -> list[dict[str, Any]]:
        """The events as dicts, exactly as published when intact."""
        cols = [getattr(self, n).tolist() for n in EVENT_FIELDS]
        return [dict(zip(EVENT_FIELDS, row)) for row in zip(*cols)]

    def messages(self) -> list[tuple[bytes, bytes]]:
        """(key, value) per slot for the transactions topic, malformed slots corrupted."""
        keys = [c.encode() for c in self.card_id.tolist()]
        dumps = orjson.dumps
        values = [
            dumps({"transaction_id": t, "card_id": c, "merchant_id": m, "amount": a,
                   "country": co, "channel": ch, "event_ts": ts})
            for t, c, m, a, co, ch, ts in zip(
                self.transaction_id.tolist(), self.card_id.tolist(), self.merchant_id.tolist(),
                self.amount.tolist(), self.country.tolist(), self.channel.tolist(), self.event_ts.tolist())
        ]
        for i in np.flatnonzero(self.malformed != ""):
            values[i] = _corrupt(values[i], self.malformed[i], int(self.slot[i]))
        return list(zip(keys, values))

    def label_messages(self) -> list[tuple[bytes, bytes]]:
        """(key, value) freshet.labels/1 messages for the intact events (malformed ones get none)."""
        keep = self.malformed == ""
        dumps = orjson.dumps
        return [
            (t.encode(), dumps({"schema": LABEL_SCHEMA, "request_id": t,
                                "entities": {"card_id": c, "merchant_id": m},
                                "label": y, "ts": lts, "event_ts": ets}))
            for t, c, m, y, lts, ets in zip(
                self.transaction_id[keep].tolist(), self.card_id[keep].tolist(),
                self.merchant_id[keep].tolist(), self.label[keep].tolist(),
                self.label_ts[keep].tolist(), self.event_ts[keep].tolist())
        ]


def _corrupt(value: bytes, kind: str, slot: int) -> bytes:
    """A broken copy of an encoded event, of the given kind; which field varies by slot."""
    if kind == "bad_json":
        return value[: len(value) // 2]
    event = orjson.loads(value)
    if kind == "missing_field":
        del event[REQUIRED_FIELDS[slot % len(REQUIRED_FIELDS)]]
    elif slot % 2:
        event["card_id"] = slot  # a number where a string belongs
    else:
        event["amount"] = f"{event['amount']:.2f}"  # a string where a number belongs
    return orjson.dumps(event)


def _ids(prefix: str, n: int) -> np.ndarray:
    width = len(str(max(n - 1, 0)))
    return np.array([f"{prefix}{i:0{width}d}" for i in range(n)], dtype=object)


def _cdf(weights) -> np.ndarray:
    c = np.cumsum(np.asarray(weights, dtype=float))
    c /= c[-1]
    c[-1] = 1.0 + 1e-12  # a draw of 1 - eps must never fall off the end
    return c


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _solve_intercept(scores: np.ndarray, target: float) -> float:
    """b such that mean(sigmoid(b + scores)) == target (bisection; monotone in b)."""
    lo, hi = -30.0, 10.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _sigmoid(mid + scores).mean() < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


class TransactionWorkload:
    """A seeded, endless stream of card transactions with ground-truth fraud labels.

    Deterministic: the same arguments (seed, rate, ...) give the same stream, however it is read
    (`events(5)` twice equals `events(10)`). `late_fraction`, `malformed_fraction` and
    `jitter_s` draw from their own random streams, so turning them on changes only
    the events they touch.

    >>> w = TransactionWorkload(seed=7, cards=100, merchants=20, rate=10)
    >>> e = next(w.events(1))
    >>> sorted(e) == sorted(EVENT_FIELDS), e["event_ts"]
    (True, 1700000000.0)
    >>> w2 = TransactionWorkload(seed=7, cards=100, merchants=20, rate=10)
    >>> [x["amount"] for x in w2.events(3)][0] == e["amount"]
    True
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        cards: int = 10_000,
        merchants: int = 1_000,
        rate: float = 20.0,
        start_ts: float = DEFAULT_START_TS,
        fraud_rate: float = 0.03,
        drift: Sequence[DriftSpec | str] = (),
        covariate_factor: float = 2.0,
        label_delay_s: float = 30.0,
        jitter_s: float = 0.0,
        late_fraction: float = 0.0,
        late_by_s: float = 120.0,
        malformed_fraction: float = 0.0,
        id_prefix: str | None = None,
    ):
        if cards < 1 or merchants < 1:
            raise ValueError(f"need at least one card and one merchant, got cards={cards} merchants={merchants}")
        if not rate > 0:
            raise ValueError(f"rate must be > 0 events per simulated second, got {rate}")
        if not 0 < fraud_rate < 0.5:
            raise ValueError(f"fraud_rate must be in (0, 0.5), got {fraud_rate}")
        for name, value in (("late_fraction", late_fraction), ("malformed_fraction", malformed_fraction)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        for name, value in (("label_delay_s", label_delay_s), ("jitter_s", jitter_s), ("late_by_s", late_by_s)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0 seconds, got {value}")
        if not covariate_factor > 0:
            raise ValueError(f"covariate_factor must be > 0, got {covariate_factor}")
        self.seed = int(seed)
        self.rate = float(rate)
        self.start_ts = float(start_ts)
        self.fraud_rate = float(fraud_rate)
        self.drift = tuple(sorted((_as_spec(d) for d in drift), key=lambda d: d.at_s))
        self.covariate_factor = float(covariate_factor)
        self.label_delay_s = float(label_delay_s)
        self.jitter_s = float(jitter_s)
        self.late_fraction = float(late_fraction)
        self.late_by_s = float(late_by_s)
        self.malformed_fraction = float(malformed_fraction)
        self.id_prefix = f"tx{self.seed}-" if id_prefix is None else id_prefix

        self._cov_at = np.array([d.at_s for d in self.drift if d.kind == "covariate"])
        self._con_at = np.array([d.at_s for d in self.drift if d.kind == "concept"])
        streams = np.random.SeedSequence(self.seed).spawn(8)
        world, self._rs, self._rep, self._rlab, self._rjit, self._rlate, self._rmal, calib = (
            np.random.default_rng(s) for s in streams)
        self._build_world(world, cards, merchants)
        self._calibrate(calib)
        self._pending: list[tuple] = []  # heap of episode members not yet placed
        self._seq = 0
        self._next_block = 0
        self._buffer: deque[TransactionBatch] = deque()
        self._offset = 0  # read position in the buffer's first block

    # world: cards and merchants, fixed for the run
    def _build_world(self, rng: np.random.Generator, cards: int, merchants: int) -> None:
        self.card_ids = _ids("card", cards)
        self.merchant_ids = _ids("m", merchants)
        self._typical = np.exp(rng.normal(math.log(40.0), 0.7, cards))
        self._card_cdf = _cdf(np.exp(rng.normal(0.0, 0.5, cards)))
        self._home = np.searchsorted(_cdf(_HOME_WEIGHTS), rng.random(cards))
        self.home_country = np.array(COUNTRIES, dtype=object)[self._home]  # aligned with card_ids
        # Zipf-like popularity: merchant rank r gets weight 1 / r^1.1
        self._merch_cdf = _cdf(1.0 / np.arange(1, merchants + 1) ** 1.1)
        self._price = np.exp(rng.normal(0.0, 0.4, merchants))
        risky_a = rng.random(merchants) < 0.05
        risky_b = (rng.random(merchants) < 0.05) & ~risky_a
        for risky in (risky_a, risky_b):
            if not risky.any():
                risky[int(rng.integers(merchants))] = True
        self._risky = (risky_a, risky_b)
        self._risky_idx = (np.flatnonzero(risky_a), np.flatnonzero(risky_b))

    def _normal_drivers(self, rng, n, pattern_b, cov_level):
        card = np.searchsorted(self._card_cdf, rng.random(n))
        merch = np.searchsorted(self._merch_cdf, rng.random(n))
        ratio = self._price[merch] * np.exp(rng.normal(0.0, 0.4, n))
        level = np.minimum(cov_level, 1)
        foreign = rng.random(n) < np.take(_FOREIGN_P, level)
        other = rng.integers(1, len(COUNTRIES), n)
        country = np.where(foreign, (self._home[card] + other) % len(COUNTRIES), self._home[card])
        cdfs = np.cumsum(np.array(_CHANNEL_P), axis=1)[level]
        channel = (rng.random(n)[:, None] > cdfs[:, :2]).sum(axis=1)
        score = np.where(pattern_b, self._score_b(merch, ratio, channel), self._score_a(merch, ratio, foreign, channel))
        return card, merch, ratio, country, channel, score

    # The single-transaction fraud odds per mechanism (before the calibrated intercept).
    def _score_a(self, merch, ratio, foreign, channel):
        return (2.0 * np.log(np.maximum(ratio, 1.0)) + 1.2 * foreign
                + 1.5 * self._risky[0][merch] + 0.6 * (channel == WEB))

    def _score_b(self, merch, ratio, channel):
        return 1.5 * self._risky[1][merch] + 0.8 * (channel == APP) + 1.5 * (ratio < 0.3)

    def _calibrate(self, rng: np.random.Generator) -> None:
        n = 50_000
        episode_share = self.fraud_rate * (1 - _BG_SHARE) + _SPREE_SHARE
        target = self.fraud_rate * _BG_SHARE / (1 - episode_share)
        self._b0 = []
        for pattern_b in (False, True):
            *_, score = self._normal_drivers(rng, n, np.full(n, pattern_b), np.zeros(n, dtype=int))
            self._b0.append(_solve_intercept(score, target))
        episodes = self.fraud_rate * (1 - _BG_SHARE)
        self._start_p = {BURST: episodes / _MEAN_K[BURST], TESTING: episodes / _MEAN_K[TESTING],
                         SPREE: _SPREE_SHARE / _MEAN_K[SPREE]}

    # episodes: members are (sim_s, seq, card, merchant, amount, country, channel, label, pattern)
    def _episode(self, kind: int, at: float) -> None:
        e = self._rep
        card = int(np.searchsorted(self._card_cdf, e.random()))
        home = int(self._home[card])
        typical = float(self._typical[card])
        if kind == BURST:
            k, span, label, chan_p = 3 + min(int(e.poisson(3.0)), 7), 120.0, 1, _BURST_CHANNEL_P
            country = (home + int(e.integers(1, len(COUNTRIES)))) % len(COUNTRIES) if e.random() < 0.7 else home
        elif kind == TESTING:
            k, span, label, chan_p = 1 + min(int(e.poisson(1.5)), 3), 600.0, 1, _TESTING_CHANNEL_P
            country = home
        else:
            k, span, label, chan_p = 2 + min(int(e.poisson(2.0)), 6), 600.0, 0, _SPREE_CHANNEL_P
            country = (home + int(e.integers(1, len(COUNTRIES)))) % len(COUNTRIES) if e.random() < 0.2 else home
        offsets = np.sort(np.concatenate([[0.0], e.uniform(0.0, span, k - 1)]))
        chan_cdf = np.cumsum(chan_p)
        for off in offsets:
            if kind == SPREE:
                merch = int(np.searchsorted(self._merch_cdf, e.random()))
                amount = typical * float(self._price[merch]) * math.exp(e.normal(0.0, 0.4))
            else:
                risky = self._risky_idx[0 if kind == BURST else 1]
                if e.random() < 0.6:
                    merch = int(risky[int(e.integers(len(risky)))])
                else:
                    merch = int(np.searchsorted(self._merch_cdf, e.random()))
                amount = typical * e.uniform(4.0, 12.0) if kind == BURST else e.uniform(0.5, 4.99)
            channel = int(np.searchsorted(chan_cdf, e.random() * chan_cdf[-1]))
            self._seq += 1
            heapq.heappush(self._pending, (at + float(off), self._seq, card, merch, amount, country,
                                           min(channel, 2), label, kind))

    def _make_block(self) -> TransactionBatch:
        b = self._next_block
        self._next_block += 1
        n = _BLOCK
        slot = np.arange(b * n, (b + 1) * n, dtype=np.int64)
        sim_s = slot / self.rate
        cov = np.searchsorted(self._cov_at, sim_s, side="right") if len(self._cov_at) else np.zeros(n, int)
        con = np.searchsorted(self._con_at, sim_s, side="right") if len(self._con_at) else np.zeros(n, int)
        pattern_b = con % 2 == 1

        card, merch, ratio, country, channel, score = self._normal_drivers(self._rs, n, pattern_b, cov)
        amount = np.maximum(self._typical[card] * ratio, 1.0)
        b0 = np.where(pattern_b, self._b0[1], self._b0[0])
        label = (self._rlab.random(n) < _sigmoid(b0 + score)).astype(np.int8)
        pattern = np.zeros(n, dtype=np.int8)

        # episodes start on slots, then their members take the first free slot at or after their time
        fraud_p = np.where(pattern_b, self._start_p[TESTING], self._start_p[BURST])
        fraud_starts = np.flatnonzero(self._rep.random(n) < fraud_p)
        spree_starts = np.flatnonzero(self._rep.random(n) < self._start_p[SPREE])
        starts = [(j, TESTING if pattern_b[j] else BURST) for j in fraud_starts.tolist()]
        starts += [(j, SPREE) for j in spree_starts.tolist()]
        for j, kind in sorted(starts):
            self._episode(kind, float(sim_s[j]))
        self._place_members(slot[0], sim_s[-1], card, merch, amount, country, channel, label, pattern)

        cov_factor = self.covariate_factor ** cov
        amount = np.round(amount * cov_factor, 2)

        true_ts = self.start_ts + sim_s
        event_ts = true_ts.copy()
        if self.jitter_s > 0:
            event_ts -= self._rjit.uniform(0.0, self.jitter_s, n)
        late = np.zeros(n, dtype=bool)
        if self.late_fraction > 0:
            late = self._rlate.random(n) < self.late_fraction
            event_ts[late] -= self.late_by_s
        malformed = np.full(n, "", dtype=object)
        if self.malformed_fraction > 0:
            bad = self._rmal.random(n) < self.malformed_fraction
            kinds = self._rmal.integers(0, len(MALFORMED_KINDS), n)
            malformed[bad] = np.array(MALFORMED_KINDS, dtype=object)[kinds[bad]]

        return TransactionBatch(
            slot=slot,
            transaction_id=np.array([f"{self.id_prefix}{i}" for i in slot.tolist()], dtype=object),
            card_id=self.card_ids[card],
            merchant_id=self.merchant_ids[merch],
            amount=amount,
            country=np.array(COUNTRIES, dtype=object)[country],
            channel=np.array(CHANNELS, dtype=object)[channel],
            event_ts=np.round(event_ts, 6),
            label=label,
            label_ts=np.round(true_ts + self.label_delay_s, 6),
            pattern=pattern,
            late=late,
            malformed=malformed,
            sim_s=sim_s,
        )

    def _place_members(self, first_slot, last_sim_s, card, merch, amount, country, channel, label, pattern):
        n = len(card)
        taken = np.zeros(n, dtype=bool)
        carried = []
        while self._pending and self._pending[0][0] <= last_sim_s:
            member = heapq.heappop(self._pending)
            at, _, c, m, a, co, ch, y, kind = member
            j = max(int(math.ceil(at * self.rate - 1e-6)) - int(first_slot), 0)
            while j < n and taken[j]:
                j += 1
            if j >= n:
                carried.append(member)
                continue
            taken[j] = True
            card[j], merch[j], amount[j], country[j], channel[j], label[j], pattern[j] = c, m, a, co, ch, y, kind
        for member in carried:
            heapq.heappush(self._pending, member)

    # reading the stream
    def batch(self, n: int) -> TransactionBatch:
        """The next `n` slots as columns."""
        parts, want = [], int(n)
        while want > 0:
            if not self._buffer:
                self._buffer.append(self._make_block())
            head = self._buffer[0]
            take = min(want, len(head) - self._offset)
            parts.append(head._slice(self._offset, self._offset + take))
            self._offset += take
            want -= take
            if self._offset == len(head):
                self._buffer.popleft()
                self._offset = 0
        if not parts:
            return self._make_empty()
        return TransactionBatch.concat(parts)

    def _make_empty(self) -> TransactionBatch:
        if not self._buffer:
            self._buffer.append(self._make_block())
        return self._buffer[0]._slice(self._offset, self._offset)

    def events(self, n: int) -> Iterator[dict[str, Any]]:
        """The next `n` events as dicts (always intact: malformation happens in `messages()`)."""
        left = int(n)
        while left > 0:
            chunk = self.batch(min(left, _BLOCK))
            left -= len(chunk)
            yield from chunk.events()

    def labelled_events(self, n: int) -> Iterator[tuple[dict[str, Any], int]]:
        """The next `n` events with their ground-truth label (1 = fraud)."""
        left = int(n)
        while left > 0:
            chunk = self.batch(min(left, _BLOCK))
            left -= len(chunk)
            yield from zip(chunk.events(), chunk.label.tolist())


# --- publishing ----------------------------------------------------------------------

def _produce_all(producer, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    """Queue every message, waiting for room when librdkafka's queue is full."""
    produce = producer.produce
    i, n = 0, len(messages)
    while i < n:
        try:
            while i < n:
                key, value = messages[i]
                produce(topic, value, key)
                i += 1
        except BufferError:
            producer.poll(0.05)
    producer.poll(0)


def publish(
    settings,
    topic: str = DEFAULT_TOPIC,
    rate: float = 1000.0,
    count: int | None = None,
    duration: float | None = None,
    seed: int = 0,
    labels: bool = True,
    drift: Sequence[DriftSpec | str] = (),
    progress: Callable[[dict[str, Any]], None] | None = None,
    *,
    time_scale: float = 1.0,
    start_ts: float | None = None,
    should_stop: Callable[[], bool] | None = None,
    **workload: Any,
) -> dict[str, Any]:
    """Publish the workload to `topic` (key card_id) and its labels to settings.topic_labels.

    `rate` is the offered rate in events per wall-clock second (token-bucket paced; offer
    more than the producer can send to measure its maximum). Stops after `count` events,
    after `duration` wall seconds, when `should_stop()` turns true, or on Ctrl-C; with
    none of them it runs on. Event time starts at `start_ts` (default: now) and advances
    `time_scale` simulated seconds per wall second. `progress` is called about once a
    second with {sent, labels, rate, elapsed_s, sim_ts}. Other keyword arguments go to
    `TransactionWorkload`. Returns the run's summary; `failed` counts messages the broker
    did not acknowledge.
    """
    from freshet import kafka

    if not rate > 0:
        raise ValueError(f"rate must be > 0 events/s, got {rate}")
    if not time_scale > 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale}")
    if count is not None and count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    w = TransactionWorkload(seed, rate=rate / time_scale, drift=drift,
                            start_ts=time.time() if start_ts is None else start_ts, **workload)
    kafka.ensure_topics(settings, [topic, *([settings.topic_labels] if labels else [])])

    failed, first_error = 0, ""

    def on_error(err, msg) -> None:
        nonlocal failed, first_error
        if err is not None:
            failed += 1
            first_error = first_error or str(err)

    # linger 100 ms: the embedded broker (Tansu 0.6, memory engine) spends CPU per stored batch on
    # every fetch, growing with the log; 5 ms batches at 200 events/s took it from 0.3 to 0.9 of
    # a core within 90 s, 100 ms batches to 0.4 (measured here)
    producer = kafka.producer(settings, **{
        "on_delivery": on_error, "delivery.report.only.error": True, "linger.ms": 100,
        "queue.buffering.max.messages": 200_000, "queue.buffering.max.kbytes": 262_144,
    })
    chunk = int(min(5000, max(1, rate * 0.005)))  # ~5 ms of traffic per produce round
    clock = time.monotonic
    t0 = clock()
    bucket = TokenBucket(rate, burst=max(chunk, rate * 0.1), now=t0)
    pending: deque[TransactionBatch] = deque()  # events whose labels are not due yet
    sent = n_labels = fraud = malformed = late = 0
    sim_now = w.start_ts
    interrupted = False
    last_report, last_sent = t0, 0

    def release(until: float) -> None:
        nonlocal n_labels, fraud
        while pending:
            head = pending[0]
            due = int(np.searchsorted(head.label_ts, until, side="right"))
            if due == 0:
                return
            part = head._slice(0, due)
            msgs = part.label_messages()
            _produce_all(producer, settings.topic_labels, msgs)
            n_labels += len(msgs)
            fraud += int(part.label[part.malformed == ""].sum())
            if due == len(head):
                pending.popleft()
            else:
                pending[0] = head._slice(due, len(head))

    try:
        while True:
            now = clock()
            if count is not None and sent >= count:
                break
            if duration is not None and now - t0 >= duration:
                break
            if should_stop is not None and should_stop():
                break
            want = chunk if count is None else min(chunk, count - sent)
            n = bucket.take(want, now)
            if n == 0:
                producer.poll(0)
                time.sleep(min(bucket.wait(want, now), 0.05))
                continue
            b = w.batch(n)
            _produce_all(producer, topic, b.messages())
            sent += n
            malformed += int((b.malformed != "").sum())
            late += int(b.late.sum())
            sim_now = w.start_ts + float(b.sim_s[-1])
            if labels:
                pending.append(b)
                release(sim_now)
            if progress is not None and now - last_report >= 1.0:
                progress({"sent": sent, "labels": n_labels, "rate": (sent - last_sent) / (now - last_report),
                          "elapsed_s": now - t0, "sim_ts": sim_now})
                last_report, last_sent = now, sent
    except KeyboardInterrupt:
        interrupted = True
    events_elapsed = clock() - t0
    if labels:
        release(math.inf)  # the run ends: every remaining label is known now
    unsent = producer.flush(30.0)
    elapsed = clock() - t0
    return {
        "sent": sent,
        "events": sent - malformed,
        "labels": n_labels,
        "fraud": fraud,
        "malformed": malformed,
        "late": late,
        "failed": failed + unsent,
        "first_error": first_error or None,
        "elapsed_s": round(elapsed, 3),  # including the last labels and the final flush
        "rate": round(sent / events_elapsed, 1) if events_elapsed > 0 else 0.0,  # events/s while producing
        "offered_rate": rate,
        "time_scale": time_scale,
        "topic": topic,
        "labels_topic": settings.topic_labels if labels else None,
        "seed": seed,
        "start_ts": w.start_ts,
        "sim_end_ts": sim_now,
        "drift": [f"{d.kind}@{d.at_s:g}" for d in w.drift],
        "interrupted": interrupted,
    }
