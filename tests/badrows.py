"""The bad-input matrix: one manifest of good rows and every kind of row that must end as an error row."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mlbatch.core import storage

SECRET = "SECRET-CONTENT-7f3a9c"
MAX_BYTES = 200_000   # the run's --max-bytes: the matrix's "big" object is over it


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def memory_bomb() -> bytes:
    """A small PNG whose header claims 7500 x 7500 RGBA: under the pixel limit, over the decode budget."""
    header = struct.pack(">IIBBBBB", 7500, 7500, 8, 6, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


def bad_input_manifest(tmp_path: Path, bucket: str, good_manifest: str, good: int = 4) -> tuple[str, dict, list]:
    """A manifest of ``good`` readable rows and the matrix; (its path, id -> (URI, the error's start), good ids).

    Local: a named pipe, /dev/zero, /dev/stdin, a folder, a secret text file, a half JPEG. On S3: an object
    over ``MAX_BYTES``, a decode-memory bomb, a missing key, HTML, an empty object. And a null URI and an
    unsupported scheme.
    """
    rows = pq.read_table(good_manifest).slice(0, good).select(["id", "image_uri"]).to_pylist()
    jpeg = Path(rows[0]["image_uri"]).read_bytes()
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    (tmp_path / "folder.jpg").mkdir()
    secret = tmp_path / "notes.jpg"
    secret.write_text(f"password file {SECRET}\n")
    (tmp_path / "half.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    storage.write_bytes(f"{bucket}/big.jpg", b"\1" * (MAX_BYTES + 100_000))
    storage.write_bytes(f"{bucket}/bomb.png", memory_bomb())
    storage.write_bytes(f"{bucket}/junk.jpg", b"<html>this is not an image</html>")
    storage.write_bytes(f"{bucket}/empty.jpg", b"")
    bad = {"pipe": (str(fifo), "not an object: a named pipe"),
           "zero": ("/dev/zero", "not an object: a character device"),
           "stdin": ("/dev/stdin", "not an object: "),
           "folder": (str(tmp_path / "folder.jpg"), "not an object: a folder"),
           "secret": (str(secret), "not an image"),
           "half": (str(tmp_path / "half.jpg"), "corrupt or truncated image"),
           "big": (f"{bucket}/big.jpg", f"object too large: {MAX_BYTES + 100_000} bytes, over the limit of {MAX_BYTES}"),
           "bomb": (f"{bucket}/bomb.png", "image too large to decode: 7500x7500 RGBA"),
           "missing": (f"{bucket}/nope.jpg", "object not found"),
           "junk": (f"{bucket}/junk.jpg", "not an image"),
           "empty": (f"{bucket}/empty.jpg", "empty object"),
           "null": (None, "null or empty image URI"),
           "scheme": ("ftp://example.com/a.jpg", "unsupported URI scheme 'ftp'")}
    manifest = str(tmp_path / "bad-inputs.parquet")
    pq.write_table(pa.Table.from_pylist(rows + [{"id": k, "image_uri": uri} for k, (uri, _) in bad.items()],
                                        schema=pa.schema([("id", pa.string()), ("image_uri", pa.string())])), manifest)
    return manifest, bad, [r["id"] for r in rows]
