"""Keys go to the primary owning their CRC16 slot; every primary gets a hash tag; cluster settings."""

from __future__ import annotations

import subprocess
import sys


from freshet.endpoints import redis_client
from freshet.features import repo_config
from freshet.redis_cluster import SLOTS, SlotMap, key_slot, redirection
from freshet.settings import load_settings

THREE = [[0, 5460, [b"10.0.0.1", 7000, b"a"]], [5461, 10922, [b"10.0.0.2", 7000, b"b"]],
         [10923, 16383, [b"10.0.0.3", 7000, b"c"]]]


def test_keys_are_grouped_by_the_primary_owning_their_slot_as_redis_py_computes_it():
    slots = SlotMap.from_cluster_slots(THREE)
    keys = [f"card-{i}".encode() for i in range(1000)]
    groups = slots.group(keys)
    assert sorted(i for positions in groups.values() for i in positions) == list(range(1000))
    for node, positions in groups.items():
        for i in positions:
            slot = key_slot(keys[i])
            assert node == slots.owners[slot] and slot < SLOTS
    assert len(groups) == 3  # a thousand keys spread over every primary


def test_a_hash_tag_keeps_keys_together():
    slots = SlotMap.from_cluster_slots(THREE)
    assert slots.node_of(b"x{user1}a") == slots.node_of(b"y{user1}b")


def test_every_primary_gets_a_hash_tag_landing_on_it_even_when_it_owns_few_slots():
    uneven = [[0, 16000, [b"h1", 1, b"a"]], [16001, 16300, [b"h2", 2, b"b"]], [16301, 16383, [b"", 3, b"c"]]]
    slots = SlotMap.from_cluster_slots(uneven, seed_host="seed")
    tags = slots.tags()
    assert set(tags) == {("h1", 1), ("h2", 2), ("seed", 3)}
    for node, tag in tags.items():
        assert slots.node_of(f"freshet:{{{tag}}}:s:rows:v:0".encode()) == node


def test_slots_without_an_owner_are_reported():
    slots = SlotMap.from_cluster_slots(THREE[:2])
    assert not slots.complete and slots.node_of(b"foo") is None  # foo is slot 12182
    assert SlotMap.from_cluster_slots(THREE).complete


def test_redirections_are_told_from_other_errors():
    assert redirection("MOVED 12182 10.0.0.3:7000") == ("MOVED", 12182, ("10.0.0.3", 7000))
    assert redirection("ASK 1 [::1]:7000") == ("ASK", 1, ("[::1]", 7000))
    assert redirection("CLUSTERDOWN The cluster is down") is None


def test_cluster_on_builds_cluster_clients_and_feast_redis_cluster_without_connecting(tmp_path):
    s = load_settings({}, redis_url="redis://127.0.0.1:7000/0", redis_cluster="on", data_dir=str(tmp_path))
    from redis.asyncio.cluster import RedisCluster as AsyncCluster

    # (the blocking cluster client connects as it is made: the integration spec builds it)
    assert isinstance(redis_client(s, asyncio=True), AsyncCluster)
    assert repo_config(s).online_store.redis_type == "redis_cluster"
    off = load_settings({}, redis_url="redis://127.0.0.1:7000/0", data_dir=str(tmp_path))
    assert type(redis_client(off)).__name__ == "Redis"
    assert repo_config(off).online_store.redis_type == "redis"


def test_freshet_up_refuses_cluster_mode_naming_the_setting(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "FRESHET_REDIS_CLUSTER": "on", "FRESHET_REDIS_URL": "redis://127.0.0.1:1/0",
           "FRESHET_DATA_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "freshet.cli", "up"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2
    assert "FRESHET_REDIS_CLUSTER=on: 'freshet up' runs the embedded stack" in proc.stderr


def test_cluster_mode_without_a_url_fails_at_start_naming_both_settings(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "FRESHET_REDIS_CLUSTER": "on", "FRESHET_DATA_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "freshet.cli", "serve"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode != 0 and "FRESHET_REDIS_CLUSTER=on needs FRESHET_REDIS_URL" in proc.stderr
