"""Each detector family on seeded streams: it finds a change and stays quiet without one."""

from __future__ import annotations

import numpy as np
import pytest

from freshet.monitor import (
    ERROR_DETECTORS,
    ConfigError,
    ErrorRateDetector,
    FrequencyShift,
    MeanShiftDetector,
    RateRule,
    StandardScores,
)

# blocks of 16 predictions: a 1 sd shift moves the block statistic by 4, 0.5 sd by 2
DELTA = 1e-3 / 21


def first_signal(detector, values) -> int | None:
    for i, v in enumerate(values):
        if detector.update(v):
            return i
    return None


@pytest.mark.parametrize("name, quiet_blocks", [("adwin", 20_000), ("page_hinkley", 20_000), ("kswin", 1_500)])
def test_numeric_detector_stays_quiet_on_unchanged_block_statistics(name, quiet_blocks):
    rng = np.random.default_rng(1)
    detector = MeanShiftDetector(name, DELTA, seed=1)
    assert first_signal(detector, rng.normal(size=quiet_blocks).tolist()) is None


@pytest.mark.parametrize("name, within_blocks", [("adwin", 6), ("page_hinkley", 8), ("kswin", 40)])
def test_numeric_detector_finds_a_one_sd_shift(name, within_blocks):
    rng = np.random.default_rng(2)
    detector = MeanShiftDetector(name, DELTA, seed=2)
    assert first_signal(detector, rng.normal(size=400).tolist()) is None
    found = first_signal(detector, (rng.normal(size=200) + 4.0).tolist())
    assert found is not None and found < within_blocks


def test_numeric_detector_names_are_checked():
    with pytest.raises(ConfigError, match="'cusum'.*adwin, page_hinkley, kswin"):
        MeanShiftDetector("cusum")


NOISY = ("ddm", "eddm")  # documented in ErrorRateDetector: selectable, not quiet


@pytest.mark.parametrize("name", [d for d in ERROR_DETECTORS if d not in NOISY])
def test_error_rate_detector_stays_quiet_on_a_steady_error_rate(name):
    rng = np.random.default_rng(3)
    detector = ErrorRateDetector(name, 1e-3)
    assert first_signal(detector, (rng.random(20_000) < 0.15).astype(int).tolist()) is None


@pytest.mark.parametrize("name", ERROR_DETECTORS)
def test_error_rate_detector_finds_the_error_rate_doubling(name):
    rng = np.random.default_rng(4)
    detector = ErrorRateDetector(name, 1e-3)
    steady = (rng.random(3000) < 0.15).astype(int).tolist()
    if name not in NOISY:
        assert first_signal(detector, steady) is None
    else:
        for wrong in steady:
            detector.update(wrong)
    found = first_signal(detector, (rng.random(3000) < 0.30).astype(int).tolist())
    assert found is not None and found < 1600


@pytest.mark.parametrize("name", NOISY)
def test_ddm_and_eddm_are_selectable_but_noisier_than_the_default(name):
    alarms = {"adwin": 0, name: 0}
    for seed in range(5):
        outcomes = (np.random.default_rng(seed).random(20_000) < 0.15).astype(int).tolist()
        for detector_name in alarms:
            detector = ErrorRateDetector(detector_name)
            alarms[detector_name] += sum(detector.update(w) for w in outcomes)
    assert alarms[name] > alarms["adwin"] == 0


def test_fhddm_is_fed_correct_as_one():
    # FHDDM watches the rate of correct predictions falling; a rising error rate must reach it
    detector = ErrorRateDetector("fhddm", 1e-3)
    assert first_signal(detector, [0] * 500 + [1] * 100) is not None


def test_frequency_shift_finds_a_new_mix_and_not_sampling_noise():
    rng = np.random.default_rng(6)
    p = [0.5, 0.3, 0.15, 0.05]
    shift = FrequencyShift(np.bincount(rng.choice(4, 2000, p=p), minlength=4), alpha=1e-4, window=1000)
    assert not any(shift.update(rng.choice(4, 1000, p=p)) for _ in range(50))
    assert shift.update(rng.choice(4, 1000, p=[0.35, 0.3, 0.15, 0.2]))
    assert shift.statistic > shift.threshold and shift.psi > 0.05


def test_frequency_shift_pools_categories_too_rare_for_the_chi_square():
    rng = np.random.default_rng(7)
    reference = [1000, 900, 3, 2, 1]
    shift = FrequencyShift(reference, alpha=1e-4, window=500)
    p = np.array(reference) / sum(reference)
    assert not any(shift.update(rng.choice(5, 500, p=p)) for _ in range(30))


def test_rate_rule_allows_the_reference_rate_plus_noise_and_flags_more():
    rule = RateRule([0.0, 0.3], reference_size=2000, margin=0.05, window=1000)
    assert rule.update(np.array([20, 330]), 1000).tolist() == [False, False]
    assert rule.update(np.array([60, 420]), 1000).tolist() == [True, True]


def test_rate_rule_judges_only_complete_windows():
    rule = RateRule([0.0], reference_size=1000, margin=0.05, window=100)
    assert rule.update(np.array([50]), 50).tolist() == [False]
    assert rule.update(np.array([50]), 50).tolist() == [True]


def test_normal_scores_make_skewed_and_discrete_features_standard():
    rng = np.random.default_rng(8)
    reference = np.column_stack([rng.lognormal(3, 1.5, 3000), rng.poisson(0.4, 3000), rng.normal(5, 2, 3000)])
    scores = StandardScores("quantile").fit(reference)
    fresh = np.column_stack([rng.lognormal(3, 1.5, 20_000), rng.poisson(0.4, 20_000), rng.normal(5, 2, 20_000)])
    Z = scores.transform(fresh)
    assert np.allclose(Z.mean(0), 0, atol=0.03) and np.allclose(Z.std(0), 1, atol=0.05)
    # block means of 16 normal scores have light tails, unlike z-scored log-normal values
    blocks = Z[:, 0].reshape(-1, 16).mean(1) * 4
    assert abs(float(((blocks - blocks.mean()) ** 3).mean())) < 0.3


def test_standard_scores_keep_missing_values_missing():
    scores = StandardScores("zscore").fit(np.array([[1.0], [2.0], [3.0], [np.nan]]))
    z = scores.transform(np.array([[2.0], [np.nan]]))
    assert z[0, 0] == pytest.approx(0.0) and np.isnan(z[1, 0])


def test_standard_scores_state_round_trips_through_json():
    import json

    rng = np.random.default_rng(9)
    scores = StandardScores().fit(rng.exponential(size=(500, 2)))
    copy = StandardScores().load_state(json.loads(json.dumps(scores.state_dict())))
    X = rng.exponential(size=(50, 2))
    assert np.allclose(scores.transform(X), copy.transform(X))
