"""The online store on a Redis Cluster: a local three-primary cluster this module starts.

One scenario feeds the stream tests: a stream worker with FRESHET_REDIS_CLUSTER=on computes
the feature repo's views from produced events into the cluster; one primary is then flushed
while it runs, and the worker must notice (its row marker on that primary is gone) and
write the rows back. With the worker stopped, freshet's fast reader (blocking and on the
event loop) and Feast's own reader must return what Redis holds and the window rule gives.
The redirection tests move slots under a reader that still has the old slot map.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time

import orjson
import pytest
import redis
from redis.cluster import RedisCluster

from freshet import features, kafka
from freshet.app.stack import LocalRedisCluster
from freshet.endpoints import check_redis_mode, redis_client
from freshet.errors import CliError
from freshet.redis_cluster import key_slot
from freshet.redis_layout import OnlineLayout
from freshet.settings import load_settings
from stream_checks import online_differences, rows_as_of, stop_workers

pytestmark = pytest.mark.integration

CARD, MERCHANT = "card_txn_stats", "merchant_txn_stats"
N_EVENTS, N_CARDS, N_MERCHANTS = 400, 60, 15


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalRedisCluster(tmp_path_factory.mktemp("cluster")).start()
    yield c
    c.stop()


def _cluster_settings(services, cluster, tmp, uid: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
    return env, load_settings(env, kafka_bootstrap_servers=services.kafka, redis_url=cluster.url, redis_cluster="on",
                              data_dir=str(tmp / "data"), topic_deadletter=f"{uid}.deadletter", kafka_partitions=4)


def _events(uid: str) -> list[dict]:
    rnd, t0 = random.Random(16), time.time() - 90
    return [{"transaction_id": f"{uid}-tx{i}", "card_id": f"{uid}-c{rnd.randrange(N_CARDS)}",
             "merchant_id": f"{uid}-m{rnd.randrange(N_MERCHANTS)}", "amount": round(rnd.lognormvariate(3, 1), 2),
             "country": "DE", "channel": "web", "event_ts": t0 + i * 0.2} for i in range(N_EVENTS)]


def _wait(condition, timeout: float, worker, log):
    deadline = time.monotonic() + timeout
    while True:
        assert worker.poll() is None, log.read_text()[-3000:]
        got = condition()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.25)


def _converged(layout, client, registry, events) -> list:
    return (online_differences(layout, client, registry.views[CARD], events, "card_id")
            + online_differences(layout, client, registry.views[MERCHANT], events, "merchant_id"))


def _keys_per_node(cluster) -> list[list[bytes]]:
    return [redis.Redis.from_url(cluster.node_url(i)).keys("*") for i in range(len(cluster.ports))]


@pytest.fixture(scope="module")
def streamed(services, cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster-stream")
    uid = "rc" + os.urandom(4).hex()
    topic = f"{uid}.transactions"
    env, settings = _cluster_settings(services, cluster, tmp, uid)
    extra = {"FRESHET_TRANSACTIONS_TOPIC": topic}
    features.apply(settings, extra_env=extra)
    registry = features.load_registry(settings)
    kafka.ensure_topics(settings, [topic, settings.topic_deadletter])
    layout = OnlineLayout(registry.project, registry.views)
    client = redis_client(settings)
    events = _events(uid)
    log = tmp / "worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "freshet.cli", "stream", "--app-id", f"{uid}-stream"],
                              env={**env, **settings.to_env(), **extra}, stdout=open(log, "ab"),
                              stderr=subprocess.STDOUT)
    try:
        producer = kafka.producer(settings)
        for e in events:
            producer.produce(topic, key=e["card_id"].encode(), value=orjson.dumps(e))
        assert producer.flush(30) == 0
        del producer  # its threads end with it, not at the session's end with the broker gone
        assert _wait(lambda: not _converged(layout, client, registry, events), 120, worker, log), \
            _converged(layout, client, registry, events)
        before_flush = _keys_per_node(cluster)
        redis.Redis.from_url(cluster.node_url(1)).flushall()
        flushed_at = len(log.read_text())
        restored = _wait(lambda: not _converged(layout, client, registry, events)
                         and len(_keys_per_node(cluster)[1]) >= len(before_flush[1]), 60, worker, log)
        after_flush = _keys_per_node(cluster)
        alive = worker.poll() is None
    finally:
        stop_workers([worker])
    yield dict(uid=uid, settings=settings, registry=registry, layout=layout, client=client, events=events,
               before_flush=before_flush, after_flush=after_flush, restored=restored, alive=alive,
               log_after_flush=log.read_text()[flushed_at:])
    client.close()


def test_stream_rows_land_on_every_primary_each_with_its_own_row_marker(streamed):
    assert streamed["alive"]
    for keys in streamed["before_flush"]:
        markers = [k for k in keys if b":rows:" in k]
        assert len(keys) > len(markers) > 0  # entity rows, and a marker per written (view, partition)
        assert {k.decode().split(":rows:")[1] for k in markers} == \
            {m.decode().split(":rows:")[1] for m in streamed["before_flush"][0] if b":rows:" in m}


def test_a_flushed_primary_is_noticed_and_its_rows_written_back(streamed):
    assert streamed["restored"], streamed["log_after_flush"][-2000:]
    assert "holds no rows" in streamed["log_after_flush"]
    assert sorted(streamed["after_flush"][1]) == sorted(streamed["before_flush"][1])


def _entities(streamed):
    cards = sorted({e["card_id"] for e in streamed["events"]})
    merchants = sorted({e["merchant_id"] for e in streamed["events"]})
    return cards, merchants


def test_the_fast_reader_returns_what_the_cluster_holds_blocking_and_on_the_event_loop(streamed):
    from freshet.serving.online import OnlineFeatureReader

    settings, layout, client = streamed["settings"], streamed["layout"], streamed["client"]
    cards, merchants = _entities(streamed)
    stored = rows_as_of(layout, client, CARD, cards)
    assert not _converged(layout, client, streamed["registry"], streamed["events"])
    reader = OnlineFeatureReader(settings)
    try:
        refs = [f"{CARD}:{f}" for f in layout.views[CARD].features]
        plan = reader.plan(refs)
        blocking = reader.read(plan, {"card_id": cards})

        async def on_the_loop():
            await reader.aio.ping()  # /ready: every primary answers
            got = await reader.read_async(plan, {"card_id": cards})
            await reader.aio.close()
            return got

        looped = asyncio.run(on_the_loop())
    finally:
        reader.close()
    for result in (blocking, looped):
        for i, card in enumerate(cards):
            assert result.row(i) == stored[card][1], card
    assert len(reader.cluster.slots.primaries) == 3


def test_feast_reads_the_cluster_as_redis_type_redis_cluster(streamed):
    settings, layout, client = streamed["settings"], streamed["layout"], streamed["client"]
    assert features.repo_config(settings).online_store.redis_type == "redis_cluster"
    cards, merchants = _entities(streamed)
    store = features.feature_store(settings)
    names = list(layout.views[MERCHANT].features)
    got = store.get_online_features(features=[f"{MERCHANT}:{n}" for n in names],
                                    entity_rows=[{"merchant_id": m} for m in merchants]).to_dict()
    stored = rows_as_of(layout, client, MERCHANT, merchants)
    for i, m in enumerate(merchants):
        assert {n: got[n][i] for n in names} == stored[m][1], m


def _node_of_slot(cluster, slot: int) -> int:
    for i in range(len(cluster.ports)):
        for start, end, *_ in redis.Redis.from_url(cluster.node_url(i)).execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                node = _[0]
                return cluster.ports.index(int(node[1]))
    raise AssertionError(f"slot {slot} has no owner")


def _move_slot(cluster, slot: int, source: int, target: int, keys: list[bytes], finish: bool = True) -> None:
    """Migrate `slot` (and `keys` in it) from node `source` to node `target`; with `finish`
    False the slot stays mid-migration (source MIGRATING, target IMPORTING): ASK territory."""
    src, dst = (redis.Redis.from_url(cluster.node_url(i)) for i in (source, target))
    src_id, dst_id = src.execute_command("CLUSTER", "MYID"), dst.execute_command("CLUSTER", "MYID")
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
    src.execute_command("MIGRATE", "127.0.0.1", cluster.ports[target], "", 0, 5000, "KEYS", *keys)
    if finish:
        _assign(cluster, slot, target)


def _assign(cluster, slot: int, owner: int) -> None:
    owner_id = redis.Redis.from_url(cluster.node_url(owner)).execute_command("CLUSTER", "MYID")
    for i in [owner, *(i for i in range(len(cluster.ports)) if i != owner)]:
        redis.Redis.from_url(cluster.node_url(i)).execute_command("CLUSTER", "SETSLOT", slot, "NODE", owner_id)


def test_the_fast_reader_follows_moved_and_ask_after_slots_migrate(services, cluster, tmp_path, apply_feature_repo):
    from freshet.serving.online import OnlineFeatureReader

    _, settings = _cluster_settings(services, cluster, tmp_path, "mv")
    registry = apply_feature_repo(settings)
    layout = OnlineLayout(registry.project, registry.views)
    client = RedisCluster.from_url(cluster.url)
    cards = [f"mv{os.urandom(3).hex()}-{i}" for i in range(40)]
    values = {c: {"sum_amount_300s": float(i), "count_amount_300s": i} for i, c in enumerate(cards)}
    layout.write(client, CARD, [((c,), values[c], time.time()) for c in cards])
    reader = OnlineFeatureReader(settings)
    plan = reader.plan([f"{CARD}:sum_amount_300s", f"{CARD}:count_amount_300s"])
    half_done = []
    try:
        assert [reader.read(plan, {"card_id": cards}).row(i) for i in range(len(cards))] == [values[c] for c in cards]
        refreshes = reader.cluster.refreshes
        moved, asked = cards[0], cards[1]
        for card, finish in ((moved, True), (asked, False)):
            key = layout.entity_key(CARD, (card,))
            slot = key_slot(key)
            source = _node_of_slot(cluster, slot)
            _move_slot(cluster, slot, source, (source + 1) % 3, [key], finish=finish)
            if not finish:
                half_done.append((slot, (source + 1) % 3))
        got = reader.read(plan, {"card_id": cards})
        assert [got.row(i) for i in range(len(cards))] == [values[c] for c in cards]
        assert reader.cluster.refreshes == refreshes + 1  # after the MOVED; an ASK is not a new map
        assert reader.cluster.redirections == {"MOVED": 1, "ASK": 1}

        async def on_the_loop():
            try:
                return await reader.read_async(plan, {"card_id": cards})
            finally:
                await reader.aio.close()

        got = asyncio.run(on_the_loop())
        assert [got.row(i) for i in range(len(cards))] == [values[c] for c in cards]
        assert reader.cluster.redirections["ASK"] == 2  # the slot still migrates
    finally:
        reader.close()
        client.close()
        for slot, owner in half_done:  # the migration left half done: finished, for the tests after this
            _assign(cluster, slot, owner)


def test_a_redis_of_the_other_kind_is_refused_naming_the_setting(services, cluster, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
    on_a_single_redis = load_settings(env, redis_url=services.redis_url.rsplit("/", 1)[0] + "/0", redis_cluster="on",
                                      data_dir=str(tmp_path))
    with pytest.raises(CliError, match="FRESHET_REDIS_CLUSTER=on but Redis at .* is not a cluster node"):
        check_redis_mode(on_a_single_redis)
    off_on_a_cluster = load_settings(env, redis_url=cluster.url, data_dir=str(tmp_path))
    with pytest.raises(CliError, match="is a Redis Cluster node .* set FRESHET_REDIS_CLUSTER=on"):
        check_redis_mode(off_on_a_cluster)
    check_redis_mode(load_settings(env, redis_url=cluster.url, redis_cluster="on", data_dir=str(tmp_path)))


def test_the_stream_writer_rewrites_a_share_its_primary_redirects(services, cluster, tmp_path, apply_feature_repo):
    _, settings = _cluster_settings(services, cluster, tmp_path, "wr")
    registry = apply_feature_repo(settings)
    layout = OnlineLayout(registry.project, registry.views)
    reader = RedisCluster.from_url(cluster.url)
    cards = [f"wr{os.urandom(3).hex()}-{i}" for i in range(60)]
    half_done = []

    def rows(offset: float):
        return [((c,), {"sum_amount_300s": i + offset, "count_amount_300s": i}, time.time())
                for i, c in enumerate(cards)]

    redirected = []

    async def scenario():
        client = redis_client(settings, asyncio=True)
        pipeline = client.pipeline
        client.pipeline = lambda **kw: redirected.append(kw) or pipeline(**kw)  # only a redirected share uses one
        try:
            assert await layout.write_async(client, CARD, rows(0.0)) == len(cards)  # the slot map read
            for card, finish in ((cards[0], True), (cards[1], False)):  # MOVED, then ASK
                key = layout.entity_key(CARD, (card,))
                source = _node_of_slot(cluster, key_slot(key))
                _move_slot(cluster, key_slot(key), source, (source + 1) % 3, [key], finish=finish)
                if not finish:
                    half_done.append((key_slot(key), (source + 1) % 3))
            return await layout.write_async(client, CARD, rows(0.5))
        finally:
            await client.aclose()

    try:
        assert asyncio.run(scenario()) == len(cards)
        assert 1 <= len(redirected) <= 2  # the moved slot's share, the migrating one's (one primary may own both)
        got = layout.read_rows(reader, CARD, [(c,) for c in cards], ["sum_amount_300s"])
        assert [values["sum_amount_300s"] for _, values in got] == [i + 0.5 for i in range(len(cards))]
    finally:
        for slot, owner in half_done:
            _assign(cluster, slot, owner)
        reader.close()
