"""`freshet demo`: the whole system on the embedded stack under a drifting workload, with a report.

Owns the demo's timeline (stack, component processes, traffic, first model, drift), the
client-side measurements (freshness, API latency, error rates) and the live progress line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from freshet.settings import DEFAULT_MODEL_NAME, Settings

# Defaults a bare `freshet demo` runs with: about 4 minutes of traffic after ~30 s of
# start-up, so the whole run (report included) stays within 5 minutes on 2 cores.
DEFAULT_MINUTES = 3.5
DEFAULT_RATE = 200.0          # events per wall second; the stream worker does ~500-1000/s here
DEFAULT_TIME_SCALE = 10.0     # simulated seconds per wall second: a 30 s label delay is 3 s
DEFAULT_CARDS = 10_000        # simulated rate / cards = 0.002/s keeps velocity a fraud signal
DEFAULT_DRIFT = ("covariate@1.5", "concept@2.5")
RUNS_KEPT = 5                 # earlier run directories kept under <data dir>/demo
STREAM_APP_ID = "freshet-stream"
MODEL = DEFAULT_MODEL_NAME
VISIBLE_TIMEOUT_S = 30.0      # an event not visible in Redis by then counts as not visible
MAX_IN_FLIGHT = 32            # concurrent /predict requests of the demo's client


# The installed console script, as a user would run it; `python -m freshet.cli` otherwise.
_SCRIPT = Path(sys.executable).with_name("freshet")
FRESHET = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "freshet.cli"]


# Components whose Kafka reads need no sub-second latency poll the broker less often: on the
# embedded broker every waiting fetch costs CPU (one idle consumer of 28 partitions: ~17% of
# a core at 20 ms, ~5% at 100 ms, measured here), CPU the stream worker needs for freshness.
RELAXED_FETCH = ("serve", "monitor", "retrain", "bootstrap")
RELAXED_FETCH_MS = 200


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why and what to do."""


# --- the plan -----------------------------------------------------------------------------

@dataclass(frozen=True)
class DemoDrift:
    """A drift injection at a minute of traffic (wall clock, from the first event).

    >>> DemoDrift.parse("concept@2.5")
    DemoDrift(kind='concept', minute=2.5)
    >>> DemoDrift.parse("covariate@90s").minute
    1.5
    """

    kind: str
    minute: float

    @classmethod
    def parse(cls, text: str) -> "DemoDrift":
        """"KIND@MINUTE": a number of traffic minutes, or with an s/m/h suffix (DriftSpecError if not)."""
        from freshet.demo.workload import read_drift

        return cls(*read_drift(text, unit="m"))

    def sim_seconds(self, time_scale: float) -> float:
        return self.minute * 60.0 * time_scale


@dataclass(frozen=True)
class DemoPlan:
    minutes: float = DEFAULT_MINUTES
    rate: float = DEFAULT_RATE
    seed: int = 0
    drift: tuple[DemoDrift, ...] = ()
    time_scale: float = DEFAULT_TIME_SCALE
    cards: int = DEFAULT_CARDS
    predict_share: float = 1.0
    bootstrap_labels: int = 1000  # labelled transactions before the first model is asked for
    http_port: int = 0
    kafka_port: int = 0
    redis_port: int = 0

    @property
    def traffic_s(self) -> float:
        return self.minutes * 60.0

    def check(self) -> None:
        """Raise DemoError naming the option to change, before anything starts."""
        from freshet.app.stack import port_in_use

        for name, flag, port in (("HTTP API", "--http-port", self.http_port),
                                 ("Kafka broker", "--kafka-port", self.kafka_port),
                                 ("Redis", "--redis-port", self.redis_port)):
            if port and port_in_use(port):
                raise DemoError(f"port {port} for the {name} is in use; pick another ({flag}) or 0 for a free one")
        for d in self.drift:
            if d.minute >= self.minutes:
                raise DemoError(f"drift {d.kind}@{d.minute:g} is at or after the end of traffic "
                                f"(--minutes {self.minutes:g}); inject it earlier or run longer")

    def public(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["drift"] = [f"{d.kind}@{d.minute:g}" for d in self.drift]
        return out


# --- run directories ----------------------------------------------------------------------

class RunDirectory:
    """A fresh directory per demo run under <data dir>/demo, so nothing of an earlier run
    (stack.json, Feast registry, MLflow database, offline logs, topics) can leak into this one.

    A lock file keeps two demos from sharing a data dir; stacks an earlier, killed demo left
    running are stopped; only the newest runs are kept.
    """

    def __init__(self, data_dir: Path):
        self.base = data_dir / "demo"
        self.path: Path | None = None
        self._lock = None
        self.notes: list[str] = []

    def create(self) -> Path:
        from freshet.app.stack import EmbeddedStack

        try:
            self.base.mkdir(parents=True, exist_ok=True)
            lock = open(self.base / ".lock", "a+")  # noqa: SIM115 - held for the whole run
        except OSError as exc:
            raise DemoError(f"cannot write the demo's data dir {self.base}: {exc}; pass --data-dir") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "?"
            raise DemoError(f"another freshet demo (pid {owner}) is running with data dir {self.base.parent}; "
                            "wait for it or pass another --data-dir") from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock = lock
        for old in self.runs():
            stack = EmbeddedStack(old)
            if stack.status() is not None:  # left by a demo that was killed: nobody else owns it
                stack.stop()
                self.notes.append(f"stopped the embedded stack an earlier demo left running in {old}")
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = self.base / f"run-{stamp}"
        n = 1
        while path.exists():
            n += 1
            path = self.base / f"run-{stamp}-{n}"
        (path / "logs").mkdir(parents=True)
        self.path = path
        for old in self.runs()[:-RUNS_KEPT]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def runs(self) -> list[Path]:
        return sorted(p for p in self.base.glob("run-*") if p.is_dir())

    def link_latest(self) -> None:
        """<data dir>/demo/latest -> this run (replaced atomically)."""
        if self.path is None:
            return
        tmp = self.base / f".latest-{os.getpid()}"
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(self.path.name)
            os.replace(tmp, self.base / "latest")

    def release(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock, fcntl.LOCK_UN)
                self._lock.close()
            self._lock = None


# --- component processes ------------------------------------------------------------------

@dataclass
class Component:
    """One freshet subcommand running as a child process of the demo."""

    name: str
    proc: subprocess.Popen
    log_path: Path
    required: bool
    started: float = field(default_factory=time.time)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join("    " + line for line in text[-lines:])


def _child_setup() -> None:
    """In each component, before exec: die with the demo, and take SIGINT again (a background
    shell job inherits it ignored; the demo stops the producer with SIGINT)."""
    from freshet.app.stack import _die_with_parent as die

    die()
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_components(components: list[Component], grace: float = 10.0,
                    hurry: threading.Event | None = None, first_signal: int = signal.SIGTERM) -> list[str]:
    """Signal every running component, wait up to `grace` s in all, then SIGKILL the rest."""
    killed = []
    for c in components:
        if c.running:
            with contextlib.suppress(ProcessLookupError):
                c.proc.send_signal(first_signal)
    deadline = time.monotonic() + grace
    for c in components:
        while c.running and time.monotonic() < deadline and not (hurry and hurry.is_set()):
            time.sleep(0.05)
        if c.running:
            with contextlib.suppress(ProcessLookupError):
                c.proc.kill()
            killed.append(c.name)
        with contextlib.suppress(subprocess.TimeoutExpired):
            c.proc.wait(timeout=5)
    return killed


# --- what the demo records -----------------------------------------------------------------

class DemoRecord:
    """Everything measured during a run, as plain columns the report reads (and data.json keeps).

    Times `t` are wall seconds since the first event was produced (negative during set-up).
    Appends come from several threads; list.append is atomic under the GIL.
    """

    def __init__(self) -> None:
        self.t0: float | None = None          # epoch of the first produced event
        self.launched = time.time()
        self.meta: dict[str, Any] = {}
        self.problems: list[str] = []
        self.samples: list[dict[str, Any]] = []
        self.freshness: dict[str, list] = {"t": [], "first_ms": [], "all_ms": []}
        self.not_visible = 0
        self.unresolved = 0                   # still waited for when the client stopped
        self.transactions_read = 0            # messages on the transactions topic the client saw
        self.predictions: dict[str, list] = {"t": [], "tx": [], "version": [], "score": [], "label": [],
                                             "latency_ms": [], "sim_s": []}
        self.prediction_failures: Counter = Counter()
        self.failure_examples: dict[str, str] = {}
        self.unscored: Counter = Counter()
        self.events: dict[str, list] = {"sim_s": [], "amount": []}
        self.features: dict[str, Any] = {"names": [], "t": [], "version": [], "values": []}
        self.labels: dict[str, int] = {}
        self.label_rows: list[tuple] = []     # (tx, card, merchant, event_ts, label) for a first model
        self.amounts: dict[str, float] = {}   # tx -> amount, early events only (first model)
        self.detector: dict[str, Any] = {"t": [], "stats": [], "source": ""}
        self.alerts: list[dict[str, Any]] = []
        self.retrains: list[dict[str, Any]] = []
        self.model_events: list[dict[str, Any]] = []
        self.model_versions: list[dict[str, Any]] = []
        self.bad_messages: Counter = Counter()

    def rel(self, epoch: float) -> float:
        return round(epoch - (self.t0 if self.t0 is not None else self.launched), 4)

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def to_dict(self) -> dict[str, Any]:
        preds = self.predictions
        truth = [self.labels.get(tx) for tx in preds["tx"]]
        return {
            "meta": {**self.meta, "t0": self.t0, "launched": self.launched},
            "problems": self.problems,
            "samples": [{"t": self.rel(x["at"]), **x} for x in self.samples],
            "freshness": {**self.freshness, "not_visible": self.not_visible, "unresolved": self.unresolved,
                          "transactions_read": self.transactions_read},
            "predictions": {k: v for k, v in preds.items() if k != "tx"} | {"truth": truth},
            "prediction_failures": dict(self.prediction_failures),
            "failure_examples": self.failure_examples,
            "unscored": dict(self.unscored),
            "events": self.events,
            "features": self.features,
            "labels_seen": len(self.labels),
            "fraud_labels": sum(self.labels.values()),
            "detector": self.detector,
            "alerts": self.alerts,
            "retrains": self.retrains,
            "model_events": self.model_events,
            "model_versions": self.model_versions,
            "bad_messages": dict(self.bad_messages),
        }


# --- observing Kafka ------------------------------------------------------------------------

class KafkaTap(threading.Thread):
    """Reads what a user of the system could watch on Kafka: every transaction and label,
    drift alerts, retraining requests and model events (assigned partitions, no group join)."""

    def __init__(self, settings: Settings, topic: str, record: DemoRecord, probe: "ClientProbe",
                 start_ts: float):
        super().__init__(name="freshet-demo-tap", daemon=True)
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        from freshet import kafka

        self.settings = settings
        self.topic = topic
        self.record = record
        self.probe = probe
        self.start_ts = start_ts
        self.stop_event = threading.Event()
        group = f"freshet-demo-{uuid.uuid4().hex[:8]}"
        # Tansu answers an empty fetch only after the full fetch wait, and every waiting fetch
        # costs it CPU (~9% of a core per consumer of 28 partitions at 20 ms, measured here):
        # only the transactions, where the wait adds to measured freshness, get the short wait.
        self.events = kafka.consumer(settings, group)
        self.control = kafka.consumer(settings, group, **{"fetch.wait.max.ms": 250})
        control = [settings.topic_labels, settings.topic_drift, settings.topic_retrain, settings.topic_models]
        meta = self.events.list_topics(timeout=10).topics
        self.events.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta[topic].partitions])
        self.control.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t in control for p in meta[t].partitions])
        self.transactions = 0
        self.last_control = time.monotonic()  # when a label, alert or model event was last read

    def finish(self, quiet_s: float = 2.0, limit_s: float = 15.0) -> None:
        """Stop once the control topics have been quiet for `quiet_s` (the producer's last
        labels, the retrainer's last events), or after `limit_s`."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline and time.monotonic() - self.last_control < quiet_s:
            time.sleep(0.1)
        self.stop_event.set()
        self.join(timeout=5)

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                control = self.control.consume(1000, 0)
                if control:
                    self.last_control = time.monotonic()
                msgs = self.events.consume(1000, 0.05) + control
                if not msgs:
                    continue
                txs = []
                for m in msgs:
                    if m.error():
                        continue
                    topic = m.topic()
                    try:
                        if topic == self.topic:
                            tx = self._transaction(m)
                            if tx is not None:
                                txs.append(tx)
                        elif topic == self.settings.topic_labels:
                            self._label(m.value())
                        else:
                            self._control(topic, m.value())
                    except (ValueError, KeyError, TypeError) as exc:
                        self.record.bad_messages[topic] += 1
                        if self.record.bad_messages[topic] == 1:
                            self.record.problem(f"a message on {topic} could not be read: {exc}")
                if txs:
                    self.probe.submit(txs)
        finally:
            self.events.close()
            self.control.close()

    def _transaction(self, m) -> tuple | None:
        rec = self.record
        created = m.timestamp()[1] / 1000.0
        if rec.t0 is None:
            rec.t0 = created
        try:
            e = orjson.loads(m.value())
            tx, card, merchant = e["transaction_id"], e["card_id"], e["merchant_id"]
            amount, event_ts = float(e["amount"]), float(e["event_ts"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            rec.bad_messages["malformed transactions"] += 1  # the stream dead-letters these
            return None
        self.transactions += 1
        rec.transactions_read = self.transactions
        rec.events["sim_s"].append(round(event_ts - self.start_ts, 3))
        rec.events["amount"].append(amount)
        if len(rec.amounts) < 200_000:
            rec.amounts[tx] = amount
        return (tx, card, merchant, amount, event_ts, created)

    def _label(self, raw: bytes) -> None:
        d = orjson.loads(raw)
        tx, label = d.get("request_id"), d.get("label")
        if tx is None or label is None:
            raise ValueError("label without request_id or label")
        self.record.labels[tx] = int(label)
        ents = d.get("entities") or {}
        if len(self.record.label_rows) < 200_000:
            self.record.label_rows.append((tx, ents.get("card_id"), ents.get("merchant_id"),
                                           d.get("event_ts"), int(label)))

    def _control(self, topic: str, raw: bytes) -> None:
        from freshet.contracts import DriftAlert, ModelEvent, RetrainRequest

        rec, now = self.record, time.time()
        if topic == self.settings.topic_drift:
            a = DriftAlert.decode(raw)
            rec.alerts.append({"t": rec.rel(now), "t_alert": rec.rel(float(a.ts)), "alert_id": a.alert_id,
                               "model": a.model, "model_version": str(a.model_version), "kind": a.kind,
                               "subject": a.subject, "detector": a.detector, "statistic": a.statistic,
                               "threshold": a.threshold})
        elif topic == self.settings.topic_retrain:
            r = RetrainRequest.decode(raw)
            rec.retrains.append({"t": rec.rel(now), "request_id": r.request_id, "model": r.model,
                                 "reason": list(r.reason)})
        elif topic == self.settings.topic_models:
            e = ModelEvent.decode(raw)
            rec.model_events.append({"t": rec.rel(now), "model": e.model, "version": str(e.version),
                                     "stage": e.stage, "metrics": e.metrics})


# --- the client: freshness probe and prediction traffic --------------------------------------

@dataclass(slots=True)
class _Tracked:
    tx: str
    keys: list[tuple[bytes, bytes]]  # (entity key, ts field) per view
    seen: list[float | None]
    entities: dict[str, str]
    amount: float
    event_ts: float
    created: float
    predict: bool


class ClientProbe(threading.Thread):
    """The demo's client, in one asyncio loop.

    Freshness: each produced event is watched in Redis (one pipelined round trip every
    ~10 ms for all events in flight) until every view on its topic shows an event time at
    or past its own; freshness = first time seen - the Kafka timestamp the producer set.
    Predictions: once its features are visible, a transaction is scored over HTTP like a
    payment gateway would, and the client-side latency is recorded.
    """

    def __init__(self, settings: Settings, registry, topic: str, api_url: str, token: str,
                 record: DemoRecord, plan: DemoPlan, start_ts: float):
        super().__init__(name="freshet-demo-client", daemon=True)
        from freshet.redis_layout import OnlineLayout

        self.settings = settings
        self.views = [v for v in registry.views_by_topic().get(topic, []) if v.online]
        self.layout = OnlineLayout(registry.project, registry.views)
        self.api_url = api_url.rstrip("/")
        self.token = token
        self.record = record
        self.plan = plan
        self.start_ts = start_ts
        self.model_ready = threading.Event()
        self.stop_event = threading.Event()
        self._inbox: deque = deque()
        self.pending: list[_Tracked] = []
        self.in_flight = 0
        self._rng = __import__("random").Random(plan.seed)
        self.error: str = ""

    def submit(self, txs: list[tuple]) -> None:
        self._inbox.append(txs)

    @property
    def backlog(self) -> int:
        return len(self.pending) + sum(len(x) for x in list(self._inbox))

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as exc:  # noqa: BLE001 - reported in the summary, the demo goes on
            self.error = f"the demo's client failed: {exc!r}"
            self.record.problem(self.error + "\n" + traceback.format_exc(limit=5))

    async def _main(self) -> None:
        import aiohttp
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(self.settings.redis_url, socket_timeout=5)
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=MAX_IN_FLIGHT),
                                        timeout=aiohttp.ClientTimeout(total=10))
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        tasks: set[asyncio.Task] = set()
        try:
            while not self.stop_event.is_set() or (self.pending and not self._hurry):
                tick = time.monotonic()
                self._take_inbox()
                if self.pending:
                    await self._poll(client, session, headers, tasks)
                # ~10 ms between polls; longer when a poll itself was slow (a big backlog)
                await asyncio.sleep(max(0.01, 2 * (time.monotonic() - tick)))
            if tasks:
                await asyncio.wait(tasks, timeout=10)
        finally:
            self.record.unresolved = self.backlog
            await session.close()
            await client.aclose()

    _hurry = False

    def finish(self, hurry: bool = False) -> None:
        self._hurry = hurry
        self.stop_event.set()

    def _take_inbox(self) -> None:
        layout, views = self.layout, self.views
        while self._inbox:
            for tx, card, merchant, amount, event_ts, created in self._inbox.popleft():
                ents = {"card_id": card, "merchant_id": merchant}
                keys = []
                for v in views:
                    if all(k in ents for k in v.join_keys):
                        keys.append((layout.entity_key(v.name, tuple(ents[k] for k in v.join_keys)),
                                     layout.ts_field(v.name)))
                predict = self._rng.random() < self.plan.predict_share
                self.pending.append(_Tracked(tx, keys, [None] * len(keys), ents, amount, event_ts,
                                             created, predict))

    async def _poll(self, client, session, headers, tasks: set) -> None:
        from freshet.redis_layout import decode_timestamp

        # one HGET per distinct entity row, however many of its events wait: a backlog after a
        # stall must not turn the probe into the busiest Redis client on the machine
        wanted: dict[tuple[bytes, bytes], None] = {}
        for item in self.pending:
            for i, key in enumerate(item.keys):
                if item.seen[i] is None:
                    wanted[key] = None
        rows = list(wanted)
        if rows:
            pipe = client.pipeline(transaction=False)
            for key, ts_field in rows:
                pipe.hget(key, ts_field)
            replies = await pipe.execute()
        else:
            replies = []
        now = time.time()
        stamps = {row: decode_timestamp(raw) for row, raw in zip(rows, replies)}
        for item in self.pending:
            for i, key in enumerate(item.keys):
                if item.seen[i] is None:
                    ts = stamps.get(key)
                    if ts is not None and ts >= item.event_ts - 1e-6:
                        item.seen[i] = now
        rec = self.record
        still = []
        for item in self.pending:
            done = all(s is not None for s in item.seen)
            if not done and now - item.created < VISIBLE_TIMEOUT_S:
                still.append(item)
                continue
            if done and item.seen:
                rec.freshness["t"].append(rec.rel(item.created))
                rec.freshness["first_ms"].append(round((item.seen[0] - item.created) * 1000, 2))
                rec.freshness["all_ms"].append(round((max(item.seen) - item.created) * 1000, 2))
            else:
                rec.not_visible += 1
            if item.predict:
                if not self.model_ready.is_set():
                    rec.unscored["no model served yet"] += 1
                elif self.in_flight >= MAX_IN_FLIGHT:
                    rec.unscored["client at its concurrency limit"] += 1
                else:
                    task = asyncio.get_running_loop().create_task(self._predict(session, headers, item))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        self.pending = still

    async def _predict(self, session, headers, item: _Tracked) -> None:
        import aiohttp

        rec = self.record
        # request_id: the transaction id, so labels join predictions (if serving honours it)
        body = orjson.dumps({"entities": item.entities, "fields": {"amount": item.amount},
                             "request_id": item.tx})
        self.in_flight += 1
        started = time.perf_counter()
        try:
            async with session.post(self.api_url + "/predict", data=body, headers=headers) as resp:
                payload = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            status, payload = type(exc).__name__, str(exc).encode()
        finally:
            self.in_flight -= 1
        latency_ms = (time.perf_counter() - started) * 1000
        now = time.time()
        if status != 200:
            key = str(status)
            rec.prediction_failures[key] += 1
            rec.failure_examples.setdefault(key, payload[:300].decode(errors="replace"))
            return
        doc = orjson.loads(payload)
        version = str(doc.get("model_version"))
        p = rec.predictions
        p["t"].append(rec.rel(now))
        p["tx"].append(item.tx)
        p["version"].append(version)
        p["score"].append(round(float(doc.get("score", math.nan)), 5))
        p["label"].append(_as_int(doc.get("label")))
        p["latency_ms"].append(round(latency_ms, 3))
        p["sim_s"].append(round(item.event_ts - self.start_ts, 3))
        features = doc.get("features") or {}
        self._keep_features(rec, now, version, features)

    @staticmethod
    def _keep_features(rec: DemoRecord, now: float, version: str, features: dict) -> None:
        f = rec.features
        if not f["names"]:
            numeric = [n for n, v in features.items() if isinstance(v, (int, float)) or v is None]
            # amount-derived features are what covariate drift moves; keep a dozen of them
            f["names"] = sorted(numeric, key=lambda n: ("amount" not in n, n))[:12]
        if len(f["t"]) < 100_000:
            f["t"].append(rec.rel(now))
            f["version"].append(version)
            f["values"].append([features.get(n) for n in f["names"]])


def _as_int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


# --- the demo --------------------------------------------------------------------------------

class Demo:
    """One run of `freshet demo`: set up, traffic, shutdown, report."""

    def __init__(self, plan: DemoPlan, settings: Settings):
        self.plan = plan
        self.base_settings = settings
        self.record = DemoRecord()
        self.runs = RunDirectory(settings.data_path)
        self.components: list[Component] = []
        self.producer: Component | None = None
        self.bootstrap: Component | None = None
        self.stack = None
        self.tap: KafkaTap | None = None
        self.probe: ClientProbe | None = None
        self.offsets = None
        self.hurry = threading.Event()
        self.interrupted = False
        self.failed = ""
        self.status: dict[str, str] = {}
        self.settings: Settings | None = None
        self.run_dir: Path | None = None
        self._last_print = 0.0
        self._bootstrap_tries = 0
        self._bootstrap_retry_at = 0.0
        self.metrics_url = ""
        self._cpu = CpuShare()
        self._prev_sample: dict[str, Any] | None = None

    # -- output ------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(text, flush=True)

    def _clock(self) -> str:
        t0 = self.record.t0
        if t0 is None:
            return "setup"
        s = max(0, int(time.time() - t0))
        return f"{s // 60}:{s % 60:02d}"

    # -- entry -------------------------------------------------------------------

    def run(self) -> int:
        # SIGINT too: a shell that starts a job in the background sets it to "ignore", which
        # Python then keeps, and Ctrl-C (or a supervisor's SIGINT) would do nothing
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

        def interrupt(signum, frame):
            raise KeyboardInterrupt

        for s in previous:
            signal.signal(s, interrupt)
        summary_paths = None
        try:
            try:
                self._setup()
                self._traffic()
                self._drain()
            except KeyboardInterrupt:
                self.interrupted = True
                self.say(f"\n[{self._clock()}] interrupted: stopping the components and writing what was "
                         "measured so far (Ctrl-C again to hurry)")
            except DemoError as exc:
                self.failed = str(exc)
                self.say(f"\n[{self._clock()}] demo stopped: {exc}")
            except Exception as exc:  # noqa: BLE001 - still clean up and write the report
                self.failed = f"{type(exc).__name__}: {exc}"
                self.record.problem(traceback.format_exc(limit=8))
                self.say(f"\n[{self._clock()}] demo failed: {self.failed}")
            finally:
                signal.signal(signal.SIGINT, lambda *_: self._on_second_interrupt())
                self._shutdown()
                summary_paths = self._report()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for s, h in previous.items():
                signal.signal(s, h)
            self.runs.release()
        if summary_paths is None:
            return 1
        if self.failed:
            return 1
        return 130 if self.interrupted else 0

    def _on_second_interrupt(self) -> None:
        if not self.hurry.is_set():
            self.say("hurrying: killing the remaining processes")
        self.hurry.set()

    # -- set-up ------------------------------------------------------------------

    def _setup(self) -> None:
        from freshet import features, kafka
        from freshet.app.stack import EmbeddedStack, free_port, port_in_use

        plan, rec = self.plan, self.record
        self.run_dir = self.runs.create()
        for note in self.runs.notes:
            self.say(note)
        rec.meta.update(run_dir=str(self.run_dir), plan=plan.public(), started_at=datetime.now().isoformat(),
                        drift=[{"kind": d.kind, "minute": d.minute, "t": d.minute * 60.0} for d in plan.drift],
                        python=sys.version.split()[0], cpus=os.cpu_count())
        self.say(f"freshet demo: {plan.minutes:g} min of card transactions at {plan.rate:g} events/s "
                 f"(x{plan.time_scale:g} simulated time), seed {plan.seed}; drift: "
                 f"{', '.join(f'{d.kind} at {d.minute:g} min' for d in plan.drift) or 'none'}")
        self.say(f"run directory {self.run_dir}")
        if plan.rate > 500:
            self.say(f"note: one stream worker processes about 500-1000 events/s on this machine; at "
                     f"{plan.rate:g}/s freshness will grow as it falls behind")
        for name in ("kafka_bootstrap_servers", "redis_url"):
            if getattr(self.base_settings, name):
                self.say(f"note: FRESHET_{name.upper()} is ignored: the demo runs on its own embedded stack")
        self.status = {name: "started" for name in ("stream", "serve", "monitor", "retrain")}

        if plan.http_port and port_in_use(plan.http_port):
            raise DemoError(f"port {plan.http_port} for the HTTP API is in use; pick another (--http-port) "
                            "or 0 for a free one")
        started = time.monotonic()
        self.stack = EmbeddedStack(self.run_dir, kafka_port=plan.kafka_port, redis_port=plan.redis_port)
        try:
            endpoints = self.stack.start()
        except Exception as exc:  # StackError names the port and the fix
            raise DemoError(str(exc)) from None
        http_port = plan.http_port or free_port()
        token = secrets.token_urlsafe(24)
        repo = features.repo_path(self.base_settings)
        self.settings = dataclasses.replace(
            self.base_settings, kafka_bootstrap_servers=endpoints.kafka, redis_url=endpoints.redis_url,
            data_dir=str(self.run_dir), mlflow_tracking_uri="", http_host="127.0.0.1", http_port=http_port,
            api_token=token, feature_repo=str(repo))
        self.say(f"[setup] embedded stack up in {time.monotonic() - started:.1f}s: kafka {endpoints.kafka}, "
                 f"redis {endpoints.redis_url}")
        rec.meta["endpoints"] = {"kafka": endpoints.kafka, "redis": endpoints.redis_url,
                                 "api": f"http://127.0.0.1:{http_port}"}

        started = time.monotonic()
        self.say("[setup] registering feature_repo/ in the Feast registry (feast apply, ~15 s)")
        features.apply(self.settings)
        registry = features.load_registry(self.settings)
        self.registry = registry
        card_views = [v for v in registry.views.values() if "card_id" in v.join_keys]
        if not card_views:
            raise DemoError("feature_repo/ has no view keyed by card_id; the demo's workload needs the "
                            "example card-transaction views")
        self.topic = card_views[0].topic
        s = self.settings
        kafka.ensure_topics(s, [self.topic, s.topic_deadletter, s.topic_predictions, s.topic_labels,
                                s.topic_drift, s.topic_retrain, s.topic_models])
        self.say(f"[setup] {len(registry.views)} stream feature views applied in {time.monotonic() - started:.1f}s")

        from freshet.app.commands import create_model_store

        create_model_store(self.settings)
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("FRESHET_") or k == "FRESHET_TRANSACTIONS_TOPIC"}
        self.env.update(self.settings.to_env())
        self._start(["stream", "--app-id", STREAM_APP_ID], "stream", required=True)
        self._start(["serve"], "serve", required=True)
        self.metrics_url = ""
        port = free_port()
        self.metrics_url = f"http://127.0.0.1:{port}/metrics"
        self._start(["monitor", "--config", str(self._monitor_config(registry)), "--metrics-port", str(port)],
                    "monitor", required=True)
        # a retraining right after an alert would otherwise train and judge on pre-drift
        # outcomes only: it first waits for about five seconds of new labels
        self._start(["retrain", "--wait-labels", str(max(200, int(plan.rate * 5))), "--wait-max", "15"],
                    "retrain", required=True)
        self._wait_for_stream()

        # simulated time ends about when traffic does, so no event carries a future time
        self.start_ts = time.time() - plan.traffic_s * plan.time_scale
        rec.meta["start_ts"] = self.start_ts
        argv = ["produce", "--topic", self.topic, "--rate", f"{plan.rate:g}", "--duration", f"{plan.traffic_s:g}",
                "--seed", str(plan.seed), "--time-scale", f"{plan.time_scale:g}", "--start-ts",
                f"{self.start_ts:.6f}", "--cards", str(plan.cards)]
        for d in plan.drift:
            argv += ["--drift", f"{d.kind}@{d.sim_seconds(plan.time_scale):g}"]
        self.producer = self._start(argv, "produce", required=True, stdout_name="produce.json")

        self.probe = ClientProbe(self.settings, registry, self.topic, rec.meta["endpoints"]["api"], token,
                                 rec, plan, self.start_ts)
        self.tap = KafkaTap(self.settings, self.topic, rec, self.probe, self.start_ts)
        self.offsets = _OffsetReader(self.settings, self.topic)
        self.probe.start()
        self.tap.start()
        self._api_url = rec.meta["endpoints"]["api"]

    def _monitor_config(self, registry) -> Path:
        """What the demo asks `freshet monitor` to watch, written to <run dir>/monitor.json.

        A demo compresses time: its whole run is a fraction of the 1-hour and 1-day windows,
        so counts, sums, distinct counts, minima and maxima over those windows keep growing
        (or shrinking) as the windows fill and would raise drift alerts with no drift at all.
        The demo watches every feature that is stationary on its time scale (every function
        over windows under a third of the simulated run, means and last values over longer
        ones) plus the request's amount; and it shortens the retraining cooldown to a fifth
        of the run (at most 45 s) so that a drift after an early retraining is still
        answered by a promotion with time left to serve it.
        """
        plan = self.plan
        horizon = plan.traffic_s * plan.time_scale / 3.0
        service = next(iter(registry.feature_services), None)
        refs = registry.feature_services.get(service) or [
            f"{v.name}:{f}" for v in registry.views.values() for f in v.feature_names]
        specs = {f"{v.name}:{a.name}": a for v in registry.views.values() for a in v.aggregations}
        watched = [r for r in refs if r in specs and (specs[r].window_s <= horizon
                                                      or specs[r].function in ("mean", "last"))]
        config = {"seed": plan.seed,
                  "models": [{"model": MODEL, "numeric_features": [*watched, "amount"]}],
                  "policy": {"cooldown_s": round(min(45.0, plan.traffic_s / 5.0), 1), "window_s": 120.0}}
        path = self.run_dir / "monitor.json"
        path.write_bytes(orjson.dumps(config, option=orjson.OPT_INDENT_2))
        self.record.meta["monitor_config"] = config
        skipped = len(refs) - len(watched)
        self.say(f"[setup] monitor watches {len(watched) + 1} inputs ({skipped} long-window counts/sums/extremes "
                 f"left out: they only fill up during a {plan.minutes:g}-minute demo); see monitor.json")
        return path

    def _start(self, argv: list[str], name: str, required: bool, stdout_name: str | None = None) -> Component:
        assert self.run_dir is not None
        env = self.env
        if name in RELAXED_FETCH:
            env = {**env, "FRESHET_KAFKA_FETCH_MAX_WAIT_MS": str(RELAXED_FETCH_MS)}
        log_path = self.run_dir / "logs" / f"{name}.log"
        log = open(log_path, "ab")  # noqa: SIM115 - owned by the child
        out = open(self.run_dir / stdout_name, "wb") if stdout_name else log  # noqa: SIM115
        # own session: a Ctrl-C in the terminal reaches only the demo, which stops children in order;
        # PDEATHSIG: they still die if the demo itself is killed
        proc = subprocess.Popen([*FRESHET, *argv], env=env, stdout=out,
                                stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_child_setup)
        log.close()
        if out is not log:
            out.close()
        c = Component(name, proc, log_path, required)
        if name == "bootstrap":
            self.bootstrap = c
        else:
            self.components.append(c)
        self.say(f"[setup] started {name} (pid {proc.pid}, log {log_path.relative_to(self.run_dir)})"
                 if self.record.t0 is None else
                 f"[{self._clock()}] started {name} (pid {proc.pid}, log logs/{log_path.name})")
        return c

    def _wait_for_stream(self, timeout: float = 90.0) -> None:
        """Traffic starts once the stream worker has joined its group: otherwise freshness
        would measure the worker's start-up, not the system."""
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({**self.settings.kafka_client_config(), "log_level": 0})
        started = time.monotonic()
        self.say("[setup] waiting for the stream worker to join its consumer group ...")
        while time.monotonic() - started < timeout:
            self._check_components()
            try:
                desc = admin.describe_consumer_groups([STREAM_APP_ID])[STREAM_APP_ID].result(timeout=5)
                if str(desc.state).endswith("STABLE"):
                    self.say(f"[setup] stream worker ready after {time.monotonic() - started:.1f}s")
                    return
            except Exception:  # noqa: BLE001 - not there yet
                pass
            time.sleep(0.5)
        self.record.problem(f"the stream worker had not joined its group after {timeout:.0f}s; traffic "
                            "started anyway (early freshness includes its start-up)")

    def _check_components(self) -> None:
        for c in self.components:
            if c.name in self.status and self.status[c.name].startswith("exited"):
                continue
            code = c.proc.poll()
            if code is None or c is self.producer and code == 0:
                continue
            self.status[c.name] = f"exited with code {code}"
            msg = f"{c.name} exited with code {code}; last lines of {c.log_path}:\n{c.tail()}"
            if c.required:
                raise DemoError(msg)
            self.record.problem(msg)
            self.say(f"[{self._clock()}] warning: {msg}")

    # -- traffic -----------------------------------------------------------------

    def _traffic(self) -> None:
        assert self.producer is not None
        next_sample = time.monotonic()
        while self.producer.running:
            self._check_components()
            if self.probe and self.probe.error:
                raise DemoError(self.probe.error)
            if time.monotonic() >= next_sample:
                self._sample()
                self._first_model()
                next_sample += 1.0
                if time.time() - self._last_print >= 5.0:
                    self._progress()
            time.sleep(0.1)
        self._check_components()
        if self.producer.proc.returncode not in (0, None):
            raise DemoError(f"the producer exited with code {self.producer.proc.returncode}; see "
                            f"{self.producer.log_path}:\n{self.producer.tail()}")

    def _sample(self) -> None:
        rec = self.record
        now = time.time()
        produced, processed, deadletter = self.offsets.read() if self.offsets else (0, 0, 0)
        p = rec.predictions
        cpu = self._cpu.sample(self._demo_pids())
        sample = {"at": now, "produced": produced, "cpu_demo": cpu[0], "cpu_other": cpu[1], "cpu_by": cpu[2], "processed": processed, "deadletter": deadletter,
                  "labels": len(rec.labels), "predictions": len(p["t"]),
                  "prediction_errors": sum(rec.prediction_failures.values()),
                  "backlog": self.probe.backlog if self.probe else 0, "load": round(os.getloadavg()[0], 2)}
        rec.samples.append(sample)
        if self.metrics_url:
            self._scrape_monitor(now)
        if not self.probe.model_ready.is_set() and self._model_ready():
            self.probe.model_ready.set()
            self.say(f"[{self._clock()}] the API serves a model: prediction traffic starts")

    def _demo_pids(self) -> dict[str, int]:
        pids = {"demo": os.getpid(), **{c.name: c.proc.pid for c in self.components}}
        if self.bootstrap is not None:
            pids[f"bootstrap-{self.bootstrap.proc.pid}"] = self.bootstrap.proc.pid
        status = self.stack.status() if self.stack is not None else None
        if status is not None:
            pids.update(kafka=status.kafka_pid, redis=status.redis_pid)
        return pids

    def _scrape_monitor(self, now: float) -> None:
        """The monitor service's own detector statistics, from its Prometheus endpoint."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        try:
            with urllib.request.urlopen(self.metrics_url, timeout=1) as resp:
                text = resp.read().decode()
        except Exception:  # noqa: BLE001 - not up yet, or busy: skip this second
            return
        stats = {}
        for family in text_string_to_metric_families(text):
            if family.name == "freshet_monitor_detector_statistic":
                for s in family.samples:
                    if s.labels.get("model") == MODEL and math.isfinite(s.value):
                        stats[s.labels["statistic"]] = round(s.value, 5)
        if stats:
            d = self.record.detector
            d["source"] = "freshet monitor (its /metrics gauges, scraped every second)"
            d["t"].append(self.record.rel(now))
            d["stats"].append(stats)

    def _model_ready(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(self._api_url + "/ready", timeout=2) as resp:
                return resp.status == 200
        except Exception:  # noqa: BLE001 - 503 until a model is loaded, or not up yet
            return False

    def _first_model(self) -> None:
        """Train the first model once enough labelled traffic exists (`freshet retrain --bootstrap`)."""
        rec = self.record
        if self.bootstrap is not None:
            if not self.bootstrap.running and "bootstrap" not in self.status:
                code = self.bootstrap.proc.returncode
                if code == 0:
                    self.status["bootstrap"] = "freshet retrain --bootstrap: ok"
                    self.say(f"[{self._clock()}] first model trained by 'freshet retrain --bootstrap'")
                elif code == 1 and self._bootstrap_tries < 3:
                    # not enough labelled data joined yet: ask again a little later
                    self.say(f"[{self._clock()}] 'freshet retrain --bootstrap' found too little labelled "
                             "data; retrying in 5 s")
                    self._bootstrap_tries += 1
                    self._bootstrap_retry_at = time.monotonic() + 5.0
                    self.bootstrap = None
                else:
                    self.status["bootstrap"] = f"freshet retrain --bootstrap exited with code {code}"
                    msg = (f"'freshet retrain --bootstrap' exited with code {code}: no model to serve, so no "
                           f"predictions. Last lines of {self.bootstrap.log_path}:\n{self.bootstrap.tail()}")
                    rec.problem(msg)
                    self.say(f"[{self._clock()}] warning: {msg}")
            return
        if len(rec.labels) < self.plan.bootstrap_labels or not self._processed_any():
            return
        if time.monotonic() < self._bootstrap_retry_at:
            return
        rec.meta.setdefault("bootstrap_t", rec.rel(time.time()))
        self.say(f"[{self._clock()}] {len(rec.labels):,} labelled transactions: training the first model")
        self._start(["retrain", "--bootstrap"], "bootstrap", required=False)

    def _processed_any(self) -> bool:
        return bool(self.record.samples and self.record.samples[-1]["processed"] > 0)

    def _progress(self) -> None:
        self._last_print = time.time()
        rec = self.record
        s = rec.samples[-1] if rec.samples else None
        if s is None:
            return
        window = [x for x in rec.samples if x["at"] >= s["at"] - 5.0]
        dt = max(window[-1]["at"] - window[0]["at"], 1e-9)
        now_t = rec.rel(s["at"])
        in_rate = (window[-1]["produced"] - window[0]["produced"]) / dt
        out_rate = (window[-1]["processed"] - window[0]["processed"]) / dt
        recent = [ms for t, ms in zip(rec.freshness["t"][-3000:], rec.freshness["all_ms"][-3000:]) if t >= now_t - 10]
        lat = [ms for t, ms in zip(rec.predictions["t"][-3000:], rec.predictions["latency_ms"][-3000:])
               if t >= now_t - 10]
        versions = sorted(set(rec.predictions["version"][-500:]), key=_version_key)
        promotions = [e for e in rec.model_events if e["stage"] == "champion"]
        drift_next = [d for d in self.plan.drift if d.minute * 60 > now_t]
        parts = [f"[{self._clock()}]",
                 f"events {s['processed']:,} ({in_rate:,.0f}/s in, {out_rate:,.0f}/s processed)",
                 f"freshness p50 {_pct(recent, 50)} p99 {_pct(recent, 99)}",
                 f"API p99 {_pct(lat, 99)}",
                 f"model {'v' + '/v'.join(versions) if versions else '-'}",
                 f"alerts {len(rec.alerts)}", f"retrains {len(rec.retrains)}", f"promotions {len(promotions)}"]
        if drift_next:
            d = drift_next[0]
            parts.append(f"| {d.kind} drift at {int(d.minute * 60) // 60}:{int(d.minute * 60) % 60:02d}")
        self.say("  ".join(parts))

    # -- end ---------------------------------------------------------------------

    def _drain(self) -> None:
        """After the last event: let the stream, the client and the labels catch up (bounded)."""
        rec = self.record
        self.say(f"[{self._clock()}] traffic done; waiting for the stream and the client to catch up")
        # at most a minute, and only while the stream still makes progress
        deadline = time.monotonic() + 60.0
        progress_at, last = time.monotonic(), -1
        while time.monotonic() < deadline and time.monotonic() - progress_at < 10.0:
            self._check_components()
            self._sample()
            s = rec.samples[-1]
            sent = (_produce_summary(self.run_dir) or {}).get("sent", s["produced"])
            if s["processed"] >= max(sent, s["produced"]) and (self.probe is None or self.probe.backlog == 0):
                break
            if s["processed"] > last:
                progress_at, last = time.monotonic(), s["processed"]
            time.sleep(1.0)
            if time.time() - self._last_print >= 5.0:
                self._progress()
        time.sleep(2.0)  # last labels, alerts and model events
        self._sample()

    def _shutdown(self) -> None:
        rec = self.record
        if self.producer is not None and self.producer.running:
            # SIGINT: the producer publishes the labels still pending and prints its summary
            stop_components([self.producer], grace=15.0, hurry=self.hurry, first_signal=signal.SIGINT)
        if self.tap is not None:  # first: what the tap read last still reaches the client's count
            if self.hurry.is_set() or self.interrupted:
                self.tap.stop_event.set()
                self.tap.join(timeout=5)
            else:  # the labels the producer published on its way out
                self.tap.finish()
        if self.probe is not None:
            self.probe.finish(hurry=True)
            self.probe.join(timeout=10)
        if self.settings is not None and self.run_dir is not None:
            rec.model_versions = _registered_versions(self.settings)
        rest = [c for c in [self.bootstrap, *self.components] if c is not None]
        killed = stop_components(rest[::-1], grace=10.0, hurry=self.hurry)
        if killed:
            rec.problem(f"killed after 10 s without stopping: {', '.join(killed)}")
        if self.stack is not None:
            self.stack.stop()
        if self.offsets is not None:
            self.offsets.close()
        left = [f"{c.name} (pid {c.proc.pid})" for c in rest + ([self.producer] if self.producer else [])
                if c.proc.poll() is None]
        if left:
            rec.problem(f"processes still running after shutdown: {', '.join(left)}")
        self.say(f"[{self._clock()}] all demo processes stopped" if not left else
                 f"warning: still running: {', '.join(left)}")

    def _report(self) -> tuple[Path, dict] | None:
        from freshet.demo import report

        rec = self.record
        if self.run_dir is None:
            return None
        for c in self.components:
            if c.name in self.status and not self.status[c.name].startswith(("exited", "missing")):
                self.status[c.name] = "ran"
        rec.meta.update(components=self.status, interrupted=self.interrupted, failed=self.failed,
                        ended_at=datetime.now().isoformat(), produce=_produce_summary(self.run_dir),
                        start_ts=getattr(self, "start_ts", None))
        try:
            html_path, summary = report.write_report(rec.to_dict(), self.run_dir)
        except Exception as exc:  # noqa: BLE001 - the data is still on disk
            data = self.run_dir / "data.json"
            data.write_bytes(orjson.dumps(rec.to_dict(), option=orjson.OPT_SERIALIZE_NUMPY))
            self.say(f"could not write the report ({exc}); the measurements are in {data}")
            traceback.print_exc()
            return None
        self.runs.link_latest()
        self.say("")
        self.say(report.headline(summary))
        self.say(f"\nreport  {html_path}\nsummary {self.run_dir / 'summary.json'}\nlogs    {self.run_dir / 'logs'}")
        return html_path, summary


class CpuShare:
    """CPU used since the last sample, in cores: per demo process, by all of them, and by the
    rest of the machine (other users' work competes with the demo and inflates its latencies)."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK")
        self.last: tuple[float, float, dict[str, float]] | None = None

    @staticmethod
    def _busy_total() -> float:
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0.0)  # minus idle, iowait

    @staticmethod
    def _ticks(pid: int) -> float | None:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return float(f[11]) + float(f[12])
        except (OSError, IndexError, ValueError):
            return None

    def sample(self, pids: dict[str, int]) -> tuple[float | None, float | None, dict[str, float]]:
        now = time.monotonic()
        try:
            busy = self._busy_total()
        except OSError:
            return None, None, {}
        ticks = {name: t for name, pid in pids.items() if (t := self._ticks(pid)) is not None}
        last, self.last = self.last, (now, busy, ticks)
        if last is None or now <= last[0]:
            return None, None, {}
        dt = (now - last[0]) * self.tick
        # processes that started or ended between samples count from their next full interval
        per = {name: round(max(0.0, (t - last[2][name]) / dt), 3) for name, t in ticks.items() if name in last[2]}
        demo = sum(per.values())
        other = max(0.0, (busy - last[1]) / dt - demo)
        return round(demo, 3), round(other, 3), per


class _OffsetReader:
    """Produced (high watermarks), processed (the stream group's committed offsets) and
    dead-lettered event counts, read from the broker without joining any group."""

    def __init__(self, settings: Settings, topic: str):
        from confluent_kafka import TopicPartition

        from freshet import kafka

        self.c = kafka.consumer(settings, STREAM_APP_ID)  # never subscribes: only reads its offsets
        meta = self.c.list_topics(timeout=10).topics
        self.tps = [TopicPartition(topic, p) for p in meta[topic].partitions]
        self.dl = [TopicPartition(settings.topic_deadletter, p) for p in meta[settings.topic_deadletter].partitions]
        self.last = (0, 0, 0)

    def read(self) -> tuple[int, int, int]:
        values = list(self.last)
        reads = (lambda: sum(max(tp.offset, 0) for tp in self.c.committed(self.tps, timeout=2)),
                 lambda: sum(self.c.get_watermark_offsets(tp, timeout=2)[1] for tp in self.tps),
                 lambda: sum(self.c.get_watermark_offsets(tp, timeout=2)[1] for tp in self.dl))
        # committed first: produced read after it can never be below it (no negative lag)
        for i, read in zip((1, 0, 2), reads):
            try:
                values[i] = read()
            except Exception:  # noqa: BLE001 - keep the last reading; the broker may be busy
                pass
        self.last = (max(values[0], values[1]), values[1], values[2])
        return self.last

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.c.close()


def _registered_versions(settings: Settings) -> list[dict[str, Any]]:
    """Every registered version of the model (promoted or not), from the run's MLflow registry."""
    if not (settings.data_path / "mlflow.db").exists():
        return []
    try:
        from freshet.models import ModelRegistry

        out = []
        for v in ModelRegistry(settings, publish_events=False).versions(MODEL):
            out.append({k: v.get(k) for k in ("version", "stage", "aliases", "created_at", "metrics",
                                                "training_window")})
        return out
    except Exception:  # noqa: BLE001 - the registry may not exist when no model was trained
        return []


def _produce_summary(run_dir: Path) -> dict[str, Any] | None:
    try:
        lines = (run_dir / "produce.json").read_text().strip().splitlines()
        return orjson.loads(lines[-1]) if lines else None
    except (OSError, orjson.JSONDecodeError):
        return None


def _pct(values: list[float], q: float) -> str:
    if not values:
        return "-"
    v = sorted(values)
    x = v[min(len(v) - 1, int(math.ceil(q / 100 * len(v))) - 1)]
    return f"{x:,.0f} ms" if x >= 10 else f"{x:.1f} ms"


def _version_key(v: str) -> tuple:
    return (0, int(v)) if v.isdigit() else (1, v)
