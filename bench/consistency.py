"""Online/offline consistency benchmark: served features vs their recomputation from the raw log.

Starts the embedded stack, one `freshet stream` worker and the HTTP API (uvicorn, in this
process), registers a model reading every feature of the example feature service, then plays
rounds of seeded card transactions in simulated time (each round `--step` simulated seconds
after the previous one, so entities idle for a round or more see their windows empty):
out-of-order events within the lateness, late events beyond it (dead-lettered), and events
dated in the past so the stream's clock runs on event time. After each round is applied
(the worker committed past every source and repartition record) it scores every transaction
of the round over HTTP and probes idle cards and merchants. At the end every logged prediction
is judged by `freshet.training.consistency.ServedConsistency` (sample 1.0): each feature value
served vs the value recomputed from the offline raw log as serving answered it at its time.

Progress goes to stderr; the last stdout line is one JSON object:
    {"consistency_rate": ..., "features_compared": ..., "mismatches": [...], ...}
    .venv/bin/python bench/consistency.py [--rounds 8] [--events 400] [--idle 120] [--seed 1]

`LiveConsistencyRun` is also what tests/integration/test_consistency.py drives, smaller.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import orjson

from freshet import features, kafka
from freshet.settings import Settings, load_settings

TOKEN = "consistency-bench-token"
LATENESS_S = 30  # the example sources' watermark_delay_threshold
ROUND_SPAN_S = 60.0  # simulated seconds a round's events cover
NEWEST_AT = 20.0  # a round's newest event is this many seconds past a minute: see `_before_boundary`


def say(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


class Sent:
    """Each partition's end offset, from delivery reports (the embedded broker lists a partition's
    end as its last batch's base offset + 1)."""

    def __init__(self):
        self.ends: dict[int, int] = {}
        self.failed = 0

    def report(self, err, msg) -> None:
        if err is not None:
            self.failed += 1
            return
        self.ends[msg.partition()] = max(self.ends.get(msg.partition(), 0), msg.offset() + 1)


class Rounds:
    """The seeded workload: per round, transactions (some out of order), late events, idle probes."""

    def __init__(self, seed: int, rounds: int, events: int, idle: int, step_s: float, cards: int, merchants: int,
                 late: int = 5):
        self.rnd = random.Random(seed)
        self.rounds, self.events, self.idle, self.step_s, self.late = rounds, events, idle, step_s, late
        self.cards, self.merchants = cards, merchants
        # the last round's newest event a few minutes before now, on NEWEST_AT past a minute
        last = (time.time() - 300) // 60 * 60 + NEWEST_AT
        self.newest = [last - (rounds - 1 - r) * step_s for r in range(rounds)]
        self.seen_cards: set[str] = set()
        self.seen_merchants: set[str] = set()
        self.n = 0

    def round(self, r: int) -> tuple[list[dict], list[dict], list[dict]]:
        """(events, late events, probes of idle entities) of round `r`."""
        rnd, newest = self.rnd, self.newest[r]
        # a different quarter of the cards each round: the others go idle
        pool = [f"card{i}" for i in range(self.cards) if i % 4 == r % 4]
        events = []
        for i in range(self.events):
            ts = newest - ROUND_SPAN_S * (1 - i / max(1, self.events - 1))
            if rnd.random() < 0.1:
                ts -= rnd.uniform(0, LATENESS_S * 0.6)  # out of order, within the lateness
            self.n += 1
            events.append({"transaction_id": f"tx{self.n}", "card_id": rnd.choice(pool),
                           "merchant_id": f"m{rnd.randrange(self.merchants) if r % 2 else rnd.randrange(self.merchants // 2)}",
                           "amount": round(rnd.lognormvariate(3, 1), 2), "country": rnd.choice(["DE", "FR", "US"]),
                           "channel": rnd.choice(["web", "pos"]), "event_ts": ts})
        late = []
        for i in range(self.late):
            e = dict(rnd.choice(events))
            self.n += 1
            late.append({**e, "transaction_id": f"late{self.n}", "event_ts": newest - 4 * LATENESS_S})
        active_cards = {e["card_id"] for e in events}
        active_merchants = {e["merchant_id"] for e in events}
        idle_cards = sorted(self.seen_cards - active_cards)
        idle_merchants = sorted(self.seen_merchants - active_merchants) or sorted(self.seen_merchants)
        probes = []
        if idle_cards and idle_merchants:
            for i in range(self.idle):
                probes.append({"request_id": f"idle-{r}-{i}", "entities": {
                    "card_id": rnd.choice(idle_cards), "merchant_id": rnd.choice(idle_merchants)},
                    "fields": {"amount": 10.0}})
        self.seen_cards |= active_cards
        self.seen_merchants |= active_merchants
        return events, late, probes


@contextlib.contextmanager
def serving(settings: Settings, model_name: str):
    """The HTTP API (uvicorn in a thread, on a free loopback port); yields its base URL."""
    import uvicorn

    from freshet.app.stack import free_port
    from freshet.serving.app import create_app
    from freshet.serving.transport import http_protocol

    app = create_app(settings, model_name=model_name, model_poll_s=1.0,
                     tokens={"admin": TOKEN, "predict": TOKEN + "-predict", "features": TOKEN + "-features"})
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="warning",
                                           loop="asyncio", access_log=False, http=http_protocol()))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        raise RuntimeError("the HTTP API did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def register_model(settings: Settings, registry, name: str, seed: int = 0) -> list[str]:
    """A model reading every feature of the example feature service and `amount`, promoted."""
    from freshet.models import ModelRegistry
    from freshet.settings import DEFAULT_FEATURE_SERVICE
    from freshet.training.pipeline import fit_pipeline

    inputs = [*registry.feature_services[DEFAULT_FEATURE_SERVICE], "amount"]
    rng = np.random.default_rng(seed)
    x = rng.lognormal(2, 1, size=(400, len(inputs)))
    y = (x[:, -1] + rng.normal(size=400) * 5 > 10).astype(int)
    models = ModelRegistry(settings)
    version = models.register_sklearn(name, fit_pipeline(x, y, seed), inputs, {"feature_service": DEFAULT_FEATURE_SERVICE})
    models.promote(name, version)
    return inputs


class LiveConsistencyRun:
    """A stream worker and the HTTP API on one deployment; rounds of events in, predictions out."""

    def __init__(self, settings: Settings, topic: str, worker_env: dict[str, str], log: Path, app_id: str):
        self.settings = settings
        self.topic = topic
        self.worker_env = worker_env
        self.log = log
        self.app_id = app_id
        self.registry = features.load_registry(settings)
        self.partitions = settings.kafka_partitions
        self.sent = Sent()
        self.request_ids: list[str] = []
        self.skipped = 0  # predictions not made: too near a slide boundary of the stream's clock
        self.last_produced_at = 0.0
        self.rows_seen: dict = {}
        self._worker: subprocess.Popen | None = None
        self._stack = contextlib.ExitStack()
        self.http: httpx.Client | None = None

    def __enter__(self) -> "LiveConsistencyRun":
        kafka.ensure_topics(self.settings, [self.topic, self.settings.topic_deadletter,
                                            self.settings.topic_predictions])
        self._worker = subprocess.Popen([sys.executable, "-m", "freshet.cli", "stream", "--app-id", self.app_id],
                                        env=self.worker_env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        model = f"{self.app_id}-model"
        register_model(self.settings, self.registry, model)
        url = self._stack.enter_context(serving(self.settings, model))
        self.http = self._stack.enter_context(httpx.Client(base_url=url, timeout=30,
                                                           headers={"Authorization": f"Bearer {TOKEN}"}))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        if self._worker is not None:
            self._worker.send_signal(signal.SIGTERM)
            try:
                self._worker.wait(30)
            except subprocess.TimeoutExpired:
                self._worker.kill()

    def produce(self, events: list[dict]) -> None:
        p = kafka.producer(self.settings)
        for e in events:
            p.produce(self.topic, key=e["card_id"].encode(), value=orjson.dumps(e), on_delivery=self.sent.report)
        if p.flush(60):
            raise RuntimeError("events not delivered within 60 s")

    def wait_applied(self, timeout: float = 180.0) -> float:
        """Until the worker committed past every event sent and every repartition record; returns seconds."""
        started = time.monotonic()
        repartition = f"{self.app_id}-merchant_txn_stats-repartition"
        while True:
            if self._worker.poll() is not None:
                raise RuntimeError(f"the stream worker exited ({self._worker.returncode}); see {self.log}")
            done = kafka.committed_offsets(self.settings, self.app_id, self.topic, range(self.partitions))
            if all(done.get(p, 0) >= end for p, end in self.sent.ends.items()):
                ends = kafka.partition_ends(self.settings, repartition, self.partitions)
                if all(at >= ends[p] for p, at in kafka.committed_offsets(self.settings, self.app_id, repartition,
                                                                          ends).items()):
                    return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"events not applied within {timeout:.0f}s; see {self.log}")
            time.sleep(0.2)

    def predict(self, instances: list[dict], produced_at: float, batch: int = 100) -> int:
        """Score the instances in batches while the stream's clock is clear of a slide boundary; returns how many."""
        made = 0
        for start in range(0, len(instances), batch):
            if not _before_boundary(produced_at):
                self.skipped += len(instances) - start
                break
            chunk = instances[start:start + batch]
            resp = self.http.post("/predict", json={"instances": chunk})
            resp.raise_for_status()
            self.request_ids += [p["request_id"] for p in resp.json()["predictions"]]
            made += len(chunk)
        return made

    def play(self, rounds: Rounds, label_topic: str | None = None) -> dict:
        """Every round: produce, wait until applied, score the round's transactions and the idle probes."""
        applied_s = []
        labels = []
        for r in range(rounds.rounds):
            events, late, probes = rounds.round(r)
            produced_at = self.last_produced_at = time.time()
            self.produce(events + late)
            applied_s.append(self.wait_applied())
            instances = [{"request_id": e["transaction_id"], "entities": {"card_id": e["card_id"],
                          "merchant_id": e["merchant_id"]}, "fields": {"amount": e["amount"]}} for e in events]
            made = self.predict(instances + probes, produced_at)
            labels += [e["transaction_id"] for e in events[:made]]
            say(f"round {r + 1}/{rounds.rounds}: {len(events)} events + {len(late)} late, applied in "
                f"{applied_s[-1]:.1f}s; {made} predictions ({len(probes)} idle probes)")
        if label_topic:
            self.publish_labels(label_topic, labels, rounds.rnd)
        return {"rounds": rounds.rounds, "predictions": len(self.request_ids), "skipped": self.skipped,
                "applied_s_max": round(max(applied_s), 2)}

    def publish_labels(self, topic: str, request_ids: list[str], rnd: random.Random) -> None:
        kafka.ensure_topics(self.settings, [topic])
        p = kafka.producer(self.settings)
        for rid in request_ids:
            p.produce(topic, key=rid.encode(), value=orjson.dumps(
                {"schema": "freshet.labels/1", "request_id": rid, "label": int(rnd.random() < 0.3), "ts": time.time()}))
        p.flush(30)

    def logged_predictions(self, timeout: float = 60.0) -> list:
        """Every prediction this run made, read back from the prediction topic."""
        from confluent_kafka import TopicPartition

        from freshet.contracts import Prediction

        want = set(self.request_ids)
        topic = self.settings.topic_predictions
        c = kafka.consumer(self.settings, f"read-{os.urandom(3).hex()}")
        meta = c.list_topics(topic, timeout=10).topics[topic]
        c.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
        seen: dict[str, Prediction] = {}
        deadline = time.monotonic() + timeout
        try:
            while not want <= set(seen) and time.monotonic() < deadline:
                for m in c.consume(1000, 0.5):
                    if not m.error():
                        pred = Prediction.decode(m.value())
                        if pred.request_id in want:
                            seen[pred.request_id] = pred
        finally:
            c.close()
        return sorted(seen.values(), key=lambda p: p.ts)

    def judge(self, predictions: list, grace_s: float | None = None):
        """Every prediction judged (sample 1.0) once the raw log holds what the stream accepted."""
        from freshet.training.consistency import ServedConsistency

        checker = ServedConsistency(self.settings, self.registry, sample=1.0, grace_s=grace_s, settle_s=0.0)
        for pred in predictions:
            checker.offer(pred)
        checker.judge_due(now=float("inf"))
        return checker


def _before_boundary(produced_at: float) -> bool:
    """Whether the stream's clock is still short of the next minute (a slide boundary of every
    example window) with a second to spare: the round's newest event is NEWEST_AT past a minute
    and the clock runs at the wall clock's rate from when it was applied, after `produced_at`."""
    return NEWEST_AT + (time.time() - produced_at) < 59.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--events", type=int, default=400, help="transactions per round")
    ap.add_argument("--idle", type=int, default=120, help="predictions for idle cards and merchants per round")
    ap.add_argument("--step", type=float, default=450.0, help="simulated seconds between rounds")
    ap.add_argument("--cards", type=int, default=2000)
    ap.add_argument("--merchants", type=int, default=60)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    from freshet.app.stack import EmbeddedStack

    load0 = os.getloadavg()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="freshet-consistency-") as tmp:
        tmp = Path(tmp)
        stack = EmbeddedStack(tmp / "stack")
        endpoints = stack.start()
        try:
            uid = "cb" + os.urandom(3).hex()
            topic = f"{uid}.transactions"
            env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
            settings = load_settings(env, kafka_bootstrap_servers=endpoints.kafka, redis_url=endpoints.redis_url,
                                     data_dir=str(tmp / "data"), topic_deadletter=f"{uid}.deadletter",
                                     topic_predictions=f"{uid}.predictions", kafka_partitions=4)
            extra = {"FRESHET_TRANSACTIONS_TOPIC": topic}
            features.apply(settings, extra_env=extra)
            worker_env = {**env, **settings.to_env(), **extra}
            rounds = Rounds(args.seed, args.rounds, args.events, args.idle, args.step, args.cards, args.merchants)
            with LiveConsistencyRun(settings, topic, worker_env, tmp / "worker.log", f"{uid}-stream") as run:
                played = run.play(rounds)
                predictions = run.logged_predictions()
                checker = run.judge(predictions)
        finally:
            stack.stop()
    summary = checker.rate.summary()
    out = {
        "consistency_rate": summary["consistency_rate"],
        "features_compared": summary["features_compared"],
        "mismatches": list(checker.mismatches)[:50],
        "mismatch_count": sum(c["compared"] - c["matched"] for c in summary["features"].values()),
        "predictions_judged": checker.judged,
        "worst_features": sorted(((f, c["matched"] / c["compared"]) for f, c in summary["features"].items()),
                                 key=lambda fc: fc[1])[:5],
        **played,
        "seconds": round(time.monotonic() - started, 1),
        "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "args": vars(args),
    }
    print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
