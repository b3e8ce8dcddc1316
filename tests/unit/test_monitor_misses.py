"""The monitor watches the miss rate (labelled positives predicted negative) next to the error rate: on a
rare class, a model that stops catching positives can keep its error rate. Its reference is the version's
holdout when the training reference carries one, else the version's first positives. A new version's
score and outcome alerts are not suppressed by the previous version's cooldown."""

from __future__ import annotations

import numpy as np

from freshet.contracts import DriftAlert, Label, Prediction
from freshet.monitor import DriftMonitor, ModelConfig
from freshet.monitor.service import RetrainPolicy
from freshet.reference import OutcomeReference, TrainingReference


def _monitor(references=None, **cfg):
    config = ModelConfig("fraud", numeric_features=["amount"], warmup=500, label_warmup=500, estimate=False,
                         watch_score=False, **cfg)
    return DriftMonitor([config], references=(lambda m, v: references.get(v)) if references else None)


class Outcomes:
    """Predictions of a rare class (3% positives) and their labels, with a given recall and false-alarm rate."""

    def __init__(self, seed: int, label_clock: float = 0.0):
        self.rng = np.random.default_rng(seed)
        self.i = 0
        self.label_clock = label_clock   # labels' ts minus their predictions' ts (another clock)

    def run(self, monitor: DriftMonitor, n: int, recall: float, fpr: float, version: str = "1") -> list:
        rng, alerts = self.rng, []
        y = rng.random(n) < 0.03
        flagged = np.where(y, rng.random(n) < recall, rng.random(n) < fpr)
        for k in range(n):
            i, self.i = self.i, self.i + 1
            score = 0.9 if flagged[k] else 0.1
            p = Prediction(f"r{i}", "fraud", version, {}, {"amount": float(rng.lognormal(3, 1))},
                           {"score": score, "label": int(flagged[k])}, ts=float(i))
            alerts += [(i, a) for a in monitor.observe(p)]
            label = Label(label=int(y[k]), request_id=f"r{i}", ts=float(i) + self.label_clock)
            alerts += [(i, a) for a in monitor.observe_label(label)]
        return alerts


def _performance(alerts):
    return [(i, a.subject) for i, a in alerts if a.kind == "performance"]


def test_the_miss_rate_alerts_when_positives_stop_being_caught_while_the_error_rate_holds():
    # before: 80% of frauds caught, 3% false alarms; after: none caught, 0.5% false alarms. The
    # error rate is ~3.5% either way
    watched, blind = _monitor(), _monitor(miss_warmup=0)
    for monitor in (watched, blind):
        traffic = Outcomes(seed=1)
        assert _performance(traffic.run(monitor, 6000, recall=0.8, fpr=0.03)) == []
        monitor.alerts_after = _performance(traffic.run(monitor, 4000, recall=0.0, fpr=0.005))
    assert [s for _, s in watched.alerts_after] == ["miss_rate"]
    first = watched.alerts_after[0][0] - 6000
    assert first < 2500, f"the miss rate alerted {first} predictions (~{first * 0.03:.0f} positives) after the change"
    assert blind.alerts_after == []   # the error rate alone does not see it


def test_the_miss_rate_stays_quiet_while_nothing_changes():
    for seed in range(3):
        assert _performance(Outcomes(seed).run(_monitor(), 20_000, recall=0.8, fpr=0.01)) == []


def _reference_with(outcomes: OutcomeReference | None) -> dict:
    rng = np.random.default_rng(5)
    return TrainingReference.build(rng.lognormal(3, 1, (2000, 1)), ["amount"], outcomes=outcomes).to_dict()


def test_a_version_whose_holdout_caught_its_positives_alerts_when_it_misses_them_from_its_first_outcome():
    # a version promoted just as the fraud changes: its own first positives are all missed, so a warm-up on
    # them would take a miss rate of 1 for normal; its holdout says it caught 36 of 40
    caught = {"1": _reference_with(OutcomeReference(0.5, positives=40, missed=4, negatives=960, false_alarms=10))}
    alerts = Outcomes(seed=2).run(_monitor(caught), 4000, recall=0.0, fpr=0.005)
    assert [s for _, s in _performance(alerts)] == ["miss_rate"]
    unknown = {"1": _reference_with(None)}
    assert _performance(Outcomes(seed=2).run(_monitor(unknown), 4000, recall=0.0, fpr=0.005)) == []


def test_the_reference_of_a_version_keeps_its_holdout_outcomes():
    ref = TrainingReference.from_dict(_reference_with(OutcomeReference(0.5, 40, 4, 960, 10)))
    assert ref.outcomes.miss_rate == 0.1 and ref.outcomes.false_alarms == 10
    assert TrainingReference.from_dict(_reference_with(None)).outcomes is None


def test_a_new_version_s_error_rate_alert_is_not_suppressed_by_the_previous_version_s():
    monitor = _monitor(miss_warmup=0, cooldown=50_000)
    traffic = Outcomes(seed=3)
    traffic.run(monitor, 2000, recall=0.9, fpr=0.005)
    first = _performance(traffic.run(monitor, 2000, recall=0.9, fpr=0.10))
    assert [s for _, s in first] == ["error_rate"]
    traffic.run(monitor, 2000, recall=0.9, fpr=0.005, version="2")
    second = [a for _, a in traffic.run(monitor, 2000, recall=0.9, fpr=0.10, version="2") if a.kind == "performance"]
    assert [(a.subject, a.model_version) for a in second] == [("error_rate", "2")]


def test_a_performance_alert_keeps_the_predictions_clock_so_the_retraining_policy_acts_on_it():
    # the demo's labels carry simulated event time, hours before the wall clock its predictions carry
    monitor, traffic = _monitor(), Outcomes(seed=1, label_clock=-40_000.0)
    traffic.run(monitor, 6000, recall=0.8, fpr=0.03)
    policy = RetrainPolicy(window_s=120.0, cooldown_s=45.0)
    assert policy.observe(DriftAlert("earlier", "fraud", "1", "feature", "amount", "adwin", 1.0, 0.1, 48,
                                     ts=5990.0)) is not None
    [(i, alert)] = [(i, a) for i, a in traffic.run(monitor, 4000, recall=0.0, fpr=0.005) if a.kind == "performance"]
    assert i - 60 <= alert.ts <= i
    requests = [policy.observe(alert)] + policy.due(alert.ts + 60.0)
    assert [r.reason for r in requests if r is not None] == [[alert.alert_id]]
