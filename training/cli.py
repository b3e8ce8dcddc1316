"""Subcommand of the training stage: retrain (the worker, --bootstrap and --once).

Imports the training code lazily so `freshet --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from freshet.endpoints import resolve_endpoints
from freshet.settings import DEFAULT_FEATURE_SERVICE, DEFAULT_MODEL_NAME
from freshet.errors import CliError

log = logging.getLogger("freshet.training")


def _kafka_settings(settings, required: bool):
    """Settings with the Kafka endpoint filled in (from the embedded stack if unset); Redis is not needed here."""
    try:
        return resolve_endpoints(settings, need_redis=False)
    except CliError:
        if required:
            raise
    log.warning("FRESHET_KAFKA_BOOTSTRAP_SERVERS is not set and no embedded stack runs for %s: training from "
                "the label log as it is; no freshet.models event is sent", settings.data_path)
    return settings


def _retrain_config(args, settings):
    from freshet.training.dataset import TrainingWindow
    from freshet.training.retrain import RetrainConfig

    try:
        window = TrainingWindow.of({"start": args.since, "end": args.until,
                                    "last_hours": args.window_hours, "last_n": args.window_labels or None})
        return RetrainConfig(model=args.model or settings.model_name, feature_service=args.feature_service,
                             request_fields=tuple(args.request_field) if args.request_field is not None else ("amount",),
                             window=window, holdout_fraction=args.holdout, metric=args.metric, margin=args.margin,
                             C=args.C, seed=args.seed, min_rows=args.min_rows, confidence=args.confidence,
                             wait_labels=args.wait_labels, wait_positives=args.wait_positives,
                             wait_max_s=args.wait_max, since_request=args.since_request, folds=args.folds)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _reproduce(args, settings) -> int:
    """--reproduce NAME/VERSION: rebuild a version's training set from its snapshot, refit, compare."""
    import orjson

    from freshet.models import ModelNotFound, UnsupportedModel
    from freshet.training.dataset import RetrainError
    from freshet.training.reproduce import reproduce
    from freshet.training.snapshot import SnapshotChanged

    name, sep, version = args.reproduce.rpartition("/")
    if not sep or not name or not version.isdigit():
        raise CliError(f"--reproduce takes NAME/VERSION, e.g. {settings.model_name}/3; got {args.reproduce!r}")
    try:
        report = reproduce(settings, name, version)
    except (SnapshotChanged, ModelNotFound, UnsupportedModel, RetrainError) as exc:
        raise CliError(f"cannot reproduce {name} version {version}: {exc}") from None
    worst = max(report["max_difference"].values())
    print(f"{name} version {version}: {report['status']} (dataset {'equal' if report['dataset_fingerprint']['equal'] else 'DIFFERENT'}, "
          f"{report['rows']['train']} training rows, largest difference {worst:.3g})",
          file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_SERIALIZE_NUMPY).decode(), flush=True)
    return 0 if report["status"] in ("identical", "equivalent") else 1


def cmd_retrain(args, settings) -> int:
    import orjson

    from freshet.training.dataset import RetrainError
    from freshet.training.outcomes import summary_line
    from freshet.training.retrain import Retrainer
    from freshet.training.worker import RetrainWorker

    if args.reproduce:
        return _reproduce(args, settings)
    if args.bootstrap and args.reason:
        raise CliError("--bootstrap trains the first version; it takes no --reason (use --once --reason)")
    manual = args.once or args.bootstrap or bool(args.reason)
    config = _retrain_config(args, settings)  # a bad flag fails before anything is looked for
    settings = _kafka_settings(settings, required=not manual)
    try:
        trainer = Retrainer(settings, config=config, progress=sys.stderr.isatty())
        if manual:
            outcome = trainer.run(args.reason or (), bootstrap=args.bootstrap, force=args.force)
            print(summary_line(outcome), file=sys.stderr if args.json else sys.stdout, flush=True)
            if args.json:
                print(orjson.dumps(outcome, option=orjson.OPT_SERIALIZE_NUMPY).decode(), flush=True)
            return 1 if outcome["status"] == "insufficient_data" else 0
    except RetrainError as exc:
        raise CliError(str(exc)) from None

    def show(outcome):
        print(summary_line(outcome), flush=True)

    worker = RetrainWorker(settings, {config.model: trainer}, group=args.group, on_outcome=show,
                           bootstrap_every_s=args.bootstrap_every)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
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
                    "  freshet retrain --once [--reason ID] one training now, for alert id(s) ID\n"
                    "  freshet retrain --reproduce fraud/3  rebuild version 3's training set from its snapshot,\n"
                    "                                       refit, and compare (exit 1 if it differs)\n\n"
                    "Each training copies new labels from FRESHET_TOPIC_LABELS into the label log\n"
                    "(labels/<topic>/ of FRESHET_OFFLINE_STORE, by default <data dir>/offline), joins each label\n"
                    "to its transaction in the offline "
                    "raw log, builds point-in-time features for the feature service, fits\n"
                    "SimpleImputer -> StandardScaler -> LogisticRegression with the given seed, scores it and the\n"
                    "serving champion on the newest --holdout share of the examples (with --since-request\n"
                    "--folds N: on all of them, the candidate out-of-fold over N time blocks, and fits the\n"
                    "version on all of them), registers it with its lineage and promotes it only if it beats\n"
                    "the champion by --margin on --metric. Requests\n"
                    "whose alert ids were all trained for already train nothing (--force overrides).\n"
                    "Outcomes are appended to <data dir>/retrain/outcomes.jsonl.",
        epilog="exit status: 0 trained, skipped or reproduced, 1 not enough labelled data or a reproduction "
               "that differs, 2 usage or setup error (a snapshot whose part files are gone, say)")
    mode = p.add_argument_group("mode (default: the worker)")
    mode.add_argument("--bootstrap", action="store_true", help="train and promote the first version")
    mode.add_argument("--once", action="store_true", help="train once now and exit")
    mode.add_argument("--bootstrap-every", type=float, default=0.0, metavar="SECONDS",
                      help="worker: while the model has no champion, try --bootstrap this often "
                           "(for 'freshet up' on a fresh system; default: off)")
    mode.add_argument("--reason", action="append", metavar="ALERT_ID",
                      help="alert id this training answers (repeatable; implies --once)")
    mode.add_argument("--force", action="store_true", help="train even if the reason was handled already")
    mode.add_argument("--reproduce", metavar="NAME/VERSION",
                      help="rebuild that version's training set from the snapshot it logged, refit with its seed "
                           "and compare data digest, coefficients and scores; registers nothing")
    mode.add_argument("--json", action="store_true", help="print the outcome as one JSON line (--once/--bootstrap)")
    mode.add_argument("--group", default="freshet-retrain", help="consumer group of the worker (default: %(default)s)")
    data = p.add_argument_group("data")
    data.add_argument("--model", help=f"registered model name (default: FRESHET_MODEL_NAME, i.e. {DEFAULT_MODEL_NAME})")
    data.add_argument("--feature-service", default=DEFAULT_FEATURE_SERVICE,
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
    data.add_argument("--wait-positives", type=int, default=0,
                      help="and for N of those labels to be positive: the rare class a new pattern is "
                           "learnt from (default: %(default)s)")
    data.add_argument("--wait-max", type=float, default=120.0,
                      help="longest wait for --wait-labels and --wait-positives, seconds (default: %(default)s)")
    data.add_argument("--since-request", action="store_true",
                      help="after the wait, train and evaluate only on the labelled events newer than every "
                           "one known when the request came (the regime the alert reports), within the window; "
                           "needs --wait-labels or --wait-positives")
    fit = p.add_argument_group("fit and promotion")
    fit.add_argument("--seed", type=int, default=0, help="recorded with the version (default: %(default)s)")
    fit.add_argument("--C", type=float, default=1.0, help="inverse L2 strength (default: %(default)s)")
    fit.add_argument("--holdout", type=float, default=0.2,
                     help="newest share of examples held out for evaluation (default: %(default)s)")
    fit.add_argument("--folds", type=int, default=0, metavar="N",
                     help="with --since-request: judge the candidate out-of-fold over N contiguous time blocks of "
                          "the rows after the request (each block scored by a fit on the others) against the "
                          "champion on all of them, and fit the version on all of them; when a fold would have "
                          "fewer than 10 of a class, the newest --holdout share judges (recorded as folds_skipped). "
                          "N >= 2 (default: off)")
    fit.add_argument("--metric", choices=["auc", "log_loss", "error_rate"], default="auc",
                     help="what promotion compares (default: %(default)s)")
    fit.add_argument("--margin", type=float, default=0.005,
                     help="how much better than the champion a candidate must be (default: %(default)s)")
    fit.add_argument("--confidence", type=float, default=0.95,
                     help="and how sure: the paired-bootstrap lower bound of the gain at this confidence must "
                          "be above zero (default: %(default)s)")


# --- consistency ---------------------------------------------------------------------

def cmd_consistency(args, settings) -> int:
    from freshet import features, kafka
    from freshet.monitor.consistency import ConsistencyMetrics, ConsistencyRate
    from freshet.training.consistency import ConsistencyService, ServedConsistency

    settings = resolve_endpoints(settings, need_redis=False)
    kafka.check_reachable(settings)
    registry = features.load_registry(settings)
    rate = ConsistencyRate(min_rate=settings.consistency_min_rate, window=args.window)
    metrics = None
    if args.metrics_port:
        metrics = ConsistencyMetrics()
        metrics.serve(args.metrics_port, settings.http_host)
        log.info("consistency metrics on http://%s:%d/metrics", settings.http_host, args.metrics_port)
    checker = ServedConsistency(settings, registry, rate, on_verdict=metrics.observe if metrics else None)
    svc = ConsistencyService(settings, checker, metrics, start=args.start,
                             summary_file=args.summary or settings.data_path / "consistency" / "summary.json")
    signal.signal(signal.SIGTERM, lambda *_: svc.stop())
    try:
        svc.run()
    except KeyboardInterrupt:
        pass
    finally:
        if metrics:
            metrics.close()
    return 0


def _add_consistency(sub) -> None:
    from pathlib import Path

    p = sub.add_parser(
        "consistency", help="online/offline consistency: served features vs their recomputation from the raw log",
        description="Samples served predictions from FRESHET_TOPIC_PREDICTIONS (FRESHET_CONSISTENCY_SAMPLE), "
                    "recomputes their features from the offline raw log as serving answered them at their "
                    "time (the training sets' definition), and publishes the share of equal values per "
                    "feature: Prometheus gauge freshet_consistency_rate, and a data_quality alert on "
                    "FRESHET_TOPIC_DRIFT when a feature's rate drops below FRESHET_CONSISTENCY_MIN_RATE. "
                    "Events accepted within FRESHET_CONSISTENCY_GRACE_MS before a request may not have "
                    "reached Redis yet and are allowed for.")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="serve Prometheus metrics on this port at FRESHET_HTTP_HOST (default: off)")
    p.add_argument("--start", choices=["earliest", "latest"], default="latest",
                   help="where to start reading predictions (default: %(default)s)")
    p.add_argument("--window", type=int, default=1000,
                   help="comparisons per feature the alerting rate covers (default: %(default)s)")
    p.add_argument("--summary", type=Path,
                   help="JSON summary written every 10 s (default: <data dir>/consistency/summary.json)")


def register(sub: argparse._SubParsersAction, handlers: dict) -> None:
    from freshet.training import admin

    _add_retrain(sub)
    handlers["retrain"] = cmd_retrain
    _add_consistency(sub)
    handlers["consistency"] = cmd_consistency
    admin.register(sub, handlers)
