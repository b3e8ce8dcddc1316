"""The dashboard's readings and its login, without a broker: what each panel computes from the
messages it is given, and which requests the /ui routes let through."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from freshet.contracts import Label, ModelEvent, Prediction
from freshet.serving.dashboard import COOKIE, Dashboard, SessionCookies, TokenCredential, cookie_value
from freshet.serving.dashboard_feed import ApiStats, ModelTimeline, VersionErrors
from freshet.exporter import LockFreeHistogram
from freshet.serving.metrics import LATENCY_BUCKETS
from freshet.settings import load_settings


def _event(version: str, ts: float) -> ModelEvent:
    return ModelEvent(model="fraud", version=version, stage="champion", metrics={"auc": 0.8}, ts=ts)


def test_promoting_an_earlier_version_again_is_a_rollback_on_the_timeline():
    timeline = ModelTimeline()
    for version, ts in (("1", 1.0), ("2", 2.0), ("1", 3.0), ("3", 4.0)):
        timeline.observe(_event(version, ts))
    kinds = [(e["version"], e["kind"]) for e in timeline.view()["events"]]
    assert kinds == [("1", "promotion"), ("2", "promotion"), ("1", "rollback"), ("3", "promotion")]
    assert timeline.current() == {"fraud": "3"}


def test_error_rate_per_version_joins_labels_to_predictions_by_request_id():
    errors = VersionErrors()
    for i, (version, predicted) in enumerate((("1", 1), ("1", 0), ("2", 0), ("2", 0))):
        errors.predicted(Prediction(f"r{i}", "fraud", version, {}, {}, {"score": 0.9 if predicted else 0.1,
                                                                         "label": predicted}))
    for i, label in enumerate((1, 1, 0)):  # r3 never gets a label
        errors.labelled(Label(label=label, request_id=f"r{i}"))
    errors.labelled(Label(label=1, request_id="unknown"))
    rows = {r["version"]: r for r in errors.view(known=[("fraud", "3")])}
    assert rows["1"]["labelled"] == 2 and rows["1"]["error_rate"] == 0.5
    assert rows["2"]["predictions"] == 2 and rows["2"]["labelled"] == 1 and rows["2"]["error_rate"] == 0.0
    assert rows["3"] == {"model": "fraud", "version": "3", "predictions": 0, "labelled": 0, "error_rate": None}


def test_api_panel_counts_api_requests_but_not_the_dashboards_own():
    metrics = SimpleNamespace(requests={}, latency={})
    stats = ApiStats(metrics, LATENCY_BUCKETS)
    stats.sample(100.0)
    metrics.requests = {("/predict", 200): 40, ("/predict", 503): 10, ("other", 401): 500}
    hist = metrics.latency["/predict"] = LockFreeHistogram(LATENCY_BUCKETS)
    for _ in range(50):
        hist.observe(0.002)
    stats.sample(102.0)
    view = stats.view()
    assert view["rate"][-1] == [102.0, 25.0]
    assert view["p50_ms"][-1] == [102.0, 2.5]
    assert view["errors_5xx"][-1] == [102.0, 10]


# -- the /ui routes ----------------------------------------------------------------------------

def _dashboard() -> Dashboard:
    app = SimpleNamespace(settings=load_settings({}), reader=None, metrics=None, follower=None, model_name="fraud")
    return Dashboard(app, TokenCredential("s3cret"), b"session-key")


def _call(dashboard: Dashboard, method: str, path: str, headers=(), body: bytes = b"") -> tuple[int, dict, bytes]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": list(headers), "query_string": b""}
    asyncio.run(dashboard(scope, receive, send))
    start = sent[0]
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, sent[1]["body"]


def test_ui_answers_the_login_form_until_a_valid_session_cookie_comes_back():
    dashboard = _dashboard()
    status, _, page = _call(dashboard, "GET", "/ui")
    assert status == 200 and b'name="token"' in page and b"dashboard.js" not in page
    assert _call(dashboard, "GET", "/ui/events")[0] == 401
    status, _, page = _call(dashboard, "POST", "/ui/login", body=b"token=guess")
    assert status == 401 and b"not accepted" in page
    status, headers, _ = _call(dashboard, "POST", "/ui/login", body=b"token=s3cret")
    assert status == 303 and headers["location"] == "/ui/"
    cookie = cookie_value([(b"cookie", headers["set-cookie"].split(";")[0].encode())])
    assert cookie and "s3cret" not in headers["set-cookie"]
    status, _, page = _call(dashboard, "GET", "/ui", headers=[(b"cookie", f"{COOKIE}={cookie}".encode())])
    assert status == 200 and b"dashboard.js" in page
    forged = SessionCookies(b"another-key").issue()
    assert _call(dashboard, "GET", "/ui", headers=[(b"cookie", f"{COOKIE}={forged}".encode())])[2] != page


def test_assets_are_local_and_the_page_refuses_inline_and_foreign_scripts():
    dashboard = _dashboard()
    status, headers, body = _call(dashboard, "GET", "/ui/static/dashboard.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript") and b"EventSource" in body
    assert "script-src 'self'" in headers["content-security-policy"]
    assert _call(dashboard, "GET", "/ui/static/../auth.py")[0] == 404
    for name in ("dashboard.html", "login.html", "dashboard.css", "dashboard.js"):
        text = (dashboard._assets[name]).decode()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text, name
