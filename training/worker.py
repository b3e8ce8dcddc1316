"""The retraining worker: requests on settings.topic_retrain, one training per model per batch.

Owns `RetrainWorker` (consume, merge, train, commit; idle label copies and bootstraps) and `request_retrain`.

Requests queued together are merged into one training per model, and offsets are committed
after it. A request seen again (a replay after a crash) trains nothing once every alert id
it names has a registered version trained for it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Mapping, Sequence

from freshet.contracts import ContractError, RetrainRequest, new_id
from freshet.settings import Settings
from freshet.training.retrain import Retrainer

log = logging.getLogger("freshet.retrain")


def merge_requests(requests: Sequence[RetrainRequest]) -> dict[str, tuple[list[str], list[str]]]:
    """Requests queued together, per model: (every alert id once, every request id).

    >>> a = RetrainRequest("r1", "fraud", ["x", "y"]); b = RetrainRequest("r2", "fraud", ["y", "z"])
    >>> merge_requests([a, b])
    {'fraud': (['x', 'y', 'z'], ['r1', 'r2'])}
    """
    out: dict[str, tuple[list[str], list[str]]] = {}
    for r in requests:
        reasons, ids = out.setdefault(r.model, ([], []))
        reasons.extend(x for x in r.reason if x not in reasons)
        ids.append(r.request_id)
    return out


class RetrainWorker:
    """Consumes RetrainRequests, trains once per batch of requests per model, commits after."""

    def __init__(self, settings: Settings, retrainers: Mapping[str, Retrainer], group: str = "freshet-retrain",
                 on_outcome: Callable[[dict[str, Any]], None] | None = None, label_sync_every_s: float = 15.0,
                 bootstrap_every_s: float = 0.0, retry_base_s: float = 5.0, retry_max_s: float = 300.0):
        self.settings = settings
        # a failed training is tried again after retry_base_s, doubling up to retry_max_s; until it
        # succeeds no offset is committed, so a crash meanwhile replays its request instead of losing it
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self._retries: dict[str, tuple[list[str], list[str], int, float]] = {}  # model -> (reason, ids, attempt, due)
        # > 0: while a model has no champion, try a bootstrap training this often when idle
        self.bootstrap_every_s = bootstrap_every_s
        # copying labels while idle keeps the copy at training time (alert -> promotion) short
        self.label_sync_every_s = label_sync_every_s
        self.retrainers = dict(retrainers)
        self.group = group
        self.on_outcome = on_outcome
        self.counts = {"requests": 0, "rejected": 0, "unknown_model": 0, "trainings": 0, "skipped": 0,
                       "promoted": 0, "failed": 0, "retries": 0}
        self.stop_event = threading.Event()
        self._consumer = None  # while run() consumes: what a waiting training polls for newer requests
        self._later: list[RetrainRequest] = []  # requests polled meanwhile for another model

    def stop(self) -> None:
        self.stop_event.set()

    def run(self, gather_s: float = 0.5) -> None:
        from freshet import kafka

        topic = self.settings.topic_retrain
        kafka.ensure_topics(self.settings, [topic])
        consumer = kafka.consumer(self.settings, self.group, **{"max.poll.interval.ms": 3_600_000})
        consumer.subscribe([topic])
        self._consumer = consumer
        for retrainer in self.retrainers.values():
            retrainer.warm_up()
        log.info("retrain worker: waiting for requests on %s (group %s) for model(s) %s",
                 topic, self.group, ", ".join(self.retrainers))
        next_sync = time.monotonic() + self.label_sync_every_s
        next_bootstrap = time.monotonic()
        try:
            while not self.stop_event.is_set():
                if self._later:  # polled during a training, for another model
                    later, self._later = self._later, []
                    self._handle_requests(later)
                    self._commit(consumer)
                msgs = consumer.consume(100, 0.5)
                if not msgs:
                    if self._retries:
                        if self._retry_due():
                            self._commit(consumer)
                    elif self.bootstrap_every_s and time.monotonic() >= next_bootstrap:
                        self._bootstrap_missing()
                        next_bootstrap = time.monotonic() + self.bootstrap_every_s
                    elif self.label_sync_every_s and time.monotonic() >= next_sync:
                        self._sync_labels()
                        next_sync = time.monotonic() + self.label_sync_every_s
                    continue
                # requests that arrive together (an alert burst) train together
                deadline = time.monotonic() + gather_s
                while time.monotonic() < deadline:
                    more = consumer.consume(100, 0.1)
                    if not more:
                        break
                    msgs.extend(more)
                self.handle([m for m in msgs if self._ok(m)])
                self._commit(consumer)
        finally:
            self._consumer = None
            consumer.close()

    def _newer_for(self, model: str) -> Callable[[], list[str]] | None:
        """What a training of `model` calls while it waits for labels: the alert ids of requests for
        it that came since (their offsets are committed with the training's); others wait their turn,
        though their offsets are committed with it too: a crash before they train loses them."""
        consumer = self._consumer
        if consumer is None:
            return None

        def newer() -> list[str]:
            alerts: list[str] = []
            for r in self._decode([m for m in consumer.consume(100, 0) if self._ok(m)]):
                if r.model == model:
                    alerts.extend(a for a in r.reason if a not in alerts)
                else:
                    self._later.append(r)
            return alerts

        return newer

    def _commit(self, consumer) -> None:
        if self._retries:  # a failed training's request must survive a crash: commit once it succeeded
            return
        try:
            consumer.commit(asynchronous=False)
        except Exception as exc:  # noqa: BLE001 - a replay is harmless: requests are idempotent
            log.warning("retrain worker: offset commit failed (%s); requests may be seen again", exc)

    def _retry_due(self) -> bool:
        """Train again for each failed request whose back-off has passed; True once none is pending."""
        now = time.monotonic()
        for model, (reason, ids, attempt, due) in list(self._retries.items()):
            if now >= due:
                del self._retries[model]
                self.counts["retries"] += 1
                self._train(self.retrainers[model], model, reason, ids, attempt)
        return not self._retries

    def _schedule_retry(self, model: str, reason: list[str], ids: list[str], attempt: int) -> float:
        delay = min(self.retry_max_s, self.retry_base_s * 2 ** attempt)
        self._retries[model] = (reason, ids, attempt + 1, time.monotonic() + delay)
        log.warning("retrain %s: attempt %d failed; trying again in %.0fs (requests %s stay uncommitted)",
                    model, attempt + 1, delay, ", ".join(ids[:5]))
        return delay

    def _bootstrap_missing(self) -> None:
        for model, retrainer in self.retrainers.items():
            try:
                if retrainer.models.current_version(model) is not None:
                    continue
                outcome = retrainer.run(bootstrap=True)
            except Exception as exc:  # noqa: BLE001 - try again later
                log.warning("retrain worker: bootstrap of %s failed: %s", model, exc)
                continue
            if outcome["status"] in ("promoted", "not_promoted"):
                self.counts["trainings"] += 1
                self.counts["promoted"] += bool(outcome.get("promoted"))
                if self.on_outcome:
                    self.on_outcome(outcome)

    def _sync_labels(self) -> None:
        logs = {r.labels.topic: r.labels for r in self.retrainers.values()}
        for topic, label_log in logs.items():
            try:
                n = label_log.sync(timeout=10.0)
                if n:
                    log.info("retrain worker: copied %d new label(s) from %s", n, topic)
            except Exception as exc:  # noqa: BLE001 - training copies them anyway
                log.warning("retrain worker: could not copy labels from %s: %s", topic, exc)

    def _ok(self, msg) -> bool:
        if msg.error() is not None:
            log.warning("retrain worker: %s", msg.error())
            return False
        return True

    def handle(self, messages: Sequence[Any]) -> list[dict[str, Any]]:
        """One training per model for the requests among `messages`; returns the outcomes."""
        return self._handle_requests(self._decode(messages))

    def _handle_requests(self, requests: Sequence[RetrainRequest]) -> list[dict[str, Any]]:
        outcomes = []
        for model, (reason, ids) in merge_requests(requests).items():
            retrainer = self.retrainers.get(model)
            if retrainer is None:
                self.counts["unknown_model"] += 1
                log.warning("retrain worker: no training recipe for model %r (requests %s); known: %s",
                            model, ", ".join(ids), ", ".join(self.retrainers))
                continue
            attempt = 0
            if model in self._retries:  # a failed training waiting for its retry joins this one
                old_reason, old_ids, attempt, _ = self._retries.pop(model)
                reason = [*old_reason, *(r for r in reason if r not in old_reason)]
                ids = [*old_ids, *ids]
            outcomes.append(self._train(retrainer, model, reason, ids, attempt))
        return outcomes

    def _decode(self, messages: Sequence[Any]) -> list[RetrainRequest]:
        requests = []
        for m in messages:
            self.counts["requests"] += 1
            try:
                requests.append(RetrainRequest.decode(m.value()))
            except ContractError as exc:
                self.counts["rejected"] += 1
                log.warning("retrain worker: ignoring %s[%d]@%d: %s", m.topic(), m.partition(), m.offset(), exc)
        return requests

    def _train(self, retrainer: Retrainer, model: str, reason: list[str], ids: list[str],
               attempt: int = 0) -> dict[str, Any]:
        log.info("retrain %s: %d request(s) %s for %d alert(s)", model, len(ids), ", ".join(ids[:5]), len(reason))
        try:
            outcome = retrainer.run(reason, ids, newer=self._newer_for(model))
        except Exception as exc:  # noqa: BLE001 - one bad training must not stop the worker
            self.counts["failed"] += 1
            log.exception("retrain %s failed for requests %s: %s", model, ", ".join(ids), exc)
            outcome = retrainer.outcomes.finish({"model": model, "reason": reason, "request_ids": ids,
                                                 "promoted": False, "version": None, "attempt": attempt + 1,
                                                 "retry_in_s": self._schedule_retry(model, reason, ids, attempt)},
                                                "failed", str(exc))
        status = outcome["status"]
        if status in ("promoted", "not_promoted"):
            self.counts["trainings"] += 1
        elif status != "failed":
            self.counts["skipped"] += 1
        self.counts["promoted"] += bool(outcome.get("promoted"))
        if self.on_outcome:
            self.on_outcome(outcome)
        return outcome


def request_retrain(settings: Settings, model: str, reason: Sequence[str], request_id: str | None = None) -> RetrainRequest:
    """Publish one RetrainRequest (for operators and tests); returns it."""
    from freshet import kafka

    req = RetrainRequest(request_id=request_id or new_id(), model=model, reason=list(reason))
    kafka.ensure_topics(settings, [settings.topic_retrain])
    p = kafka.producer(settings)
    p.produce(settings.topic_retrain, key=req.key(), value=req.encode())
    if p.flush(15) != 0:
        raise RuntimeError(f"retrain request not delivered to {settings.topic_retrain}")
    return req
