"""The row-marker check never cancels a Redis command and waits for a hung Redis once."""

from __future__ import annotations

import asyncio
import time

from freshet.stream import recovery
from freshet.stream.recovery import RowMarkers


class SlowRedis:
    """Answers EXISTS for the keys it holds once `answer` is set (a hung Redis until then)."""

    def __init__(self, keys=()):
        self.keys, self.answer, self.cancelled, self.sent = set(keys), asyncio.Event(), 0, 0

    def pipeline(self, transaction=False):
        redis, queued = self, []

        class Pipe:
            def exists(self, key):
                queued.append(key)

            async def execute(self):
                redis.sent += 1
                try:
                    await redis.answer.wait()
                except asyncio.CancelledError:
                    redis.cancelled += 1
                    raise
                return [int(k in redis.keys) for k in queued]

        return Pipe()


def test_a_hung_redis_delays_one_check_and_its_late_answer_is_used(monkeypatch):
    monkeypatch.setattr(recovery, "MARKER_TIMEOUT_S", 0.2)

    async def scenario():
        redis = SlowRedis({"freshet:s:rows:v:0"})
        markers = RowMarkers(redis, "s")
        pairs = [("v", 0), ("v", 1)]
        t0 = time.monotonic()
        assert await markers.missing(pairs) == []  # waited MARKER_TIMEOUT_S, no answer
        first = time.monotonic() - t0
        t0 = time.monotonic()
        assert await markers.missing(pairs) == []  # the same check still out: no second wait
        second = time.monotonic() - t0
        redis.answer.set()
        await asyncio.sleep(0)
        found = await markers.missing(pairs)
        return first, second, found, redis

    first, second, found, redis = asyncio.run(scenario())
    assert first >= 0.2 and second < 0.1
    assert found == [("v", 1)]
    assert redis.cancelled == 0 and redis.sent == 1


def test_partitions_revoked_while_the_check_ran_are_not_reported():
    async def scenario():
        redis = SlowRedis()
        redis.answer.set()
        markers = RowMarkers(redis, "s")
        markers._check = ([("v", 0), ("v", 1)], asyncio.ensure_future(markers._exists([("v", 0), ("v", 1)])))
        await asyncio.sleep(0)
        return await markers.missing([("v", 1)])

    assert asyncio.run(scenario()) == [("v", 1)]
