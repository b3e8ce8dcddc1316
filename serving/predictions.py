"""The prediction log: every prediction served, published to freshet.predictions for the monitor.

Publishing never blocks or fails a request: messages go into librdkafka's bounded
in-memory queue and are sent by its own threads. When the queue is full (Kafka down
long enough) or a message cannot be delivered, the loss is counted, not raised.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import orjson

from freshet.contracts import Prediction
from freshet.settings import Settings

log = logging.getLogger("freshet.serving.predictions")


def encode_prediction(request_id: str, model: str, model_version: str, entities: dict[str, Any],
                      features: dict[str, Any], prediction: dict[str, Any], ts: float | None = None,
                      role: str | None = None, shadow: dict[str, Any] | None = None) -> bytes:
    """A freshet.predictions/1 message (what Prediction.encode gives, without building the object);
    `role` ("canary") and `shadow` (the shadow version's answer) only when there are any."""
    doc = {"schema": Prediction.SCHEMA, "request_id": request_id, "model": model, "model_version": model_version,
           "entities": entities, "features": features, "prediction": prediction, "ts": ts or time.time()}
    if role is not None:
        doc["role"] = role
    if shadow is not None:
        doc["shadow"] = shadow
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


class PredictionLog:
    """Bounded, non-blocking publisher of freshet.predictions/1 messages.

    `published` counts messages handed to the producer, `dropped` those lost, by reason:
    `buffer_full` (the queue of `max_pending` messages was full), `undelivered` (Kafka did
    not take them within `delivery_timeout_s`) and `disabled` (no Kafka configured).
    """

    def __init__(self, settings: Settings, max_pending: int = 100_000, delivery_timeout_s: float = 60.0,
                 handover_s: float = 0.005):
        self.settings = settings
        self.topic = settings.topic_predictions
        self.max_pending = max_pending
        # the last tenth of the queue is for single predictions: one client's batches cannot
        # push other clients' predictions out (see admit)
        self.reserve = max(1, max_pending // 10)
        self.published = 0
        self.dropped = {"buffer_full": 0, "undelivered": 0, "disabled": 0}
        self.enabled = bool(settings.kafka_bootstrap_servers)
        self._producer = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._batch: list[dict] = []
        self._batch_scheduled = False
        # Predictions go to librdkafka every `handover_s`, not per request: each hand-over wakes
        # its threads (a futex and a context switch), which cost more than the request itself
        # at one request per event-loop turn. Kafka batches them for linger.ms (100) anyway.
        self.handover_s = handover_s
        self._loop: asyncio.AbstractEventLoop | None = None
        if self.enabled:
            from freshet import kafka

            self._producer = kafka.producer(settings, **{
                "queue.buffering.max.messages": max_pending,
                "queue.buffering.max.kbytes": 256 * 1024,
                "message.timeout.ms": int(delivery_timeout_s * 1000),
                "linger.ms": 100,  # off the request path; fewer, larger batches cost the broker less
                # acks=all (kafka.producer's): idempotence needs it, so a retried send is logged once
                # only failures come back to Python: a callback per message would cost the request path
                "delivery.report.only.error": True,
                "on_delivery": self._on_delivery,
            })
        else:
            log.warning("no Kafka configured: predictions are answered but not logged")

    def _on_delivery(self, err, msg) -> None:
        if err is not None:
            self.dropped["undelivered"] += 1

    @property
    def pending(self) -> int:
        return len(self._producer) if self._producer is not None else 0

    @property
    def queued(self) -> int:
        """Predictions waiting: in librdkafka's queue and in the next hand-over."""
        return self.pending + len(self._batch)

    def admit(self, n: int) -> bool:
        """Whether a request of `n` predictions may be answered now: a batch (n > 1) only while it
        leaves `reserve` places free, so a client's huge batches are refused (503, retry) before they
        fill the queue, and single predictions, always answered, find room."""
        if self._producer is None or n == 1:  # a single prediction is never refused (at worst dropped, counted)
            return True
        return n <= self.max_pending - self.queued - self.reserve

    def publish(self, request_id: str, model: str, model_version: str, entities: dict[str, Any],
                features: dict[str, Any], prediction: dict[str, Any], ts: float | None = None,
                role: str | None = None, shadow: dict[str, Any] | None = None) -> bool:
        """Queue one freshet.predictions/1 message; False (and counted) if it was dropped.

        Called on a running event loop, messages are handed to librdkafka every `handover_s`
        and a drop is counted then (the call returns True).
        """
        if self._producer is None:
            self.dropped["disabled"] += 1
            return False
        value = encode_prediction(request_id, model, model_version, entities, features, prediction, ts, role, shadow)
        loop = self._loop
        if loop is None or not loop.is_running():
            try:  # asyncio.get_running_loop() is a getpid() syscall on CPython 3.11: asked once
                loop = self._loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop: hand it over now
                try:
                    self._producer.produce(self.topic, value, request_id.encode())
                except BufferError:
                    self.dropped["buffer_full"] += 1
                    return False
                self.published += 1
                return True
        self._batch.append({"value": value, "key": request_id.encode()})
        if not self._batch_scheduled:
            self._batch_scheduled = True
            loop.call_later(self.handover_s, self._produce_batch)
        return True

    def hand_over(self) -> None:
        """Give the predictions waiting for the next hand-over to librdkafka now (counts become current)."""
        if self._batch:
            self._produce_batch()

    def _produce_batch(self) -> None:
        batch, self._batch = self._batch, []
        self._batch_scheduled = False  # a timer still pending finds an empty batch: harmless
        if not batch:
            return
        if self._producer is None:
            self.dropped["disabled"] += len(batch)
            return
        try:
            queued = self._producer.produce_batch(self.topic, batch)
        except BufferError:
            queued = 0
        self.published += queued
        self.dropped["buffer_full"] += len(batch) - queued
        self._producer.poll(0)  # serve delivery failures (callbacks) here, without waiting

    def start(self) -> None:
        """Create the topic if needed and serve delivery reports, in a background thread."""
        if self._producer is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="freshet-prediction-log", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        from freshet import kafka

        topic_ready = False
        retry_at = 0.0
        while not self._stop.is_set():
            if not topic_ready and time.monotonic() >= retry_at:
                try:
                    kafka.ensure_topics(self.settings, [self.topic], timeout=5)
                    topic_ready = True
                except Exception as exc:  # noqa: BLE001 - keep answering; retry later
                    log.warning("prediction log topic %s not ready (%s); retrying", self.topic, exc)
                    retry_at = time.monotonic() + 10
            # Delivery failures are served here when idle (and by every hand-over). A blocking
            # poll(0.2) woke this thread for the GIL thousands of times a second under load.
            self._producer.poll(0)
            self._stop.wait(0.5)

    def flush(self, timeout: float = 5.0) -> int:
        """Wait for queued messages to be delivered; returns how many are still queued."""
        return self._producer.flush(timeout) if self._producer is not None else 0

    def close(self, timeout: float = 5.0) -> None:
        self.hand_over()
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)
        left = self.flush(timeout)
        if left:
            log.warning("%d predictions were not delivered before shutdown", left)
        self._producer = None  # destroyed now, not at interpreter exit
