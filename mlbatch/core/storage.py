"""One way to name and touch files: local paths, ``file://`` URIs and ``s3://`` URIs.

Everything goes through pyarrow's filesystems, which read the standard AWS settings
(``AWS_ENDPOINT_URL``, keys, region, profiles) themselves, so the same code talks to real
S3, MinIO or a test server without knowing which.
"""

from __future__ import annotations

import atexit
import fnmatch
import gc
import io
import json
import logging
import os
import posixpath
import re
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .faults import FAULTS

log = logging.getLogger(__name__)

_GLOB_CHARS = "*?["


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> str:
    """The filesystem path of a local path or ``file://`` URI."""
    if uri.startswith("file://"):
        return unquote(urlparse(uri).path)
    return uri


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path inside it."""
    if is_s3(uri):
        bucket, _, key = uri[len("s3://"):].partition("/")  # keys are literal, no URL decoding
        if not bucket:
            raise ValueError(f"S3 URI has no bucket: {uri!r}")
        return _s3(), f"{bucket}/{key}".rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported URI scheme in {uri!r}: use a local path, file:// or s3://")
    return pafs.LocalFileSystem(), os.path.abspath(local_path(uri))


_S3_CACHE: dict[tuple, pafs.S3FileSystem] = {}


def _s3() -> pafs.S3FileSystem:
    # One client per process and per endpoint setting: creating one costs a credentials lookup.
    key = (os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ENDPOINT_URL_S3"), os.environ.get("AWS_PROFILE"))
    if key not in _S3_CACHE:
        fs, _ = pafs.FileSystem.from_uri("s3://placeholder")
        _S3_CACHE[key] = fs
    return _S3_CACHE[key]


def release_clients() -> None:
    """Drop the cached S3 clients, and what still holds them, at exit: an S3 filesystem that outlives
    Arrow's shutdown of the AWS SDK can crash the process as it ends (apache/arrow#38352, #50188),
    turning a run that succeeded into exit code 139. Registered after ``pyarrow.fs`` registers its own
    finaliser, so it runs before it."""
    _S3_CACHE.clear()
    gc.collect()


atexit.register(release_clients)


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URI with ``/``."""
    out = base.rstrip("/")
    for part in parts:
        out = out + "/" + part.strip("/")
    return out


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    FAULTS.point()
    fs, path = filesystem(uri)
    if not is_s3(uri):
        fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_atomic(uri: str, data: bytes | pa.Table) -> None:
    """Write bytes or a table (as Parquet) so that ``uri`` is either absent or complete: the one atomic write.

    An S3 object appears only when its upload completes; a local file is written under a hidden
    name beside its place (no listing or engine reads it) and renamed into place.
    """
    if is_s3(uri):
        if isinstance(data, pa.Table):
            FAULTS.point()
            fs, path = filesystem(uri)
            pq.write_table(data, path, filesystem=fs)
        else:
            write_bytes(uri, data)
        return
    path = os.path.abspath(local_path(uri))
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    FAULTS.point()
    _replace_local(path, os.path.join(folder, f".{name}.tmp-{os.getpid()}-{threading.get_ident()}"), data)


def _replace_local(path: str, tmp: str, data: bytes | pa.Table) -> None:
    """Write ``tmp``, flush it to disk, rename it to ``path`` and flush the rename: after a power loss the
    file is there whole or not at all (a marker never stands beside a truncated data file)."""
    if isinstance(data, pa.Table):
        pq.write_table(data, tmp)
    else:
        with open(tmp, "wb") as f:
            f.write(data)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    FAULTS.point()   # a crash here leaves the hidden temporary, which the next writer sweeps
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_TEMPORARY = re.compile(r"\..+\.tmp-\d+-\d+")


def sweep_temporaries(folder: str) -> int:
    """Delete the hidden temporaries (``.NAME.tmp-PID-THREAD``) that writers killed mid-write left directly
    in a local ``folder``; the count. Only for a folder whose one writer (the lease's holder) is the caller."""
    if is_remote(folder) or not os.path.isdir(local_path(folder)):
        return 0
    stale = [e.path for e in os.scandir(local_path(folder)) if e.is_file() and _TEMPORARY.fullmatch(e.name)]
    for path in stale:
        FAULTS.point()
        os.remove(path)
    return len(stale)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def json_object(raw: bytes | str | None) -> dict[str, Any] | None:
    """A small document mlbatch writes whole (a summary, a plan record, a lease) as a dict, or None when it
    is absent or not a JSON object: cut, or made by something else. Each caller says what that means."""
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:   # JSONDecodeError, and bytes that are not UTF-8
        return None
    return doc if isinstance(doc, dict) else None


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def version(uri: str) -> str:
    """What changes whenever an object is written again, even with the same size: its ETag on S3 (one HEAD),
    its size and modification time (ns) on a local disk."""
    if is_s3(uri):
        bucket, _, key = uri[len("s3://"):].partition("/")
        return "etag:" + s3_client().head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
    st = os.stat(local_path(uri))
    return f"mtime:{st.st_size}:{st.st_mtime_ns}"


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def delete(uri: str) -> None:
    """Delete a file or a whole folder/prefix; absent is fine."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type in (pafs.FileType.Directory, pafs.FileType.File):
        FAULTS.point()
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


@dataclass(frozen=True)
class FileEntry:
    uri: str
    size: int
    mtime_ns: int | None


def _to_uri(original: str, path: str) -> str:
    """Turn a filesystem path back into the same kind of URI the user gave."""
    if is_s3(original):
        return "s3://" + path
    if original.startswith("file://"):
        return "file://" + path
    return path


def list_files(uri: str, suffix: str = "") -> list[FileEntry]:
    """The files named by ``uri``: one file, every file under a folder/prefix, or a glob.

    Sorted by URI so that every caller sees the same order. Hidden and underscore files
    (``_SUCCESS``, ``.crc``) are left out of folder listings, as every Parquet engine does.
    """
    pattern = None
    base = uri
    if any(c in uri for c in _GLOB_CHARS):
        cut = min(uri.find(c) for c in _GLOB_CHARS if c in uri)
        base = uri[: uri.rfind("/", 0, cut) + 1] if "/" in uri[:cut] else "."
        pattern = uri
    fs, path = filesystem(base)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File and pattern is None:
        return [FileEntry(uri, info.size, info.mtime_ns)]
    if info.type == pafs.FileType.NotFound:
        return []
    entries = []
    # allow_not_found: an S3 prefix is only its objects, so it vanishes when its last one is deleted meanwhile
    for item in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)):
        if item.type != pafs.FileType.File:
            continue
        rel = item.path[len(path):].lstrip("/")
        if any(part.startswith(("_", ".")) for part in rel.split("/")):
            continue
        if suffix and not item.path.endswith(suffix):
            continue
        item_uri = _to_uri(base, item.path)
        if pattern is not None and not fnmatch.fnmatchcase(item_uri, _absolute_pattern(pattern)):
            continue
        entries.append(FileEntry(item_uri, item.size, item.mtime_ns))
    return sorted(entries, key=lambda e: e.uri)


def _absolute_pattern(pattern: str) -> str:
    if is_remote(pattern) or pattern.startswith("file://"):
        return pattern
    return os.path.abspath(pattern)


def read_parquet(uri: str) -> pa.Table:
    fs, path = filesystem(uri)
    return pq.read_table(path, filesystem=fs)


def read_parquet_schema(uri: str) -> pa.Schema:
    fs, path = filesystem(uri)
    with fs.open_input_file(path) as f:
        return pq.read_schema(f)


def read_parquet_metadata(uri: str) -> pq.FileMetaData:
    """The footer of a Parquet file (row counts, schema, statistics): a few KiB, never its columns."""
    fs, path = filesystem(uri)
    with fs.open_input_file(path) as f:
        return pq.read_metadata(f)


def write_parquet(table: pa.Table, uri: str) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(uri, buf.getvalue())


# ---- boto3: the S3 client (conditional puts, listings, image reads) and presigned links ----------

@dataclass(frozen=True)
class FetchPolicy:
    """How patient reads are. botocore's "standard" retry mode backs off (with jitter) on
    throttling (503 SlowDown), 5xx answers and dropped connections."""

    max_attempts: int = 6
    connect_timeout: float = 5.0
    read_timeout: float = 20.0
    threads: int = 16


_BOTO_CLIENTS: dict[tuple, object] = {}


def s3_client(policy: FetchPolicy = FetchPolicy()):
    """A boto3 S3 client (one per process and policy); settings come from the AWS environment."""
    import boto3
    from botocore.config import Config

    key = (policy, os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ENDPOINT_URL_S3"))
    if key not in _BOTO_CLIENTS:
        config = Config(retries={"mode": "standard", "max_attempts": policy.max_attempts},
                        connect_timeout=policy.connect_timeout, read_timeout=policy.read_timeout,
                        max_pool_connections=max(10, policy.threads))
        _BOTO_CLIENTS[key] = boto3.session.Session().client("s3", config=config)
    return _BOTO_CLIENTS[key]


def presign(uri: str, expires: int) -> str:
    """An HTTPS URL that reads the S3 object ``uri`` for ``expires`` seconds (SigV4: at most 7 days)."""
    from botocore.config import Config

    bucket, _, key = uri[len("s3://"):].partition("/")
    cache_key = ("presign", os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ENDPOINT_URL_S3"))
    if cache_key not in _BOTO_CLIENTS:   # one signing client per process: presigning is local, no request is made
        import boto3
        _BOTO_CLIENTS[cache_key] = boto3.session.Session().client("s3", config=Config(signature_version="s3v4"))
    return _BOTO_CLIENTS[cache_key].generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                      ExpiresIn=expires)
