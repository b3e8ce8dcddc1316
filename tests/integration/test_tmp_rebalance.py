import os, random, signal, time, types, subprocess
import pytest
from freshet.app.stack import RedisServer
from stream_checks import isolated_stream, settled
from test_chaos_stream import Feed, Workers, _wait, _online_problems, T0

pytestmark = [pytest.mark.integration, pytest.mark.timeout(3600)]


def test_rebalances(services, tmp_path):
    own = RedisServer(tmp_path / "redis.log"); own.start()
    try:
        uid, topic, settings, env, registry, layout, client = isolated_stream(
            types.SimpleNamespace(kafka=services.kafka, redis_url=own.url), tmp_path, "rb")
        env = {**env, "FRESHET_STREAM_COMMIT_INTERVAL_MS": "500", "FRESHET_KAFKA_SESSION_TIMEOUT_MS": "6000"}
        workers = Workers(env, tmp_path, f"{uid}-stream")
        rnd, clock = random.Random(3), [T0]
        a = workers.start("a")
        phases = []
        for i in range(int(os.environ.get("ROUNDS", "3"))):
            with Feed(settings, topic, f"p{i}", rnd, clock) as feed:
                phases.append(feed)
                time.sleep(8)
                b = workers.start(f"b{i}")
                _wait(lambda: "partitions assigned" in workers.logs[f"b{i}"].read_text() and workers.logs[f"b{i}"].read_text().count("accepted") >= 1, 300, b, workers.logs[f"b{i}"])
                time.sleep(3)
                if i % 2:
                    b.send_signal(signal.SIGTERM)
                else:
                    b.kill()
                b.wait(60)
                time.sleep(5)
        events = [e for f in phases for e in f.valid]
        done = _wait(lambda: settled(settings, workers.app_id, [topic]) and not _online_problems((layout, client, registry), events), 300, a, workers.logs["a"])
        from freshet import kafka
        for t in [topic]:
            ends = kafka.partition_ends(settings, t)
            print("OFFSETS", kafka.committed_offsets(settings, workers.app_id, t, ends), ends)
        print("PROBLEMS", _online_problems((layout, client, registry), events)[:5])
        print("LOGDIR", tmp_path)
        assert done
        a.send_signal(signal.SIGTERM); a.wait(60)
    finally:
        own.stop()
