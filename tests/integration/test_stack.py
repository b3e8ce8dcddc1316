"""The services every other test stands on: a real broker and a real Redis."""

from __future__ import annotations

import time

import pytest
import redis

from freshet import kafka

pytestmark = pytest.mark.integration


def _drain(consumers, want: int, timeout: float) -> dict[int, list]:
    got: dict[int, list] = {i: [] for i in range(len(consumers))}
    deadline = time.monotonic() + timeout
    while sum(map(len, got.values())) < want and time.monotonic() < deadline:
        for i, c in enumerate(consumers):
            msg = c.poll(0.05)
            if msg is not None and not msg.error():
                got[i].append((msg.partition(), msg.key(), msg.value()))
    return got


def test_two_consumers_in_one_group_share_partitions_and_together_see_every_message(settings, unique):
    topic = f"{unique}.events"
    kafka.ensure_topics(settings, [topic], partitions=4)
    consumers = [kafka.consumer(settings, f"{unique}-group") for _ in range(2)]
    for c in consumers:
        c.subscribe([topic])
    # both members must hold an assignment before we produce, so each gets a share
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(c.assignment() for c in consumers):
        for c in consumers:
            c.poll(0.05)
    assignments = [{tp.partition for tp in c.assignment()} for c in consumers]
    assert all(assignments), f"a member got no partitions: {assignments}"
    assert assignments[0].isdisjoint(assignments[1])
    assert assignments[0] | assignments[1] == {0, 1, 2, 3}

    p = kafka.producer(settings)
    sent = {(f"k{i}".encode(), f"v{i}".encode()) for i in range(400)}
    for key, value in sent:
        p.produce(topic, key=key, value=value)
    assert p.flush(10) == 0

    got = _drain(consumers, len(sent), timeout=30)
    for c in consumers:
        c.close()
    received = [(k, v) for msgs in got.values() for _, k, v in msgs]
    assert sorted(received) == sorted(sent)
    for i, msgs in got.items():
        assert {part for part, _, _ in msgs} <= assignments[i]
        assert msgs, f"member {i} received nothing"


def test_redis_hash_written_is_read_back(redis_url, unique):
    client = redis.Redis.from_url(redis_url)
    client.hset(f"{unique}:card", mapping={"sum": b"12.5", "count": b"3"})
    assert client.hgetall(f"{unique}:card") == {b"sum": b"12.5", b"count": b"3"}


def test_unreachable_broker_fails_fast_naming_the_setting(settings):
    from freshet.settings import load_settings

    dead = load_settings({}, kafka_bootstrap_servers="127.0.0.1:1")
    started = time.monotonic()
    with pytest.raises(kafka.KafkaUnavailable, match="FRESHET_KAFKA_BOOTSTRAP_SERVERS"):
        kafka.check_reachable(dead, timeout=2)
    assert time.monotonic() - started < 10


def test_stack_commands_start_report_and_stop_the_services_outside_clients_reach(tmp_path):
    """`freshet stack start|status|stop` as a user runs them, checked from other processes."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).with_name("freshet")
    cli = [str(script)] if script.is_file() else [sys.executable, "-m", "freshet.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
    env["FRESHET_DATA_DIR"] = str(tmp_path)

    def run(*args):
        return subprocess.run([*cli, "stack", *args], env=env, capture_output=True, text=True, timeout=120)

    started = run("start")
    assert started.returncode == 0, started.stdout + started.stderr
    state = json.loads((tmp_path / "stack.json").read_text())
    try:
        status = run("status")
        assert status.returncode == 0 and state["kafka"] in status.stdout and state["redis_url"] in status.stdout
        again = run("start")  # a second start for the same data dir names the one running
        assert again.returncode != 0 and "already runs" in again.stderr + again.stdout
        # an outside client of each protocol: RESP PING over a plain socket, Kafka metadata
        host, port = state["redis_url"].split("//")[1].split("/")[0].split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            assert sock.recv(16) == b"+PONG\r\n"
        from confluent_kafka.admin import AdminClient

        meta = AdminClient({"bootstrap.servers": state["kafka"]}).list_topics(timeout=10)
        assert meta.brokers
    finally:
        stopped = run("stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    for pid in (state["kafka_pid"], state["redis_pid"]):
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    after = run("status")
    assert after.returncode == 1 and "no embedded stack runs" in after.stdout
