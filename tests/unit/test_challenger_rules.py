"""Shadow, canary and automatic rollback as rules: canary routing, the rollback decision, the online comparison."""

from __future__ import annotations

import random

import pytest

from freshet.challengers import RollbackRule, compare, goes_to_canary, parse_share, routing_position
from freshet.contracts import DriftAlert, Prediction
from freshet.monitor import DriftMonitor, ModelConfig
from freshet.monitor.service import RetrainPolicy
from freshet.settings import SettingsError, load_settings


# -- canary routing ------------------------------------------------------------------------------

def test_canary_routing_is_deterministic_and_takes_its_share_within_the_binomial_interval():
    share, n = 0.1, 20_000
    picked = sum(goes_to_canary({"request_id": f"tx-{i}"}, share) for i in range(n))
    sd = (n * share * (1 - share)) ** 0.5
    assert abs(picked - n * share) < 4 * sd
    assert all(goes_to_canary({"request_id": f"tx-{i}"}, share) == goes_to_canary({"request_id": f"tx-{i}"}, share)
               for i in range(200))


def test_canary_routing_without_a_request_id_follows_the_entities_whatever_their_order():
    a = {"entities": {"card_id": "c1", "merchant_id": "m9"}}
    b = {"entities": {"merchant_id": "m9", "card_id": "c1"}}
    assert routing_position("x") != routing_position("y")
    assert [goes_to_canary(a, s) for s in (0.01, 0.3, 0.7, 1.0)] == [goes_to_canary(b, s) for s in (0.01, 0.3, 0.7, 1.0)]
    assert goes_to_canary(a, 1.0) and not goes_to_canary(a, 0.0)


@pytest.mark.parametrize("raw", ["0", "-0.1", "1.5", "ten", None])
def test_a_share_outside_0_to_1_is_refused_naming_the_option(raw):
    with pytest.raises(ValueError, match="--share must be a fraction"):
        parse_share(raw)


# -- the rollback decision --------------------------------------------------------------------------

def test_a_champion_clearly_worse_than_its_predecessor_is_rolled_back():
    assert RollbackRule(alpha=0.01, min_outcomes=200, looks=4).judge(compare(40, 200, 20, 400))


def test_a_champion_as_good_or_better_is_kept():
    rule = RollbackRule(alpha=0.01, min_outcomes=200, looks=4)
    assert not rule.judge(compare(20, 400, 20, 400))
    assert not rule.judge(compare(5, 400, 40, 400))


def test_too_few_outcomes_on_either_side_decide_nothing_however_bad():
    rule = RollbackRule(alpha=0.01, min_outcomes=200, looks=1)
    assert not rule.judge(compare(150, 199, 1, 1000))
    assert not rule.judge(compare(150, 300, 0, 199))


def test_a_difference_below_the_minimum_is_not_a_rollback_even_if_significant():
    rule = RollbackRule(alpha=0.01, min_outcomes=200, looks=1, min_difference=0.05)
    c = compare(1300, 20_000, 1000, 20_000)  # 6.5% vs 5%: significant, 1.5 points
    assert c.p_value < 1e-6 and not rule.judge(c)


def test_sequential_looks_keep_false_rollbacks_of_an_equal_champion_below_alpha():
    # 2,000 simulated promotions of a version exactly as good as its predecessor (8% errors),
    # judged at every checkpoint as the monitor does: rolled back in at most alpha of them
    rule = RollbackRule(alpha=0.05, min_outcomes=100, looks=4)
    rng = random.Random(7)
    false = 0
    for _ in range(2000):
        old = sum(rng.random() < 0.08 for _ in range(800))
        errors = n = 0
        for checkpoint in rule.checkpoints:
            while n < checkpoint:
                errors += rng.random() < 0.08
                n += 1
            if rule.judge(compare(errors, n, old, 800)):
                false += 1
                break
    assert false / 2000 <= 0.05 + 3 * (0.05 * 0.95 / 2000) ** 0.5


def test_rollback_settings_out_of_range_fail_at_start_naming_the_setting():
    with pytest.raises(SettingsError, match="FRESHET_ROLLBACK_MIN_OUTCOMES"):
        load_settings({"FRESHET_ROLLBACK_MIN_OUTCOMES": "3"})
    with pytest.raises(SettingsError, match="FRESHET_ROLLBACK_AUTO"):
        load_settings({"FRESHET_ROLLBACK_AUTO": "maybe"})


# -- the online comparison ----------------------------------------------------------------------------

def _prediction(rid, version, label, ts, role=None, shadow=None):
    return Prediction(rid, "fraud", version, {"card_id": "c"}, {"amount": 1.0}, {"score": 0.9 if label else 0.1,
                                                                               "label": label}, ts=ts, role=role,
                      shadow=shadow)


def _monitor(min_outcomes=100, looks=1):
    monitor = DriftMonitor([ModelConfig("fraud", numeric_features=["amount"], warmup=50, estimate=False,
                                        watch_score=False, label_warmup=50)])
    monitor.online.use_rule(RollbackRule(alpha=0.01, min_outcomes=min_outcomes, looks=looks))
    return monitor


def _serve_and_label(monitor, version, start, n, every_wrong, alerts, **kw):
    for i in range(start, start + n):
        alerts += monitor.observe(_prediction(f"r{i}", version, 1, float(i), **kw))
    alerts += monitor.flush()
    for i in range(start, start + n):
        alerts += monitor.observe_label({"schema": "freshet.labels/1", "request_id": f"r{i}",
                                         "label": 0 if i % every_wrong == 0 else 1, "ts": float(i)})


def test_a_new_champion_worse_than_its_predecessor_is_decided_once_with_one_alert():
    monitor, alerts = _monitor(), []
    _serve_and_label(monitor, "1", 0, 400, 25, alerts)       # 4% errors
    _serve_and_label(monitor, "2", 400, 300, 4, alerts)      # 25% errors
    rollbacks = [a for a in alerts if a.detector == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0].model_version == "2" and rollbacks[0].kind == "performance"
    decisions = monitor.online.take_rollbacks()
    assert [(d.version, d.predecessor) for d in decisions] == [("2", "1")]
    assert decisions[0].comparison.new_n == 100  # decided at the first checkpoint
    assert monitor.online.take_rollbacks() == []


def test_a_new_champion_as_good_as_its_predecessor_is_confirmed_not_rolled_back():
    monitor, alerts = _monitor(looks=2), []
    _serve_and_label(monitor, "1", 0, 400, 20, alerts)
    _serve_and_label(monitor, "2", 400, 400, 20, alerts)
    assert not [a for a in alerts if a.detector == "rollback"]
    assert monitor.online.counts["confirmed"] == 1 and not monitor.online.probation


def test_shadow_answers_are_judged_by_the_champions_labels_and_a_worse_shadow_is_reported():
    monitor, alerts = _monitor(), []
    for i in range(300):
        wrong_shadow = i % 3 == 0
        shadow = {"model_version": "7", "prediction": {"score": 0.1 if wrong_shadow else 0.9,
                                                       "label": 0 if wrong_shadow else 1}}
        alerts += monitor.observe(_prediction(f"s{i}", "1", 1, float(i), shadow=shadow))
    alerts += monitor.flush()
    for i in range(300):
        alerts += monitor.observe_label({"schema": "freshet.labels/1", "request_id": f"s{i}", "label": 1,
                                         "ts": float(i)})
    report = {(v["version"], v["role"]): v for v in monitor.online.report()["versions"]}
    assert report[("1", "champion")]["errors"] == 0 and report[("7", "shadow")]["errors"] == 100
    verdicts = [a for a in alerts if a.detector == "challenger"]
    assert [a.subject for a in verdicts] == ["shadow:v7 worse than champion:v1"]
    (evidence,) = monitor.online.take_evidence()  # for the registry: what promotion on evidence reads
    tag = evidence.as_tag(0.0)
    assert (tag["role"], tag["champion"], tag["n"], tag["errors"], tag["verdict"]) == ("shadow", "1", 100, 34, "worse")
    assert monitor.counters()["models"]["fraud"]["outcomes"] == 300  # the champion's watches saw every outcome


def test_canary_answers_stay_out_of_the_champions_watches_and_meet_their_labels_in_either_order():
    monitor, alerts = _monitor(), []
    alerts += monitor.observe(_prediction("c-late", "9", 1, 1.0, role="canary"))
    alerts += monitor.observe_label({"schema": "freshet.labels/1", "request_id": "c-early", "label": 0, "ts": 2.0})
    alerts += monitor.observe(_prediction("c-early", "9", 1, 3.0, role="canary"))
    alerts += monitor.observe_label({"schema": "freshet.labels/1", "request_id": "c-late", "label": 1, "ts": 4.0})
    alerts += monitor.flush()
    canary = [v for v in monitor.online.report()["versions"] if v["role"] == "canary"]
    assert canary == [{"model": "fraud", "version": "9", "role": "canary", "n": 2, "errors": 1, "error_rate": 0.5}]
    assert monitor.counters()["models"]["fraud"]["predictions"] == 0
    assert monitor.models["fraud"].version is None  # the champion's watches never switched to the canary


def test_the_comparison_survives_a_restart_mid_probation():
    monitor, alerts = _monitor(), []
    _serve_and_label(monitor, "1", 0, 400, 25, alerts)
    _serve_and_label(monitor, "2", 400, 50, 4, alerts)
    restored = _monitor()
    restored.load_state(monitor.state_dict())
    assert restored.online.probation == {"fraud": {"version": "2", "predecessor": "1", "looks": 0}}
    _serve_and_label(restored, "2", 450, 100, 4, alerts)
    assert [(d.version, d.predecessor) for d in restored.online.take_rollbacks()] == [("2", "1")]


def test_comparison_alerts_never_ask_for_retraining():
    policy = RetrainPolicy(cooldown_s=0)
    for detector in ("rollback", "challenger"):
        alert = DriftAlert(f"a-{detector}", "fraud", "2", "performance", "x", detector, 3.0, 2.5, 100, 1.0)
        assert policy.observe(alert) is None
    assert policy.observe(DriftAlert("a", "fraud", "2", "performance", "error_rate", "adwin", 3.0, 2.5, 100, 1.0))

