"""Checks the stream specs share: an independent recomputation of features from events,
Redis reads, and the consumer group and dead-letter topic read to their ends."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time

import redis

from freshet import features, kafka
from freshet.contracts import DeadLetter
from freshet.redis_layout import OnlineLayout
from freshet.settings import load_settings


def isolated_stream(services, tmp, prefix: str):
    """A transactions topic and dead-letter topic of its own, the feature repo applied to them.

    Returns (uid, topic, settings, the environment a stream worker for it runs with, registry,
    Redis layout, Redis client).
    """
    uid = prefix + os.urandom(4).hex()
    topic = f"{uid}.transactions"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
    settings = load_settings(env, kafka_bootstrap_servers=services.kafka, redis_url=services.redis_url,
                             data_dir=str(tmp / "data"), topic_deadletter=f"{uid}.deadletter", kafka_partitions=4)
    extra = {"FRESHET_TRANSACTIONS_TOPIC": topic}
    features.apply(settings, extra_env=extra)
    registry = features.load_registry(settings)
    kafka.ensure_topics(settings, [topic, settings.topic_deadletter])
    layout = OnlineLayout(registry.project, registry.views)
    worker_env = {**env, **settings.to_env(), **extra}
    return uid, topic, settings, worker_env, registry, layout, redis.Redis.from_url(services.redis_url)


def stop_workers(workers, timeout: float = 30) -> None:
    """SIGTERM every worker, then wait for each (SIGKILL one that outlives `timeout`)."""
    for w in workers:
        w.send_signal(signal.SIGTERM)
    for w in workers:
        try:
            w.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            w.kill()


def expected(events: list[dict], view, key: str, as_of: dict[str, float] | None = None) -> dict[str, dict]:
    """Every feature as of each entity's latest event, or as of `as_of[entity]`, recomputed
    from the events by the README's window rule (no freshet code)."""
    by_entity: dict[str, list[dict]] = {}
    for e in events:
        by_entity.setdefault(e[key], []).append(e)
    out = {}
    for entity, evs in by_entity.items():
        t = as_of[entity] if as_of is not None else max(e["event_ts"] for e in evs)
        values = {}
        for a in view.aggregations:
            start = math.floor(t / a.slide_s) * a.slide_s + a.slide_s - a.window_s
            inside = sorted((e for e in evs if start <= e["event_ts"] <= t), key=lambda e: e["event_ts"])
            col = [e[a.column] for e in inside]
            values[a.name] = {
                "count": lambda: len(col), "sum": lambda: float(sum(col)), "count_distinct": lambda: len(set(col)),
                "mean": lambda: sum(col) / len(col) if col else None, "min": lambda: min(col, default=None),
                "max": lambda: max(col, default=None), "last": lambda: col[-1] if col else None,
            }[a.function]()
        out[entity] = values
    return out


def differences(got: dict, want: dict) -> list:
    out = []
    for entity, values in want.items():
        for name, w in values.items():
            g = got.get(entity, {}).get(name)
            same = (g is None and w is None) or (g is not None and w is not None and
                                                 math.isclose(float(g), float(w), rel_tol=1e-9, abs_tol=1e-6))
            if not same:
                out.append((entity, name, g, w))
    return out


def read_view(layout, client, view: str, keys: list[str]) -> dict[str, dict]:
    return {k: values for k, (_, values) in zip(keys, layout.read_rows(client, view, [(k,) for k in keys]))}


def rows_as_of(layout, client, view: str, keys: list[str]) -> dict[str, tuple[float | None, dict]]:
    """Each entity's row in Redis: (the time it is as of, its `_ts`; its values)."""
    return dict(zip(keys, layout.read_rows(client, view, [(k,) for k in keys])))


def online_differences(layout, client, view, events: list[dict], key: str) -> list:
    """Where Redis differs from the window rule over `events` as of each row's own timestamp:
    (entity, feature, got, want). A row missing, or as of a time before its entity's latest
    event (that event not applied yet), is a difference too (feature "_ts")."""
    latest: dict[str, float] = {}
    for e in events:
        latest[e[key]] = max(latest.get(e[key], e["event_ts"]), e["event_ts"])
    out, got, as_of = [], {}, {}
    for entity, (ts, values) in rows_as_of(layout, client, view.name, sorted(latest)).items():
        if ts is None or ts < latest[entity] - 2e-6:  # _ts has microseconds
            out.append((entity, "_ts", ts, latest[entity]))
            continue
        got[entity], as_of[entity] = values, max(ts, latest[entity])
    want = expected([e for e in events if e[key] in as_of], view, key, as_of)
    return out + differences(got, want)


def partition_ends(settings, topic: str) -> dict[int, int]:
    """Each partition's true end offset (freshet.kafka.partition_ends)."""
    return kafka.partition_ends(settings, topic)


def settled(settings, group: str, topics: list[str]) -> bool:
    """The group has committed every message of these topics (the worker flushes all it
    sends, dead letters included, before it commits)."""
    for topic in topics:
        ends = kafka.partition_ends(settings, topic)
        committed = kafka.committed_offsets(settings, group, topic, ends)
        if any(committed[p] < end for p, end in ends.items()):
            return False
    return True


def dead_letters(settings) -> list[DeadLetter]:
    """Every record of the dead-letter topic, read to its end."""
    from confluent_kafka import TopicPartition

    ends = partition_ends(settings, settings.topic_deadletter)
    c = kafka.consumer(settings, f"check-{os.urandom(3).hex()}")
    try:
        c.assign([TopicPartition(settings.topic_deadletter, p, 0) for p in ends])
        records, read = [], {p: 0 for p in ends}
        deadline = time.monotonic() + 60
        while any(read[p] < ends[p] for p in ends) and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is not None and not m.error():
                records.append(DeadLetter.decode(m.value()))
                read[m.partition()] = m.offset() + 1
        return records
    finally:
        c.close()
