"""Whether the stream worker's aiokafka producer may be idempotent, decided once at start-up.

Owns the probe (an idempotent producer asks the broker for a producer id) and what
FRESHET_KAFKA_IDEMPOTENCE makes of its answer.
"""

from __future__ import annotations

import asyncio
import logging

from freshet.settings import Settings, SettingsError

log = logging.getLogger("freshet.stream")

PROBE_TIMEOUT_S = 15.0


async def _grants_producer_id(bootstrap: str, timeout_s: float) -> tuple[bool, str]:
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap.split(","), enable_idempotence=True,
                                request_timeout_ms=int(timeout_s * 1000))
    sender_log = logging.getLogger("aiokafka.producer.sender")
    level = sender_log.level
    sender_log.setLevel(logging.CRITICAL)  # a refusal is an answer here, logged once below, not an error
    try:
        # an idempotent producer's start waits for InitProducerId's answer
        await asyncio.wait_for(producer.start(), timeout_s)
        return True, ""
    except (KafkaError, asyncio.TimeoutError) as exc:
        return False, f"{type(exc).__name__} {exc}".strip()
    finally:
        sender_log.setLevel(level)
        try:
            await asyncio.wait_for(producer.stop(), 5)
        except Exception:  # noqa: BLE001 - a producer that never started may not stop cleanly
            pass


def stream_idempotence(settings: Settings, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """True when the stream's producer (changelogs, repartition, dead letters) is to be idempotent.

    "off": never; "auto": when the broker grants aiokafka a producer id (real Kafka does; the
    embedded Tansu broker does not answer aiokafka's InitProducerId v0), logged once either
    way; "on": a broker that does not grant one is a configuration error.
    """
    mode = settings.kafka_idempotence
    if mode == "off":
        log.info("stream producer: idempotence off (FRESHET_KAFKA_IDEMPOTENCE=off)")
        return False
    granted, why = asyncio.run(_grants_producer_id(settings.kafka_bootstrap_servers, timeout_s))
    if granted:
        log.info("stream producer: idempotent (the broker granted a producer id)")
        return True
    if mode == "on":
        raise SettingsError(f"FRESHET_KAFKA_IDEMPOTENCE=on but the broker at {settings.kafka_bootstrap_servers} "
                            f"grants aiokafka no producer id ({why}); use auto or off with this broker")
    log.warning("stream producer: not idempotent: the broker at %s grants aiokafka no producer id (%s; the "
                "embedded Tansu broker never does). Delivery stays at least once with exactly-once effects; "
                "a retried send may be written twice. FRESHET_KAFKA_IDEMPOTENCE=off skips this probe.",
                settings.kafka_bootstrap_servers, why)
    return False
