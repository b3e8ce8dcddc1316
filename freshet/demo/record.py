"""What a demo run measured, as plain columns: written by the probes and the run, read by the
report (and kept as data.json, so a report can be rebuilt).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any


class DemoRecord:
    """Everything measured during a run, as plain columns the report reads (and data.json keeps).

    Times `t` are wall seconds since the first event was produced (negative during set-up).
    Appends come from several threads; list.append is atomic under the GIL.
    """

    def __init__(self) -> None:
        self.t0: float | None = None          # epoch of the first produced event
        self.launched = time.time()
        self.meta: dict[str, Any] = {}
        self.components: dict[str, str] = {}  # what became of each component: started, ran, exited ...
        self.problems: list[str] = []
        self.samples: list[dict[str, Any]] = []
        self.freshness: dict[str, list] = {"t": [], "first_ms": [], "all_ms": []}
        self.not_visible = 0
        self.unresolved = 0                   # still waited for when the client stopped
        self.transactions_read = 0            # messages on the transactions topic the client saw
        self.predictions: dict[str, list] = {"t": [], "tx": [], "version": [], "score": [], "label": [],
                                             "latency_ms": [], "sim_s": []}
        self.prediction_failures: Counter = Counter()
        self.failure_examples: dict[str, str] = {}
        self.unscored: Counter = Counter()
        self.events: dict[str, list] = {"sim_s": [], "amount": []}
        self.features: dict[str, Any] = {"names": [], "t": [], "version": [], "values": []}
        self.labels: dict[str, int] = {}
        self.detector: dict[str, Any] = {"t": [], "stats": [], "source": ""}
        self.alerts: list[dict[str, Any]] = []
        self.retrains: list[dict[str, Any]] = []
        self.model_events: list[dict[str, Any]] = []
        self.model_versions: list[dict[str, Any]] = []
        self.trainings: list[dict[str, Any]] = []  # per retraining: version, request ids, `since` cut-off (event time)
        self.bad_messages: Counter = Counter()

    def rel(self, epoch: float) -> float:
        return round(epoch - (self.t0 if self.t0 is not None else self.launched), 4)

    def clock(self) -> str:
        """Traffic time for the console, m:ss since the first event ("setup" before it)."""
        if self.t0 is None:
            return "setup"
        s = max(0, int(time.time() - self.t0))
        return f"{s // 60}:{s % 60:02d}"

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def _timed(self, x: dict[str, Any]) -> dict[str, Any]:
        return {**x, "t": self.rel(x["at"])} if "at" in x else x

    def to_dict(self) -> dict[str, Any]:
        preds = self.predictions
        truth = [self.labels.get(tx) for tx in preds["tx"]]
        return {
            "meta": {**self.meta, "t0": self.t0, "launched": self.launched},
            "problems": self.problems,
            "samples": [{"t": self.rel(x["at"]), **x} for x in self.samples],
            "freshness": {**self.freshness, "not_visible": self.not_visible, "unresolved": self.unresolved,
                          "transactions_read": self.transactions_read},
            "predictions": {k: v for k, v in preds.items() if k != "tx"} | {"truth": truth},
            "prediction_failures": dict(self.prediction_failures),
            "failure_examples": self.failure_examples,
            "unscored": dict(self.unscored),
            "events": self.events,
            "features": self.features,
            "labels_seen": len(self.labels),
            "fraud_labels": sum(self.labels.values()),
            "detector": self.detector,
            # read before the first live event (the first model's promotion, say): timed now that t0 is known
            "alerts": [self._timed(x) for x in self.alerts],
            "retrains": [self._timed(x) for x in self.retrains],
            "model_events": [self._timed(x) for x in self.model_events],
            "model_versions": self.model_versions,
            "trainings": self.trainings,
            "bad_messages": dict(self.bad_messages),
        }
