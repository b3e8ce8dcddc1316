"""The demo's report: headline numbers (summary.json) and an HTML page of plots.

Reads only the measurements `freshet demo` recorded (data.json), so a report can be
rebuilt later: `python -m freshet.report <run dir>`.
"""

from __future__ import annotations

import base64
import html
import io
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import orjson

VERSION_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
DRIFT_COLOR = "#d62728"
PROMOTION_COLOR = "#2ca02c"


# --- numbers ------------------------------------------------------------------------------

def _q(values, q: float) -> float | None:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    return round(float(np.percentile(v, q)), 2) if len(v) else None


def _version_key(v: str) -> tuple:
    return (0, int(v)) if str(v).isdigit() else (1, str(v))


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


def error_buckets(data: dict) -> dict[str, dict[str, Any]]:
    """Error rate of labelled predictions before the first drift, after a drift while served by a
    model promoted before that drift, and after a drift while served by one promoted after it."""
    drifts = sorted(d["t"] for d in data["meta"].get("drift", []))
    promoted = promotion_times(data)
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
        stale = promoted.get(v, -math.inf) < latest
        buckets["after_drift" if stale else "after_promotion"].append(wrong)
    return {k: {"error_rate": round(float(np.mean(w)), 4) if w else None, "labelled_predictions": len(w)}
            for k, w in buckets.items()}


def summarize(data: dict) -> dict[str, Any]:
    meta = data["meta"]
    samples = data["samples"]
    last = samples[-1] if samples else {"produced": 0, "processed": 0, "deadletter": 0}
    produce = meta.get("produce") or {}
    traffic_s = produce.get("elapsed_s") or (samples[-1]["t"] if samples else 0.0)
    if produce.get("sent") is not None:  # the producer's own count, acknowledged by the broker
        last = {**last, "produced": max(0, produce["sent"] - produce.get("failed", 0))}
    rates = _rates(samples, "processed", 5.0)
    fr = data["freshness"]
    p = data["predictions"]
    drifts = sorted(meta.get("drift", []), key=lambda d: d["t"])
    first_drift = drifts[0]["t"] if drifts else None
    alerts = [{**a, "after_injection": first_drift is not None and a["t"] >= first_drift} for a in data["alerts"]]
    promotions = [e for e in data["model_events"] if e["stage"] == "champion"]
    for e in promotions:
        e["after_drift"] = first_drift is not None and e["t"] >= first_drift
    by_version = {}
    for v in sorted(set(p["version"]), key=_version_key):
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
        "events_per_s_peak_5s": round(max(rates[1]), 1) if len(rates[1]) else None,
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
        "machine": {"cpus": meta.get("cpus"),
                    "load_1m_mean": round(float(np.mean(loads)), 2) if loads else None,
                    "load_1m_max": round(float(np.max(loads)), 2) if loads else None,
                    "cpu_demo_cores": round(float(np.mean(cpu_demo)), 2) if cpu_demo else None,
                    "cpu_other_cores": round(float(np.mean(cpu_other)), 2) if cpu_other else None,
                    "cpu_cores_by_process": _cpu_by(samples)},
        "problems": data.get("problems", []),
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
    ]
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


# --- plots --------------------------------------------------------------------------------

def _rates(samples: list[dict], key: str, window: float) -> tuple[np.ndarray, np.ndarray]:
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


def _binned(t, values, width: float, qs=(50, 99)):
    t = np.asarray(t, dtype=float)
    v = np.asarray(values, dtype=float)
    if not len(t):
        return np.array([]), {q: np.array([]) for q in qs}
    edges = np.arange(math.floor(t.min() / width) * width, t.max() + width, width)
    idx = np.digitize(t, edges)
    centers, out = [], {q: [] for q in qs}
    for k in np.unique(idx):
        sel = v[idx == k]
        if len(sel) < 3:
            continue
        centers.append(edges[k - 1] + width / 2)
        for q in qs:
            out[q].append(np.percentile(sel, q))
    return np.array(centers), {q: np.array(x) for q, x in out.items()}


def _events_lines(ax, data: dict, promotions: bool = True, label: bool = True) -> None:
    """Drift injections (red dashed) and promotions (green dotted) on a time axis."""
    seen = set()
    for d in data["meta"].get("drift", []):
        name = f"{d['kind']} drift injected"
        ax.axvline(d["t"], color=DRIFT_COLOR, ls="--", lw=1.2, label=name if label and name not in seen else None)
        seen.add(name)
    if promotions:
        for e in data["model_events"]:
            if e["stage"] == "champion":
                name = "promotion"
                ax.axvline(e["t"], color=PROMOTION_COLOR, ls=":", lw=1.5,
                           label=name if label and name not in seen else None)
                seen.add(name)
                ax.annotate(f"v{e['version']}", (e["t"], 1), xycoords=("data", "axes fraction"),
                            xytext=(2, -12), textcoords="offset points", color=PROMOTION_COLOR, fontsize=8)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#777", wrap=True)
    ax.set_yticks([])


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def plot_throughput(data: dict):
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(10, 7.5), sharex=True,
                                     gridspec_kw={"height_ratios": [1, 1.2, 0.55]})
    n = 0
    for key, label, color in (("produced", "produced", "#999"), ("processed", "processed by the stream", "#1f77b4")):
        t, r = _rates(data["samples"], key, 5.0)
        if len(t):
            a1.plot(t, r, label=label, color=color, lw=1.6)
            n += len(t)
    a1.set_ylabel("events/s (5 s window)")
    a1.set_title("Throughput: events produced and processed (committed offsets of the stream worker)")
    _events_lines(a1, data)
    a1.legend(loc="lower left", fontsize=8)
    a1.grid(alpha=0.3)
    fr = data["freshness"]
    if fr["t"]:
        a2.scatter(fr["t"], fr["all_ms"], s=2, alpha=0.15, color="#1f77b4", label="one event")
        c, qs = _binned(fr["t"], fr["all_ms"], 5.0)
        a2.plot(c, qs[50], color="#111", lw=1.5, label="p50 (5 s)")
        a2.plot(c, qs[99], color="#d62728", lw=1.5, label="p99 (5 s)")
        a2.set_yscale("log")
        a2.legend(loc="upper left", fontsize=8)
        n += len(fr["t"])
    else:
        _empty(a2, "no freshness samples")
    a2.set_ylabel("freshness, ms (log)")
    a2.set_title("Freshness: event produced -> its event time visible in Redis for every view")
    _events_lines(a2, data, label=False)
    a2.grid(alpha=0.3, which="both")
    samples = [x for x in data["samples"] if x.get("cpu_demo") is not None]
    if samples:
        t = [x["t"] for x in samples]
        a3.stackplot(t, [x["cpu_demo"] for x in samples], [x["cpu_other"] for x in samples],
                     labels=["the demo's processes", "other work on the machine"], colors=["#1f77b4", "#bbb"],
                     alpha=0.8)
        cpus = data["meta"].get("cpus")
        if cpus:
            a3.axhline(cpus, color="#333", lw=0.8, ls="--")
        a3.legend(fontsize=7, loc="upper left")
    a3.set_ylabel("CPU cores")
    a3.set_xlabel("seconds since the first event")
    _events_lines(a3, data, label=False, promotions=False)
    a3.grid(alpha=0.3)
    fig.tight_layout()
    return fig, n


def plot_latency(data: dict):
    import matplotlib.pyplot as plt

    p = data["predictions"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [1, 1.4]})
    lat = np.asarray(p["latency_ms"], dtype=float)
    if not len(lat):
        _empty(a1, "no predictions were answered")
        _empty(a2, "")
        return fig, 0
    bins = np.logspace(np.log10(max(lat.min(), 0.05)), np.log10(lat.max() * 1.01 + 1e-9), 60)
    a1.hist(lat, bins=bins, color="#1f77b4", alpha=0.8)
    a1.set_xscale("log")
    for q, color in ((50, "#111"), (99, "#d62728")):
        v = np.percentile(lat, q)
        a1.axvline(v, color=color, ls="--", lw=1.2, label=f"p{q} {v:.1f} ms")
    a1.legend(fontsize=8)
    a1.set_xlabel("POST /predict round trip, ms (client side, log)")
    a1.set_ylabel("requests")
    a1.set_title(f"Prediction latency ({len(lat):,} requests)")
    c, qs = _binned(p["t"], lat, 5.0, (50, 99))
    a2.plot(c, qs[50], color="#111", lw=1.4, label="p50 (5 s)")
    a2.plot(c, qs[99], color="#d62728", lw=1.4, label="p99 (5 s)")
    _events_lines(a2, data)
    a2.set_yscale("log")
    a2.set_xlabel("seconds since the first event")
    a2.set_ylabel("ms (log)")
    a2.set_title("Latency over time")
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig, len(lat)


def _covariate_t(data: dict) -> tuple[float | None, float | None]:
    """(wall t, simulated s) of the first covariate drift, else of the first drift."""
    drifts = sorted(data["meta"].get("drift", []), key=lambda d: (d["kind"] != "covariate", d["t"]))
    if not drifts:
        return None, None
    ts = (data["meta"].get("plan") or {}).get("time_scale", 1.0)
    return drifts[0]["t"], drifts[0]["t"] * ts


def drifted_feature(data: dict) -> str | None:
    """The recorded model feature whose mean moved most (in reference sd) across the drift."""
    f = data["features"]
    t_drift, _ = _covariate_t(data)
    if not f["names"] or t_drift is None:
        return None
    t = np.asarray(f["t"], dtype=float)
    vals = np.array([[np.nan if x is None else x for x in row] for row in f["values"]], dtype=float)
    before, after = vals[t < t_drift], vals[t >= t_drift]
    if len(before) < 20 or len(after) < 20:
        return None
    best, name = -1.0, None
    for j, n in enumerate(f["names"]):
        b, a = before[:, j], after[:, j]
        b, a = b[np.isfinite(b)], a[np.isfinite(a)]
        if len(b) < 20 or len(a) < 20 or np.std(b) == 0:
            continue
        shift = abs(np.mean(a) - np.mean(b)) / np.std(b)
        if shift > best:
            best, name = shift, n
    return name


def plot_feature_drift(data: dict):
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    t_drift, sim_drift = _covariate_t(data)
    n = 0
    ev = data["events"]
    if sim_drift is None or not ev["amount"]:
        _empty(a1, "no drift injected" if sim_drift is None else "no events")
    else:
        s = np.asarray(ev["sim_s"], dtype=float)
        amt = np.asarray(ev["amount"], dtype=float)
        bins = np.logspace(np.log10(max(amt.min(), 0.1)), np.log10(amt.max() + 1), 60)
        a1.hist(amt[s < sim_drift], bins=bins, density=True, alpha=0.55, label="before", color="#1f77b4")
        a1.hist(amt[s >= sim_drift], bins=bins, density=True, alpha=0.55, label="after", color=DRIFT_COLOR)
        a1.set_xscale("log")
        a1.set_xlabel("amount (event field, log)")
        a1.set_ylabel("density")
        a1.set_title(f"Transaction amount before/after drift at {t_drift:.0f} s")
        a1.legend(fontsize=8)
        n += len(amt)
    name = drifted_feature(data)
    f = data["features"]
    if name is None:
        _empty(a2, "no model feature recorded on both sides of the drift")
    else:
        j = f["names"].index(name)
        t = np.asarray(f["t"], dtype=float)
        v = np.array([np.nan if row[j] is None else row[j] for row in f["values"]], dtype=float)
        ok = np.isfinite(v)
        b, a = v[ok & (t < t_drift)], v[ok & (t >= t_drift)]
        lo, hi = np.nanpercentile(v[ok], [0.5, 99.5])
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 50)
        a2.hist(b, bins=bins, density=True, alpha=0.55, label=f"before (n={len(b):,})", color="#1f77b4")
        a2.hist(a, bins=bins, density=True, alpha=0.55, label=f"after (n={len(a):,})", color=DRIFT_COLOR)
        a2.set_xlabel(name)
        a2.set_title("The model feature that moved most, as served")
        a2.legend(fontsize=8)
        n += len(b) + len(a)
    fig.tight_layout()
    return fig, n


def plot_detector(data: dict):
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 6.4), sharex=True)
    det = data["detector"]
    n = 0
    t = np.asarray(det["t"], dtype=float)
    stats = det["stats"]
    shift_names = sorted({k for st in stats for k in st if k.startswith("shift:")})
    if len(t) and shift_names:
        # the streams that alerted first, then the largest moves; the score and the amount always
        alerted = [f"shift:{a['subject']}" for a in sorted(data["alerts"], key=lambda a: a["t"])]
        peak = {k: max(abs(st.get(k, 0.0)) for st in stats) for k in shift_names}
        top = list(dict.fromkeys([k for k in alerted if k in peak][:2]
                                 + sorted(shift_names, key=lambda k: -peak[k])))[:3]
        for extra in ("shift:amount", "shift:score"):
            if extra in peak and extra not in top:
                top.append(extra)
        for k in top:
            y = np.array([st.get(k, np.nan) for st in stats], dtype=float)
            a1.plot(t, y, lw=1.3, label=_short(k.split(":", 1)[1]))
            n += int(np.isfinite(y).sum())
        a1.set_ylabel("recent mean shift\n(reference sd)")
    else:
        _empty(a1, "no detector statistics (no monitor, or no predictions reached it)")
    a1.set_title("Detector statistics and drift alerts" + (f"\nstatistics from {det['source']}" if det.get("source") else ""),
                 fontsize=10)
    _alert_marks(a1, data, ("feature", "prediction", "data_quality"))
    a1.legend(fontsize=7, loc="upper left")

    if len(t):
        for k, style, label in (("error_rate:recent", "-", "recent error rate (monitor)"),
                                ("error_rate:reference", "--", "reference error rate (monitor)"),
                                ("estimated_error_rate", ":", "label-free estimate (monitor)")):
            y = np.array([st.get(k, np.nan) for st in stats], dtype=float)
            if np.isfinite(y).any():
                a2.plot(t, y, ls=style, lw=1.3, label=label)
                n += int(np.isfinite(y).sum())
    pt, rate = _rolling_error(data, 1000)
    if len(pt):
        a2.plot(pt, rate, color="#777", lw=1.2, label="error rate of the last 1000 labelled predictions (demo's join)")
        n += len(pt)
    if not a2.lines:
        _empty(a2, "no labelled predictions")
    _alert_marks(a2, data, ("performance",))
    a2.set_ylabel("error rate")
    a2.legend(fontsize=7, loc="upper left")
    _events_lines(a1, data, label=False)
    _events_lines(a2, data, label=False)
    a2.set_xlabel("seconds since the first event")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig, n


def _rolling_error(data: dict, window: int) -> tuple[np.ndarray, np.ndarray]:
    p = data["predictions"]
    rows = sorted((t, int(l != y)) for t, l, y in zip(p["t"], p["label"], p["truth"])
                  if y is not None and l is not None)
    if len(rows) < window:
        return np.array([]), np.array([])
    t = np.array([r[0] for r in rows])
    w = np.cumsum([r[1] for r in rows], dtype=float)
    rate = (w[window:] - w[:-window]) / window
    step = max(1, len(rate) // 400)
    return t[window:][::step], rate[::step]


def _alert_marks(ax, data: dict, kinds: tuple[str, ...]) -> None:
    """Alerts of freshet monitor as vertical lines, with the count per burst on top."""
    alerts = sorted((a for a in data["alerts"] if a["kind"] in kinds), key=lambda a: a["t"])
    for i, a in enumerate(alerts):
        ax.axvline(a["t"], color="#ff7f0e", lw=1.2, alpha=0.6,
                   label=f"{'/'.join(kinds[:2])} alert (freshet monitor)" if i == 0 else None)
    bursts: list[list[dict]] = []
    for a in alerts:
        if bursts and a["t"] - bursts[-1][0]["t"] <= 5.0:
            bursts[-1].append(a)
        else:
            bursts.append([a])
    for b in bursts:
        if len(b) > 1:
            ax.annotate(f"×{len(b)}", (b[0]["t"], 0.0), xycoords=("data", "axes fraction"), fontsize=7,
                        color="#a65300", xytext=(2, 2), textcoords="offset points", va="bottom")


def _short(subject: str) -> str:
    return subject.replace("card_txn_stats:", "card:").replace("merchant_txn_stats:", "merchant:")


def plot_error_rate(data: dict):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.8))
    p = data["predictions"]
    rows = [(t, v, int(l != y)) for t, v, l, y in zip(p["t"], p["version"], p["label"], p["truth"])
            if y is not None and l is not None]
    if not rows:
        _empty(ax, "no labelled predictions")
        return fig, 0
    width = 15.0
    versions = sorted({r[1] for r in rows}, key=_version_key)
    for i, v in enumerate(versions):
        t = np.array([r[0] for r in rows if r[1] == v])
        w = np.array([r[2] for r in rows if r[1] == v])
        edges = np.arange(math.floor(t.min() / width) * width, t.max() + width, width)
        idx = np.digitize(t, edges)
        xs, ys = [], []
        for k in np.unique(idx):
            sel = w[idx == k]
            if len(sel) >= 30:
                xs.append(edges[k - 1] + width / 2)
                ys.append(sel.mean())
        ax.plot(xs, ys, marker="o", ms=3, lw=1.6, color=VERSION_COLORS[i % len(VERSION_COLORS)],
                label=f"version {v} (overall {w.mean():.2%}, n={len(w):,})")
    _events_lines(ax, data)
    ax.set_ylabel(f"error rate ({width:.0f} s bins)")
    ax.set_xlabel("seconds since the first event (prediction time)")
    ax.set_title("Error rate of served predictions, per model version (labels joined by transaction id)")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    ax.set_ylim(bottom=0)
    return fig, len(rows)


def plot_timeline(data: dict):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.2))
    p = data["predictions"]
    end = max([s["t"] for s in data["samples"]] + [0.0])
    promoted = sorted(promotion_times(data).items(), key=lambda kv: kv[1])
    versions = sorted({v["version"] for v in data.get("model_versions", [])} | {v for v, _ in promoted},
                      key=_version_key)
    rows = {v: i for i, v in enumerate(versions)}
    n = 0
    for i, (v, t) in enumerate(promoted):
        stop = promoted[i + 1][1] if i + 1 < len(promoted) else end
        ax.barh(rows[v], stop - t, left=t, color=VERSION_COLORS[rows[v] % len(VERSION_COLORS)], alpha=0.8, height=0.5)
        n += 1
    launched = data["meta"].get("launched")
    t0 = data["meta"].get("t0")
    for v in data.get("model_versions", []):
        if v.get("created_at") and t0:
            ax.plot([v["created_at"] - t0], [rows[v["version"]]], marker="|", ms=14, color="#333")
    y_alert = len(versions)
    for a in data["alerts"]:
        ax.plot([a["t"]], [y_alert], marker="v", color="#ff7f0e", ms=8)
    for r in data["retrains"]:
        ax.plot([r["t"]], [y_alert + 1], marker="s", color="#9467bd", ms=7)
    boot = data["meta"].get("bootstrap_t")
    if boot is not None:
        ax.axvline(boot, color="#777", ls="-.", lw=1, label="first model requested")
    _events_lines(ax, data, promotions=False)
    ax.set_yticks(list(range(len(versions))) + [y_alert, y_alert + 1])
    ax.set_yticklabels([f"v{v} served" for v in versions] + ["drift alerts", "retrain requests"])
    ax.set_xlim(left=min(0.0, *(r["t"] for r in data["retrains"]) if data["retrains"] else [0.0]), right=end or 1)
    ax.set_xlabel("seconds since the first event (| = version registered)")
    ax.set_title("Promotion timeline: which version served when, alerts and retraining requests")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    del launched, p
    return fig, n + len(data["alerts"])


PLOTS = (
    ("throughput_freshness", plot_throughput,
     "Events produced vs processed, and freshness per event. Freshness is measured from the moment the "
     "producer handed an event to Kafka to the first Redis poll that shows its event time in every view."),
    ("latency", plot_latency,
     "Client-side latency of POST /predict (one transaction per request): HTTP, online feature read, "
     "scoring and the demo client's own overhead."),
    ("feature_drift", plot_feature_drift,
     "Covariate drift: the raw amount distribution and the model feature that moved most, before and after."),
    ("detector", plot_detector,
     "Top: recent mean shift of the watched features (in reference standard deviations); bottom: labelled "
     "error rate. Orange lines: alerts published by freshet monitor on freshet.drift; grey triangles: alerts "
     "the monitor library raised inside the demo, on the same predictions."),
    ("error_rate", plot_error_rate,
     "Error rate of each served model version over time: it should rise after the drift and fall after a "
     "retrained version is promoted."),
    ("promotions", plot_timeline,
     "Which version served when, drift alerts and retraining requests."),
)


# --- the page -----------------------------------------------------------------------------

def write_report(data: dict, run_dir: Path) -> tuple[Path, dict]:
    """Write data.json, plots/*.png, summary.json and report.html into run_dir."""
    import matplotlib

    matplotlib.use("Agg")
    run_dir = Path(run_dir)
    (run_dir / "data.json").write_bytes(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY))
    summary = summarize(data)
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    figures = []
    summary["plots"] = {}
    for name, fn, caption in PLOTS:
        try:
            fig, points = fn(data)
            png = _png(fig)
        except Exception as exc:  # noqa: BLE001 - one broken plot must not cost the others
            summary["problems"].append(f"plot {name} failed: {exc!r}")
            continue
        (plots_dir / f"{name}.png").write_bytes(png)
        summary["plots"][name] = {"file": f"plots/{name}.png", "points": points, "bytes": len(png)}
        figures.append((name, caption, png))
    summary["report"] = str(run_dir / "report.html")
    (run_dir / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    page = _html(summary, figures)
    (run_dir / "report.html").write_text(page)
    return run_dir / "report.html", summary


def _html(s: dict, figures: list[tuple[str, str, bytes]]) -> str:
    e = html.escape

    def ms(x):
        return "–" if x is None else f"{x:,.1f} ms"

    def pct(b):
        r = s["error_rate"][b]
        return "–" if r["error_rate"] is None else f"{r['error_rate']:.2%} <small>(n={r['labelled_predictions']:,})</small>"

    ev = s["events"]
    rows = [
        ("events processed", f"{ev['processed']:,} of {ev['produced']:,} produced ({ev['deadlettered']:,} dead-lettered)"),
        ("throughput", f"{s['events_per_s'] or 0:,.0f} events/s average over {s['traffic_s']:.0f} s "
                       f"(peak {s['events_per_s_peak_5s'] or 0:,.0f}/s over 5 s)"),
        ("freshness", f"p50 {ms(s['freshness_ms']['p50'])}, p99 {ms(s['freshness_ms']['p99'])} "
                      f"({s['freshness_ms']['samples']:,} events)"),
        ("API /predict (client side)", f"p50 {ms(s['api_ms']['p50'])}, p99 {ms(s['api_ms']['p99'])}, "
                                       f"p99.9 {ms(s['api_ms']['p999'])} ({s['api_ms']['requests_ok']:,} ok, "
                                       f"{s['api_ms']['requests_failed']:,} failed)"),
        ("machine", f"{s['machine']['cpus']} CPUs; the demo's processes used {s['machine']['cpu_demo_cores']} "
                    f"cores on average, other work {s['machine']['cpu_other_cores']} (load average "
                    f"{s['machine']['load_1m_mean']}, max {s['machine']['load_1m_max']})"),
        ("drift injected", ", ".join(f"{d['kind']} at {d['t']:.0f} s" for d in s["drift"]) or "none"),
        ("drift alerts", f"{len(s['alerts'])} ({s['alerts_after_injection']} after the injection)"
         + "".join(f"<br><small>{a['t']:.1f} s: {e(a['kind'])} · {e(a['subject'])} · {e(a['detector'])}</small>"
                   for a in s["alerts"][:10])),
        ("retrainings", f"{len(s['retrainings'])} requested, {len(s['registered_versions'])} versions registered"),
        ("promotions", ", ".join(f"v{p['version']} at {p['t']:.0f} s" for p in s["promotions"]) or "none"),
        ("error rate", f"before drift {pct('before_drift')} · after drift {pct('after_drift')} · "
                       f"after promotion {pct('after_promotion')}"),
    ]
    comps = "".join(f"<li><b>{e(k)}</b>: {e(str(v))}</li>" for k, v in s["components"].items())
    problems = "".join(f"<li><pre>{e(p)}</pre></li>" for p in s["problems"])
    warnings = "".join(f"<li>{e(w)}</li>" for w in s.get("warnings", []))
    state = "interrupted" if s["interrupted"] else ("failed: " + e(s["failed"]) if s["failed"] else "completed")
    plan = s.get("plan") or {}
    figs = "".join(
        f'<section><h2>{e(name.replace("_", " "))}</h2><p>{e(caption)}</p>'
        f'<img alt="{e(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"></section>'
        for name, caption, png in figures)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>freshet demo report</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; }} td {{ padding: 4px 12px; border-bottom: 1px solid #eee; vertical-align: top; }}
td:first-child {{ color: #555; white-space: nowrap; }} img {{ max-width: 100%; }}
section {{ margin-top: 2em; }} pre {{ white-space: pre-wrap; font-size: 12px; }}
</style></head><body>
<h1>freshet demo</h1>
<p>Run {e(str(s.get('run_dir')))} — {state}. {plan.get('minutes', '?')} min of traffic at {plan.get('rate', '?')}
events/s, simulated time ×{plan.get('time_scale', '?')}, seed {plan.get('seed', '?')}.</p>
<table>{''.join(f'<tr><td>{k}</td><td>{v}</td></tr>' for k, v in rows)}</table>
<h3>Components</h3><ul>{comps}</ul>
{f'<h3>Read with care</h3><ul>{warnings}</ul>' if warnings else ''}
{f'<h3>Problems</h3><ul>{problems}</ul>' if problems else ''}
{figs}
</body></html>
"""


def main(argv: list[str] | None = None) -> int:
    """Rebuild a run's report from its data.json."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m freshet.report <run dir>", file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    data = orjson.loads((run_dir / "data.json").read_bytes())
    path, summary = write_report(data, run_dir)
    print(headline(summary))
    print(f"report {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
