"""DriftMonitor on seeded prediction and label streams: what it alerts on, and what it does not."""

from __future__ import annotations

import numpy as np
import pytest

from freshet.contracts import DRIFT_KINDS, DriftAlert, Label, Prediction
from freshet.monitor import DriftMonitor, ModelConfig, MonitorConfig

FEATURES = ["amount", "txn_count_5m", "amount_mean_1h", "merchant_count_1d"]
WARMUP = 1000


def make_monitor(seed: int = 0, **overrides) -> DriftMonitor:
    settings = dict(model="fraud", numeric_features=FEATURES, categorical_features=["channel"],
                    warmup=WARMUP, label_warmup=500)
    settings.update(overrides)
    return DriftMonitor(MonitorConfig(models=[ModelConfig(**settings)], seed=seed))


class Traffic:
    """Seeded card-payment predictions; `mean_shift` moves amount_mean_1h by that many sd."""

    def __init__(self, seed: int, version: str = "1"):
        self.rng = np.random.default_rng(seed)
        self.i = 0
        self.version = version

    def predictions(self, n: int, mean_shift: float = 0.0, channel_p=(0.6, 0.3, 0.1), score_scale: float = 1.0,
                    score_offset: float = -1.0) -> list[Prediction]:
        rng = self.rng
        amount = rng.lognormal(3, 1, n)
        count = rng.poisson(3, n)
        mean = rng.normal(50 + 10 * mean_shift, 10, n)
        merchants = rng.poisson(40, n)
        channel = rng.choice(["web", "pos", "app"], size=n, p=channel_p)
        logit = score_offset + score_scale * rng.normal(0, 1.5, n)
        score = 1 / (1 + np.exp(-logit))
        out = []
        for a, c, m, k, ch, s in zip(amount.tolist(), count.tolist(), mean.tolist(), merchants.tolist(),
                                     channel.tolist(), score.tolist()):
            feats = {"amount": a, "txn_count_5m": c, "amount_mean_1h": m, "merchant_count_1d": k, "channel": ch}
            out.append(Prediction(f"r{self.i}", "fraud", self.version, {"card_id": f"c{self.i % 97}"}, feats,
                                  {"score": s, "label": int(s >= 0.5)}, ts=float(self.i)))
            self.i += 1
        return out


def observe_all(monitor: DriftMonitor, predictions) -> list[tuple[int, DriftAlert]]:
    return [(i, a) for i, p in enumerate(predictions) for a in monitor.observe(p)]


def labels_for(predictions, error_rate, rng) -> list[Label]:
    wrong = rng.random(len(predictions)) < error_rate
    return [Label(label=p.prediction["label"] ^ int(w), request_id=p.request_id, ts=p.ts)
            for p, w in zip(predictions, wrong.tolist())]


def test_unchanged_stream_raises_no_alert():
    monitor, traffic = make_monitor(seed=1), Traffic(1)
    rng = np.random.default_rng(1)
    alerts = []
    for _ in range(6):
        batch = traffic.predictions(5000)
        labels = labels_for(batch, 0.15, rng)
        for p, lab in zip(batch, labels):
            alerts += monitor.observe(p) + monitor.observe_label(lab)
    assert alerts == []
    assert monitor.counters()["models"]["fraud"]["warming_up"] == []


def shift_delays(size: float, trials: int) -> list[float]:
    delays = []
    for t in range(trials):
        monitor, traffic = make_monitor(seed=t), Traffic(100 + t)
        assert observe_all(monitor, traffic.predictions(WARMUP + 700 + 37 * t)) == []
        hits = [i + 1 for i, a in observe_all(monitor, traffic.predictions(1000, mean_shift=size))
                if a.kind == "feature" and a.subject == "amount_mean_1h"]
        delays.append(hits[0] if hits else float("inf"))
    return delays


def test_abrupt_shift_in_one_feature_is_detected_within_100_predictions():
    assert np.median(shift_delays(1.0, trials=7)) <= 100


def test_half_sd_shift_in_one_feature_is_detected_within_250_predictions():
    assert np.median(shift_delays(0.5, trials=7)) <= 250


def test_feature_alert_names_the_feature_detector_and_shift():
    monitor, traffic = make_monitor(), Traffic(2)
    observe_all(monitor, traffic.predictions(3000))
    alerts = [a for _, a in observe_all(monitor, traffic.predictions(300, mean_shift=1.0))]
    alert = next(a for a in alerts if a.kind == "feature")
    assert (alert.model, alert.model_version, alert.subject, alert.detector) == ("fraud", "1", "amount_mean_1h", "adwin")
    assert 0.5 < alert.statistic < 2.0  # mean shift over the last blocks, in reference sd
    assert alert.threshold == pytest.approx(1e-3 / 6)  # alpha split over 4 numeric + 1 categorical + score
    assert alert.window > 0 and alert.kind in DRIFT_KINDS
    assert DriftAlert.decode(alert.encode()) == alert


@pytest.mark.parametrize("detector", ["page_hinkley", "kswin"])
def test_selectable_feature_detectors_find_a_shift_and_stay_quiet(detector):
    monitor, traffic = make_monitor(feature_detector=detector, numeric_features=["amount_mean_1h"],
                                    categorical_features=[], watch_score=False), Traffic(3)
    assert observe_all(monitor, traffic.predictions(4000)) == []
    alerts = [a for _, a in observe_all(monitor, traffic.predictions(1500, mean_shift=1.0))]
    assert [(a.kind, a.subject, a.detector) for a in alerts][:1] == [("feature", "amount_mean_1h", detector)]


def test_shift_in_prediction_scores_raises_a_prediction_alert():
    monitor, traffic = make_monitor(estimate=False), Traffic(4)
    assert observe_all(monitor, traffic.predictions(3000)) == []
    alerts = [a for _, a in observe_all(monitor, traffic.predictions(1000, score_offset=0.0))]
    assert ("prediction", "score") in {(a.kind, a.subject) for a in alerts}


def test_categorical_frequency_shift_raises_a_feature_alert():
    monitor, traffic = make_monitor(), Traffic(5)
    assert observe_all(monitor, traffic.predictions(3000)) == []
    alerts = [a for _, a in observe_all(monitor, traffic.predictions(2000, channel_p=(0.45, 0.3, 0.25)))]
    assert [(a.kind, a.subject, a.detector) for a in alerts] == [("feature", "channel", "chi_square")]
    assert alerts[0].statistic > alerts[0].threshold


def test_unseen_categories_raise_a_data_quality_alert():
    monitor, traffic = make_monitor(), Traffic(6)
    observe_all(monitor, traffic.predictions(2000))
    batch = traffic.predictions(2000)
    for p in batch[::5]:
        p.features["channel"] = "crypto_atm"
    alerts = [a for _, a in observe_all(monitor, batch)]
    assert ("data_quality", "channel", "unseen_category") in {(a.kind, a.subject, a.detector) for a in alerts}


def test_rising_missing_rate_raises_a_data_quality_alert():
    monitor, traffic = make_monitor(), Traffic(7)
    observe_all(monitor, traffic.predictions(2000))
    batch = traffic.predictions(2000)
    for p in batch[::4]:
        del p.features["txn_count_5m"]
    alerts = [(a.kind, a.subject, a.detector, a.statistic) for _, a in observe_all(monitor, batch)]
    assert alerts and alerts[0][:3] == ("data_quality", "txn_count_5m", "missing_rate")
    assert alerts[0][3] == pytest.approx(0.25, abs=0.02)


def test_values_outside_the_reference_range_raise_a_data_quality_alert():
    monitor, traffic = make_monitor(), Traffic(8)
    observe_all(monitor, traffic.predictions(2000))
    batch = traffic.predictions(2000)
    for p in batch[::20]:
        p.features["amount"] = -p.features["amount"]  # a sign bug upstream
    alerts = {(a.kind, a.subject, a.detector) for _, a in observe_all(monitor, batch)}
    assert ("data_quality", "amount", "out_of_range") in alerts


def test_dead_letter_rate_over_the_limit_raises_a_data_quality_alert():
    monitor = make_monitor(deadletter_rate=0.01)
    assert monitor.observe_deadletter_rate(0.004, ts=10.0, window=5000) == []
    (alert,) = monitor.observe_deadletter_rate(0.03, ts=11.0, window=5000)
    assert (alert.kind, alert.subject, alert.detector, alert.statistic, alert.threshold, alert.window, alert.ts) == \
        ("data_quality", "deadletter", "deadletter_rate", 0.03, 0.01, 5000, 11.0)
    assert monitor.observe_deadletter_rate(0.05, ts=12.0) == []  # cooldown


def concept_delay(seed: int, before: float, after: float) -> float:
    monitor, traffic = make_monitor(seed=seed), Traffic(seed)
    rng = np.random.default_rng(seed)
    batch = traffic.predictions(4000)
    for p, lab in zip(batch, labels_for(batch, before, rng)):
        assert monitor.observe(p) + monitor.observe_label(lab) == []
    batch = traffic.predictions(3000)
    for i, (p, lab) in enumerate(zip(batch, labels_for(batch, after, rng))):
        alerts = monitor.observe(p) + monitor.observe_label(lab)
        if any(a.kind == "performance" and a.subject == "error_rate" for a in alerts):
            return i + 1
    return float("inf")


def test_error_rate_rise_from_labels_is_detected_within_600_labelled_predictions():
    assert np.median([concept_delay(seed, 0.15, 0.23) for seed in range(5)]) <= 600


def test_falling_error_rate_raises_no_alert():
    assert concept_delay(11, 0.25, 0.10) == float("inf")


def test_label_free_estimate_alerts_before_any_label_arrives():
    monitor, traffic = make_monitor(), Traffic(9)
    assert observe_all(monitor, traffic.predictions(3000)) == []
    # the model grows unsure (scores drift towards 0.5): expected error rises; no labels yet
    alerts = [a for _, a in observe_all(monitor, traffic.predictions(1500, score_scale=0.3, score_offset=-0.3))]
    estimate = [a for a in alerts if a.detector == "cbpe"]
    assert estimate and estimate[0].kind == "performance" and estimate[0].subject == "estimated_error_rate"
    assert estimate[0].statistic > estimate[0].threshold
    assert monitor.counters()["labels"]["joined"] == 0


def test_an_alert_is_not_repeated_within_the_cooldown():
    monitor, traffic = make_monitor(cooldown=5000), Traffic(10)
    observe_all(monitor, traffic.predictions(2000))
    batch = traffic.predictions(8000)
    for p in batch:
        del p.features["txn_count_5m"]  # every quality window breaks the rule again
    missing = [i for i, a in observe_all(monitor, batch) if a.detector == "missing_rate"]
    assert len(missing) == 2 and missing[1] - missing[0] >= 5000
    assert monitor.counters()["models"]["fraud"]["suppressed"] >= 3


def test_same_seed_and_records_give_the_same_alerts():
    def run() -> list[dict]:
        monitor, traffic = make_monitor(seed=3), Traffic(12)
        observe_all(monitor, traffic.predictions(2500))
        return [a.to_dict() for _, a in observe_all(monitor, traffic.predictions(1500, mean_shift=1.0))]

    first = run()
    assert first and run() == first


def test_a_new_model_version_relearns_the_score_reference_instead_of_alerting():
    monitor, traffic = make_monitor(estimate=False), Traffic(13)
    observe_all(monitor, traffic.predictions(3000))
    traffic.version = "2"
    # the new version scores very differently; its features are the same
    alerts = observe_all(monitor, traffic.predictions(4000, score_offset=1.0))
    assert alerts == []
    counters = monitor.counters()["models"]["fraud"]
    assert counters["version"] == "2" and counters["new_versions"] == 1 and counters["warming_up"] == ["outcomes"]


def test_flush_judges_a_partly_filled_block():
    monitor, traffic = make_monitor(block_size=16), Traffic(14)
    observe_all(monitor, traffic.predictions(2000 + 5))
    assert monitor.counters()["models"]["fraud"]["predictions"] == 2005
    monitor.flush()
    assert len(monitor.models["fraud"].block) == 0
