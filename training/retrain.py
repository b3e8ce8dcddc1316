"""The retraining worker: labels, a point-in-time training set, fit, evaluation against the champion, registration, promotion.

Owns `freshet retrain` (a worker on settings.topic_retrain, `--once`, `--bootstrap`), the label log and the promotion rule.

Labels. The labels topic is the source of truth. Before each training the worker copies
what is new on it into a Parquet label log, `<data_dir>/offline/labels/<topic>/` (part
files, then an offsets checkpoint; a crash in between replays into duplicates readers drop
by (partition, offset)), so a retrain never rereads the whole topic and the labels a model
saw can be inspected afterwards. A label is joined to its transaction in the offline raw log
by request id (= transaction id): the event gives the entity keys, the event time the
features are taken at, and request-time fields such as `amount`. Labels without their event
fall back to their own `entities` and `event_ts`; with neither they are counted and dropped.

Training. Features come from `stream.backfill.training_set` over the feature service (the
same aggregation code as the stream, point-in-time correct); the pipeline is SimpleImputer ->
StandardScaler -> LogisticRegression, what `serving.models.export_sklearn` stores as JSON.
The newest `holdout_fraction` of the examples by event time is the holdout; the candidate
and the current champion are scored on that same holdout, and the candidate is promoted only
if it beats the champion by `margin` on `metric`. Either way the decision and its reason
are tags of the MLflow run and of the model version, and in the returned outcome.

Idempotency. Every alert id a registered version was trained for is a tag of its run
(`freshet.alert.<id>`): a request whose alert ids were all handled trains nothing. Requests
queued together are merged into one training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from freshet.contracts import new_id
from freshet.features import FeatureRegistry
from freshet.settings import DEFAULT_FEATURE_SERVICE, DEFAULT_MODEL_NAME, Settings
from freshet.training.dataset import (
    TrainingWindow, dataset_fingerprint, iso_or_blank, join_labels_to_events, time_split,
)
from freshet.training.evaluation import (
    FALLBACK_METRIC, METRICS, Decision, bootstrap_gains, decide_promotion, evaluate, rounded,
)
from freshet.training.labels import LabelLog
from freshet.training.outcomes import OutcomeLog
from freshet.training.pipeline import fit_pipeline, input_column, input_matrix
from freshet.times import epoch_seconds

log = logging.getLogger("freshet.retrain")

BOOTSTRAP_REASON = "bootstrap"
DEFAULT_WINDOW_LABELS = 20_000
STEPS = 6

_TAG_SAFE = re.compile(r"^[A-Za-z0-9_.\- /]{1,200}$")


class RetrainError(RuntimeError):
    """Training cannot proceed; the message says what is missing and how to get it."""


# ---------------------------------------------------------------------------
# pure pieces: window, split, metrics, decision, idempotency
# ---------------------------------------------------------------------------

def alert_tag(alert_id: str) -> str:
    """The MLflow run tag marking that a run was trained for this alert id."""
    alert_id = str(alert_id)
    if not _TAG_SAFE.match(alert_id):
        alert_id = "h" + hashlib.sha1(alert_id.encode()).hexdigest()[:24]
    return f"freshet.alert.{alert_id}"


def unhandled(reason: Sequence[str], handled: Mapping[str, str]) -> list[str]:
    """The alert ids of `reason` no earlier training covered, in order, once each.

    >>> unhandled(["a", "b", "a", "c"], {"b": "2"})
    ['a', 'c']
    """
    return [r for r in dict.fromkeys(map(str, reason)) if r not in handled]


@dataclass
class RetrainConfig:
    """How one model is retrained; defaults suit the example fraud model."""

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
    # of post-drift traffic, so the holdout and the fit see the new regime), at most wait_max_s
    wait_labels: int = 0
    wait_max_s: float = 120.0

    def __post_init__(self) -> None:
        self.request_fields = tuple(self.request_fields)
        self.window = TrainingWindow.of(self.window)
        if self.metric not in METRICS:
            raise ValueError(f"metric {self.metric!r} is not one of {', '.join(METRICS)}")
        if not 0 < self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        if not self.C > 0:
            raise ValueError(f"C must be > 0, got {self.C}")


# ---------------------------------------------------------------------------
# the retrainer
# ---------------------------------------------------------------------------

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
        self.outcomes = OutcomeLog(settings.data_path / "retrain" / "outcomes.jsonl")

    def wait_for_labels(self, n: int, max_s: float, stop: threading.Event | None = None) -> int:
        """Copy labels until `n` arrived after now, or `max_s` passed; returns how many came.

        Counted by copying them, not from end offsets: the embedded broker reports a topic's
        end as its last batch's base offset + 1."""
        self.labels.sync(self.config.label_sync_timeout_s)  # what was already there does not count
        deadline = time.monotonic() + max_s
        log.info("retrain %s: waiting for %d new labels on %s (at most %.0fs)", self.config.model, n,
                 self.labels.topic, max_s)
        arrived = 0
        while not (stop and stop.is_set()):
            arrived += self.labels.sync(self.config.label_sync_timeout_s)
            if arrived >= n or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        log.info("retrain %s: %d new labels arrived", self.config.model, arrived)
        return arrived

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

    # -- idempotency ------------------------------------------------------------------

    def handled(self, alert_ids: Iterable[str]) -> dict[str, str]:
        """alert id -> the version already trained for it, for the ids an earlier training covered."""
        from freshet.models import EXPERIMENT

        client = self.models.client
        exp = client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            return {}
        model = self.config.model.replace("'", "\\'")
        out = {}
        for aid in dict.fromkeys(map(str, alert_ids)):
            runs = client.search_runs([exp.experiment_id], f"tags.`{alert_tag(aid)}` = '{model}'", max_results=1)
            if runs:
                out[aid] = runs[0].data.tags.get("freshet.version", "?")
        return out

    # -- the steps ----------------------------------------------------------------------

    def _step(self, n: int, text: str, *args: Any) -> None:
        log.info(f"retrain %s [%d/%d] {text}", self.config.model, n, STEPS, *args)

    def run(self, reason: Sequence[str] = (), request_ids: Sequence[str] = (), *, bootstrap: bool = False,
            force: bool = False, sync_labels: bool = True) -> dict[str, Any]:
        """One retraining for `reason` (alert ids); see the module docstring for what it does."""
        cfg = self.config
        t0 = time.monotonic()
        reason = [str(r) for r in dict.fromkeys(reason)] or ([BOOTSTRAP_REASON] if bootstrap else [])
        request_ids = list(request_ids) or [new_id()]
        outcome: dict[str, Any] = {
            "model": cfg.model, "status": "", "promoted": False, "version": None, "champion_before": None,
            "decision": "", "reason": reason, "request_ids": request_ids, "seed": cfg.seed,
            "started_at": time.time(), "seconds": {},
        }

        def timed(step: str, since: float) -> float:
            now = time.monotonic()
            outcome["seconds"][step] = round(now - since, 3)
            return now

        champion = self.models.current_version(cfg.model)
        outcome["champion_before"] = champion
        if not force:
            if bootstrap and champion is not None:
                return self.outcomes.finish(outcome, "skipped", f"model {cfg.model!r} already has a champion "
                                                        f"(version {champion}); --bootstrap trains only the first")
            done = self.handled(reason) if reason else {}
            if reason and not unhandled(reason, done):
                outcome["handled_by"] = done
                return self.outcomes.finish(outcome, "skipped", "every alert in the reason was handled already "
                                    f"(by version(s) {', '.join(sorted(set(done.values())))})")

        if cfg.wait_labels and not bootstrap and self.settings.kafka_bootstrap_servers:
            outcome["waited_for_labels"] = self.wait_for_labels(cfg.wait_labels, cfg.wait_max_s)

        # 1. labels
        t = timed("prepare", t0)
        if sync_labels and self.settings.kafka_bootstrap_servers:
            try:
                copied = self.labels.sync(cfg.label_sync_timeout_s)
            except Exception as exc:  # noqa: BLE001 - train on the labels already copied
                copied = 0
                log.warning("could not copy new labels from %s (%s); using the label log as it is",
                            self.labels.topic, exc)
        else:
            copied = 0
        labels = self.labels.read()
        t = timed("labels", t)
        self._step(1, "labels: %d new from %s, %d in the label log %s", copied, self.labels.topic, len(labels),
                   self.labels.root)
        outcome["labels"] = {"topic": self.labels.topic, "copied": copied, "total": len(labels),
                             "rejected": self.labels.rejected}

        # 2. examples and point-in-time features
        refs, views, topic = self._feature_plan()
        events = self._events(topic)
        examples, joined = join_labels_to_events(
            labels, events, self._join_keys(views), cfg.request_fields, cfg.request_id_field,
            views[0].timestamp_field)
        in_window, w_start, w_end = cfg.window.select(examples["event_ts"].to_numpy())
        examples = examples[in_window].reset_index(drop=True)
        outcome["window"] = {"spec": cfg.window.describe(), "start": iso_or_blank(w_start), "end": iso_or_blank(w_end)}
        unmatched = joined["dropped"]
        outcome["examples"] = {"labels": len(labels), **joined, "in_window": len(examples)}
        if joined["from_labels"] and joined["from_labels"] >= joined["from_events"]:
            log.warning("retrain %s: %d of %d labels have no event in the offline raw log of %s; their "
                        "request-time fields are missing (is 'freshet stream' running?)",
                        cfg.model, joined["from_labels"], len(labels), topic)
        if len(examples) == 0:
            return self.outcomes.finish(outcome, "insufficient_data",
                                f"no labelled events in the window ({cfg.window.describe()}): {len(labels)} labels "
                                f"in {self.labels.root}, {unmatched} without their event; publish labels to "
                                f"{self.labels.topic} and run 'freshet stream' so events reach the offline log")
        champion_model = self._champion_model(champion)
        extra = [r for r in (champion_model.feature_names if champion_model else []) if ":" in r
                 and r not in refs and self._known_ref(r)]
        horizon = max(v.max_window_s for v in views)
        if len(events):
            ev_ts = epoch_seconds(events[views[0].timestamp_field])
            events = events[(ev_ts >= examples["event_ts"].min() - horizon) & (ev_ts <= examples["event_ts"].max())]
        from freshet.stream.backfill import training_set

        frame = examples.assign(event_ts=pd.to_datetime(examples["event_ts"], unit="s", utc=True))
        data = training_set(self.settings, self.registry, frame, refs + extra, timestamp_field="event_ts",
                            events={topic: events}, progress=self.progress)
        data["_t"] = examples["event_ts"].to_numpy()
        data = data.sort_values(["_t", "request_id"], kind="stable").reset_index(drop=True)
        t = timed("training_set", t)
        self._step(2, "training set: %d examples x %d features (%s; %d labels without their event), "
                      "events from %s", len(data), len(refs) + len(cfg.request_fields), cfg.window.describe(),
                   unmatched, topic)

        # 3. split and fit
        features_in = refs + list(cfg.request_fields)
        y = (data["label"].to_numpy(dtype=float) > 0.5).astype(int)
        train, holdout = time_split(data["_t"].to_numpy(), cfg.holdout_fraction)
        n_pos, n_neg = int(y[train].sum()), int((1 - y[train]).sum())
        outcome["rows"] = {"train": int(train.sum()), "holdout": int(holdout.sum()),
                           "train_positives": n_pos, "holdout_positives": int(y[holdout].sum())}
        ts_all = data["_t"].to_numpy()
        outcome["window"]["holdout_start"] = iso_or_blank(float(ts_all[holdout].min())) if holdout.any() else ""
        if train.sum() < cfg.min_rows or min(n_pos, n_neg) < cfg.min_class_rows:
            return self.outcomes.finish(outcome, "insufficient_data",
                                f"{int(train.sum())} training examples ({n_pos} positive, {n_neg} negative); need "
                                f">= {cfg.min_rows} and >= {cfg.min_class_rows} of each class: wait for more "
                                f"labels or widen the window")
        X = input_matrix(data, features_in)
        pipeline = fit_pipeline(X[train], y[train], cfg.seed, cfg.C, cfg.max_iter)
        t = timed("fit", t)
        self._step(3, "fit: LogisticRegression(C=%g) on %d examples (%d positive), seed %d",
                   cfg.C, int(train.sum()), n_pos, cfg.seed)

        # 4. evaluate the candidate and the champion on the same holdout
        from freshet.models import LinearModel, export_sklearn

        exported = LinearModel.from_dict(export_sklearn(pipeline, features_in))  # what serving will score
        p_cand = exported.predict_proba(X[holdout].tolist())
        cand = evaluate(y[holdout], p_cand)
        champ = None
        champ_note = ""
        if champion_model is not None:
            missing = [r for r in champion_model.feature_names if ":" in r and not self._known_ref(r)]
            if missing:
                champ_note = (f"champion version {champion} reads feature(s) the registry no longer has "
                              f"({', '.join(missing[:5])}); it cannot be scored")
            else:
                p_champ = champion_model.predict_proba(input_matrix(data[holdout], champion_model.feature_names).tolist())
                champ = evaluate(y[holdout], p_champ)
        outcome["metrics"] = rounded(cand)
        outcome["champion_metrics"] = rounded(champ) if champ else None
        t = timed("evaluate", t)
        self._step(4, "evaluate on %d holdout examples from %s: candidate auc %.4f log_loss %.4f error %.4f%s",
                   int(holdout.sum()), outcome["window"]["holdout_start"], cand["auc"], cand["log_loss"],
                   cand["error_rate"], f"; champion v{champion} auc {champ['auc']:.4f} log_loss "
                   f"{champ['log_loss']:.4f} error {champ['error_rate']:.4f}" if champ else
                   (f"; {champ_note}" if champ_note else "; no champion yet"))

        # 5. register with lineage
        if bootstrap or champion is None:
            decision = Decision(True, "bootstrap: the first version is promoted so there is a model to serve"
                                if bootstrap else "no champion to compare with")
        elif champ is None:
            decision = Decision(True, champ_note or "the champion could not be scored")
        else:
            gains = (bootstrap_gains(y[holdout], p_cand, p_champ, [cfg.metric, FALLBACK_METRIC],
                                     cfg.bootstrap_rounds, cfg.seed) if cfg.bootstrap_rounds else None)
            decision = decide_promotion(cand, champ, cfg.metric, cfg.margin, gains, cfg.confidence)
        fingerprint = dataset_fingerprint(data, ["request_id", "label", "_t", *map(input_column, features_in)])
        outcome["dataset_fingerprint"] = fingerprint
        lineage = {
            "project": self.registry.project,
            "feature_service": cfg.feature_service,
            "feature_refs": refs,
            "request_fields": list(cfg.request_fields),
            "training_window": {"start": outcome["window"]["start"], "end": outcome["window"]["end"]},
            "holdout_start": outcome["window"]["holdout_start"],
            "window_spec": cfg.window.describe(),
            "dataset_fingerprint": fingerprint,
            "rows": outcome["rows"],
            "seed": cfg.seed,
            "params": {"C": cfg.C, "max_iter": cfg.max_iter, "imputer": "mean", "scaler": "standard",
                       "holdout_fraction": cfg.holdout_fraction, "metric": cfg.metric, "margin": cfg.margin,
                       "confidence": cfg.confidence, "bootstrap_rounds": cfg.bootstrap_rounds},
            "reason": reason,
            "request_ids": request_ids[:20],
            "labels": {"topic": self.labels.topic, "log": str(self.labels.root), "count": len(labels)},
            "events_topic": topic,
            "champion_before": champion,
        }
        metrics = {k: v for k, v in cand.items() if math.isfinite(v)}
        metrics.update({f"champion_{k}": v for k, v in (champ or {}).items() if math.isfinite(v)})
        version = self.models.register_sklearn(cfg.model, pipeline, features_in, lineage, metrics)
        outcome["version"] = version
        t = timed("register", t)
        self._step(5, "registered %s version %s (dataset %s)", cfg.model, version, fingerprint[:19])

        # 6. promote, or record why not
        promoted = False
        if decision.promote:
            self.models.promote(cfg.model, version)
            promoted = True
        self._record(version, reason, request_ids, decision, promoted, champion)
        timed("promote", t)
        outcome["promoted"] = promoted
        self._step(6, "%s version %s: %s", "promoted" if promoted else "did not promote", version, decision.reason)
        outcome["seconds"]["total"] = round(time.monotonic() - t0, 3)
        return self.outcomes.finish(outcome, "promoted" if promoted else "not_promoted", decision.reason)

    def _record(self, version: str, reason: list[str], request_ids: list[str], decision: Decision,
                promoted: bool, champion: str | None) -> None:
        """The decision as tags of the run and the version; alert tags last, so a crash before retrains."""
        from mlflow.entities import RunTag

        client = self.models.client
        mv = client.get_model_version(self.config.model, version)
        common = {"freshet.promoted": str(promoted).lower(), "freshet.promotion_decision": decision.reason[:4900],
                  "freshet.champion_before": champion or ""}
        for k, v in common.items():
            client.set_model_version_tag(self.config.model, version, k, v)
        tags = {**common, "freshet.version": version, "freshet.reason": json.dumps(reason)[:4900],
                "freshet.request_ids": json.dumps(request_ids[:20])[:4900]}
        tags.update({alert_tag(a): self.config.model for a in reason[:200]})
        client.log_batch(mv.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    # -- helpers --------------------------------------------------------------------------

    def _feature_plan(self):
        cfg = self.config
        services = self.registry.feature_services
        if cfg.feature_service not in services:
            raise RetrainError(f"unknown feature service {cfg.feature_service!r}; known: "
                               f"{', '.join(services) or 'none'} (run 'freshet apply')")
        refs = list(services[cfg.feature_service])
        views = [self.registry.views[v] for v in dict.fromkeys(r.split(":")[0] for r in refs)]
        topics = {v.topic for v in views}
        if len(topics) != 1:
            raise RetrainError(f"feature service {cfg.feature_service!r} reads several topics ({sorted(topics)}); "
                               "the retrainer joins labels to one event topic")
        return refs, views, topics.pop()

    def _join_keys(self, views) -> list[str]:
        return list(dict.fromkeys(k for v in views for k in v.join_keys))

    def _known_ref(self, ref: str) -> bool:
        view, _, feature = ref.partition(":")
        return view in self.registry.views and feature in self.registry.views[view].feature_names

    def _events(self, topic: str) -> pd.DataFrame:
        from freshet.stream.backfill import load_events

        return load_events(self.settings, topic)

    def _champion_model(self, champion: str | None):
        if champion is None:
            return None
        try:
            return self.models.load(self.config.model, champion)
        except Exception as exc:  # noqa: BLE001 - an unreadable champion must not block a retrain
            log.warning("could not load champion %s version %s: %s", self.config.model, champion, exc)
            return None
