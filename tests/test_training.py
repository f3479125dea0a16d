"""Labeled manifests, thresholds, metrics, and the train/evaluate commands end to end."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlbatch.core import manifest
from mlbatch.cli import main
from mlbatch.train.metrics import choose_threshold, choose_thresholds, compute_metrics, parse_policy
from mlbatch.core.manifest import ManifestError, fetch_decoded, infer_labels, read_labeled

LABELS = ["car", "bus", "pedestrian"]


# ---- manifests -----------------------------------------------------------------------------

def _write(where, **columns) -> str:
    pq.write_table(pa.table(columns), where)
    return str(where)


def test_truth_from_a_labels_list(tmp_path):
    uri = _write(tmp_path / "m.parquet", image_uri=["a.jpg", "b.jpg", "c.jpg"],
                 labels=pa.array([["car", "bus"], [], None], pa.list_(pa.string())))
    assert infer_labels([uri]) == ["bus", "car"]
    data = read_labeled([uri], LABELS)
    np.testing.assert_array_equal(data.targets[:2], [[1, 1, 0], [0, 0, 0]])
    assert np.isnan(data.targets[2]).all()  # a null list: nothing known about that row


def test_truth_from_per_label_columns_with_unknowns(tmp_path):
    uri = _write(tmp_path / "m.parquet", image_uri=["a.jpg", "b.jpg"], car=pa.array([True, None]),
                 bus=pa.array([0, 1], pa.int8()), pedestrian=pa.array([False, False]), camera=["n", "s"])
    data = read_labeled([uri], LABELS)
    assert data.targets[0].tolist() == [1, 0, 0]
    assert np.isnan(data.targets[1, 0]) and data.targets[1, 1:].tolist() == [1, 0]
    assert infer_labels([uri]) == ["car", "pedestrian"]  # only boolean columns are inferred


def test_folder_and_glob_manifests(tmp_path):
    (tmp_path / "d").mkdir()
    _write(tmp_path / "d" / "1.parquet", image_uri=["a.jpg"], car=[True], bus=[False], pedestrian=[True])
    _write(tmp_path / "d" / "2.parquet", image_uri=["b.jpg"], car=[False], bus=[False], pedestrian=[True])
    assert len(read_labeled([str(tmp_path / "d")], LABELS)) == 2
    assert len(read_labeled([str(tmp_path / "d" / "2*.parquet")], LABELS)) == 1


@pytest.mark.parametrize("columns, message", [
    (dict(path=["a.jpg"], car=[True]), r"no 'image_uri' column \(columns: path, car\)"),
    (dict(image_uri=[1, 2], car=[True, False]), "column 'image_uri' must be string, found int64"),
    (dict(image_uri=["a.jpg", None], car=[True, False], bus=[True, True], pedestrian=[True, True]),
     "row 1: 'image_uri' is null"),
    (dict(image_uri=["a.jpg", " "], car=[True, False], bus=[True, True], pedestrian=[True, True]),
     "row 1: 'image_uri' is empty"),
    (dict(image_uri=["a.jpg"], labels=[["car", "truck"]]), "row 0: label 'truck' is not one of"),
    (dict(image_uri=["a.jpg"], labels=["car"]), "'labels' must be list<string>"),
    (dict(image_uri=["a.jpg"], car=[True], bus=[True]), r"missing label columns \['pedestrian'\]"),
    (dict(image_uri=["a.jpg"], camera=["n"]), "no truth columns"),
    (dict(image_uri=["a.jpg", "b.jpg"], car=[1, 2], bus=[0, 0], pedestrian=[0, 0]),
     "row 1: label column 'car' holds 2"),
    (dict(image_uri=["a.jpg"], car=["yes"], bus=[True], pedestrian=[True]), "label column 'car' must be boolean"),
])
def test_manifest_errors_name_file_row_and_column(tmp_path, columns, message):
    uri = _write(tmp_path / "bad.parquet", **columns)
    with pytest.raises(ManifestError, match=message) as err:
        read_labeled([uri], LABELS)
    assert str(tmp_path / "bad.parquet") in str(err.value)


def test_empty_manifest_is_an_error(tmp_path):
    uri = _write(tmp_path / "empty.parquet", image_uri=pa.array([], pa.string()), car=pa.array([], pa.bool_()))
    with pytest.raises(ManifestError, match="empty.parquet: has no rows"):
        read_labeled([uri], LABELS)


def test_not_parquet_and_missing_manifests(tmp_path):
    (tmp_path / "notes.parquet").write_text("this is not parquet")
    with pytest.raises(ManifestError, match="notes.parquet: not a readable Parquet file"):
        read_labeled([str(tmp_path / "notes.parquet")], LABELS)
    with pytest.raises(ManifestError, match="no such file"):
        read_labeled([str(tmp_path / "nope.parquet")], LABELS)


def test_unreadable_image_names_row_and_uri(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ManifestError, match=r"m.parquet row 1: cannot use image .*junk.jpg: not an image"):
        fetch_decoded([str(tmp_path / "missing.jpg"), str(tmp_path / "junk.jpg")][1:],
                      ["m.parquet row 1"])
    with pytest.raises(ManifestError, match=r"row 0: cannot use image .*missing.jpg"):
        fetch_decoded([str(tmp_path / "missing.jpg")], ["m.parquet row 0"])


def test_manifest_on_s3(bucket, tmp_path):
    from mlbatch.core import storage
    table = pa.table({"image_uri": ["s3://x/a.jpg"], "labels": pa.array([["bus"]], pa.list_(pa.string()))})
    storage.write_parquet(table, f"{bucket}/manifests/day1.parquet")
    assert read_labeled([f"{bucket}/manifests/"], LABELS).targets.tolist() == [[0, 1, 0]]
    with pytest.raises(ManifestError, match="no such file"):
        manifest.expand([f"{bucket}/manifests/none.parquet"])


# ---- thresholds ----------------------------------------------------------------------------

def test_f1_threshold_on_a_hand_made_example():
    y = np.array([0, 0, 1, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.9])
    # t=0.35: TP 3 FP 1 -> F1 0.857; t=0.8: F1 0.8; t=0.4: F1 0.667; t=0.1: F1 0.75
    assert choose_threshold(y, s, "f1") == pytest.approx(0.35)


def test_precision_threshold_on_a_hand_made_example():
    y = np.array([0, 1, 0, 1, 1, 1])
    s = np.array([0.2, 0.3, 0.5, 0.6, 0.7, 0.9])
    # precision at t=0.3: 4/5, t=0.5: 3/4, t=0.6: 3/3 -> lowest t reaching 0.9 is 0.6; 0.75 is reached at 0.3
    assert choose_threshold(y, s, "precision:0.9") == pytest.approx(0.6)
    assert choose_threshold(y, s, "precision:0.75") == pytest.approx(0.3)


def test_threshold_without_positives_falls_back_to_half():
    assert choose_threshold(np.zeros(4), np.array([0.1, 0.2, 0.3, 0.4])) == 0.5


def test_thresholds_leave_unknowns_out():
    y = np.array([[1.0], [np.nan], [0.0], [1.0]])
    s = np.array([[0.9], [0.95], [0.2], [0.6]])
    assert choose_thresholds(["car"], y, s) == {"car": pytest.approx(0.6)}


@pytest.mark.parametrize("policy", ["recall:0.9", "precision:1.5", "precision:x", "F1"])
def test_bad_policies_are_refused(policy):
    with pytest.raises(ValueError, match="unknown threshold policy"):
        parse_policy(policy)


# ---- metrics -------------------------------------------------------------------------------

def test_metrics_on_a_hand_computed_example():
    labels = ["a", "b"]
    y = np.array([[1, 0], [1, 1], [0, 1], [0, np.nan]], dtype=float)
    s = np.array([[0.9, 0.2], [0.4, 0.8], [0.6, 0.7], [0.1, 0.9]])
    r = compute_metrics(labels, y, s, {"a": 0.5, "b": 0.5})
    a, b = r.per_label
    # a: predictions 1,0,1,0 vs truth 1,1,0,0 -> TP1 FP1 FN1: P=R=F1=0.5
    assert (a.precision, a.recall, a.f1, a.support, a.known) == (0.5, 0.5, 0.5, 2, 4)
    assert a.predicted_positive_rate == 0.5
    # AP of a: ranks 0.9(+) 0.6(-) 0.4(+) 0.1(-) -> (1 + 2/3) / 2
    assert a.average_precision == pytest.approx((1 + 2 / 3) / 2)
    # b: the unknown row is left out; predictions 0,1,1 vs truth 0,1,1 -> perfect
    assert (b.precision, b.recall, b.f1, b.support, b.known) == (1.0, 1.0, 1.0, 2, 3)
    assert r.macro_f1 == pytest.approx(0.75)
    # micro over 7 known cells: TP 3, FP 1, FN 1 -> 0.75
    assert r.micro_f1 == pytest.approx(0.75)
    assert r.hamming_loss == pytest.approx(2 / 7)
    # subset accuracy over rows 0-2 (row 3 is not fully known): only row 1 and row... row 0: (1,0) vs (1,0) ok,
    # row 1: (0,1) vs (1,1) wrong, row 2: (1,1) vs (0,1) wrong -> 1/3
    assert r.subset_accuracy == pytest.approx(1 / 3)
    assert r.mean_average_precision == pytest.approx((a.average_precision + 1.0) / 2)
    assert "macro-F1 0.750" in r.table()


# ---- the commands ---------------------------------------------------------------------------

def test_make_dataset_train_evaluate_commands(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["make-dataset", str(data), "--train", "400", "--val", "120", "--test", "120", "--seed", "5"]) == 0
    model = tmp_path / "model"
    assert main(["train", "--manifest", str(data / "train.parquet"), "--val-manifest", str(data / "val.parquet"),
                 "--output", str(model), "--epochs", "4", "--image-size", "48", "--no-progress"]) == 0
    meta = json.loads((model / "mlbatch-model.json").read_text())
    assert meta["labels"] == ["car", "bus", "pedestrian"]  # inferred, in manifest order
    assert meta["training"]["data"]["val_rows"] == 120 and meta["training"]["best_epoch"] >= 1
    assert set(meta["thresholds"]) == set(meta["labels"])
    capsys.readouterr()
    assert main(["evaluate", "--model", str(model), "--manifest", str(data / "test.parquet"),
                 "--report", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "pedestrian" in out and "macro-F1" in out
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert report["rows"] == 120
    # learnt, not guessed. Saying yes to every label already scores F1 = 2p/(1+p) on a label present at rate p
    # (0.69 on these rows; 4 short epochs at 48 px reach 0.72), so F1 proves little here. A model that ranks
    # no better than chance has an average precision of p: the ranking must beat that
    truth = pq.read_table(data / "test.parquet")
    rates = [float(np.mean(truth.column(x).to_numpy(zero_copy_only=False))) for x in meta["labels"]]
    assert report["macro_f1"] >= float(np.mean([2 * p / (1 + p) for p in rates]))
    assert report["mean_average_precision"] > float(np.mean(rates)) + 0.08, (report, rates)
    assert (tmp_path / "report" / "pr_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_train_command_reports_bad_input_without_traceback(tmp_path, capsys):
    assert main(["train", "--manifest", str(tmp_path / "none.parquet"), "--output", str(tmp_path / "m")]) == 2
    assert "mlbatch train: error: manifest" in capsys.readouterr().err
    assert main(["train", "--manifest", str(tmp_path / "none.parquet"), "--output", str(tmp_path / "m"),
                 "--threshold-policy", "recall:2"]) == 2
    assert "unknown threshold policy" in capsys.readouterr().err


# ---- the recipe: stopping and augmentation ----------------------------------------------------

def test_stopping_rule_on_a_hand_made_validation_history():
    from mlbatch.train.loop import stop_reason
    rising = [0.2, 0.4, 0.6, 0.7, 0.75, 0.78]
    assert stop_reason(rising, epochs=60, patience=3) is None
    # best at epoch 3 (0.70); three epochs that do not beat it by 0.001 -> stop
    assert stop_reason([0.5, 0.6, 0.7, 0.69, 0.7005, 0.65], epochs=60, patience=3) == \
        "validation mAP did not improve for 3 epochs"
    assert stop_reason([0.5, 0.6, 0.7, 0.69, 0.7005], epochs=60, patience=3) is None
    # a late improvement resets the count
    assert stop_reason([0.5, 0.6, 0.7, 0.69, 0.68, 0.72, 0.71], epochs=60, patience=3) is None
    assert stop_reason(rising, epochs=6, patience=3) == "reached 6 epochs"


def test_training_stops_early_and_keeps_the_best_epoch(small_dataset, tmp_path):
    from mlbatch.train import TrainConfig, train
    meta = train(TrainConfig(manifests=[small_dataset["train"]], val_manifests=[small_dataset["val"]],
                             output=str(tmp_path / "m"), image_size=32, epochs=40, patience=2, lr=1e-6,
                             lr_schedule="plateau", progress=False))
    t = meta["training"]
    maps = [h["val_map"] for h in t["history"]]
    # at a learning rate this small validation soon stops improving: two epochs after the best, it stops
    assert t["stopped"] == "validation mAP did not improve for 2 epochs"
    assert t["epochs"] == len(maps) == t["best_epoch"] + 2 < 40
    assert maps[t["best_epoch"] - 1] >= max(maps) - 1e-3
    # the package holds the best epoch's weights, not the last epoch's
    assert t["validation"]["map"] == pytest.approx(maps[t["best_epoch"] - 1], abs=1e-4)
    meta = train(TrainConfig(manifests=[small_dataset["train"]], val_manifests=[small_dataset["val"]],
                             output=str(tmp_path / "t"), image_size=32, epochs=40, time_budget=0.01,
                             progress=False))
    assert meta["training"]["stopped"] == "time budget of 0.01s" and meta["training"]["epochs"] == 1
    assert meta["training"]["time_budget_cut"] == "the time budget of 0.01s ended training after 1 of 40 epochs"


class _Clock:
    """A fake ``time`` for train(): every reading is ``step`` seconds after the one before."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def monotonic(self) -> float:
        self.now += self.step
        return self.now


def test_the_same_data_and_seed_give_the_same_model_on_a_quiet_and_a_busy_machine(small_dataset, tmp_path,
                                                                                    monkeypatch, caplog):
    """The plan is the configuration's: how long each epoch took changes nothing, unless a budget is given."""
    from mlbatch.train import TrainConfig, loop, train

    def run(name: str, step: float, **kwargs) -> dict:
        monkeypatch.setattr(loop, "time", _Clock(step))
        return train(TrainConfig(manifests=[small_dataset["train"]], val_manifests=[small_dataset["val"]],
                                 output=str(tmp_path / name), image_size=32, epochs=4, progress=False, **kwargs))

    quiet, busy = run("quiet", 0.001), run("busy", 500.0)
    for meta in (quiet, busy):
        assert meta["training"]["epochs"] == meta["training"]["planned_epochs"] == 4
        assert meta["training"]["time_budget_cut"] is None
        assert meta["training"]["stopped"] == "the cosine's 4 epochs are done"
    assert [h["val_map"] for h in quiet["training"]["history"]] == [h["val_map"] for h in busy["training"]["history"]]
    assert [h["lr"] for h in quiet["training"]["history"]] == [h["lr"] for h in busy["training"]["history"]]
    assert quiet["thresholds"] == busy["thresholds"]
    assert (tmp_path / "quiet" / "model.safetensors").read_bytes() == (tmp_path / "busy" / "model.safetensors").read_bytes()
    with caplog.at_level("WARNING", logger="mlbatch.train.loop"):
        cut = run("cut", 500.0, time_budget=3000)   # about 1,000 s an epoch: the clock is read twice an epoch
    t = cut["training"]
    assert re.fullmatch(r"the time budget of 3000s cut the plan from 4 to (2|3) epochs \(\d+\.\ds an epoch\)",
                        t["time_budget_cut"]), t["time_budget_cut"]
    assert t["epochs"] < 4 and t["planned_epochs"] == 4
    assert "this model depends on the machine's speed" in caplog.text


def test_the_cosine_runs_its_plan_and_keeps_its_latest_epoch_of_equals(small_dataset, tmp_path):
    """Patience does not cut a cosine short; of epochs within 0.001 of the best mAP the last is kept."""
    from mlbatch.train import TrainConfig, train
    meta = train(TrainConfig(manifests=[small_dataset["train"]], val_manifests=[small_dataset["val"]],
                             output=str(tmp_path / "m"), image_size=32, epochs=6, patience=1, lr=1e-4,
                             progress=False))
    t = meta["training"]
    maps = [h["val_map"] for h in t["history"]]
    assert t["stopped"] == "the cosine's 6 epochs are done" and t["epochs"] == 6
    # kept: the last epoch whose mAP came within 0.001 of every epoch before it
    kept = max(e for e in range(1, 7) if maps[e - 1] >= max(maps[:e - 1], default=0) - 1e-3)
    assert t["best_epoch"] == kept
    assert t["validation"]["map"] == pytest.approx(maps[kept - 1], abs=1e-4)
    assert t["history"][-1]["lr"] == pytest.approx(0.0, abs=1e-15)


def _asymmetric_batch(n: int = 16):  # -> torch.Tensor (torch is imported inside the tests)
    import torch
    x = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    x[:, :, 8:24, 2:10] = 255  # a bar on the left
    return x


def test_augmentations_do_what_they_are_named_and_nothing_else():
    import torch
    from mlbatch.train.augment import augment
    x = _asymmetric_batch()
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(augment(x, gen, ()), x.float())
    flipped = augment(x, gen, ("hflip",))
    mirrored = [torch.equal(f, x[i].float().flip(2)) for i, f in enumerate(flipped)]
    kept = [torch.equal(f, x[i].float()) for i, f in enumerate(flipped)]
    assert all(m or k for m, k in zip(mirrored, kept)) and 0 < sum(mirrored) < len(x)
    vflipped = augment(x, gen, ("vflip",))
    assert all(torch.equal(f, x[i].float()) or torch.equal(f, x[i].float().flip(1)) for i, f in enumerate(vflipped))
    # the defaults never mirror: the bar stays on the left in every picture
    default = augment(x, gen, ("shift", "color"))
    left, right = default[:, :, :, :16].mean(dim=(1, 2, 3)), default[:, :, :, 16:].mean(dim=(1, 2, 3))
    assert (left > right + 30).all()
    assert not torch.equal(default, x.float())  # ...but they do change the pictures


def test_zoom_shrinks_half_the_pictures_whole_and_balance_moves_red_against_blue():
    import torch
    from mlbatch.train.augment import augment
    x = torch.full((64, 3, 32, 32), 100, dtype=torch.uint8)
    x[:, :, 8:24, 8:24] = 250                                   # a bright square, well inside the frame
    zoomed = augment(x, torch.Generator().manual_seed(0), ("zoom",))
    bright = (zoomed[:, 0] > 200).sum(dim=(1, 2))
    same = torch.tensor([torch.equal(z, x[i].float()) for i, z in enumerate(zoomed)])
    assert 16 < int(same.sum()) < 48                            # about half are left as they are
    assert (bright[same] == 256).all()
    assert ((bright[~same] < 256) & (bright[~same] >= 0.6 * 0.6 * 256)).all()   # shrunk to 70-100%, not cut
    assert (zoomed[~same, :, 0, 0] - zoomed[~same].mean(dim=(2, 3))).abs().max() < 60   # a border, no black
    plain = torch.full((16, 3, 8, 8), 100, dtype=torch.uint8)
    balanced = augment(plain, torch.Generator().manual_seed(1), ("balance",))
    red, green, blue = (balanced[:, c].mean(dim=(1, 2)) / 100 - 1 for c in range(3))
    assert torch.allclose(green, torch.zeros(16)) and torch.allclose(red, -blue, atol=1e-5)
    assert red.abs().max() <= 0.2 + 1e-6 and red.abs().max() > 0.05


def test_blur_softens_the_edges_of_half_the_pictures_and_keeps_their_light():
    import torch
    from PIL import Image, ImageFilter
    from mlbatch.train.augment import _blur, augment
    x = torch.full((64, 3, 32, 32), 20, dtype=torch.uint8)
    x[:, :, 10:22, 10:22] = 230
    blurred = augment(x, torch.Generator().manual_seed(0), ("blur",))
    same = torch.tensor([torch.equal(b, x[i].float()) for i, b in enumerate(blurred)])
    assert 16 < int(same.sum()) < 48                                   # about half
    soft = blurred[~same]
    assert torch.allclose(soft.sum(dim=(2, 3)), x[~same].float().sum(dim=(2, 3)), rtol=1e-4)   # no light lost
    edge = soft[:, 0, 15, 9]                                           # just outside the square: lit a little
    assert (edge > 20.5).all() and (edge < 125).all()
    # the same Gaussian as Pillow's, within a grey level or two
    one = _blur(x[:1].float(), torch.tensor([0.6]))[0, 0, 15].round()
    pil = Image.fromarray(x[0].permute(1, 2, 0).numpy()).filter(ImageFilter.GaussianBlur(0.6))
    row = torch.from_numpy(np.asarray(pil)[15, :, 0].astype(np.float32))
    assert (one - row).abs().max() <= 6


def test_augmentation_options_are_recorded_in_the_package(small_dataset, tmp_path, capsys):
    model = tmp_path / "m"
    assert main(["train", "--manifest", small_dataset["train"], "--val-manifest", small_dataset["val"],
                 "--output", str(model), "--epochs", "1", "--image-size", "32", "--augment", "hflip,color",
                 "--no-progress"]) == 0
    meta = json.loads((model / "mlbatch-model.json").read_text())
    assert meta["training"]["augment"] == ["hflip", "color"]
    assert main(["train", "--manifest", small_dataset["train"], "--output", str(tmp_path / "n"),
                 "--augment", "rotate"]) == 2
    assert ("unknown augmentation 'rotate'; choose from shift, color, zoom, balance, blur, hflip, vflip"
            in capsys.readouterr().err)
    from mlbatch.train.config import DEFAULT_AUGMENT
    assert "hflip" not in DEFAULT_AUGMENT and "vflip" not in DEFAULT_AUGMENT
