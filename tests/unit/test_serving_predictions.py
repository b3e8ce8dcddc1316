"""Prediction log messages follow the freshet.predictions/1 contract; losses are counted, never raised."""

from __future__ import annotations

import asyncio
import time

from freshet.contracts import Prediction
from freshet.settings import load_settings
from freshet.serving.predictions import PredictionLog, encode_prediction


def test_message_is_a_valid_prediction_contract():
    raw = encode_prediction("r1", "fraud", "3", {"card_id": "c1"}, {"card_txn_stats:sum_amount_300s": 1.5,
                                                                     "amount": None},
                            {"score": 0.25, "label": 0}, ts=1700000000.0)
    p = Prediction.decode(raw)
    assert (p.request_id, p.model, p.model_version, p.score, p.ts) == ("r1", "fraud", "3", 0.25, 1700000000.0)
    assert p.features == {"card_txn_stats:sum_amount_300s": 1.5, "amount": None}
    assert p.key() == b"r1"


def test_without_kafka_predictions_are_counted_as_not_logged():
    plog = PredictionLog(load_settings({}, kafka_bootstrap_servers=""))
    assert plog.publish("r", "m", "1", {}, {}, {"score": 0.5, "label": 1}) is False
    assert plog.dropped["disabled"] == 1 and plog.published == 0


def test_a_full_buffer_drops_and_counts_without_blocking():
    plog = PredictionLog(load_settings({}, kafka_bootstrap_servers="127.0.0.1:1"), max_pending=10,
                         delivery_timeout_s=1)
    started = time.monotonic()
    results = [plog.publish(f"r{i}", "m", "1", {}, {"x": 1.0}, {"score": 0.5, "label": 1}) for i in range(100)]
    assert time.monotonic() - started < 0.5
    assert results.count(True) == 10 and plog.dropped["buffer_full"] == 90
    plog.close(timeout=3)
    assert plog.dropped["undelivered"] == 10  # the broker never answered: counted once delivery timed out


def test_on_an_event_loop_predictions_are_handed_over_together_and_counted_then():
    plog = PredictionLog(load_settings({}, kafka_bootstrap_servers="127.0.0.1:1"), max_pending=10,
                         delivery_timeout_s=1)

    async def burst() -> tuple[list[bool], int]:
        results = [plog.publish(f"r{i}", "m", "1", {}, {"x": 1.0}, {"score": 0.5, "label": 1}) for i in range(30)]
        waiting = plog.published  # nothing is handed over on the request path
        deadline = time.monotonic() + 5
        while plog.published == 0 and time.monotonic() < deadline:  # until the hand-over timer ran
            await asyncio.sleep(plog.handover_s)
        return results, waiting

    results, waiting = asyncio.run(burst())
    assert all(results) and waiting == 0
    assert plog.published == 10 and plog.dropped["buffer_full"] == 20
    plog.close(timeout=3)
