"""The demo report's plots: one matplotlib figure per question (throughput and freshness, latency,
drift, detectors, error rate, promotions), each returned with the number of points it shows.
"""

from __future__ import annotations

import io
import math

import numpy as np

from freshet.demo.summary import promotion_times, rates, version_key

VERSION_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
DRIFT_COLOR = "#d62728"
PROMOTION_COLOR = "#2ca02c"


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


def png(fig) -> bytes:
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
        t, r = rates(data["samples"], key, 5.0)
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
    versions = sorted({r[1] for r in rows}, key=version_key)
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
    end = max([s["t"] for s in data["samples"]] + [0.0])
    promoted = sorted(promotion_times(data).items(), key=lambda kv: kv[1])
    versions = sorted({v["version"] for v in data.get("model_versions", [])} | {v for v, _ in promoted},
                      key=version_key)
    rows = {v: i for i, v in enumerate(versions)}
    n = 0
    for i, (v, t) in enumerate(promoted):
        stop = promoted[i + 1][1] if i + 1 < len(promoted) else end
        ax.barh(rows[v], stop - t, left=t, color=VERSION_COLORS[rows[v] % len(VERSION_COLORS)], alpha=0.8, height=0.5)
        n += 1
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
    return fig, n + len(data["alerts"])


def plot_consistency(data: dict):
    """Online/offline consistency per 10 s of traffic: the share of sampled served values equal to
    their recomputation from the raw log, and how many were compared."""
    import matplotlib.pyplot as plt

    c = data["meta"].get("consistency") or {}
    tl = c.get("timeline") or {"t": [], "rate": [], "compared": []}
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 4.6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    if not tl["t"]:
        _empty(a1, "no consistency measurement in this run")
        return fig, 0
    a1.plot(tl["t"], tl["rate"], marker=".", color="tab:green")
    a1.set_ylim(min(0.9, min(r for r in tl["rate"] if r is not None) - 0.01), 1.005)
    a1.set_ylabel("consistent share")
    a1.set_title(f"served = recomputed: {c['rate']:.4f} over {c['compared']:,} values")
    a2.bar(tl["t"], tl["compared"], width=8, color="tab:gray")
    a2.set_ylabel("values compared")
    a2.set_xlabel("seconds of traffic")
    _events_lines(a1, data, label=False)
    fig.tight_layout()
    return fig, len(tl["t"])


def plot_judgement(data: dict):
    """Left: every alert by kind against the injections (before the first one, none should come);
    right: per drift, the error rate of the versions it caught serving vs the version retrained for it."""
    import matplotlib.pyplot as plt

    from freshet.demo.summary import judge_alerts

    end = max([x["t"] for x in data["samples"]] + [1.0])
    j = judge_alerts(data, end)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [1.5, 1]})
    kinds = ["feature", "prediction", "performance", "data_quality"]
    colors = {"feature": "#1f77b4", "prediction": "#9467bd", "performance": "#d62728", "data_quality": "#7f7f7f"}
    alerts = [a for a in data["alerts"] if a.get("detector") != "warming_up"]
    for i, kind in enumerate(kinds):
        ts = [a["t"] for a in alerts if a["kind"] == kind]
        a1.scatter(ts, [i] * len(ts), marker="v", s=36, color=colors[kind], label=f"{kind} ({len(ts)})")
    _events_lines(a1, data, label=False)
    b = j["before_first_injection"]
    for x in j["injections"]:
        if x["first_alert_s"] is not None:
            a1.annotate(f"+{x['first_alert_s']:.1f} s", (x["t"], len(kinds) - 0.4), fontsize=8, color=DRIFT_COLOR,
                        xytext=(3, 0), textcoords="offset points")
    a1.set_yticks(range(len(kinds)))
    a1.set_yticklabels(kinds)
    a1.set_ylim(-0.6, len(kinds) - 0.1)
    a1.set_xlim(0, end)
    a1.set_xlabel("seconds since the first event")
    a1.set_title(f"Alerts: {b['alerts']} before the first injection, "
                 f"{sum(x['alerts'] for x in j['injections'])} after (+ time to the first)", fontsize=10)
    a1.grid(alpha=0.3, axis="x")
    n = len(alerts)
    bars = [("before drift", j["error_rate_before_drift"], "#777")]
    for x in j["injections"]:
        bars.append((f"{x['kind']}:\nuntil promotion", x["error_rate_before_promotion"], DRIFT_COLOR))
        bars.append((f"{x['kind']}:\nafter promotion", x["error_rate_after_promotion"], PROMOTION_COLOR))
    shown = [(name, r, c) for name, r, c in bars if r["error_rate"] is not None]
    if shown:
        ys = [r["error_rate"] for _, r, _ in shown]
        err = [[y - r["ci95"][0] for (_, r, _), y in zip(shown, ys)], [r["ci95"][1] - y for (_, r, _), y in zip(shown, ys)]]
        a2.bar(range(len(shown)), ys, yerr=err, capsize=3, color=[c for _, _, c in shown], alpha=0.8)
        for i, (_, r, _) in enumerate(shown):
            a2.annotate(f"n={r['labelled_predictions']:,}", (i, 0), xytext=(0, 2), textcoords="offset points",
                        ha="center", fontsize=7, color="white")
        a2.set_xticks(range(len(shown)))
        a2.set_xticklabels([name for name, _, _ in shown], fontsize=7)
        n += len(shown)
    else:
        _empty(a2, "no labelled predictions")
    a2.set_ylabel("error rate (95% CI)")
    a2.set_title("Error rate after each drift: until vs after its promotion", fontsize=10)
    a2.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig, n


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
    ("consistency", plot_consistency,
     "Online/offline consistency: for a sample of the predictions served, each feature value compared with "
     "the value recomputed from the offline raw log as serving answered it at the request's time (the "
     "training sets' definition); per 10 s of traffic."),
    ("alert_judgement", plot_judgement,
     "The alerts judged: none should come before the first injection; each injection should be alerted on soon "
     "(time to the first alert); and the error rate after each drift should fall once the version retrained for "
     "it is promoted (95% intervals)."),
)
