"""Subcommands of the demo layer, `demo` (the main job) and `produce` (the workload alone):
their options, checked as argparse reads them, and the handlers that run them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Any, Callable

import orjson

from freshet.demo import workload
from freshet.demo.plan import (
    DEFAULT_CARDS, DEFAULT_DRIFT, DEFAULT_MINUTES, DEFAULT_RATE, DEFAULT_TIME_SCALE, DemoDrift, DemoError,
    DemoPlan,
)
from freshet.demo.run import Demo
from freshet.endpoints import resolve_endpoints
from freshet.errors import CliError
from freshet.settings import Settings
from freshet.times import iso_utc


def register(sub: argparse._SubParsersAction, handlers: dict) -> None:
    _add_demo_arguments(sub.add_parser(
        "demo", help="the whole system under a drifting workload, end to end, with a report",
        description="Starts the embedded stack and every component (stream, serve, and monitor and "
                    "retrain when this build has them) as processes, publishes seeded card transactions "
                    "with delayed fraud labels, scores them over the HTTP API, injects drift, shows progress "
                    "every few seconds and writes an HTML report and summary.json to a fresh run directory "
                    "under <data dir>/demo (Ctrl-C stops early and still writes it).",
        epilog="Times are minutes of traffic (wall clock); simulated time runs --time-scale times faster. "
               f"Default drift: {' '.join(DEFAULT_DRIFT)}."))
    handlers["demo"] = cmd_demo
    add_produce_arguments(sub.add_parser("produce", help="publish the example card-transaction workload to Kafka"))
    handlers["produce"] = cmd_produce


# --- option types: each names what it wants when a value does not fit -------------------

def _arg(convert: Callable[[str], Any], check: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


def _drift_arg(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse_arg(text: str) -> Any:
        try:
            return parse(text)
        except workload.DriftSpecError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse_arg


def _above_zero(v: float) -> bool:
    return v > 0 and math.isfinite(v)


_positive = _arg(float, _above_zero, "a number > 0")
_seconds = _arg(float, lambda v: v >= 0 and math.isfinite(v), "a number of seconds >= 0")
_fraction = _arg(float, lambda v: 0 <= v <= 1, "a fraction between 0 and 1")
_count = _arg(int, lambda v: v >= 0, "a whole number >= 0")
_at_least_one = _arg(int, lambda v: v >= 1, "a whole number >= 1")
_whole_above_zero = _arg(int, _above_zero, "a whole number > 0")
_port = _arg(int, lambda v: 0 <= v < 65536, "a TCP port (0 = a free one)")


# --- freshet demo ---------------------------------------------------------------------

def _add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=_arg(float, _above_zero, "a number of minutes > 0"), default=DEFAULT_MINUTES,
                   help=f"minutes of traffic (default {DEFAULT_MINUTES:g}; set-up adds about half a minute)")
    p.add_argument("--rate", type=_arg(float, _above_zero, "a rate > 0"), default=DEFAULT_RATE,
                   help=f"transactions per second (default {DEFAULT_RATE:g}; one stream worker does "
                        "~500-1000/s on 2 cores)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    p.add_argument("--drift", type=_drift_arg(DemoDrift.parse), action="append", metavar="KIND@MINUTE",
                   help="inject covariate or concept drift at this minute of traffic (repeatable; "
                        f"default {' '.join(DEFAULT_DRIFT)})")
    p.add_argument("--no-drift", action="store_true", help="inject no drift (a baseline run)")
    p.add_argument("--data-dir", dest="demo_data_dir", metavar="D",
                   help="where run directories and reports go (default FRESHET_DATA_DIR, i.e. ./data)")
    p.add_argument("--time-scale", type=_positive, default=DEFAULT_TIME_SCALE,
                   help=f"simulated seconds per wall second (default {DEFAULT_TIME_SCALE:g})")
    p.add_argument("--cards", type=_whole_above_zero, default=DEFAULT_CARDS,
                   help=f"number of cards (default {DEFAULT_CARDS}; keep rate / time-scale / cards <= 0.002)")
    p.add_argument("--predict-share", type=_arg(float, lambda v: 0 <= v <= 1, "a share between 0 and 1"),
                   default=1.0, help="share of transactions scored over the HTTP API (default 1)")
    p.add_argument("--history-hours", type=_arg(float, lambda v: v >= 0 and math.isfinite(v), "a number of hours >= 0"),
                   help="simulated hours of history published (fast) before live traffic; the first model is "
                        "trained on it (default: the longest feature window plus 3 hours; 0: a cold start, the "
                        "first model trained on the first --bootstrap-labels labels of live traffic)")
    p.add_argument("--bootstrap-labels", type=_whole_above_zero, default=1000,
                   help="cold start only: labelled transactions before the first model is asked for (default 1000)")
    p.add_argument("--http-port", type=_port, default=0, help="HTTP API port (default: a free one)")
    p.add_argument("--kafka-port", type=_port, default=0, help="broker port (default: a free one)")
    p.add_argument("--redis-port", type=_port, default=0, help="Redis port (default: a free one)")


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    if args.demo_data_dir:
        settings = dataclasses.replace(settings, data_dir=args.demo_data_dir)
    drift = tuple(args.drift) if args.drift else tuple(DemoDrift.parse(d) for d in DEFAULT_DRIFT)
    if args.no_drift:
        drift = ()
    plan = DemoPlan(minutes=args.minutes, rate=args.rate, seed=args.seed, drift=drift,
                    time_scale=args.time_scale, cards=args.cards, predict_share=args.predict_share,
                    bootstrap_labels=args.bootstrap_labels, history_hours=args.history_hours,
                    http_port=args.http_port,
                    kafka_port=args.kafka_port, redis_port=args.redis_port)
    try:
        plan.check()
    except DemoError as exc:
        raise CliError(str(exc)) from None
    return Demo(plan, settings).run()


# --- freshet produce ------------------------------------------------------------------

def add_produce_arguments(parser: argparse.ArgumentParser) -> None:
    """The `freshet produce` options."""
    parser.description = (
        "Publish seeded card transactions (key card_id, JSON, event_ts in epoch seconds) at a fixed "
        "offered rate, and their fraud labels (freshet.labels/1, request_id = transaction_id) after a "
        "simulated delay. Prints progress to stderr and a JSON summary as the last stdout line.")
    parser.add_argument("--rate", type=_positive, default=1000.0,
                        help="offered events per wall-clock second (default 1000)")
    parser.add_argument("--count", type=_count, help="stop after this many events")
    parser.add_argument("--duration", type=_seconds, help="stop after this many wall-clock seconds")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same events (default 0)")
    parser.add_argument("--drift", type=_drift_arg(workload.parse_drift), action="append", default=[],
                        metavar="KIND@WHEN",
                        help="inject drift from WHEN simulated seconds on (suffix s/m/h allowed); KIND is "
                             "covariate (amounts and country/channel mix shift) or concept (fraud moves to "
                             "card testing); repeatable")
    parser.add_argument("--topic", default=workload.DEFAULT_TOPIC,
                        help=f"transactions topic (default {workload.DEFAULT_TOPIC!r}, env "
                             "FRESHET_TRANSACTIONS_TOPIC)")
    parser.add_argument("--time-scale", type=_positive, default=1.0,
                        help="simulated seconds per wall-clock second (default 1)")
    parser.add_argument("--start-ts", type=float, help="event time of the first event, epoch seconds (default now)")
    parser.add_argument("--cards", type=_at_least_one, default=10_000, help="number of cards (default 10000)")
    parser.add_argument("--merchants", type=_at_least_one, default=1_000, help="number of merchants (default 1000)")
    parser.add_argument("--fraud-rate", type=_arg(float, lambda v: 0 < v < 0.5, "a fraction in (0, 0.5)"),
                        default=0.03, help="share of fraudulent transactions (default 0.03)")
    parser.add_argument("--covariate-factor", type=_positive, default=2.0,
                        help="amount multiplier per covariate drift (default 2)")
    parser.add_argument("--label-delay", type=_seconds, default=30.0,
                        help="simulated seconds between a transaction and its label (default 30)")
    parser.add_argument("--no-labels", action="store_true", help="publish no labels")
    parser.add_argument("--jitter", type=_seconds, default=0.0,
                        help="move event times back by up to this many seconds: out-of-order events (default 0)")
    parser.add_argument("--late-fraction", type=_fraction, default=0.0,
                        help="share of events whose event time is --late-by seconds old (default 0)")
    parser.add_argument("--late-by", type=_seconds, default=120.0,
                        help="how late a late event is, in seconds (default 120, beyond the 30 s lateness "
                             "feature_repo allows)")
    parser.add_argument("--malformed-fraction", type=_fraction, default=0.0,
                        help="share of events sent broken: bad JSON, a missing field or a wrong type (default 0)")
    parser.add_argument("--skip", type=_count, default=0,
                        help="generate and drop this many events first: continue a run with the same seed, rate, "
                             "time scale and --start-ts that published them (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def cmd_produce(args: argparse.Namespace, settings: Settings) -> int:
    """Run `freshet produce`: publish, print the summary as one JSON line on stdout."""

    def show(p: dict[str, Any]) -> None:
        print(f"produce: {p['sent']:,} sent  {p['rate']:,.0f} events/s  {p['labels']:,} labels  "
              f"event time {iso_utc(p['sim_ts'])}", file=sys.stderr, flush=True)

    summary = workload.publish(
        resolve_endpoints(settings), args.topic, args.rate, count=args.count, duration=args.duration,
        seed=args.seed, labels=not args.no_labels, drift=args.drift, progress=None if args.quiet else show,
        time_scale=args.time_scale, start_ts=args.start_ts, cards=args.cards, merchants=args.merchants,
        fraud_rate=args.fraud_rate, covariate_factor=args.covariate_factor, label_delay_s=args.label_delay,
        jitter_s=args.jitter, late_fraction=args.late_fraction, late_by_s=args.late_by,
        malformed_fraction=args.malformed_fraction, skip=args.skip,
    )
    if not args.quiet:
        print(f"produce: {summary['sent']:,} events ({summary['malformed']:,} malformed, {summary['late']:,} late) "
              f"and {summary['labels']:,} labels in {summary['elapsed_s']:.1f} s = {summary['rate']:,.0f} events/s",
              file=sys.stderr, flush=True)
    print(orjson.dumps(summary).decode(), flush=True)
    if summary["failed"]:
        print(f"produce: {summary['failed']} messages were not acknowledged: {summary['first_error']}",
              file=sys.stderr)
        return 1
    return 0
