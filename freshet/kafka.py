"""Kafka clients configured from Settings: topics, producers and consumers.

Every component gets its clients here so security options, session timeouts and
fetch waits that suit the embedded broker (docs/architecture.md) are set in one place.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from freshet.settings import Settings

log = logging.getLogger("freshet.kafka")


class KafkaUnavailable(RuntimeError):
    """The broker did not answer; the message names the bootstrap servers and the fix."""


def admin(settings: Settings) -> AdminClient:
    return AdminClient({**settings.kafka_client_config(), "log_level": 0})


def check_reachable(settings: Settings, timeout: float = 10.0) -> None:
    try:
        admin(settings).list_topics(timeout=timeout)
    except KafkaException as exc:
        raise KafkaUnavailable(
            f"Kafka at {settings.kafka_bootstrap_servers} is unreachable ({exc.args[0]}); "
            "check FRESHET_KAFKA_BOOTSTRAP_SERVERS or start the embedded stack with 'freshet stack start'"
        ) from None


def ensure_topics(settings: Settings, names: Iterable[str], partitions: int | None = None,
                  timeout: float = 15.0) -> None:
    """Create the topics that do not exist yet; existing ones are left as they are."""
    client = admin(settings)
    try:
        existing = set(client.list_topics(timeout=timeout).topics)
    except KafkaException as exc:
        raise KafkaUnavailable(
            f"Kafka at {settings.kafka_bootstrap_servers} is unreachable ({exc.args[0]}); "
            "check FRESHET_KAFKA_BOOTSTRAP_SERVERS"
        ) from None
    wanted = [n for n in dict.fromkeys(names) if n not in existing]
    if not wanted:
        return
    futures = client.create_topics(
        [NewTopic(n, num_partitions=partitions or settings.kafka_partitions, replication_factor=1)
         for n in wanted], operation_timeout=timeout)
    for name, fut in futures.items():
        try:
            fut.result(timeout=timeout)
            log.info("created topic %s", name)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    _wait_for_metadata(client, wanted, timeout)


def _wait_for_metadata(client: AdminClient, names: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        topics = client.list_topics(timeout=timeout).topics
        if all(n in topics and topics[n].partitions for n in names):
            return
        time.sleep(0.1)
    raise KafkaUnavailable(f"topics {names} not visible in metadata after {timeout:.0f}s")


def producer(settings: Settings, **overrides) -> Producer:
    conf = {
        **settings.kafka_client_config(),
        "linger.ms": 5,
        "batch.num.messages": 10000,
        "enable.idempotence": False,  # Tansu lacks InitProducerId v0 (docs/architecture.md)
        "acks": "all",
        # Java's (and aiokafka's) partitioner: a key lands where Faust's tables expect it.
        "partitioner": "murmur2_random",
        "log_level": 3,
    }
    conf.update(overrides)
    return Producer(conf)


def consumer(settings: Settings, group_id: str, **overrides) -> Consumer:
    conf = {
        **settings.kafka_client_config(),
        "group.id": group_id,
        "session.timeout.ms": settings.kafka_session_timeout_ms,
        "heartbeat.interval.ms": max(500, settings.kafka_session_timeout_ms // 4),
        "fetch.wait.max.ms": max(1, settings.kafka_fetch_max_wait_ms),
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "log_level": 3,
    }
    conf.update(overrides)
    return Consumer(conf)
