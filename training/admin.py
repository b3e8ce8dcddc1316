"""The model admin commands: `freshet models list|show|promote|rollback|shadow|canary`.

Owns how versions read on a terminal and promotion by hand: the same model gate the
retrainer applies (freshet.gates), the same `freshet.models` event serving follows.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from freshet.errors import CliError
from freshet.settings import DEFAULT_MODEL_NAME
from freshet.times import iso_utc

log = logging.getLogger("freshet.models")

METRIC_COLUMNS = ("auc", "log_loss", "error_rate")


def _models(settings, publish: bool):
    """The model registry; with `publish`, with the Kafka endpoint found (events) or a warning saying why not."""
    from freshet.endpoints import resolve_endpoints
    from freshet.models import ModelRegistry

    if publish:
        try:
            settings = resolve_endpoints(settings, need_redis=False)
        except CliError:
            log.warning("FRESHET_KAFKA_BOOTSTRAP_SERVERS is not set and no embedded stack runs for %s: no "
                        "freshet.models event is sent", settings.data_path)
    return ModelRegistry(settings, publish_events=publish)


def _name(args, settings) -> str:
    return args.model or settings.model_name


def _when(ts: float | None) -> str:
    return iso_utc(ts) if ts else ""


def _metric(v: dict[str, Any], k: str) -> str:
    x = v["metrics"].get(k)
    return "" if x is None else f"{x:.4f}"


def version_table(versions: list[dict[str, Any]]) -> str:
    """Versions as an aligned table, newest first.

    >>> print(version_table([{"version": "2", "aliases": ["champion"], "created_at": 0, "format": "f",
    ...     "metrics": {"auc": 0.91234}, "gate": "passed"}]))
    VERSION  ALIASES   CREATED  AUC     LOG_LOSS  ERROR_RATE  GATE    FORMAT
    2        champion           0.9123                        passed  f
    """
    head = ["VERSION", "ALIASES", "CREATED", *(m.upper() for m in METRIC_COLUMNS), "GATE", "FORMAT"]
    rows = [[v["version"], ",".join(v["aliases"]) or "-", _when(v.get("created_at")),
             *(_metric(v, m) for m in METRIC_COLUMNS), (v.get("gate") or "").split(":")[0], v.get("format", "")]
            for v in versions]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows])


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, default=str))


def cmd_list(args, settings) -> int:
    from freshet.models import ModelNotFound

    reg = _models(settings, publish=False)
    try:
        versions = reg.versions(_name(args, settings))
    except ModelNotFound as exc:
        raise CliError(f"{exc} (choose one with --model NAME)") from None
    if args.json:
        _print_json(versions)
    else:
        print(version_table(versions))
    return 0


def _find(reg, name: str, version: str) -> dict[str, Any]:
    from freshet.models import ModelNotFound

    try:
        versions = reg.versions(name)
    except ModelNotFound as exc:
        raise CliError(f"{exc} (choose one with --model NAME)") from None
    found = next((v for v in versions if v["version"] == str(version)), None)
    if found is None:
        raise CliError(f"model {name!r} has no version {version}; versions: "
                       f"{', '.join(v['version'] for v in versions) or 'none'} (see 'freshet models list')")
    return found


def describe(reg, name: str, version: str) -> dict[str, Any]:
    """One version in full: registry entry, lineage, dataset inputs and training snapshot (when recorded)."""
    from freshet.models import MLFLOW_FORMAT, ModelNotFound
    from freshet.training.snapshot import Snapshot

    doc = _find(reg, name, version)
    run = reg.client.get_run(doc["run_id"]) if doc.get("run_id") else None
    lineage = run.data.tags.get("freshet.lineage") if run else None
    doc["lineage"] = json.loads(lineage) if lineage else {}
    doc["pyfunc_uri"] = f"models:/{name}/{version}" if doc.get("format") == MLFLOW_FORMAT else None
    doc["datasets"] = reg.training_inputs(name, version) if run else []
    try:
        doc["snapshot"] = Snapshot.from_dict(reg.training_snapshot(name, version)).summary()
    except (ModelNotFound, ValueError, KeyError) as exc:
        doc["snapshot"] = None
        doc["snapshot_note"] = str(exc)
    return doc


def _lines(pairs: list[tuple[str, Any]], indent: str = "") -> list[str]:
    return [f"{indent}{label:<{17 - len(indent)}}{value}" for label, value in pairs]


def _show_text(doc: dict[str, Any]) -> str:
    window = doc["training_window"]
    lines = _lines([
        ("version", f"{doc['version']}  ({', '.join(doc['aliases']) or 'no alias'})"),
        ("created", _when(doc.get("created_at"))),
        ("format", f"{doc.get('format')}" + (f"  -> mlflow.pyfunc.load_model('{doc['pyfunc_uri']}')"
                                               if doc.get("pyfunc_uri") else
                                               "  (not an MLflow model: retrain to replace it)")),
        ("run", doc.get("run_id")),
        ("metrics", ", ".join(f"{k}={v:.4f}" for k, v in sorted(doc["metrics"].items())) or "-"),
        ("feature service", f"{doc.get('feature_service') or '-'} ({len(doc['feature_names'])} inputs)"),
        ("training window", f"{window['start']} .. {window['end']}" if window["start"] or window["end"] else "-"),
        ("dataset", doc.get("dataset_fingerprint") or "-"),
        ("gate", doc.get("gate") or "-"),
        ("decision", doc.get("promotion_decision") or "-"),
        ("online", _evidence_text(doc.get("online_evidence")))])
    snap = doc.get("snapshot")
    if not snap:
        return "\n".join([*lines, *_lines([("snapshot", f"none: {doc.get('snapshot_note', '')}")])])
    ev, lb, pr = snap["events"], snap["labels"], snap["predictions"]
    code = f"freshet {snap.get('freshet') or '?'}, git {snap.get('git_revision') or 'unknown'}"
    lines += _lines([("snapshot", snap["digest"])])
    lines += _lines([
        ("events", f"{ev['rows']} rows in {ev['parts']} part files of {ev['topic']}"),
        ("labels", f"{lb['rows']} rows in {lb['parts']} part files of {lb['topic']}; next offsets "
                   f"{lb['positions'] or '-'}"),
        ("served", f"{pr['rows']} predictions in {pr['parts']} part files"),
        ("features", snap["feature_definitions"]),
        ("code", code + (" (with local changes)" if snap.get("git_dirty") else "")),
        ("seed", snap["seed"])], indent="  ")
    lines.append(f"reproduce with:  freshet retrain --reproduce {doc['name']}/{doc['version']}")
    return "\n".join(lines)


def _evidence_text(ev: dict[str, Any] | None) -> str:
    """The monitor's latest online comparison of a version with the champion, in one line.

    >>> print(_evidence_text({"role": "shadow", "champion": "3", "n": 400, "error_rate": 0.05,
    ...     "champion_error_rate": 0.04, "difference": [-0.01, 0.03], "verdict": "no difference"}))
    as shadow vs champion v3: 5.00% vs 4.00% on 400 outcomes, difference [-1.00, +3.00] points: no difference
    """
    if not ev:
        return "-"
    low, high = ev.get("difference", [float("nan")] * 2)
    return (f"as {ev.get('role')} vs champion v{ev.get('champion')}: {100 * ev.get('error_rate', 0):.2f}% vs "
            f"{100 * ev.get('champion_error_rate', 0):.2f}% on {ev.get('n')} outcomes, difference "
            f"[{100 * low:+.2f}, {100 * high:+.2f}] points: {ev.get('verdict')}")


def cmd_show(args, settings) -> int:
    reg = _models(settings, publish=False)
    name = _name(args, settings)
    doc = {"name": name, **describe(reg, name, args.version)}
    if args.json:
        _print_json(doc)
    else:
        print(_show_text(doc))
    return 0


def _announced(reg, verb: str, name: str, version: str, before: str | None) -> None:
    _report_switch(reg, f"{verb} {name} version {version} to champion (was {before or 'none'})")


def _report_switch(reg, what: str) -> None:
    """What changed, and whether servers heard of it now or at their next registry poll."""
    print(what)
    if reg.event_delivered:
        print(f"event sent on {reg.settings.topic_models}: servers switch now")
    else:
        print(f"no event reached {reg.settings.topic_models or 'Kafka'}: servers switch when they next poll the "
              "registry (within 30 s by default)", file=sys.stderr)


def cmd_promote(args, settings) -> int:
    from freshet import features
    from freshet.gates import check_version, record_verdict
    from freshet.models import ModelNotFound, UnsupportedModel

    reg = _models(settings, publish=True)
    name = _name(args, settings)
    _find(reg, name, args.version)
    before = reg.current_version(name)
    if str(before) == str(args.version):
        print(f"{name} version {args.version} is the champion already")
        return 0
    feature_registry = features.load_registry(reg.settings)  # a missing repo is its own error, not the version's
    try:
        reason = check_version(reg, feature_registry, name, args.version)
    except (ModelNotFound, UnsupportedModel, ValueError) as exc:
        raise CliError(f"not promoted: version {args.version} does not load: {exc}") from None
    if reason and not args.force:
        raise CliError(f"not promoted: version {args.version} fails the model gate: {reason} "
                       "(--force promotes it anyway)")
    if args.online_evidence:
        from freshet.challengers import evidence_problem

        problem = evidence_problem(_find(reg, name, args.version).get("online_evidence"), before,
                                   reg.settings.rollback_min_outcomes)
        if problem:
            raise CliError(f"not promoted: {problem}; let the monitor compare it with the champion first "
                           f"('freshet models shadow {args.version}' or 'freshet models canary {args.version}', then "
                           f"'freshet models show {args.version}'), or promote without --online-evidence")
    if reason:
        log.warning("promoting %s version %s despite the model gate (--force): %s", name, args.version, reason)
        record_verdict(reg, name, args.version, f"{reason} (promoted with --force)")
    reg.promote(name, args.version)
    _announced(reg, "promoted", name, args.version, before)
    return 0


def cmd_rollback(args, settings) -> int:
    from freshet.models import ModelNotFound

    reg = _models(settings, publish=True)
    name = _name(args, settings)
    before = reg.current_version(name)
    try:
        event = reg.rollback(name)
    except ModelNotFound as exc:
        raise CliError(f"{exc} (see 'freshet models list')") from None
    _announced(reg, "rolled back", name, event.version, before)
    return 0


def _challenger_checks(reg, name: str, version: str, force: bool) -> None:
    """A challenger must load and pass the model gate: a canary answers requests, a shadow is scored on them."""
    from freshet import features
    from freshet.gates import check_version, record_verdict
    from freshet.models import ModelNotFound, UnsupportedModel

    _find(reg, name, version)
    feature_registry = features.load_registry(reg.settings)
    try:
        reason = check_version(reg, feature_registry, name, version)
    except (ModelNotFound, UnsupportedModel, ValueError) as exc:
        raise CliError(f"version {version} does not load: {exc}") from None
    if reason and not force:
        raise CliError(f"version {version} fails the model gate: {reason} (--force sets it anyway; servers "
                       "still refuse to score a version the gate rejects)")
    if reason:
        record_verdict(reg, name, version, f"{reason} (set as a challenger with --force)")


def cmd_shadow(args, settings) -> int:
    return _set_challenger(args, settings, "shadow")


def cmd_canary(args, settings) -> int:
    return _set_challenger(args, settings, "canary")


def _set_challenger(args, settings, role: str) -> int:
    from freshet.challengers import parse_share

    if len(args.target) > 2:
        raise CliError(f"'freshet models {role}' takes [NAME] VERSION, got {' '.join(args.target)}")
    if len(args.target) == 2:
        args.model, args.version = args.target
    else:
        args.version = args.target[0] if args.target else None
    if args.version is not None and not str(args.version).isdigit():
        raise CliError(f"VERSION must be a version number, got {args.version!r} (see 'freshet models list')")
    reg = _models(settings, publish=True)
    name = _name(args, settings)
    if args.clear:
        if args.version is not None:
            raise CliError(f"--clear takes no version: 'freshet models {role} --clear'")
        event = reg.clear_challenger(name, role)
        if event is None:
            print(f"{name} has no {role}; nothing to clear")
            return 0
        _report_switch(reg, f"cleared the {role} of {name} (was version {event.version})")
        return 0
    if args.version is None:
        current = reg.challengers(name)
        if current[role] is None:
            print(f"{name} has no {role} (set one with 'freshet models {role} VERSION')")
        else:
            extra = f" at {current['canary_share']:.1%} of traffic" if role == "canary" else ""
            print(f"{role} of {name}: version {current[role]}{extra}")
        return 0
    share = None
    if role == "canary":
        try:
            share = parse_share(args.share)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    _challenger_checks(reg, name, args.version, args.force)
    try:
        reg.set_challenger(name, role, args.version, share)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    what = (f"version {args.version} of {name} answers {share:.1%} of /predict traffic as the canary"
            if role == "canary" else
            f"version {args.version} of {name} scores every /predict request in shadow (logged, never returned)")
    _report_switch(reg, what)
    return 0


def register(sub: argparse._SubParsersAction, handlers: dict) -> None:
    p = sub.add_parser(
        "models", help="list, show, promote, roll back model versions; shadow and canary (MLflow registry)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Model versions in the MLflow registry at FRESHET_MLFLOW_TRACKING_URI (default: sqlite in the\n"
                    "data dir). Serving answers with the version the 'champion' alias points at.\n\n"
                    "  freshet models list               versions, aliases, metrics, created time\n"
                    "  freshet models show 3             one version: lineage, metrics, training snapshot\n"
                    "  freshet models promote 3          champion -> version 3, if it passes the model gate\n"
                    "  freshet models rollback           champion -> the version promoted before it\n"
                    "  freshet models shadow 4           version 4 scores live traffic beside the champion\n"
                    "  freshet models canary 4 --share 0.1   version 4 answers 10% of traffic\n"
                    "  freshet models shadow --clear     no shadow any more (canary --clear likewise)\n"
                    "  freshet models promote 4 --online-evidence   only if the monitor found it no worse live\n\n"
                    "Each change publishes a freshet.models event on FRESHET_TOPIC_MODELS: every\n"
                    "'freshet serve' switches at once (without Kafka, when it next polls the registry).\n"
                    "'freshet monitor' compares shadow and canary with the champion on labelled outcomes, and\n"
                    "rolls back a new champion whose error rate is significantly worse than its predecessor's\n"
                    "(FRESHET_ROLLBACK_*).",
        epilog="exit status: 0 done, 2 usage error, unknown model or version, or a version the gate rejects")
    p.add_argument("--model", help=f"registered model name (default: FRESHET_MODEL_NAME, i.e. {DEFAULT_MODEL_NAME})")
    actions = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    ls = actions.add_parser("list", help="versions, newest first, with aliases, metrics and created time")
    ls.add_argument("--json", action="store_true", help="print the versions as JSON")
    show = actions.add_parser("show", help="one version's details, its lineage and its training snapshot")
    show.add_argument("version", help="version number")
    show.add_argument("--json", action="store_true", help="print the details as JSON")
    promote = actions.add_parser("promote", help="make a version the champion (checked by the model gate)")
    promote.add_argument("version", help="version number")
    promote.add_argument("--force", action="store_true",
                         help="promote even if the model gate rejects the version (recorded on the version)")
    promote.add_argument("--online-evidence", action="store_true",
                         help="promote only a version the monitor compared live with the current champion (as "
                              "shadow or canary) on at least FRESHET_ROLLBACK_MIN_OUTCOMES labelled outcomes "
                              "without finding it worse")
    rollback = actions.add_parser("rollback", help="make the previously promoted version the champion again")
    shadow = actions.add_parser(
        "shadow", help="score live traffic with a version beside the champion (logged, never returned)",
        description="The shadow version scores every /predict request the champion answers; its score is logged "
                    "with its version in the prediction record (field 'shadow') and never returned. Without "
                    "VERSION, prints the current shadow.")
    shadow.add_argument("target", nargs="*", metavar="[NAME] VERSION",
                        help="version number, optionally after the model name (default name: --model)")
    canary = actions.add_parser(
        "canary", help="let a version answer a share of live traffic",
        description="The canary version answers --share of /predict requests, picked by a hash of the request id "
                    "(else of the entities), so the same request meets the same version; the answer's "
                    "model_version says which one answered. Without VERSION, prints the current canary.")
    canary.add_argument("target", nargs="*", metavar="[NAME] VERSION",
                        help="version number, optionally after the model name (default name: --model)")
    canary.add_argument("--share", default="0.1", help="fraction of traffic, above 0 and at most 1 (default: 0.1)")
    for action in (shadow, canary):
        action.add_argument("--clear", action="store_true", help="remove it: the champion answers everything")
        action.add_argument("--force", action="store_true",
                            help="set it even if the model gate rejects the version (servers will still refuse)")
    for action in (ls, show, promote, rollback, shadow, canary):
        action.add_argument("--model", default=argparse.SUPPRESS, help="registered model name")
    commands = {"list": cmd_list, "show": cmd_show, "promote": cmd_promote, "rollback": cmd_rollback,
                "shadow": cmd_shadow, "canary": cmd_canary}
    handlers["models"] = lambda args, settings: commands[args.models_command](args, settings)
