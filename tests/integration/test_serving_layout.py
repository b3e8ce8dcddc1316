"""Rows freshet writes are rows Feast reads, and the other way round, on a real Redis."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
import redis

from freshet.features import load_registry
from freshet.redis_layout import OnlineLayout
from test_serving_support import applied_settings, feast_store  # noqa: F401 - fixtures

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def registry(applied_settings, feast_store):  # noqa: F811
    return load_registry(applied_settings, feast_store)


@pytest.fixture(scope="module")
def layout(registry):
    return OnlineLayout.from_registry(registry)


@pytest.fixture
def client(applied_settings):  # noqa: F811
    return redis.Redis.from_url(applied_settings.redis_url)


def _card_values(registry, seed: float) -> dict:
    view = registry.views["card_txn_stats"]
    return {a.name: (int(seed) + i if a.dtype == "INT64" else seed * (i + 1) + 0.25)
            for i, a in enumerate(view.aggregations)}


def test_rows_written_by_freshet_are_returned_by_feast_get_online_features(
        registry, layout, client, feast_store, unique):  # noqa: F811
    now = datetime.now(timezone.utc).replace(microsecond=123456)
    cards = {f"{unique}-c{i}": _card_values(registry, i + 0.5) for i in range(3)}
    cards[f"{unique}-c1"]["mean_amount_300s"] = None  # a null aggregate
    merchant = {a.name: (7 if a.dtype == "INT64" else 2.5) for a in registry.views["merchant_txn_stats"].aggregations}
    pipe = client.pipeline(transaction=False)
    layout.write_rows(pipe, "card_txn_stats", [((card,), vals, now.timestamp()) for card, vals in cards.items()])
    layout.write_rows(pipe, "merchant_txn_stats", [((f"{unique}-m",), merchant, now)])
    pipe.execute()

    refs = [f"card_txn_stats:{f}" for f in registry.views["card_txn_stats"].feature_names] + \
           [f"merchant_txn_stats:{f}" for f in registry.views["merchant_txn_stats"].feature_names]
    got = feast_store.get_online_features(
        features=refs, entity_rows=[{"card_id": c, "merchant_id": f"{unique}-m"} for c in cards],
        full_feature_names=True,
    ).to_dict()
    for i, (card, vals) in enumerate(cards.items()):
        for name, value in vals.items():
            assert got[f"card_txn_stats__{name}"][i] == value, (card, name)
        for name, value in merchant.items():
            assert got[f"merchant_txn_stats__{name}"][i] == value


def test_rows_written_by_feast_are_decoded_equally_by_freshet(registry, layout, client, feast_store, unique):  # noqa: F811
    when = pd.Timestamp("2024-05-01T10:00:00.654321Z")
    view = registry.views["card_txn_stats"]
    rows = []
    for i in range(3):
        row = {"card_id": f"{unique}-f{i}", "event_ts": when + pd.Timedelta(seconds=i)}
        row.update(_card_values(registry, i * 3.5))
        rows.append(row)
    rows[2]["max_amount_300s"] = None
    df = pd.DataFrame(rows)
    df["max_amount_300s"] = df["max_amount_300s"].astype(object)
    feast_store.write_to_online_store("card_txn_stats", df)

    read = layout.read_rows(client, "card_txn_stats", [(r["card_id"],) for r in rows] + [(f"{unique}-none",)])
    feast = feast_store.get_online_features(
        features=[f"card_txn_stats:{f}" for f in view.feature_names],
        entity_rows=[{"card_id": r["card_id"]} for r in rows]).to_dict()
    for i, row in enumerate(rows):
        ts, values = read[i]
        assert ts == pytest.approx(row["event_ts"].timestamp(), abs=1e-6)
        for name in view.feature_names:
            expected = feast[name][i]
            if isinstance(expected, float) and math.isnan(expected):
                assert math.isnan(values[name])
            else:
                assert values[name] == expected, name
    assert read[2][1]["max_amount_300s"] is None
    assert read[3] == (None, {}), "an entity that was never written is missing, not present-with-nulls"


def test_only_newer_write_skips_rows_older_than_the_stored_one(registry, layout, client, unique):
    card = (f"{unique}-late",)
    t0 = datetime(2024, 1, 1, 12, tzinfo=timezone.utc)
    for ts, amount in ((t0, 10.0), (t0 - timedelta(seconds=5), 99.0), (t0 + timedelta(microseconds=1), 11.0),
                       (t0, 98.0)):
        pipe = client.pipeline(transaction=False)
        layout.write_rows(pipe, "card_txn_stats", [(card, {"last_amount_300s": amount}, ts)], only_newer=True)
        pipe.execute()
    [(ts, values)] = layout.read_rows(client, "card_txn_stats", [card], ["last_amount_300s"])
    assert values == {"last_amount_300s": 11.0}
    assert ts == pytest.approx((t0 + timedelta(microseconds=1)).timestamp(), abs=1e-7)


def test_a_large_batch_written_in_chunks_reads_back_row_for_row(registry, layout, client, unique):
    # what the stream engine's sink sends: thousands of rows per write, each one round trip.
    # How fast is a figure of bench/aggregations.py (redis_write_rows_per_s), not a spec.
    view = registry.views["card_txn_stats"]
    rows = [((f"{unique}-w{i}",), _card_values(registry, i + 0.5), 1.7e9 + i) for i in range(20_000)]
    for chunk in range(0, len(rows), 2000):
        assert layout.write(client, "card_txn_stats", rows[chunk:chunk + 2000]) == 2000
    read = layout.read_rows(client, "card_txn_stats", [key for key, _, _ in rows], view.feature_names)
    assert [r for r, (key, vals, ts) in zip(read, rows) if r != (ts, vals)] == []


def test_direct_write_equals_pipelined_write_and_keeps_order_rules(registry, layout, client, unique):
    vals = _card_values(registry, 4.5)
    vals["min_amount_300s"] = None
    t = 1.7e9 + 0.5
    pipe = client.pipeline(transaction=False)
    layout.write_rows(pipe, "card_txn_stats", [((f"{unique}-p",), vals, t)])
    pipe.execute()
    assert layout.write(client, "card_txn_stats", [((f"{unique}-d",), vals, t)]) == 1
    assert client.hgetall(layout.entity_key("card_txn_stats", (f"{unique}-p",))) == \
        client.hgetall(layout.entity_key("card_txn_stats", (f"{unique}-d",)))

    client.script_flush()  # the first only_newer write after a flush must load the script itself
    card = (f"{unique}-d",)
    layout.write(client, "card_txn_stats", [(card, {"last_amount_300s": 1.0}, t - 10)], only_newer=True)
    layout.write(client, "card_txn_stats", [(card, {"last_amount_300s": 2.0}, t + 10)], only_newer=True)
    [(ts, values)] = layout.read_rows(client, "card_txn_stats", [card], ["last_amount_300s", "sum_amount_300s"])
    assert ts == t + 10
    assert values == {"last_amount_300s": 2.0, "sum_amount_300s": vals["sum_amount_300s"]}


def test_asyncio_writes_equal_sync_writes_including_only_newer(registry, layout, client, applied_settings, unique):  # noqa: F811
    import asyncio

    import redis.asyncio as aioredis

    vals = _card_values(registry, 6.5)

    async def scenario():
        aclient = aioredis.Redis.from_url(applied_settings.redis_url)
        try:
            await layout.write_async(aclient, "card_txn_stats", [((f"{unique}-a",), vals, 1.7e9)])
            pipe = aclient.pipeline(transaction=False)
            layout.write_rows(pipe, "card_txn_stats", [((f"{unique}-a",), {"last_amount_300s": 1.0}, 1.7e9 - 1),
                                                        ((f"{unique}-b",), vals, 1.7e9)], only_newer=True)
            await pipe.execute()
            await layout.write_async(aclient, "card_txn_stats", [((f"{unique}-b",), {"last_amount_300s": 2.0},
                                                                  1.7e9 + 1)], only_newer=True)
        finally:
            await aclient.aclose()

    asyncio.run(scenario())
    a, b = layout.read_rows(client, "card_txn_stats", [(f"{unique}-a",), (f"{unique}-b",)])
    assert a == (1.7e9, vals)  # the older only_newer row was skipped
    assert b == (1.7e9 + 1, {**vals, "last_amount_300s": 2.0})
