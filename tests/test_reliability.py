"""Reliability (issue #5): bad input, storage faults, process faults and security. Nothing is lost.

Every job here runs on the session's token-auth Ray cluster (tests/conftest.py) with moto's S3
server; storage faults come from tests/faultproxy.py placed between the job and moto. Every
fault schedule is seeded, and every test checks rows in == rows out, each id exactly once.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import os
import pathlib
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image, ImageOps

from faultproxy import KINDS, FaultProxy
from procs import kill_when
from mlbatch.core import fetch, storage
from mlbatch.label import JobError, LabelConfig, label
from mlbatch.core.manifest import ManifestError
from mlbatch.model.loaded import load_model
from mlbatch.model.net import MultiLabelNet, save_package
from mlbatch.model.spec import ModelSpec
from mlbatch.model.weights import load_backbone_weights, read_initial_weights, read_state_dict
from mlbatch.model.package import PackageError
from mlbatch.synth import SynthConfig, make_dataset, render_frame

REPO = Path(__file__).resolve().parents[1]
LABELS = ["car", "bus", "pedestrian"]
PROBS = [f"prob_{x}" for x in LABELS]


def _config(**kw) -> LabelConfig:
    """A run on the Ray engine (the session's cluster), unless the test names another."""
    return LabelConfig(**{"engine": "ray", "progress": False, **kw})


def _read_output(uri: str) -> pa.Table:
    files = [e.uri for e in storage.list_files(uri, suffix=".parquet")]
    assert files, f"no output files under {uri}"
    return pa.concat_tables([storage.read_parquet(f) for f in files])


def _copy_package(src: str, dst: str) -> str:
    for name in ("model.safetensors", "mlbatch-model.json"):
        storage.write_bytes(storage.join(dst, name), storage.read_bytes(storage.join(src, name)))
    return dst


def _assert_same_output(got: pa.Table, want: pa.Table, key: str = "id") -> None:
    """Same rows, same values in every column but the timestamp; probabilities to 1e-6."""
    assert got.num_rows == want.num_rows
    assert len(set(got.column(key).to_pylist())) == got.num_rows, "a row was written twice"
    assert got.schema.remove_metadata() == want.schema.remove_metadata()
    got, want = got.sort_by(key).drop_columns(["labeled_at"]), want.sort_by(key).drop_columns(["labeled_at"])
    for name in got.column_names:
        if name in PROBS:
            np.testing.assert_allclose(got.column(name).to_numpy(zero_copy_only=False),
                                       want.column(name).to_numpy(zero_copy_only=False), rtol=0, atol=1e-6)
        else:
            assert got.column(name).equals(want.column(name)), name


@contextlib.contextmanager
def _no_compute(monkeypatch):
    """Fail the test if a job builds its pipeline: it must stop before any compute is spent."""
    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline was started")
    with monkeypatch.context() as m:
        m.setattr(ray.data, "ActorPoolStrategy", refuse)  # the predictors: only the labeling pipeline has them
        yield


# ---- 1. bad input: error rows with precise messages, odd but valid images labeled ------------

def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + _png_chunk(b"IEND", b""))


def _on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def _bad_input_cases(root: Path, bucket: str, size: int) -> tuple[list[dict], dict[str, str], dict[str, Image.Image]]:
    """Rows for the manifest, the expected error of each bad row, the expected picture of each odd one
    (for a model of input side ``size``)."""
    scene = Image.open(io.BytesIO(render_frame(5, 0, 128, 96))).convert("RGB")
    jpeg, png = _encode(scene, "JPEG", quality=90), _encode(scene, "PNG")
    alpha = Image.linear_gradient("L").resize(scene.size)
    rgba = scene.copy()
    rgba.putalpha(alpha)
    la = scene.convert("L")
    la.putalpha(alpha)
    gray16 = Image.fromarray(np.asarray(scene.convert("L"), np.uint16) * 16)  # 12-bit values in 16 bits
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    frames = [Image.new("RGB", (64, 48), c) for c in [(230, 20, 20), (20, 230, 20), (20, 20, 230)]]
    bad_jpeg_header = bytearray(jpeg)
    at = bad_jpeg_header.find(b"\xff\xc4")
    bad_jpeg_header[at + 4:at + 40] = b"\xff" * 36  # the Huffman table
    bad_png_data = bytearray(png)
    at = bad_png_data.find(b"IDAT")
    bad_png_data[at + 10:at + 30] = b"\0" * 20

    def animated(fmt: str, **kw) -> bytes:
        return _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)

    objects = {  # name -> bytes; "s3:" names go to the bucket, the rest to the local folder
        "s3:empty.jpg": b"",
        "s3:junk.jpg": b"<html><body>this is not an image</body></html>",
        "s3:truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": png[: len(png) // 2],
        "s3:corrupt-header.jpg": bytes(bad_jpeg_header),
        "corrupt-data.png": bytes(bad_png_data),
        "s3:bomb.png": _bomb_png(100_000, 100_000),
        "over-limit.png": _encode(Image.new("RGB", (300, 300), (90, 120, 40)), "PNG"),
        "s3:gray.png": _encode(scene.convert("L"), "PNG"),
        "s3:palette.png": _encode(scene.convert("P"), "PNG"),
        "rgba.png": _encode(rgba, "PNG"),
        "s3:gray-alpha.png": _encode(la, "PNG"),
        "s3:cmyk.jpg": _encode(scene.convert("CMYK"), "JPEG", quality=95),
        "gray16.png": _encode(gray16, "PNG"),
        "s3:bilevel.png": _encode(scene.convert("1"), "PNG"),
        "one-pixel.png": _encode(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"),
        "s3:exif-rotated.jpg": _encode(scene, "JPEG", quality=90, exif=exif.tobytes()),
        "s3:animated.gif": animated("GIF"),
        "animated.webp": animated("WEBP", lossless=True),
        "odd dir/naïve ünï 写真 #1.jpg": jpeg,
        "s3:odd dir/naïve ünï 写真 #1+2%20?.jpg": jpeg,
    }
    uris = {}
    for name, data in objects.items():
        if name.startswith("s3:"):
            uris[name] = f"{bucket}/img/{name[3:]}"
            storage.write_bytes(uris[name], data)
        else:
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            uris[name] = str(path)
    (root / "a-folder.jpg").mkdir()

    def opened(name: str) -> Image.Image:
        return Image.open(io.BytesIO(objects[name]))

    def drafted(name: str) -> Image.Image:
        # the decode contract: a JPEG decodes at the smallest of 1/2..1/8 scale that still covers
        # the model's input, which is what PIL's draft gives
        img = opened(name)
        img.draft("RGB", (size, size))
        return img

    errors = {  # id -> (uri, the error it must get)
        "missing-s3": (f"{bucket}/img/nope.jpg", "object not found"),
        "missing-local": (str(root / "nope.jpg"), "object not found"),
        "missing-bucket": ("s3://mlbatch-no-such-bucket/a.jpg", "bucket not found: mlbatch-no-such-bucket"),
        "empty": (uris["s3:empty.jpg"], "empty object (0 bytes)"),
        "not-an-image": (uris["s3:junk.jpg"], "not an image (unrecognised format)"),
        "truncated-jpeg": (uris["s3:truncated.jpg"], "corrupt or truncated image (JPEG): image file is truncated"),
        "truncated-png": (uris["truncated.png"], "corrupt or truncated image (PNG): image file is truncated"),
        "corrupt-jpeg": (uris["s3:corrupt-header.jpg"],
                         "corrupt or truncated image: a JPEG file whose header cannot be read"),
        "corrupt-png": (uris["corrupt-data.png"], "corrupt or truncated image (PNG): broken data stream"),
        "bomb-header": (uris["s3:bomb.png"], "image too large: "),
        "over-limit": (uris["over-limit.png"], "image too large: 300x300 exceeds the limit of 50000 pixels"),
        "uri-null": (None, "null or empty image URI"),
        "uri-empty": ("", "null or empty image URI"),
        "uri-blank": ("   ", "null or empty image URI"),
        "scheme-ftp": ("ftp://example.com/a.jpg", "unsupported URI scheme 'ftp'"),
        "scheme-http": ("https://example.com/a.jpg", "unsupported URI scheme 'https'"),
        "scheme-gs": ("gs://bucket/a.jpg", "unsupported URI scheme 'gs'"),
        "s3-no-key": (f"{bucket}", "malformed S3 URI: expected s3://bucket/key"),
        "a-folder": (str(root / "a-folder.jpg"), "not an object: a folder"),
    }
    gray16_arr = np.asarray(opened("gray16.png"), np.float64)
    valid = {  # id -> (uri, the picture a person sees, decoded here without mlbatch.images)
        "gray": (uris["s3:gray.png"], opened("s3:gray.png").convert("RGB")),
        "palette": (uris["s3:palette.png"], opened("s3:palette.png").convert("RGB")),
        "rgba": (uris["rgba.png"], _on_white(opened("rgba.png"))),
        "gray-alpha": (uris["s3:gray-alpha.png"], _on_white(opened("s3:gray-alpha.png"))),
        "cmyk": (uris["s3:cmyk.jpg"], drafted("s3:cmyk.jpg").convert("RGB")),
        "gray16": (uris["gray16.png"],
                   Image.fromarray((gray16_arr * (255.0 / gray16_arr.max())).astype(np.uint8)).convert("RGB")),
        "bilevel": (uris["s3:bilevel.png"], opened("s3:bilevel.png").convert("RGB")),
        "one-pixel": (uris["one-pixel.png"], opened("one-pixel.png").convert("RGB")),
        "exif-rotated": (uris["s3:exif-rotated.jpg"], ImageOps.exif_transpose(drafted("s3:exif-rotated.jpg"))),
        "animated-gif": (uris["s3:animated.gif"], opened("s3:animated.gif").convert("RGB")),  # frame 0
        "animated-webp": (uris["animated.webp"], opened("animated.webp").convert("RGB")),
        "odd-local-path": (uris["odd dir/naïve ünï 写真 #1.jpg"], scene_from(jpeg, size)),
        "odd-file-uri": ("file://" + quote(uris["odd dir/naïve ünï 写真 #1.jpg"]), scene_from(jpeg, size)),
        "odd-s3-key": (uris["s3:odd dir/naïve ünï 写真 #1+2%20?.jpg"], scene_from(jpeg, size)),
    }
    assert opened("s3:gray.png").mode == "L" and opened("s3:palette.png").mode == "P"
    assert opened("rgba.png").mode == "RGBA" and opened("s3:gray-alpha.png").mode == "LA"
    assert opened("s3:cmyk.jpg").mode == "CMYK" and opened("gray16.png").mode.startswith("I;16")
    assert opened("s3:animated.gif").n_frames == 3 and opened("animated.webp").n_frames == 3
    rows = [{"id": k, "image_uri": v[0]} for k, v in {**errors, **valid}.items()]
    stored = np.asarray(drafted("s3:exif-rotated.jpg").convert("RGB"))   # the pixels as stored, no EXIF left
    extra = {"rotated-raw": Image.fromarray(stored), "last-frame": frames[-1]}
    return rows, {k: v[1] for k, v in errors.items()}, {**{k: v[1] for k, v in valid.items()}, **extra}


def scene_from(data: bytes, size: int) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (size, size))  # the decode contract for JPEGs, as in _bad_input_cases
    return img.convert("RGB")


@pytest.mark.parametrize("layout,decode", [("fused", "pil"), ("split", "pil"), ("fused", "torchvision"),
                                           ("split", "torchvision")])
def test_bad_input_becomes_error_rows_and_odd_images_are_labeled(ray_cluster, bucket, tmp_path, small_dataset,
                                                                 small_model, layout, decode):
    """Both layouts (fused: one actor fetches, decodes and predicts; split: decode tasks feed predictor
    actors) turn the same bad inputs into the same error rows and give `predict`'s probabilities. The split
    layout's decode tasks take 3 images and its predictors 8, so a prediction batch is cut from several
    decoded blocks (its pixels a view of each Arrow buffer, at an offset).

    ``--decode torchvision`` (the predictor decodes JPEGs itself, on CPU here) gives the same error rows;
    what it hands to PIL (other formats, CMYK, EXIF-rotated) gets `predict`'s probabilities exactly,
    and plain JPEGs, decoded at full size and resized by torch, come within 0.02."""
    good = storage.read_parquet(small_dataset["test"]).slice(0, 10).select(["id", "image_uri"])
    cases, errors, pictures = _bad_input_cases(tmp_path / "img", bucket, load_model(small_model).spec.image_size)
    rows = good.to_pylist() + cases
    storage.write_parquet(pa.Table.from_pylist(rows, schema=good.schema), f"{bucket}/manifests/bad.parquet")

    summary = label(_config(manifests=[f"{bucket}/manifests/bad.parquet"], model=small_model, output=f"{bucket}/out",
                            id_column="id", batch_size=8, decode_batch_size=3, max_error_rate=1.0,
                            max_pixels=50_000, layout=layout, decode=decode))
    assert summary["predictor"]["layout"] == layout and summary["predictor"]["decode"] == decode
    out = _read_output(f"{bucket}/out")
    ids = out.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == len(rows) == summary["rows_in"] == summary["rows_out"]
    assert summary["errors"] == len(errors) and summary["ok"] == len(rows) - len(errors)
    by_id = {r["id"]: r for r in out.to_pylist()}
    for key, message in errors.items():
        row = by_id[key]
        assert row["status"] == "error" and row["error"].startswith(message), (key, row["error"])
        assert row["labels"] is None and all(row[f"label_{x}"] is None and row[f"prob_{x}"] is None for x in LABELS)

    model = load_model(small_model)
    odd = [k for k in pictures if k in by_id]
    for key in [r["id"] for r in good.to_pylist()] + odd:
        assert by_id[key]["status"] == "ok" and by_id[key]["error"] is None, (key, by_id[key]["error"])
    got = np.asarray([[by_id[k][p] for p in PROBS] for k in odd], np.float32)
    expected = model.predict([pictures[k] for k in odd])
    plain_jpeg = {"odd-local-path", "odd-file-uri", "odd-s3-key"}
    for k, g, e in zip(odd, got, expected):
        np.testing.assert_allclose(g, e, atol=0.02 if decode == "torchvision" and k in plain_jpeg else 1e-5,
                                   err_msg=k)
    good_ids = [r["id"] for r in good.to_pylist()]
    good_got = np.asarray([[by_id[k][p] for p in PROBS] for k in good_ids], np.float32)
    good_expected = model.predict([Image.open(u) for u in good.column("image_uri").to_pylist()])  # local JPEGs
    if decode == "pil":
        np.testing.assert_allclose(good_got, good_expected, atol=1e-5)
    else:  # not the same pixels, close ones; and not vacuous: the full-size decode moves some probability
        np.testing.assert_allclose(good_got, good_expected, atol=0.02)
        assert not np.allclose(good_got, good_expected, atol=1e-6)
    # the cases are not vacuous: orientation and the choice of frame change the prediction
    raw, last = model.predict([pictures["rotated-raw"], pictures["last-frame"]])
    assert not np.allclose(got[odd.index("exif-rotated")], raw, atol=1e-4)
    assert not np.allclose(got[odd.index("animated-gif")], last, atol=1e-4)
    assert summary["arguments"]["max_pixels"] == 50_000


def test_manifest_level_problems_have_clear_outcomes(ray_cluster, monkeypatch, tmp_path, small_dataset, small_model):
    out = str(tmp_path / "out")
    uris = storage.read_parquet(small_dataset["test"]).column("image_uri").to_pylist()[:4]

    def write(name: str, table: pa.Table) -> str:
        pq.write_table(table, tmp_path / name)
        return str(tmp_path / name)

    (tmp_path / "text.parquet").write_text("id,image_uri\n1,a.jpg\n")  # a CSV under a Parquet name

    failing = [
        ([write("no-uri.parquet", pa.table({"id": ["a"], "path": [uris[0]]}))], {},
         ManifestError, r"no-uri.parquet: no 'image_uri' column \(columns: id, path\)"),
        ([write("int-uri.parquet", pa.table({"image_uri": [1, 2]}))], {},
         ManifestError, r"int-uri.parquet: column 'image_uri' must be string, found int64"),
        ([str(tmp_path / "text.parquet")], {},
         ManifestError, r"text.parquet: not a readable Parquet file"),
        ([write("empty.parquet", pa.table({"image_uri": pa.array([], pa.string())}))], {},
         ManifestError, r"empty.parquet: has no rows"),
        ([str(tmp_path / "nothing-here")], {}, ManifestError, r"no such file, or no files under that folder"),
        ([write("dup.parquet", pa.table({"id": ["x", "y", "x"], "image_uri": uris[:3]}))], {"id_column": "id"},
         ManifestError, r"dup.parquet: row 2: id 'x' already appears at .*dup.parquet row 0; ids must be unique"),
        ([write("null-id.parquet", pa.table({"id": ["x", None], "image_uri": uris[:2]}))], {"id_column": "id"},
         ManifestError, r"null-id.parquet: row 1: id column 'id' is null"),
        ([write("no-id.parquet", pa.table({"image_uri": uris[:2]}))], {"id_column": "id"},
         ManifestError, r"no-id.parquet: no id column 'id' \(columns: image_uri\)"),
    ]
    for manifests, extra, error, message in failing:
        with _no_compute(monkeypatch), pytest.raises(error, match=message):
            label(_config(manifests=manifests, model=small_model, output=out, **extra))
    assert not list((tmp_path / "out").glob("*.parquet"))  # (the writability probe may leave the folder)

    # duplicate image URIs without an id column: labeled once per row, each row known by its position;
    # such a run resumes like any other (it used to refuse: Ray's checkpoint needed a unique key)
    write("dup-uri.parquet", pa.table({"image_uri": [uris[0], uris[0]]}))
    summary = label(_config(manifests=[str(tmp_path / "dup-uri.parquet")], model=small_model, output=out, resume=True))
    table = _read_output(out)
    assert summary["rows_out"] == table.num_rows == 2 and summary["ok"] == 2
    assert table.column("image_uri").to_pylist() == [uris[0], uris[0]]
    assert table.column("source_row").to_pylist() == [0, 1]
    # the same picture: the same probability, to float rounding (channels-last kernels may round the two
    # positions of one batch differently, in the last bit)
    assert table.column("prob_car")[0].as_py() == pytest.approx(table.column("prob_car")[1].as_py(), abs=1e-6)


# ---- 2. storage faults ---------------------------------------------------------------------

@contextlib.contextmanager
def _job_env(ray_cluster, monkeypatch, **env):
    """Run this block's jobs as a new job of the session cluster whose workers, and this driver, see ``env``."""
    ray.shutdown()
    try:
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            ray.init(address=ray_cluster.gcs_address, runtime_env={"env_vars": env}, logging_level="WARNING",
                     log_to_driver=False)
            yield
    finally:
        ray.shutdown()
        ray.init(address=ray_cluster.gcs_address, logging_level="WARNING", log_to_driver=False)


def test_transient_storage_faults_lose_nothing(ray_cluster, monkeypatch, bucket, s3_endpoint, small_model):
    """20% of S3 requests throttled, failed, reset or slowed: every row labeled, output as a clean run's."""
    data = make_dataset(f"{bucket}/data", SynthConfig(train=0, val=0, test=64, seed=41))
    model = _copy_package(small_model, f"{bucket}/model")
    common = dict(manifests=[data["test"]], model=model, id_column="id", batch_size=8, rows_per_unit=16,
                  run_id="faults", max_error_rate=0.0)
    clean = label(_config(output=f"{bucket}/clean", **common))
    assert clean["ok"] == 64

    with FaultProxy(s3_endpoint, seed=5, rate=0.2) as proxy:
        with _job_env(ray_cluster, monkeypatch, AWS_ENDPOINT_URL=proxy.url):
            started = time.monotonic()
            faulted = label(_config(output=f"{bucket}/faulted", **common))
            seconds = time.monotonic() - started
        stats, log = dict(proxy.stats), list(proxy.log)
    print(f"fault run: {seconds:.1f}s, {stats}")
    assert faulted["rows_out"] == faulted["ok"] == 64 and faulted["errors"] == 0
    _assert_same_output(_read_output(f"{bucket}/faulted"), _read_output(f"{bucket}/clean"))
    # the schedule is a seeded function of each request, and requests carry per-run uuids, so the
    # realised share varies around the 20% asked for: bound it loosely, but it must be substantial
    assert stats["requests"] >= 150 and 0.10 <= proxy.faulted / stats["requests"] <= 0.30, stats
    assert all(stats[kind] > 0 for kind in KINDS), stats
    # every path of the job went through the proxy: the plan, Ray's reads, fetches, the model, writes
    root = "/" + bucket[len("s3://"):]
    seen = {(m, p.split("?")[0]) for m, p, f in log}
    hit = {(m, p.split("?")[0]) for m, p, f in log if f != "ok"}
    assert any(p == f"{root}/data/test.parquet" for m, p in seen)                    # manifest
    assert any(p.startswith(f"{root}/model/") for m, p in seen)                      # model package
    assert sum(p.startswith(f"{root}/data/images/") for m, p in hit) >= 5            # fetch.fetch (~13 of 64)
    assert any(m in ("PUT", "POST") and p.startswith(f"{root}/faulted/") for m, p in hit)  # output
    assert storage.exists(f"{bucket}/faulted/_SUCCESS")


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_unreachable_store_fails_fast_with_a_clear_error(ray_cluster, monkeypatch, bucket, tmp_path, small_dataset,
                                                        small_model):
    data = make_dataset(f"{bucket}/data", SynthConfig(train=0, val=0, test=4, seed=42))
    model = _copy_package(small_model, f"{bucket}/model")
    local = small_dataset["test"]
    cases = [  # what is on the unreachable store -> the error
        (dict(manifests=[data["test"]], model=small_model, output=str(tmp_path / "a")),
         ManifestError, r"cannot list it: .*NETWORK_CONNECTION"),
        (dict(manifests=[local], model=model, output=str(tmp_path / "b")),
         JobError, r"model package s3://.*/model: cannot read mlbatch-model.json: .*NETWORK_CONNECTION"),
        (dict(manifests=[local], model=small_model, output=f"{bucket}/out"),
         JobError, r"output s3://.*/out is not writable: .*NETWORK_CONNECTION"),
    ]
    monkeypatch.setenv("AWS_ENDPOINT_URL", _closed_port())
    for kw, error, message in cases:
        started = time.monotonic()
        with _no_compute(monkeypatch), pytest.raises(error, match=message):
            label(_config(**kw))
        assert time.monotonic() - started < 60
    # an image on the unreachable store: an error row after the fetch policy's attempts, not a hang
    started = time.monotonic()
    with pytest.raises(fetch.FetchError, match=r"cannot reach the object store after 3 attempts"):
        fetch.fetch(f"{bucket}/data/images/test/test-000000.jpg", storage.FetchPolicy(max_attempts=3))
    assert time.monotonic() - started < 30


# ---- 3. process faults and unwritable outputs ----------------------------------------------

KILL_ROWS = 400


@pytest.fixture(scope="module")
def kill_data(tmp_path_factory) -> str:
    return make_dataset(str(tmp_path_factory.mktemp("kill")), SynthConfig(train=0, val=0, test=KILL_ROWS, seed=21))["test"]


@pytest.fixture(scope="module")
def kill_baseline(ray_cluster, kill_data, small_model, tmp_path_factory) -> pa.Table:
    """A clean run of the kill tests' data, with the run id they use."""
    out = str(tmp_path_factory.mktemp("kill-clean") / "out")
    label(_config(manifests=[kill_data], model=small_model, output=out, id_column="id", batch_size=8,
                  rows_per_unit=16, run_id="kill"))
    return _read_output(out)


def test_a_killed_predictor_actor_is_replaced_and_no_row_is_lost(ray_cluster, tmp_path, kill_data, kill_baseline,
                                                                small_model):
    from ray.util.state import list_actors

    out = tmp_path / "out"
    job_id = ray.get_runtime_context().get_job_id()
    killed: dict = {}
    done = threading.Event()

    def killer() -> None:
        # kill the predictor part way: once it has written a file, or has been working for 2 s
        deadline = time.monotonic() + 240
        alive_since = None
        while not done.is_set() and time.monotonic() < deadline:
            actors = [a for a in list_actors(address=ray_cluster.dashboard_url, detail=True, limit=1000,
                                             filters=[("state", "=", "ALIVE")])
                      if ("Predictor" in a.class_name or "UnitLabeler" in a.class_name) and a.job_id == job_id]
            if actors:
                alive_since = alive_since or time.monotonic()
                files = list(out.glob("*.parquet"))
                if files or time.monotonic() - alive_since > 2.0:
                    os.kill(actors[0].pid, signal.SIGKILL)
                    killed.update(actor_id=actors[0].actor_id, pid=actors[0].pid, files=len(files))
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        summary = label(_config(manifests=[kill_data], model=small_model, output=str(out), id_column="id",
                                batch_size=8, rows_per_unit=16, run_id="kill", concurrency=1))
    finally:
        done.set()
        thread.join(timeout=30)
    assert killed, "the predictor actor was not killed"
    assert len(list(out.glob("*.parquet"))) > killed["files"], "the run did not go on after the kill"
    [actor] = list_actors(address=ray_cluster.dashboard_url, detail=True, filters=[("actor_id", "=", killed["actor_id"])])
    assert actor.num_restarts >= 1 and actor.pid != killed["pid"]
    assert summary["rows_out"] == summary["ok"] == KILL_ROWS and summary["attempts"] == 1
    _assert_same_output(_read_output(str(out)), kill_baseline)


def _markers(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "_units" / "kill").glob("[!_]*.json"))]


def _wait_until_quiet(folder: pathlib.Path, quiet: float = 1.5, limit: float = 60) -> None:
    """Return once nothing under ``folder`` has changed (names and sizes) for ``quiet`` seconds."""
    def listing() -> set:
        found = set()
        for p in folder.rglob("*"):
            with contextlib.suppress(FileNotFoundError):   # a temporary renamed meanwhile
                found.add((str(p), p.stat().st_size))
        return found

    deadline, seen, since = time.monotonic() + limit, listing(), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, f"{folder} still changes after {limit} s"
        time.sleep(0.1)
        now = listing()
        if now != seen:
            seen, since = now, time.monotonic()


@pytest.mark.parametrize("point", ["before-the-first-write", "during-writes", "after-the-last-file"])
def test_a_killed_driver_resumes_to_the_clean_output(ray_cluster, tmp_path, kill_data, kill_baseline, small_model,
                                                     point):
    """Killed at each point of a run, with no --id-column (rows are known by position): one --resume, nothing lost
    or doubled. Writes torn by the kill are planted too: a hidden half-written local file, and a whole data file
    whose commit marker was never written."""
    out = tmp_path / "out"
    env = {**os.environ, **ray_cluster.env, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "mlbatch.cli", "label", "--manifest", kill_data, "--model", small_model,
            "--output", str(out), "--batch-size", "8", "--rows-per-unit", "16", "--run-id", "kill"]
    if point == "after-the-last-file":
        # every file and marker written, then killed before _run.json and _SUCCESS: the same state as a kill there
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        (out / "_SUCCESS").unlink()
        (out / "_run.json").unlink()
    else:
        kill_when(args, env, lambda: (out / "_units" / "kill" / "_plan.json").exists()
                  if point == "before-the-first-write" else len(list(out.glob("*.parquet"))) >= 3, poll=0.05)
        _wait_until_quiet(out)   # Ray ends the killed driver's workers: until then they may still commit
        files = sorted(out.glob("*.parquet"))
        assert not (out / "_SUCCESS").exists()
        if point == "before-the-first-write":
            assert not files and not _markers(out)
        else:
            committed = {m["unit"] for m in _markers(out)}
            assert files and len(committed) < KILL_ROWS // 16
            free = next(f"f000000-r{k * 16:012d}" for k in range(KILL_ROWS // 16) if f"f000000-r{k * 16:012d}" not in committed)
            torn = out / f".kill-a000-{free}-r{int(free[-12:]):012d}.parquet.tmp-1"
            torn.write_bytes(files[0].read_bytes()[:100])      # a local write cut short: no footer, hidden name
            (out / f"kill-a000-{free}-r{int(free[-12:]):012d}.parquet").write_bytes(files[0].read_bytes())  # no marker
    resumed = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = json.loads((out / "_run.json").read_text())
    assert summary["rows_out"] == KILL_ROWS and summary["attempts"] == 2 and (out / "_SUCCESS").exists()
    table = _read_output(str(out))
    assert sorted(table.column("source_row").to_pylist()) == list(range(KILL_ROWS))
    _assert_same_output(table, kill_baseline)
    # the summary is the markers added up, and says what the output says
    assert sum(m["rows"] for m in _markers(out)) == KILL_ROWS
    assert summary["ok"] == table.filter(pa.compute.equal(table.column("status"), "ok")).num_rows
    assert summary["labels"]["car"]["positive_rate"] == pytest.approx(
        pa.compute.mean(pa.compute.cast(table.column("label_car"), pa.float64())).as_py(), abs=1e-6)
    if point == "after-the-last-file":
        assert "0 of" not in resumed.stderr and summary["files"] == len(list(out.glob("*.parquet")))


def test_a_stalled_run_ends_with_a_message_naming_what_it_waits_for(ray_cluster, tmp_path, kill_data, small_model):
    """More predictor actors than the cluster has CPUs for, and nothing left for decoding: no row can be
    committed. The run ends after --stall-seconds, says what it waits for, and a --resume with room finishes it."""
    out = str(tmp_path / "out")
    # the split layout: its decode tasks are what the predictors leave no room for
    common = dict(manifests=[kill_data], model=small_model, output=out, batch_size=8, rows_per_unit=16,
                  run_id="stall", layout="split")
    started = time.monotonic()
    with pytest.raises(JobError) as raised:
        label(_config(concurrency=8, stall_seconds=15, **common))
    message = str(raised.value)
    print(message)
    assert time.monotonic() - started < 120
    assert "no rows committed for 15 s (--stall-seconds); 0 of 400 rows committed" in message, message
    assert "free on the cluster: CPU" in message and "waiting for:" in message and "--resume" in message
    assert "Predictor" in message, message
    summary = label(_config(concurrency=1, resume=True, **common))
    assert summary["rows_out"] == KILL_ROWS and summary["ok"] == KILL_ROWS


def test_an_unwritable_output_fails_before_any_compute(ray_cluster, monkeypatch, bucket, s3_endpoint, tmp_path,
                                                      small_dataset, small_model):
    common = dict(manifests=[small_dataset["test"]], model=small_model)
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    # root ignores permissions: then a place nobody can create folders in stands for the read-only one
    local = str(readonly / "out") if not os.access(readonly, os.W_OK) else "/proc/mlbatch-readonly/out"
    cases = [(local, r"is not writable: .*(Permission denied|No such file)"),
             (str(Path(small_dataset["test"]) / "out"), r"is not writable"),  # under a file
             ("s3://mlbatch-no-such-bucket/out", r"s3://mlbatch-no-such-bucket/out is not writable")]
    for output, message in cases:
        started = time.monotonic()
        with _no_compute(monkeypatch), pytest.raises(JobError, match=message):
            label(_config(output=output, **common))
        assert time.monotonic() - started < 30
    # a bucket whose policy denies writes (the proxy answers 403 AccessDenied to every write)
    with FaultProxy(s3_endpoint, rate=0.0, deny_writes=True) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        with _no_compute(monkeypatch), pytest.raises(JobError, match=r"/out is not writable: .*ACCESS_DENIED"):
            label(_config(output=f"{bucket}/out", **common))
        assert proxy.stats["denied"] >= 1
    readonly.chmod(0o755)


# ---- 4. security -----------------------------------------------------------------------------

class _Exploit:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_foreign_checkpoints_are_read_without_unpickling_code(tmp_path):
    marker = tmp_path / "PWNED"
    _Exploit.marker = str(marker)
    net = MultiLabelNet(ModelSpec(labels=LABELS, image_size=32))
    torch.save({"conv.weight": torch.zeros(2), "x": _Exploit()}, tmp_path / "evil.pt")
    (tmp_path / "evil.pth").write_bytes(pickle.dumps(_Exploit()))
    for name in ("evil.pt", "evil.pth"):
        with pytest.raises(PackageError, match=r"refused, not a plain PyTorch state dict \(read with weights_only"):
            load_backbone_weights(net, read_initial_weights(str(tmp_path / name)))
    # a package whose weights file is a pickle with a matching digest: safetensors never unpickles it
    save_package(net, str(tmp_path / "pkg"), thresholds={x: 0.5 for x in LABELS})
    evil = pickle.dumps(_Exploit())
    meta = json.loads((tmp_path / "pkg" / "mlbatch-model.json").read_text())
    meta["weights"]["sha256"] = hashlib.sha256(evil).hexdigest()
    (tmp_path / "pkg" / "mlbatch-model.json").write_text(json.dumps(meta))
    (tmp_path / "pkg" / "model.safetensors").write_bytes(evil)
    with pytest.raises(PackageError, match="weights do not fit"):
        load_model(str(tmp_path / "pkg"))
    assert not marker.exists(), "unpickling ran code"
    _Exploit.marker = str(tmp_path / "control")
    pickle.loads(pickle.dumps(_Exploit()))  # the control: unpickling it for real does run the payload
    assert (tmp_path / "control").exists()

    # a plain PyTorch state dict of the backbone is accepted (.pt), as is safetensors
    other = MultiLabelNet(ModelSpec(labels=LABELS, image_size=32))
    torch.save(other.backbone.state_dict(), tmp_path / "backbone.pt")
    load_backbone_weights(net, read_initial_weights(str(tmp_path / "backbone.pt")))
    for k, v in other.backbone.state_dict().items():
        assert torch.equal(net.backbone.state_dict()[k], v)
    assert set(read_state_dict(str(tmp_path / "backbone.pt"))) == set(other.backbone.state_dict())


def test_the_code_never_unpickles():
    """No pickle-family module anywhere in mlbatch/ or jobs/, and torch.load only with weights_only=True."""
    unsafe_modules = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
    files = sorted(REPO.glob("mlbatch/**/*.py")) + sorted(REPO.glob("jobs/*.py"))
    assert len(files) > 10
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & unsafe_modules, f"{path}:{node.lineno}"
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in unsafe_modules, f"{path}:{node.lineno}"
            elif isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                assert name not in ("eval", "exec", "yaml.load", "np.load", "numpy.load"), f"{path}:{node.lineno}"
                if name.endswith("torch.load") or name == "load" and "torch" in ast.unparse(node):
                    kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                    assert kw.get("weights_only") == "True", f"{path}:{node.lineno}: torch.load without weights_only=True"


def test_credentials_are_never_logged_or_recorded(bucket, small_dataset, small_model):
    """The local engine, so that every process that reads, decodes, writes and logs holds the secret (a Ray
    cluster's workers would run with the cluster's own credentials, and the scan could not fail)."""
    secret, token = "mlbatchSecretKey0123456789abcdefXYZ", "mlbatchSessionToken9876543210zyx"
    table = storage.read_parquet(small_dataset["test"]).slice(0, 8)
    storage.write_parquet(table, f"{bucket}/m/manifest.parquet")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "AWS_SECRET_ACCESS_KEY": secret, "AWS_SESSION_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([sys.executable, "-m", "mlbatch.cli", "-v", "label", "--manifest", f"{bucket}/m/",
                             "--model", small_model, "--output", f"{bucket}/out", "--id-column", "id",
                             "--engine", "local"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "rows in 8, out 8: 8 ok" in result.stdout
    written = b"".join(storage.read_bytes(e.uri) for e in storage.list_files(f"{bucket}/out"))
    run_json = storage.read_text(f"{bucket}/out/_run.json")
    for value in (secret, token):
        assert value not in result.stdout and value not in result.stderr
        assert value not in run_json and value.encode() not in written


def test_run_ids_and_label_names_never_become_paths(ray_cluster, monkeypatch, tmp_path, small_dataset):
    work = tmp_path / "work"
    out = work / "out"
    labels = ["../../escape", "dir/sub", "..\\win", "Ünïcode ☃ /etc/passwd"]
    net = MultiLabelNet(ModelSpec(labels=labels, image_size=32))
    save_package(net, str(tmp_path / "pkg"), thresholds={x: 0.5 for x in labels})
    common = dict(manifests=[small_dataset["test"]], model=str(tmp_path / "pkg"), output=str(out))
    for run_id in ("../x", "..", "a/b", "/abs", "x/../../y", ".hidden", "a\\b", "x" * 65, "ok\n"):
        with _no_compute(monkeypatch), pytest.raises(JobError, match=r"run id .*nothing that could make a path"):
            label(_config(run_id=run_id, **common))
    assert not work.exists()

    summary = label(_config(**common))
    table = _read_output(str(out))
    assert [n for n in table.column_names if n.startswith(("label_", "prob_"))] == [
        "label_escape", "label_dir_sub", "label_win", "label_n_code_etc_passwd",
        "prob_escape", "prob_dir_sub", "prob_win", "prob_n_code_etc_passwd"]
    assert summary["rows_out"] == 60 and set(summary["labels"]) == set(labels)  # names stay data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg", "work"]
    assert [p.name for p in work.iterdir()] == ["out"]
    # the run's commit markers live in _units/<run_id>/, named by the run id alone
    folders = {out, out / "_units", out / "_units" / summary["run_id"]}
    assert all(p.parent in folders for p in out.rglob("*")), sorted(str(p) for p in out.rglob("*"))


def test_a_dead_decode_helper_costs_speed_never_rows(small_dataset, caplog):
    """The fused layout's decode helpers (plain child processes, no pickle): the same pixels and errors
    as decoding in-process, and a helper that dies is replaced while its share is decoded in threads."""
    from mlbatch.label.decoder import HelperPool
    from mlbatch.label.decoder import decode_uris

    uris = storage.read_parquet(small_dataset["test"]).column("image_uri").to_pylist()[:12]
    uris += ["/no/such/file.jpg", None]
    want = decode_uris(uris, 32, 50_000)
    assert sum(p is None for p, _ in want) == 2
    pool = HelperPool(2)
    try:
        assert pool.decode(uris, 32, 50_000) == want
        dead = pool.helpers[1].proc
        dead.kill()
        dead.wait()
        with caplog.at_level("WARNING", logger="mlbatch.label.decoder"):
            assert pool.decode(uris, 32, 50_000) == want
        assert f"decode helper {dead.pid} failed" in caplog.text
        assert pool.helpers[1].proc.pid != dead.pid and pool.decode(uris, 32, 50_000) == want
    finally:
        pool.close()
    assert all(h.proc.poll() is not None for h in pool.helpers)
