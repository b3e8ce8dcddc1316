"""Subcommands of the monitor stage: monitor and alerts.

Each imports its module lazily so `freshet --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from freshet.endpoints import resolve_endpoints
from freshet.settings import DEFAULT_FEATURE_SERVICE, DEFAULT_MODEL_NAME

log = logging.getLogger("freshet.monitor")


def _stop_on_sigterm(stop) -> None:
    signal.signal(signal.SIGTERM, lambda *_: stop())
    # Ctrl-C too: a KeyboardInterrupt mid-batch would stop the loop without saving its state
    signal.signal(signal.SIGINT, lambda *_: stop())


# --- monitor ------------------------------------------------------------------------

def cmd_monitor(args, settings) -> int:
    from freshet import features, kafka
    from freshet.errors import CliError
    from freshet.monitor import service

    settings = resolve_endpoints(settings, need_redis=False)
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
        references = None
        if not args.no_training_reference:
            from freshet.monitor.references import RegistryReferences

            references = RegistryReferences(settings)
            references.registry  # noqa: B018 - import MLflow and open the registry now, not on the first prediction
        monitor, policy = service.build(config, service.known_inputs(registry), references)
        metrics = None
        if args.metrics_port:
            metrics = service.MonitorMetrics()
            metrics.serve(args.metrics_port, settings.http_host)
            log.info("monitor metrics on http://%s:%d/metrics", settings.http_host, args.metrics_port)
        from freshet.challengers import RollbackRule

        monitor.online.use_rule(RollbackRule.from_settings(settings))
        rollback = service.ChampionRollback(settings) if settings.rollback_auto == "on" else None
        svc = service.MonitorService(
            settings, monitor, policy, event_topics=list(registry.views_by_topic()),
            state_file=args.state, snapshot_every_s=args.snapshot_every, start=args.start, metrics=metrics,
            rollback=rollback, evidence=service.EvidenceRecorder(settings))
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
                    "A feature the registry does not know, an unknown detector or setting fails at start-up.\n\n"
                    "Versions are compared online on labelled outcomes: a shadow ('freshet models shadow') by the\n"
                    "labels of the requests it shadowed, a canary by its own; /metrics shows every version's error\n"
                    "rate (freshet_monitor_version_error_rate) and an alert (detector 'challenger') says when one\n"
                    "is significantly worse or better. A newly promoted champion significantly worse than its\n"
                    "predecessor is rolled back to it (alert detector 'rollback', a 'rolled_back' event on\n"
                    "FRESHET_TOPIC_MODELS); FRESHET_ROLLBACK_AUTO=off only reports it, FRESHET_ROLLBACK_ALPHA,\n"
                    "_MIN_OUTCOMES, _LOOKS and _MIN_DIFFERENCE set the test.")
    p.add_argument("--config", help="monitor config file (TOML or .json)")
    p.add_argument("--model", help=f"model to watch without --config (default: FRESHET_MODEL_NAME, i.e. {DEFAULT_MODEL_NAME})")
    p.add_argument("--feature-service", default=DEFAULT_FEATURE_SERVICE,
                   help="features to watch without --config (default: %(default)s)")
    p.add_argument("--max-window", type=int, default=3600,
                   help="without --config, watch only features over windows up to this many seconds; longer "
                        "ones trend until the stream has run that long (0: all; default: %(default)s)")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="serve Prometheus metrics on this port at FRESHET_HTTP_HOST (default: off)")
    p.add_argument("--state", type=Path,
                   help="state file (default: <data dir>/monitor/state.json)")
    p.add_argument("--fresh", action="store_true", help="ignore the saved state: warm up again")
    p.add_argument("--no-training-reference", action="store_true",
                   help="judge every version against a warm-up reference (its first predictions) instead of "
                        "the training reference logged with it in the model registry")
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
    from freshet.monitor import service

    settings = resolve_endpoints(settings, need_redis=False)
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
