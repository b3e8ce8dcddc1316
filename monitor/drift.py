"""The drift monitor: predictions and labels in, few and precise `DriftAlert`s out.

Owns routing records to each model's watches, block accumulation of predictions, alert budgets
(Bonferroni split, cooldown, de-duplication), counters and restart state.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from itertools import chain
from operator import itemgetter
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from freshet.contracts import ContractError, DriftAlert, Label, Prediction

from .challengers import OnlineComparison
from .config import ModelConfig, MonitorConfig
from .detectors import ConfigError
from .estimate import ExpectedErrorEstimate
from .labels import LabelJoin, Outcome
from .watches import CandidateAlert, CategoricalWatch, NumericWatch, OutcomeWatch, finite_or_zero

STATE_FORMAT = "freshet.monitor.state/1"
_TS_TYPES = (float, int)
WARMING_UP = "warming_up"
# a training reference's miss rate is used when its holdout held at least this many positives (fewer
# pin it down too loosely: 3 of 10 missed is a 95% interval of 0.07-0.65); else it warms up on traffic
MIN_REFERENCE_POSITIVES = 10  # the detector of a notice that a windowed feature is not judged yet

# (model, version) -> the training reference logged with that version (a dict), or None
ReferenceSource = Callable[[str, str], "Mapping[str, Any] | None"]


class ModelMonitor:
    """Everything watched for one model; `DriftMonitor` routes records to it."""

    def __init__(self, config: ModelConfig, seed: int, references: ReferenceSource | None = None):
        self.config = cfg = config
        self.seed = seed
        self.references = references if cfg.use_training_reference else None
        self.reference_source = "warm-up"   # or "training v<version>": what the features are judged against
        streams = max(1, cfg.drift_streams)
        delta = cfg.alpha / streams
        names = list(cfg.numeric_features)
        kinds = ["feature"] * len(names)
        detectors = [cfg.feature_detector] * len(names)
        if cfg.watch_score:
            names.append("score")
            kinds.append("prediction")
            detectors.append(cfg.score_detector)
        self.score_column = len(cfg.numeric_features) if cfg.watch_score else None
        self.numeric = NumericWatch(names, kinds, detectors, delta, cfg, seed) if names else None
        self.categories = CategoricalWatch(cfg.categorical_features, delta, cfg) if cfg.categorical_features else None
        perf_delta = cfg.performance_alpha / (1 + bool(cfg.estimate) + bool(cfg.miss_warmup))
        self.outcomes = OutcomeWatch(cfg.error_detector, perf_delta, cfg.label_warmup, seed + 15485863)
        self.misses = (OutcomeWatch(cfg.error_detector, perf_delta, cfg.miss_warmup, seed + 32452843,
                                    subject="miss_rate", recent=cfg.miss_warmup) if cfg.miss_warmup else None)
        self.estimate = self._new_estimate(perf_delta) if cfg.estimate else None
        self._pending_scores: list[np.ndarray] = []
        self._pending_n = 0
        self._perf_delta = perf_delta
        self._num_get = _getter(cfg.numeric_features)
        self.version: str | None = None
        self._raw_version: Any = None
        self._block_size = cfg.block_size * cfg.batch_blocks
        self.block: list[Prediction] = []
        self.n = 0                 # predictions observed
        self.n_outcomes = 0        # labelled outcomes observed
        self.last_alert: dict[str, int] = {}
        self.counts: Counter[str] = Counter()
        self.invalid: Counter[str] = Counter()   # feature -> values of the wrong type
        self.last_ts = 0.0
        # every labelled outcome, of any version (the online comparison's), before this version's watches
        self.on_outcome: Callable[[Outcome, list[DriftAlert]], None] | None = None

    def _new_estimate(self, delta: float) -> ExpectedErrorEstimate:
        cfg = self.config
        return ExpectedErrorEstimate(
            decision_threshold=cfg.decision_threshold, window=cfg.estimate_window, reference_size=cfg.warmup,
            alpha=delta, min_increase=cfg.estimate_min_increase, calibration_labels=cfg.calibration_labels,
        )

    # -- predictions --------------------------------------------------------------------

    def observe(self, p: Prediction, join: LabelJoin | None, out: list[DriftAlert]) -> None:
        if p.model_version != self._raw_version:
            self._switch_version(p.model_version, join, out, float(p.ts))
        block = self.block
        block.append(p)
        if len(block) >= self._block_size:
            self.flush(join, out)

    def _switch_version(self, raw: Any, join: LabelJoin | None, out: list[DriftAlert], ts: float) -> None:
        version = str(raw)
        self._raw_version = raw
        if version == self.version:
            return
        first = self.version is None
        if not first:
            self.flush(join, out)
        reference = self._training_reference(version)
        if not first and (self.config.rewarm_on_new_version or reference is not None):
            self._new_version()
        self.version = version
        if reference is not None:
            self._use_reference(reference, ts, out)
        elif first:
            self._hold_unfilled_windows(ts, out)

    def _training_reference(self, version: str) -> Any:
        """The version's training reference, or None (none logged, none readable, or not asked for)."""
        if self.references is None:
            return None
        from freshet.reference import TrainingReference

        try:
            raw = self.references(self.config.model, version)
            return TrainingReference.from_dict(raw) if raw is not None else None
        except Exception:  # noqa: BLE001 - a registry hiccup or a bad document: fall back to warming up
            self.counts["reference_errors"] += 1
            return None

    def _use_reference(self, ref: Any, ts: float, out: list[DriftAlert]) -> None:
        """Judge this version's traffic against what it was trained on, from this prediction on.

        Inputs the monitor watches but the reference lacks keep what they had; a windowed input
        whose window was not full in the training data waits until it would be."""
        self.counts["training_references"] += 1
        self.reference_source = f"training v{self.version}"
        self._forget_alerts(("feature", "data_quality"))   # judged against a new reference from here
        watch = self.numeric
        if watch is not None:
            use, hold = [], []
            for j, name in enumerate(watch.names):
                r = ref.score if j == self.score_column else ref.numeric.get(name)
                if r is None or not r.quantiles:
                    continue
                (use if r.full or not r.window_s else hold).append((j, r))
            if use:
                q = max(len(r.quantiles) for _, r in use)
                sample = np.column_stack([_resampled(r.sample(), q) for _, r in use])
                watch.use_reference([j for j, _ in use], sample, [r.low for _, r in use], [r.high for _, r in use],
                                    [r.missing_rate for _, r in use], min(r.n for _, r in use),
                                    tolerance=self.config.reference_tolerance)
            behind = (ref.examples_end - ref.history_start
                      if ref.examples_end is not None and ref.history_start is not None else 0.0)
            for j, r in hold:
                self._hold(j, float(r.window_s), behind, ts, ts + max(0.0, float(r.window_s) - behind), out)
        outcomes = getattr(ref, "outcomes", None)
        if (self.misses is not None and outcomes is not None and outcomes.positives >= MIN_REFERENCE_POSITIVES
                and outcomes.miss_rate is not None):
            self.misses.use_reference(outcomes.miss_rate, outcomes.positives)
        cats = self.categories
        if cats is not None and all(n in ref.categorical for n in cats.names):
            cats.use_reference([ref.categorical[n].to_dict() for n in cats.names])

    def _hold_unfilled_windows(self, ts: float, out: list[DriftAlert]) -> None:
        """Without a training reference: windowed features wait until their window has had its
        length of history (from `history_start`, or else from this first prediction)."""
        cfg, watch = self.config, self.numeric
        if watch is None or not cfg.windows:
            return
        start = cfg.history_start if cfg.history_start is not None else ts
        for j, name in enumerate(watch.names):
            w = cfg.windows.get(name)
            if w and ts - start < w:
                self._hold(j, w, ts - start, ts, start + w, out)

    def _hold(self, column: int, window_s: float, behind_s: float, ts: float, until: float,
              out: list[DriftAlert]) -> None:
        """Hold one numeric column until `until`, and say so on the alert feed (a data-quality notice)."""
        name = self.numeric.names[column]
        self.numeric.hold_columns([column], until)
        self.counts["warming_notices"] += 1
        digest = hashlib.blake2b(f"{self.seed}|{self.config.model}|{WARMING_UP}|{name}|{self.version}|{until}".encode(),
                                 digest_size=16).hexdigest()
        out.append(DriftAlert(
            alert_id=digest, model=self.config.model, model_version=self.version or "", kind="data_quality",
            subject=name, detector=WARMING_UP, statistic=finite_or_zero(max(0.0, behind_s)), threshold=window_s,
            window={"start": ts, "end": until}, ts=ts))

    def warming_until(self) -> dict[str, float]:
        """Windowed features held until their window is full: name -> prediction time they are judged from."""
        watch = self.numeric
        if watch is None:
            return {}
        return {n: float(u) for n, u in zip(watch.names, watch.held_until.tolist()) if math.isfinite(u)}

    def _new_version(self) -> None:
        """A new model version scores differently: its score and performance references start over."""
        self.counts["new_versions"] += 1
        # the score and outcome references start over, and so do their alerts' cooldowns: the old
        # version's alerts say nothing about how the new one scores (a concept drift right after a
        # promotion was otherwise suppressed by the previous version's error-rate alert)
        self._forget_alerts(("prediction", "performance"))
        if self.score_column is not None:
            self.numeric.reset_columns([self.score_column])
        self.outcomes.reset()
        if self.misses is not None:
            self.misses.reset()
        if self.estimate is not None:
            self.estimate = self._new_estimate(self._perf_delta)
            self._pending_scores, self._pending_n = [], 0

    def _forget_alerts(self, kinds: Sequence[str]) -> None:
        """Restart the cooldown of these kinds' alerts."""
        prefixes = tuple(f"{k}|" for k in kinds)
        self.last_alert = {k: v for k, v in self.last_alert.items() if not k.startswith(prefixes)}

    def flush(self, join: LabelJoin | None, out: list[DriftAlert]) -> None:
        block, self.block = self.block, []
        if not block:
            return
        n = len(block)
        self.n += n
        last = block[-1]
        self.last_ts = finite_or_zero(last.ts) if isinstance(last.ts, (int, float)) else self.last_ts
        feats = [p.features for p in block]
        preds = [p.prediction for p in block]
        scores = self._scores([x.get("score") if type(x) is dict else x for x in preds])
        signals: list[CandidateAlert] = []
        if self.numeric is not None:
            F = len(self.config.numeric_features)
            if self.score_column is None:
                X = self._numeric(feats)
            else:
                X = np.empty((n, F + 1))
                if F:
                    X[:, :F] = self._numeric(feats)
                X[:, F] = scores
            signals += self.numeric.update(X, now=self.last_ts)
        if self.categories is not None:
            signals += self.categories.update([[f.get(k) for f in feats] for k in self.config.categorical_features])
        if self.estimate is not None:
            # the estimate judges whole windows: hand it scores a window at a time
            self._pending_scores.append(scores)
            self._pending_n += n
            if self._pending_n >= self.config.estimate_window:
                e = self.estimate
                if e.update(np.concatenate(self._pending_scores)):
                    signals.append(CandidateAlert("performance", "estimated_error_rate", "cbpe",
                                                  finite_or_zero(e.estimate), finite_or_zero(e.limit), e.window))
                self._pending_scores, self._pending_n = [], 0
        if join is not None and self.config.join_labels:
            threshold = self.config.decision_threshold
            predicted = [x.get("label") if type(x) is dict else None for x in preds]
            for o in join.add_block(block, self.version, scores.tolist(), predicted, threshold):
                self.observe_outcome(o, out)
        self._emit(signals, self.n, out)

    def _numeric(self, feats: list[dict]) -> np.ndarray:
        """The block's numeric features as floats; missing and unreadable values are NaN.

        A value is a number if `float()` takes it (numeric strings and booleans too, which
        keeps the common path one C-level pass); anything else counts as invalid."""
        names = self.config.numeric_features
        F = len(names)
        try:
            X = np.fromiter(chain.from_iterable(map(self._num_get, feats)), float, count=len(feats) * F)
            X = X.reshape(len(feats), F)
        except (KeyError, TypeError, ValueError):
            X = np.full((len(feats), F), np.nan)
            for i, f in enumerate(feats):
                for j, name in enumerate(names):
                    v = f.get(name)
                    if v is None:
                        continue
                    try:
                        X[i, j] = float(v)
                    except (TypeError, ValueError, OverflowError):
                        self.invalid[name] += 1
        X[np.isinf(X)] = np.nan
        return X

    def _scores(self, raw: list) -> np.ndarray:
        try:
            s = np.fromiter(raw, float, count=len(raw))
        except (TypeError, ValueError):
            s = np.array([v if type(v) in (float, int) else None for v in raw], dtype=float)
        s[np.isinf(s)] = np.nan
        bad = ~((s >= 0.0) & (s <= 1.0)) if self.estimate is not None else np.isnan(s)
        if bad.any():
            self.counts["invalid_scores"] += int(bad.sum())
        return s

    # -- labels ---------------------------------------------------------------------------

    def waiting_outcome(self, request_id: str, label: Any, label_ts: float) -> Outcome | None:
        """The outcome for a prediction still in the unfinished batch, if it is there."""
        for p in reversed(self.block):
            if p.request_id == request_id:
                x = p.prediction
                raw = x.get("score") if type(x) is dict else x
                score = float(raw) if type(raw) in (int, float) and math.isfinite(raw) else None
                predicted = x.get("label") if type(x) is dict else None
                if predicted is None and score is not None:
                    predicted = int(score >= self.config.decision_threshold)
                return Outcome(request_id, p.model, self.version or "", score, predicted, label, p.ts, label_ts)
        return None

    def observe_outcome(self, o: Outcome, out: list[DriftAlert]) -> None:
        if self.on_outcome is not None:
            self.on_outcome(o, out)
        if o.model_version != self.version:
            self.counts["outcomes_for_old_version"] += 1
            return
        actual = _binary(o.label)
        predicted = _binary(o.predicted)
        if actual is None or predicted is None:
            self.counts["invalid_outcomes"] += 1
            return
        self.n_outcomes += 1
        if self.estimate is not None and o.score is not None:
            self.estimate.calibrate(o.score, actual)
        signals = [self.outcomes.update(int(predicted != actual))]
        if actual == 1 and self.misses is not None:
            signals.append(self.misses.update(int(predicted != 1)))
        signals = [s for s in signals if s is not None]
        if signals:
            # stamped on the prediction stream's clock, as every other alert: a label's own ts may be on
            # another (the demo's labels carry simulated time, hours from the predictions' wall clock),
            # and the retraining policy, which keeps time by the predictions, dropped such alerts unheard
            self._emit(signals, self.n_outcomes, out, ts=max(self.last_ts, finite_or_zero(o.prediction_ts)))

    def warming_up(self) -> list[str]:
        """Columns (and "outcomes") still building their reference."""
        out = []
        if self.numeric is not None:
            out += [name for name, ready in zip(self.numeric.names, self.numeric.ready.tolist()) if not ready]
        if self.categories is not None and not self.categories.ready:
            out += list(self.categories.names)
        if self.outcomes.n < self.outcomes.warmup:
            out.append("outcomes")
        return out

    # -- alerts ---------------------------------------------------------------------------

    def deadletter(self, rate: float, ts: float | None, window: int, out: list[DriftAlert]) -> None:
        limit = self.config.deadletter_rate
        if rate > limit:
            alert = CandidateAlert("data_quality", "deadletter", "deadletter_rate", finite_or_zero(rate), limit, window)
            self._emit([alert], self.n, out, ts=ts)

    def _emit(self, signals: list[CandidateAlert], position: int, out: list[DriftAlert],
              ts: float | None = None) -> None:
        for s in signals:
            key = f"{s.kind}|{s.subject}|{s.detector}"
            last = self.last_alert.get(key)
            if last is not None and position - last < self.config.cooldown:
                self.counts["suppressed"] += 1
                continue
            self.last_alert[key] = position
            self.counts[f"alerts_{s.kind}"] += 1
            digest = hashlib.blake2b(f"{self.seed}|{self.config.model}|{key}|{position}|{self.n_outcomes}".encode(),
                                     digest_size=16).hexdigest()
            out.append(DriftAlert(
                alert_id=digest, model=self.config.model, model_version=self.version or "", kind=s.kind,
                subject=s.subject, detector=s.detector, statistic=s.statistic, threshold=s.threshold,
                window=int(s.window), ts=self.last_ts if ts is None else float(ts),
            ))

    # -- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.version, "reference_source": self.reference_source, "n": self.n, "n_outcomes": self.n_outcomes, "last_ts": self.last_ts,
            "last_alert": dict(self.last_alert), "counts": dict(self.counts), "invalid": dict(self.invalid),
            "block": [_json_safe(p.to_dict()) for p in self.block],
            "numeric": self.numeric.state_dict() if self.numeric else None,
            "categories": self.categories.state_dict() if self.categories else None,
            "outcomes": self.outcomes.state_dict(),
            "misses": self.misses.state_dict() if self.misses is not None else None,
            "estimate": self.estimate.state_dict() if self.estimate else None,
        }

    def load_state(self, state: Mapping[str, Any]) -> list[str]:
        """Restore; the names of the parts that start a fresh warm-up instead."""
        fresh = []
        self.version = state.get("version")
        self._raw_version = self.version
        self.reference_source = str(state.get("reference_source", "warm-up"))
        self.n = int(state.get("n", 0))
        self.n_outcomes = int(state.get("n_outcomes", 0))
        self.last_ts = float(state.get("last_ts", 0.0))
        self.last_alert = {k: int(v) for k, v in state.get("last_alert", {}).items()}
        self.counts = Counter(state.get("counts", {}))
        self.invalid = Counter(state.get("invalid", {}))
        self.block = []
        for raw in state.get("block", []):
            try:
                self.block.append(Prediction.decode(raw))
            except ContractError:
                self.counts["unrestorable_block_records"] += 1
        for name in ("numeric", "categories"):
            watch, saved = getattr(self, name), state.get(name)
            if watch is not None and not (saved and watch.load_state(saved)):
                fresh.append(name)
        if state.get("outcomes"):
            self.outcomes.load_state(state["outcomes"])
        if self.misses is not None and state.get("misses"):
            self.misses.load_state(state["misses"])
        if self.estimate is not None:
            try:
                self.estimate.load_state(state["estimate"])
            except (KeyError, TypeError, ValueError):
                fresh.append("estimate")
        return fresh


def _resampled(values: np.ndarray, n: int) -> np.ndarray:
    """Quantiles at n evenly spaced levels from quantiles at len(values) levels."""
    if len(values) == n:
        return values
    return np.interp((np.arange(n) + 0.5) / n, (np.arange(len(values)) + 0.5) / len(values), values)


def _getter(names: Sequence[str]):
    if not names:
        return lambda f: ()
    if len(names) == 1:
        name = names[0]
        return lambda f: (f[name],)
    return itemgetter(*names)


def _json_safe(value: Any) -> Any:
    """NaN and infinities become None (what JSON can carry, and what the monitor calls missing)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _binary(v: Any) -> int | None:
    if v is True or v is False:
        return int(v)
    if type(v) in (int, float) and v in (0, 1):
        return int(v)
    return None


# ---------------------------------------------------------------------------------------


class DriftMonitor:
    """Watches models' inputs, scores and outcomes; returns `DriftAlert`s, usable without Kafka.

    Built from a `MonitorConfig` (or its dict form, or a list of `ModelConfig`).

    How it stays fast and quiet:
    - The first `warmup` predictions of a model are its reference: per numeric column a
      quantile grid (values become normal scores), bounds, missing rate; per categorical
      column its frequencies. The reference then fills the detectors' windows, quietly.
    - Predictions are taken in blocks of `block_size` (16): per column the block's standard
      scores are summed (numpy) and `sum / sqrt(count)`, N(0, 1) while nothing changes,
      feeds one River detector. `batch_blocks` (3) blocks are judged in one call to spread
      numpy's per-call cost. One detector update per column per block, not per prediction,
      is what keeps one process above 50,000 predictions a second; alerts come out when a
      batch is judged, so call `flush()` when the stream goes idle. A label that arrives
      while its prediction waits in a batch is joined at once.
    - `alpha` is a family-wise budget split evenly over the watched columns (Bonferroni);
      an alert for the same (kind, subject, detector) is suppressed for `cooldown`
      observations; the error rate alerts only when it rises.
    - `state_dict()` is plain JSON. River detectors are not serialised (no pickle): each
      column keeps a summary of its recent block statistics, and `load_state` refills fresh
      detectors with synthetic values of that level, quietly, so the restarted monitor
      neither warms up again nor floods (a restart during warm-up starts it again).

    Records that break their contract are counted in `counters()` and never raise.
    Deterministic: the same records in the same order give the same alerts, ids included,
    for the same seed.

    Examples
    --------
    >>> import random
    >>> from freshet.contracts import Prediction
    >>> monitor = DriftMonitor([ModelConfig("fraud", numeric_features=["amount"], warmup=500, estimate=False)])
    >>> rng = random.Random(1)
    >>> def prediction(i, shift):
    ...     return Prediction(f"r{i}", "fraud", "1", {}, {"amount": rng.gauss(shift, 1)}, {"score": 0.1}, ts=i)
    >>> [a for i in range(3000) for a in monitor.observe(prediction(i, 0.0))]
    []
    >>> alerts = [a for i in range(3000, 3200) for a in monitor.observe(prediction(i, 1.0))]
    >>> [(a.kind, a.subject, a.detector) for a in alerts]
    [('feature', 'amount', 'adwin')]

    """

    def __init__(self, config: MonitorConfig | Mapping[str, Any] | Sequence[ModelConfig], *,
                 known_features: Iterable[str] | None = None, references: ReferenceSource | None = None):
        if isinstance(config, Mapping):
            config = MonitorConfig.from_dict(config)
        elif not isinstance(config, MonitorConfig):
            config = MonitorConfig(models=tuple(config))
        self.config = config
        self.models = {m.model: ModelMonitor(m, config.seed + 1000003 * i, references)
                       for i, m in enumerate(config.models)}
        self.join = LabelJoin(config.label_wait_s, config.max_pending_labels, config.label_entity_keys)
        # shadow and canary against the champion, a new champion against its predecessor
        self.online = OnlineComparison(label_wait_s=config.label_wait_s, seed=config.seed)
        for m in self.models.values():
            m.on_outcome = self.online.observe_outcome
        self.rejected: Counter[str] = Counter()
        self.unmonitored: Counter[str] = Counter()
        if known_features is not None:
            self.check_features(known_features)

    def check_features(self, known_feature_names: Iterable[str]) -> None:
        """Raise ConfigError naming every configured feature not among the known ones."""
        known = set(known_feature_names)
        problems = []
        for name, m in self.models.items():
            unknown = [f for f in (*m.config.numeric_features, *m.config.categorical_features) if f not in known]
            if unknown:
                problems.append(f"model {name!r}: {', '.join(map(repr, unknown))}")
        if problems:
            raise ConfigError("unknown feature(s) in the monitor config: " + "; ".join(problems))

    def observe(self, prediction: Prediction | Mapping[str, Any] | bytes | str) -> list[DriftAlert]:
        """Take one `freshet.predictions` record; the alerts it completes (usually none).

        A label that arrived before its prediction is joined here, so a performance alert
        can come out of this call too."""
        out: list[DriftAlert] = []
        p = prediction if type(prediction) is Prediction else self._decode(prediction, Prediction)
        if p is None:
            return out
        m = self.models.get(p.model) if type(p.model) is str else None
        if m is None:
            self._unmonitored(p.model)
        elif type(p.features) is not dict:
            self._reject("features is not an object")
        elif type(p.request_id) is not str or type(p.ts) not in _TS_TYPES:
            self._reject("bad request_id or ts")
        elif not self.online.observe_prediction(p, out):  # a canary's answer is not the champion's traffic
            m.observe(p, self.join, out)
        else:
            early = self.join.take_early(p.request_id) if self.join.is_waiting_label(p.request_id) else None
            if early is not None:  # its label was read first
                self.online.observe_label(p.request_id, early[0], out, float(early[1]))
        return out

    def observe_label(self, label: Label | Mapping[str, Any] | bytes | str) -> list[DriftAlert]:
        """Take one `freshet.labels` record; alerts on the labelled error rate it completes."""
        out: list[DriftAlert] = []
        if type(label) is Label:
            try:
                label.check()
            except ContractError as exc:
                self._reject(str(exc)[:80])
                return out
            lab = label
        else:
            lab = self._decode(label, Label)
        if lab is None:
            return out
        if not isinstance(lab.ts, (int, float)) or (lab.request_id is not None and type(lab.request_id) is not str):
            self._reject("bad label request_id or ts")
            return out
        if self.online.observe_label(lab.request_id, lab.label, out, float(lab.ts)):
            return out  # a canary's answer: judged there
        # the join's clock is prediction time: bring it up to the predictions still in unfinished batches
        for m in self.models.values():
            if m.block and m.config.join_labels and type(m.block[-1].ts) in _TS_TYPES:
                self.join.tick(float(m.block[-1].ts))
        outcomes = self.join.match(lab.request_id, lab.label, float(lab.ts), lab.entities)
        if not outcomes and lab.request_id and self.join.is_waiting_label(lab.request_id):
            # its prediction may sit in a model's unfinished batch: join it now, not a batch later
            for m in self.models.values():
                o = m.waiting_outcome(lab.request_id, lab.label, float(lab.ts)) if m.config.join_labels else None
                if o is not None:
                    self.join.join_ahead(lab.request_id)
                    outcomes = [o]
                    break
        for o in outcomes:
            m = self.models.get(o.model)
            if m is not None:
                m.observe_outcome(o, out)
        return out

    def observe_deadletter_rate(self, rate: float, model: str | None = None, ts: float | None = None,
                                window: int = 0) -> list[DriftAlert]:
        """The stream engine's dead-letter rate (share of events rejected over `window` events);
        a data-quality alert for `model` (or every model) when it is over `deadletter_rate`."""
        out: list[DriftAlert] = []
        if not isinstance(rate, (int, float)) or not math.isfinite(rate):
            self._reject("bad dead-letter rate")
            return out
        targets = [self.models[model]] if model in self.models else list(self.models.values()) if model is None else []
        if not targets:
            self._unmonitored(model)
        for m in targets:
            m.deadletter(float(rate), ts, int(window), out)
        return out

    def flush(self) -> list[DriftAlert]:
        """Judge partly filled blocks now (on idle, or before a snapshot)."""
        out: list[DriftAlert] = []
        for m in self.models.values():
            m.flush(self.join, out)
        return out

    def _decode(self, raw: Any, contract: type) -> Any:
        try:
            return contract.decode(raw)
        except ContractError as exc:
            self._reject(str(exc).split(":")[0][:80])
        except (TypeError, ValueError, AttributeError) as exc:  # not a message at all
            self._reject(f"not a {contract.SCHEMA} record: {type(exc).__name__}")
        return None

    def _reject(self, reason: str) -> None:
        # reasons quote the offending value: cap how many distinct ones a flood of junk can add
        if reason not in self.rejected and len(self.rejected) >= 100:
            reason = "<other>"
        self.rejected[reason] += 1

    def _unmonitored(self, model: Any) -> None:
        name = model if isinstance(model, str) and len(self.unmonitored) < 1000 else "<other>"
        self.unmonitored[name] += 1

    # -- reporting -------------------------------------------------------------------------

    def counters(self) -> dict[str, Any]:
        """Counts for logs and metrics: records rejected, per-model observations, alerts, join."""
        models = {}
        for name, m in self.models.items():
            models[name] = {
                "version": m.version, "predictions": m.n + len(m.block), "outcomes": m.n_outcomes,
                "warming_up": m.warming_up(), "warming_until": m.warming_until(),
                "reference": m.reference_source,
                "invalid_values": dict(m.invalid), **dict(m.counts),
                "within_tolerance": m.numeric.tolerated if m.numeric is not None else 0,
            }
        return {"rejected": dict(self.rejected), "unmonitored": dict(self.unmonitored),
                "labels": self.join.counters(), "models": models}

    def statistics(self) -> dict[str, dict[str, float]]:
        """Current detector statistics per model, for gauges: recent mean shift (reference
        standard deviations) per numeric stream, reference and recent error rates, estimate."""
        out: dict[str, dict[str, float]] = {}
        for name, m in self.models.items():
            stats: dict[str, float] = {}
            watch = m.numeric
            if watch is not None and watch.ready.any():
                shift = watch.recent_shift()
                for subject, ready, value in zip(watch.names, watch.ready.tolist(), shift.tolist()):
                    if ready:
                        stats[f"shift:{subject}"] = finite_or_zero(value)
            if m.outcomes.n:
                stats["error_rate:reference"] = m.outcomes.reference_rate
                stats["error_rate:recent"] = sum(m.outcomes.recent) / len(m.outcomes.recent)
            if m.misses is not None and m.misses.n:
                stats["miss_rate:reference"] = m.misses.reference_rate
                stats["miss_rate:recent"] = sum(m.misses.recent) / len(m.misses.recent)
            if m.estimate is not None and math.isfinite(m.estimate.result()):
                stats["estimated_error_rate"] = m.estimate.result()
            out[name] = stats
        return out

    # -- restart ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """A JSON-compatible snapshot (no pickle): references, detector summaries, cooldown
        clocks, counters and the label join's waiting predictions."""
        return {
            "format": STATE_FORMAT, "seed": self.config.seed,
            "models": {name: m.state_dict() for name, m in self.models.items()},
            "join": self.join.state_dict(), "online": self.online.state_dict(),
            "rejected": dict(self.rejected), "unmonitored": dict(self.unmonitored),
        }

    def load_state(self, state: Mapping[str, Any]) -> dict[str, list[str]]:
        """Restore a snapshot. Detectors are re-warmed quietly from their summaries, so an
        unchanged stream raises nothing new; a model or feature set the snapshot does not
        cover starts a fresh warm-up. Returns, per model, the parts warming up afresh."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a monitor snapshot: expected format {STATE_FORMAT!r}")
        fresh = {}
        saved = state.get("models", {})
        for name, m in self.models.items():
            if name in saved:
                parts = m.load_state(saved[name])
            else:
                parts = ["numeric", "categories", "outcomes", "estimate"]
            if parts:
                fresh[name] = parts
        self.join.load_state(state.get("join", {}))
        self.online.load_state(state.get("online", {}))
        self.rejected = Counter(state.get("rejected", {}))
        self.unmonitored = Counter(state.get("unmonitored", {}))
        return fresh
