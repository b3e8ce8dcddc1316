"""The live dashboard in a real browser (Playwright driving Debian's headless Chromium) against a
running stack: the broker and Redis, a `freshet stream` worker, the serving app under uvicorn.

Screenshots are kept under build/test-artifacts/dashboard/ (gitignored) for a person to look at.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import orjson
import pytest

from freshet import kafka
from freshet.contracts import DriftAlert
from freshet.models import ModelRegistry
from freshet.serving.app import create_app
from test_serving_support import fit_fraud_pipeline, serve, with_topics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "build" / "test-artifacts" / "dashboard"
TOKEN = "dashboard-test-token"
MODEL_FEATURES = ["card_txn_stats:sum_amount_300s", "merchant_txn_stats:count_amount_3600s", "amount"]


def chromium() -> str | None:
    """Debian's Chromium (`make test` installs it where missing, as root), or CHROMIUM_BIN."""
    explicit = os.environ.get("CHROMIUM_BIN")
    if explicit and os.access(explicit, os.X_OK):
        return explicit
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def stack(services, tmp_path_factory, apply_feature_repo):
    """Its own topics and registry; a stream worker in its own group; the serving app; events flowing."""
    uid = "ui" + uuid.uuid4().hex[:8]
    tmp = tmp_path_factory.mktemp("dashboard")
    topic = f"{uid}.transactions"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
    from freshet.settings import load_settings

    base = load_settings(env, kafka_bootstrap_servers=services.kafka, redis_url=services.redis_url,
                         data_dir=str(tmp / "data"), feature_repo=str(ROOT / "feature_repo"),
                         dashboard_stream_group=f"{uid}-stream")
    settings = with_topics(base, uid, api_token=TOKEN)
    os.environ["FRESHET_TRANSACTIONS_TOPIC"] = topic  # read by feature_repo/definitions.py
    try:
        apply_feature_repo(settings)
    finally:
        os.environ.pop("FRESHET_TRANSACTIONS_TOPIC")
    kafka.ensure_topics(settings, [topic, settings.topic_deadletter, settings.topic_predictions,
                                   settings.topic_labels, settings.topic_drift, settings.topic_models])
    worker = subprocess.Popen(
        [sys.executable, "-m", "freshet.cli", "stream", "--app-id", settings.dashboard_stream_group],
        env={**env, **settings.to_env(), "FRESHET_TRANSACTIONS_TOPIC": topic},
        stdout=open(tmp / "stream.log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
    app = create_app(settings, model_name=f"{uid}-fraud", model_poll_s=1.0)
    producer = kafka.producer(settings, log_level=0)  # quiet when the session's broker stops before it is freed
    events = EventSource(producer, topic)
    try:
        with serve(app) as url:
            events.start()
            yield {"url": url, "settings": settings, "app": app, "uid": uid, "producer": producer,
                   "topic": topic}
    finally:
        events.stop()
        worker.terminate()
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            worker.kill()


class EventSource:
    """Card transactions at ~50/s on the test's topic, in a thread, until stopped."""

    def __init__(self, producer, topic: str):
        import threading

        self.producer, self.topic = producer, topic
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def run(self) -> None:
        i = 0
        while not self.stop_event.is_set():
            for _ in range(5):
                i += 1
                card = f"card{i % 40:04d}"
                event = {"transaction_id": f"tx{i}", "card_id": card, "merchant_id": f"m{i % 7:03d}",
                         "amount": 10.0 + i % 13, "country": "FR", "channel": "web", "event_ts": time.time()}
                self.producer.produce(self.topic, key=card.encode(), value=orjson.dumps(event))
            self.producer.poll(0)
            self.stop_event.wait(0.1)
        self.producer.flush(5)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(10)


@pytest.fixture(scope="module")
def browser():
    path = chromium()
    if path is None:
        pytest.skip("no Chromium: run 'make test' as root (it installs Debian's chromium) or set CHROMIUM_BIN")
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(browser, stack):
    """One logged-in page for the module's tests, collecting the page's script errors."""
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.goto(stack["url"] + "/ui")
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_selector("#status.live", timeout=30_000)
    yield page
    context.close()


def _path_points(page, chart: str, series: int) -> int:
    return int(page.get_attribute(f"#{chart} path.s{series}", "data-points") or 0)


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.25)
    raise AssertionError(f"{what} within {timeout:.0f}s")


# -- login ------------------------------------------------------------------------------------

def test_dashboard_answers_a_login_form_until_the_api_token_is_given_and_a_wrong_token_is_refused(stack):
    with httpx.Client(base_url=stack["url"], timeout=10, follow_redirects=False) as http:
        first = http.get("/ui")
        assert first.status_code == 200 and 'name="token"' in first.text and "/ui/static/dashboard.js" not in first.text
        assert http.get("/ui/events").status_code == 401
        assert http.get("/ui/api/features").status_code == 401
        wrong = http.post("/ui/login", data={"token": "guess"})
        assert wrong.status_code == 401 and "not accepted" in wrong.text
        assert "set-cookie" not in wrong.headers
        right = http.post("/ui/login", data={"token": TOKEN})
        assert right.status_code == 303 and right.headers["location"] == "/ui/"
        cookie = right.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
        page = http.get("/ui")  # the client keeps the cookie
        assert page.status_code == 200 and "/ui/static/dashboard.js" in page.text
        # the bearer token works too, for scripts
        bearer = httpx.get(stack["url"] + "/ui/api/snapshot", headers={"Authorization": f"Bearer {TOKEN}"})
        assert bearer.status_code == 200


def test_page_and_every_asset_it_loads_come_from_freshet_itself(browser, stack):
    """No CDN, no web font: the machines it runs on may have no internet. (First-paint time is
    measured by bench/dashboard.py, not asserted here.)"""
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    requested = []
    page.on("request", lambda req: requested.append(req.url))
    page.goto(stack["url"] + "/ui")
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_selector("#status.live", timeout=30_000)
    page.screenshot(path=str(SHOTS / "first-paint.png"))
    context.close()
    assert {url.split("?")[0] for url in requested} >= {stack["url"] + "/ui", stack["url"] + "/ui/static/dashboard.js",
                                                         stack["url"] + "/ui/static/dashboard.css"}
    assert all(url.startswith(stack["url"]) or url.startswith("data:") for url in requested), requested


# -- live data --------------------------------------------------------------------------------

def test_charts_receive_live_events_processing_lag_freshness_and_api_traffic(page, stack):
    with httpx.Client(base_url=stack["url"], headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as http:
        for i in range(20):
            http.post("/get-online-features", json={"features": ["card_txn_stats:sum_amount_300s"],
                                                    "entities": {"card_id": [f"card{i:04d}"]}})
    updates = int(page.get_attribute("body", "data-updates") or 0)
    _wait(lambda: int(page.get_attribute("body", "data-updates") or 0) >= updates + 2, 10,
          "no new snapshot arrived over server-sent events")
    _wait(lambda: _path_points(page, "chart-stream", 0) >= 2, 30, "the events-in chart got no points")
    # the worker's first commit waits for its group join, which takes a while on a busy machine
    _wait(lambda: _path_points(page, "chart-stream", 1) >= 2, 120, "the processed chart got no points")
    _wait(lambda: _path_points(page, "chart-api-rate", 0) >= 2, 15, "the API chart got no points")
    _wait(lambda: _path_points(page, "chart-freshness", 0) >= 1, 120, "the freshness chart got no points")
    assert page.locator("#lag .bar").count() == stack["settings"].kafka_partitions
    page.screenshot(path=str(SHOTS / "live.png"), full_page=True)
    assert not page.errors


def test_injected_drift_alert_appears_in_the_feed_and_marks_its_input_within_seconds(page, stack):
    s = stack["settings"]
    alert = DriftAlert(alert_id=f"{stack['uid']}-a1", model=f"{stack['uid']}-fraud", model_version="1",
                       kind="feature", subject="card_txn_stats:sum_amount_300s", detector="adwin",
                       statistic=4.2, threshold=2.0, window=500)
    stack["producer"].produce(s.topic_drift, key=alert.key(), value=alert.encode())
    stack["producer"].flush(5)
    page.wait_for_selector(f"#alerts li[data-alert-id='{alert.alert_id}']", timeout=10_000)  # within seconds
    row = page.locator("#drift .drift-row[data-subject='card_txn_stats:sum_amount_300s']")
    assert "alerted" in row.get_attribute("class")
    assert row.locator("circle.mark").count() == 1
    assert "card_txn_stats:sum_amount_300s" in page.inner_text(f"#alerts li[data-alert-id='{alert.alert_id}']")
    page.screenshot(path=str(SHOTS / "drift-alert.png"), full_page=True)


def test_promotion_appears_on_the_model_timeline_and_the_header_names_the_served_version(page, stack):
    registry = ModelRegistry(stack["settings"])
    name = f"{stack['uid']}-fraud"
    registry.register_sklearn(name, fit_fraud_pipeline(0), MODEL_FEATURES, {"feature_service": "fraud_model_v1"},
                              {"auc": 0.71})
    registry.promote(name, "1")  # publishes the freshet.models event
    page.wait_for_selector("#timeline g.tl-event[data-version='1'][data-kind='promotion']", timeout=15_000)
    _wait(lambda: "v1" in page.inner_text("#serving"), 15, "the header did not name the served version")
    assert page.locator("#versions tr[data-version='1']").count() == 1
    page.screenshot(path=str(SHOTS / "promotion.png"), full_page=True)


def test_feature_browser_lists_views_features_windows_and_reads_one_entity(page, stack):
    page.click("#tab-features")
    view = page.locator(".view[data-view='card_txn_stats']")
    view.wait_for(timeout=20_000)
    assert view.locator("tr[data-feature='sum_amount_300s']").count() == 1
    assert "5 min" in view.locator("tr[data-feature='sum_amount_300s']").inner_text()
    assert "A payment card" in view.inner_text()
    _wait(lambda: _redis_has_card(stack, "card0001"), 60, "the stream never wrote card0001")
    page.fill("#card_txn_stats-card_id", "card0001")
    view.locator("button").click()
    out = view.locator("pre")
    out.wait_for(state="visible", timeout=10_000)
    assert "sum_amount_300s" in out.inner_text() and "PRESENT" in out.inner_text()
    page.screenshot(path=str(SHOTS / "features.png"), full_page=True)
    page.click("#tab-live")
    assert not page.errors


def _redis_has_card(stack, card: str) -> bool:
    reader = stack["app"].reader
    plan = reader.plan(["card_txn_stats:sum_amount_300s"], None, False)
    return reader.read(plan, {"card_id": [card]}).to_feast_dict()["results"][1]["statuses"][0] == "PRESENT"
