"""Model registry benchmark: what an MLflow-native version (sklearn flavour in skops) costs.

On a fresh data dir with MLflow's sqlite registry (no broker: nothing is published), registers
`--versions` versions of the example fraud pipeline (37 inputs, fitted on seeded data) and times,
per version: registration (MLflow model saved with skops, signature and input example, logged
and registered), serving's load (download, MLmodel read, skops load with freshet's trusted types,
export to the numpy scorer, fresh cache each time) and MLflow's own
`mlflow.pyfunc.load_model("models:/<name>/<version>")`. Then scores 10,000 single rows with the
fast scorer and the same rows in one batch through pyfunc, and checks they agree.

Progress goes to stderr; the last stdout line is one JSON object:
    {"register_ms": {"median": ..., "p90": ...}, "serving_load_ms": {...}, "pyfunc_load_ms": {...}, ...}
    .venv/bin/python bench/models.py [--versions 10] [--seed 0]
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

from freshet.models import ModelRegistry
from freshet.settings import load_settings
from freshet.training.pipeline import fit_pipeline

N_INPUTS = 37
ROWS = 10_000


def _stats(ms: list[float]) -> dict[str, float]:
    return {"median": round(float(np.median(ms)), 1), "p90": round(float(np.percentile(ms, 90)), 1),
            "max": round(float(np.max(ms)), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--versions", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import mlflow

    names = [f"card_txn_stats:f{i}" for i in range(N_INPUTS - 1)] + ["amount"]
    rng = np.random.default_rng(args.seed)
    x = rng.normal(size=(5000, N_INPUTS)) * rng.uniform(1, 50, N_INPUTS)
    y = (x[:, 0] / x[:, 0].std() + rng.normal(size=5000) > 1).astype(int)
    x[rng.random(x.shape) < 0.05] = np.nan
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
        settings = load_settings(env, data_dir=tmp)
        registry = ModelRegistry(settings, publish_events=False)
        mlflow.set_tracking_uri(settings.mlflow_uri)
        mlflow.set_registry_uri(settings.mlflow_uri)
        register, load, pyfunc_load = [], [], []
        for v in range(args.versions):
            pipe = fit_pipeline(x, y, args.seed + v, C=1.0 + v, names=names)
            t = time.perf_counter()
            version = registry.register_sklearn("fraud", pipe, names, {"feature_service": "fraud_model_v1"},
                                                input_example=x[:5])
            register.append((time.perf_counter() - t) * 1000)
            registry._cache.clear()
            t = time.perf_counter()
            model = registry.load("fraud", version)
            load.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            pyfunc = mlflow.pyfunc.load_model(f"models:/fraud/{version}")
            pyfunc_load.append((time.perf_counter() - t) * 1000)
            print(f"version {version}: register {register[-1]:.0f} ms, serving load {load[-1]:.0f} ms, "
                  f"pyfunc load {pyfunc_load[-1]:.0f} ms", file=sys.stderr)
        rows = rng.normal(size=(ROWS, N_INPUTS)) * 10
        as_lists = [list(map(float, r)) for r in rows]
        t = time.perf_counter()
        fast = [model.score_one(r) for r in as_lists]
        fast_s = time.perf_counter() - t
        t = time.perf_counter()
        slow = pyfunc.predict(pd.DataFrame(rows, columns=names))[:, 1]
        pyfunc_s = time.perf_counter() - t
    print(json.dumps({
        "versions": args.versions, "inputs": N_INPUTS,
        "register_ms": _stats(register[1:] or register),  # the first pays MLflow's imports and schema
        "first_register_ms": round(register[0], 1),
        "serving_load_ms": _stats(load), "pyfunc_load_ms": _stats(pyfunc_load),
        "fast_scorer_rows_per_s": round(ROWS / fast_s), "pyfunc_batch_rows_per_s": round(ROWS / pyfunc_s),
        "max_score_difference": float(np.max(np.abs(np.asarray(fast) - slow))),
        "load_average": os.getloadavg()[0],
    }))


if __name__ == "__main__":
    main()
