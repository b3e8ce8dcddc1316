"""`freshet stack` signals only the processes it started: a pid recorded in stack.json that
now belongs to another process (the kernel recycles pids) is left alone."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import asdict

import pytest

from freshet.app.stack import EmbeddedStack
from freshet.endpoints import Endpoints, alive, is_process, running_stack, start_ticks


@pytest.fixture
def bystanders():
    """Two processes the stack did not start (stand-ins for whatever got a recycled pid)."""
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def _record(data_dir, kafka: subprocess.Popen, redis: subprocess.Popen, kafka_started: int, redis_started: int):
    data_dir.mkdir(parents=True, exist_ok=True)
    endpoints = Endpoints("127.0.0.1:1", "redis://127.0.0.1:1/0", kafka.pid, redis.pid, str(data_dir / "logs"),
                          kafka_started, redis_started)
    (data_dir / "stack.json").write_text(json.dumps(asdict(endpoints)))


def test_stop_leaves_a_process_alone_whose_pid_was_recycled(tmp_path, bystanders):
    kafka, redis = bystanders
    # recorded start times from before: the pids now belong to processes started later
    _record(tmp_path, kafka, redis, start_ticks(kafka.pid) - 100, start_ticks(redis.pid) - 100)
    stack = EmbeddedStack(tmp_path)

    assert stack.status() is None
    assert running_stack(tmp_path) is None
    assert stack.stop() is False

    time.sleep(0.2)
    assert kafka.poll() is None and redis.poll() is None, "a foreign process was signalled"
    assert not (tmp_path / "stack.json").exists()


def test_a_record_without_start_times_is_never_taken_for_a_running_stack(tmp_path, bystanders):
    kafka, redis = bystanders
    _record(tmp_path, kafka, redis, 0, 0)  # written by a build that recorded no start times

    assert EmbeddedStack(tmp_path).stop() is False
    time.sleep(0.2)
    assert kafka.poll() is None and redis.poll() is None


def test_stop_ends_the_processes_whose_start_times_match(tmp_path, bystanders):
    kafka, redis = bystanders
    _record(tmp_path, kafka, redis, start_ticks(kafka.pid), start_ticks(redis.pid))
    stack = EmbeddedStack(tmp_path)
    assert stack.status() is not None

    assert stack.stop() is True
    assert kafka.wait(10) is not None and redis.wait(10) is not None


def test_is_process_tells_a_live_process_from_a_reused_pid(bystanders):
    proc = bystanders[0]
    started = start_ticks(proc.pid)
    assert is_process(proc.pid, started)
    assert not is_process(proc.pid, started + 1)
    assert not is_process(proc.pid, 0)
    proc.kill()
    proc.wait()
    assert not alive(proc.pid) and not is_process(proc.pid, started)
