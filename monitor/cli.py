"""Subcommands of the monitor stage: monitor, alerts, retrain.

Each imports its module lazily so `freshet --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

log = logging.getLogger("freshet.monitor")


def _kafka_settings(settings, required: bool):
    """Settings with the Kafka endpoint filled in (from the embedded stack if unset); Redis is not needed here."""
    from freshet.cli import CliError
    from freshet.stack import EmbeddedStack

    if settings.kafka_bootstrap_servers:
        return settings
    running = EmbeddedStack(settings.data_path).status()
    if running is not None:
        return settings.with_endpoints(running.kafka, settings.redis_url or running.redis_url)
    problem = (f"FRESHET_KAFKA_BOOTSTRAP_SERVERS is not set and no embedded stack runs for {settings.data_path}")
    if required:
        raise CliError(f"{problem}; run 'freshet stack start' (or 'freshet up') or set it to your Kafka")
    log.warning("%s: training from the label log as it is; no freshet.models event is sent", problem)
    return settings


def _stop_on_sigterm(stop) -> None:
    signal.signal(signal.SIGTERM, lambda *_: stop())


# --- retrain ---------------------------------------------------------------------

def _retrain_config(args, settings):
    from freshet.cli import CliError
    from monitor.retrain import RetrainConfig, TrainingWindow

    try:
        window = TrainingWindow.of({"start": args.since, "end": args.until,
                                    "last_hours": args.window_hours, "last_n": args.window_labels or None})
        return RetrainConfig(model=args.model or settings.model_name, feature_service=args.feature_service,
                             request_fields=tuple(args.request_field) if args.request_field is not None else ("amount",),
                             window=window, holdout_fraction=args.holdout, metric=args.metric, margin=args.margin,
                             C=args.C, seed=args.seed, min_rows=args.min_rows, confidence=args.confidence,
                             wait_labels=args.wait_labels, wait_max_s=args.wait_max)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def cmd_retrain(args, settings) -> int:
    import orjson

    from freshet.cli import CliError
    from monitor import retrain

    if args.bootstrap and args.reason:
        raise CliError("--bootstrap trains the first version; it takes no --reason (use --once --reason)")
    manual = args.once or args.bootstrap or bool(args.reason)
    settings = _kafka_settings(settings, required=not manual)
    config = _retrain_config(args, settings)
    try:
        trainer = retrain.Retrainer(settings, config=config, progress=sys.stderr.isatty())
        if manual:
            outcome = trainer.run(args.reason or (), bootstrap=args.bootstrap, force=args.force)
            print(retrain.summary_line(outcome), file=sys.stderr if args.json else sys.stdout, flush=True)
            if args.json:
                print(orjson.dumps(outcome, option=orjson.OPT_SERIALIZE_NUMPY).decode(), flush=True)
            return 1 if outcome["status"] == "insufficient_data" else 0
    except retrain.RetrainError as exc:
        raise CliError(str(exc)) from None

    def show(outcome):
        print(retrain.summary_line(outcome), flush=True)

    worker = retrain.RetrainWorker(settings, {config.model: trainer}, group=args.group, on_outcome=show,
                                   bootstrap_every_s=args.bootstrap_every)
    _stop_on_sigterm(worker.stop)
    try:
        worker.run()
    except KeyboardInterrupt:
        pass
    log.info("retrain worker stopped: %s", worker.counts)
    return 0


def _add_retrain(sub) -> None:
    p = sub.add_parser(
        "retrain", help="retraining worker: training set, fit, evaluate, register, promote",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Trains the model from the offline store and registers it in MLflow.\n\n"
                    "  freshet retrain                      worker: one training per batch of requests on\n"
                    "                                       FRESHET_TOPIC_RETRAIN (what 'freshet monitor' sends)\n"
                    "  freshet retrain --bootstrap          train and promote version 1 if there is no champion\n"
                    "  freshet retrain --once [--reason ID] one training now, for alert id(s) ID\n\n"
                    "Each training copies new labels from FRESHET_TOPIC_LABELS into the label log\n"
                    "(<data dir>/offline/labels/<topic>/), joins each label to its transaction in the offline\n"
                    "raw log, builds point-in-time features for the feature service, fits\n"
                    "SimpleImputer -> StandardScaler -> LogisticRegression with the given seed, scores it and the\n"
                    "serving champion on the newest --holdout share of the examples, registers it with its\n"
                    "lineage and promotes it only if it beats the champion by --margin on --metric. Requests\n"
                    "whose alert ids were all trained for already train nothing (--force overrides).\n"
                    "Outcomes are appended to <data dir>/retrain/outcomes.jsonl.",
        epilog="exit status: 0 trained or skipped, 1 not enough labelled data, 2 usage or setup error")
    mode = p.add_argument_group("mode (default: the worker)")
    mode.add_argument("--bootstrap", action="store_true", help="train and promote the first version")
    mode.add_argument("--once", action="store_true", help="train once now and exit")
    mode.add_argument("--bootstrap-every", type=float, default=0.0, metavar="SECONDS",
                      help="worker: while the model has no champion, try --bootstrap this often "
                           "(for 'freshet up' on a fresh system; default: off)")
    mode.add_argument("--reason", action="append", metavar="ALERT_ID",
                      help="alert id this training answers (repeatable; implies --once)")
    mode.add_argument("--force", action="store_true", help="train even if the reason was handled already")
    mode.add_argument("--json", action="store_true", help="print the outcome as one JSON line (--once/--bootstrap)")
    mode.add_argument("--group", default="freshet-retrain", help="consumer group of the worker (default: %(default)s)")
    data = p.add_argument_group("data")
    data.add_argument("--model", help="registered model name (default: FRESHET_MODEL_NAME, i.e. fraud)")
    data.add_argument("--feature-service", default="fraud_model_v1",
                      help="Feast feature service the model reads (default: %(default)s)")
    data.add_argument("--request-field", action="append", metavar="FIELD",
                      help="request-time input read from the labelled event (repeatable; default: amount)")
    data.add_argument("--window-hours", type=float, help="train on the last H hours of labelled events "
                                                         "(event time, ending at the newest)")
    data.add_argument("--window-labels", type=int, default=20_000,
                      help="train on the newest N labelled events; 0 for all (default: %(default)s)")
    data.add_argument("--since", help="first event time to train on (ISO-8601 or epoch seconds)")
    data.add_argument("--until", help="train on events before this time (ISO-8601 or epoch seconds)")
    data.add_argument("--min-rows", type=int, default=200, help="training examples needed (default: %(default)s)")
    data.add_argument("--wait-labels", type=int, default=0,
                      help="before training for alerts, wait for N labels published after the request: "
                           "outcomes of post-drift traffic (default: %(default)s)")
    data.add_argument("--wait-max", type=float, default=120.0,
                      help="longest wait for --wait-labels, seconds (default: %(default)s)")
    fit = p.add_argument_group("fit and promotion")
    fit.add_argument("--seed", type=int, default=0, help="recorded with the version (default: %(default)s)")
    fit.add_argument("--C", type=float, default=1.0, help="inverse L2 strength (default: %(default)s)")
    fit.add_argument("--holdout", type=float, default=0.2,
                     help="newest share of examples held out for evaluation (default: %(default)s)")
    fit.add_argument("--metric", choices=["auc", "log_loss", "error_rate"], default="auc",
                     help="what promotion compares (default: %(default)s)")
    fit.add_argument("--margin", type=float, default=0.005,
                     help="how much better than the champion a candidate must be (default: %(default)s)")
    fit.add_argument("--confidence", type=float, default=0.95,
                     help="and how sure: the paired-bootstrap lower bound of the gain at this confidence must "
                          "be above zero (default: %(default)s)")




# --- monitor ------------------------------------------------------------------------

def cmd_monitor(args, settings) -> int:
    from freshet import features, kafka
    from freshet.cli import CliError
    from monitor import service

    settings = _kafka_settings(settings, required=True)
    kafka.check_reachable(settings)
    registry = features.load_registry(settings)
    try:
        if args.config:
            config = service.load_config_file(args.config)
        else:
            config = service.default_config(registry, args.model or settings.model_name, args.feature_service,
                                            max_window_s=args.max_window or None)
        overrides = {k: v for k, v in {"kinds": args.retrain_kinds, "min_alerts": args.retrain_min_alerts,
                                       "window_s": args.retrain_window, "cooldown_s": args.retrain_cooldown}.items()
                     if v is not None}
        if overrides:
            config["policy"] = {**(config.get("policy") or {}), **overrides}
        monitor, policy = service.build(config, service.known_inputs(registry))
        metrics = None
        if args.metrics_port:
            metrics = service.MonitorMetrics()
            metrics.serve(args.metrics_port, settings.http_host)
            log.info("monitor metrics on http://%s:%d/metrics", settings.http_host, args.metrics_port)
        svc = service.MonitorService(
            settings, monitor, policy, event_topics=list(registry.views_by_topic()),
            state_file=args.state, snapshot_every_s=args.snapshot_every, start=args.start, metrics=metrics)
        if args.fresh:
            log.info("--fresh: not reading %s; the monitor warms up again", svc.state_file)
        else:
            svc.restore()
    except service.MonitorSetupError as exc:
        raise CliError(str(exc)) from None
    watched = {name: len(m.config.numeric_features) + len(m.config.categorical_features)
               for name, m in monitor.models.items()}
    log.info("monitoring %s; retrain requests for %s alerts (at least %d within %gs, one per %gs per model)",
             ", ".join(f"{m} ({n} features)" for m, n in watched.items()), "/".join(policy.kinds),
             policy.min_alerts, policy.window_s, policy.cooldown_s)
    _stop_on_sigterm(svc.stop)
    try:
        svc.run(group=args.group)
    except KeyboardInterrupt:
        pass
    finally:
        if metrics:
            metrics.close()
    return 0


def _add_monitor(sub) -> None:
    p = sub.add_parser(
        "monitor", help="River drift monitor: predictions and labels in, drift alerts and retrain requests out",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Reads FRESHET_TOPIC_PREDICTIONS and FRESHET_TOPIC_LABELS, watches each model's inputs,\n"
                    "scores and labelled error rate, publishes drift alerts to FRESHET_TOPIC_DRIFT and, per the\n"
                    "retrain policy, retraining requests to FRESHET_TOPIC_RETRAIN. The stream's dead-letter rate\n"
                    "is a data-quality input. State (detectors, cooldowns, offsets) is saved as JSON every\n"
                    "--snapshot-every seconds and on exit, and read back at start: a restart resumes where it\n"
                    "stopped, without warming up again and without an alert flood.\n\n"
                    "Without --config it watches the features of --feature-service (windows up to --max-window)\n"
                    "plus 'amount' for --model.\n"
                    "A config file (TOML, or JSON by extension) holds the MonitorConfig fields, e.g.\n\n"
                    "  seed = 0\n"
                    "  [[models]]\n"
                    "  model = \"fraud\"\n"
                    "  numeric_features = [\"amount\", \"card_txn_stats:sum_amount_300s\"]\n"
                    "  warmup = 2000\n"
                    "  feature_detector = \"adwin\"     # or page_hinkley, kswin\n"
                    "  [policy]\n"
                    "  kinds = [\"feature\", \"prediction\", \"performance\"]\n"
                    "  min_alerts = 1\n"
                    "  window_s = 600\n"
                    "  cooldown_s = 900\n\n"
                    "A feature the registry does not know, an unknown detector or setting fails at start-up.")
    p.add_argument("--config", help="monitor config file (TOML or .json)")
    p.add_argument("--model", help="model to watch without --config (default: FRESHET_MODEL_NAME, i.e. fraud)")
    p.add_argument("--feature-service", default="fraud_model_v1",
                   help="features to watch without --config (default: %(default)s)")
    p.add_argument("--max-window", type=int, default=3600,
                   help="without --config, watch only features over windows up to this many seconds; longer "
                        "ones trend until the stream has run that long (0: all; default: %(default)s)")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="serve Prometheus metrics on this port at FRESHET_HTTP_HOST (default: off)")
    p.add_argument("--state", type=Path,
                   help="state file (default: <data dir>/monitor/state.json)")
    p.add_argument("--fresh", action="store_true", help="ignore the saved state: warm up again")
    p.add_argument("--snapshot-every", type=float, default=30.0, help="seconds between state saves (default: %(default)s)")
    p.add_argument("--start", choices=["earliest", "latest"], default="earliest",
                   help="where to start reading without saved state (default: %(default)s)")
    p.add_argument("--group", default="freshet-monitor",
                   help="consumer group the offsets are committed under, for lag tools (default: %(default)s)")
    pol = p.add_argument_group("retrain policy (overrides the config's [policy])")
    pol.add_argument("--retrain-kinds", type=lambda s: [k.strip() for k in s.split(",") if k.strip()],
                     help="comma-separated alert kinds that request retraining "
                          "(default: feature,prediction,performance)")
    pol.add_argument("--retrain-min-alerts", type=int, help="alerts within the window before a request (default: 1)")
    pol.add_argument("--retrain-window", type=float, help="seconds alerts count together (default: 600)")
    pol.add_argument("--retrain-cooldown", type=float, help="seconds between requests per model (default: 900)")


# --- alerts -------------------------------------------------------------------------

def cmd_alerts(args, settings) -> int:
    from monitor import service

    settings = _kafka_settings(settings, required=True)
    n = 0
    try:
        for item in service.read_alerts(settings, follow=args.follow, model=args.model):
            if isinstance(item, str):
                print(f"freshet: warning: {item}", file=sys.stderr, flush=True)
                continue
            n += 1
            print(item.encode().decode() if args.json else service.format_alert(item), flush=True)
    except KeyboardInterrupt:
        pass
    if not args.follow and not args.json:
        print(f"{n} alert(s) on {settings.topic_drift}" + (f" for model {args.model}" if args.model else ""),
              file=sys.stderr)
    return 0


def _add_alerts(sub) -> None:
    p = sub.add_parser(
        "alerts", help="print drift alerts from the drift topic",
        description="Prints the alerts on FRESHET_TOPIC_DRIFT from the beginning, one line each, then exits; "
                    "with --follow keeps printing new ones until Ctrl-C. Records that are not drift alerts "
                    "are reported on stderr and skipped.")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new alerts")
    p.add_argument("--model", help="only alerts for this model")
    p.add_argument("--json", action="store_true", help="print each alert as its JSON message")


def register(sub: argparse._SubParsersAction, handlers: dict) -> None:
    _add_monitor(sub)
    handlers["monitor"] = cmd_monitor
    _add_alerts(sub)
    handlers["alerts"] = cmd_alerts
    _add_retrain(sub)
    handlers["retrain"] = cmd_retrain
