"""Kafka clients configured from Settings: topics, producers and consumers.

Every component gets its clients here so security options, session timeouts and
fetch waits that suit the embedded broker (docs/architecture.md) are set in one place.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Iterable

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
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
        [NewTopic(n, num_partitions=partitions or settings.kafka_partitions,
                  replication_factor=settings.kafka_replication_factor, config=topic_config(settings))
         for n in wanted], operation_timeout=timeout)
    for name, fut in futures.items():
        try:
            fut.result(timeout=timeout)
            log.info("created topic %s", name)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    _wait_for_metadata(client, wanted, timeout)


def topic_config(settings: Settings) -> dict[str, str]:
    """Per-topic configs freshet sets when it creates a topic: min.insync.replicas above the
    broker default of 1 (left out at 1, so brokers that refuse topic configs still work)."""
    if settings.kafka_min_insync_replicas > 1:
        return {"min.insync.replicas": str(settings.kafka_min_insync_replicas)}
    return {}


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
        # librdkafka's idempotent producer works against every broker freshet meets, Tansu
        # included (only aiokafka's InitProducerId v0 goes unanswered there: stream/engine.py)
        "enable.idempotence": settings.kafka_idempotence != "off",
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


def partition_ends(settings: Settings, topic: str, partitions: int | None = None) -> dict[int, int]:
    """Each partition's true end offset (one past its last record). Tansu lists a partition's
    end as its last record batch's base offset + 1 (docs/architecture.md), so the last batch
    is read from there: one fetch returns it whole, and its last record is the partition's last."""
    from confluent_kafka import TopicPartition

    c = consumer(settings, f"ends-{os.urandom(3).hex()}")
    ends = {}
    try:
        for p in range(settings.kafka_partitions if partitions is None else partitions):
            listed = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            last = listed - 1
            if listed > 0:
                c.assign([TopicPartition(topic, p, listed - 1)])
                first = c.poll(10)
                batch = ([first] if first is not None else []) + c.consume(num_messages=100_000, timeout=0)
                last = max([last] + [m.offset() for m in batch if not m.error()])
            ends[p] = last + 1
    finally:
        c.close()
    return ends


def committed_offsets(settings: Settings, group: str, topic: str, partitions: Iterable[int]) -> dict[int, int]:
    """The offsets `group` has committed on these partitions of `topic` (0 where none)."""
    from confluent_kafka import TopicPartition

    c = consumer(settings, group)
    try:
        return {tp.partition: max(tp.offset, 0)
                for tp in c.committed([TopicPartition(topic, p) for p in partitions], timeout=10)}
    finally:
        c.close()


# --- broker incarnation --------------------------------------------------------

# One record per broker: its first record names the broker's incarnation. The topic lives
# and dies with the broker's data, so a broker that comes back empty (the embedded one
# keeps nothing on disk) has no record and gets a new id.
INCARNATION_TOPIC = "freshet.incarnation"


def broker_incarnation(settings: Settings, timeout: float = 15.0) -> str:
    """The id of the broker's current incarnation, written first if the broker has none.

    A broker that lost its data counts every partition's offsets from 0 again, so anything
    that remembers (partition, offset) pairs from before would take new records for old
    ones. Comparing this id with the one such state was recorded under tells the two apart.
    When two processes ask a fresh broker at once, both read the first record written.
    """
    import uuid

    ensure_topics(settings, [INCARNATION_TOPIC], partitions=1, timeout=timeout)
    found = _first_incarnation(settings, timeout)
    if found is None:
        p = producer(settings, **{"linger.ms": 0})
        p.produce(INCARNATION_TOPIC, key=b"incarnation",
                  value=json.dumps({"schema": "freshet.incarnation/1", "id": uuid.uuid4().hex,
                                    "ts": time.time()}).encode())
        if p.flush(timeout):
            raise KafkaUnavailable(f"could not write the broker's incarnation record to {INCARNATION_TOPIC} "
                                   f"at {settings.kafka_bootstrap_servers} within {timeout:.0f}s")
        found = _first_incarnation(settings, timeout)
    if found is None:
        raise KafkaUnavailable(f"the incarnation record on {INCARNATION_TOPIC} at "
                               f"{settings.kafka_bootstrap_servers} could not be read back within {timeout:.0f}s")
    return found


def _first_incarnation(settings: Settings, timeout: float) -> str | None:
    """The id in the marker topic's first record, or None when the topic is empty."""
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    c = consumer(settings, "freshet-incarnation", **{"enable.partition.eof": True})
    try:
        c.assign([TopicPartition(INCARNATION_TOPIC, 0, OFFSET_BEGINNING)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = c.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    return None
                continue
            try:
                return str(json.loads(msg.value())["id"])
            except (ValueError, KeyError, TypeError):
                return msg.value().hex()  # not ours, but it identifies this broker all the same
        return None
    finally:
        c.close()
