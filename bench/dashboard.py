"""The dashboard's first paint and first live data, in headless Chromium, on the embedded stack.

    python bench/dashboard.py [--runs 5]

Starts the embedded stack, registers feature_repo/, runs `freshet serve` as a subprocess
and opens /ui in Debian's Chromium (Playwright, executable_path) --runs times, each in a fresh
browser context (no cache): the login page's first contentful paint, then, after logging in,
the dashboard's first contentful paint (from the login POST's navigation start, so it includes
the redirect) and the time until the first snapshot arrived over server-sent events (the feed
starts on the first visit, so run 1 includes reading the topics). The last stdout line is one
JSON object with the medians and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from freshet import features  # noqa: E402
from freshet.app.stack import EmbeddedStack, free_port  # noqa: E402
from freshet.settings import load_settings  # noqa: E402

FCP = "performance.getEntriesByName('first-contentful-paint')[0]?.startTime ?? null"


def _wait_ready(url: str, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(0.2)
    raise SystemExit(f"freshet serve did not answer at {url} within {timeout:.0f}s")


def measure(url: str, token: str, runs: int) -> list[dict]:
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("CHROMIUM_BIN") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("no Chromium: apt-get install chromium (make test does it as root) or set CHROMIUM_BIN")
    out = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        for _ in range(runs):
            context = browser.new_context(viewport={"width": 1440, "height": 900})
            page = context.new_page()
            page.goto(url + "/ui")
            login_fcp = page.evaluate(FCP)
            page.fill("#token", token)
            started = time.monotonic()
            page.click("button[type=submit]")
            page.wait_for_selector("#card-stream h2", state="visible")
            page.wait_for_function("performance.getEntriesByName('first-contentful-paint').length > 0")
            dashboard_fcp = page.evaluate(FCP)
            page.wait_for_selector("#status.live", timeout=60_000)
            live = time.monotonic() - started
            out.append({"login_fcp_ms": login_fcp, "dashboard_fcp_ms": dashboard_fcp,
                        "first_snapshot_s": round(live, 3)})
            context.close()
        browser.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="freshet-bench-dashboard-"))
    stack = EmbeddedStack(tmp)
    endpoints = stack.start()
    server = None
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
        port, token = free_port(), "bench-token"
        settings = load_settings(env, kafka_bootstrap_servers=endpoints.kafka, redis_url=endpoints.redis_url,
                                 data_dir=str(tmp / "data"), feature_repo=str(ROOT / "feature_repo"),
                                 http_port=port, api_token=token)
        print("registering feature_repo/ (feast apply)", file=sys.stderr, flush=True)
        features.apply(settings)
        server = subprocess.Popen([sys.executable, "-m", "freshet.cli", "serve"], env={**env, **settings.to_env()},
                                  stdout=open(tmp / "serve.log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url)
        print("measuring", file=sys.stderr, flush=True)
        runs = measure(url, token, args.runs)
    finally:
        if server is not None:
            server.terminate()
            server.wait(15)
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    for r in runs:
        print(json.dumps(r), file=sys.stderr)

    def median(key):
        values = [r[key] for r in runs if r[key] is not None]
        return round(statistics.median(values), 1) if values else None

    print(json.dumps({"runs": len(runs), "login_fcp_ms_median": median("login_fcp_ms"),
                      "dashboard_fcp_ms_median": median("dashboard_fcp_ms"),
                      "first_snapshot_s_first_visit": runs[0]["first_snapshot_s"],
                      "first_snapshot_s_median": median("first_snapshot_s"),
                      "loadavg": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
