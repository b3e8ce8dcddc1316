"""Seeded drift scenarios for the monitor library, and the closed loop on the embedded stack.

    python bench/drift.py [--quick] [--seed N] [--loop | --no-loop | --loop-only]

Progress goes to stderr; the last stdout line is one JSON object with the results. Each
library scenario builds a fresh `DriftMonitor` per trial with the default `ModelConfig` for
18 numeric features (10 normal, 4 log-normal, 4 Poisson counts), 2 categorical features and
the prediction score: 20 features, as in the issue's targets. No Kafka is involved there.

The closed loop (`closed_loop`) runs the embedded stack with `freshet monitor`, `freshet
retrain` and `freshet serve` as processes, injects drift into the prediction stream and times
alert -> promoted version -> serving answering with it. Its setup takes longer than the quick
budget, so `--quick` skips it (saying so in the JSON) unless `--loop` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from freshet.contracts import Label, Prediction  # noqa: E402
from freshet.monitor import DriftMonitor, ModelConfig, MonitorConfig  # noqa: E402

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

    Which alerts first after the change: the label-free estimate (CBPE, from the scores
    alone) or the labelled error rate? With labels 2,000 predictions late the labelled
    detector cannot alert in the first 2,000, so that setting shows what the estimate buys
    when labels are late; with `label_lag=0` (every label right after its prediction) it
    shows how the estimate compares with labels that are as fast as labels can be.
    The trials (seeds, streams, labels) are the same for every `label_lag`."""
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
    return {"estimate": quantiles(est), "labels": quantiles(lab), "trials": trials, "label_lag": label_lag,
            "horizon": horizon, **first_alert(est, lab)}


def first_alert(est: list[float], lab: list[float]) -> dict:
    """Paired per trial: who alerted first, and by how many predictions (inf = not within the horizon)."""
    e, l = np.array(est, dtype=float), np.array(lab, dtype=float)
    both = np.isfinite(e) & np.isfinite(l)
    lead = l[both] - e[both]  # > 0: the estimate alerted that many predictions earlier
    return {"estimate_first_share": float(np.mean(e < l)), "labels_first_share": float(np.mean(l < e)),
            "same_prediction_share": float(np.mean((e == l) & np.isfinite(e))),
            "neither_share": float(np.mean(~np.isfinite(e) & ~np.isfinite(l))),
            "estimate_lead_median": float(np.median(lead)) if len(lead) else None,
            "trials_both_alerted": int(both.sum())}


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


# -- the closed loop on the embedded stack ----------------------------------------------

LOOP_EVENTS = 6000  # example workload, one event per simulated second
LOOP_DRIFT_AT_S = 3000.0  # covariate and concept drift together, half way
LOOP_WARMUP = 1000
LOOP_MONITOR = {
    "seed": 1,
    "models": [{"model": MODEL, "numeric_features": ["amount"], "warmup": LOOP_WARMUP, "estimate": False,
                "join_labels": False, "watch_score": False}],
    "policy": {"min_alerts": 1, "window_s": 600, "cooldown_s": 3600},
}


class LoopTimeline:
    """First wall-clock time of each step of the loop, read off the control topics and serving.

    Kafka message timestamps are the producer's clock at publication; every process runs on
    this machine, so they are comparable with each other and with `time.time()` here."""

    def __init__(self, settings, topics: list[str]):
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        from freshet import kafka

        self.settings = settings
        self.consumer = kafka.consumer(settings, f"{settings.topic_drift}-bench")
        parts = []
        for topic in topics:
            meta = self.consumer.list_topics(topic, timeout=10).topics[topic]
            parts += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions]
        self.consumer.assign(parts)
        self.alerts: list[tuple[float, dict]] = []
        self.requests: list[tuple[float, dict]] = []
        self.models: list[tuple[float, dict]] = []

    def poll(self, timeout: float) -> None:
        msg = self.consumer.poll(timeout)
        if msg is None or msg.error():
            return
        kind, ms = msg.timestamp()
        # 0 = TIMESTAMP_NOT_AVAILABLE: fall back to when it was read here
        at = ms / 1000 if kind != 0 and ms > 0 else time.time()
        doc = json.loads(msg.value())
        {self.settings.topic_drift: self.alerts, self.settings.topic_retrain: self.requests,
         self.settings.topic_models: self.models}[msg.topic()].append((at, doc))

    def promoted(self, not_version: str | None) -> tuple[float, dict] | None:
        return next(((t, e) for t, e in self.models if e.get("stage") == "champion" and e["version"] != not_version),
                    None)

    def close(self) -> None:
        self.consumer.close()


def _http(url: str, body: dict | None = None, token: str = "") -> dict:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # /ready answers 503 with a body until a model is loaded
        return json.loads(exc.read() or b"{}")


def _served_version(base: str, token: str) -> str | None:
    try:  # /ready names the version to the admin credential only
        model = _http(f"{base}/ready", token=token).get("model")
    except OSError:
        return None
    return model["version"] if model else None


def _write_raw_log(settings, registry, batch, topic: str) -> None:
    """The events as the stream engine appends them to the offline raw log (its schema, from the registry)."""
    import pyarrow as pa

    from freshet.stream.events import EventDecoder
    from freshet.stream.offline import append_parts, raw_log_path

    schema = EventDecoder(registry.views_by_topic()[topic]).schema
    cols = batch.columns(ground_truth=False)
    types = {"string": pa.string(), "float": pa.float64(), "int": pa.int64(), "bool": pa.bool_()}
    arrays = {}
    for name, kind in schema.items():
        if kind == "timestamp":
            micros = (np.asarray(cols[name], dtype=float) * 1e6).round().astype("int64")
            arrays[name] = pa.array(micros, pa.timestamp("us", tz="UTC"))
        else:
            arrays[name] = pa.array(cols[name].tolist(), types[kind])
    arrays["_partition"] = pa.array(np.zeros(len(batch), dtype="int32"))
    arrays["_offset"] = pa.array(np.asarray(batch.slot, dtype="int64"))
    append_parts(raw_log_path(settings.data_path, topic), pa.table(arrays), "event_ts")


def _loop_predictions(batch, start: int, stop: int) -> list[tuple[bytes, bytes]]:
    """Prediction records for the workload's transactions [start, stop) as serving logs them.

    Only `amount` is watched; the score is a fixed function of it, enough for the record to be valid."""
    out = []
    for i in range(start, stop):
        tx, amount = str(batch.transaction_id[i]), float(batch.amount[i])
        score = 1 / (1 + math.exp(-(math.log1p(amount) - 6.0)))
        out.append((tx.encode(), json.dumps({
            "schema": "freshet.predictions/1", "request_id": tx, "model": MODEL, "model_version": "1",
            "entities": {"card_id": str(batch.card_id[i]), "merchant_id": str(batch.merchant_id[i])},
            "features": {"amount": amount}, "prediction": {"score": score, "label": int(score >= 0.5)},
            "ts": float(batch.event_ts[i])}).encode()))
    return out


def _produce(settings, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    from freshet import kafka

    p = kafka.producer(settings)
    for key, value in messages:
        p.produce(topic, key=key, value=value)
    if p.flush(30) != 0:
        raise RuntimeError(f"could not publish to {topic}")


def _wait_for(what: str, cond, timeout: float, step=None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout:.0f}s")
        if step:
            step()
        else:
            time.sleep(0.1)


def closed_loop(seed: int, timeout_s: float = 240.0) -> dict:
    """Drift injected into the prediction stream -> alert -> retrain -> promotion -> serving.

    The embedded stack (Tansu, Redis) and `freshet monitor`, `freshet retrain` and `freshet serve`
    as processes, as `freshet up` runs them. The example workload (seeded; covariate and concept
    drift half way) is in the offline raw log; its pre-drift labels are on the labels topic, so
    the retrain worker bootstraps version 1 from them (`--bootstrap-every`, as under `freshet up`).
    Then the post-drift labels are published and the predictions, pre-drift then drifted: the
    clock runs from the first drift alert's publication to the promotion event and to the first
    answer of serving with the new version."""
    import subprocess
    import tempfile
    from pathlib import Path

    from freshet import features, kafka
    from freshet.settings import load_settings
    from freshet.app.stack import EmbeddedStack, free_port
    from freshet.demo.workload import TransactionWorkload

    tmp = Path(tempfile.mkdtemp(prefix="freshet-drift-loop-"))
    ok = False
    stack = EmbeddedStack(tmp / "stack")
    procs: dict[str, subprocess.Popen] = {}
    timeline = None
    t_setup = time.perf_counter()
    phases: dict[str, float] = {}  # seconds since the start at the end of each setup phase
    out: dict = {
        "what": "wall-clock seconds on the embedded stack with freshet monitor, retrain and serve as processes; "
                "alert = publication of the first drift alert, promoted = the new version's freshet.models "
                "event, serving = first /ready of 'freshet serve' naming it (polled every 50 ms). Labels of "
                "the drifted traffic are on the labels topic before the drift is injected (no --wait-labels).",
        "setup_phases_s": phases,
    }
    try:
        e = stack.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
        uid = "bench" + os.urandom(3).hex()
        settings = load_settings(env, kafka_bootstrap_servers=e.kafka, redis_url=e.redis_url,
                                 data_dir=str(tmp / "data"), kafka_partitions=1, api_token=uid,
                                 http_port=free_port(), log_level="INFO",
                                 **{f"topic_{t}": f"{uid}.{t}" for t in
                                    ("predictions", "labels", "drift", "retrain", "deadletter", "models")})
        features.apply(settings)
        kafka.ensure_topics(settings, [settings.topic_predictions, settings.topic_labels, settings.topic_drift,
                                       settings.topic_retrain, settings.topic_models])
        phases["stack_and_feature_repo"] = round(time.perf_counter() - t_setup, 1)
        config = tmp / "monitor.json"
        config.write_text(json.dumps(LOOP_MONITOR))
        child_env = {**env, **settings.to_env(), "FRESHET_LOG_LEVEL": "INFO"}
        half = LOOP_EVENTS // 2  # rate 1/s: the event at LOOP_DRIFT_AT_S
        argv = {
            "retrain": ["retrain", "--bootstrap-every", "1", "--window-labels", str(half), "--seed", "7",
                        "--group", f"{uid}-retrain"],
            "monitor": ["monitor", "--config", str(config), "--snapshot-every", "3600", "--group", f"{uid}-monitor"],
            "serve": ["serve"],
        }

        def start(name: str) -> None:
            procs[name] = subprocess.Popen([sys.executable, "-m", "freshet.cli", *argv[name]], env=child_env,
                                           stdout=open(tmp / f"{name}.log", "ab"), stderr=subprocess.STDOUT)

        def alive() -> None:
            for name, p in procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"freshet {name} exited with code {p.returncode}; see {tmp / (name + '.log')}")
            if timeline is not None:
                timeline.poll(0.05)
            else:
                time.sleep(0.1)

        # the workers import while the data is prepared; the retrain worker bootstraps version 1
        # once the pre-drift labels are there (until then it finds too little labelled data)
        start("retrain")
        start("monitor")
        registry = features.load_registry(settings)
        (topic,) = registry.views_by_topic()  # the example repo reads one events topic
        w = TransactionWorkload(seed=seed % (1 << 31), cards=500, merchants=100, rate=1.0,
                                drift=[f"covariate@{LOOP_DRIFT_AT_S}", f"concept@{LOOP_DRIFT_AT_S}"])
        batch = w.batch(LOOP_EVENTS)
        assert float(batch.sim_s[half]) >= LOOP_DRIFT_AT_S > float(batch.sim_s[half - 1])
        _write_raw_log(settings, registry, batch, topic)
        labels = batch.label_messages()
        _produce(settings, settings.topic_labels, labels[:half])
        phases["example_data"] = round(time.perf_counter() - t_setup, 1)
        # two processes creating the MLflow sqlite store at once race on its migrations:
        # serve starts once the retrain worker has opened it
        retrain_log = tmp / "retrain.log"
        _wait_for("retrain worker started", lambda: "waiting for requests" in retrain_log.read_text(), timeout_s,
                  alive)
        phases["retrain_worker_up"] = round(time.perf_counter() - t_setup, 1)
        start("serve")
        timeline = LoopTimeline(settings, [settings.topic_drift, settings.topic_retrain, settings.topic_models])
        _produce(settings, settings.topic_predictions, _loop_predictions(batch, 0, half))

        base = f"http://{settings.http_host}:{settings.http_port}"
        log(f"  loop: stack, feature repo and workload ready in {time.perf_counter() - t_setup:.1f}s; "
            "waiting for the bootstrapped version 1 to be served")
        _wait_for("version 1 bootstrapped and served", lambda: _served_version(base, uid) == "1", timeout_s, alive)
        phases["version_1_served"] = round(time.perf_counter() - t_setup, 1)
        # the worker answers a request for a model it has no recipe for: then it is in its group
        _produce(settings, settings.topic_retrain, [(b"bench-probe", json.dumps(
            {"schema": "freshet.retrain/1", "request_id": "probe", "model": "bench-probe", "reason": [],
             "ts": time.time()}).encode())])
        _wait_for("retrain worker in its group", lambda: "bench-probe" in retrain_log.read_text(), timeout_s, alive)
        out["setup_s"] = phases["worker_in_group"] = round(time.perf_counter() - t_setup, 1)

        _produce(settings, settings.topic_labels, labels[half:])
        t_inject = time.time()
        _produce(settings, settings.topic_predictions, _loop_predictions(batch, half, len(batch)))
        log(f"  loop: drift injected after {out['setup_s']}s of setup")
        _wait_for("drift alert", lambda: timeline.alerts, timeout_s, alive)
        _wait_for("new version promoted", lambda: timeline.promoted("1"), timeout_s, alive)
        t_promoted, event = timeline.promoted("1")
        version = event["version"]
        _wait_for(f"serving version {version}", lambda: _served_version(base, uid) == version, timeout_s,
                  lambda: (alive(), time.sleep(0.05)))
        t_serving = time.time()
        answer = _http(f"{base}/predict", {"entities": {"card_id": str(batch.card_id[-1]),
                                                        "merchant_id": str(batch.merchant_id[-1])},
                                           "fields": {"amount": float(batch.amount[-1])}}, token=uid)
        t_alert, alert = timeline.alerts[0]
        t_request = next((t for t, r in timeline.requests if r["model"] == MODEL), None)

        def outcome() -> dict | None:
            # the worker appends the outcome after announcing the promotion
            path = settings.data_path / "retrain" / "outcomes.jsonl"
            lines = path.read_text().splitlines() if path.exists() else []
            return next((o for o in map(json.loads, lines) if o.get("version") == version), None)

        _wait_for("the training's outcome record", outcome, 30, alive)
        trained = outcome()
        out.update({
            "alert_to_promotion_s": round(t_promoted - t_alert, 2),
            "alert_to_serving_s": round(t_serving - t_alert, 2),
            "alert_to_request_s": round(t_request - t_alert, 2) if t_request else None,
            "inject_to_alert_s": round(t_alert - t_inject, 2),
            "alert": {"kind": alert["kind"], "subject": alert["subject"], "detector": alert["detector"],
                      "predictions_after_drift": int(alert["ts"] - batch.event_ts[half]) + 1},
            "promoted_version": version, "predict_answered_with": answer.get("model_version"),
            "training": {"seconds": trained.get("seconds"), "decision": trained.get("decision"),
                         "metrics": trained.get("metrics"), "champion_metrics": trained.get("champion_metrics")},
            "events": LOOP_EVENTS, "drift_at_event": half, "target_s": 60,
        })
        ok = True
    except Exception as exc:  # noqa: BLE001 - the library results still count; say why this did not
        out.update({"alert_to_promotion_s": None, "reason": f"{type(exc).__name__}: {exc}",
                    "logs": str(tmp)})
    finally:
        if timeline is not None:
            timeline.close()
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        stack.stop()
        if ok:  # a failed loop keeps its logs (named in the result)
            shutil.rmtree(tmp, ignore_errors=True)
    out["elapsed_s"] = round(time.perf_counter() - t_setup, 1)
    return out


def _machine() -> dict:
    return {"python": platform.python_version(), "cpus": os.cpu_count(),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer trials; under a minute")
    ap.add_argument("--seed", type=int, default=20240601)
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--loop", action="store_true",
                       help="with --quick: run the closed loop too (it needs longer than a minute here)")
    which.add_argument("--no-loop", action="store_true", help="only the library scenarios")
    which.add_argument("--loop-only", action="store_true", help="only the closed loop on the embedded stack")
    args = ap.parse_args()
    quick = args.quick
    seed = args.seed
    t_start = time.perf_counter()
    if args.loop_only:
        log("closed loop on the embedded stack:")
        loop = closed_loop(seed)
        log(f"  -> {loop}")
        print(json.dumps({"bench": "drift", "mode": "loop", "seed": seed,
                          "alert_to_promotion_s": loop["alert_to_promotion_s"],
                          "alert_to_serving_s": loop.get("alert_to_serving_s"), "loop": loop,
                          "machine": _machine(), "elapsed_s": round(time.perf_counter() - t_start, 1)}))
        return
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
    estimate = estimate_trials(plan["estimate_trials"], seed, label_lag=2000)
    log(f"label-free estimate, labels 2,000 predictions late: {estimate} ({time.perf_counter() - t0:.1f}s)")
    t0 = time.perf_counter()
    estimate_now = estimate_trials(plan["estimate_trials"], seed, label_lag=0)
    log(f"label-free estimate, labels without delay: {estimate_now} ({time.perf_counter() - t0:.1f}s)")
    if args.no_loop or (quick and not args.loop):
        why = "--no-loop" if args.no_loop else (
            "--quick: the closed loop starts the embedded stack and three freshet processes and bootstraps a "
            "first model before the drift: 50-100 s of setup on this shared 2-core machine, which does not fit the "
            "quick budget of a minute; run without --quick, with --loop-only, or --quick --loop")
        loop = {"alert_to_promotion_s": None, "skipped": True, "reason": why}
    else:
        log("closed loop on the embedded stack:")
        loop = closed_loop(seed)
        log(f"  -> {loop}")
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
        # the same trials, labelled error rate with labels 2,000 predictions late and without delay
        "delay_labels_lag_2000_median": estimate["labels"]["median"],
        "delay_labels_no_delay_median": estimate_now["labels"]["median"],
        "estimate_first_share_lag_2000": estimate["estimate_first_share"],
        "estimate_first_share_no_delay": estimate_now["estimate_first_share"],
        "observe_per_s": round(tp["observe_per_s"]),
        "observe_per_s_median": round(tp["median"]),
        "observe_per_cpu_s": round(tp["observe_per_cpu_s"]),
        "observe_label_per_s": round(tp["observe_label_per_s"]),
        "alert_to_promotion_s": loop["alert_to_promotion_s"],
        "alert_to_serving_s": loop.get("alert_to_serving_s"),
        "note": "Delays count predictions (labelled predictions for concept) from the change to the alert, "
                "inclusive. alert_to_promotion_s and alert_to_serving_s are wall-clock seconds of the closed "
                "loop (scenarios.loop says what each end is).",
        "targets": {"false_alerts_per_100k": 1, "delay_1sd_median": 100, "delay_half_sd_median": 250,
                    "delay_concept_median": 600, "observe_per_s": 50_000, "alert_to_serving_s": 60},
        "scenarios": {
            "no_change": {"seeds": plan["no_change_seeds"], "predictions": nc["predictions"],
                          "false_alerts": nc["false_alerts"], "by_subject": nc["by_subject"]},
            "shift_1sd": results["1sd"], "shift_half_sd": results["half_sd"],
            "shift_gradual_1sd_over_1000": results["gradual_1sd"], "concept": concept,
            "label_free_estimate": estimate, "label_free_estimate_no_label_delay": estimate_now,
            "throughput": tp, "loop": loop,
        },
        "machine": _machine(),
        "elapsed_s": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
