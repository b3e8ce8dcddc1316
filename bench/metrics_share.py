"""What sharing /metrics across `serve --workers N` costs: one publish, one scrape.

A serving process's own registry (`ServingMetrics`), filled as a busy server's would be
(every endpoint and status, a feature-age histogram per view, predictions per version),
is published into a multiprocess directory as each worker does once a second on its
event loop (`ProcessShare.publish`: with every series moved since the last publish, the
worst case, and with none moved, a quiet server), and the directory is read back as a scrape does
(`ProcessShare.exposition`), with `--workers` processes' files present. No broker, Redis
or server: the numbers are the event loop's cost per second and a scrape's latency.
    .venv/bin/python bench/metrics_share.py [--workers 4] [--views 2] [--rounds 200]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from types import SimpleNamespace

from freshet.exporter import LockFreeHistogram
from freshet.serving.metrics import AGE_BUCKETS, LATENCY_BUCKETS, ServingMetrics

ENDPOINTS = ["/predict", "/get-online-features", "/health", "/ready", "/metrics", "/models/{name}", "other"]


def busy_metrics(views: int) -> ServingMetrics:
    m = ServingMetrics(reader=None)
    for endpoint in ENDPOINTS:
        m.latency[endpoint] = h = LockFreeHistogram(LATENCY_BUCKETS)
        for i in range(1000):
            h.observe(0.0001 * (i % 50))
        for status in (200, 401, 404, 413, 422, 503):
            m.requests[(endpoint, status)] = 1000 + status
    for v in range(views):
        m.feature_age[f"view{v}"] = h = LockFreeHistogram(AGE_BUCKETS)
        for i in range(1000):
            h.observe(i)
        for status in ("present", "stale", "not_found"):
            m.feature_rows[(f"view{v}", status)] = 10_000
    m.expose_predictions(SimpleNamespace(counts={("fraud", str(v)): 1000 for v in range(1, 4)}, prediction_log=None))
    m._model_version.labels("fraud").set(3)
    return m


def move_everything(m: ServingMetrics) -> None:
    for h in (*m.latency.values(), *m.feature_age.values()):
        for i in range(len(h.counts)):
            h.counts[i] += 1
        h.sum += 1.0
    for key in m.requests:
        m.requests[key] += 1
    for key in m.feature_rows:
        m.feature_rows[key] += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    directory = tempfile.mkdtemp(prefix="freshet-bench-metrics-")
    try:
        shares = []
        for w in range(args.workers):
            share = busy_metrics(args.views).share_with(directory)
            share.pid = 100_000 + w  # each stands for another worker's files
            share.publish()
            shares.append(share)
        mine = shares[0]
        metrics = busy_metrics(args.views)
        share = metrics.share_with(directory)
        share.publish()
        t0 = time.perf_counter()
        for _ in range(args.rounds):
            share.publish()
        quiet_us = (time.perf_counter() - t0) / args.rounds * 1e6
        spent = 0.0
        for _ in range(args.rounds):
            move_everything(metrics)  # the worst case: every series changed since the last publish
            t0 = time.perf_counter()
            share.publish()
            spent += time.perf_counter() - t0
        publish_us = spent / args.rounds * 1e6
        share.close()
        t0 = time.perf_counter()
        for _ in range(args.rounds):
            text = mine.exposition()
        scrape_ms = (time.perf_counter() - t0) / args.rounds * 1e3
        samples = sum(1 for line in text.decode().splitlines() if line and not line.startswith("#"))
        for s in shares:
            s.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps({"workers": args.workers, "views": args.views, "samples_per_scrape": samples,
                      "publish_us": round(publish_us, 1), "publish_quiet_us": round(quiet_us, 1),
                      "scrape_ms": round(scrape_ms, 2)}))


if __name__ == "__main__":
    main()
