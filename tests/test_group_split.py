"""Validation held out by whole groups (``--val-group-column``): the split, its errors, and ``mlbatch train``."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlbatch.cli import main
from mlbatch.model.package import META_FILE
from mlbatch.train.config import TrainConfig
from mlbatch.train.data import group_split


def _many_small_groups(seed: int = 7, n_groups: int = 300, largest: int = 20) -> list[str]:
    """Rows of ``n_groups`` groups of 1..``largest`` rows each, unequal, in shuffled row order."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, largest + 1, n_groups)
    rows = [f"cam-{g:03d}" for g, size in enumerate(sizes) for _ in range(size)]
    return [rows[i] for i in rng.permutation(len(rows))]


@pytest.mark.parametrize("fraction", [0.1, 0.15, 0.3, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_group_on_both_sides(fraction, seed):
    groups = _many_small_groups()
    train, val = group_split(groups, fraction, seed)
    assert len(train) and len(val)
    assert sorted([*train, *val]) == list(range(len(groups)))  # every row once
    assert not {groups[i] for i in train} & {groups[i] for i in val}


@pytest.mark.parametrize("fraction", [0.1, 0.15, 0.3])
def test_row_fraction_is_honoured_on_many_small_unequal_groups(fraction):
    """The documented bound: within half the largest group's rows of the target (here 10 of ~3000 rows)."""
    groups = _many_small_groups(largest=20)
    for seed in range(10):
        _, val = group_split(groups, fraction, seed)
        assert abs(len(val) - fraction * len(groups)) <= 20 / 2
        assert abs(len(val) / len(groups) - fraction) < 0.005


def test_the_split_is_deterministic_for_a_seed():
    groups = _many_small_groups()
    first = group_split(groups, 0.15, 3)
    again = group_split(list(groups), 0.15, 3)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    others = {tuple(group_split(groups, 0.15, seed)[1]) for seed in range(4, 8)}
    assert len(others | {tuple(first[1])}) > 1  # the seed chooses which groups


def test_a_group_stays_on_each_side_even_when_one_group_is_most_rows():
    groups = ["big"] * 90 + ["small"] * 10
    train, val = group_split(groups, 0.01, 0)
    assert {groups[i] for i in val} == {"small"} and {groups[i] for i in train} == {"big"}
    train, val = group_split(groups, 0.99, 0)
    assert len(train) and len(val)


# ---- errors, before any picture is decoded -------------------------------------------------------

def _copy_with(small_dataset, tmp_path, **columns) -> str:
    table = pq.read_table(small_dataset["train"])
    for name, values in columns.items():
        table = table.append_column(name, pa.array(values))
    out = str(tmp_path / "train.parquet")
    pq.write_table(table, out)
    return out


def _train(manifest: str, out: str, *extra: str) -> list[str]:
    return ["train", "--manifest", manifest, "--output", out, "--epochs", "1", "--image-size", "32",
            "--no-progress", *extra]


def test_errors_name_the_column_and_the_problem(small_dataset, tmp_path, capsys):
    n = pq.read_metadata(small_dataset["train"]).num_rows
    cases = [
        (small_dataset["train"], "nope", r"no group column 'nope' \(columns: id, image_uri"),
        (_copy_with(small_dataset, tmp_path, day=[1] * 5 + [None] + [2] * (n - 6)), "day",
         "row 5: group column 'day' is null"),
        (small_dataset["train"], "split", r"group column 'split' of .* holds 1 group \('train'\); .* at least 2"),
    ]
    for manifest, column, message in cases:
        assert main(_train(manifest, str(tmp_path / "model"), "--val-group-column", column)) == 2
        err = capsys.readouterr().err
        assert re.search(message, err), err
    assert not (tmp_path / "model").exists()


def test_a_group_column_is_refused_with_validation_manifests(small_dataset, tmp_path, capsys):
    argv = _train(small_dataset["train"], str(tmp_path / "model"), "--val-manifest", small_dataset["val"],
                  "--val-group-column", "camera")
    assert main(argv) == 2
    assert "cannot be combined with validation manifests" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cannot be combined"):
        TrainConfig(manifests=["a"], output="b", val_manifests=["c"], val_group_column="camera")


# ---- end to end --------------------------------------------------------------------------------

def test_train_holds_out_whole_cameras_and_records_it(small_dataset, tmp_path, capsys):
    out = tmp_path / "model"
    cameras = pq.read_table(small_dataset["train"], columns=["camera"])["camera"].to_pylist()
    assert len(set(cameras)) == 3
    assert main(_train(small_dataset["train"], str(out), "--val-group-column", "camera", "--val-fraction", "0.3")) == 0
    data = json.loads((out / META_FILE).read_text())["training"]["data"]
    assert data["val_group_column"] == "camera"
    assert (data["train_groups"], data["val_groups"]) == (2, 1)
    assert data["train_rows"] + data["val_rows"] == len(cameras)
    assert data["val_rows"] in {cameras.count(c) for c in set(cameras)}  # exactly one whole camera
    assert "whole groups of 'camera'" in data["val"]
    assert "1 of 3 groups of 'camera'" in capsys.readouterr().out
