"""A spec's own embedded stack with a stream worker on it, for faults that must not touch the
session's shared broker and Redis (restarting or stopping the broker)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from freshet import kafka
from freshet.app.stack import EmbeddedStack
from freshet.redis_layout import OnlineLayout
from freshet.settings import load_settings

from stream_checks import online_differences, settled

CARD, MERCHANT = "card_txn_stats", "merchant_txn_stats"
TOPIC = "transactions"  # feature_repo's default source topic: the data dir is the spec's own


class OwnStack:
    """One life of the embedded stack on a data dir, and a stream worker on it (`start_worker`)."""

    def __init__(self, data: Path, log: Path, app_id: str):
        self.stack = EmbeddedStack(data)
        self.endpoints = self.stack.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
        self.settings = load_settings(env, kafka_bootstrap_servers=self.endpoints.kafka,
                                      redis_url=self.endpoints.redis_url, data_dir=str(data), kafka_partitions=4)
        kafka.ensure_topics(self.settings, [TOPIC, self.settings.topic_labels, self.settings.topic_deadletter])
        self.redis = redis.Redis.from_url(self.endpoints.redis_url)
        self.log, self.app_id = log, app_id
        self.env = {**env, **self.settings.to_env()}
        self.worker: subprocess.Popen | None = None

    def start_worker(self) -> None:
        self.worker = subprocess.Popen([sys.executable, "-m", "freshet.cli", "stream", "--app-id", self.app_id],
                                       env=self.env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)

    def wait_applied(self, registry, events: list[dict], timeout: float = 300) -> None:
        """Until Redis holds every feature recomputed from `events` and the worker committed them."""
        # each row against the window rule as of its own timestamp: rows move with time
        layout = OnlineLayout(registry.project, registry.views)
        keys = {CARD: "card_id", MERCHANT: "merchant_id"}
        internal = [f"{self.app_id}-{view}-repartition" for view in keys]
        deadline = time.monotonic() + timeout
        while True:
            assert self.worker.poll() is None, self.log.read_text()[-3000:]
            wrong = [d for view, key in keys.items()
                     for d in online_differences(layout, self.redis, registry.views[view], events, key)]
            if not wrong and settled(self.settings, self.app_id, [TOPIC, *internal]):
                return
            assert time.monotonic() < deadline, wrong[:5]
            time.sleep(0.5)

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.send_signal(signal.SIGTERM)
            try:
                self.worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.worker.kill()
        self.stack.stop()
