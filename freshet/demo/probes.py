"""The demo's probes: what a user could watch on Kafka (KafkaTap), the client that measures
freshness and scores transactions (ClientProbe), and the once-a-second Sampler (broker, CPU, monitor).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import threading
import time
import traceback
import urllib.request
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import orjson

from freshet.demo.plan import MODEL, DemoPlan
from freshet.demo.processes import STREAM_APP_ID
from freshet.demo.record import DemoRecord
from freshet.endpoints import proc_stat
from freshet.settings import Settings

if TYPE_CHECKING:
    from freshet.features import FeatureRegistry

VISIBLE_TIMEOUT_S = 30.0      # an event not visible in Redis by then counts as not visible
MAX_IN_FLIGHT = 32            # concurrent /predict requests of the demo's client


# --- observing Kafka ------------------------------------------------------------------------

class KafkaTap(threading.Thread):
    """Reads what a user of the system could watch on Kafka: every transaction and label,
    drift alerts, retraining requests and model events (assigned partitions, no group join)."""

    def __init__(self, settings: Settings, topic: str, record: DemoRecord, client: ClientProbe,
                 start_ts: float, from_end: bool = False):
        super().__init__(name="freshet-demo-tap", daemon=True)
        from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, TopicPartition

        from freshet import kafka

        self.settings = settings
        self.topic = topic
        self.record = record
        self.client = client  # gets every transaction read
        self.start_ts = start_ts
        # the embedded broker lists a partition's end inside its last batch, so a tap started at the
        # end of the history still reads that batch's tail: events and labels before start_ts are not live
        self.live_from = start_ts - 1e-3 if from_end else -math.inf
        self.stop_event = threading.Event()
        group = f"freshet-demo-{uuid.uuid4().hex[:8]}"
        # Tansu answers an empty fetch only after the full fetch wait, and every waiting fetch
        # costs it CPU (~9% of a core per consumer of 28 partitions at 20 ms, measured here):
        # only the transactions, where the wait adds to measured freshness, get the short wait.
        self.events = kafka.consumer(settings, group)
        self.control = kafka.consumer(settings, group, **{"fetch.wait.max.ms": 250})
        control = [settings.topic_labels, settings.topic_drift, settings.topic_retrain, settings.topic_models]
        meta = self.events.list_topics(timeout=10).topics
        # from_end: transactions and labels after the history (control topics are read whole)
        start = OFFSET_END if from_end else OFFSET_BEGINNING
        self.events.assign([TopicPartition(topic, p, start) for p in meta[topic].partitions])
        self.control.assign([TopicPartition(t, p, start if t == settings.topic_labels else OFFSET_BEGINNING)
                             for t in control for p in meta[t].partitions])
        self.last_control = time.monotonic()  # when a label, alert or model event was last read

    def finish(self, quiet_s: float = 2.0, limit_s: float = 15.0) -> None:
        """Stop once the control topics have been quiet for `quiet_s` (the producer's last
        labels, the retrainer's last events), or after `limit_s`."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline and time.monotonic() - self.last_control < quiet_s:
            time.sleep(0.1)
        self.stop()

    def stop(self) -> None:
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
                    self.client.submit(txs)
        finally:
            self.events.close()
            self.control.close()

    def _transaction(self, m) -> tuple | None:
        rec = self.record
        created = m.timestamp()[1] / 1000.0
        try:
            e = orjson.loads(m.value())
            tx, card, merchant = e["transaction_id"], e["card_id"], e["merchant_id"]
            amount, event_ts = float(e["amount"]), float(e["event_ts"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            rec.bad_messages["malformed transactions"] += 1  # the stream dead-letters these
            return None
        if event_ts < self.live_from:
            return None
        if rec.t0 is None:
            rec.t0 = created
        rec.transactions_read += 1
        rec.events["sim_s"].append(round(event_ts - self.start_ts, 3))
        rec.events["amount"].append(amount)
        return (tx, card, merchant, amount, event_ts, created)

    def _label(self, raw: bytes) -> None:
        d = orjson.loads(raw)
        tx, label = d.get("request_id"), d.get("label")
        if tx is None or label is None:
            raise ValueError("label without request_id or label")
        if isinstance(d.get("event_ts"), (int, float)) and d["event_ts"] < self.live_from:
            return
        self.record.labels[tx] = int(label)

    def _control(self, topic: str, raw: bytes) -> None:
        from freshet.contracts import DriftAlert, ModelEvent, RetrainRequest

        rec, now = self.record, time.time()
        if topic == self.settings.topic_drift:
            a = DriftAlert.decode(raw)
            rec.alerts.append({"t": rec.rel(now), "at": now, "t_alert": rec.rel(float(a.ts)), "alert_id": a.alert_id,
                               "model": a.model, "model_version": str(a.model_version), "kind": a.kind,
                               "subject": a.subject, "detector": a.detector, "statistic": a.statistic,
                               "threshold": a.threshold})
        elif topic == self.settings.topic_retrain:
            r = RetrainRequest.decode(raw)
            rec.retrains.append({"t": rec.rel(now), "at": now, "request_id": r.request_id, "model": r.model,
                                 "reason": list(r.reason)})
        elif topic == self.settings.topic_models:
            e = ModelEvent.decode(raw)
            rec.model_events.append({"t": rec.rel(now), "at": now, "model": e.model, "version": str(e.version),
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

    def __init__(self, settings: Settings, registry: FeatureRegistry, topic: str, api_url: str, token: str,
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
        self.model_ready = threading.Event()  # set once the API serves a model: scoring starts
        self.stop_event = threading.Event()
        self._inbox: deque = deque()          # batches of transactions from the tap
        self.pending: list[_Tracked] = []     # events not yet visible in every view
        self.in_flight = 0
        self._rng = random.Random(plan.seed)
        self.error: str = ""

    def submit(self, txs: list[tuple]) -> None:
        self._inbox.append(txs)

    @property
    def backlog(self) -> int:
        return len(self.pending) + sum(len(x) for x in list(self._inbox))

    def start_scoring_once_served(self) -> bool:
        """Start prediction traffic once the API serves a model; True the moment it does."""
        if self.model_ready.is_set() or not self._api_ready():
            return False
        self.model_ready.set()
        return True

    def _api_ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.api_url + "/ready", timeout=2) as resp:
                return resp.status == 200
        except Exception:  # noqa: BLE001 - 503 until a model is loaded, or not up yet
            return False

    def stop(self) -> None:
        """Stop at once: events still waited for are counted as unresolved."""
        self.stop_event.set()
        self.join(timeout=10)

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as exc:  # noqa: BLE001 - reported in the summary, the demo goes on
            self.error = f"the demo's client failed: {exc!r}"
            self.record.problem(self.error + "\n" + traceback.format_exc(limit=5))

    async def _main(self) -> None:
        import aiohttp
        from freshet.endpoints import redis_client

        client = redis_client(self.settings, asyncio=True, socket_timeout=5)
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=MAX_IN_FLIGHT),
                                        timeout=aiohttp.ClientTimeout(total=10))
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        tasks: set[asyncio.Task] = set()
        try:
            while not self.stop_event.is_set():
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
        """One round: what Redis shows for the waiting events, then settle the ones done or given up."""
        stamps = await self._event_times(client)
        now = time.time()
        for item in self.pending:
            for i, key in enumerate(item.keys):
                if item.seen[i] is None:
                    ts = stamps.get(key)
                    if ts is not None and ts >= item.event_ts - 1e-6:
                        item.seen[i] = now
        self.pending = [item for item in self.pending if not self._settle(item, now, session, headers, tasks)]

    async def _event_times(self, client) -> dict[tuple[bytes, bytes], float | None]:
        """The event time each view row still waited for shows: one HGET per distinct row, however
        many of its events wait (a backlog after a stall must not turn the probe into the busiest
        Redis client on the machine)."""
        from freshet.redis_layout import decode_timestamp

        rows = list(dict.fromkeys(key for item in self.pending
                                  for i, key in enumerate(item.keys) if item.seen[i] is None))
        if not rows:
            return {}
        pipe = client.pipeline(transaction=False)
        for key, ts_field in rows:
            pipe.hget(key, ts_field)
        replies = await pipe.execute()
        return {row: decode_timestamp(raw) for row, raw in zip(rows, replies)}

    def _settle(self, item: _Tracked, now: float, session, headers, tasks: set) -> bool:
        """Record an event's freshness (or that it never showed) and score it; False while it is
        still waited for."""
        done = all(s is not None for s in item.seen)
        if not done and now - item.created < VISIBLE_TIMEOUT_S:
            return False
        rec = self.record
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
        return True

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


# --- the machine and the broker ---------------------------------------------------------------

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
            f = proc_stat(pid)
            return float(f[11]) + float(f[12])  # utime + stime
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


class OffsetReader:
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


class Sampler:
    """The run's once-a-second sample (DemoRecord.samples): events produced, processed and
    dead-lettered, labels and predictions seen, CPU per process and for the rest of the machine,
    the client's backlog and the load; and the monitor's detector statistics, from its /metrics."""

    def __init__(self, settings: Settings, topic: str, record: DemoRecord, metrics_url: str,
                 pids: Callable[[], dict[str, int]], backlog: Callable[[], int]):
        self.record = record
        self.offsets = OffsetReader(settings, topic)
        self.cpu = CpuShare()
        self.metrics_url = metrics_url
        self.pids = pids          # the processes whose CPU is the demo's
        self.backlog = backlog    # events the client still waits for
        self.base = (0, 0, 0)     # offsets before live traffic (the history's), subtracted

    def rebase(self) -> None:
        """Count from here: what is on the topics now (the history) is not live traffic."""
        self.base = self.offsets.read()

    def sample(self) -> dict[str, Any]:
        rec = self.record
        now = time.time()
        produced, processed, deadletter = (x - b for x, b in zip(self.offsets.read(), self.base))
        cpu_demo, cpu_other, cpu_by = self.cpu.sample(self.pids())
        sample = {"at": now, "produced": produced, "cpu_demo": cpu_demo, "cpu_other": cpu_other,
                  "cpu_by": cpu_by, "processed": processed, "deadletter": deadletter,
                  "labels": len(rec.labels), "predictions": len(rec.predictions["t"]),
                  "prediction_errors": sum(rec.prediction_failures.values()),
                  "backlog": self.backlog(), "load": round(os.getloadavg()[0], 2)}
        rec.samples.append(sample)
        self._scrape_monitor(now)
        return sample

    def _scrape_monitor(self, now: float) -> None:
        """The monitor service's own detector statistics, from its Prometheus endpoint."""
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

    def close(self) -> None:
        self.offsets.close()


def registered_versions(settings: Settings) -> list[dict[str, Any]]:
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
