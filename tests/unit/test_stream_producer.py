"""The stream worker's Faust producer asks for idempotence exactly when told to (stream/idempotence.py decides)."""

from __future__ import annotations

import asyncio

import faust.transport.drivers.aiokafka as faust_aiokafka
import pytest

from freshet.stream.engine import _patch_clients


@pytest.fixture
def restore_faust_clients():
    saved = faust_aiokafka.aiokafka
    yield
    faust_aiokafka.aiokafka = saved


@pytest.mark.parametrize("idempotent", [True, False])
def test_faust_builds_its_producer_idempotent_only_when_asked(restore_faust_clients, idempotent):
    _patch_clients(20, idempotent)

    async def build():
        # what Faust's aiokafka transport instantiates (Producer._producer_type)
        producer = faust_aiokafka.aiokafka.AIOKafkaProducer(bootstrap_servers="127.0.0.1:9", acks=-1)
        return producer._txn_manager is not None  # aiokafka keeps producer-id state only when idempotent

    assert asyncio.run(build()) is idempotent
    consumer_cls = faust_aiokafka.aiokafka.AIOKafkaConsumer
    assert consumer_cls.__name__ == "FastFetchConsumer"  # the fetch wait patch stays either way
