"""`freshet demo`: the whole system on the embedded stack under a drifting workload, with a report.

Owns the demo's timeline (stack, component processes, traffic, first model, drift) and the
live progress line; the plan, the processes, the probes and the record have their own modules.
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from freshet.demo.plan import MODEL, DemoError, DemoPlan
from freshet.demo.probes import ClientProbe, CpuShare, KafkaTap, OffsetReader, registered_versions
from freshet.demo.processes import (
    FRESHET, RELAXED_FETCH, RELAXED_FETCH_MS, STREAM_APP_ID, Component, RunDirectory, _child_setup,
    stop_components,
)
from freshet.demo.record import DemoRecord
from freshet.settings import Settings


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
        self.offsets = OffsetReader(self.settings, self.topic)
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
            rec.model_versions = registered_versions(self.settings)
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
