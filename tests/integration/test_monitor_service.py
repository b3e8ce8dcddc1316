"""`freshet monitor` on the real broker: a shift in published predictions becomes a drift alert on
the drift topic and a retrain request; a restart resumes without warming up or an alert flood.

One module-wide scenario: predictions (with a few records that break the contract) are
published, with a +1 sd shift in `amount` from prediction 3000 on; a monitor service runs
until it has read them, stops (saving its state), and a second one continues on more
shifted traffic from that state.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.request

import numpy as np
import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from freshet import kafka
from freshet.contracts import RetrainRequest
from freshet.settings import load_settings
from freshet.monitor import service

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "fraud"
WATCHED = ["amount", "card_txn_stats:sum_amount_300s", "card_txn_stats:count_amount_300s",
           "merchant_txn_stats:mean_amount_3600s"]
N_BEFORE, N_SHIFTED, N_AFTER_RESTART = 3000, 1500, 3000
T0 = 1_800_000_000.0
CONFIG = {
    "seed": 1,
    "models": [{"model": MODEL, "numeric_features": WATCHED, "warmup": 1000, "estimate": False,
                "join_labels": False, "watch_score": True}],
    "policy": {"min_alerts": 1, "window_s": 600, "cooldown_s": 3600},
}
BAD_RECORDS = [b"{not json", orjson.dumps({"schema": "freshet.labels/1", "label": 1, "ts": 1.0}),
               orjson.dumps({"schema": "freshet.predictions/1", "request_id": "x", "model": MODEL})]


def predictions(start: int, n: int, shift: float, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(start, start + n):
        amount = 40.0 + 10.0 * (rng.normal() + shift)
        feats = {"amount": amount, "card_txn_stats:sum_amount_300s": 60.0 + 15.0 * rng.normal(),
                 "card_txn_stats:count_amount_300s": int(rng.poisson(2)),
                 "merchant_txn_stats:mean_amount_3600s": 45.0 + 5.0 * rng.normal()}
        score = float(1 / (1 + np.exp(-(-3.5 + 0.3 * rng.normal()))))
        out.append(orjson.dumps({"schema": "freshet.predictions/1", "request_id": f"tx{i}", "model": MODEL,
                                 "model_version": "1", "entities": {"card_id": f"c{i % 50}"}, "features": feats,
                                 "prediction": {"score": score, "label": 0}, "ts": T0 + i}))
    return out


def produce(settings, topic: str, values: list[bytes]) -> None:
    p = kafka.producer(settings)
    for i, v in enumerate(values):
        p.produce(topic, key=f"k{i % 16}".encode(), value=v)
    assert p.flush(30) == 0


def read_topic(settings, topic: str, timeout: float = 5.0) -> list[bytes]:
    c = kafka.consumer(settings, f"{topic}-check", **{"enable.partition.eof": True})
    meta = c.list_topics(topic, timeout=10).topics[topic]
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
    left, out, deadline = set(meta.partitions), [], time.monotonic() + timeout
    try:
        while left and time.monotonic() < deadline:
            msg = c.poll(0.2)
            if msg is None:
                continue
            if msg.error():
                left.discard(msg.partition())
                continue
            out.append(msg.value())
    finally:
        c.close()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_until(svc: service.MonitorService, done, timeout: float = 60.0) -> None:
    thread = threading.Thread(target=svc.run, kwargs={"group": "test-monitor"}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while not done():
            assert thread.is_alive(), "the monitor stopped by itself"
            assert time.monotonic() < deadline, f"monitor did not finish in {timeout}s: {dict(svc.counts)}"
            time.sleep(0.1)
    finally:
        svc.stop()
        thread.join(30)
    assert not thread.is_alive()


def new_service(settings, registry, metrics=None, alerts=None, requests=None) -> service.MonitorService:
    monitor, policy = service.build(json.loads(json.dumps(CONFIG)), service.known_inputs(registry))
    return service.MonitorService(settings, monitor, policy, event_topics=list(registry.views_by_topic()),
                                  snapshot_every_s=3600, idle_flush_s=0.3, metrics=metrics,
                                  on_alert=(alerts.append if alerts is not None else None),
                                  on_request=(requests.append if requests is not None else None))


@pytest.fixture(scope="module")
def scenario(services, tmp_path_factory, apply_feature_repo):
    tmp = tmp_path_factory.mktemp("monitor")
    uid = "m" + os.urandom(4).hex()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
    settings = load_settings(env, kafka_bootstrap_servers=services.kafka, redis_url=services.redis_url,
                             data_dir=str(tmp / "data"), **{f"topic_{t}": f"{uid}.{t}" for t in
                                                            ("predictions", "labels", "drift", "retrain",
                                                             "deadletter", "models")}, kafka_partitions=1)
    registry = apply_feature_repo(settings)
    kafka.ensure_topics(settings, [settings.topic_predictions, settings.topic_labels])
    produce(settings, settings.topic_predictions,
            predictions(0, N_BEFORE, 0.0, seed=1)[:1500] + BAD_RECORDS[::2] + predictions(0, N_BEFORE, 0.0, seed=1)[1500:]
            + predictions(N_BEFORE, N_SHIFTED, 1.0, seed=2))
    produce(settings, settings.topic_labels, [BAD_RECORDS[1]])
    alerts, requests = [], []
    metrics = service.MonitorMetrics()
    port = free_port()
    metrics.serve(port)
    svc = new_service(settings, registry, metrics, alerts, requests)
    assert not svc.restore()
    total = N_BEFORE + N_SHIFTED
    run_until(svc, lambda: svc.counts[settings.topic_predictions] >= total and svc.counts["rejected"] >= 3)
    metrics.update(svc.monitor)
    scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    metrics.close()
    return {"settings": settings, "registry": registry, "service": svc, "alerts": alerts, "requests": requests,
            "scrape": scrape}


def test_a_shift_in_one_feature_raises_a_feature_alert_on_the_drift_topic_after_the_shift(scenario):
    settings, alerts = scenario["settings"], scenario["alerts"]
    assert alerts, "no alert for a +1 sd shift"
    first = alerts[0]
    assert (first.kind, first.subject, first.model) == ("feature", "amount", MODEL)
    assert first.ts >= T0 + N_BEFORE, "alerted before the shift"
    assert first.ts <= T0 + N_BEFORE + 250, f"alerted {first.ts - T0 - N_BEFORE:.0f} predictions after the shift"
    assert all(a.subject == "amount" for a in alerts if a.kind == "feature")
    published = [json.loads(v) for v in read_topic(settings, settings.topic_drift)]
    assert [p["alert_id"] for p in published] == [a.alert_id for a in alerts]
    assert published[0]["schema"] == "freshet.drift/1" and published[0]["model_version"] == "1"


def test_the_alert_becomes_one_retrain_request_citing_it(scenario):
    settings, alerts, requests = scenario["settings"], scenario["alerts"], scenario["requests"]
    assert len(requests) == 1  # the policy's cooldown (an hour of prediction time) holds the rest
    assert requests[0].model == MODEL and alerts[0].alert_id in requests[0].reason
    published = [RetrainRequest.decode(v) for v in read_topic(settings, settings.topic_retrain)]
    assert [(r.request_id, r.reason) for r in published] == [(requests[0].request_id, requests[0].reason)]


def test_records_that_break_the_contract_are_counted_not_fatal(scenario):
    svc = scenario["service"]
    assert svc.counts["rejected"] == len(BAD_RECORDS)
    assert svc.counts[scenario["settings"].topic_predictions] == N_BEFORE + N_SHIFTED
    assert sum(svc.rejected.values()) == len(BAD_RECORDS)


def test_prometheus_metrics_show_alerts_and_detector_statistics(scenario):
    scrape = scenario["scrape"]
    assert 'freshet_monitor_alerts_total{kind="feature",model="fraud",subject="amount"}' in scrape
    assert 'freshet_monitor_detector_statistic{model="fraud",statistic="shift:amount"}' in scrape
    assert 'freshet_monitor_records_total{outcome="rejected"' in scrape
    assert 'freshet_monitor_retrain_requests_total{model="fraud"} 1.0' in scrape


def test_alerts_command_prints_the_alerts_of_a_model(scenario, monkeypatch, capsys):
    from freshet.cli import main

    _use_settings(monkeypatch, scenario["settings"])
    assert main(["alerts", "--model", MODEL]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == len(scenario["alerts"]) and f"alert {scenario['alerts'][0].alert_id}" in out[0]
    assert " fraud v1 feature amount: adwin " in out[0]
    assert main(["alerts", "--model", "other", "--json"]) == 0
    assert capsys.readouterr().out == ""


def test_restart_resumes_from_the_saved_state_without_an_alert_flood(scenario):
    settings, registry = scenario["settings"], scenario["registry"]
    first = scenario["service"]
    state = json.loads(first.state_file.read_text())
    assert state["format"] == service.STATE_FORMAT
    assert sum(state["offsets"][settings.topic_predictions].values()) == N_BEFORE + N_SHIFTED + 2
    before = len(read_topic(settings, settings.topic_drift))

    produce(settings, settings.topic_predictions, predictions(N_BEFORE + N_SHIFTED, N_AFTER_RESTART, 1.0, seed=3))
    alerts, requests = [], []
    svc = new_service(settings, registry, alerts=alerts, requests=requests)
    assert svc.restore()
    assert "numeric" not in svc.monitor.counters()["models"][MODEL]["warming_up"]  # no second warm-up
    run_until(svc, lambda: svc.counts[settings.topic_predictions] >= N_BEFORE + N_SHIFTED + N_AFTER_RESTART)
    # resumed at the saved offsets: only the new records were read
    assert svc.counts[settings.topic_predictions] == N_BEFORE + N_SHIFTED + N_AFTER_RESTART
    assert len(alerts) <= 1, [(a.kind, a.subject) for a in alerts]
    assert requests == []
    assert len(read_topic(settings, settings.topic_drift)) == before + len(alerts)


def test_a_config_naming_an_unknown_feature_fails_at_start_up_naming_it(scenario, tmp_path, monkeypatch, capsys):
    from freshet.cli import main

    _use_settings(monkeypatch, scenario["settings"])
    cfg = tmp_path / "monitor.toml"
    cfg.write_text('[[models]]\nmodel = "fraud"\nnumeric_features = ["amount", "card_txn_stats:sum_amont_300s"]\n')
    assert main(["monitor", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "card_txn_stats:sum_amont_300s" in err and "unknown feature" in err
    cfg.write_text('[[models]]\nmodel = "fraud"\nnumeric_features = ["amount"]\nfeature_detector = "adwinn"\n')
    assert main(["monitor", "--config", str(cfg)]) == 2
    assert "adwinn" in capsys.readouterr().err


def _use_settings(monkeypatch, settings) -> None:
    for k in [k for k in os.environ if k.startswith("FRESHET_")]:
        monkeypatch.delenv(k)
    for k, v in settings.to_env().items():
        monkeypatch.setenv(k, v)


def test_a_dead_letter_rate_over_the_limit_is_a_data_quality_alert_that_does_not_retrain(scenario, tmp_path):
    settings = scenario["settings"]
    events_topic = f"{settings.topic_predictions}.events"
    kafka.ensure_topics(settings, [events_topic, settings.topic_deadletter])
    monitor, policy = service.build(json.loads(json.dumps(CONFIG)), None)
    alerts, requests = [], []
    svc = service.MonitorService(settings, monitor, policy, event_topics=[events_topic], start="latest",
                                 state_file=tmp_path / "state.json", deadletter_every_s=0.2,
                                 deadletter_min_events=100, on_alert=alerts.append, on_request=requests.append)
    thread = threading.Thread(target=svc.run, kwargs={"group": "test-dl"}, daemon=True)
    thread.start()
    try:
        assert svc.ready.wait(30)
        time.sleep(1.0)  # the first look sets the baseline
        produce(settings, events_topic, [b"{}"] * 1000)
        produce(settings, settings.topic_deadletter, [b"{}"] * 50)  # 5% > the 1% limit
        deadline = time.monotonic() + 20
        while not alerts and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        svc.stop()
        thread.join(30)
    assert [(a.kind, a.subject) for a in alerts] == [("data_quality", "deadletter")]
    assert alerts[0].statistic == pytest.approx(0.05, abs=0.01)
    assert requests == []


# -- labelled performance through the real path ------------------------------------------

LABEL_CONFIG = {
    "seed": 2, "label_wait_s": 10_000,
    "models": [{"model": MODEL, "numeric_features": ["amount"], "warmup": 500, "label_warmup": 500,
                "estimate": False, "watch_score": False}],
}
LABEL_CLOCK = 1_600_000_000.0  # the labelling system's clock, unrelated to the predictions' ts


def served(start: int, n: int, ts0: float, seed: int) -> list[tuple[bytes, bytes]]:
    """Prediction records as serving logs them for a client request id: keyed and identified by the transaction id."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(start, start + n):
        score = float(rng.beta(1, 8))
        out.append((f"tx{i}".encode(), orjson.dumps({
            "schema": "freshet.predictions/1", "request_id": f"tx{i}", "model": MODEL, "model_version": "1",
            "entities": {"card_id": f"c{i % 50}"}, "features": {"amount": 40.0 + 10.0 * rng.normal()},
            "prediction": {"score": score, "label": int(score >= 0.5)}, "ts": ts0 + i - start})))
    return out


def outcomes(start: int, n: int, error_rate: float, seed: int) -> list[tuple[bytes, bytes]]:
    """Labels keyed by the transaction id; serving predicts 0 for every score above, so 1 is an error."""
    wrong = np.random.default_rng(seed).random(n) < error_rate
    return [(f"tx{i}".encode(), orjson.dumps({"schema": "freshet.labels/1", "request_id": f"tx{i}",
                                              "label": int(w), "ts": LABEL_CLOCK + 60.0 * i}))
            for i, w in zip(range(start, start + n), wrong.tolist())]


def produce_keyed(settings, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    p = kafka.producer(settings)
    for key, value in messages:
        p.produce(topic, key=key, value=value)
    assert p.flush(30) == 0


def test_labels_keyed_by_request_id_join_before_or_after_their_predictions_and_raise_a_performance_alert(settings):
    kafka.ensure_topics(settings, [settings.topic_predictions, settings.topic_labels])
    monitor, policy = service.build(json.loads(json.dumps(LABEL_CONFIG)), None)
    alerts = []
    svc = service.MonitorService(settings, monitor, policy, snapshot_every_s=3600, idle_flush_s=0.3,
                                 on_alert=alerts.append)
    joins = svc.monitor.join.counters
    thread = threading.Thread(target=svc.run, kwargs={"group": "test-labels"}, daemon=True)
    thread.start()

    def until(cond, what: str) -> None:
        deadline = time.monotonic() + 60
        while not cond():
            assert thread.is_alive(), "the monitor stopped by itself"
            assert time.monotonic() < deadline, f"{what}: {joins()}"
            time.sleep(0.1)

    try:
        # labels for tx0..999 are on the topic before their predictions; serving's clock is 7 years later
        produce_keyed(settings, settings.topic_labels, outcomes(0, 1000, 0.05, seed=1))
        until(lambda: joins()["waiting_labels"] >= 1000, "labels read, waiting for their predictions")
        produce_keyed(settings, settings.topic_predictions, served(0, 2000, T0, seed=2))
        until(lambda: joins()["joined"] >= 1000, "labels read before their predictions joined")
        # tx1000..1499 labelled after their predictions, and now three in five are errors
        produce_keyed(settings, settings.topic_labels, outcomes(1000, 500, 0.6, seed=3))
        until(lambda: joins()["joined"] >= 1500, "labels read after their predictions joined")
        # prediction time moves past the wait: tx1500..1999 never got a label
        produce_keyed(settings, settings.topic_predictions, served(2000, 100, T0 + 50_000, seed=4))
        until(lambda: joins()["missing"] >= 500, "unlabelled predictions given up")
        produce_keyed(settings, settings.topic_labels, outcomes(1500, 50, 0.05, seed=5))
        until(lambda: joins()["late"] >= 50, "labels after the wait counted late")
    finally:
        svc.stop()
        thread.join(30)
    counters = joins()
    assert (counters["joined"], counters["missing"], counters["late"], counters["unmatched"],
            counters["duplicate"]) == (1500, 500, 50, 0, 0)
    assert svc.counts["rejected"] == 0
    performance = [a for a in alerts if a.kind == "performance"]
    assert performance and {a.subject for a in performance} == {"error_rate"}
    published = [json.loads(v) for v in read_topic(settings, settings.topic_drift)]
    assert [p["alert_id"] for p in published if p["kind"] == "performance"] == [a.alert_id for a in performance]
