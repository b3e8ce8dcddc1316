"""Windows as of request time, end to end: a real worker, broker and Redis; read back through
Feast's SDK (get_online_features) and freshet's HTTP API.

History two hours in the past is replayed in three steps of stream time, around one
five-minute boundary B (B0 below is a multiple of 300 s):
1. events up to B0 + 205: idle-to-be card A (three events), card D exactly on a slide
   boundary (B0 + 120), card S exactly on the window start of step 2 (B0 + 180), card O
   with an event out of order within the 30 s lateness (B0 + 200, then B0 + 175);
2. one event at B0 + 440 on another card moves the stream's clock: the five-minute window
   now starts at B0 + 180, so A, D and O's older event have left it, though none of them
   had an event since: their rows must have been re-evaluated by the engine;
3. no more events: the clock keeps time with the wall clock, and at B0 + 480 S and O's
   last tile leave the window too.
Every read is also checked against the window rule recomputed from the events as of the
row's own timestamp (stream_checks.expected).
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time

import httpx
import orjson
import pytest

from freshet import features, kafka
from stream_checks import expected, isolated_stream, online_differences, rows_as_of

# the scenario waits ~40 s of wall clock on purpose (step 3); on a loaded machine its set-up is slow too
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

CARD, MERCHANT = "card_txn_stats", "merchant_txn_stats"
TOKEN = "windows-token"
FIVE_MINUTES = ["count_amount_300s", "sum_amount_300s", "mean_amount_300s", "min_amount_300s", "max_amount_300s",
                "last_amount_300s", "count_distinct_merchant_id_300s"]
EMPTY = {"count_amount_300s": 0, "sum_amount_300s": 0.0, "mean_amount_300s": None, "min_amount_300s": None,
         "max_amount_300s": None, "last_amount_300s": None, "count_distinct_merchant_id_300s": 0}


def _event(uid: str, card: str, merchant: str, ts: float, amount: float) -> dict:
    return {"transaction_id": f"{uid}-{card}-{ts}", "card_id": f"{uid}-{card}", "merchant_id": f"{uid}-{merchant}",
            "amount": amount, "country": "DE", "channel": "web", "event_ts": ts}


def _produce(settings, topic: str, events: list[dict]) -> None:
    p = kafka.producer(settings)
    for e in events:
        p.produce(topic, key=e["card_id"].encode(), value=orjson.dumps(e))
    assert p.flush(30) == 0


def _wait(condition, timeout: float, worker, log):
    deadline = time.monotonic() + timeout
    while True:
        assert worker.poll() is None, log.read_text()[-3000:]
        got = condition()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


class Readers:
    """The two readers under test, on the same Redis: Feast's SDK and freshet's HTTP API."""

    def __init__(self, settings, url: str):
        self.store = features.feature_store(settings)
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)

    def feast(self, cards: list[str], names: list[str]) -> dict[str, dict]:
        resp = self.store.get_online_features(features=[f"{CARD}:{n}" for n in names],
                                              entity_rows=[{"card_id": c} for c in cards]).to_dict()
        return {c: {n: resp[n][i] for n in names} for i, c in enumerate(cards)}

    def freshet(self, cards: list[str], names: list[str]) -> dict[str, dict]:
        resp = self.http.post("/get-online-features", json={"features": [f"{CARD}:{n}" for n in names],
                                                            "entities": {"card_id": cards}})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        out = {c: {} for c in cards}
        for name, result in zip(body["metadata"]["feature_names"][1:], body["results"][1:]):
            for c, value, status in zip(cards, result["values"], result["statuses"]):
                # a null is JSON null with status NULL_VALUE, every other value PRESENT
                assert status == ("NULL_VALUE" if value is None else "PRESENT"), (c, name, value, status)
                out[c][name] = value
        return out


@pytest.fixture(scope="module")
def windows(services, tmp_path_factory):
    from freshet.serving.app import create_app
    from freshet.serving.online import OnlineFeatureReader
    from test_serving_support import serve

    tmp = tmp_path_factory.mktemp("windows")
    uid, topic, settings, worker_env, registry, layout, client = isolated_stream(services, tmp, "w")
    b0 = math.floor((time.time() - 2 * 3600) / 300) * 300
    e = lambda card, merchant, dt, amount: _event(uid, card, merchant, b0 + dt, amount)  # noqa: E731
    step1 = [e("A", "m1", 10, 1.0), e("A", "m1", 20, 2.0), e("A", "m2", 70, 4.0),
             e("D", "m3", 120, 8.0), e("S", "m3", 180, 16.0),
             e("O", "m3", 200, 32.0), e("O", "m3", 175, 64.0),  # 25 s out of order: within the lateness
             e("X", "m4", 205, 1.0)]
    step2 = [e("Y", "m4", 440, 1.0)]
    log = tmp / "worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "freshet.cli", "stream", "--app-id", f"{uid}-stream"],
                              env=worker_env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    reader = OnlineFeatureReader(settings)
    app = create_app(settings, reader=reader, follow_models=False, log_predictions=False,
                     tokens={"admin": TOKEN, "predict": TOKEN + "-predict", "features": TOKEN + "-features"})
    card_view = registry.views[CARD]
    cards = [f"{uid}-{c}" for c in "ADSO"]
    reads = {}
    try:
        with serve(app) as url:
            readers = Readers(settings, url)
            _produce(settings, topic, step1)
            assert _wait(lambda: not online_differences(layout, client, card_view, step1, "card_id"), 120,
                         worker, log), online_differences(layout, client, card_view, step1, "card_id")
            reads["step1"] = (rows_as_of(layout, client, CARD, cards), readers.feast(cards, FIVE_MINUTES))
            _produce(settings, topic, step2)
            # A and D have no event after step 1: only the engine's re-evaluation changes their rows
            # (S's row, as of step 1, is still true: its event leaves the window at B0 + 480)
            moved = [f"{uid}-{c}" for c in "ADO"]
            assert _wait(lambda: all((rows_as_of(layout, client, CARD, [c])[c][0] or 0) >= b0 + 440
                                     for c in moved), 60, worker, log), rows_as_of(layout, client, CARD, cards)
            reads["step2"] = (rows_as_of(layout, client, CARD, cards), readers.feast(cards, FIVE_MINUTES),
                              readers.freshet(cards, FIVE_MINUTES))
            # no more events: the wall clock takes the stream past B0 + 480
            assert _wait(lambda: all((rows_as_of(layout, client, CARD, [c])[c][0] or 0) >= b0 + 480
                                     for c in (f"{uid}-S", f"{uid}-O")), 120, worker, log), \
                rows_as_of(layout, client, CARD, cards)
            reads["step3"] = (rows_as_of(layout, client, CARD, cards), readers.feast(cards, FIVE_MINUTES),
                              readers.freshet(cards, FIVE_MINUTES),
                              readers.store.get_online_features(
                                  features=[f"{MERCHANT}:count_amount_300s", f"{MERCHANT}:mean_amount_300s",
                                            f"{MERCHANT}:count_amount_3600s"],
                                  entity_rows=[{"merchant_id": f"{uid}-m1"}]).to_dict())
        alive = worker.poll() is None
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
    yield dict(uid=uid, b0=b0, reads=reads, events=step1 + step2, view=card_view, alive=alive,
               log=log.read_text())


def _card(run, name: str) -> str:
    return f"{run['uid']}-{name}"


def test_before_the_boundary_every_card_counts_its_events(windows):
    rows, feast = windows["reads"]["step1"]
    a, o = _card(windows, "A"), _card(windows, "O")
    assert feast[a]["count_amount_300s"] == 3 and feast[a]["mean_amount_300s"] == pytest.approx(7 / 3)
    assert feast[o]["count_amount_300s"] == 2 and feast[o]["last_amount_300s"] == 32.0  # latest by event time
    assert all(ts < windows["b0"] + 300 for ts, _ in rows.values()), rows


def test_idle_cards_read_zero_and_null_through_feast_after_their_events_leave_the_window(windows):
    rows, feast, _ = windows["reads"]["step2"]
    b0 = windows["b0"]
    assert all(b0 + 440 <= rows[_card(windows, c)][0] < b0 + 480 for c in "ADO"), rows
    assert rows[_card(windows, "S")][0] < b0 + 300  # still true: not written again
    for name in ("A", "D"):
        assert feast[_card(windows, name)] == EMPTY, name
    # the longer windows still hold them
    assert rows[_card(windows, "A")][1]["count_amount_3600s"] == 3
    assert rows[_card(windows, "A")][1]["mean_amount_86400s"] == pytest.approx(7 / 3)


def test_idle_cards_read_zero_and_null_through_freshets_http_api(windows):
    _, feast, http = windows["reads"]["step2"]
    assert http == feast
    assert http[_card(windows, "A")] == EMPTY


def test_an_event_exactly_on_a_slide_boundary_stays_exactly_one_window_length(windows):
    # D at B0 + 120 is out as of B0 + 440 (the window starts at B0 + 180 from B0 + 420 on);
    # S at B0 + 180, the window's start, is in: the start is inclusive
    _, feast, _ = windows["reads"]["step2"]
    assert feast[_card(windows, "D")]["count_amount_300s"] == 0
    assert feast[_card(windows, "S")]["count_amount_300s"] == 1 and feast[_card(windows, "S")]["last_amount_300s"] == 16.0


def test_an_out_of_order_event_within_lateness_leaves_the_window_with_its_own_tile(windows):
    # O's events: 32.0 at B0 + 200 (first), 64.0 at B0 + 175 (25 s late, an older tile)
    _, feast, http = windows["reads"]["step2"]
    o = _card(windows, "O")
    assert feast[o]["count_amount_300s"] == 1 and feast[o]["sum_amount_300s"] == 32.0
    assert http[o]["min_amount_300s"] == 32.0 and http[o]["last_amount_300s"] == 32.0


def test_with_no_events_the_wall_clock_moves_the_stream_and_the_last_tiles_leave(windows):
    rows, feast, http, merchant = windows["reads"]["step3"]
    for name in ("S", "O", "A", "D"):
        assert feast[_card(windows, name)] == EMPTY == http[_card(windows, name)], name
    assert rows[_card(windows, "O")][1]["count_amount_3600s"] == 2
    # the merchant view (through the repartition topic) decays as well
    assert merchant["count_amount_300s"] == [0] and merchant["mean_amount_300s"] == [None]
    assert merchant["count_amount_3600s"] == [2]


def test_every_row_read_is_the_window_rule_as_of_its_own_timestamp(windows):
    events = windows["events"]
    for step, (rows, *_) in windows["reads"].items():
        as_of = {card: ts for card, (ts, _) in rows.items()}
        want = expected([e for e in events if e["card_id"] in as_of and e["event_ts"] <= as_of[e["card_id"]]],
                        windows["view"], "card_id", as_of)
        for card, (_, values) in rows.items():
            for name, w in want[card].items():
                assert values[name] == pytest.approx(w) if w is not None else values[name] is None, \
                    (step, card, name, values[name], w)


def test_the_worker_stayed_up_and_counted_its_re_evaluations(windows):
    assert windows["alive"]
    assert "Traceback" not in windows["log"]
