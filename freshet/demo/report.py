"""The demo's report: data.json, summary.json, the plots and report.html in a run directory; it reads
only what `freshet demo` recorded, so `python -m freshet.demo.report <run dir>` rebuilds it.
"""

from __future__ import annotations

import base64
import html
import sys
from pathlib import Path

import orjson

from freshet.demo.figures import PLOTS, png
from freshet.demo.summary import headline, judgement_lines, summarize


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
            image = png(fig)
        except Exception as exc:  # noqa: BLE001 - one broken plot must not cost the others
            summary["problems"].append(f"plot {name} failed: {exc!r}")
            continue
        (plots_dir / f"{name}.png").write_bytes(image)
        summary["plots"][name] = {"file": f"plots/{name}.png", "points": points, "bytes": len(image)}
        figures.append((name, caption, image))
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
        ("online/offline consistency", _consistency(s.get("consistency"))),
        ("alerts judged", "<br>".join(e(line.strip()) for line in judgement_lines(s.get("judgement")))),
    ]
    comps = "".join(f"<li><b>{e(k)}</b>: {e(str(v))}</li>" for k, v in s["components"].items())
    problems = "".join(f"<li><pre>{e(p)}</pre></li>" for p in s["problems"])
    warnings = "".join(f"<li>{e(w)}</li>" for w in s.get("warnings", []))
    state = "interrupted" if s["interrupted"] else ("failed: " + e(s["failed"]) if s["failed"] else "completed")
    plan = s.get("plan") or {}
    figs = "".join(
        f'<section><h2>{e(name.replace("_", " "))}</h2><p>{e(caption)}</p>'
        f'<img alt="{e(name)}" src="data:image/png;base64,{base64.b64encode(image).decode()}"></section>'
        for name, caption, image in figures)
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


def _consistency(c: dict | None) -> str:
    if not c or c.get("rate") is None:
        return "not measured"
    return (f"{c['rate']:.4f} of {c['compared']:,} served feature values equal their recomputation from the raw "
            f"log <small>({c['judged']:,} predictions, a {c['sample']:.0%} sample)</small>")


def main(argv: list[str] | None = None) -> int:
    """Rebuild a run's report from its data.json."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m freshet.demo.report <run dir>", file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    data = orjson.loads((run_dir / "data.json").read_bytes())
    path, summary = write_report(data, run_dir)
    print(headline(summary))
    print(f"report {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
