"""The example workload: deterministic, labelled like its latent fraud process, drifting on cue."""

from __future__ import annotations

import argparse

import numpy as np
import orjson
import pandas as pd
import pytest

from freshet.contracts import Label
from freshet.features import AggregationSpec, ViewSpec
from freshet.stream.events import EventDecoder, EventError
from freshet.demo.cli import add_produce_arguments
from freshet.demo.plan import DemoDrift
from freshet.demo.workload import (
    BURST, CHANNELS, COUNTRIES, EVENT_FIELDS, MALFORMED_KINDS, SPREE, TESTING, DriftSpec,
    DriftSpecError, TokenBucket, TransactionWorkload, parse_drift,
)

# One transaction per card per ~17 simulated minutes, so a burst stands out (see the module docstring).
SMALL = dict(cards=10_000, merchants=300, rate=10.0)
DRIFT_AT = 3000.0  # simulated seconds: slot 30,000 at 10 events/s


def frame(n: int, **kw) -> pd.DataFrame:
    return TransactionWorkload(**{"seed": 1, **SMALL, **kw}).batch(n).to_pandas()


def windowed(df: pd.DataFrame) -> pd.DataFrame:
    """Per card, as the card view computes them: count, sum and mean over (t - window, t], for 5 minutes
    and a day; plus `ratio`, the amount over the card's mean before the last 5 minutes (its usual
    spend, NaN without history), which a model can derive from those features."""
    df = df.sort_values(["card_id", "event_ts"])
    card = df.card_id.astype("category").cat.codes.to_numpy().astype(float)
    key = card * 1e7 + (df.event_ts.to_numpy() - df.event_ts.min())  # one time line per card
    total = np.concatenate([[0.0], np.cumsum(df.amount.to_numpy())])
    i = np.arange(len(df))
    columns = {}
    for name, seconds in (("5m", 300), ("1d", 86_400)):
        first = np.searchsorted(key, key - seconds, side="right")
        columns[f"count_{name}"] = i - first + 1
        columns[f"sum_{name}"] = total[i + 1] - total[first]
        columns[f"mean_{name}"] = columns[f"sum_{name}"] / columns[f"count_{name}"]
    out = df.assign(**columns)
    usual = (out.sum_1d - out.sum_5m) / (out.count_1d - out.count_5m).replace(0, np.nan)
    return out.assign(ratio=out.amount / usual).sort_values("slot")


def decoder() -> EventDecoder:
    schema = {"transaction_id": "string", "card_id": "string", "merchant_id": "string", "amount": "float",
              "country": "string", "channel": "string", "event_ts": "timestamp"}

    def view(name, key, aggs):
        return ViewSpec(name=name, join_keys=(key,), join_key_types=("STRING",), ttl_s=0, topic="tx",
                        timestamp_field="event_ts", source_schema=schema, lateness_s=30,
                        aggregations=tuple(AggregationSpec(f"{f}_{c}", c, f, 300, 60, "DOUBLE") for c, f in aggs),
                        offline_path="")

    return EventDecoder([view("card", "card_id", [("amount", "sum"), ("merchant_id", "count_distinct")]),
                         view("merchant", "merchant_id", [("amount", "sum"), ("card_id", "count_distinct")])])


# --- determinism and shape -------------------------------------------------------------

def test_same_seed_gives_same_events_however_the_stream_is_read():
    whole = list(TransactionWorkload(seed=3, **SMALL).events(10_000))
    w = TransactionWorkload(seed=3, **SMALL)
    pieces = [*w.events(1), *w.events(4094), *w.events(5000), *w.events(905)]
    assert pieces == whole
    again = TransactionWorkload(seed=3, **SMALL).batch(10_000)
    assert again.label.tolist() == TransactionWorkload(seed=3, **SMALL).batch(10_000).label.tolist()


def test_different_seeds_give_different_events():
    a = TransactionWorkload(seed=1, **SMALL).batch(1000)
    b = TransactionWorkload(seed=2, **SMALL).batch(1000)
    assert a.card_id.tolist() != b.card_id.tolist()
    assert a.amount.tolist() != b.amount.tolist()


def test_events_follow_the_transactions_schema_and_advance_at_the_simulated_rate():
    events = list(TransactionWorkload(seed=0, rate=20.0, start_ts=1_000.0).events(5000))
    assert all(list(e) == list(EVENT_FIELDS) for e in events)
    assert len({e["transaction_id"] for e in events}) == 5000
    for e in events[:500]:
        assert isinstance(e["amount"], float) and e["amount"] >= 0.5
        assert e["country"] in COUNTRIES and e["channel"] in CHANNELS
        assert isinstance(e["event_ts"], float)
    assert events[0]["event_ts"] == 1_000.0
    assert events[-1]["event_ts"] == pytest.approx(1_000.0 + 4999 / 20.0)
    assert all(a["event_ts"] <= b["event_ts"] for a, b in zip(events, events[1:])), "in order without jitter"
    # every event is accepted by the engine's own validation
    d = decoder()
    assert all(d.decode(orjson.dumps(e))[0] == e["event_ts"] for e in events)


def test_merchant_popularity_is_zipf_like():
    counts = frame(30_000).merchant_id.value_counts()
    assert counts.iloc[0] > 10 * counts.iloc[len(counts) // 2]
    assert counts.iloc[:30].sum() > 0.4 * counts.sum()


# --- labels ------------------------------------------------------------------------------

@pytest.mark.parametrize("target", [0.02, 0.03, 0.05])
def test_fraud_rate_is_near_the_target(target):
    rate = frame(60_000, fraud_rate=target).label.mean()
    assert rate == pytest.approx(target, rel=0.2)


def test_fraud_concentrates_where_windowed_features_and_event_fields_can_see_it():
    w = TransactionWorkload(seed=1, **SMALL)
    df = windowed(w.batch(30_000).to_pandas())
    base = df.label.mean()
    fast = df[df.count_5m >= 3]
    assert fast.label.mean() > 5 * base, "velocity: several transactions in 5 minutes"
    assert df[df.ratio > 3].label.mean() > 10 * base, "amount far above the card's recent mean"
    assert df[df.ratio <= 1.5].label.mean() < base / 3
    foreign = df.country != df.card_id.map(dict(zip(w.card_ids, w.home_country)))
    assert df[foreign].label.mean() > 4 * df[~foreign].label.mean()
    assert df[df.channel == "web"].label.mean() > 3 * df[df.channel == "pos"].label.mean()
    # bursts hit several merchants; legitimate sprees keep velocity alone from deciding
    bursts = df[df.pattern == BURST]
    assert bursts.groupby("card_id").merchant_id.nunique().mean() > 2
    assert (df.pattern == SPREE).any() and df[df.pattern == SPREE].label.sum() == 0


def test_label_messages_follow_the_labels_contract_and_join_by_transaction_id():
    b = TransactionWorkload(seed=5, label_delay_s=45.0, malformed_fraction=0.1, **SMALL).batch(2000)
    msgs = b.label_messages()
    intact = b.malformed == ""
    assert len(msgs) == intact.sum(), "a malformed event gets no label"
    for (key, value), tx, card, merch, y, ets in zip(
            msgs, b.transaction_id[intact], b.card_id[intact], b.merchant_id[intact], b.label[intact],
            b.event_ts[intact]):
        label = Label.decode(value)
        assert key == tx.encode() == label.key()
        assert label.request_id == tx
        assert label.entities == {"card_id": card, "merchant_id": merch}
        assert label.label == y
        assert label.ts == pytest.approx(ets + 45.0)
        assert orjson.loads(value)["event_ts"] == ets
    assert [e for e, _ in TransactionWorkload(seed=5, **SMALL).labelled_events(3)] == \
        list(TransactionWorkload(seed=5, **SMALL).events(3))


# --- drift -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["covariate", "concept"])
def test_nothing_changes_before_the_drift_point(kind):
    plain = TransactionWorkload(seed=4, **SMALL).batch(40_000).to_pandas()
    drifted = TransactionWorkload(seed=4, drift=[f"{kind}@{DRIFT_AT:g}"], **SMALL).batch(40_000).to_pandas()
    before = plain.sim_s < DRIFT_AT
    pd.testing.assert_frame_equal(plain[before], drifted[before])
    assert not plain[~before].equals(drifted[~before])


def test_covariate_drift_shifts_amounts_and_the_country_and_channel_mix_but_not_the_fraud_rate():
    w = TransactionWorkload(seed=1, drift=[f"covariate@{DRIFT_AT:g}"], covariate_factor=2.0, **SMALL)
    df = w.batch(60_000).to_pandas()
    legit = df[df.label == 0]
    before, after = legit[legit.sim_s < DRIFT_AT], legit[legit.sim_s >= DRIFT_AT]
    assert after.amount.median() == pytest.approx(2 * before.amount.median(), rel=0.1)
    home = dict(zip(w.card_ids, w.home_country))

    def foreign_share(d):
        return (d.country != d.card_id.map(home)).mean()

    assert foreign_share(after) > foreign_share(before) + 0.1
    assert (after.channel == "app").mean() > (before.channel == "app").mean() + 0.1
    rates = df.groupby(df.sim_s >= DRIFT_AT).label.mean()
    assert rates[True] == pytest.approx(rates[False], rel=0.35)


def test_concept_drift_moves_fraud_from_large_bursts_to_small_card_testing():
    df = frame(60_000, drift=[f"concept@{DRIFT_AT:g}"])
    before, after = df[df.sim_s < DRIFT_AT], df[df.sim_s >= DRIFT_AT]
    assert before[before.amount < 5].label.mean() < 0.02
    assert after[after.amount < 5].label.mean() > 0.5
    assert (before.pattern == TESTING).sum() == 0
    # bursts that started before the drift may finish just after it, then they stop
    assert (after[after.sim_s > DRIFT_AT + 600].pattern == BURST).sum() == 0
    assert after.label.mean() == pytest.approx(before.label.mean(), rel=0.35)


def test_a_second_concept_drift_switches_back():
    df = frame(60_000, drift=["concept@1500", "concept@3000"])
    late = df[df.sim_s > 3000 + 600]  # card testing runs end within 2 minutes, then they stop
    assert (late.pattern == BURST).sum() > 0 and (late.pattern == TESTING).sum() == 0


def test_a_model_on_windowed_features_learns_fraud_and_concept_drift_breaks_it():
    from sklearn.metrics import roc_auc_score
    from sklearn.tree import DecisionTreeClassifier

    df = windowed(frame(50_000, drift=[f"concept@{DRIFT_AT:g}"])).fillna({"ratio": -1.0})
    features = [c for c in df.columns if c.startswith(("count_", "sum_", "mean_"))] + ["amount", "ratio"]
    before, after = df[df.sim_s < DRIFT_AT], df[df.sim_s >= DRIFT_AT + 600]
    train, test = before.iloc[: len(before) * 2 // 3], before.iloc[len(before) * 2 // 3:]

    def fit(d):
        return DecisionTreeClassifier(max_depth=5, min_samples_leaf=20, random_state=0).fit(d[features], d.label)

    def scores(model, d):
        p = model.predict_proba(d[features])[:, 1]
        flagged = p > 0.5
        return roc_auc_score(d.label, p), (flagged != d.label).mean(), flagged[d.label == 1].mean()

    old = fit(train)
    auc_before, err_before, recall_before = scores(old, test)
    auc_after, err_after, recall_after = scores(old, after)
    assert auc_before > 0.85 and recall_before > 0.4
    assert err_before < 0.7 * test.label.mean(), "better than calling everything legitimate"
    assert auc_after < 0.6 and recall_after < 0.1, "the old model misses card testing"
    assert err_after > 1.5 * err_before
    half = len(after) // 2
    new = fit(after.iloc[:half])
    auc_new, err_new, _ = scores(new, after.iloc[half:])
    assert auc_new > 0.8 and err_new < err_after, "a model retrained after the drift learns it"


# --- drift specs ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, spec", [
    ("covariate@120", DriftSpec("covariate", 120.0)),
    ("concept@0", DriftSpec("concept", 0.0)),
    (" Concept@2.5m ", DriftSpec("concept", 150.0)),
    ("covariate@1h", DriftSpec("covariate", 3600.0)),
    ("covariate@90s", DriftSpec("covariate", 90.0)),
])
def test_drift_specs_parse(text, spec):
    assert parse_drift(text) == spec


@pytest.mark.parametrize("text, says", [
    ("covariate", "no '@WHEN'"),
    ("covariate@", "no '@WHEN'"),
    ("label@120", "unknown kind 'label'"),
    ("concept@soon", "'soon' is not a time"),
    ("concept@-5", ">= 0"),
])
def test_bad_drift_specs_say_what_is_wrong_and_the_accepted_form(text, says):
    with pytest.raises(DriftSpecError, match="use KIND@WHEN") as exc:
        parse_drift(text)
    assert says in str(exc.value)


@pytest.mark.parametrize("text, minute", [("concept@2.5", 2.5), ("covariate@90s", 1.5), ("concept@1m", 1.0)])
def test_the_demo_reads_the_same_specs_in_minutes_of_traffic(text, minute):
    assert DemoDrift.parse(text).minute == minute


def test_a_bad_demo_drift_spec_names_the_minute_form():
    with pytest.raises(DriftSpecError, match="use KIND@MINUTE, e.g. covariate@1.5") as exc:
        DemoDrift.parse("covariate")
    assert "no '@MINUTE'" in str(exc.value)


def test_cli_rejects_a_bad_drift_spec_with_its_reason(capsys):
    parser = argparse.ArgumentParser()
    add_produce_arguments(parser)
    args = parser.parse_args(["--count", "5", "--drift", "covariate@2m", "--drift", "concept@300"])
    assert args.drift == [DriftSpec("covariate", 120.0), DriftSpec("concept", 300.0)]
    for bad in (["--drift", "sudden@5"], ["--late-fraction", "1.5"], ["--rate", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    assert "unknown kind 'sudden'" in capsys.readouterr().err


# --- malformed, late, out-of-order ---------------------------------------------------------

def test_malformed_events_come_in_every_advertised_kind_and_the_engine_rejects_each():
    b = TransactionWorkload(seed=2, malformed_fraction=0.05, **SMALL).batch(20_000)
    kinds = b.malformed[b.malformed != ""]
    assert len(kinds) / len(b) == pytest.approx(0.05, rel=0.15)
    assert set(kinds) == set(MALFORMED_KINDS)
    d = decoder()
    reasons = {}
    for (key, value), kind, card in zip(b.messages(), b.malformed, b.card_id):
        assert key == card.encode()
        if kind:
            with pytest.raises(EventError) as exc:
                d.decode(value)
            reasons.setdefault(kind, set()).add(str(exc.value).split(":")[0].split(" must")[0])
        else:
            d.decode(value)
    assert reasons["bad_json"] == {"not valid JSON"}
    assert reasons["missing_field"] == {f"missing field '{f}'" for f in ("card_id", "merchant_id", "amount", "event_ts")}
    assert reasons["wrong_type"] == {"field 'amount'", "field 'card_id'"}


def test_options_touch_only_their_own_events():
    base = TransactionWorkload(seed=6, **SMALL).batch(5000)
    noisy = TransactionWorkload(seed=6, late_fraction=0.1, malformed_fraction=0.1, jitter_s=2.0, **SMALL).batch(5000)
    for column in ("transaction_id", "card_id", "merchant_id", "amount", "country", "channel", "label"):
        assert getattr(base, column).tolist() == getattr(noisy, column).tolist()


def test_late_events_are_late_by_the_given_seconds_and_jitter_reorders_within_its_bound():
    b = TransactionWorkload(seed=2, late_fraction=0.05, late_by_s=120.0, jitter_s=3.0, **SMALL).batch(20_000)
    true_ts = b.label_ts - 30.0
    lag = true_ts - b.event_ts
    assert b.late.mean() == pytest.approx(0.05, rel=0.15)
    assert np.all((lag[b.late] >= 120.0 - 1e-6) & (lag[b.late] <= 123.0 + 1e-6))
    assert np.all((lag[~b.late] >= -1e-6) & (lag[~b.late] <= 3.0 + 1e-6))
    on_time = b.event_ts[~b.late]
    assert (np.diff(on_time) < 0).mean() > 0.1, "jitter delivers events out of order"


# --- pacing ------------------------------------------------------------------------------

def test_token_bucket_starts_empty_and_refills_at_its_rate():
    bucket = TokenBucket(rate=1000, burst=100, now=0.0)
    assert bucket.take(10, now=0.0) == 0
    assert bucket.wait(10, now=0.0) == pytest.approx(0.01)
    assert bucket.take(10, now=0.01) == 10
    assert bucket.take(500, now=5.0) == 100, "an idle bucket holds at most a burst"


def test_paced_sending_offers_the_rate_however_long_each_send_takes():
    rate, now, sent, burst = 30_000.0, 0.0, 0, 1500
    bucket = TokenBucket(rate, burst=burst, now=now)
    rng = np.random.default_rng(0)
    while now < 10.0:
        n = bucket.take(150, now)
        if n == 0:
            now += bucket.wait(150, now)
            continue
        assert n <= burst
        sent += n
        now += rng.exponential(0.004)  # producing takes a while, sometimes longer than a chunk's share
    assert sent / now == pytest.approx(rate, rel=0.02)
