"""Feature versions end to end: add a window, change a window, revert; a real worker, broker,
Redis and Feast registry, the feature repo a copy the spec edits.

Each change is registered by `freshet apply` as a pending version while the old one keeps
serving; a restarted worker builds the new version from the raw log (events from before the
change included) and promotes it. Every built version must hold what the window rule gives over
all events, and stay right as events keep coming (none applied twice over the build's cut);
`view@vN:feature` reads a given version through freshet's reader and Feast's SDK alike.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import redis

from freshet import feature_versions, features, kafka
from freshet.cli import build_parser
from freshet.redis_layout import OnlineLayout
from freshet.serving.online import OnlineFeatureReader, UnknownFeature
from freshet.settings import load_settings
from stream_checks import online_differences, settled, stop_workers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CARD, MERCHANT = "card_txn_stats", "merchant_txn_stats"
REPO = Path(__file__).resolve().parents[2] / "feature_repo"
ADD_TEN_MINUTES = ("WINDOWS = (timedelta(minutes=5),", "WINDOWS = (timedelta(minutes=10), timedelta(minutes=5),")
TEN_MINUTE_SLIDE = ("SLIDES = {", "SLIDES = {timedelta(minutes=10): timedelta(minutes=1), ")
FIVE_TO_TWO = ("WINDOWS = (timedelta(minutes=10), timedelta(minutes=5),",
               "WINDOWS = (timedelta(minutes=10), timedelta(minutes=2),")
TWO_MINUTE_SLIDE = ("SLIDES = {", "SLIDES = {timedelta(minutes=2): timedelta(minutes=1), ")


def _events(uid: str, n: int, start: float, end: float, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    step = (end - start) / n
    return [{"transaction_id": f"{uid}-{seed}-{i}", "card_id": f"{uid}-c{rng.randrange(12)}",
             "merchant_id": f"{uid}-m{rng.randrange(5)}", "amount": round(rng.uniform(1, 200), 2),
             "country": "DE", "channel": "web", "event_ts": start + i * step} for i in range(n)]


class Deployment:
    """A private transactions topic, data dir and feature repo copy; a worker started and restarted."""

    def __init__(self, services, tmp: Path):
        self.uid = "fv" + os.urandom(4).hex()
        self.topic = f"{self.uid}.transactions"
        self.repo = tmp / "feature_repo"
        shutil.copytree(REPO, self.repo, ignore=shutil.ignore_patterns("__pycache__", "data"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
        self.settings = load_settings(env, kafka_bootstrap_servers=services.kafka, redis_url=services.redis_url,
                                      data_dir=str(tmp / "data"), topic_deadletter=f"{self.uid}.deadletter",
                                      kafka_partitions=4, feature_repo=str(self.repo))
        self.extra = {"FRESHET_TRANSACTIONS_TOPIC": self.topic}
        self.env = {**env, **self.settings.to_env(), **self.extra}
        self.app_id = f"{self.uid}-stream"
        self.log = tmp / "worker.log"
        self.worker: subprocess.Popen | None = None
        self.events: list[dict] = []
        self.client = redis.Redis.from_url(services.redis_url)
        self.apply()
        kafka.ensure_topics(self.settings, [self.topic, self.settings.topic_deadletter])

    def apply(self) -> None:
        features.apply(self.settings, extra_env=self.extra)

    def edit(self, *replacements: tuple[str, str]) -> None:
        path = self.repo / "definitions.py"
        text = path.read_text()
        for old, new in replacements:
            assert old in text, old
            text = text.replace(old, new, 1)
        path.write_text(text)

    def cli(self, capsys, *args: str) -> str:
        """A `freshet` command run in this process (the topic's env var set by the fixture); its output."""
        parser, handlers = build_parser()
        parsed = parser.parse_args(list(args))
        capsys.readouterr()
        assert handlers[parsed.command](parsed, self.settings) == 0
        return capsys.readouterr().out

    def start(self) -> None:
        if self.worker is not None:
            stop_workers([self.worker])
        with self.log.open("ab") as out:
            self.worker = subprocess.Popen([sys.executable, "-m", "freshet.cli", "stream", "--app-id", self.app_id],
                                           env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def publish(self, events: list[dict]) -> None:
        p = kafka.producer(self.settings)
        for e in events:
            p.produce(self.topic, key=e["card_id"].encode(), value=orjson.dumps(e))
        assert p.flush(30) == 0
        self.events += events

    def wait(self, condition, what: str, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while not (got := condition()):
            assert self.worker.poll() is None, self.log.read_text()[-4000:]
            assert time.monotonic() < deadline, f"{what} within {timeout}s\n" + self.log.read_text()[-4000:]
            time.sleep(0.3)
        return got

    def settle(self) -> None:
        self.wait(lambda: settled(self.settings, self.app_id, [self.topic]), "the group commits every event")

    def store(self):
        return features.feature_store(self.settings)

    def active(self, view: str) -> int:
        return next(v.number for v in feature_versions.history(self.store(), view) if v.state == "active")

    def wrong(self, view: str, version: int) -> list:
        """Where version `version` of `view` in Redis differs from the window rule over every event."""
        spec = next(v.spec for v in feature_versions.history(self.store(), view) if v.number == version)
        layout = OnlineLayout("freshet", {view: spec})
        key = "card_id" if view == CARD else "merchant_id"
        return online_differences(layout, self.client, spec, self.events, key)

    def switch(self, number: int) -> None:
        """Restart the worker and wait until it has built `number` of both views and made it active."""
        self.start()
        self.wait(lambda: self.active(CARD) == number and self.active(MERCHANT) == number,
                  f"v{number} active after the build")
        self.settle()


@pytest.fixture
def deployment(services, tmp_path, monkeypatch):
    d = Deployment(services, tmp_path)
    for name, value in d.extra.items():  # what feature_repo/definitions.py reads when `freshet apply` runs here
        monkeypatch.setenv(name, value)
    yield d
    if d.worker is not None:
        stop_workers([d.worker])


def test_add_a_window_change_a_window_revert(deployment, capsys):
    d = deployment
    now = time.time()
    d.start()
    d.publish(_events(d.uid, 300, now - 1500, now - 600, seed=1))
    d.settle()
    assert not d.wrong(CARD, 0) and not d.wrong(MERCHANT, 0)

    # add a 10-minute window: v1 registered, pending; the running worker and every read stay on v0
    d.edit(ADD_TEN_MINUTES, TEN_MINUTE_SLIDE)
    out = d.cli(capsys, "apply")
    assert "v1 pending: + count_amount_600s: count of amount over 600s, sliding by 60s" in out, out
    assert d.active(CARD) == 0 and d.active(MERCHANT) == 0
    store = d.store()
    card = f"{d.uid}-c1"
    with pytest.raises(Exception, match="count_amount_600s"):
        store.get_online_features(features=[f"{CARD}:count_amount_600s"], entity_rows=[{"card_id": card}])
    d.cli(capsys, "apply")  # the same change applied again is the same pending version, not another
    assert [v.number for v in feature_versions.history(d.store(), CARD)] == [0, 1]

    # a restarted worker builds v1 from the raw log (the events before the change included) and switches
    d.switch(1)
    assert not d.wrong(CARD, 1) and not d.wrong(MERCHANT, 1)
    # and keeps it right as events keep coming: none before the build's cut applied twice
    d.publish(_events(d.uid, 200, now - 600, now - 60, seed=2))
    d.settle()
    assert not d.wrong(CARD, 1) and not d.wrong(MERCHANT, 1)
    # Feast's SDK reads the active version and a pinned one from the rows freshet wrote
    store = d.store()
    got = store.get_online_features(features=[f"{CARD}:count_amount_600s", f"{CARD}@v0:count_amount_300s"],
                                    entity_rows=[{"card_id": card}], full_feature_names=True).to_dict()
    ours = OnlineLayout("freshet", {CARD: next(v.spec for v in feature_versions.history(store, CARD)
                                               if v.number == 1)}).read_rows(d.client, CARD, [(card,)])[0][1]
    assert got[f"{CARD}__count_amount_600s"] == [ours["count_amount_600s"]]
    assert got[f"{CARD}@v0__count_amount_300s"] == [ours["count_amount_300s"]]  # the same window in both
    # and so does freshet's reader (the one behind /get-online-features); a version never registered is unknown
    reader = OnlineFeatureReader(d.settings)
    try:
        served = reader.get_online_features([f"{CARD}:count_amount_600s", f"{CARD}@v0:count_amount_300s"],
                                            [{"card_id": card}], full_feature_names=True).row(0)
        assert served == {k: v[0] for k, v in got.items() if "__" in k}, (served, got)
        with pytest.raises(UnknownFeature, match="@v7"):
            reader.get_online_features([f"{CARD}@v7:count_amount_300s"], [{"card_id": card}])
    finally:
        reader.close()

    # change a window (5 minutes -> 2): v2
    d.edit(FIVE_TO_TWO, TWO_MINUTE_SLIDE)
    out = d.cli(capsys, "apply")
    assert "- count_amount_300s" in out and "+ count_amount_120s" in out, out
    d.switch(2)
    assert not d.wrong(CARD, 2) and not d.wrong(MERCHANT, 2)

    # revert the card view to v0: its definition again, as v3, built and switched to the same way
    out = d.cli(capsys, "features", "revert", CARD, "--to", "0")
    assert "v3 registered with the definition of v0" in out, out
    diff = d.cli(capsys, "features", "diff", CARD, "2", "3")
    assert "- count_amount_600s" in diff and "+ count_amount_300s" in diff, diff
    d.start()
    d.wait(lambda: d.active(CARD) == 3, "v3 active after the build")
    d.settle()
    assert not d.wrong(CARD, 3)
    history = d.cli(capsys, "features", "history", CARD, "--app-id", d.app_id)
    states = [line.split()[:2] for line in history.splitlines()[1:]]
    assert states == [["v0", "older"], ["v1", "older"], ["v2", "older"], ["v3", "active"]], history
    v0, v3 = (next(v for v in feature_versions.history(d.store(), CARD) if v.number == n) for n in (0, 3))
    assert v3.spec.fingerprint == v0.spec.fingerprint
