"""`freshet demo` end to end: a shortened run on its own embedded stack, judged by its summary.

One short run feeds most tests: four simulated hours of history (the first model trains on
it; the day windows are not full, so the monitor holds them), then 3 minutes of traffic at
50 events/s with concept drift after 18 s (the workload's seed 0 has a cluster of takeover
bursts 20-45 s into its traffic that raises the mean score 4-5x: real, not drift, and an
injection after it left the score detector's alert a coin toss on either side of it). It
starts from a data dir holding a stale run (a stack.json of dead processes and a corrupt
Feast registry). A second run is
interrupted with SIGINT once traffic flows.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from freshet.demo.figures import PLOTS

# a demo with history and a first model trained on it takes 4-6 minutes on 2 cores, longer when the
# machine is shared: more than the suite's 300 s per test
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1200)]

# what a user runs: the installed console script
_SCRIPT = Path(sys.executable).with_name("freshet")
CLI = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "freshet.cli"]
SHORT = ["--minutes", "3", "--history-hours", "4", "--drift", "concept@0.3"]
DRIFT_T = 18.0  # concept@0.3: 18 s of traffic


def _env() -> dict[str, str]:
    # the demo runs its own stack; nothing of the caller's FRESHET_* endpoints may leak in
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _stale_run(data: Path) -> Path:
    stale = data / "demo" / "run-20000101-000000"
    stale.mkdir(parents=True)
    (stale / "stack.json").write_text(json.dumps({
        "kafka": "127.0.0.1:1", "redis_url": "redis://127.0.0.1:1/0", "kafka_pid": 2 ** 22 - 3,
        "redis_pid": 2 ** 22 - 5, "log_dir": str(stale / "logs")}))
    (stale / "registry.db").write_bytes(b"not a registry")
    return stale


def _run_dir(stdout: str) -> Path:
    for line in stdout.splitlines():
        if line.startswith("summary "):
            return Path(line.split(None, 1)[1]).parent
    raise AssertionError(f"no summary path in the demo's output:\n{stdout[-3000:]}")


def _survivors(run_dir: Path) -> list[str]:
    """Processes whose command line or FRESHET_DATA_DIR points into the run directory."""
    needle = str(run_dir).encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in cmd or b"FRESHET_DATA_DIR=" + needle in env:
            readable = cmd.replace(b"\0", b" ").decode(errors="replace")[:160]
            found.append(f"{pid}: {readable}")
    return found


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory):
    data = tmp_path_factory.mktemp("demo-data")
    stale = _stale_run(data)
    started = time.monotonic()
    proc = subprocess.run([*CLI, "demo", *SHORT, "--data-dir", str(data)], env=_env(), capture_output=True,
                          text=True, timeout=900)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    run_dir = _run_dir(proc.stdout)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"proc": proc, "run_dir": run_dir, "summary": summary, "elapsed": elapsed, "stale": stale,
            "data": data}


def test_demo_processes_the_workload_and_prints_the_headline(short_demo):
    s, out = short_demo["summary"], short_demo["proc"].stdout
    ev = s["events"]
    assert ev["produced"] >= 50 * 120, ev  # at least two minutes' worth of the offered 50/s
    assert ev["processed"] >= 0.99 * ev["produced"], ev
    assert s["events_per_s"] > 25  # of the offered 50/s
    for words in ("events ", "freshness ", "API /predict", "alerts ", "promotions ", "error rate ", "report "):
        assert words in out, out[-2000:]


def test_report_has_every_plot_with_data(short_demo):
    s, run_dir = short_demo["summary"], short_demo["run_dir"]
    page = (run_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(PLOTS)
    for name in ("throughput_freshness", "latency", "feature_drift", "detector", "error_rate", "promotions",
                 "consistency", "alert_judgement"):
        plot = s["plots"][name]
        assert plot["points"] > 0, (name, plot)
        assert (run_dir / plot["file"]).stat().st_size > 10_000, name


def test_the_report_says_how_many_served_features_equal_their_recomputation_from_the_raw_log(short_demo):
    c = short_demo["summary"]["consistency"]
    # a difference past the freshness grace counts: on a machine this loaded a few may lag that long
    assert c["compared"] > 5_000 and c["rate"] >= 0.99, {k: c[k] for k in ("rate", "compared", "worst", "mismatches")}
    assert "consistency  " in short_demo["proc"].stdout


def test_every_event_is_measured_for_freshness_or_counted_as_not_visible(short_demo):
    s = short_demo["summary"]
    fr = s["freshness_ms"]
    accounted = fr["samples"] + fr["not_visible_within_30s"] + fr["unresolved_at_end"]
    # every message the client read (a producer retry may have written one twice), and all were read
    assert accounted == fr["events_read"] >= s["events"]["produced"], fr
    assert fr["samples"] > 0 and 0 < fr["p50"] <= fr["p99"], fr


def test_predictions_are_timed_and_almost_none_fail(short_demo):
    api = short_demo["summary"]["api_ms"]
    assert api["requests_ok"] > 1000, api
    assert 0 < api["p50"] <= api["p99"], api
    assert api["requests_failed"] <= 0.01 * api["requests_ok"], api


def test_the_demo_starts_warm_and_raises_no_alert_before_the_injection(short_demo):
    s = short_demo["summary"]
    assert s["history"]["sim_s"] == 4 * 3600 and s["history"]["events"] > 0, s["history"]
    assert s["components"]["bootstrap"] == "freshet retrain --bootstrap: ok", s["components"]
    first = min(json.loads((short_demo["run_dir"] / "data.json").read_text())["predictions"]["t"])
    assert first < 5.0, first  # a model serves from the first live event on
    quiet = s["judgement"]["before_first_injection"]
    assert quiet["alerts"] == 0 and quiet["seconds"] >= DRIFT_T - 1, quiet
    # four hours of history cannot fill the day windows: the monitor says it holds them
    assert s["judgement"]["warming_notices"] > 0, s["judgement"]


def test_drift_alerts_after_the_injection_lead_to_a_retraining(short_demo):
    s = short_demo["summary"]
    assert s["components"]["monitor"] == "ran" and s["components"]["retrain"] == "ran", s["components"]
    # card testing: the served model misses the new fraud, so its error rate (or the score) alerts
    drifted = [a for a in s["alerts"] if a["t"] >= DRIFT_T]
    assert drifted, [(a["t"], a["subject"]) for a in s["alerts"]]
    assert s["judgement"]["injections"][0]["first_alert_s"] is not None
    requested = [r for r in s["retrainings"] if r["t"] >= drifted[0]["t"]]
    assert requested, (drifted[0]["t"], s["retrainings"])
    cited = {a for r in requested for a in r["reason"]}
    assert cited & {a["alert_id"] for a in drifted}, "no request after the drift cites a drift alert"
    # the bootstrap model plus at least one version trained for the drift
    assert len(s["registered_versions"]) >= 2, s["registered_versions"]


def test_every_retrained_version_is_promoted_or_the_retrainer_says_why_not(short_demo):
    # Covariate drift leaves the fraud mechanism alone (it reads amounts relative to a card's
    # usual spend), so a champion may well hold its own after it: promotion is earned on the
    # holdout, never granted for having drifted.
    s, run_dir = short_demo["summary"], short_demo["run_dir"]
    log = (run_dir / "logs" / "retrain.log").read_text()
    promoted = {e["version"] for e in s["promotions"]}
    for v in s["registered_versions"]:
        # a promotion in the last moments may be in the log but not yet seen on the topic
        if v["version"] not in promoted:
            assert re.search(rf"(did not promote|promoted) version {v['version']}: ", log), (v, log[-2000:])


def test_the_version_retrained_for_the_concept_drift_serves_fewer_errors(short_demo):
    x = short_demo["summary"]["judgement"]["injections"][0]
    before, after, change = x["error_rate_before_promotion"], x["error_rate_after_promotion"], x["change"]
    assert x["promotion_s"] is not None, x
    assert before["labelled_predictions"] > 200 and after["labelled_predictions"] > 500, x
    # the drop, with its 95% interval entirely below zero
    assert change["difference"] < 0 and change["ci95"][1] < 0, x


def test_a_version_promoted_after_the_drift_serves_and_is_judged_on_its_labels(short_demo):
    s = short_demo["summary"]
    # a version promoted in the traffic's last seconds (or after it) has nothing left to serve
    after = [e for e in s["promotions"] if e["after_drift"] and e["t"] < s["traffic_s"] - 10]
    by_version = s["error_rate_by_version"]
    for e in after:  # serving switched to it, and its outcomes were joined
        assert by_version.get(e["version"], {}).get("predictions", 0) > 0, (e, by_version)
        m = e["metrics"]
        # the demo promotes on log loss (AUC, near 1 on both, may even be lower): the candidate beat the
        # champion by the margin on the same rows (out-of-fold for the candidate: --folds 5)
        if m.get("log_loss") is not None and m.get("champion_log_loss") is not None:
            assert m["champion_log_loss"] - m["log_loss"] >= 0.005, m
    rates = s["error_rate"]
    assert rates["before_drift"]["labelled_predictions"] > 0, rates
    if after:
        assert rates["after_promotion"]["labelled_predictions"] > 0, rates
    else:
        assert rates["after_drift"]["labelled_predictions"] > 0, rates


def test_a_stale_run_in_the_data_dir_is_left_alone_and_not_reused(short_demo):
    run_dir, stale = short_demo["run_dir"], short_demo["stale"]
    assert run_dir != stale and run_dir.parent == stale.parent
    assert not (stale / "stack.json").exists()  # its dead processes were noticed and the file removed
    assert (short_demo["data"] / "demo" / "latest").resolve() == run_dir.resolve()


def test_no_process_outlives_the_demo(short_demo):
    assert _survivors(short_demo["run_dir"]) == []


def test_ctrl_c_stops_every_process_and_still_writes_the_report(tmp_path):
    proc = subprocess.Popen([*CLI, "demo", "--minutes", "3", "--history-hours", "0.5", "--data-dir", str(tmp_path)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 600
    try:
        for line in proc.stdout:  # wait until traffic has flowed for a few seconds
            lines.append(line)
            if line.startswith("[0:0") and "events" in line and "events 0 " not in line:
                break
            assert time.monotonic() < deadline, "".join(lines[-30:])
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines) + rest
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted" in out
    run_dir = _run_dir(out)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["interrupted"] is True
    assert summary["events"]["produced"] > 0
    assert (run_dir / "report.html").stat().st_size > 10_000
    assert _survivors(run_dir) == []


def test_a_busy_port_is_reported_before_anything_starts(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([*CLI, "demo", "--http-port", str(port), "--data-dir", str(tmp_path)],
                              env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"port {port}" in proc.stderr and "in use" in proc.stderr and "--http-port" in proc.stderr
    assert not (tmp_path / "demo").exists()
