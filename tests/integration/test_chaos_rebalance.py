"""Faults never lose or double when workers join and leave a running group (opt-in: minutes).

One worker runs throughout while, in each round, a second one joins the group (a
rebalance: partitions move, Faust's recovery seeks them back to their committed offsets
while fetches are under way), works a few seconds and leaves, killed (SIGKILL: its
partitions wait out the session timeout) or stopped (SIGTERM: handed over at once); events
(~200/s, some out of order, some truly late) flow all along. The runs of this scenario found
a record fetched before a seek taken for a gap (offsets skipped, the partition's commits
crawling) and a re-delivered record processed twice (engine.ReadPositions). At the end
Redis, the latest Parquet rows and the dead letters equal an independent recomputation.

    FRESHET_TEST_CHAOS=1 .venv/bin/python -m pytest -q tests/integration/test_chaos_rebalance.py
"""

from __future__ import annotations

import os
import random
import signal
import time

import orjson
import pytest

from freshet.app.stack import RedisServer
from stream_checks import dead_letters, settled
from test_chaos_stream import T0, Feed, Workers, _offline_problems, _online_problems, _wait, chaos_stream

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(3600),
              pytest.mark.skipif(os.environ.get("FRESHET_TEST_CHAOS") != "1",
                                 reason="workers joining and leaving for minutes: run with FRESHET_TEST_CHAOS=1")]

ROUNDS = 4


def test_workers_joining_and_leaving_lose_and_double_nothing(services, tmp_path):
    own = RedisServer(tmp_path / "redis.log")
    own.start()
    workers_seen = []
    try:
        uid, topic, settings, env, registry, layout, client = chaos_stream(services, own, tmp_path, "rebal")
        workers = Workers(env, tmp_path, f"{uid}-stream")
        rnd, clock, feeds = random.Random(3), [T0], []
        steady = workers.start("steady")
        workers_seen.append(steady)
        for i in range(ROUNDS):
            with Feed(settings, topic, f"round{i}", rnd, clock) as feed:
                feeds.append(feed)
                joiner = workers.start(f"joiner{i}")
                workers_seen.append(joiner)
                log = workers.logs[f"joiner{i}"]
                assert _wait(lambda: "accepted" in log.read_text(), 600, joiner, log), "the joiner never worked"
                time.sleep(3)
                joiner.send_signal(signal.SIGTERM if i % 2 else signal.SIGKILL)
                joiner.wait(timeout=120)
                time.sleep(3)  # the steady worker alone (after a kill: once the session expired)
        events = [e for feed in feeds for e in feed.valid]
        steady_log = workers.logs["steady"]
        assert _wait(lambda: settled(settings, workers.app_id, [topic])
                     and not _online_problems((layout, client, registry), events), 600, steady, steady_log), \
            (_online_problems((layout, client, registry), events)[:10], steady_log.read_text()[-3000:])
        assert _wait(lambda: not _offline_problems(registry, events), 60, steady, steady_log), \
            _offline_problems(registry, events)[:10]
        late = {e["transaction_id"] for feed in feeds for e in feed.late}
        got = {orjson.loads(r.original())["transaction_id"] for r in dead_letters(settings)}
        assert got == late, (sorted(got - late)[:10], sorted(late - got)[:10])
    finally:
        for w in workers_seen:
            if w.poll() is None:
                w.kill()
                w.wait()
        own.stop()
