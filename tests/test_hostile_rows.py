"""Hostile manifest rows (issue 20, item 2): whatever a row points at becomes an error row within seconds.

A named pipe, ``/dev/zero``, ``/dev/stdin``, a folder, an object over ``--max-bytes`` and a picture whose
decode would take more memory than one decode may: each is an error row with its reason, and the run
ends by itself (the stall limit is 900 s; these runs take seconds). A decoder that stalls on an image is
replaced and the image becomes an error row; nothing is decoded in the labeler itself.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlbatch.cli import main
from mlbatch.core import fetch, images, storage
from mlbatch.label import decoder
from mlbatch.review.views import query

from badrows import MAX_BYTES, SECRET, bad_input_manifest, memory_bomb


def test_local_objects_that_are_not_files_are_refused_at_once(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\0" * 5000)
    started = time.monotonic()
    cases = {str(fifo): "not an object: a named pipe", "/dev/zero": "not an object: a character device",
             str(tmp_path): "not an object: a folder",
             str(big): "object too large: 5000 bytes, over the limit of 4096 (--max-bytes)"}
    for uri, message in cases.items():
        with pytest.raises(fetch.FetchError) as caught:
            fetch.fetch(uri, max_bytes=4096)
        assert str(caught.value) == message, uri
    with pytest.raises(fetch.FetchError, match="^not an object: "):
        fetch.fetch("/dev/stdin")
    assert time.monotonic() - started < 5


def test_an_s3_object_over_the_limit_is_not_read(bucket):
    storage.write_bytes(f"{bucket}/big.jpg", b"\1" * 300_000)
    with pytest.raises(fetch.FetchError, match=r"^object too large: 300000 bytes, over the limit of 200000"):
        fetch.fetch(f"{bucket}/big.jpg", max_bytes=200_000)
    assert fetch.fetch(f"{bucket}/big.jpg", max_bytes=300_000) == b"\1" * 300_000


def test_a_decode_that_would_take_too_much_memory_is_an_error():
    with pytest.raises(images.ImageError, match=r"too large to decode: 7500x7500 RGBA needs 225000000 bytes"):
        images.decode(memory_bomb())


def test_a_decoder_that_stalls_is_replaced_and_its_image_becomes_an_error_row(small_dataset, monkeypatch):
    """An S3 endpoint that accepts connections and never answers: the helper fetching from it stalls;
    the pool gives up on it after its reply deadline, and every other image of the batch is decoded."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{hole.getsockname()[1]}")
    monkeypatch.setattr(decoder, "ROUND_SECONDS", 3.0)
    uris = storage.read_parquet(small_dataset["test"]).column("image_uri").to_pylist()[:6]
    want = decoder.decode_uris(uris, 32, 50_000)
    pool = decoder.HelperPool(2)   # started after the endpoint is set: the helpers inherit it
    try:
        started = time.monotonic()
        got = pool.decode([*uris[:3], "s3://stalled/never.jpg", *uris[3:]], 32, 50_000)
        assert time.monotonic() - started < 30
    finally:
        pool.close()
        hole.close()
    assert got[:3] + got[4:] == want
    assert got[3][0] is None and got[3][1].startswith("this image ends or stalls its decoder (decode helper did "
                                                      "not answer within 3 s")


def test_hostile_rows_end_as_error_rows_in_seconds_through_the_cli(ray_cluster, bucket, tmp_path, small_dataset,
                                                                  small_model, capsys, caplog):
    manifest, hostile, good = bad_input_manifest(tmp_path, bucket, small_dataset["test"])
    out = str(tmp_path / "out")
    started = time.monotonic()
    code = main(["label", "--manifest", manifest, "--model", small_model, "--output", out, "--max-bytes", str(MAX_BYTES),
                 "--max-error-rate", "1", "--batch-size", "8", "--concurrency", "1", "--engine", "ray"])
    wall = time.monotonic() - started
    assert code == 0 and wall < 300, wall            # ended by itself, far from the 900 s stall limit
    table = query(out, "SELECT * FROM labels")
    by_id = {r["id"]: r for r in table.to_pylist()}
    assert len(by_id) == len(good) + len(hostile)
    for key, (_, message) in hostile.items():
        assert by_id[key]["status"] == "error" and by_id[key]["error"].startswith(message), (key, by_id[key]["error"])
    assert all(by_id[i]["status"] == "ok" for i in good)
    summary = json.loads(Path(out, "_run.json").read_text())
    assert summary["arguments"]["max_bytes"] == MAX_BYTES and summary["errors"] == len(hostile)
    # nothing from outside the data, and no credential, in the output, the summary or what was printed
    seen = [json.dumps(table.to_pylist(), default=str), Path(out, "_run.json").read_text(),
            *capsys.readouterr(), caplog.text]
    for text in seen:
        assert SECRET not in text and os.environ["AWS_SECRET_ACCESS_KEY"] not in text


def test_local_writes_reach_the_disk_before_their_rename(tmp_path, monkeypatch):
    """fsync of the file, then the rename, then fsync of its folder: after a power loss a marker never
    stands beside a truncated data file, and state.json is never empty."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b)))
    target = tmp_path / "state.json"
    for data in (b"{}", pa.table({"x": [1, 2]})):
        events.clear()
        storage.write_atomic(str(target), data)
        assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
        assert ".state.json.tmp-" in events[0][1] and events[1][1] == str(target) and events[2][1] == str(tmp_path)


def test_temporaries_of_a_writer_killed_mid_write_are_removed_by_the_next_run(ray_cluster, tmp_path, small_dataset,
                                                                             small_model):
    from mlbatch.label import LabelConfig, label

    out = tmp_path / "out"
    out.mkdir()
    left = [out / ".labels-a000-f000000-r000000000000-r000000000000.parquet.tmp-4242-1", out / "._run.json.tmp-9-9"]
    for path in left:
        path.write_bytes(b"half a file")
    keep = out / ".not-ours"
    keep.write_text("someone else's")
    manifest = str(tmp_path / "m.parquet")
    pq.write_table(pq.read_table(small_dataset["test"]).slice(0, 8), manifest)
    label(LabelConfig(manifests=[manifest], model=small_model, output=str(out), batch_size=8, concurrency=1,
                      engine="ray", progress=False))
    assert not any(p.exists() for p in left) and keep.exists()
