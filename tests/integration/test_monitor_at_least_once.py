"""`freshet monitor` killed with SIGKILL between publishing alerts and saving the state that covers
them loses nothing: restarted, it publishes every alert an uninterrupted monitor publishes, under
the same ids (a repeat is harmless), and its saved state ends where the stream does.

The kill comes from inside (FRESHET_MONITOR_TEST_CRASH_AT=delivered:1, a real SIGKILL the moment
the broker has acknowledged the first alerts and before the state covering them is written),
not from the test's polls, which a fast monitor outruns."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from freshet import kafka
from freshet.contracts import DriftAlert, RetrainRequest
from freshet.monitor import service
from freshet.settings import load_settings
from test_monitor_service import CONFIG, predictions, produce, read_topic, run_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_BEFORE, N_SHIFTED = 3000, 12000


def _monitor(settings, config: Path, group: str, **hooks: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
    env.update(settings.to_env(), **hooks)
    freshet = Path(sys.executable).with_name("freshet")
    return subprocess.Popen([str(freshet), "monitor", "--config", str(config), "--snapshot-every", "1",
                             "--start", "earliest", "--group", group], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait(cond, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the monitor exited ({proc.returncode}) before {what}: "
                                 f"{proc.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.1)


def _saved_offset(state_file: Path, topic: str) -> int:
    try:
        return sum(json.loads(state_file.read_text())["offsets"].get(topic, {}).values())
    except (OSError, ValueError, KeyError):
        return -1


@pytest.mark.timeout(1200)  # three monitors (two processes) on a machine that may be busy
def test_a_monitor_killed_between_publishing_and_saving_loses_no_alert(services, tmp_path, apply_feature_repo):
    uid = "alo" + os.urandom(4).hex()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
    settings = load_settings(env, kafka_bootstrap_servers=services.kafka, redis_url=services.redis_url,
                             data_dir=str(tmp_path / "data"), kafka_partitions=1,
                             **{f"topic_{t}": f"{uid}.{t}" for t in ("predictions", "labels", "drift", "retrain",
                                                                     "deadletter", "models")})
    registry = apply_feature_repo(settings)
    kafka.ensure_topics(settings, [settings.topic_predictions, settings.topic_labels])
    total = N_BEFORE + N_SHIFTED
    produce(settings, settings.topic_predictions,
            predictions(0, N_BEFORE, 0.0, seed=1) + predictions(N_BEFORE, N_SHIFTED, 1.5, seed=2))

    # what an uninterrupted monitor publishes (to its own topics)
    reference = load_settings(env, **{**{k: getattr(settings, k) for k in ("kafka_bootstrap_servers", "redis_url",
                                                                          "topic_predictions", "topic_labels")},
                                      "data_dir": str(tmp_path / "reference"), "topic_drift": f"{uid}.drift-ref",
                                      "topic_retrain": f"{uid}.retrain-ref", "topic_deadletter": f"{uid}.dl-ref"})
    alerts: list[DriftAlert] = []
    requests: list[RetrainRequest] = []
    monitor, policy = service.build(json.loads(json.dumps(CONFIG)), service.known_inputs(registry))
    ref = service.MonitorService(reference, monitor, policy, snapshot_every_s=3600, idle_flush_s=0.3,
                                 on_alert=alerts.append, on_request=requests.append)
    run_until(ref, lambda: ref.counts[settings.topic_predictions] >= total, timeout=400)
    assert len(alerts) >= 2, "the scenario needs alerts on both sides of the kill"

    config = tmp_path / "monitor.json"
    config.write_text(json.dumps(CONFIG))
    state_file = service.state_path(settings)
    first = _monitor(settings, config, f"{uid}-monitor", FRESHET_MONITOR_TEST_CRASH_AT="delivered:1")
    try:
        _, err = first.communicate(timeout=400)
    finally:
        first.kill()
    assert first.returncode == -signal.SIGKILL, f"exited {first.returncode}: {err.decode()[-2000:]}"
    assert "test hook: SIGKILL at delivered" in err.decode()
    assert read_topic(settings, settings.topic_drift, timeout=1), "the alerts it was killed after are published"
    assert _saved_offset(state_file, settings.topic_predictions) < total, \
        "the state saved before the kill already covers the whole stream: the kill proves nothing"

    second = _monitor(settings, config, f"{uid}-monitor")
    try:
        _wait(lambda: _saved_offset(state_file, settings.topic_predictions) >= total, 400,
              "the restarted monitor saving a state at the end of the stream", second)
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0

    published = [DriftAlert.decode(v) for v in read_topic(settings, settings.topic_drift)]
    assert {a.alert_id for a in published} == {a.alert_id for a in alerts}  # none lost, none made up
    assert [a.alert_id for a in sorted(published, key=lambda a: a.ts)][-1] == alerts[-1].alert_id
    sent = [RetrainRequest.decode(v) for v in read_topic(settings, settings.topic_retrain)]
    assert {r.request_id for r in sent} == {r.request_id for r in requests}
