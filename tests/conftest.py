"""Shared fixtures: a real Kafka-protocol broker and a real Redis-protocol server.

Where they come from, in order: FRESHET_KAFKA_BOOTSTRAP_SERVERS / FRESHET_REDIS_URL
(external services), testcontainers when a Docker engine answers, else the embedded
stack freshet itself starts. One of each per test session; tests isolate themselves
with unique topic names and key prefixes.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass

import pytest

from freshet.cli import skip_feast_typechecks
from freshet.settings import Settings, load_settings

log = logging.getLogger("freshet.tests")

# Feast imported as freshet's components import it (without typeguard's per-function
# recompiling, ~3 s per process); `freshet apply` keeps the checks in a process of its own
skip_feast_typechecks()


@dataclass
class Services:
    kafka: str
    redis_url: str
    origin: str


def _docker_reachable() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=2)
        client.ping()
        return True
    except Exception:  # noqa: BLE001 - any failure means "no engine"
        return False


@pytest.fixture(scope="session")
def services(tmp_path_factory) -> Services:
    kafka = os.environ.get("FRESHET_KAFKA_BOOTSTRAP_SERVERS")
    redis_url = os.environ.get("FRESHET_REDIS_URL")
    if kafka and redis_url:
        yield Services(kafka, redis_url, "external")
        return
    if os.environ.get("FRESHET_TESTCONTAINERS", "auto") != "off" and _docker_reachable():
        from testcontainers.kafka import KafkaContainer
        from testcontainers.redis import RedisContainer

        with KafkaContainer().with_kraft() as kc, RedisContainer() as rc:
            url = f"redis://{rc.get_container_host_ip()}:{rc.get_exposed_port(6379)}/0"
            yield Services(kc.get_bootstrap_server(), url, "testcontainers")
        return
    from freshet.app.stack import EmbeddedStack

    stack = EmbeddedStack(tmp_path_factory.mktemp("stack"))
    endpoints = stack.start()
    try:
        yield Services(endpoints.kafka, endpoints.redis_url, "embedded")
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(services) -> str:
    return services.kafka


@pytest.fixture(scope="session")
def redis_url(services) -> str:
    return services.redis_url


@pytest.fixture
def unique() -> str:
    """A short prefix no other test uses, for topic names, group ids and keys."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def settings(services, tmp_path, unique) -> Settings:
    """Settings pointing at the session's services, with this test's own data dir and topics."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
    return load_settings(
        env,
        kafka_bootstrap_servers=services.kafka,
        redis_url=services.redis_url,
        data_dir=str(tmp_path / "data"),
        topic_deadletter=f"{unique}.deadletter",
        topic_predictions=f"{unique}.predictions",
        topic_labels=f"{unique}.labels",
        topic_drift=f"{unique}.drift",
        topic_retrain=f"{unique}.retrain",
        topic_models=f"{unique}.models",
    )
