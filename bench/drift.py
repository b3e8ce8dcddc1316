"""Seeded drift scenarios for the monitor library: false alarms, detection delays, throughput.

    python bench/drift.py [--quick] [--seed N]

Progress goes to stderr; the last stdout line is one JSON object with the results. Each
scenario builds a fresh `DriftMonitor` per trial with the default `ModelConfig` for 18
numeric features (10 normal, 4 log-normal, 4 Poisson counts), 2 categorical features and
the prediction score: 20 features, as in the issue's targets. No Kafka is involved.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from freshet.contracts import Label, Prediction  # noqa: E402
from monitor import DriftMonitor, ModelConfig, MonitorConfig  # noqa: E402

MODEL = "fraud"
NORMAL, LOGNORMAL, POISSON = 10, 4, 4
NUMERIC = [f"num_{i:02d}" for i in range(NORMAL + LOGNORMAL + POISSON)]
CATEGORICAL = ["country", "channel"]
COUNTRIES = [f"c{i}" for i in range(12)]
COUNTRY_P = np.array([1 / (i + 1) for i in range(12)]) / sum(1 / (i + 1) for i in range(12))
CHANNELS = ["web", "pos", "app"]
CHANNEL_P = np.array([0.5, 0.35, 0.15])
SHIFTED = "num_00"  # a normal feature: "1 sd" is unambiguous
WARMUP = 2000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def monitor(seed: int, **overrides) -> DriftMonitor:
    cfg = ModelConfig(MODEL, numeric_features=NUMERIC, categorical_features=CATEGORICAL, warmup=WARMUP, **overrides)
    # predictions are one second apart: labels are awaited for an hour of them
    return DriftMonitor(MonitorConfig(models=[cfg], seed=seed, label_wait_s=3600))


@dataclass
class Stream:
    """A reproducible workload: features, a score from a few of them, the predicted label."""

    seed: int

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self.rng = rng
        self.mu = rng.normal(50, 20, NORMAL)
        self.sd = rng.uniform(1, 10, NORMAL)
        self.weights = rng.normal(0, 0.8, 4)

    def features(self, n: int, shift: np.ndarray | None = None) -> tuple[np.ndarray, list, list, np.ndarray]:
        """n rows of numeric features; `shift` (n,) adds that many sd to SHIFTED."""
        rng = self.rng
        z = rng.normal(size=(n, NORMAL))
        if shift is not None:
            z[:, 0] += shift
        normal = self.mu + self.sd * z
        lognormal = rng.lognormal(3.0, 1.0, size=(n, LOGNORMAL))
        counts = rng.poisson([0.3, 2.0, 8.0, 30.0], size=(n, POISSON)).astype(float)
        X = np.hstack([normal, lognormal, counts])
        countries = rng.choice(len(COUNTRIES), size=n, p=COUNTRY_P)
        channels = rng.choice(len(CHANNELS), size=n, p=CHANNEL_P)
        logit = -1.5 + z[:, 1:5] @ self.weights
        return X, [COUNTRIES[i] for i in countries], [CHANNELS[i] for i in channels], logit

    def predictions(self, start: int, n: int, shift: np.ndarray | None = None,
                    logit_scale: float = 1.0) -> list[Prediction]:
        X, countries, channels, logit = self.features(n, shift)
        scores = 1 / (1 + np.exp(-logit * logit_scale))
        out = []
        for i, (row, country, channel, s) in enumerate(zip(X.tolist(), countries, channels, scores.tolist())):
            feats = dict(zip(NUMERIC, row))
            feats["country"] = country
            feats["channel"] = channel
            k = start + i
            out.append(Prediction(f"r{k}", MODEL, "1", {"card_id": f"card{k % 5000}"}, feats,
                                  {"score": s, "label": int(s >= 0.5)}, ts=float(k)))
        return out


def labels_for(preds: list[Prediction], error_rate: np.ndarray | float, rng: np.random.Generator) -> list[Label]:
    wrong = rng.random(len(preds)) < error_rate
    return [Label(label=int(p.prediction["label"]) ^ int(w), request_id=p.request_id, ts=p.ts + 0.5)
            for p, w in zip(preds, wrong.tolist())]


def quantiles(delays: list[float]) -> dict[str, float | None]:
    arr = np.array(delays, dtype=float)
    found = arr[np.isfinite(arr)]
    return {
        "median": float(np.median(arr)) if len(arr) and np.isfinite(np.median(arr)) else None,
        "p90": float(np.quantile(arr, 0.9)) if len(arr) and np.isfinite(np.quantile(arr, 0.9)) else None,
        "detected": float(len(found) / len(arr)) if len(arr) else 0.0,
    }


# -- scenarios ---------------------------------------------------------------------------

def no_change(seeds: list[int], n: int) -> dict:
    """Unchanged stream, every prediction labelled (error rate 0.15): every alert is false."""
    alerts, total, kinds = 0, 0, {}
    for seed in seeds:
        stream = Stream(seed)
        mon = monitor(seed)
        rng = np.random.default_rng(seed + 1)
        chunk = 20_000
        t0 = time.perf_counter()
        for start in range(0, n, chunk):
            preds = stream.predictions(start, min(chunk, n - start))
            labs = labels_for(preds, 0.15, rng)
            for p, lab in zip(preds, labs):
                for a in mon.observe(p) + mon.observe_label(lab):
                    alerts += 1
                    kinds[f"{a.kind}:{a.subject}:{a.detector}"] = kinds.get(f"{a.kind}:{a.subject}:{a.detector}", 0) + 1
        total += n - WARMUP
        log(f"  no change, seed {seed}: {n} predictions + labels in {time.perf_counter() - t0:.1f}s, "
            f"alerts so far {alerts}")
    return {"false_alerts": alerts, "predictions": total, "per_100k": alerts / total * 1e5, "by_subject": kinds}


def shift_trials(trials: int, seed: int, size: float, ramp: int = 0) -> dict:
    """Shift SHIFTED by `size` sd (abruptly, or linearly over `ramp` predictions)."""
    delays, others = [], {}
    horizon = 3000
    for t in range(trials):
        rng = np.random.default_rng([seed, t, int(size * 100), ramp])
        stream = Stream(int(rng.integers(1 << 30)))
        mon = monitor(int(rng.integers(1 << 30)), estimate=False)
        pre = WARMUP + int(rng.integers(1000, 3000))
        for p in stream.predictions(0, pre):
            for a in mon.observe(p):
                others[f"{a.kind}:{a.subject}:{a.detector}"] = others.get(f"{a.kind}:{a.subject}:{a.detector}", 0) + 1
        step = np.minimum(np.arange(1, horizon + 1) / ramp, 1.0) * size if ramp else np.full(horizon, size)
        delay = math.inf
        chunk = 250
        for start in range(0, horizon, chunk):
            batch = stream.predictions(pre + start, chunk, shift=step[start:start + chunk])
            for i, p in enumerate(batch, start):
                for a in mon.observe(p):
                    if a.kind == "feature" and a.subject == SHIFTED and delay == math.inf:
                        delay = i + 1
                    elif a.subject != SHIFTED:
                        key = f"{a.kind}:{a.subject}:{a.detector}"
                        others[key] = others.get(key, 0) + 1
                if delay < math.inf:
                    break
            if delay < math.inf:
                break
        delays.append(delay)
    q = quantiles(delays)
    return {**q, "trials": trials, "alerts_on_other_subjects": sum(others.values()), "other_alerts": others}


def concept_trials(trials: int, seed: int, before: float = 0.15, after: float = 0.23) -> dict:
    """Error rate of labelled predictions rises from `before` to `after`; features unchanged."""
    delays = []
    pre_labels = 5000
    horizon = 3000
    for t in range(trials):
        rng = np.random.default_rng([seed, t, 7])
        stream = Stream(int(rng.integers(1 << 30)))
        mon = monitor(int(rng.integers(1 << 30)))
        preds = stream.predictions(0, WARMUP + pre_labels + horizon)
        rates = np.r_[np.full(WARMUP + pre_labels, before), np.full(horizon, after)]
        labs = labels_for(preds, rates, rng)
        delay = math.inf
        for i, (p, lab) in enumerate(zip(preds, labs)):
            # a label usually meets its prediction while that waits in the current block,
            # so the outcome (and its alert) can surface from either call
            for a in mon.observe(p) + mon.observe_label(lab):
                if a.kind == "performance" and a.subject == "error_rate" and i >= WARMUP + pre_labels:
                    delay = i - (WARMUP + pre_labels) + 1
            if delay < math.inf:
                break
        delays.append(delay)
    return {**quantiles(delays), "trials": trials}


def estimate_trials(trials: int, seed: int, label_lag: int = 2000) -> dict:
    """Scores become less confident (covariate shift); labels arrive `label_lag` predictions late.

    The label-free estimate should alert before the labelled error rate can."""
    est, lab = [], []
    horizon = 4000
    for t in range(trials):
        rng = np.random.default_rng([seed, t, 11])
        stream = Stream(int(rng.integers(1 << 30)))
        mon = monitor(int(rng.integers(1 << 30)))
        pre = WARMUP + 4000 + int(rng.integers(0, 500))
        preds = stream.predictions(0, pre) + stream.predictions(pre, horizon, logit_scale=0.5)
        scores = np.array([p.prediction["score"] for p in preds])
        # calibrated model: the label is drawn from the score itself
        truth = (rng.random(len(preds)) < scores).astype(int)
        labels = [Label(label=int(y), request_id=p.request_id, ts=p.ts + label_lag) for p, y in zip(preds, truth)]
        d_est = d_lab = math.inf
        for i, p in enumerate(preds):
            alerts = mon.observe(p)
            if i >= label_lag:
                alerts += mon.observe_label(labels[i - label_lag])
            for a in alerts:
                if i >= pre and a.kind == "performance":
                    if a.detector == "cbpe" and d_est == math.inf:
                        d_est = i - pre + 1
                    if a.subject == "error_rate" and d_lab == math.inf:
                        d_lab = i - pre + 1
            if d_est < math.inf and d_lab < math.inf:
                break
        est.append(d_est)
        lab.append(d_lab)
    return {"estimate": {**quantiles(est)}, "labels": {**quantiles(lab)}, "trials": trials,
            "label_lag": label_lag, "estimate_first_share": float(np.mean(np.array(est) < np.array(lab)))}


def throughput(n: int, repeats: int, seed: int) -> dict:
    stream = Stream(seed)
    mon = monitor(seed)
    for p in stream.predictions(0, WARMUP):
        mon.observe(p)
    rates, cpu_rates = [], []
    start = WARMUP
    for r in range(repeats):
        preds = stream.predictions(start, n)
        start += n
        t0, c0 = time.perf_counter(), time.process_time()
        observe = mon.observe
        for p in preds:
            observe(p)
        rates.append(n / (time.perf_counter() - t0))
        cpu_rates.append(n / (time.process_time() - c0))
        log(f"  observe run {r + 1}: {rates[-1]:,.0f} predictions/s wall, {cpu_rates[-1]:,.0f} per CPU second")
    # labels: a monitor that is still waiting for all of them, so every one is joined
    mon = DriftMonitor(MonitorConfig(models=[mon.config.models[0]], seed=seed, label_wait_s=1e9))
    for p in preds:
        mon.observe(p)
    mon.flush()
    labs = labels_for(preds, 0.15, np.random.default_rng(seed))
    t0 = time.perf_counter()
    for lab in labs:
        mon.observe_label(lab)
    label_rate = len(labs) / (time.perf_counter() - t0)
    assert mon.counters()["labels"]["joined"] == len(labs)
    log(f"  observe_label: {label_rate:,.0f} labels/s (each joined to its prediction)")
    return {"observe_per_s": max(rates), "median": float(np.median(rates)), "runs": rates,
            "observe_per_cpu_s": max(cpu_rates), "cpu_runs": cpu_rates,
            "observe_label_per_s": label_rate, "load_average_1m": os.getloadavg()[0],
            "what": "DriftMonitor.observe on decoded Prediction objects (18 numeric + 2 categorical features, "
                    "the score, label join and estimate all on), one process; observe_per_s is the best of the "
                    "runs' wall-clock rates (as timeit advises: slower runs measure other processes on this "
                    "shared machine), median and every run listed too"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer trials; under a minute")
    ap.add_argument("--seed", type=int, default=20240601)
    args = ap.parse_args()
    quick = args.quick
    seed = args.seed
    t_start = time.perf_counter()
    plan = {
        "no_change_seeds": 1 if quick else 4, "no_change_predictions": 100_000 if quick else 500_000,
        "shift_trials": 16 if quick else 200, "concept_trials": 10 if quick else 100,
        "estimate_trials": 4 if quick else 30, "throughput_predictions": 20_000 if quick else 100_000,
    }
    log(f"drift bench ({'quick' if quick else 'full'}), seed {seed}: {plan}")
    log("throughput:")
    tp = throughput(plan["throughput_predictions"], 3 if quick else 5, seed)
    log("no change:")
    nc = no_change([seed + i for i in range(plan["no_change_seeds"])], plan["no_change_predictions"])
    log(f"  -> {nc['per_100k']:.3f} false alerts per 100k ({nc['false_alerts']} in {nc['predictions']:,})")
    results = {}
    for name, size, ramp in (("1sd", 1.0, 0), ("half_sd", 0.5, 0), ("gradual_1sd", 1.0, 1000)):
        t0 = time.perf_counter()
        results[name] = shift_trials(plan["shift_trials"], seed, size, ramp)
        log(f"shift {name}: {results[name]} ({time.perf_counter() - t0:.1f}s)")
    t0 = time.perf_counter()
    concept = concept_trials(plan["concept_trials"], seed)
    log(f"concept 0.15 -> 0.23: {concept} ({time.perf_counter() - t0:.1f}s)")
    t0 = time.perf_counter()
    estimate = estimate_trials(plan["estimate_trials"], seed)
    log(f"label-free estimate: {estimate} ({time.perf_counter() - t0:.1f}s)")
    out = {
        "bench": "drift", "mode": "quick" if quick else "full", "seed": seed,
        "features": len(NUMERIC) + len(CATEGORICAL), "block_size": ModelConfig(MODEL).block_size,
        "batch_blocks": ModelConfig(MODEL).batch_blocks,
        "false_alerts_per_100k": round(nc["per_100k"], 4),
        "delay_1sd_median": results["1sd"]["median"],
        "delay_half_sd_median": results["half_sd"]["median"],
        "delay_gradual_1sd_median": results["gradual_1sd"]["median"],
        "delay_concept_median": concept["median"],
        "delay_estimate_median": estimate["estimate"]["median"],
        "observe_per_s": round(tp["observe_per_s"]),
        "observe_per_s_median": round(tp["median"]),
        "observe_per_cpu_s": round(tp["observe_per_cpu_s"]),
        "observe_label_per_s": round(tp["observe_label_per_s"]),
        "alert_to_promotion_s": None,
        "note": "alert_to_promotion_s needs the end-to-end loop (freshet monitor -> retrain -> serving), "
                "built separately; this bench covers the library core only. Delays count predictions "
                "(labelled predictions for concept) from the change to the alert, inclusive.",
        "targets": {"false_alerts_per_100k": 1, "delay_1sd_median": 100, "delay_half_sd_median": 250,
                    "delay_concept_median": 600, "observe_per_s": 50_000},
        "scenarios": {
            "no_change": {"seeds": plan["no_change_seeds"], "predictions": nc["predictions"],
                          "false_alerts": nc["false_alerts"], "by_subject": nc["by_subject"]},
            "shift_1sd": results["1sd"], "shift_half_sd": results["half_sd"],
            "shift_gradual_1sd_over_1000": results["gradual_1sd"], "concept": concept,
            "label_free_estimate": estimate, "throughput": tp,
        },
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average_1m_at_end": round(os.getloadavg()[0], 2)},
        "elapsed_s": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
