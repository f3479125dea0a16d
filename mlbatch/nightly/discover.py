"""What arrived: the manifests under the input, each with a fingerprint that changes with its content.

A fingerprint is a manifest's size and ETag (S3, from the listing; for a multipart upload the ETag
is not an MD5 but still changes with the content) or, locally, its size and the MD5 of its bytes
(so touching a file is not a change).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

from ..core import storage


@dataclass(frozen=True)
class Manifest:
    uri: str
    size: int
    etag: str
    mtime_ns: int | None

    def fingerprint(self) -> dict[str, Any]:
        return {"size": self.size, "etag": self.etag}


def _path_of(uri: str) -> str:
    return storage.filesystem(uri)[1]


def find_manifests(input_uri: str, output: str, state: dict[str, Any] | None = None) -> list[Manifest]:
    """The ``*.parquet`` files under ``input_uri`` with their fingerprints, sorted; the output's own files left out.

    A local file whose size and mtime are those recorded in ``state`` keeps its recorded MD5
    instead of being read again.
    """
    out_path = _path_of(output).rstrip("/") + "/"
    entries = [e for e in storage.list_files(input_uri, suffix=".parquet")
               if not (_path_of(e.uri) + "/").startswith(out_path)]
    if storage.is_s3(input_uri):
        etags = _s3_etags(input_uri)
        return [Manifest(e.uri, e.size, etags.get(e.uri) or _s3_head_etag(e.uri), e.mtime_ns) for e in entries]
    known = (state or {}).get("manifests", {})
    out = []
    for e in entries:
        uri = _local_uri(e.uri)
        same = [r for r in known.get(uri, {}).values() if r["size"] == e.size and r.get("mtime_ns") == e.mtime_ns]
        out.append(Manifest(uri, e.size, same[0]["etag"] if same else _md5(uri), e.mtime_ns))
    return out


def _local_uri(uri: str) -> str:
    return uri if uri.startswith("file://") else os.path.abspath(uri)


def _s3_etags(input_uri: str) -> dict[str, str]:
    """ETags of every object under the input prefix, from one listing (no request per object)."""
    bucket, _, key = input_uri[len("s3://"):].partition("/")
    cut = [key.find(c) for c in "*?[" if c in key]
    prefix = key[: min(cut)] if cut else (key.rstrip("/") + "/" if key and not key.endswith(".parquet") else key)
    out = {}
    for page in storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[f"s3://{bucket}/{obj['Key']}"] = obj["ETag"].strip('"')
    return out


def _s3_head_etag(uri: str) -> str:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return storage.s3_client().head_object(Bucket=bucket, Key=key)["ETag"].strip('"')


def _md5(uri: str) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(storage.local_path(uri), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
