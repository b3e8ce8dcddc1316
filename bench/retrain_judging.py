"""How to judge a retraining on the labels after an alert: their newest fifth, or out-of-fold over time blocks?

    python bench/retrain_judging.py [--seeds 0,1,2,3,4] [--folds 5] [--wait-s 40]

The 5-minute demo's traffic, generated without Kafka with its features as of each transaction
(`bench/concept_retrain.py`'s `examples`). A post-alert retraining sees `--wait-s` of labels
(about 2,000, 3% frauds) and is judged as `freshet retrain --since-request` judges it, with the
demo's promotion rule (log loss, margin 0.005, paired bootstrap at 95%), two ways:

- holdout: fitted on the older four fifths, scored with the champion on the newest fifth (the
  version registered is that fit);
- folds: `freshet retrain --folds N`: each of N contiguous time blocks scored by a fit on the
  others, the champion on every row, the version fitted on all rows (and the holdout when a fold
  has fewer than 10 of a class: `folds_skipped`).

Two situations, per seed:
- concept: the champion is fitted on 40 s of labels after the covariate drift (the demo's second
  version); a candidate on the labels of a window starting 0, 10, ..., 60 s after the concept
  drift. Whether the registered version is better is measured on the traffic after its window
  (log loss against the champion's): a refusal of a better version is the mistake.
- no change: before any drift, the champion on the first 40 s of labelled traffic, candidates
  on five later windows of the same regime: any promotion is a false one (nothing changed).

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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from concept_retrain import CONCEPT_S, COVARIATE_S, END_S, demo_examples  # noqa: E402
from freshet.models import LinearModel, export_sklearn  # noqa: E402
from freshet.training.dataset import TrainingSet  # noqa: E402
from freshet.training.evaluation import bootstrap_gains, decide_promotion, evaluate, out_of_fold  # noqa: E402
from freshet.training.pipeline import fit_pipeline  # noqa: E402

# the demo's promotion rule (freshet/demo/run.py starts `freshet retrain --metric log_loss`; RetrainConfig defaults)
METRIC, MARGIN, CONFIDENCE, ROUNDS, MIN_CLASS_ROWS, HOLDOUT = "log_loss", 0.005, 0.95, 200, 10, 0.2
CONCEPT_OFFSETS = (0, 10, 20, 30, 40, 50, 60)
NO_CHANGE_WINDOWS = 5


def _fit(training: TrainingSet, rows: np.ndarray, seed: int) -> LinearModel:
    pipe = fit_pipeline(training.X[rows], training.y[rows], seed, names=training.inputs)
    return LinearModel.from_dict(export_sklearn(pipe, training.inputs))


def _decide(y: np.ndarray, p_candidate: np.ndarray, p_champion: np.ndarray, seed: int) -> bool:
    gains = bootstrap_gains(y, p_candidate, p_champion, [METRIC], ROUNDS, seed)
    return decide_promotion(evaluate(y, p_candidate), evaluate(y, p_champion), METRIC, MARGIN, gains,
                            CONFIDENCE).promote


def judge(frame, inputs: list[str], champion: LinearModel, n_folds: int, seed: int) -> dict:
    """Both ways of judging the candidate of one window: promoted?, and the version each would register."""
    out = {}
    held = TrainingSet.split(frame, inputs, HOLDOUT)
    h = held.holdout
    if min(held.y[held.train].sum(), (1 - held.y[held.train]).sum()) < MIN_CLASS_ROWS:
        return {"insufficient": True}
    fifth = _fit(held, held.train, seed)
    p_champion = champion.predict_proba(held.X.tolist())
    out["holdout"] = {"promote": _decide(held.y[h], fifth.predict_proba(held.X[h].tolist()), p_champion[h], seed),
                      "version": fifth, "positives_judged": int(held.y[h].sum())}
    folded = TrainingSet.split(frame, inputs, HOLDOUT, n_folds, MIN_CLASS_ROWS)
    if folded.folds_skipped:
        out["folds"] = {**out["holdout"], "skipped": folded.folds_skipped}
    else:
        p = out_of_fold(folded, lambda rows: _fit(folded, rows, seed))
        out["folds"] = {"promote": _decide(folded.y, p, p_champion, seed), "version": _fit(folded, folded.train, seed),
                        "positives_judged": int(folded.y.sum())}
    return out


def _log_loss(model: LinearModel, X: np.ndarray, y: np.ndarray) -> float:
    return evaluate(y, model.predict_proba(X.tolist()))["log_loss"]


def run_seed(data, inputs: list[str], seed: int, n_folds: int, wait_s: float) -> list[dict]:
    t = data["live_s"].to_numpy()
    frame = data.assign(_t=t)

    def rows(start: float, end: float):
        return frame[(t >= start) & (t < end)].reset_index(drop=True)

    def champion_on(start: float) -> LinearModel:
        ts = TrainingSet.split(rows(start, start + 40.0), inputs, HOLDOUT)
        return _fit(ts, np.ones(len(ts.y), bool), seed)

    windows = []
    covariate_champion = champion_on(COVARIATE_S + 5)
    for offset in CONCEPT_OFFSETS:
        start = CONCEPT_S + offset
        after = TrainingSet.split(rows(start + wait_s + 5, END_S), inputs, HOLDOUT)
        windows.append(("concept", start, covariate_champion, after))
    first = float(t.min())
    quiet_champion = champion_on(first)
    for start in np.linspace(first + 44, COVARIATE_S - wait_s, NO_CHANGE_WINDOWS):
        windows.append(("no_change", float(start), quiet_champion, None))
    results = []
    for kind, start, champion, after in windows:
        verdict = judge(rows(start, start + wait_s), inputs, champion, n_folds, seed)
        r = {"seed": seed, "kind": kind, "window_s": [round(start, 1), round(start + wait_s, 1)]}
        if verdict.get("insufficient"):
            results.append({**r, "insufficient": True})
            continue
        for way in ("holdout", "folds"):
            v = verdict[way]
            r[way] = {"promote": v["promote"], "positives_judged": v["positives_judged"]}
            if "skipped" in v:
                r[way]["folds_skipped"] = v["skipped"]
            if after is not None:  # better on the traffic after the window than the champion it would replace
                ll_v, ll_c = _log_loss(v["version"], after.X, after.y), _log_loss(champion, after.X, after.y)
                r[way].update(better=bool(ll_v < ll_c), log_loss_after=round(ll_v, 4),
                              champion_log_loss_after=round(ll_c, 4))
        results.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
    return results


def tally(results: list[dict]) -> dict:
    out = {}
    for way in ("holdout", "folds"):
        concept = [r[way] for r in results if r["kind"] == "concept" and way in r]
        quiet = [r[way] for r in results if r["kind"] == "no_change" and way in r]
        better = [c for c in concept if c["better"]]
        out[way] = {"concept_windows": len(concept), "concept_better": len(better),
                    "concept_refused_better": sum(not c["promote"] for c in better),
                    "concept_promoted_worse": sum(c["promote"] and not c["better"] for c in concept),
                    "no_change_windows": len(quiet), "no_change_promoted": sum(q["promote"] for q in quiet),
                    "folds_skipped": sum("folds_skipped" in c for c in concept + quiet),
                    "median_positives_judged": float(np.median([c["positives_judged"] for c in concept + quiet]))}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--wait-s", type=float, default=40.0, help="seconds of labels a retraining waits for (default 40)")
    args = p.parse_args()
    started = time.monotonic()
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="freshet-judging-") as tmp:
        for seed, data, inputs in demo_examples(tmp, args.seeds):
            results.extend(run_seed(data, inputs, seed, args.folds, args.wait_s))
    print(json.dumps({"bench": "retrain_judging", "folds": args.folds, "wait_s": args.wait_s, "metric": METRIC,
                      "margin": MARGIN, "confidence": CONFIDENCE, "seeds": args.seeds, **tally(results),
                      "insufficient_windows": sum(bool(r.get("insufficient")) for r in results),
                      "seconds": round(time.monotonic() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
