"""The demo's numbers: summary.json from what a run recorded (data.json), and the headline
lines the console prints at the end.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _q(values, q: float) -> float | None:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    return round(float(np.percentile(v, q)), 2) if len(v) else None


def version_key(v: str) -> tuple:
    """Model versions in registry order, numbers before names.

    >>> sorted(["10", "2", "candidate"], key=version_key)
    ['2', '10', 'candidate']
    """
    return (0, int(v)) if str(v).isdigit() else (1, str(v))


def rates(samples: list[dict], key: str, window: float) -> tuple[np.ndarray, np.ndarray]:
    """(t, per-second rate of the counter `key` over the trailing `window` seconds), per sample."""
    if len(samples) < 2:
        return np.array([]), np.array([])
    t = np.array([s["t"] for s in samples], dtype=float)
    v = np.array([s[key] for s in samples], dtype=float)
    out_t, out_r = [], []
    j = 0
    for i in range(1, len(t)):
        while t[i] - t[j] > window and j < i - 1:
            j += 1
        dt = t[i] - t[j]
        if dt > 0:
            out_t.append(t[i])
            out_r.append((v[i] - v[j]) / dt)
    return np.array(out_t), np.array(out_r)


def promotion_times(data: dict) -> dict[str, float]:
    """When each version became the served one: its champion event, else its first prediction."""
    out: dict[str, float] = {}
    for e in data["model_events"]:
        if e["stage"] == "champion" and e["version"] not in out:
            out[e["version"]] = e["t"]
    p = data["predictions"]
    for t, v in zip(p["t"], p["version"]):
        out.setdefault(v, t)
    return out


def trained_from(data: dict) -> dict[str, float] | None:
    """version -> the traffic second its training rows start after (its --since-request cut-off,
    an event time, on the traffic clock); None when the run recorded no trainings (an older data.json).

    A version without a cut-off (the bootstrap, a training without a label wait) learnt from labels of
    any age: it maps to -inf, trained before every drift.

    >>> data = {"meta": {"start_ts": 1000.0, "plan": {"time_scale": 50.0}},
    ...         "trainings": [{"version": "1", "since": None}, {"version": "2", "since": 1000.0 + 50 * 70}]}
    >>> trained_from(data)
    {'1': -inf, '2': 70.0}
    """
    if "trainings" not in data:
        return None
    start_ts = data["meta"].get("start_ts")
    scale = (data["meta"].get("plan") or {}).get("time_scale") or 1.0
    out: dict[str, float] = {}
    for x in data["trainings"]:
        if x.get("version") is None:
            continue
        since = x.get("since")
        out[str(x["version"])] = (-math.inf if since is None or start_ts is None
                                  else round((since - start_ts) / scale, 3))
    return out


def trained_for(data: dict, start: float) -> set[str]:
    """The versions trained for a drift at traffic second `start`: their training rows all come after
    it (cut-off at or after the injection). A version promoted after a drift but trained on labels from
    before it is not the drift's. Without recorded trainings, the versions promoted at or after `start`."""
    cut = trained_from(data)
    if cut is None:
        return {v for v, t in promotion_times(data).items() if t >= start}
    return {v for v, t in cut.items() if t >= start}


def error_buckets(data: dict) -> dict[str, dict[str, Any]]:
    """Error rate of labelled predictions before the first drift, after a drift while served by a
    version not trained for it, and after a drift while served by one trained for it (`trained_for`)."""
    drifts = sorted(d["t"] for d in data["meta"].get("drift", []))
    fresh = {d: trained_for(data, d) for d in drifts}
    p = data["predictions"]
    buckets = {"before_drift": [], "after_drift": [], "after_promotion": []}
    for t, v, pred, truth in zip(p["t"], p["version"], p["label"], p["truth"]):
        if truth is None or pred is None:
            continue
        wrong = int(pred != truth)
        if not drifts or t < drifts[0]:
            buckets["before_drift"].append(wrong)
            continue
        latest = max(d for d in drifts if d <= t)
        stale = v not in fresh[latest]
        buckets["after_drift" if stale else "after_promotion"].append(wrong)
    return {k: {"error_rate": round(float(np.mean(w)), 4) if w else None, "labelled_predictions": len(w)}
            for k, w in buckets.items()}


# --- judging the alerts -------------------------------------------------------------------

WARMING_UP = "warming_up"   # the monitor's notice that a windowed feature is not judged yet: not an alert


def wilson(k: int, n: int, z: float = 1.96) -> list[float] | None:
    """95% Wilson score interval of a proportion k/n.

    >>> wilson(0, 100), wilson(5, 100)
    ([0.0, 0.037], [0.0215, 0.1118])
    """
    if n <= 0:
        return None
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [round(max(0.0, c - h), 4), round(min(1.0, c + h), 4)]


def poisson_interval(k: int) -> list[float]:
    """Exact (Garwood) 95% interval of a Poisson count k.

    >>> poisson_interval(0), poisson_interval(3)
    ([0.0, 3.689], [0.619, 8.767])
    """
    from scipy import stats

    lo = 0.0 if k == 0 else float(stats.chi2.ppf(0.025, 2 * k) / 2)
    return [round(lo, 3), round(float(stats.chi2.ppf(0.975, 2 * k + 2) / 2), 3)]


def _rate(wrong: list[int]) -> dict[str, Any]:
    n, k = len(wrong), int(sum(wrong))
    return {"labelled_predictions": n, "errors": k, "error_rate": round(k / n, 4) if n else None,
            "ci95": wilson(k, n)}


def _difference(a: dict, b: dict) -> dict[str, Any] | None:
    """b's error rate minus a's, with a 95% normal-approximation interval."""
    if not a["labelled_predictions"] or not b["labelled_predictions"]:
        return None
    pa, pb = a["errors"] / a["labelled_predictions"], b["errors"] / b["labelled_predictions"]
    se = math.sqrt(pa * (1 - pa) / a["labelled_predictions"] + pb * (1 - pb) / b["labelled_predictions"])
    return {"difference": round(pb - pa, 4), "ci95": [round(pb - pa - 1.96 * se, 4), round(pb - pa + 1.96 * se, 4)]}


def judge_alerts(data: dict, traffic_s: float) -> dict[str, Any]:
    """How good the alerts were: how many came before the first injection (none should), how soon
    each injection was alerted on, what share of each kind came after an injection; and whether each
    drift's retrained version served fewer errors than the versions before it, after the drift.

    Times are seconds of traffic, counts come with 95% intervals (Poisson for the alert count,
    Wilson for shares and error rates, normal approximation for differences of error rates).
    """
    drifts = sorted(data["meta"].get("drift", []), key=lambda d: d["t"])
    alerts = sorted((a for a in data["alerts"] if a.get("detector") != WARMING_UP), key=lambda a: a["t"])
    first = drifts[0]["t"] if drifts else None
    quiet_s = max(0.0, first if first is not None else traffic_s)
    before = [a for a in alerts if first is None or a["t"] < first]
    k = len(before)
    ci = poisson_interval(k)
    out: dict[str, Any] = {
        "before_first_injection": {
            "alerts": k, "seconds": round(quiet_s, 1),
            "per_minute": round(k / quiet_s * 60, 3) if quiet_s else None,
            "per_minute_ci95": [round(x / quiet_s * 60, 3) for x in ci] if quiet_s else None,
            "examples": [f"{a['t']:.1f}s {a['kind']} {a['subject']} ({a['detector']})" for a in before[:5]]},
        "warming_notices": sum(1 for a in data["alerts"] if a.get("detector") == WARMING_UP),
    }
    promotions = sorted((e for e in data["model_events"] if e["stage"] == "champion"), key=lambda e: e["t"])
    injections = []
    for i, d in enumerate(drifts):
        end = drifts[i + 1]["t"] if i + 1 < len(drifts) else math.inf
        mine = [a for a in alerts if d["t"] <= a["t"] < end]
        first_by_kind = {}
        for a in mine:
            first_by_kind.setdefault(a["kind"], round(a["t"] - d["t"], 1))
        # the drift's promotion: the first of a version trained for it (not one trained before it and
        # promoted after it, whose traffic counts with the older versions')
        mine_v = trained_for(data, d["t"])
        promoted = next((e for e in promotions if d["t"] <= e["t"] < end and e["version"] in mine_v), None)
        injections.append({
            "kind": d["kind"], "t": d["t"], "alerts": len(mine),
            "first_alert_s": round(mine[0]["t"] - d["t"], 1) if mine else None,
            "first_alert": f"{mine[0]['kind']} {mine[0]['subject']} ({mine[0]['detector']})" if mine else None,
            "first_alert_s_by_kind": first_by_kind,
            "promotion_s": round(promoted["t"] - d["t"], 1) if promoted else None,
            "promoted_version": promoted["version"] if promoted else None,
            **_error_rates_around(data, d["t"], end),
        })
    out["injections"] = injections
    out["detected"] = sum(1 for x in injections if x["first_alert_s"] is not None)
    shares = {}
    for kind in sorted({a["kind"] for a in alerts}):
        of_kind = [a for a in alerts if a["kind"] == kind]
        after = sum(1 for a in of_kind if first is not None and a["t"] >= first)
        shares[kind] = {"alerts": len(of_kind), "after_injection": after,
                        "share": round(after / len(of_kind), 4), "ci95": wilson(after, len(of_kind))}
    out["share_after_injection"] = shares
    baseline = [w for t, w in _outcomes(data) if first is None or t < first]
    out["error_rate_before_drift"] = _rate(baseline)
    return out


def _outcomes(data: dict, versions: set[str] | None = None) -> list[tuple[float, int]]:
    p = data["predictions"]
    return [(t, int(pred != truth)) for t, v, pred, truth in zip(p["t"], p["version"], p["label"], p["truth"])
            if truth is not None and pred is not None and (versions is None or v in versions)]


def _error_rates_around(data: dict, start: float, end: float) -> dict[str, Any]:
    """Error rate after a drift at `start` (until `end`): served by versions not trained for it
    ("between the drift and the promotion", whenever they were promoted) and by versions trained
    for it (`trained_for`)."""
    fresh = trained_for(data, start)
    p = data["predictions"]
    between, after = [], []
    for t, v, pred, truth in zip(p["t"], p["version"], p["label"], p["truth"]):
        if truth is None or pred is None or not start <= t < end:
            continue
        (after if v in fresh else between).append(int(pred != truth))
    b, a = _rate(between), _rate(after)
    return {"error_rate_before_promotion": b, "error_rate_after_promotion": a, "change": _difference(b, a)}


def summarize(data: dict) -> dict[str, Any]:
    meta = data["meta"]
    samples = data["samples"]
    last = samples[-1] if samples else {"produced": 0, "processed": 0, "deadletter": 0}
    produce = meta.get("produce") or {}
    traffic_s = produce.get("elapsed_s") or (samples[-1]["t"] if samples else 0.0)
    if produce.get("sent") is not None:  # the producer's own count, acknowledged by the broker
        last = {**last, "produced": max(0, produce["sent"] - produce.get("failed", 0))}
    rates_5s = rates(samples, "processed", 5.0)
    fr = data["freshness"]
    p = data["predictions"]
    drifts = sorted(meta.get("drift", []), key=lambda d: d["t"])
    first_drift = drifts[0]["t"] if drifts else None
    alerts = [{**a, "after_injection": first_drift is not None and a["t"] >= first_drift} for a in data["alerts"]
              if a.get("detector") != WARMING_UP]
    promotions = [e for e in data["model_events"] if e["stage"] == "champion"]
    for e in promotions:
        e["after_drift"] = first_drift is not None and e["t"] >= first_drift
    by_version = {}
    for v in sorted(set(p["version"]), key=version_key):
        idx = [i for i, x in enumerate(p["version"]) if x == v]
        lab = [(p["label"][i], p["truth"][i]) for i in idx if p["truth"][i] is not None and p["label"][i] is not None]
        by_version[v] = {"predictions": len(idx),
                         "error_rate": round(float(np.mean([a != b for a, b in lab])), 4) if lab else None}
    failures = data.get("prediction_failures", {})
    loads = [x["load"] for x in samples if x.get("load") is not None]
    cpu_demo = [x["cpu_demo"] for x in samples if x.get("cpu_demo") is not None]
    cpu_other = [x["cpu_other"] for x in samples if x.get("cpu_other") is not None]
    summary = {
        "run_dir": meta.get("run_dir"),
        "interrupted": bool(meta.get("interrupted")),
        "failed": meta.get("failed") or None,
        "plan": meta.get("plan"),
        "components": meta.get("components", {}),
        "traffic_s": round(float(traffic_s), 1),
        "events": {"produced": last["produced"], "processed": last["processed"],
                   "deadlettered": last.get("deadletter", 0), "labels": data.get("labels_seen", 0),
                   "fraud_labels": data.get("fraud_labels", 0)},
        "events_per_s": round(last["processed"] / traffic_s, 1) if traffic_s else None,
        "events_per_s_peak_5s": round(max(rates_5s[1]), 1) if len(rates_5s[1]) else None,
        "freshness_ms": {"p50": _q(fr["all_ms"], 50), "p99": _q(fr["all_ms"], 99), "max": _q(fr["all_ms"], 100),
                         "card_view_p50": _q(fr["first_ms"], 50), "card_view_p99": _q(fr["first_ms"], 99),
                         "samples": len(fr["all_ms"]), "not_visible_within_30s": fr.get("not_visible", 0),
                         "unresolved_at_end": fr.get("unresolved", 0),
                         "events_read": fr.get("transactions_read", 0),
                         "measured": "Kafka create time of each event -> first poll that sees its event time "
                                     "in Redis for every view (polled every ~10 ms)"},
        "api_ms": {"p50": _q(p["latency_ms"], 50), "p99": _q(p["latency_ms"], 99),
                   "p999": _q(p["latency_ms"], 99.9), "requests_ok": len(p["latency_ms"]),
                   "requests_failed": sum(failures.values()), "failures_by_status": failures,
                   "measured": "client side: POST /predict round trip from the demo's aiohttp client"},
        "unscored": data.get("unscored", {}),
        "drift": drifts,
        "alerts": alerts,
        "alerts_after_injection": sum(a["after_injection"] for a in alerts),
        "retrainings": data["retrains"],
        "registered_versions": data.get("model_versions", []),
        "promotions": promotions,
        "promotions_after_drift": sum(e["after_drift"] for e in promotions),
        "error_rate": error_buckets(data),
        "error_rate_by_version": by_version,
        "judgement": judge_alerts(data, float(traffic_s)),
        "history": meta.get("history"),
        "machine": {"cpus": meta.get("cpus"),
                    "load_1m_mean": round(float(np.mean(loads)), 2) if loads else None,
                    "load_1m_max": round(float(np.max(loads)), 2) if loads else None,
                    "cpu_demo_cores": round(float(np.mean(cpu_demo)), 2) if cpu_demo else None,
                    "cpu_other_cores": round(float(np.mean(cpu_other)), 2) if cpu_other else None,
                    "cpu_cores_by_process": _cpu_by(samples)},
        "problems": data.get("problems", []),
        "consistency": meta.get("consistency"),
    }
    summary["warnings"] = _warnings(summary, data)
    return summary


def _cpu_by(samples: list[dict]) -> dict[str, float]:
    """Average cores per demo process over the run (bootstrap runs summed into one entry)."""
    n = sum(1 for x in samples if x.get("cpu_by"))
    totals: dict[str, float] = {}
    for x in samples:
        for name, v in (x.get("cpu_by") or {}).items():
            key = "bootstrap" if name.startswith("bootstrap") else name
            totals[key] = totals.get(key, 0.0) + v
    return {k: round(v / n, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])} if n else {}


def _warnings(s: dict, data: dict) -> list[str]:
    """What makes this run's numbers less than they seem, in words."""
    out = []
    p = data["predictions"]
    drifts = s["drift"]
    if drifts and p["t"]:
        first_pred, first_drift = min(p["t"]), drifts[0]["t"]
        if first_pred >= first_drift:
            out.append(f"the first model was served at {first_pred:.0f} s, after the first drift at "
                       f"{first_drift:.0f} s: there is no 'before drift' baseline; inject drift later or "
                       "give the demo more CPU")
        else:
            warm = [t for t in sorted(p["t"])[2000:2001]]
            if warm and warm[0] > first_drift:
                out.append(f"the monitor's reference window (the first 2000 predictions) ended at {warm[0]:.0f} s, "
                           f"after the first drift at {first_drift:.0f} s: part of the reference is drifted")
    m = s.get("machine") or {}
    if m.get("cpus") and (m.get("cpu_other_cores") or 0) > 0.25 * m["cpus"]:
        out.append(f"other work on this machine used {m['cpu_other_cores']:.1f} of its {m['cpus']} CPUs on average "
                   f"during the run (the demo used {m['cpu_demo_cores']:.1f}): freshness and latency are inflated "
                   "by that contention")
    ev = s["events"]
    if ev["produced"] and ev["processed"] < 0.99 * ev["produced"]:
        out.append(f"the stream had processed {ev['processed']:,} of {ev['produced']:,} events when the demo stopped")
    return out


def headline(s: dict) -> str:
    """The numbers the CLI prints at the end."""
    def ms(x):
        return "-" if x is None else f"{x:,.1f} ms"

    def rate(b):
        r = s["error_rate"][b]
        return "-" if r["error_rate"] is None else f"{r['error_rate']:.2%} (n={r['labelled_predictions']:,})"

    ev = s["events"]
    lines = [
        f"events       {ev['processed']:,} processed of {ev['produced']:,} produced in {s['traffic_s']:.0f} s "
        f"= {s['events_per_s'] or 0:,.0f} events/s ({ev['deadlettered']:,} dead-lettered, {ev['labels']:,} labels)",
        f"freshness    p50 {ms(s['freshness_ms']['p50'])}  p99 {ms(s['freshness_ms']['p99'])}  "
        f"({s['freshness_ms']['samples']:,} events, {s['freshness_ms']['not_visible_within_30s']} not visible in 30 s)",
        f"API /predict p50 {ms(s['api_ms']['p50'])}  p99 {ms(s['api_ms']['p99'])}  "
        f"({s['api_ms']['requests_ok']:,} ok, {s['api_ms']['requests_failed']:,} failed)",
        f"alerts       {len(s['alerts'])} ({s['alerts_after_injection']} after the first injection)"
        + "".join(f"\n               {a['t']:6.1f}s  {a['kind']}: {a['subject']} ({a['detector']}, v{a['model_version']})"
                  for a in s["alerts"][:8]),
        f"retrainings  {len(s['retrainings'])} requested, {len(s['registered_versions'])} versions registered",
        f"promotions   {len(s['promotions'])}"
        + "".join(f"\n               {e['t']:6.1f}s  version {e['version']}" for e in s["promotions"][:8]),
        f"error rate   before drift {rate('before_drift')}  after drift {rate('after_drift')}  "
        f"after promotion {rate('after_promotion')}",
        *judgement_lines(s.get("judgement")),
    ]
    c = s.get("consistency")
    if c and c.get("rate") is not None:
        lines.append(f"consistency  {c['rate']:.4f} of {c['compared']:,} served feature values equal their "
                     f"recomputation from the raw log ({c['judged']:,} predictions, a {c['sample']:.0%} sample)")
    m = s.get("machine") or {}
    if m.get("cpu_demo_cores") is not None:
        lines.append(f"machine      {m['cpus']} CPUs: the demo's processes used {m['cpu_demo_cores']:.2f} cores on "
                     f"average, other work {m['cpu_other_cores']:.2f} (load average {m['load_1m_mean']})")
    missing = [f"{k}: {v}" for k, v in s["components"].items() if str(v).startswith(("missing", "exited", "failed"))]
    if missing:
        lines.append("missing      " + "; ".join(missing))
    for w in s.get("warnings", []):
        lines.append(f"warning      {w}")
    if s["problems"]:
        lines.append(f"problems     {len(s['problems'])} (see summary.json)")
    return "\n".join(lines)


def judgement_lines(j: dict | None) -> list[str]:
    """The alert judgement, for the console: quiet before the injections, detection, error rates."""
    if not j:
        return []
    b = j["before_first_injection"]
    lines = [f"judged       {b['alerts']} alerts before the first injection in {b['seconds']:.0f} s "
             f"(95% CI {b['per_minute_ci95'][0]:.2f}-{b['per_minute_ci95'][1]:.2f} per minute)"
             if b["per_minute_ci95"] else f"judged       {b['alerts']} alerts before the first injection"]

    def pct(r):
        if r["error_rate"] is None:
            return "-"
        return f"{r['error_rate']:.2%} [{r['ci95'][0]:.2%}, {r['ci95'][1]:.2%}] (n={r['labelled_predictions']:,})"

    for x in j["injections"]:
        first = "not detected" if x["first_alert_s"] is None else f"first alert after {x['first_alert_s']:.1f} s ({x['first_alert']})"
        promo = "no promotion" if x["promotion_s"] is None else f"v{x['promoted_version']} promoted after {x['promotion_s']:.0f} s"
        lines.append(f"             {x['kind']} at {x['t']:.0f} s: {first}, {x['alerts']} alerts; {promo}")
        lines.append(f"               error rate until then {pct(x['error_rate_before_promotion'])}, "
                     f"after {pct(x['error_rate_after_promotion'])}")
    shares = ", ".join(f"{k} {v['after_injection']}/{v['alerts']}" for k, v in j["share_after_injection"].items())
    if shares:
        lines.append(f"             alerts after an injection, per kind: {shares}")
    return lines
