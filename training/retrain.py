"""One retraining, step by step: labels, training set, fit, evaluation against the champion, registration, promotion.

Owns `RetrainConfig` (how a model is retrained) and `Retrainer` (`run` returns what happened as an outcome dict;
`rebuild` refits a version from its snapshot).

A training first pins the offline part files it will read (`freshet.training.snapshot`), reads
only those, and logs the snapshot with the version, so the version can be rebuilt exactly.
Features come from `freshet.stream.backfill.training_set` over the feature service (the same
aggregation code as the stream, point-in-time correct). The newest `holdout_fraction` of the
examples by event time is the holdout; the candidate and the current champion are scored on
that same holdout (or, with `folds` after a request, on every row, the candidate out-of-fold
over contiguous time blocks, and the version fitted on all rows), and the candidate is registered either way and promoted only if it beats
the champion by `margin` on `metric`. The decision and its reason are tags of the MLflow run
and of the model version, and in the returned outcome.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from freshet.contracts import new_id
from freshet.features import FeatureRegistry
from freshet.offline_store import OfflineStore
from freshet.settings import DEFAULT_FEATURE_SERVICE, DEFAULT_MODEL_NAME, Settings
from freshet.training.dataset import (
    FeaturePlan, RetrainError, TrainingSet, TrainingWindow, iso_or_blank, join_labels_to_events, point_in_time_features,
)
from freshet.training.evaluation import (
    FALLBACK_METRIC, METRICS, Champion, Decision, HoldoutScores, decide_promotion, out_of_fold, rounded,
    score_on_holdout, score_out_of_fold,
)
from freshet.training.labels import LabelLog
from freshet.training.ledger import TrainingLedger, unhandled
from freshet.training.outcomes import OutcomeLog
from freshet.training.pipeline import fit_pipeline
from freshet.training.served import PredictionArchive, attach_served_requests
from freshet.training.snapshot import Snapshot

log = logging.getLogger("freshet.retrain")

BOOTSTRAP_REASON = "bootstrap"
DEFAULT_WINDOW_LABELS = 20_000
STEPS = 6
MAX_RESTARTS = 1  # times a newer alert may start a training's wait for labels again (each costs up to wait_max_s)


@dataclass
class RetrainConfig:
    """How one model is retrained; defaults suit the example fraud model.

    >>> cfg = RetrainConfig(window={"last_hours": 2}, request_fields=["amount"])
    >>> cfg.window.describe(), cfg.request_fields
    ('last 2 h', ('amount',))
    """

    model: str = DEFAULT_MODEL_NAME
    feature_service: str = DEFAULT_FEATURE_SERVICE
    # inputs the client sends with /predict, read from the labelled event in the raw log
    request_fields: tuple[str, ...] = ("amount",)
    request_id_field: str = "transaction_id"  # the event field a label's request_id names
    # the newest labels only: a retrain after drift should learn the new regime, and the
    # training set's cost grows with the labels it covers (~2k labels/s on the example data)
    window: TrainingWindow = field(default_factory=lambda: TrainingWindow(last_n=DEFAULT_WINDOW_LABELS))
    holdout_fraction: float = 0.2
    min_rows: int = 200           # training examples needed at least
    min_class_rows: int = 10      # of each class, in the training part
    metric: str = "auc"
    margin: float = 0.005
    # a gain must also be above zero at this confidence (paired bootstrap on the holdout; 0 rounds: off)
    confidence: float = 0.95
    bootstrap_rounds: int = 200
    C: float = 1.0
    max_iter: int = 1000
    seed: int = 0
    label_sync_timeout_s: float = 60.0
    # before training for alerts, wait for this many labels to arrive after the request (outcomes
    # of post-drift traffic, so the holdout and the fit see the new regime), and for this many of
    # them positive (the rare class is what a new fraud pattern is learnt from), at most wait_max_s
    wait_labels: int = 0
    wait_positives: int = 0
    wait_max_s: float = 120.0
    # a training for alerts learns from, and is judged on, only the labelled events newer than
    # every one known when the request came: the alert says the old regime is over, and its rows
    # would teach the candidate the old mechanism and let the holdout judge it there
    since_request: bool = False
    # and is judged out-of-fold over this many contiguous time blocks of those rows (0: the newest
    # holdout_fraction judges): a post-alert window holds a few dozen frauds, its newest fifth a
    # handful, too few to tell a better candidate from a worse one; the version is fitted on all rows
    folds: int = 0

    def __post_init__(self) -> None:
        self.request_fields = tuple(self.request_fields)
        self.window = TrainingWindow.of(self.window)
        if self.metric not in METRICS:
            raise ValueError(f"metric {self.metric!r} is not one of {', '.join(METRICS)}")
        if not 0 < self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.wait_labels < 0 or self.wait_positives < 0:
            raise ValueError(f"wait_labels and wait_positives must be >= 0, got {self.wait_labels}, "
                             f"{self.wait_positives}")
        if self.since_request and not (self.wait_labels or self.wait_positives):
            raise ValueError("since_request trains on the labels a wait collected: set wait_labels or wait_positives")
        if self.folds and (self.folds < 2 or not self.since_request):
            raise ValueError(f"folds (--folds) judges the rows after a request out-of-fold: it needs since_request "
                             f"(--since-request) and at least 2 folds, got folds={self.folds}, "
                             f"since_request={self.since_request}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        if not self.C > 0:
            raise ValueError(f"C must be > 0, got {self.C}")

    def snapshot(self) -> dict[str, Any]:
        """What rebuilds this configuration's training set and fit (a training snapshot's `config`)."""
        return {"model": self.model, "feature_service": self.feature_service,
                "request_fields": list(self.request_fields), "request_id_field": self.request_id_field,
                "window": dataclasses.asdict(self.window), "holdout_fraction": self.holdout_fraction,
                "min_rows": self.min_rows, "min_class_rows": self.min_class_rows, "C": self.C,
                "max_iter": self.max_iter, "seed": self.seed, "folds": self.folds}

    @classmethod
    def from_snapshot(cls, config: dict[str, Any]) -> "RetrainConfig":
        """The configuration a snapshot's `config` records (promotion settings at their defaults).

        >>> cfg = RetrainConfig(window={"last_n": 50}, seed=3, C=0.5)
        >>> RetrainConfig.from_snapshot(cfg.snapshot()).snapshot() == cfg.snapshot()
        True
        """
        known = {f.name for f in dataclasses.fields(cls)} - {"folds"}
        kwargs = {k: v for k, v in config.items() if k in known}
        kwargs["window"] = TrainingWindow(**config.get("window", {}))
        cfg = cls(**kwargs)
        # a rebuild takes its cut-off from the snapshot's `since`, not from a wait: folds apply to it as they
        # did to the training (they decide which rows the version was fitted on)
        cfg.folds = int(config.get("folds") or 0)
        return cfg

    def params(self) -> dict[str, Any]:
        """The fit and promotion parameters a registered version records."""
        return {"C": self.C, "max_iter": self.max_iter, "imputer": "mean", "scaler": "standard",
                "holdout_fraction": self.holdout_fraction, "metric": self.metric, "margin": self.margin,
                "confidence": self.confidence, "bootstrap_rounds": self.bootstrap_rounds,
                "wait_labels": self.wait_labels, "wait_positives": self.wait_positives,
                "since_request": self.since_request, "folds": self.folds}


@dataclass
class Retraining:
    """One retraining under way: what it answers, the champion it may replace, its outcome so far."""

    reason: list[str]
    request_ids: list[str]
    bootstrap: bool
    outcome: dict[str, Any]
    started: float  # time.monotonic()
    lap_started: float
    since: float | None = None  # train only on labelled events after this event time (since_request)

    @classmethod
    def start(cls, config: RetrainConfig, reason: list[str], request_ids: list[str], bootstrap: bool) -> "Retraining":
        started = time.monotonic()
        outcome: dict[str, Any] = {
            "model": config.model, "status": "", "promoted": False, "version": None, "champion_before": None,
            "decision": "", "reason": reason, "request_ids": request_ids, "seed": config.seed,
            "started_at": time.time(), "seconds": {},
        }
        return cls(reason, request_ids, bootstrap, outcome, started, started)

    @property
    def champion(self) -> str | None:
        return self.outcome["champion_before"]

    def lap(self, step: str) -> None:
        """Time the step that just ended, into the outcome's seconds."""
        now = time.monotonic()
        self.outcome["seconds"][step] = round(now - self.lap_started, 3)
        self.lap_started = now

    def total(self) -> None:
        self.outcome["seconds"]["total"] = round(time.monotonic() - self.started, 3)


@dataclass
class LabelWait:
    """Labels that arrived for events after `since` (the newest labelled event time known when the wait began)."""

    since: float | None
    labels: int = 0
    positives: int = 0
    alerts: list[str] = field(default_factory=list)  # of requests that restarted the wait
    restarts: int = 0

    def count(self, rows: Sequence[dict[str, Any]]) -> None:
        """Count copied label-log rows (`event_ts`, `label`); a row without an event time counts as new.

        >>> w = LabelWait(since=100.0)
        >>> w.count([{"event_ts": 99.0, "label": 1.0}, {"event_ts": 101.0, "label": 1.0},
        ...          {"event_ts": 102.0, "label": 0.0}, {"event_ts": None, "label": 0.0}])
        >>> w.labels, w.positives
        (3, 1)
        """
        for r in rows:
            t = r.get("event_ts")
            if self.since is not None and t is not None and t <= self.since:
                continue
            self.labels += 1
            self.positives += bool(r.get("label") is not None and r["label"] > 0.5)


class _Ended(Exception):
    """The retraining ends before registering a version: `status` skipped or insufficient_data, and why."""

    def __init__(self, status: str, why: str):
        super().__init__(why)
        self.status = status
        self.why = why


class Retrainer:
    """Trains, evaluates, registers and (maybe) promotes one model; `run` returns the outcome as a dict."""

    def __init__(self, settings: Settings, registry: FeatureRegistry | None = None,
                 config: RetrainConfig | None = None, models: Any = None, progress: bool = False):
        self.settings = settings
        self.config = config or RetrainConfig()
        self._registry = registry
        self._models = models
        self.progress = progress
        self.labels = LabelLog(settings)
        self.archive = PredictionArchive(settings)
        self.outcomes = OutcomeLog(settings.data_path / "retrain" / "outcomes.jsonl")

    def wait_for_labels(self, n: int, max_s: float, positives: int = 0,
                        newer: Callable[[], Sequence[str]] | None = None) -> "LabelWait":
        """Copy labels until `n` arrived for events newer than every labelled event known now,
        `positives` of them positive, or `max_s` passed; returns what came and that cut-off.

        `newer()` returns the alert ids of requests that came meanwhile: each such request starts
        the wait again from its own time (at most MAX_RESTARTS times), so a drift reported while a
        training waits is not learnt from a mix of the regimes before and after it.
        Counted by copying them, not from end offsets: the embedded broker reports a topic's
        end as its last batch's base offset + 1."""
        restarts, wait = 0, self._start_wait(n, positives, max_s)
        deadline = time.monotonic() + max_s
        while True:
            fresh = list(newer()) if newer is not None and restarts < MAX_RESTARTS else []
            if fresh:
                restarts += 1
                log.info("retrain %s: %d newer alert(s) came while waiting (%s); waiting again from now",
                         self.config.model, len(fresh), ", ".join(fresh[:5]))
                wait = self._start_wait(n, positives, max_s, wait.alerts + fresh, restarts)
                deadline = time.monotonic() + max_s
            self.labels.sync(self.config.label_sync_timeout_s)
            wait.count(self.labels.copied)
            if (wait.labels >= n and wait.positives >= positives) or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        log.info("retrain %s: %d new labels (%d positive) arrived", self.config.model, wait.labels, wait.positives)
        return wait

    def _start_wait(self, n: int, positives: int, max_s: float, alerts: Sequence[str] = (),
                    restarts: int = 0) -> "LabelWait":
        self.labels.sync(self.config.label_sync_timeout_s)  # what is there already does not count
        log.info("retrain %s: waiting for %d new labels (%d positive) on %s (at most %.0fs)", self.config.model,
                 n, positives, self.labels.topic, max_s)
        return LabelWait(since=_newest_event_time(self.labels.read()), alerts=list(alerts), restarts=restarts)

    def warm_up(self) -> None:
        """Open the feature registry and MLflow and import scikit-learn now, not on the first request."""
        import sklearn.linear_model  # noqa: F401

        self.registry  # noqa: B018 - loads it
        self.models.current_version(self.config.model)

    @property
    def registry(self) -> FeatureRegistry:
        if self._registry is None:
            from freshet import features

            self._registry = features.load_registry(self.settings)
        return self._registry

    @property
    def models(self):
        if self._models is None:
            from freshet.models import ModelRegistry

            self._models = ModelRegistry(self.settings)
        return self._models

    @property
    def ledger(self) -> TrainingLedger:
        return TrainingLedger(self.models.client, self.config.model)

    def run(self, reason: Sequence[str] = (), request_ids: Sequence[str] = (), *, bootstrap: bool = False,
            force: bool = False, sync_labels: bool = True,
            newer: Callable[[], Sequence[str]] | None = None) -> dict[str, Any]:
        """One retraining for `reason` (alert ids), step by step; each numbered step is timed and logged.

        It ends early, as "skipped", when every alert in `reason` was trained for already (unless
        `force`) and, as "insufficient_data", when there is too little to learn from. `newer`:
        see `wait_for_labels`; the alerts it returns join `reason`.
        """
        job = self._begin(reason, request_ids, bootstrap)
        try:
            self._prepare(job, force, newer)
            plan = FeaturePlan.of(self.registry, self.config.feature_service)
            snapshot = self._copy_and_pin(job, plan, sync_labels)
            champion = Champion.load(self.models, self.config.model, job.champion)
            training = self._training_set(job, plan, snapshot, champion)
            pipeline = self._fit(job, training)
            scores = self._evaluate(job, training, pipeline, plan, champion)
            decision = self._decide(job, scores)
            version = self._register(job, training, pipeline, scores, plan, snapshot)
            promoted, decision = self._promote(job, version, decision)
        except _Ended as end:
            return self.outcomes.finish(job.outcome, end.status, end.why)
        return self.outcomes.finish(job.outcome, "promoted" if promoted else "not_promoted", decision.reason)

    def rebuild(self, snapshot: Snapshot) -> tuple[TrainingSet, Any]:
        """The training set `snapshot` pins and the pipeline fitted on it; nothing is registered.

        Raises SnapshotChanged when a part file it names is gone or changed, or the feature
        definitions differ; RetrainError when the data no longer makes a training set."""
        plan = FeaturePlan.of(self.registry, self.config.feature_service)
        snapshot.check(self.settings, plan)
        job = Retraining.start(self.config, ["reproduce"], [new_id()], False)
        job.since = snapshot.config.get("since")
        try:
            training = self._training_set(job, plan, snapshot, Champion(None))
            return training, self._fit(job, training)
        except _Ended as end:
            raise RetrainError(f"the snapshot does not make a training set: {end.why}") from None

    def _step(self, n: int, text: str, *args: Any) -> None:
        log.info(f"retrain %s [%d/%d] {text}", self.config.model, n, STEPS, *args)

    def _begin(self, reason: Sequence[str], request_ids: Sequence[str], bootstrap: bool) -> Retraining:
        reason = [str(r) for r in dict.fromkeys(reason)] or ([BOOTSTRAP_REASON] if bootstrap else [])
        job = Retraining.start(self.config, reason, list(request_ids) or [new_id()], bootstrap)
        job.outcome["champion_before"] = self._champion()
        return job

    def _champion(self) -> str | None:
        """The champion's version; None only when the registry answers that there is none.

        current_version answers None for any registry error too, and "no champion" promotes
        without a comparison: the model list, which raises on an error, confirms it."""
        version = self.models.current_version(self.config.model)
        if version is not None:
            return version
        from freshet.models import CHAMPION

        listed = next((m for m in self.models.models() if m["name"] == self.config.model), None)
        return listed["aliases"].get(CHAMPION) if listed else None

    def _prepare(self, job: Retraining, force: bool, newer: Callable[[], Sequence[str]] | None = None) -> None:
        """Skip what was done already; wait for post-drift labels when configured."""
        if not force:
            self._skip_if_done(job)
        cfg = self.config
        if (cfg.wait_labels or cfg.wait_positives) and not job.bootstrap and self.settings.kafka_bootstrap_servers:
            wait = self.wait_for_labels(cfg.wait_labels, cfg.wait_max_s, cfg.wait_positives, newer)
            job.reason.extend(a for a in wait.alerts if a not in job.reason)
            job.outcome["waited_for_labels"] = wait.labels
            job.outcome["waited_for_positives"] = wait.positives
            job.outcome["wait_restarts"] = wait.restarts
            if cfg.since_request and wait.since is not None:
                job.since = wait.since
        job.lap("prepare")

    def _skip_if_done(self, job: Retraining) -> None:
        if job.bootstrap and job.champion is not None:
            raise _Ended("skipped", f"model {self.config.model!r} already has a champion "
                                    f"(version {job.champion}); --bootstrap trains only the first")
        if not job.reason:
            return
        done = self.ledger.handled(job.reason)
        if not unhandled(job.reason, done):
            job.outcome["handled_by"] = done
            raise _Ended("skipped", "every alert in the reason was handled already "
                                    f"(by version(s) {', '.join(sorted(set(done.values())))})")

    def _copy_and_pin(self, job: Retraining, plan: FeaturePlan, sync: bool) -> Snapshot:
        """1. Copy what is new on the labels and predictions topics into their logs, then pin the part
        files of the raw log, the label log and the prediction archive: the training reads only those."""
        copied = 0
        if sync and self.settings.kafka_bootstrap_servers:
            copied = self.labels.try_sync(self.config.label_sync_timeout_s)
            self.archive.try_sync(self.config.label_sync_timeout_s)
        # the post-alert cut-off (since_request) is part of what rebuilds the training set
        config = {**self.config.snapshot(), **({"since": job.since} if job.since is not None else {})}
        snapshot = Snapshot.take(self.settings, plan, config, self.labels, self.archive)
        job.outcome["labels"] = {"topic": self.labels.topic, "copied": copied, "total": snapshot.labels.rows,
                                 "rejected": self.labels.rejected}
        job.outcome["snapshot"] = snapshot.digest
        job.lap("labels")
        self._step(1, "labels: %d new from %s, %d rows in the label log %s; snapshot %s", copied,
                   self.labels.topic, snapshot.labels.rows, self.labels.root, snapshot.digest[:19])
        return snapshot

    def _training_set(self, job: Retraining, plan: FeaturePlan, snapshot: Snapshot, champion: Champion) -> TrainingSet:
        """The labels, events and served requests the snapshot pins, as a split training set."""
        from freshet.stream.backfill import load_events

        store = OfflineStore.of(self.settings)
        labels = self.labels.read(files=snapshot.labels.files(store))
        job.outcome.setdefault("labels", {})["total"] = len(labels)
        events = load_events(self.settings, plan.topic, files=snapshot.events.files(store))
        predictions = self.archive.read(files=snapshot.predictions.files(store))
        examples = self._select_examples(job, labels, events, predictions, plan)
        return self._build_training_set(job, plan, examples, events, champion)

    def _select_examples(self, job: Retraining, labels: pd.DataFrame, events: pd.DataFrame,
                         predictions: pd.DataFrame, plan: FeaturePlan) -> pd.DataFrame:
        """Join the labels to their events and served requests; the examples inside the training window."""
        cfg = self.config
        examples, joined = join_labels_to_events(labels, events, plan.join_keys, cfg.request_fields,
                                                 cfg.request_id_field, plan.timestamp_field)
        job.outcome["history_start"] = _first_event_time(events, plan.timestamp_field)
        if job.since is not None:  # only what happened after the request (RetrainConfig.since_request)
            examples = examples[examples["event_ts"].to_numpy(dtype=float) > job.since].reset_index(drop=True)
        in_window, w_start, w_end = cfg.window.select(examples["event_ts"].to_numpy())
        examples = attach_served_requests(self.settings, examples[in_window].reset_index(drop=True), predictions,
                                          job.outcome)
        job.outcome["window"] = {"spec": cfg.window.describe(), "start": iso_or_blank(w_start),
                                 "end": iso_or_blank(w_end), "since_request": iso_or_blank(job.since)}
        job.outcome["examples"] = {"labels": len(labels), **joined, "in_window": len(examples)}
        if joined["from_labels"] and joined["from_labels"] >= joined["from_events"]:
            log.warning("retrain %s: %d of %d labels have no event in the offline raw log of %s; their "
                        "request-time fields are missing (is 'freshet stream' running?)",
                        cfg.model, joined["from_labels"], len(labels), plan.topic)
        if len(examples) == 0:
            raise _Ended("insufficient_data",
                         f"no labelled events in the window ({cfg.window.describe()}): {len(labels)} labels "
                         f"in {self.labels.root}, {joined['dropped']} without their event; publish labels to "
                         f"{self.labels.topic} and run 'freshet stream' so events reach the offline log")
        return examples

    def _build_training_set(self, job: Retraining, plan: FeaturePlan, examples: pd.DataFrame,
                            events: pd.DataFrame, champion: Champion) -> TrainingSet:
        """2. Point-in-time features of every example, split in event time."""
        cfg = self.config
        refs = plan.refs + champion.extra_inputs(plan)
        data = point_in_time_features(self.settings, plan, examples, events, refs, self.progress,
                                      self.settings.training_features)
        job.lap("training_set")
        self._step(2, "training set: %d examples x %d features (%s; %d labels without their event), "
                      "events from %s", len(data), len(plan.refs) + len(cfg.request_fields), cfg.window.describe(),
                   job.outcome["examples"]["dropped"], plan.topic)
        # folds judge only the rows after a request (since_request): a window of the old regime has a holdout big enough
        folds = cfg.folds if job.since is not None else 0
        training = TrainingSet.split(data, plan.refs + list(cfg.request_fields), cfg.holdout_fraction, folds,
                                     cfg.min_class_rows)
        skipped = training.folds_skipped or (cfg.folds and not folds and "no request cut-off (a bootstrap, or no "
                                             "label wait): the newest share of the window judges") or ""
        training.folds_skipped = skipped
        job.outcome["judging"] = ({"folds": training.n_folds} if training.n_folds else
                                  {"holdout_fraction": cfg.holdout_fraction,
                                   **({"folds_skipped": skipped} if skipped else {})})
        if skipped:
            log.warning("retrain %s: not judged over %d folds: %s; judged on the newest %g of the rows instead",
                        cfg.model, cfg.folds, skipped, cfg.holdout_fraction)
        return training

    def _fit(self, job: Retraining, training: TrainingSet):
        """3. Fit the pipeline on the older part, given enough examples of each class."""
        cfg = self.config
        rows = training.rows()
        job.outcome["rows"] = rows
        job.outcome["window"]["holdout_start"] = training.holdout_start()
        n_train, n_pos = rows["train"], rows["train_positives"]
        n_neg = n_train - n_pos
        if n_train < cfg.min_rows or min(n_pos, n_neg) < cfg.min_class_rows:
            raise _Ended("insufficient_data",
                         f"{n_train} training examples ({n_pos} positive, {n_neg} negative); need "
                         f">= {cfg.min_rows} and >= {cfg.min_class_rows} of each class: wait for more "
                         f"labels or widen the window")
        pipeline = fit_pipeline(training.X[training.train], training.y[training.train], cfg.seed, cfg.C, cfg.max_iter,
                                training.inputs)
        job.lap("fit")
        self._step(3, "fit: LogisticRegression(C=%g) on %d examples (%d positive), seed %d%s",
                   cfg.C, n_train, n_pos, cfg.seed, " (all of them: judged out-of-fold)" if training.n_folds else "")
        return pipeline

    def _evaluate(self, job: Retraining, training: TrainingSet, pipeline: Any, plan: FeaturePlan,
                  champion: Champion) -> HoldoutScores:
        """4. Score the candidate, as serving will, and the champion on the same rows: the holdout, or
        every row out-of-fold (each block scored by the candidate's pipeline fitted on the other blocks)."""
        if training.n_folds:
            scores = score_out_of_fold(out_of_fold(training, self._fold_fit(training)), champion, training, plan)
        else:
            scores = score_on_holdout(_exported(pipeline, training.inputs), champion, training, plan)
        job.outcome["metrics"] = rounded(scores.candidate)
        job.outcome["champion_metrics"] = rounded(scores.champion) if scores.champion else None
        job.lap("evaluate")
        cand = scores.candidate
        self._step(4, "evaluate on %d %s from %s: candidate auc %.4f log_loss %.4f error %.4f%s",
                   len(scores.y), self._judged_on(training), job.outcome["window"]["holdout_start"], cand["auc"],
                   cand["log_loss"], cand["error_rate"], scores.describe_champion(job.champion))
        return scores

    def _fold_fit(self, training: TrainingSet) -> Callable[[np.ndarray], Any]:
        """Fits the candidate's pipeline on some rows, exported as serving scores it."""
        cfg = self.config

        def fit(rows: np.ndarray):
            return _exported(fit_pipeline(training.X[rows], training.y[rows], cfg.seed, cfg.C, cfg.max_iter,
                                          training.inputs), training.inputs)
        return fit

    @staticmethod
    def _judged_on(training: TrainingSet) -> str:
        if training.n_folds:
            return f"examples out-of-fold ({training.n_folds} time blocks)"
        return "holdout examples" + (f" (folds skipped: {training.folds_skipped})" if training.folds_skipped else "")

    def _decide(self, job: Retraining, scores: HoldoutScores) -> Decision:
        cfg = self.config
        if job.bootstrap or job.champion is None:
            return Decision(True, "bootstrap: the first version is promoted so there is a model to serve"
                            if job.bootstrap else "no champion to compare with")
        if scores.champion is None:  # never replace a champion without a comparison
            return Decision(False, f"{scores.champion_note or f'champion version {job.champion} could not be loaded'}"
                                   "; not promoted without a comparison (promote it by hand if intended)")
        gains = None
        if cfg.bootstrap_rounds:
            gains = scores.gains([cfg.metric, FALLBACK_METRIC], cfg.bootstrap_rounds, cfg.seed)
        folds = job.outcome.get("judging", {}).get("folds")
        return decide_promotion(scores.candidate, scores.champion, cfg.metric, cfg.margin, gains, cfg.confidence,
                                f"the same rows (the candidate out-of-fold, {folds} folds)" if folds else
                                "the same holdout")

    def _register(self, job: Retraining, training: TrainingSet, pipeline: Any, scores: HoldoutScores,
                  plan: FeaturePlan, snapshot: Snapshot) -> str:
        """5. Register the candidate with its lineage and both models' metrics, whatever the decision."""
        cfg = self.config
        fingerprint = training.fingerprint()
        job.outcome["dataset_fingerprint"] = fingerprint
        metrics = {k: v for k, v in scores.candidate.items() if math.isfinite(v)}
        metrics.update({f"champion_{k}": v for k, v in (scores.champion or {}).items() if math.isfinite(v)})
        metrics["folds"] = float(training.n_folds)
        tags = {"freshet.snapshot_digest": snapshot.digest,
                "freshet.judged_on": f"out-of-fold, {training.n_folds} time blocks" if training.n_folds
                else f"newest {cfg.holdout_fraction:g} of the rows"}
        if training.folds_skipped:
            tags["freshet.folds_skipped"] = training.folds_skipped
        version = self.models.register_sklearn(cfg.model, pipeline, training.inputs,
                                               self._lineage(job, plan, fingerprint), metrics,
                                               reference=self._reference(job, training, pipeline, plan, scores),
                                               input_example=training.X[training.judged][:5],
                                               tags=tags,
                                               training_data=self._training_data(training, snapshot, fingerprint))
        job.outcome["version"] = version
        job.lap("register")
        self._step(5, "registered %s version %s (dataset %s)", cfg.model, version, fingerprint[:19])
        return version

    def _training_data(self, training: TrainingSet, snapshot: Snapshot, fingerprint: str):
        """The training set as an MLflow dataset input: the inputs and label, named by the data's digest."""
        from freshet.models import TrainingData

        frame = pd.DataFrame(training.X, columns=training.inputs)
        frame["label"] = training.y
        digest = fingerprint.partition(":")[2][:32]  # MLflow keeps at most 36 characters
        return TrainingData(frame, digest, snapshot.document(), _store_uri(self.settings))

    def _reference(self, job: Retraining, training: TrainingSet, pipeline: Any, plan: FeaturePlan,
                   judged: HoldoutScores) -> dict[str, Any]:
        """The inputs and scores of the newest examples (the holdout: the traffic the version will
        meet first), with each windowed input's window and whether the history behind it filled it."""
        from freshet.reference import OutcomeReference, TrainingReference

        rows = training.holdout if training.holdout.sum() >= 1000 else np.ones(len(training.y), dtype=bool)
        X = training.X[rows]
        model = _exported(pipeline, training.inputs)
        scores = model.predict_proba(X.tolist())
        # outcomes only of rows the scoring model was not fitted on (the monitor's reference miss rate):
        # the holdout, or every row out-of-fold
        outcomes = OutcomeReference.of(judged.y, judged.p_candidate, model.threshold) if len(judged.y) else None
        windows = {f"{v.name}:{a.name}": a.window_s for v in plan.views for a in v.aggregations}
        reference = TrainingReference.build(X, training.inputs, scores, windows=windows,
                                            history_start=job.outcome.get("history_start"),
                                            row_times=training.data["_t"].to_numpy(dtype=float)[rows],
                                            bounds_from=training.X, outcomes=outcomes)
        job.outcome["reference"] = {"rows": reference.rows, "warming": sorted(reference.warming()),
                                    "outcomes": outcomes.to_dict() if outcomes else None}
        return reference.to_dict()

    def _lineage(self, job: Retraining, plan: FeaturePlan, fingerprint: str) -> dict[str, Any]:
        cfg, window = self.config, job.outcome["window"]
        return {
            "project": plan.registry.project,
            "feature_service": cfg.feature_service,
            "feature_refs": plan.refs,
            "request_fields": list(cfg.request_fields),
            "training_window": {"start": window["start"], "end": window["end"]},
            "holdout_start": window["holdout_start"],
            "window_spec": cfg.window.describe(),
            "dataset_fingerprint": fingerprint,
            "rows": job.outcome["rows"],
            "seed": cfg.seed,
            "params": cfg.params(),
            "reason": job.reason,
            "request_ids": job.request_ids[:20],
            "labels": {"topic": self.labels.topic, "log": str(self.labels.root),
                       "count": job.outcome["labels"]["total"]},
            "events_topic": plan.topic,
            "champion_before": job.champion,
        }

    def _promote(self, job: Retraining, version: str, decision: Decision) -> tuple[bool, Decision]:
        """6. Promote the candidate if the decision says so and it passes the model gate; record the decision."""
        if decision.promote:
            rejected = self._gate(version)
            if rejected:
                decision = Decision(False, f"the model gate rejected version {version}: {rejected}")
        promoted = bool(decision.promote)
        if promoted:
            self.models.promote(self.config.model, version)
        self.ledger.record(version, job.reason, job.request_ids, decision, promoted, job.champion)
        job.lap("promote")
        job.outcome["promoted"] = promoted
        self._step(6, "%s version %s: %s", "promoted" if promoted else "did not promote", version, decision.reason)
        job.total()
        return promoted, decision

    def _gate(self, version: str) -> str:
        """Why the model gate rejects `version` ("" when it passes); the verdict is recorded on the version."""
        from freshet.gates import check_version

        reason = check_version(self.models, self.registry, self.config.model, version, self.config.feature_service)
        if reason:
            log.error("retrain %s: version %s failed the model gate and is not promoted: %s",
                      self.config.model, version, reason)
        return reason


def _exported(pipeline: Any, inputs: Sequence[str]):
    """The fitted pipeline as serving scores it (`freshet.models.LinearModel`)."""
    from freshet.models import LinearModel, export_sklearn

    return LinearModel.from_dict(export_sklearn(pipeline, inputs))


def _store_uri(settings: Settings) -> str:
    """The offline store as a URI (a training dataset's source): file:///... or s3://..."""
    root = OfflineStore.of(settings).root
    return Path(root.path).as_uri() if root.store.is_local else str(root)


def _newest_event_time(labels: pd.DataFrame) -> float | None:
    """The newest event time among the labels of the label log (None when it has none)."""
    if labels.empty or "event_ts" not in labels.columns:
        return None
    from freshet.times import epoch_seconds

    ts = epoch_seconds(labels["event_ts"])
    ts = ts[np.isfinite(ts)]
    return float(ts.max()) if len(ts) else None


def _first_event_time(events: pd.DataFrame, timestamp_field: str) -> float | None:
    """When the stream's history begins (event time of the oldest event in the raw log)."""
    if events.empty or timestamp_field not in events.columns:
        return None
    from freshet.times import epoch_seconds

    ts = epoch_seconds(events[timestamp_field])
    ts = ts[np.isfinite(ts)]
    return float(ts.min()) if len(ts) else None
