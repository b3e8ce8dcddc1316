"""The offline store on a real S3-compatible object store (SeaweedFS on loopback): parts written
whole, read back and deduplicated as on a disk; bad settings refused at start-up naming the
setting; and two stream workers with data dirs of their own, sharing no disk, whose raw-log rows
both reach a retrainer's training set on a third data dir."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from freshet import features, kafka
from freshet.app.commands import create_model_store
from freshet.demo.workload import TransactionWorkload
from freshet.offline_store import OfflineStore, create_buckets
from freshet.settings import SettingsError, load_settings
from freshet.stream.offline import append_parts, read_parts
from freshet.stream.backfill import load_events
from freshet.training.labels import LabelLog
from freshet.models import ModelRegistry
from freshet.training.snapshot import Snapshot
from s3_server import start_s3_server
from stream_checks import stop_workers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

BUCKET = "freshet"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    try:
        server.create_bucket(BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A PostgreSQL server (the pgserver wheel) with a database for MLflow and one for Feast's registry."""
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="stop")
    try:
        server.psql("CREATE DATABASE mlflow;")
        server.psql("CREATE DATABASE feast;")
        base = server.get_uri()  # postgresql://postgres:@/postgres?host=<socket dir>
        yield {db: base.replace("/postgres?", f"/{db}?") for db in ("mlflow", "feast")}
    finally:
        server.cleanup()


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}


def _s3_settings(s3, tmp: Path, prefix: str, **more):
    return load_settings(_env(), data_dir=str(tmp / "data"), offline_store=f"s3://{BUCKET}/{prefix}",
                         s3_endpoint_url=s3.endpoint_url, s3_access_key_id=s3.access_key_id,
                         s3_secret_access_key=s3.secret_access_key, **more)


def _events(first: int, n: int, partition: int = 0) -> pa.Table:
    return pa.table({"transaction_id": [f"tx{i}" for i in range(first, first + n)],
                     "event_ts": pa.array([1_764_633_600_000_000 + i * 1_000_000 for i in range(first, first + n)],
                                          pa.timestamp("us", tz="UTC")),
                     "_partition": pa.array([partition] * n, pa.int32()),
                     "_offset": pa.array(range(first, first + n), pa.int64())})


def test_parts_on_s3_are_written_whole_listed_and_read_back_in_order(s3, tmp_path):
    settings = _s3_settings(s3, tmp_path, "parts")
    store = OfflineStore.of(settings)
    root = store.raw("transactions")
    written = append_parts(root, _events(0, 5), "event_ts") + append_parts(root, _events(3, 4), "event_ts")
    assert all(str(f).startswith(f"s3://{BUCKET}/parts/raw/transactions/date=") for f in written)
    assert root.parts() == sorted(written)
    table = read_parts(root)
    assert table.num_rows == 9  # the replayed offsets 3 and 4 are there twice: readers drop them
    assert sorted(set(table["_offset"].to_pylist())) == list(range(7))
    # nothing on the local disk: no offline directory in the data dir
    assert not (settings.data_path / "offline").exists()
    # a snapshot's relative path finds the part again
    assert store.at(written[0].relative()) == written[0] and written[0].relative().startswith("offline/raw/")


def test_the_label_log_checkpoint_lives_in_the_store_and_is_replaced_whole(s3, tmp_path):
    settings = _s3_settings(s3, tmp_path, "labels", topic_labels="labels-x")
    log = LabelLog(settings)
    assert log.offsets() == {}
    log._save_offsets({0: 12, 1: 7})
    log._save_offsets({0: 15, 1: 7})
    assert LabelLog(settings).offsets() == {0: 15, 1: 7}
    assert [p.name for p in OfflineStore.of(settings).labels("labels-x").parts()] == []  # a JSON file, no part


def test_bad_object_store_settings_fail_at_start_up_naming_the_setting(s3, tmp_path):
    with pytest.raises(SettingsError, match="FRESHET_OFFLINE_STORE=s3://freshet/x: cannot list it"):
        OfflineStore.of(load_settings(_env(), offline_store="s3://freshet/x", s3_endpoint_url=s3.endpoint_url,
                                      s3_access_key_id=s3.access_key_id, s3_secret_access_key="wrong"))
    with pytest.raises(SettingsError, match="bucket 'nobucket' does not exist"):
        OfflineStore.of(load_settings(_env(), offline_store="s3://nobucket/y", s3_endpoint_url=s3.endpoint_url,
                                      s3_access_key_id=s3.access_key_id, s3_secret_access_key=s3.secret_access_key))
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    with pytest.raises(SettingsError, match="FRESHET_OFFLINE_STORE=s3://freshet/z: cannot list it.*"
                                            "FRESHET_S3_ENDPOINT_URL"):
        OfflineStore.of(load_settings(_env(), offline_store="s3://freshet/z",
                                      s3_endpoint_url=f"http://127.0.0.1:{closed}",
                                      s3_access_key_id="k", s3_secret_access_key="s"))
    # 'freshet apply --model-store' creates a missing bucket; then the store answers
    fresh = load_settings(_env(), offline_store="s3://fresh-bucket/o", mlflow_artifact_store="s3://freshet/m",
                          s3_endpoint_url=s3.endpoint_url, s3_access_key_id=s3.access_key_id,
                          s3_secret_access_key=s3.secret_access_key)
    assert create_buckets(fresh) == ["fresh-bucket"] and create_buckets(fresh) == []
    assert OfflineStore.of(fresh).root.parts() == []
    # and the CLI says it in one line, exit 2
    env = {**_env(), "FRESHET_OFFLINE_STORE": "s3://freshet/z", "FRESHET_S3_ENDPOINT_URL": s3.endpoint_url,
           "FRESHET_S3_ACCESS_KEY_ID": s3.access_key_id, "FRESHET_S3_SECRET_ACCESS_KEY": "wrong",
           "FRESHET_DATA_DIR": str(tmp_path / "cli")}
    proc = subprocess.run([sys.executable, "-m", "freshet.cli", "stream"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "FRESHET_OFFLINE_STORE=s3://freshet/z: cannot list it" in proc.stderr, (
        proc.returncode, proc.stderr[-1500:])


def _produce(settings, topic: str, messages) -> dict[bytes, int]:
    """Publish (key, value) messages; returns each transaction's partition, from the delivery reports."""
    partitions: dict[bytes, int] = {}
    producer = kafka.producer(settings)
    for key, value in messages:
        tx = orjson.loads(value)["transaction_id"]
        producer.produce(topic, key=key, value=value,
                         on_delivery=lambda err, msg, tx=tx: partitions.__setitem__(tx, msg.partition()))
    assert producer.flush(30) == 0
    return partitions


def _assignments(log: Path, topic: str) -> list[set[int]]:
    """Every source-topic assignment a worker logged, oldest first."""
    out = []
    for line in log.read_text().splitlines():
        if "partitions assigned:" in line:
            out.append({int(p) for t, p in re.findall(r"\('([^']+)', (\d+)\)", line) if t == topic})
    return out


def _wait(what: str, ready, workers, logs, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        for w, log in zip(workers, logs):
            assert w.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.5)


def test_hosts_sharing_no_disk_stream_train_and_serve_through_s3_and_postgresql(
        s3, postgres, services, tmp_path, request, monkeypatch, apply_feature_repo):
    """Two stream workers, a retrainer and a server, each a process of its own with its own data dir:
    the workers' raw-log rows reach the retrainer's training set on S3, the Feast registry applied
    once is read by all from PostgreSQL, and the version the retrainer promotes (MLflow on
    PostgreSQL, artifacts on S3) is the one the server answers with."""
    uid = "s3" + os.urandom(4).hex()
    topic = f"{uid}.transactions"
    token = os.urandom(8).hex()
    common = dict(kafka_bootstrap_servers=services.kafka, redis_url=services.redis_url, kafka_partitions=4,
                  topic_deadletter=f"{uid}.deadletter", topic_labels=f"{uid}.labels", topic_predictions=f"{uid}.pred",
                  topic_retrain=f"{uid}.retrain", topic_models=f"{uid}.models", api_token=token,
                  model_name=f"{uid}-fraud", mlflow_tracking_uri=postgres["mlflow"], feast_registry=postgres["feast"],
                  mlflow_artifact_store=f"s3://{BUCKET}/{uid}/mlflow")
    secret_file = tmp_path / "s3-secret"
    secret_file.write_text(s3.secret_access_key)
    secret_file.chmod(0o600)
    # four hosts: each its own data dir; the offline store and MLflow's artifacts on S3, the registries on
    # PostgreSQL; worker-2 reads its secret key from a 0600 file, the others from the environment
    hosts = {name: _s3_settings(s3, tmp_path / name, uid, **common) for name in ("worker-1", "retrainer", "server")}
    hosts["worker-2"] = load_settings(
        _env(), data_dir=str(tmp_path / "worker-2" / "data"), offline_store=f"s3://{BUCKET}/{uid}",
        s3_endpoint_url=s3.endpoint_url, s3_access_key_id=s3.access_key_id,
        s3_secret_access_key_file=str(secret_file), **common)
    extra = {"FRESHET_TRANSACTIONS_TOPIC": topic}
    # a deployment's first step, once, from one host: Feast's registry and MLflow's schema on PostgreSQL
    # ('freshet apply --model-store', in-process here: the registry as 'feast apply' writes it)
    monkeypatch.setenv("FRESHET_TRANSACTIONS_TOPIC", topic)
    monkeypatch.setenv("FRESHET_OFFLINE_STORE", features.offline_root(hosts["worker-1"]))
    apply_feature_repo(hosts["worker-1"])
    create_model_store(hosts["worker-1"])
    registry = features.load_registry(hosts["retrainer"])  # read back on another host
    assert {v.offline_path for v in registry.views.values()} == {
        f"s3://{BUCKET}/{uid}/features/{v}" for v in registry.views}
    assert not (hosts["worker-1"].data_path / "registry.db").exists()
    kafka.ensure_topics(hosts["worker-1"], [topic, hosts["worker-1"].topic_deadletter])

    batch = TransactionWorkload(seed=5, cards=300, merchants=60, rate=2.0, start_ts=time.time() - 3600,
                                id_prefix=f"{uid}-").batch(1200)
    messages = batch.messages()
    first = _produce(hosts["worker-1"], topic, messages[:600])

    # the server, on a fourth host, starts with no model yet (503) and follows the model events
    port = _free_port()
    server_log = tmp_path / "server.log"
    server = _start(hosts["server"], extra, ["serve", "--port", str(port)], server_log)
    request.addfinalizer(lambda: stop_workers([server]))

    app_id = f"{uid}-stream"
    workers, logs = [], []
    for name in ("worker-1", "worker-2"):
        logs.append(tmp_path / f"{name}.log")
        workers.append(_start(hosts[name], extra, ["stream", "--app-id", app_id], logs[-1]))
    raw = OfflineStore.of(hosts["retrainer"]).raw(topic)

    def have(txs) -> bool:
        table = read_parts(raw, ["transaction_id"])
        return table is not None and set(txs) <= set(table["transaction_id"].to_pylist())

    try:
        # both workers own source partitions, and what was published before they joined is in the store
        _wait("both workers assigned and the first 600 events on S3",
              lambda: all(a and a[-1] for a in map(lambda log: _assignments(log, topic), logs)) and have(first),
              workers, logs)
        owned = [_assignments(log, topic)[-1] for log in logs]
        assert not owned[0] & owned[1] and owned[0] | owned[1] == {0, 1, 2, 3}, owned
        # published now, each event is read by its partition's owner: both workers' rows are in this half
        second = _produce(hosts["worker-1"], topic, messages[600:])
        by_worker = [{tx for tx, p in second.items() if p in mine} for mine in owned]
        assert all(by_worker), by_worker
        _wait("the second 600 events on S3", lambda: have(second), workers, logs)
        assert [_assignments(log, topic)[-1] for log in logs] == owned  # no rebalance in between
    finally:
        stop_workers(workers)

    # the retrainer, a process on its own host: labels copied into the store, a snapshot of it, a fit,
    # a version registered and promoted
    producer = kafka.producer(hosts["retrainer"])
    kafka.ensure_topics(hosts["retrainer"], [hosts["retrainer"].topic_labels])
    for key, value in batch.label_messages():
        producer.produce(hosts["retrainer"].topic_labels, key=key, value=value)
    assert producer.flush(30) == 0
    retrain_log = tmp_path / "retrainer.log"
    retrainer = _start(hosts["retrainer"], extra, ["retrain", "--bootstrap", "--seed", "3"], retrain_log)
    request.addfinalizer(lambda: stop_workers([retrainer]))
    assert retrainer.wait(180) == 0, retrain_log.read_text()[-3000:]
    store = OfflineStore.of(hosts["retrainer"])
    assert store.labels(hosts["retrainer"].topic_labels).parts()  # the label log is on S3 too
    models = ModelRegistry(hosts["retrainer"], publish_events=False)
    version = models.current_version(hosts["retrainer"].model_name)
    assert version == "1", retrain_log.read_text()[-3000:]
    snapshot = Snapshot.from_dict(models.training_snapshot(hosts["retrainer"].model_name, version))
    events = load_events(hosts["retrainer"], topic, files=snapshot.events.files(store))
    for mine in by_worker:  # each worker's rows are in what the training read
        assert mine <= set(events["transaction_id"]), len(mine - set(events["transaction_id"]))
    for name in ("worker-1", "worker-2", "retrainer"):  # no host kept an offline log of its own
        assert not (hosts[name].data_path / "offline").exists(), name

    # the server answers with the promoted version (its artifacts read from S3)
    tx = batch.events()[0]
    body = {"entities": {"card_id": tx["card_id"], "merchant_id": tx["merchant_id"]},
            "fields": {"amount": tx["amount"]}}
    deadline, answer = time.monotonic() + 90, None
    while answer is None:
        assert server.poll() is None and time.monotonic() < deadline, server_log.read_text()[-3000:]
        try:
            r = httpx.post(f"http://127.0.0.1:{port}/predict", json=body,
                           headers={"Authorization": f"Bearer {token}"}, timeout=5)
            answer = r.json() if r.status_code == 200 else None
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    assert answer["model_version"] == "1" and answer["model"] == hosts["server"].model_name, answer
    assert not (hosts["server"].data_path / "mlartifacts").exists()
    artifacts = s3.filesystem().get_file_info(pafs.FileSelector(f"{BUCKET}/{uid}/mlflow", recursive=True))
    assert any(f.base_name == "MLmodel" for f in artifacts), [f.path for f in artifacts][:10]


def _start(settings, extra: dict, args: list[str], log: Path) -> subprocess.Popen:
    env = {**_env(), **settings.to_env(), **extra}
    return subprocess.Popen([sys.executable, "-m", "freshet.cli", *args], env=env, stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
