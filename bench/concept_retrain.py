"""Can a retraining after the demo's concept drift learn it? The demo's workload, offline.

    python bench/concept_retrain.py [--seeds 0,1,2] [--wait-s 40] [--alert-s 30]

For each seed: the 5-minute demo's traffic (26 simulated hours of history, then 5 minutes at 50
events/s and x50 time, covariate drift at minute 1, concept drift at minute 2.75, 500 cards) is
generated without Kafka, and every labelled transaction of the last two history hours and of the
live traffic gets its features as of its own event time, with the stream's aggregation code
(`freshet.stream.backfill.training_set`). The champion is the fraud pipeline
(`freshet.training.pipeline.fit_pipeline`) fitted on 40 s of labels after the covariate drift,
as the demo's second version is; the challenger is fitted on `--wait-s` of labels starting
`--alert-s` after the concept drift, as a retraining for its alert is. Both are scored at 0.5 on
the traffic after the challenger's labels, and the champion also on the traffic between the
drift and then (what the demo's summary compares: "error until -> after").

Progress goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from freshet import features  # noqa: E402
from freshet.demo.workload import EVENT_FIELDS, TransactionWorkload  # noqa: E402
from freshet.settings import load_settings  # noqa: E402
from freshet.stream.backfill import training_set  # noqa: E402
from freshet.training.pipeline import fit_pipeline, input_matrix  # noqa: E402

HISTORY_S = 26 * 3600.0
TIME_SCALE = 50.0           # simulated seconds per wall second; 1 event per simulated second
COVARIATE_S, CONCEPT_S, END_S = 60.0, 165.0, 300.0  # wall seconds of live traffic


def demo_examples(tmp: str, seeds: str):
    """(seed, examples, inputs) for each of the comma-separated `seeds`, with `feature_repo/`
    applied to a fresh data dir at `tmp` (no FRESHET_* variable of the caller's leaks in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
    settings = load_settings(env, data_dir=tmp)
    features.apply(settings)
    registry = features.load_registry(settings)
    for seed in (int(s) for s in seeds.split(",")):
        yield (seed, *examples(settings, registry, seed))


def examples(settings, registry, seed: int) -> pd.DataFrame:
    """The labelled transactions with their features, `live_s` = wall seconds since live traffic began."""
    drift = [f"covariate@{HISTORY_S + COVARIATE_S * TIME_SCALE}", f"concept@{HISTORY_S + CONCEPT_S * TIME_SCALE}"]
    batch = TransactionWorkload(seed, rate=1.0, cards=500, drift=drift).batch(int(HISTORY_S + END_S * TIME_SCALE))
    df = batch.to_pandas()
    events = df[list(EVENT_FIELDS)].assign(event_ts=pd.to_datetime(df["event_ts"], unit="s", utc=True))
    labelled = df[df.sim_s >= HISTORY_S - 2 * 3600]
    frame = labelled[["transaction_id", "card_id", "merchant_id", "label", "amount", "sim_s"]].assign(
        event_ts=pd.to_datetime(labelled["event_ts"], unit="s", utc=True))
    refs = list(registry.feature_services["fraud_model_v1"])
    topic = next(iter(registry.views.values())).topic
    data = training_set(settings, registry, frame, refs, events={topic: events}, progress=False)
    data["live_s"] = (data["sim_s"] - HISTORY_S) / TIME_SCALE
    return data, refs + ["amount"]


def judge(data: pd.DataFrame, inputs: list[str], seed: int, alert_s: float, wait_s: float) -> dict:
    X = input_matrix(data, inputs)
    y = data["label"].to_numpy().astype(int)
    t = data["live_s"].to_numpy()

    def fit(mask):
        return fit_pipeline(X[mask], y[mask], seed)

    def error(model, mask):
        return round(float(np.mean((model.predict_proba(X[mask])[:, 1] > 0.5) != y[mask])), 4)

    champion = fit((t >= COVARIATE_S + 5) & (t < COVARIATE_S + 45))
    start = CONCEPT_S + alert_s
    challenger = fit((t >= start) & (t < start + wait_s))
    promoted = start + wait_s + 5  # training and promotion take a few seconds
    between, after = (t >= CONCEPT_S) & (t < promoted), t >= promoted
    return {"seed": seed, "champion_until_promotion": error(champion, between),
            "champion_after": error(champion, after), "challenger_after": error(challenger, after),
            "challenger_positives": int(y[(t >= start) & (t < start + wait_s)].sum()),
            "labelled_after": int(after.sum())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--alert-s", type=float, default=30.0, help="seconds from the drift to its alert (default 30)")
    p.add_argument("--wait-s", type=float, default=40.0, help="seconds of labels the challenger waits for (default 40)")
    args = p.parse_args()
    started = time.monotonic()
    results = []
    with tempfile.TemporaryDirectory(prefix="freshet-concept-") as tmp:
        for seed, data, inputs in demo_examples(tmp, args.seeds):
            results.append(judge(data, inputs, seed, args.alert_s, args.wait_s))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    drop = [r["champion_until_promotion"] - r["challenger_after"] for r in results]
    same = [r["champion_after"] - r["challenger_after"] for r in results]
    print(json.dumps({"bench": "concept_retrain", "alert_s": args.alert_s, "wait_s": args.wait_s,
                      "seeds": results, "lower_after_than_until": sum(d > 0 for d in drop),
                      "mean_drop_pts": round(100 * float(np.mean(drop)), 2),
                      "mean_gain_same_traffic_pts": round(100 * float(np.mean(same)), 2),
                      "seconds": round(time.monotonic() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
