"""The synthetic dataset: deterministic, balanced, well-formed, and writable to S3."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mlbatch.core import storage
from mlbatch.synth import LABELS, SynthConfig, draw_scene, make_dataset, render_frame

SMALL = SynthConfig(train=12, val=4, test=4, seed=7)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _manifest_without_paths(uri: str) -> list[dict]:
    rows = pq.read_table(uri).to_pylist()
    for row in rows:
        row["image_uri"] = row["image_uri"].rsplit("/images/", 1)[1]
    return rows


# --- determinism --------------------------------------------------------------

def test_same_seed_gives_identical_bytes(tmp_path):
    make_dataset(str(tmp_path / "a"), SMALL)
    first = _files(tmp_path / "a")
    make_dataset(str(tmp_path / "a"), SMALL)  # regenerate in place: every byte the same
    assert _files(tmp_path / "a") == first

    make_dataset(str(tmp_path / "b"), SMALL)  # elsewhere: same images, same rows
    images = {k: v for k, v in _files(tmp_path / "b").items() if k.endswith(".jpg")}
    assert images == {k: v for k, v in first.items() if k.endswith(".jpg")}
    for split in ("train", "val", "test"):
        assert _manifest_without_paths(str(tmp_path / "a" / f"{split}.parquet")) == _manifest_without_paths(
            str(tmp_path / "b" / f"{split}.parquet")
        )


def test_different_seed_differs(tmp_path):
    make_dataset(str(tmp_path / "a"), SMALL)
    make_dataset(str(tmp_path / "b"), SynthConfig(train=12, val=4, test=4, seed=8))
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a.keys() == b.keys()
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert all(a[k] != b[k] for k in jpgs)
    assert _manifest_without_paths(str(tmp_path / "a" / "train.parquet")) != _manifest_without_paths(
        str(tmp_path / "b" / "train.parquet")
    )


def test_image_depends_only_on_seed_split_index(tmp_path):
    # a bigger split keeps its first images: index i does not depend on the count
    make_dataset(str(tmp_path / "small"), SynthConfig(train=3, val=0, test=0))
    make_dataset(str(tmp_path / "big"), SynthConfig(train=6, val=2, test=0))
    for i in range(3):
        name = f"images/train/train-{i:06d}.jpg"
        assert (tmp_path / "small" / name).read_bytes() == (tmp_path / "big" / name).read_bytes()
    # and the same index in another split is a different scene
    assert (tmp_path / "big/images/val/val-000000.jpg").read_bytes() != (
        tmp_path / "big/images/train/train-000000.jpg"
    ).read_bytes()


def test_render_frame_is_deterministic_jpeg_of_requested_size():
    frame = render_frame(3, 5, 640, 480)
    assert frame == render_frame(3, 5, 640, 480)
    assert frame != render_frame(3, 6, 640, 480)
    img = Image.open(io.BytesIO(frame))
    assert img.format == "JPEG" and img.mode == "RGB" and img.size == (640, 480)


# --- manifests and images -----------------------------------------------------

EXPECTED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image_uri", pa.string()),
        ("car", pa.bool_()),
        ("bus", pa.bool_()),
        ("pedestrian", pa.bool_()),
        ("split", pa.string()),
        ("camera", pa.string()),
    ]
)


def test_manifest_schema_and_counts(tmp_path):
    out = tmp_path / "ds"
    manifests = make_dataset(str(out), SMALL)
    assert manifests == {s: str(out / f"{s}.parquet") for s in ("train", "val", "test")}
    for split, count in (("train", 12), ("val", 4), ("test", 4)):
        table = pq.read_table(manifests[split])
        assert table.schema.remove_metadata() == EXPECTED_SCHEMA
        assert table.num_rows == count
        rows = table.to_pylist()
        assert [r["id"] for r in rows] == [f"{split}-{i:06d}" for i in range(count)]
        assert {r["split"] for r in rows} == {split}
        assert {r["camera"] for r in rows} <= {"cam-north", "cam-south", "cam-east"}
        for r in rows:
            assert os.path.isabs(r["image_uri"])
            assert r["image_uri"] == str(out / "images" / split / f"{r['id']}.jpg")
            assert os.path.isfile(r["image_uri"])


def test_empty_split_is_skipped(tmp_path):
    manifests = make_dataset(str(tmp_path), SynthConfig(train=2, val=0, test=1))
    assert set(manifests) == {"train", "test"}
    assert not (tmp_path / "val.parquet").exists()
    assert not (tmp_path / "images" / "val").exists()


def test_relative_out_dir_gives_absolute_image_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manifests = make_dataset("rel", SynthConfig(train=2, val=0, test=0))
    uris = pq.read_table(manifests["train"]).column("image_uri").to_pylist()
    assert uris == [str(tmp_path / "rel" / "images" / "train" / f"train-{i:06d}.jpg") for i in range(2)]


@pytest.mark.parametrize("width,height", [(128, 96), (200, 150)])
def test_images_decode_to_configured_size_in_rgb(tmp_path, width, height):
    manifests = make_dataset(str(tmp_path), SynthConfig(train=5, val=0, test=0, width=width, height=height))
    for uri in pq.read_table(manifests["train"]).column("image_uri").to_pylist():
        img = Image.open(uri)
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (width, height)


def test_labels_are_balanced_and_cover_none_and_all(tmp_path):
    manifests = make_dataset(str(tmp_path), SynthConfig(train=500, val=0, test=0))
    table = pq.read_table(manifests["train"])
    present = np.stack([np.array(table.column(label).to_pylist()) for label in LABELS], axis=1)
    rates = present.mean(axis=0)
    assert np.all((rates > 0.3) & (rates < 0.7)), dict(zip(LABELS, rates))
    counts = present.sum(axis=1)
    assert (counts == 0).any(), "expected some scenes with no labelled object"
    assert (counts == 3).any(), "expected some scenes with all three labels"


def test_draw_scene_works_at_camera_size():
    img, truth = draw_scene(np.random.default_rng(1), 640, 480)
    assert img.mode == "RGB" and img.size == (640, 480)
    assert set(truth) == set(LABELS) and all(isinstance(v, bool) for v in truth.values())
    # not a flat picture: background gradient, clutter and noise all vary
    assert np.asarray(img).std() > 10


# --- S3 -----------------------------------------------------------------------

@pytest.fixture
def _moto_s3(bucket):
    """The name of a new bucket on the session's moto S3 server (tests/conftest.py)."""
    return bucket[len("s3://"):]


def test_make_dataset_to_s3_matches_local(_moto_s3, tmp_path):
    config = SynthConfig(train=10, val=3, test=0, seed=2)
    manifests = make_dataset(f"s3://{_moto_s3}/runs/synth/", config)
    assert manifests == {
        "train": f"s3://{_moto_s3}/runs/synth/train.parquet",
        "val": f"s3://{_moto_s3}/runs/synth/val.parquet",
    }

    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=_moto_s3)["Contents"]}
    assert len(keys) == 10 + 3 + 2
    assert "runs/synth/images/train/train-000009.jpg" in keys

    make_dataset(str(tmp_path), config)
    for split in ("train", "val"):
        table = storage.read_parquet(manifests[split])
        assert table.schema.remove_metadata() == EXPECTED_SCHEMA
        rows = table.to_pylist()
        local_rows = pq.read_table(tmp_path / f"{split}.parquet").to_pylist()
        assert [{**r, "image_uri": None} for r in rows] == [{**r, "image_uri": None} for r in local_rows]
        for row, local in zip(rows, local_rows):
            assert row["image_uri"] == f"s3://{_moto_s3}/runs/synth/images/{split}/{row['id']}.jpg"
            assert storage.read_bytes(row["image_uri"]) == Path(local["image_uri"]).read_bytes()


# --- the other kinds ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["glyphs", "shapes", "photos", "digits"])
def test_other_kinds_are_deterministic_multi_label_datasets(tmp_path, kind):
    from mlbatch.synth import KINDS
    labels = KINDS[kind].labels
    a = make_dataset(str(tmp_path / "a"), SynthConfig(kind=kind, train=300, val=0, test=0, seed=1))
    make_dataset(str(tmp_path / "b"), SynthConfig(kind=kind, train=300, val=0, test=0, seed=1))
    assert _files(tmp_path / "a" / "images") == _files(tmp_path / "b" / "images")
    table = pq.read_table(a["train"])
    assert table.schema.names == ["id", "image_uri", *labels, "split"]
    assert all(table.schema.field(label).type == pa.bool_() for label in labels)
    present = np.stack([np.array(table.column(label).to_pylist()) for label in labels], axis=1)
    rates = present.mean(axis=0)
    assert np.all((rates > 0.1) & (rates < 0.9)), dict(zip(labels, rates))  # every label seen, none always
    assert (present.sum(axis=1) >= 2).mean() > 0.3  # multi-label: many pictures have several
    img = Image.open(table.column("image_uri")[0].as_py())
    assert img.size == (64, 64) and img.mode == "RGB"
    # another kind with the same seed draws other pictures
    street = make_dataset(str(tmp_path / "s"), SynthConfig(train=1, val=0, test=0, seed=1, width=64, height=64))
    assert Path(street["train"]).parent.joinpath("images/train/train-000000.jpg").read_bytes() != \
        (tmp_path / "a" / "images" / "train" / "train-000000.jpg").read_bytes()


def test_photos_cut_the_shifted_test_split_from_parts_of_each_photograph_that_training_never_sees(monkeypatch):
    """A photograph whose every column says where it is: training cuts from the left 60%, the held-out draw
    from the right 40%, and the labels are the materials in view."""
    from mlbatch.synth import real
    columns = np.tile((np.arange(500) // 2).astype(np.uint8), (300, 1))   # column k holds k // 2
    monkeypatch.setattr(real, "_photograph", lambda name: np.repeat(columns[..., None], 3, axis=2))
    for i in range(20):
        rng = np.random.default_rng(i)
        assert np.asarray(real._cut(rng, "brick", real.TRAIN_BAND, 64, 64)).max() < 150
        assert np.asarray(real._cut(rng, "brick", real.HELD_OUT_BAND, 64, 64)).min() >= 150
    img, truth = real.draw_photos_held_out(np.random.default_rng(0))
    assert img.size == (64, 64) and set(truth) == set(real.PHOTO_LABELS)


def test_digits_for_the_shifted_test_split_come_from_scans_that_training_never_sees(monkeypatch):
    from mlbatch.synth import real
    scans, targets = real._scans()
    split = int(len(targets) * real.DIGITS_SEEN)
    monkeypatch.setattr(real, "_scans", lambda: (scans, np.r_[np.zeros(split, int), np.ones(len(targets) - split, int)]))
    for i in range(20):
        assert {k for k, v in real.draw_digits(np.random.default_rng(i))[1].items() if v} == {"d0"}
        assert {k for k, v in real.draw_digits_held_out(np.random.default_rng(i))[1].items() if v} == {"d1"}


def test_the_photos_kind_without_scikit_image_says_what_to_install(tmp_path, monkeypatch):
    from mlbatch.synth import real
    real._photograph.cache_clear()
    monkeypatch.setitem(sys.modules, "skimage", None)   # as if it were not installed
    try:
        with pytest.raises(RuntimeError, match=r"pip install 'mlbatch\[photos\]'"):
            make_dataset(str(tmp_path / "p"), SynthConfig(kind="photos", train=1, val=0, test=0))
    finally:
        real._photograph.cache_clear()


def test_glyphs_mirror_pairs_change_label_under_a_flip():
    """The reason a flip is not a default augmentation: on glyphs it turns one label into another."""
    from mlbatch.synth.kinds import _STROKES
    mirror = {name: [[(-x, y) for x, y in line] for line in lines] for name, lines in _STROKES.items()}
    assert sorted(mirror["arrow_left"]) == sorted(_STROKES["arrow_right"])


def test_make_dataset_command_kinds(tmp_path, capsys):
    from mlbatch.cli import main
    assert main(["make-dataset", str(tmp_path / "g"), "--kind", "glyphs", "--train", "3", "--val", "0",
                 "--test", "0"]) == 0
    assert pq.read_table(tmp_path / "g" / "train.parquet").num_rows == 3
    with pytest.raises(SystemExit, match="^2$"):
        main(["make-dataset", str(tmp_path / "x"), "--kind", "faces"])
    assert "invalid choice: 'faces'" in capsys.readouterr().err


def test_the_new_view_comes_apart_into_its_parts_and_whole_is_what_it_was():
    """``benchmarks/shift_parts.py`` measures what each part of the shifted view costs, so each part must be
    the same in any company, and the whole view the pixels that every shifted dataset was made with."""
    import hashlib

    from mlbatch.synth.dataset import KINDS, VIEW_PARTS, new_view

    img, _ = KINDS["street"].draw(np.random.default_rng([5, 2, 7]), 128, 96)
    img = img.convert("RGB")

    def view(parts):
        return np.asarray(new_view(img, np.random.default_rng(11), parts), np.int16)

    whole = new_view(img, np.random.default_rng(11))
    # the digest of the view before it came apart (commit 519d093): old datasets stay byte for byte
    assert hashlib.sha256(whole.tobytes()).hexdigest() == \
        "52ce1cb8d92decdee8151414a5ec66226f51bf01fa0ba44ec7abcecb4f8da0e0"
    assert np.array_equal(view(VIEW_PARTS), np.asarray(whole, np.int16))
    original = np.asarray(img, np.int16)
    assert np.array_equal(view(()), original)
    framed, balanced = view(("frame",)), view(("balance",))
    assert framed.shape == original.shape and (framed != original).any()
    red_gain = balanced[..., 0].sum() / original[..., 0].sum()
    assert abs(red_gain - 1) > 0.05 and np.array_equal(balanced[..., 1], original[..., 1])  # green untouched
    # the white balance drawn is the same whether the frame changed or not
    both = view(("frame", "balance"))
    assert np.isclose(both[..., 0].sum() / framed[..., 0].sum(), red_gain, atol=0.02)
    assert view(("contrast",)).std() < original.std()
    with pytest.raises(ValueError, match="unknown view part 'zoom'; choose from frame, balance, contrast, blur"):
        new_view(img, np.random.default_rng(0), ("zoom",))


def test_a_dataset_with_an_unknown_view_part_is_refused_before_any_picture_is_written(tmp_path):
    with pytest.raises(ValueError, match="unknown view part 'tint'"):
        make_dataset(str(tmp_path / "d"), SynthConfig(kind="glyphs", train=2, val=0, test=2, shift=True,
                                                      view=("frame", "tint")))
    assert not (tmp_path / "d").exists()
