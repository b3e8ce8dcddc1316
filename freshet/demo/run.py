"""`freshet demo`, the run itself: its timeline (set-up, traffic, drain, shutdown, report), when
the first model is asked for, and the progress line; plan, processes, probes, record live next door.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import secrets
import signal
import sys
import threading
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import orjson

from freshet.demo.plan import DemoError, DemoPlan
from freshet.demo.probes import ClientProbe, KafkaTap, Sampler, registered_versions
from freshet.demo.processes import (
    COMPONENTS, STREAM_APP_ID, Component, RunDirectory, Supervisor, producer_summary,
)
from freshet.demo.record import DemoRecord
from freshet.demo.summary import version_key
from freshet.settings import Settings

if TYPE_CHECKING:
    from freshet.app.stack import EmbeddedStack
    from freshet.features import FeatureRegistry


class Demo:
    """One run of `freshet demo`: set-up, traffic, drain, shutdown and report, in that order.

    The set-up makes the run's parts one after the other (declared below in that order); a
    run stopped early (Ctrl-C, a component that died) shuts down what exists and still reports.
    """

    def __init__(self, plan: DemoPlan, settings: Settings):
        self.plan = plan
        self.base_settings = settings         # the caller's; the run's own point at its embedded stack
        self.record = DemoRecord()
        self.runs = RunDirectory(settings.data_path)
        self.progress = ProgressLine(plan, self.record, self.say)
        self.hurry = threading.Event()        # a second Ctrl-C: kill what is left rather than wait
        self.interrupted = False
        self.failed = ""                      # why the run stopped early, when it failed
        # made by the set-up, in this order; what it did not get to stays None
        self.run_dir: Path | None = None
        self.stack: EmbeddedStack | None = None
        self.settings: Settings | None = None
        self.supervisor: Supervisor | None = None
        self.start_ts: float | None = None    # event time of the first event (simulated clock)
        self.client: ClientProbe | None = None
        self.tap: KafkaTap | None = None
        self.sampler: Sampler | None = None
        self.first_model: FirstModel | None = None

    def say(self, text: str) -> None:
        print(text, flush=True)

    def run(self) -> int:
        """0 when the run completed, 130 when interrupted, 1 when it failed or left no report."""
        reported = False
        try:
            with _signals_interrupt():
                try:
                    self._setup()
                    self._traffic()
                    self._drain()
                    self._judge_consistency()
                except KeyboardInterrupt:
                    self.interrupted = True
                    self.say(f"\n[{self.record.clock()}] interrupted: stopping the components and writing "
                             "what was measured so far (Ctrl-C again to hurry)")
                except DemoError as exc:
                    self.failed = str(exc)
                    self.say(f"\n[{self.record.clock()}] demo stopped: {exc}")
                except Exception as exc:  # noqa: BLE001 - still clean up and write the report
                    self.failed = f"{type(exc).__name__}: {exc}"
                    self.record.problem(traceback.format_exc(limit=8))
                    self.say(f"\n[{self.record.clock()}] demo failed: {self.failed}")
                finally:
                    signal.signal(signal.SIGINT, lambda *_: self._on_second_interrupt())
                    self._shutdown()
                    reported = self._report()
        finally:
            self.runs.release()
        if not reported or self.failed:
            return 1
        return 130 if self.interrupted else 0

    def _on_second_interrupt(self) -> None:
        if not self.hurry.is_set():
            self.say("hurrying: killing the remaining processes")
        self.hurry.set()

    # -- set-up ------------------------------------------------------------------

    def _setup(self) -> None:
        self._open_run_directory()
        self._start_stack()
        registry, topic = self._apply_feature_repo()
        self._start_components(registry)
        self.supervisor.wait_for_stream()
        skip = 0
        if self.plan.warm:
            skip = self._publish_history(registry, topic)
            self._train_first_model()
        else:
            # simulated time ends about when traffic does, so no event carries a future time
            self.start_ts = time.time() - self.plan.traffic_s * self.plan.time_scale
        metrics_url = self._start_monitor(registry)
        self._start_traffic(registry, topic, metrics_url, skip)

    def _open_run_directory(self) -> None:
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
        if self.base_settings.redis_cluster == "on":
            self.say("note: FRESHET_REDIS_CLUSTER=on is ignored: the demo's embedded stack runs one Redis")
        rec.components.update({name: "started" for name in COMPONENTS})  # "ran" or "exited ..." by the end

    def _start_stack(self) -> None:
        """The run's embedded Kafka and Redis, and its settings: pointing at them and the run directory."""
        from freshet import features
        from freshet.app.stack import EmbeddedStack, free_port

        plan = self.plan
        started = time.monotonic()
        self.stack = EmbeddedStack(self.run_dir, kafka_port=plan.kafka_port, redis_port=plan.redis_port)
        try:
            endpoints = self.stack.start()
        except Exception as exc:  # StackError names the port and the fix
            raise DemoError(str(exc)) from None
        http_port = plan.http_port or free_port()
        self.settings = dataclasses.replace(
            self.base_settings, kafka_bootstrap_servers=endpoints.kafka, redis_url=endpoints.redis_url,
            redis_cluster="off", data_dir=str(self.run_dir), mlflow_tracking_uri="", http_host="127.0.0.1", http_port=http_port,
            api_token=secrets.token_urlsafe(24), feature_repo=str(features.repo_path(self.base_settings)))
        self.say(f"[setup] embedded stack up in {time.monotonic() - started:.1f}s: kafka {endpoints.kafka}, "
                 f"redis {endpoints.redis_url}")
        self.say(f"[setup] live dashboard http://127.0.0.1:{http_port}/ui (token {self.settings.api_token})")
        self.record.meta["endpoints"] = {"kafka": endpoints.kafka, "redis": endpoints.redis_url,
                                         "api": f"http://127.0.0.1:{http_port}"}

    def _apply_feature_repo(self) -> tuple[FeatureRegistry, str]:
        """feature_repo/ in the run's Feast registry, and the topics; the registry and the
        transactions topic (that of the first view keyed by card)."""
        from freshet import features, kafka

        s = self.settings
        started = time.monotonic()
        self.say("[setup] registering feature_repo/ in the Feast registry (feast apply, ~15 s)")
        features.apply(s)
        registry = features.load_registry(s)
        card_views = [v for v in registry.views.values() if "card_id" in v.join_keys]
        if not card_views:
            raise DemoError("feature_repo/ has no view keyed by card_id; the demo's workload needs the "
                            "example card-transaction views")
        topic = card_views[0].topic
        kafka.ensure_topics(s, [topic, s.topic_deadletter, s.topic_predictions, s.topic_labels,
                                s.topic_drift, s.topic_retrain, s.topic_models])
        self.say(f"[setup] {len(registry.views)} stream feature views applied in {time.monotonic() - started:.1f}s")
        return registry, topic

    def _start_components(self, registry: FeatureRegistry) -> None:
        """stream, serve and retrain as processes (the monitor starts once the history is in)."""
        from freshet.app.commands import create_model_store

        create_model_store(self.settings)
        self.supervisor = Supervisor(self.run_dir, self.settings, self.record, self.say)
        self.supervisor.start(["stream", "--app-id", STREAM_APP_ID], "stream")
        self.supervisor.start(["serve"], "serve")
        # A retraining right after an alert would otherwise train and judge on pre-drift outcomes
        # only: it first waits for RETRAIN_WAIT_S of new labels (and RETRAIN_POSITIVE_SHARE of that
        # many frauds), then trains on those only (--since-request), so the new regime is all of
        # what it learns from and all of what it is judged on: out-of-fold over RETRAIN_FOLDS time
        # blocks of those rows (a newest fifth would hold a handful of frauds), the version fitted on
        # all of them. An alert that comes while it waits starts the wait again (RetrainWorker).
        wait_labels = max(200, int(self.plan.rate * RETRAIN_WAIT_S))
        # Promotion compares log loss: a covariate drift that doubles amounts leaves the ranking of
        # transactions (AUC, near 1 here) alone while the served labels go wrong; log loss sees it.
        self.supervisor.start(["retrain", "--wait-labels", str(wait_labels),
                               "--wait-positives", str(max(10, int(wait_labels * RETRAIN_POSITIVE_SHARE))),
                               "--since-request", "--folds", str(RETRAIN_FOLDS),
                               "--wait-max", f"{RETRAIN_WAIT_MAX_S:g}", "--metric", "log_loss"],
                              "retrain")

    def _start_monitor(self, registry: FeatureRegistry) -> str:
        """`freshet monitor`, reading from the end of the topics (the history's labels are no traffic);
        returns the URL of its metrics once it reads."""
        from freshet.app.stack import free_port

        port = free_port()
        monitor = self.supervisor.start(["monitor", "--config", str(self._write_monitor_config(registry)),
                                         "--metrics-port", str(port), "--start", "latest"], "monitor")
        deadline = time.monotonic() + 300.0  # it imports MLflow and River: 90 s were too few at load 30
        while "monitor reads" not in _read(monitor.log_path):
            self.supervisor.check()
            if time.monotonic() > deadline:
                raise DemoError(f"freshet monitor did not start reading within 300 s; see {monitor.log_path}")
            time.sleep(0.2)
        return f"http://127.0.0.1:{port}/metrics"

    def _publish_history(self, registry: FeatureRegistry, topic: str) -> int:
        """Past traffic covering the longest window (and the first model's training rows), published
        fast and processed by the stream before live traffic starts; returns how many events."""
        from freshet.demo.plan import BOOTSTRAP_HOURS, HISTORY_SPEEDUP
        from freshet.demo.probes import OffsetReader

        plan, rec = self.plan, self.record
        longest = max(v.max_window_s for v in registry.views.values())
        history_s = plan.history_s(longest)
        n = plan.history_events(history_s)
        # the live traffic continues the history's clock and ends in the past: no event is ahead of the wall clock
        self.start_ts = time.time() - history_s - plan.traffic_s * plan.time_scale
        started = time.monotonic()
        full = history_s - BOOTSTRAP_HOURS * 3600 >= longest
        self.say(f"[setup] history: {history_s / 3600:g} simulated hours before live traffic ({n:,} events, "
                 f"x{plan.time_scale * HISTORY_SPEEDUP:g}): " +
                 (f"the longest window ({longest / 3600:g} h) is full behind every row the first model trains on"
                  if full else f"shorter than the longest window ({longest / 3600:g} h): the monitor holds the "
                               "features whose window is not full"))
        producer = self.supervisor.run_history(plan.history_args(topic, self.start_ts, n))
        offsets = OffsetReader(self.settings, topic)
        dead = 0
        try:
            next_say = time.monotonic() + 5.0
            while True:
                self.supervisor.check()
                _, processed, _ = offsets.read()
                if not producer.running and producer.proc.returncode != 0:
                    raise DemoError(f"publishing the history failed (exit {producer.proc.returncode}); last lines of "
                                    f"{producer.log_path}:\n{producer.tail()}")
                if not producer.running and processed >= n:
                    dead = offsets.read()[2]
                    break
                if time.monotonic() - started > HISTORY_TIMEOUT_S:
                    raise DemoError(f"the stream processed {processed:,} of {n:,} history events in "
                                    f"{HISTORY_TIMEOUT_S:.0f} s; give the demo more CPU or pass --history-hours")
                if time.monotonic() >= next_say:
                    self.say(f"[setup] history: {processed:,} of {n:,} events processed")
                    next_say += 5.0
                time.sleep(0.5)
        finally:
            offsets.close()
        wall = time.monotonic() - started
        self.say(f"[setup] history of {n:,} events published and processed in {wall:.1f}s ({dead:,} dead-lettered)")
        rec.meta["history"] = {"sim_s": history_s, "events": n, "wall_s": round(wall, 1), "start_ts": self.start_ts,
                               "longest_window_s": longest, "deadlettered": dead}
        return n

    def _train_first_model(self) -> None:
        """`freshet retrain --bootstrap` on the history; live traffic waits until the API serves it."""
        rec = self.record
        started = time.monotonic()
        self.say("[setup] training the first model on the history (freshet retrain --bootstrap)")
        for attempt in range(4):
            proc = self.supervisor.start_bootstrap(["--window-labels", str(self.plan.bootstrap_labels_warm)])
            while proc.running:
                self.supervisor.check()
                time.sleep(0.2)
            code = proc.proc.returncode
            if code == 0:
                break
            if code != 1 or attempt == 3:
                rec.components["bootstrap"] = f"freshet retrain --bootstrap exited with code {code}"
                raise DemoError(f"'freshet retrain --bootstrap' exited with code {code}; last lines of "
                                f"{proc.log_path}:\n{proc.tail()}")
            self.say("[setup] the labels are not all copied yet; training again in 3 s")
            time.sleep(3.0)
        rec.components["bootstrap"] = "freshet retrain --bootstrap: ok"
        deadline = time.monotonic() + 60.0
        api = rec.meta["endpoints"]["api"]
        while not _api_ready(api):
            self.supervisor.check()
            if time.monotonic() > deadline:
                raise DemoError("the API did not serve the first model within 60 s; see logs/serve.log")
            time.sleep(0.2)
        rec.meta["bootstrap_wall_s"] = round(time.monotonic() - started, 1)
        self.say(f"[setup] first model trained and served in {time.monotonic() - started:.1f}s")

    def _write_monitor_config(self, registry: FeatureRegistry) -> Path:
        """<run dir>/monitor.json: what the monitor watches (DemoPlan.monitor_config says why)."""
        config, skipped = self.plan.monitor_config(registry)
        path = self.run_dir / "monitor.json"
        path.write_bytes(orjson.dumps(config, option=orjson.OPT_INDENT_2))
        self.record.meta["monitor_config"] = config
        watched = len(config["models"][0]["numeric_features"])
        self.say(f"[setup] monitor watches {watched} inputs (the card view's features and the amount; the "
                 f"{skipped} repartitioned merchant features are left out, see monitor.json), each model version "
                 "against the training reference logged with it")
        return path

    def _start_traffic(self, registry: FeatureRegistry, topic: str, metrics_url: str, skip: int) -> None:
        """The producer (after `skip` events of history), and the probes that watch what it sends and
        what the system makes of it."""
        plan, rec, s = self.plan, self.record, self.settings
        live_ts = self.start_ts + skip / plan.sim_rate   # event time of the first live event
        rec.meta["start_ts"] = live_ts
        self.client = ClientProbe(s, registry, topic, rec.meta["endpoints"]["api"], s.api_token, rec, plan, live_ts)
        # the probes read from the end of the history: they watch live traffic only
        self.tap = KafkaTap(s, topic, rec, self.client, live_ts, from_end=skip > 0)
        self.sampler = Sampler(s, topic, rec, metrics_url, pids=self._pids, backlog=lambda: self.client.backlog)
        if skip:
            self.sampler.rebase()
        else:
            self.first_model = FirstModel(plan, rec, self.supervisor, self.say)
        self.supervisor.start_producer(plan.produce_args(topic, self.start_ts, skip))
        self.client.start()
        self.tap.start()

    # -- traffic -----------------------------------------------------------------

    def _traffic(self) -> None:
        """Until the producer has sent its traffic: a sample a second, the first model when
        enough labels exist, progress every 5 s; a component that dies ends the demo."""
        producer = self.supervisor.producer
        next_sample = time.monotonic()
        while producer.running:
            self.supervisor.check()
            if self.client.error:
                raise DemoError(self.client.error)
            if time.monotonic() >= next_sample:
                self._sample()
                if self.first_model is not None:
                    self.first_model.step()
                next_sample += 1.0
                self.progress.tick()
            time.sleep(0.1)
        self.supervisor.check()  # an exit code other than 0 stops the demo here

    def _sample(self) -> dict:
        sample = self.sampler.sample()
        if self.client.start_scoring_once_served():
            self.say(f"[{self.record.clock()}] the API serves a model: prediction traffic starts")
        return sample

    def _pids(self) -> dict[str, int]:
        pids = self.supervisor.pids()
        status = self.stack.status()
        if status is not None:
            pids.update(kafka=status.kafka_pid, redis=status.redis_pid)
        return pids

    # -- end ---------------------------------------------------------------------

    def _drain(self) -> None:
        """After the last event: let the stream, the client and the labels catch up (bounded)."""
        self.say(f"[{self.record.clock()}] traffic done; waiting for the stream and the client to catch up")
        # at most a minute, and only while the stream still makes progress
        deadline = time.monotonic() + 60.0
        progress_at, last = time.monotonic(), -1
        while time.monotonic() < deadline and time.monotonic() - progress_at < 10.0:
            self.supervisor.check()
            s = self._sample()
            sent = (producer_summary(self.run_dir) or {}).get("sent", s["produced"])
            if s["processed"] >= max(sent, s["produced"]) and self.client.backlog == 0:
                break
            if s["processed"] > last:
                progress_at, last = time.monotonic(), s["processed"]
            time.sleep(1.0)
            self.progress.tick()
        time.sleep(2.0)  # last labels, alerts and model events
        self._sample()

    def _judge_consistency(self) -> None:
        """Served features vs their recomputation from the raw log, for a sample of the run's predictions."""
        from freshet import features
        from freshet.demo.consistency import judge_run

        try:
            result = judge_run(self.settings, features.load_registry(self.settings), self.record.t0 or time.time())
        except Exception as exc:  # noqa: BLE001 - the rest of the report stands without it
            self.record.problem(f"consistency check failed: {exc!r}")
            return
        self.record.meta["consistency"] = result
        rate = "-" if result["rate"] is None else f"{result['rate']:.4f}"
        self.say(f"[{self.record.clock()}] consistency {rate} over {result['compared']:,} feature values of "
                 f"{result['judged']:,} sampled predictions ({result['seconds']:.0f} s)")

    def _shutdown(self) -> None:
        """Stop what the set-up started: the producer first (it publishes its last labels), then
        the probes, the components newest first, the stack last."""
        rec = self.record
        if self.supervisor is not None:
            self.supervisor.stop_producer(self.hurry)
        if self.tap is not None:  # first: what the tap read last still reaches the client's count
            if self.hurry.is_set() or self.interrupted:
                self.tap.stop()
            else:  # the labels the producer published on its way out
                self.tap.finish()
        if self.client is not None:
            self.client.stop()
        if self.settings is not None:
            rec.model_versions = registered_versions(self.settings)
        killed = self.supervisor.stop(self.hurry) if self.supervisor is not None else []
        if killed:
            rec.problem(f"killed after 10 s without stopping: {', '.join(killed)}")
        if self.stack is not None:
            self.stack.stop()
        if self.sampler is not None:
            self.sampler.close()
        left = self.supervisor.still_running() if self.supervisor is not None else []
        if left:
            rec.problem(f"processes still running after shutdown: {', '.join(left)}")
        self.say(f"[{rec.clock()}] all demo processes stopped" if not left else
                 f"warning: still running: {', '.join(left)}")

    def _report(self) -> bool:
        """data.json, summary.json and report.html in the run directory, the headline on the
        console; False when no report could be written."""
        from freshet.demo import report

        rec = self.record
        if self.run_dir is None:
            return False
        if self.supervisor is not None:
            self.supervisor.mark_ran()
        rec.meta.update(components=rec.components, interrupted=self.interrupted, failed=self.failed,
                        ended_at=datetime.now().isoformat(), produce=producer_summary(self.run_dir),
                        start_ts=rec.meta.get("start_ts", self.start_ts))
        try:
            html_path, summary = report.write_report(rec.to_dict(), self.run_dir)
        except Exception as exc:  # noqa: BLE001 - the data is still on disk
            data = self.run_dir / "data.json"
            data.write_bytes(orjson.dumps(rec.to_dict(), option=orjson.OPT_SERIALIZE_NUMPY))
            self.say(f"could not write the report ({exc}); the measurements are in {data}")
            traceback.print_exc()
            return False
        self.runs.link_latest()
        self.say("")
        self.say(report.headline(summary))
        self.say(f"\nreport  {html_path}\nsummary {self.run_dir / 'summary.json'}\nlogs    {self.run_dir / 'logs'}")
        return True


# A retraining after an alert learns from the labels that arrived after it only: RETRAIN_WAIT_S of
# them (at the demo's rate), at least RETRAIN_POSITIVE_SHARE of them frauds (the workload's rate is
# 3%: a quiet spell waits a little longer); at most RETRAIN_WAIT_MAX_S. It is judged out-of-fold over
# RETRAIN_FOLDS contiguous time blocks of them: judged on their newest fifth (a holdout of 2-4 frauds),
# the gate refused a better candidate in seeds 2 and 3 of five; bench/retrain_judging.py compares the two.
# Measured offline (bench/concept_retrain.py, 5 seeds): trained on 40 s of labels from 30 s after
# the concept drift, the candidate served 0.6-1.9% errors where the champion served 2.5-5.0% on the
# same traffic; in an earlier offline comparison 60 s of labels did no better on average and left
# less traffic to serve.
RETRAIN_WAIT_S = 40.0
RETRAIN_POSITIVE_SHARE = 0.025
RETRAIN_WAIT_MAX_S = 60.0
RETRAIN_FOLDS = 5
HISTORY_TIMEOUT_S = 600.0


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _api_ready(api_url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/ready", timeout=2) as resp:
            return resp.status == 200
    except Exception:  # noqa: BLE001 - 503 until a model is loaded
        return False


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt while the run lasts.

    SIGINT too: a shell that starts a job in the background sets it to "ignore", which
    Python then keeps, and Ctrl-C (or a supervisor's SIGINT) would do nothing.
    """
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    for s in previous:
        signal.signal(s, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for s, h in previous.items():
            signal.signal(s, h)


class FirstModel:
    """Asks `freshet retrain --bootstrap` for the first model once enough labelled traffic has
    been processed; when it finds too little joined data (exit 1) it is asked again 5 s later,
    up to three more times. Until a model is served, no transaction is scored."""

    def __init__(self, plan: DemoPlan, record: DemoRecord, supervisor: Supervisor, say: Callable[[str], None]):
        self.labels_needed = plan.bootstrap_labels
        self.record = record
        self.supervisor = supervisor
        self.say = say
        self.process: Component | None = None  # the current bootstrap run; None before it, between retries
        self.retries = 0
        self.retry_at = 0.0           # monotonic time of the next attempt

    def step(self) -> None:
        rec = self.record
        if self.process is not None:
            if not self.process.running and "bootstrap" not in rec.components:
                self._finished(self.process.proc.returncode)
            return
        processed_any = bool(rec.samples and rec.samples[-1]["processed"] > 0)
        if len(rec.labels) < self.labels_needed or not processed_any or time.monotonic() < self.retry_at:
            return
        rec.meta.setdefault("bootstrap_t", rec.rel(time.time()))
        self.say(f"[{rec.clock()}] {len(rec.labels):,} labelled transactions: training the first model")
        self.process = self.supervisor.start_bootstrap()

    def _finished(self, code: int) -> None:
        rec = self.record
        if code == 0:
            rec.components["bootstrap"] = "freshet retrain --bootstrap: ok"
            self.say(f"[{rec.clock()}] first model trained by 'freshet retrain --bootstrap'")
        elif code == 1 and self.retries < 3:
            # not enough labelled data joined yet: ask again a little later
            self.say(f"[{rec.clock()}] 'freshet retrain --bootstrap' found too little labelled data; retrying in 5 s")
            self.retries += 1
            self.retry_at = time.monotonic() + 5.0
            self.process = None
        else:
            rec.components["bootstrap"] = f"freshet retrain --bootstrap exited with code {code}"
            msg = (f"'freshet retrain --bootstrap' exited with code {code}: no model to serve, so no "
                   f"predictions. Last lines of {self.process.log_path}:\n{self.process.tail()}")
            rec.problem(msg)
            self.say(f"[{rec.clock()}] warning: {msg}")


class ProgressLine:
    """The console line every 5 s: events in and processed, freshness and API latency over the
    last 10 s, the versions served, alerts, retrainings, promotions and the next drift."""

    def __init__(self, plan: DemoPlan, record: DemoRecord, say: Callable[[str], None]):
        self.drift = plan.drift
        self.record = record
        self.say = say
        self.printed_at = 0.0         # epoch of the last line

    def tick(self) -> None:
        """Print the line when the last one is 5 s old."""
        if time.time() - self.printed_at < 5.0:
            return
        self.printed_at = time.time()
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
        versions = sorted(set(rec.predictions["version"][-500:]), key=version_key)
        promotions = [e for e in rec.model_events if e["stage"] == "champion"]
        drift_next = [d for d in self.drift if d.minute * 60 > now_t]
        parts = [f"[{rec.clock()}]",
                 f"events {s['processed']:,} ({in_rate:,.0f}/s in, {out_rate:,.0f}/s processed)",
                 f"freshness p50 {_pct(recent, 50)} p99 {_pct(recent, 99)}",
                 f"API p99 {_pct(lat, 99)}",
                 f"model {'v' + '/v'.join(versions) if versions else '-'}",
                 f"alerts {len(rec.alerts)}", f"retrains {len(rec.retrains)}", f"promotions {len(promotions)}"]
        if drift_next:
            d = drift_next[0]
            parts.append(f"| {d.kind} drift at {int(d.minute * 60) // 60}:{int(d.minute * 60) % 60:02d}")
        self.say("  ".join(parts))


def _pct(values: list[float], q: float) -> str:
    if not values:
        return "-"
    v = sorted(values)
    x = v[min(len(v) - 1, int(math.ceil(q / 100 * len(v))) - 1)]
    return f"{x:,.0f} ms" if x >= 10 else f"{x:.1f} ms"
