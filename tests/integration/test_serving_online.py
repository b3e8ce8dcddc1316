"""OnlineFeatureReader returns what Feast's get_online_features returns, says what is missing or stale."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import time
from datetime import timedelta

import hiredis
import pytest
import redis

from freshet.redis_layout import OnlineLayout
from freshet.app.stack import free_port, redis_binary, wait_for_redis
from freshet.serving.online import (
    NOT_FOUND, NULL_VALUE, OUTSIDE_MAX_AGE, PRESENT, OnlineFeatureReader, RedisEndpoint, RedisUnavailable,
    RequestError, RespConnection, UnknownFeature,
)
from test_serving_support import applied_settings, feast_store  # noqa: F401 - fixtures

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def reader(applied_settings, feast_store):  # noqa: F811
    r = OnlineFeatureReader(applied_settings, store=feast_store)
    yield r
    r.close()


@pytest.fixture(scope="module")
def client(applied_settings):  # noqa: F811
    return redis.Redis.from_url(applied_settings.redis_url)


def _write(reader, client, view: str, key: str, seed: float, ts: float | None = None, **override):
    layout: OnlineLayout = reader.layout
    values = {f: (int(seed) + i if t == "INT64" else seed * (i + 1) + 0.125)
              for i, (f, t) in enumerate(layout.views[view].features.items())}
    values.update(override)
    layout.write(client, view, [((key,), values, ts or time.time())])
    return values


def _all_refs(reader):
    return [f"{v}:{f}" for v in ("card_txn_stats", "merchant_txn_stats") for f in reader.layout.views[v].features]


def test_values_equal_feast_get_online_features_for_the_same_request(reader, client, feast_store, unique):  # noqa: F811
    cards = [f"{unique}-c{i}" for i in range(3)]
    for i, c in enumerate(cards):
        _write(reader, client, "card_txn_stats", c, i + 1.5, min_amount_300s=None if i == 1 else 0.5)
    _write(reader, client, "merchant_txn_stats", f"{unique}-m", 9.25)
    refs = _all_refs(reader)
    rows = [{"card_id": c, "merchant_id": f"{unique}-m"} for c in cards]

    ours = reader.get_online_features(refs, rows, full_feature_names=True)
    theirs = feast_store.get_online_features(features=refs, entity_rows=rows, full_feature_names=True).to_dict()
    for name, column in zip(ours.feature_names, ours.values):
        assert column == theirs[name], name
    assert ours.statuses[ours.feature_names.index("card_txn_stats__min_amount_300s")][1] == NULL_VALUE


def test_feature_service_request_equals_feast(reader, client, feast_store, unique):  # noqa: F811
    _write(reader, client, "card_txn_stats", f"{unique}-c", 2.0)
    _write(reader, client, "merchant_txn_stats", f"{unique}-m", 3.0)
    rows = [{"card_id": f"{unique}-c", "merchant_id": f"{unique}-m"}]
    ours = reader.get_online_features(entity_rows=rows, feature_service="fraud_model_v1", full_feature_names=True)
    svc = feast_store.get_feature_service("fraud_model_v1")
    theirs = feast_store.get_online_features(features=svc, entity_rows=rows, full_feature_names=True).to_dict()
    assert len(ours.feature_names) == 36
    assert {n: v for n, v in zip(ours.feature_names, ours.values)} == \
        {n: v for n, v in theirs.items() if n not in ("card_id", "merchant_id")}


def test_unknown_entity_is_reported_missing_where_feast_says_present_with_nulls(reader, feast_store, unique):  # noqa: F811
    ref = "card_txn_stats:sum_amount_300s"
    ours = reader.get_online_features([ref], [{"card_id": f"{unique}-never"}])
    assert ours.values == [[None]] and ours.statuses == [[NOT_FOUND]]
    theirs = feast_store.get_online_features(features=[ref], entity_rows=[{"card_id": f"{unique}-never"}])
    assert list(theirs.proto.results[1].statuses) == [1]  # FieldStatus.PRESENT, value null


def test_values_older_than_the_view_ttl_are_flagged(reader, client, unique):
    ttl = reader.layout.views["card_txn_stats"].ttl_s
    _write(reader, client, "card_txn_stats", f"{unique}-old", 1.0, ts=time.time() - ttl - 60, count_amount_300s=1)
    _write(reader, client, "card_txn_stats", f"{unique}-new", 1.0, ts=time.time() - ttl + 60, count_amount_300s=1)
    got = reader.get_online_features(["card_txn_stats:count_amount_300s"],
                                     [{"card_id": f"{unique}-old"}, {"card_id": f"{unique}-new"}])
    assert got.statuses == [[OUTSIDE_MAX_AGE, PRESENT]]
    assert got.values == [[1, 1]]  # the stale value is still shown, flagged


def test_duplicate_entities_are_read_once_and_answered_for_each_row(reader, client, unique):
    _write(reader, client, "card_txn_stats", f"{unique}-d", 5.0, count_amount_300s=5)
    plan = reader.plan(["card_txn_stats:count_amount_300s"])
    blob, count, slots = reader._pack(plan, {"card_id": [f"{unique}-d"] * 3}, 3)
    assert count == 1 and slots == [[0, 0, 0]]
    assert reader.read(plan, {"card_id": [f"{unique}-d"] * 3}).values == [[5, 5, 5]]


def test_unknown_view_feature_or_service_names_it(reader):
    with pytest.raises(UnknownFeature, match="'nope_view'"):
        reader.plan(["nope_view:x"])
    with pytest.raises(UnknownFeature, match="'card_txn_stats:nope'"):
        reader.plan(["card_txn_stats:nope"])
    with pytest.raises(UnknownFeature, match="'no_service'"):
        reader.plan(feature_service="no_service")


@pytest.mark.parametrize("features,entities,field", [
    (["card_txn_stats"], {"card_id": ["a"]}, "features[0]"),
    (["card_txn_stats:sum_amount_300s"], {"merchant_id": ["a"]}, "entities.card_id"),
    (["card_txn_stats:sum_amount_300s"], {"card_id": [1]}, "entities.card_id[0]"),
    (["card_txn_stats:sum_amount_300s"], {"card_id": "a"}, "entities.card_id"),
    (["card_txn_stats:sum_amount_300s"], {"card_id": ["a"], "merchant_id": ["b", "c"]}, "entities.merchant_id"),
    (["card_txn_stats:count_amount_300s", "merchant_txn_stats:count_amount_300s"],
     {"card_id": ["a"], "merchant_id": ["b"]}, "features"),
])
def test_malformed_requests_name_the_field(reader, features, entities, field):
    with pytest.raises(RequestError) as err:
        reader.read(reader.plan(features), entities)
    assert err.value.field == field


def _until_a_write_gets_a_later_mtime(path) -> None:
    """Until a file written now gets a later modification time than `path` (the file system's
    clock is coarser than a test step)."""
    probe = path.with_name(f".{path.name}.mtime-probe")
    deadline = time.monotonic() + 5
    try:
        while True:
            probe.touch()
            if probe.stat().st_mtime_ns > path.stat().st_mtime_ns:
                return
            assert time.monotonic() < deadline, "the file system's clock does not move"
            time.sleep(0.001)
    finally:
        probe.unlink(missing_ok=True)


def test_a_new_view_is_served_after_the_registry_file_changes(applied_settings, tmp_path, unique):  # noqa: F811
    from feast import FeatureView, Field, FileSource
    from feast.types import Float64

    from freshet.features import feature_store

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(applied_settings.data_path / "registry.db", data / "registry.db")
    settings = dataclasses.replace(applied_settings, data_dir=str(data))
    store = feature_store(settings)
    reader = OnlineFeatureReader(settings, store=store, refresh_s=0)
    with pytest.raises(UnknownFeature):
        reader.plan(["card_risk:score"])

    writer_store = feature_store(settings)
    card = writer_store.get_entity("card")
    view = FeatureView(name="card_risk", entities=[card], ttl=timedelta(days=1),
                       schema=[Field(name="score", dtype=Float64)],
                       source=FileSource(path=str(tmp_path / "x.parquet"), timestamp_field="event_ts"))
    _until_a_write_gets_a_later_mtime(data / "registry.db")  # the reader notices changes by mtime
    writer_store.apply([card, view])
    assert reader.refresh_if_changed()
    client = redis.Redis.from_url(settings.redis_url)
    reader.layout.write(client, "card_risk", [((f"{unique}-r",), {"score": 0.75}, time.time())])
    got = reader.get_online_features(["card_risk:score"], [{"card_id": f"{unique}-r"}])
    assert got.values == [[0.75]]


def test_redis_down_raises_unavailable_and_reads_recover_when_it_returns(applied_settings, feast_store, tmp_path):  # noqa: F811
    port = free_port()
    settings = dataclasses.replace(applied_settings, redis_url=f"redis://127.0.0.1:{port}/0")
    reader = OnlineFeatureReader(settings, store=feast_store)
    plan = reader.plan(["card_txn_stats:sum_amount_300s"])
    with pytest.raises(RedisUnavailable, match=f"127.0.0.1:{port}"):
        reader.read(plan, {"card_id": ["x"]})
    proc = subprocess.Popen([redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_redis(settings.redis_url)
        assert reader.read(plan, {"card_id": ["x"]}).statuses == [[NOT_FOUND]]
    finally:
        proc.terminate()
        proc.wait(5)
    with pytest.raises(RedisUnavailable):
        reader.read(plan, {"card_id": ["x"]})


@pytest.mark.parametrize("poll_us", [0, 100])
def test_replies_slower_than_the_poll_window_are_waited_for_and_timeouts_still_apply(applied_settings, poll_us):  # noqa: F811
    conn = RespConnection(RedisEndpoint.from_url(applied_settings.redis_url), timeout=0.2, poll_s=poll_us / 1e6)
    # WAIT for a replica this Redis does not have answers 0 once its timeout (ms) is up
    t0 = time.perf_counter()
    # two pipelined replies, the second 30 ms after the first
    assert conn.execute(hiredis.pack_command(("PING",)) + hiredis.pack_command(("WAIT", "1", "30")), 2) == [b"PONG", 0]
    assert time.perf_counter() - t0 >= 0.03
    assert conn.execute(hiredis.pack_command(("ECHO", "next")), 1) == [b"next"]
    t0 = time.perf_counter()
    with pytest.raises(RedisUnavailable, match="timed out"):
        conn.execute(hiredis.pack_command(("WAIT", "1", "300")), 1)
    assert time.perf_counter() - t0 >= 0.2  # polling did not cut the wait short
    # the timed-out connection is dropped, so its late reply cannot answer the next command
    assert conn.execute(hiredis.pack_command(("ECHO", "fresh")), 1) == [b"fresh"]
    conn.close()


def test_nan_and_infinity_are_served_as_protobuf_json_strings_like_feast(reader, client, unique):
    import math

    _write(reader, client, "card_txn_stats", f"{unique}-nan", 1.0, mean_amount_300s=math.nan,
           max_amount_300s=math.inf, min_amount_300s=-math.inf)
    got = reader.get_online_features(
        ["card_txn_stats:mean_amount_300s", "card_txn_stats:max_amount_300s", "card_txn_stats:min_amount_300s",
         "card_txn_stats:count_amount_300s"], [{"card_id": f"{unique}-nan"}])
    assert math.isnan(got.values[0][0]) and got.values[1:3] == [[math.inf], [-math.inf]]
    body = got.to_feast_dict()
    assert [r["values"] for r in body["results"][1:4]] == [["NaN"], ["Infinity"], ["-Infinity"]]
