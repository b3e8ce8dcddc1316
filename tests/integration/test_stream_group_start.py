"""Workers of a new consumer group, started together, apply every event that waited for them.

Two workers that join a group nobody has committed in yet rebalance while they start: what
one of them fetched before its flow stopped was dropped, and the client did not seek back
where no offset was committed, so those events were never applied (and the group's commit
stayed behind them for good). Here the events are all on the topic before either worker
starts, so each partition's first fetch races its owner's recovery.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

import orjson
import pytest

from freshet import kafka
from stream_checks import isolated_stream, online_differences, settled

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CARD, MERCHANT = "card_txn_stats", "merchant_txn_stats"


def test_two_workers_started_together_apply_every_event_produced_before_they_joined(services, tmp_path):
    uid, topic, settings, worker_env, registry, layout, client = isolated_stream(services, tmp_path, "grp")
    rnd = random.Random(7)
    t0 = time.time() - 60
    events = [{"transaction_id": f"{uid}-tx{i}", "card_id": f"{uid}-c{rnd.randrange(40)}",
               "merchant_id": f"{uid}-m{rnd.randrange(12)}", "amount": round(rnd.uniform(1, 300), 2),
               "country": "DE", "channel": "web", "event_ts": t0 + i * 0.05} for i in range(400)]
    producer = kafka.producer(settings)
    for e in events:
        producer.produce(topic, key=e["card_id"].encode(), value=orjson.dumps(e))
    assert producer.flush(30) == 0

    app_id = f"{uid}-stream"
    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
    workers = [subprocess.Popen([sys.executable, "-m", "freshet.cli", "stream", "--app-id", app_id],
                                env=worker_env, stdout=open(log, "ab"), stderr=subprocess.STDOUT) for log in logs]
    internal = [f"{app_id}-{view}-repartition" for view in (CARD, MERCHANT)]
    try:
        deadline = time.monotonic() + 150
        while True:
            for w, log in zip(workers, logs):
                assert w.poll() is None, log.read_text()[-3000:]
            wrong_cards = online_differences(layout, client, registry.views[CARD], events, "card_id")
            wrong_merchants = online_differences(layout, client, registry.views[MERCHANT], events, "merchant_id")
            if not wrong_cards and not wrong_merchants and settled(settings, app_id, [topic, *internal]):
                break
            assert time.monotonic() < deadline, (
                f"after 150 s: {len(wrong_cards)} card and {len(wrong_merchants)} merchant differences, "
                f"e.g. {(wrong_cards + wrong_merchants)[:4]}; group settled: "
                f"{settled(settings, app_id, [topic, *internal])}")
            time.sleep(0.5)
        # both took part: each was assigned source partitions, so each applied events of its own
        for log in logs:
            assigned = [line for line in log.read_text().splitlines() if "partitions assigned:" in line]
            assert assigned and f"('{topic}', " in assigned[-1], (log, assigned[-1:])
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.kill()
