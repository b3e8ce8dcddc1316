"""Where the offline logs live: `<data dir>/offline` on this host (the default), or a prefix of an
S3-compatible bucket (`FRESHET_OFFLINE_STORE=s3://bucket/prefix`) that stream workers, backfills
and retrainers on other hosts share.

Owns `OfflineStore` (a filesystem of pyarrow's and the store's root) and `Location` (one place
in it: a dataset directory or a part file). Everything that writes or reads the raw log, the
feature logs, the label log or the prediction archive goes through these two, so the local disk
and the object store keep the same guarantees:

- Part files are immutable and only ever added, each under a new unique name. Readers drop
  rows repeated by a replay by (partition, offset), whichever part holds them.
- A part appears whole or not at all. On a disk it is written under a hidden name and renamed
  (readers skip hidden names). On S3 an object appears only when its upload completes (a PUT,
  or a multipart upload's last call), so a part is written under its final key directly; a
  crash mid-upload leaves no object (only an unfinished upload, which the bucket's lifecycle
  rule for incomplete multipart uploads removes).
- The label log's offsets checkpoint is replaced whole the same way.

Paths a training snapshot records are relative to the store ("offline/raw/<topic>/..."), the
same text as relative to the data dir on a local disk, so a snapshot names its parts on
either kind of store.
"""

from __future__ import annotations

import posixpath
import threading
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from freshet.settings import Settings, SettingsError

SCHEME = "s3://"
RELATIVE_ROOT = "offline"  # how snapshot paths start: the store's root, like <data dir>/offline


class Location:
    """A place in an offline store: a directory of parts or one part file. Compares by its URI.

    >>> root = OfflineStore.local("/data/offline").root
    >>> part = root / "raw" / "tx" / "date=2026-12-02" / "part-1.parquet"
    >>> str(part), part.name, part.parent.name, part.relative()
    ('/data/offline/raw/tx/date=2026-12-02/part-1.parquet', 'part-1.parquet', 'date=2026-12-02', 'offline/raw/tx/date=2026-12-02/part-1.parquet')
    """

    __slots__ = ("store", "path")

    def __init__(self, store: "OfflineStore", path: str):
        self.store = store
        self.path = path.rstrip("/") or "/"  # the filesystem's path: absolute on a disk, bucket/key on S3

    def __truediv__(self, name: str) -> "Location":
        return Location(self.store, f"{self.path}/{name}")

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> "Location":
        return Location(self.store, posixpath.dirname(self.path))

    def __str__(self) -> str:
        return self.path if self.store.is_local else SCHEME + self.path

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"

    def __fspath__(self) -> str:
        if not self.store.is_local:
            raise TypeError(f"{self} is on an object store, not a local path")
        return self.path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and str(self) == str(other)

    def __lt__(self, other: "Location") -> bool:
        return str(self) < str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def relative(self) -> str:
        """This location's path below the store's root, prefixed "offline/" (as a snapshot records it)."""
        rel = posixpath.relpath(self.path, self.store.root.path)
        if rel.startswith(".."):
            raise ValueError(f"{self} is not inside the offline store {self.store.root}")
        return RELATIVE_ROOT if rel == "." else f"{RELATIVE_ROOT}/{rel}"

    # -- reading

    def exists(self) -> bool:
        return self.store.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.store.fs.get_file_info(self.path).type == pafs.FileType.File

    def parts(self) -> list["Location"]:
        """The Parquet part files below this directory, sorted by path (hidden temp files skipped)."""
        selector = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        found = [Location(self.store, info.path) for info in self.store.fs.get_file_info(selector)
                 if info.type == pafs.FileType.File and info.base_name.endswith(".parquet")
                 and not info.base_name.startswith(".")]
        return sorted(found, key=lambda loc: loc.path)

    def metadata(self) -> pq.FileMetaData:
        with self.store.fs.open_input_file(self.path) as f:
            return pq.read_metadata(f)

    def read_text(self) -> str:
        with self.store.fs.open_input_stream(self.path) as f:
            return f.read().decode()

    # -- writing: whole files only, each appearing at once

    def write_parquet(self, table: pa.Table) -> None:
        """Write `table` as this part file, atomically (see the module's docstring)."""
        self._write(lambda sink: pq.write_table(table, sink, compression="zstd"))

    def write_text(self, text: str) -> None:
        """Replace this file by `text`, atomically."""
        self._write(lambda sink: sink.write(text.encode()))

    def _write(self, fill) -> None:
        fs = self.store.fs
        if not self.store.is_local:
            with fs.open_output_stream(self.path) as sink:
                fill(sink)
            return
        fs.create_dir(self.parent.path, recursive=True)
        tmp = f"{self.parent.path}/.{self.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with fs.open_output_stream(tmp) as sink:
                fill(sink)
            fs.move(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)  # a full disk must not keep half a file
            raise


def read_table(files: list[Location], columns: list[str] | None = None) -> pa.Table | None:
    """The part `files` (all in one store) as one table, in that order; None if there are none."""
    if not files:
        return None
    dataset = ds.dataset([f.path for f in files], format="parquet", filesystem=files[0].store.fs)
    return dataset.to_table(columns=columns)


class OfflineStore:
    """A filesystem and the root the offline logs live under; `of(settings)` gives the process's."""

    _cache: dict[tuple, "OfflineStore"] = {}
    _lock = threading.Lock()

    def __init__(self, fs: pafs.FileSystem, root: str, is_local: bool):
        self.fs = fs
        self.is_local = is_local
        self.root = Location(self, root)

    @classmethod
    def local(cls, directory: Path | str) -> "OfflineStore":
        return cls(pafs.LocalFileSystem(), Path(directory).expanduser().resolve().as_posix(), True)

    @classmethod
    def of(cls, settings: Settings) -> "OfflineStore":
        """The store the settings name: `<data dir>/offline`, a directory, or an S3 prefix (reached
        once per process to check the settings: a bad one raises SettingsError naming it)."""
        if not settings.offline_store:
            return cls.local(settings.data_path / RELATIVE_ROOT)
        if not settings.offline_store.startswith(SCHEME):
            return cls.local(settings.offline_store)
        key = (settings.offline_store, settings.s3_endpoint_url, settings.s3_region, settings.s3_access_key_id,
               settings.s3_secret_access_key, settings.s3_secret_access_key_file)
        with cls._lock:
            if key not in cls._cache:
                store = cls(_s3_filesystem(settings), settings.offline_store[len(SCHEME):].strip("/"), False)
                store.check()
                cls._cache[key] = store
            return cls._cache[key]

    def __repr__(self) -> str:
        return f"OfflineStore({str(self.root)!r})"

    def check(self) -> None:
        """Raise SettingsError unless the bucket answers (list the root: credentials, endpoint, bucket)."""
        bucket = self.root.path.split("/", 1)[0]
        try:
            info = self.fs.get_file_info(bucket)
            if info.type == pafs.FileType.NotFound:
                raise SettingsError(f"FRESHET_OFFLINE_STORE={self.root}: bucket {bucket!r} does not exist "
                                    "(create it first)")
            self.fs.get_file_info(pafs.FileSelector(self.root.path, allow_not_found=True))
        except OSError as exc:
            raise SettingsError(f"FRESHET_OFFLINE_STORE={self.root}: cannot list it ({_first_line(exc)}); check "
                                "FRESHET_S3_ENDPOINT_URL and the credentials (FRESHET_S3_ACCESS_KEY_ID with "
                                "FRESHET_S3_SECRET_ACCESS_KEY or FRESHET_S3_SECRET_ACCESS_KEY_FILE)") from None

    def at(self, relative: str) -> Location:
        """The location a snapshot recorded as `relative` ("offline/...")."""
        head, _, rest = relative.partition("/")
        if head != RELATIVE_ROOT:
            raise ValueError(f"{relative!r} is not a path in the offline store (it starts with {RELATIVE_ROOT}/)")
        return self.root / rest if rest else self.root

    def locate(self, text: str | Path | Location) -> Location:
        """The location a path or URI names (a Feast FileSource's path); it must be in this kind of store."""
        if isinstance(text, Location):
            return text
        text = str(text)
        if text.startswith(SCHEME):
            if self.is_local:
                raise SettingsError(f"{text} is on an object store but FRESHET_OFFLINE_STORE names a local "
                                    f"directory ({self.root}): set FRESHET_OFFLINE_STORE and run 'freshet apply'")
            return Location(self, text[len(SCHEME):])
        if not self.is_local:
            raise SettingsError(f"{text} is a local path but FRESHET_OFFLINE_STORE={self.root}: run "
                                "'freshet apply' with FRESHET_OFFLINE_STORE set, so the feature views' "
                                "batch sources name the object store")
        return Location(self, Path(text).expanduser().resolve().as_posix())

    # the four logs' directories
    def raw(self, topic: str) -> Location:
        return self.root / "raw" / topic

    def labels(self, topic: str) -> Location:
        return self.root / "labels" / topic

    def predictions(self, topic: str) -> Location:
        return self.root / "predictions" / topic


def as_location(where: Location | Path | str) -> Location:
    """A Location as is; a local path as a place on this host's disk."""
    if isinstance(where, Location):
        return where
    if str(where).startswith(SCHEME):
        raise ValueError(f"{where}: an object store location needs its store (OfflineStore.of(settings))")
    path = Path(where).expanduser().resolve()
    return Location(OfflineStore.local(path.anchor), path.as_posix())


def create_buckets(settings: Settings) -> list[str]:
    """Create the buckets FRESHET_OFFLINE_STORE and FRESHET_MLFLOW_ARTIFACT_STORE name that do not
    exist yet (`freshet apply --model-store`, a deployment's first step); returns those created."""
    buckets = {urlparse(uri).netloc for uri in (settings.offline_store, settings.mlflow_artifact_store)
               if uri.startswith(SCHEME)}
    if not buckets:
        return []
    fs = _s3_filesystem(settings, allow_bucket_creation=True)
    created = []
    for bucket in sorted(buckets):
        try:
            if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                fs.create_dir(bucket)
                created.append(bucket)
        except OSError as exc:
            raise SettingsError(f"cannot create bucket {bucket!r} at FRESHET_S3_ENDPOINT_URL="
                                f"{settings.s3_endpoint_url or '(AWS)'}: {_first_line(exc)}") from None
    return created


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _s3_filesystem(s: Settings, allow_bucket_creation: bool = False) -> pafs.S3FileSystem:
    options: dict[str, Any] = {"connect_timeout": 5.0, "request_timeout": 30.0,
                               "allow_bucket_creation": allow_bucket_creation}
    if s.s3_endpoint_url:
        url = urlparse(s.s3_endpoint_url)
        options.update(endpoint_override=url.netloc, scheme=url.scheme)
    options["region"] = s.s3_region or "us-east-1"
    secret = s.s3_secret_access_key
    if s.s3_secret_access_key_file:
        secret = Path(s.s3_secret_access_key_file).expanduser().read_text().strip()
    if s.s3_access_key_id:
        options.update(access_key=s.s3_access_key_id, secret_key=secret)
    return pafs.S3FileSystem(**options)
