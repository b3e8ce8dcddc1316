"""Poison-pill isolation: which failures an event causes, and finding that event in a batch.

A failure the event's data causes (a value a later stage cannot take, a Redis key of the
wrong type) dead-letters that event and the stream goes on; a failure of the services
(a connection, a timeout, Redis out of memory) is no event's fault and stops the batch,
so its events are retried rather than dead-lettered.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Sequence, TypeVar

import faust.exceptions
import redis.exceptions
from aiokafka.errors import KafkaError, MessageSizeTooLargeError

T = TypeVar("T")
R = TypeVar("R")

# Redis replies that describe the server's state, not the command's data
_REDIS_STATE_ERRORS = ("OOM", "LOADING", "READONLY", "MISCONF", "BUSY", "NOAUTH", "NOPERM", "WRONGPASS",
                       "CLUSTERDOWN", "MOVED", "ASK", "TRYAGAIN", "MASTERDOWN", "NOREPLICAS", "NOSCRIPT")


# A Redis Cluster in flux (slots moving or unowned, a primary down): redis-py raises these with the
# error code stripped from the message, so they are told by type
_REDIS_CLUSTER_STATE = (redis.exceptions.RedisClusterException, redis.exceptions.ClusterError,
                        redis.exceptions.AskError, redis.exceptions.TryAgainError)


def is_infrastructure(exc: BaseException) -> bool:
    """True for failures of the services the stream writes to; False for ones an event causes.

    >>> is_infrastructure(ConnectionRefusedError()), is_infrastructure(OverflowError("int too big"))
    (True, False)
    >>> is_infrastructure(redis.exceptions.ResponseError("WRONGTYPE Operation against a key"))
    False
    >>> is_infrastructure(redis.exceptions.ResponseError("OOM command not allowed"))
    True
    >>> is_infrastructure(redis.exceptions.MovedError("3999 127.0.0.1:6381"))  # redis-py strips "MOVED"
    True
    """
    if isinstance(exc, (OSError, MemoryError, asyncio.TimeoutError, faust.exceptions.FaustError)):
        return True  # OSError covers ConnectionError and TimeoutError
    if isinstance(exc, _REDIS_CLUSTER_STATE):
        return True
    if isinstance(exc, redis.exceptions.ResponseError):
        return str(exc).startswith(_REDIS_STATE_ERRORS)
    if isinstance(exc, redis.exceptions.RedisError):
        return not isinstance(exc, redis.exceptions.DataError)
    if isinstance(exc, KafkaError):
        return not isinstance(exc, MessageSizeTooLargeError)
    return False


def describe(exc: BaseException, stage: str) -> str:
    """A dead-letter reason for an event that made `stage` fail.

    >>> describe(ValueError("bad"), "view v")
    'unprocessable: view v failed: ValueError: bad'
    """
    return f"unprocessable: {stage} failed: {type(exc).__name__}: {str(exc)[:500]}"


def split_failures(items: Sequence[T], build: Callable[[Sequence[T]], R]) -> tuple[list[R], list[tuple[T, BaseException]]]:
    """`build(items)`, or on a failure an event causes, `build` of halves until the items that
    fail alone are found: (results of the parts that built, [(failing item, its exception)]).

    `build` must have no effects before it returns (the parts are built again).

    >>> def total(xs):
    ...     return sum(1 // x for x in xs)
    >>> split_failures([1, 1, 0, 1], total)
    ([2, 1], [(0, ZeroDivisionError('integer division or modulo by zero'))])
    """
    try:
        return [build(items)], []
    except Exception as exc:  # noqa: BLE001 - sorted below
        if is_infrastructure(exc):
            raise
        if len(items) == 1:
            return [], [(items[0], exc)]
    mid = len(items) // 2
    built, failed = split_failures(items[:mid], build)
    more, failed_more = split_failures(items[mid:], build)
    return built + more, failed + failed_more
