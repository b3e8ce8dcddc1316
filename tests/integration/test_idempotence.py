"""Idempotent producers wherever the broker grants them, on the session's real broker.

librdkafka's idempotent producer works against every broker freshet meets (the embedded
Tansu included); aiokafka's (the stream worker's, through Faust) needs a producer id that
Tansu does not grant. FRESHET_KAFKA_IDEMPOTENCE says what to do about it.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest

from freshet import kafka
from freshet.settings import SettingsError
from freshet.stream.idempotence import stream_idempotence

pytestmark = pytest.mark.integration


def _grants_aiokafka(services) -> bool:
    return services.origin != "embedded"  # Apache Kafka (testcontainers, external) grants one


def test_auto_makes_the_stream_producer_idempotent_where_the_broker_grants_it_and_says_so_once(
        settings, services, caplog):
    caplog.set_level(logging.INFO, logger="freshet.stream")
    assert stream_idempotence(settings) is _grants_aiokafka(services)
    said = [r for r in caplog.records if r.name == "freshet.stream" and "stream producer" in r.getMessage()]
    assert len(said) == 1
    if not _grants_aiokafka(services):
        assert said[0].levelno == logging.WARNING
        assert "FRESHET_KAFKA_IDEMPOTENCE" in said[0].getMessage()


def test_on_fails_at_start_naming_the_setting_where_the_broker_grants_no_producer_id(settings, services):
    on = dataclasses.replace(settings, kafka_idempotence="on")
    if _grants_aiokafka(services):
        assert stream_idempotence(on) is True
        return
    with pytest.raises(SettingsError, match="FRESHET_KAFKA_IDEMPOTENCE=on"):
        stream_idempotence(on)


def test_off_never_asks_the_broker(settings):
    off = dataclasses.replace(settings, kafka_idempotence="off", kafka_bootstrap_servers="127.0.0.1:9")
    assert stream_idempotence(off, timeout_s=0.5) is False  # nothing listens there: no probe was made


class _Lines(logging.Logger):
    """A logger librdkafka writes its debug lines to, kept for the test to read."""

    def __init__(self):
        super().__init__("librdkafka-test")
        self.lines: list[str] = []

    def log(self, level, msg, *args, **kwargs):  # librdkafka calls log(level, fmt, *args)
        self.lines.append(msg % args if args else msg)


def test_librdkafka_producers_are_idempotent_and_deliver_once_on_this_broker(settings, unique):
    topic = f"{unique}.idempotent"
    kafka.ensure_topics(settings, [topic], partitions=1)
    lines = _Lines()
    p = kafka.producer(settings, **{"debug": "eos", "log_level": 7, "logger": lines})
    for i in range(50):
        p.produce(topic, key=b"k", value=str(i).encode())
    assert p.flush(30) == 0
    p.poll(0)  # librdkafka's log lines are served by poll
    assert any("Acquired PID" in line for line in lines.lines), "the producer got no producer id: not idempotent"
    c = kafka.consumer(settings, f"{unique}-read")
    c.subscribe([topic])
    seen: list[str] = []
    for _ in range(60):
        seen += [m.value().decode() for m in c.consume(100, 0.5) if not m.error()]
        if len(seen) >= 50:
            break
    c.close()
    assert seen == [str(i) for i in range(50)]
