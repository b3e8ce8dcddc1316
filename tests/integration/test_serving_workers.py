"""`freshet serve --workers N` as a real command on real Redis, Kafka and MLflow: sharing, stopping, no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import psutil
import pytest

from freshet import kafka
from freshet.app.stack import free_port
from freshet.models import ModelRegistry
from test_serving_support import applied_settings, fit_fraud_pipeline, with_topics  # noqa: F401 - fixtures

pytestmark = pytest.mark.integration

TOKEN = "workers-token"
MODEL_FEATURES = ["card_txn_stats:sum_amount_300s", "merchant_txn_stats:count_amount_3600s", "amount"]
PREDICT = {"entities": {"card_id": "w-card", "merchant_id": "w-merchant"}, "fields": {"amount": 5.0}}


@pytest.fixture(scope="module")
def settings(applied_settings):  # noqa: F811
    uid = "w" + uuid.uuid4().hex[:8]
    s = with_topics(applied_settings, uid, api_token=TOKEN, model_name=f"{uid}-fraud")
    kafka.ensure_topics(s, [s.topic_predictions, s.topic_models])
    reg = ModelRegistry(s)
    version = reg.register_sklearn(s.model_name, fit_fraud_pipeline(0), MODEL_FEATURES,
                                   {"feature_service": "fraud_model_v1", "seed": 0}, {"auc": 0.7})
    reg.promote(s.model_name, version)
    return s


def _start(settings, workers: int) -> tuple[subprocess.Popen, int]:
    """`freshet serve --workers N` in its own process group, as a terminal would run it."""
    port = free_port()
    env = {**os.environ, **settings.to_env(), "FRESHET_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "freshet.cli", "serve", "--workers", str(workers),
                             "--port", str(port)], env=env, start_new_session=True)
    return proc, port


def _process_prefixes(port: int, want: int, deadline_s: float = 240.0, at_least: int = 0) -> Counter:
    """Generated request ids start with a per-process prefix: how many predictions each process
    answered, until `want` processes answered (and at least `at_least` predictions in all).

    A new connection per request, so SO_REUSEPORT can hand each to any worker.
    """
    prefixes: Counter = Counter()
    deadline = time.monotonic() + deadline_s
    while (len(prefixes) < want or prefixes.total() < at_least) and time.monotonic() < deadline:
        try:
            r = httpx.post(f"http://127.0.0.1:{port}/predict", json=PREDICT,
                           headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
        except httpx.HTTPError:
            time.sleep(0.5)  # no worker listens yet
            continue
        if r.status_code == 200:
            prefixes[r.json()["request_id"][:16]] += 1
        else:
            time.sleep(0.2)  # a worker still loading its model answers 503
    return prefixes


def _gone(pids: list[int], deadline_s: float = 30.0) -> list[int]:
    deadline = time.monotonic() + deadline_s
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.2)
    return alive


def _kill_all(proc: subprocess.Popen, pids: list[int]) -> None:
    for pid in [proc.pid, *pids]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _metric(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _scraped_predictions(port: int, want: float, deadline_s: float = 30.0) -> tuple[float, float]:
    """(/predict 200s, predictions) that /metrics reports, scraped on new connections (any worker
    answers) until they reach `want`: each worker publishes its counts about once a second."""
    seen = (0.0, 0.0)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        seen = (_metric(text, "freshet_http_requests_total", endpoint="/predict", status="200"),
                _metric(text, "freshet_predictions_total"))
        if min(seen) >= want:
            break
        time.sleep(0.3)
    return seen


def test_two_workers_share_the_port_and_their_metrics_and_ctrl_c_stops_them_all(settings):
    shared_dirs = set(Path(tempfile.gettempdir()).glob("freshet-serve-metrics-*"))
    proc, port = _start(settings, workers=2)
    children: list[int] = []
    try:
        answered = _process_prefixes(port, want=2, at_least=20)
        assert len(answered) == 2, "both workers should answer on the one port"
        # either worker's /metrics counts every worker's predictions, not its own
        assert _scraped_predictions(port, want=answered.total()) == (answered.total(), answered.total()), answered
        children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert len(children) >= 2
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole group
        assert proc.wait(60) == 0
        assert _gone(children) == [], "no worker outlives the command"
        assert set(Path(tempfile.gettempdir()).glob("freshet-serve-metrics-*")) <= shared_dirs, \
            "the supervisor removes its metrics directory"
    finally:
        _kill_all(proc, children)


def test_workers_exit_when_their_supervisor_is_killed(settings):
    proc, port = _start(settings, workers=2)
    workers: list[int] = []
    try:
        assert len(_process_prefixes(port, want=2)) == 2
        workers = [c.pid for c in psutil.Process(proc.pid).children()]
        os.kill(proc.pid, signal.SIGKILL)  # no chance to stop them itself
        proc.wait(10)
        assert _gone(workers) == [], "workers must not be orphaned"
    finally:
        _kill_all(proc, workers)
