"""The network, its package format and the loss: what a user of mlbatch.load_model relies on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import mlbatch
from mlbatch.core import storage
from mlbatch.model.backbones import available_backbones, create_backbone
from mlbatch.model.loaded import load_model
from mlbatch.model.net import MultiLabelNet, save_package
from mlbatch.model.spec import ModelSpec
from mlbatch.core.table import column_name
from mlbatch.model.package import META_FILE, WEIGHTS_FILE, PackageError
from mlbatch.train.loop import masked_bce

LABELS = ["car", "bus", "pedestrian"]


def _net(labels=LABELS, **kw) -> MultiLabelNet:
    torch.manual_seed(0)
    return MultiLabelNet(ModelSpec(labels=labels, image_size=32, **kw)).eval()


def _pictures(n: int = 5, size=(40, 30)) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def test_output_is_one_independent_probability_per_label():
    net = _net()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        for head in net.heads:  # push every head towards "present": sigmoids all near 1, a softmax could not
            head.bias.fill_(6.0)
        p = net.predict_proba(x)
    assert p.shape == (6, 3)
    assert ((p >= 0) & (p <= 1)).all()
    assert torch.allclose(p.sum(dim=1), torch.full((6,), 3.0), atol=0.05)  # rows sum to ~3, not 1


def test_changing_one_head_leaves_the_others_unchanged():
    net = _net()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = net.predict_proba(x)
        net.heads[1].weight.add_(torch.randn_like(net.heads[1].weight))
        net.heads[1].bias.add_(1.0)
        after = net.predict_proba(x)
    assert torch.equal(before[:, 0], after[:, 0])
    assert torch.equal(before[:, 2], after[:, 2])
    assert not torch.allclose(before[:, 1], after[:, 1])


@pytest.mark.parametrize("name", ["cnn-small", "resnet-mini"])
def test_builtin_backbones_give_features(name):
    backbone = create_backbone(name)
    out = backbone(torch.randn(2, 3, 48, 48))
    assert out.shape == (2, backbone.out_features)


def test_unknown_backbone_names_the_choices():
    with pytest.raises(ValueError, match="unknown backbone 'vgg-huge'.*cnn-small"):
        create_backbone("vgg-huge")
    assert "torchvision:NAME" in available_backbones()


@pytest.mark.parametrize("name, features", [("torchvision:resnet18", 512), ("timm:resnet10t", 512),
                                             ("timm:efficientnet_lite0", 1280)])
def test_library_backbones_give_features(name, features):
    backbone = create_backbone(name)
    assert backbone.out_features == features
    assert backbone(torch.randn(2, 3, 64, 64)).shape == (2, features)


# ---- the loss ------------------------------------------------------------------------------

def test_a_standardizing_cnn_small_sees_a_new_white_balance_and_contrast_as_the_same_picture(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    camera = x * torch.tensor([1.2, 1.0, 0.8]).view(1, 3, 1, 1) * 0.8 + 0.1   # warmer, 80% contrast, brighter

    def change(backbone):
        backbone.eval()
        with torch.no_grad():
            a, b = backbone(x), backbone(camera)
        return float((a - b).norm() / a.norm())

    assert change(create_backbone("cnn-small", standardize=1)) < 0.05   # 0.025 (the 0.05 floor of the std)
    assert change(create_backbone("cnn-small")) > 0.1
    camera = x * 0.8 + 0.1                                                   # standardize=2: one deviation for all
    assert change(create_backbone("cnn-small", standardize=2)) < 0.05
    # recorded in the package and rebuilt from it: the same probabilities after loading
    spec = ModelSpec(labels=LABELS, image_size=32, backbone_kwargs={"standardize": 1})
    net = MultiLabelNet(spec).eval()
    save_package(net, str(tmp_path / "pkg"), THRESHOLDS)
    model = mlbatch.load_model(str(tmp_path / "pkg"))
    assert model.meta["backbone"] == {"name": "cnn-small", "kwargs": {"standardize": 1}}
    pictures = _pictures()
    with torch.no_grad():
        direct = net.predict_proba(torch.from_numpy(np.stack([model.preprocess(p) for p in pictures]))).numpy()
    np.testing.assert_array_equal(model.predict(pictures), direct)


def test_masked_bce_ignores_unknown_labels():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.3, 0.7, -2.0]], requires_grad=True)
    targets = torch.tensor([[1.0, float("nan"), 0.0], [0.0, 1.0, float("nan")]])
    loss = masked_bce(logits, targets)
    known = [(0, 0, 1.0), (0, 2, 0.0), (1, 0, 0.0), (1, 1, 1.0)]
    expected = np.mean([-(t * np.log(1 / (1 + np.exp(-logits[i, j].item()))) +
                          (1 - t) * np.log(1 - 1 / (1 + np.exp(-logits[i, j].item())))) for i, j, t in known])
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad[0, 1] == 0 and logits.grad[1, 2] == 0  # unknown cells teach nothing
    assert (logits.grad[0, 0] != 0) and (logits.grad[1, 1] != 0)


def test_masked_bce_of_all_unknown_is_zero_not_nan():
    loss = masked_bce(torch.zeros(2, 3), torch.full((2, 3), float("nan")))
    assert loss.item() == 0.0


# ---- labels as column names ----------------------------------------------------------------

def test_column_names_from_labels():
    assert column_name("Traffic Light") == "traffic_light"
    assert column_name("bus") == "bus"
    assert column_name("e-scooter (2)") == "e_scooter_2"


@pytest.mark.parametrize("labels, message", [
    (["car", "car"], "'car' is repeated"),
    (["Car", "car "], "both give column name 'car'"),
    (["car", ""], "non-empty"),
    (["9lives"], "must start with a letter"),
    (["!!!"], "must start with a letter"),
    ([], "empty"),
])
def test_bad_label_sets_are_refused(labels, message):
    with pytest.raises(ValueError, match=message):
        ModelSpec(labels=labels)


# ---- the package ---------------------------------------------------------------------------

THRESHOLDS = {"car": 0.4, "bus": 0.55, "pedestrian": 0.3}


def test_package_round_trip_on_local_disk(tmp_path):
    net = _net()
    meta = save_package(net, str(tmp_path / "pkg"), THRESHOLDS, name="street", training={"epochs": 3})
    model = mlbatch.load_model(str(tmp_path / "pkg"))
    assert model.labels == LABELS
    assert model.thresholds == THRESHOLDS
    assert model.version == meta["version"] == meta["weights"]["sha256"][:12]
    assert model.name == "street"
    pictures = _pictures()
    with torch.no_grad():
        direct = net.predict_proba(torch.from_numpy(np.stack([model.preprocess(p) for p in pictures]))).numpy()
    got = model.predict(pictures)
    assert got.dtype == np.float32 and got.shape == (5, 3)
    np.testing.assert_array_equal(got, direct)
    written = json.loads((tmp_path / "pkg" / META_FILE).read_text())
    for key in ("format_version", "labels", "thresholds", "backbone", "input", "training", "created_at", "weights"):
        assert key in written
    assert written["input"]["size"] == 32 and len(written["input"]["mean"]) == 3


def test_package_round_trip_on_s3(bucket, tmp_path):
    net = _net()
    save_package(net, f"{bucket}/models/street/v1", THRESHOLDS)
    save_package(net, str(tmp_path / "local"), THRESHOLDS)
    remote, local = load_model(f"{bucket}/models/street/v1"), load_model(str(tmp_path / "local"))
    assert remote.version == local.version
    pictures = _pictures(3)
    np.testing.assert_array_equal(remote.predict(pictures), local.predict(pictures))


def test_predict_takes_any_mode_and_size():
    net = _net()
    from mlbatch.model.loaded import LoadedModel
    model = LoadedModel({"thresholds": THRESHOLDS, "version": "x", "name": "n"}, net)
    gray = Image.new("L", (10, 50), 128)
    rgba = Image.new("RGBA", (64, 64), (10, 20, 30, 255))
    out = model.predict([gray, rgba])
    assert out.shape == (2, 3)
    assert model.predict([]).shape == (0, 3)


def test_jpegs_decode_at_reduced_scale_for_a_smaller_model_everywhere():
    """One decode contract: a camera frame for a 32-pixel model decodes at 1/8 scale (80x60 >= 32),
    in images.decode (the job, training, evaluation) and in predict on a lazily opened file alike."""
    import io

    from mlbatch.core import images
    from mlbatch.model.loaded import LoadedModel
    from mlbatch.synth import render_frame

    data = render_frame(seed=3, index=0, width=640, height=480)
    assert images.decode(data).size == (640, 480)
    assert images.decode(data, draft_size=32).size == (80, 60)
    assert images.decode(data, draft_size=64).size == (160, 120)   # 1/8 would give 60 < 64 rows
    assert images.decode(data, draft_size=480).size == (640, 480)  # nothing smaller is big enough
    png = io.BytesIO()
    Image.open(io.BytesIO(data)).save(png, "PNG")
    assert images.decode(png.getvalue(), draft_size=32).size == (640, 480)  # only JPEG scales on decode

    model = LoadedModel({"thresholds": THRESHOLDS, "version": "x", "name": "n"}, _net())
    as_job = model.predict_pixels(images.resize(images.decode(data, draft_size=32), 32)[None])
    lazily_opened = model.predict([Image.open(io.BytesIO(data))])
    np.testing.assert_array_equal(lazily_opened, as_job)
    full = Image.open(io.BytesIO(data))
    full.load()  # already decoded at full size: predict takes the picture as it is
    assert full.size == (640, 480) and model.predict([full]).shape == (1, 3)


def test_changed_weights_are_refused(tmp_path):
    save_package(_net(), str(tmp_path), THRESHOLDS)
    weights = tmp_path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="does not match the sha256"):
        load_model(str(tmp_path))


def test_missing_files_are_refused(tmp_path):
    with pytest.raises(PackageError, match=f"{META_FILE} is missing"):
        load_model(str(tmp_path / "nothing-here"))
    save_package(_net(), str(tmp_path / "pkg"), THRESHOLDS)
    (tmp_path / "pkg" / WEIGHTS_FILE).unlink()
    with pytest.raises(PackageError, match=f"{WEIGHTS_FILE} is missing"):
        load_model(str(tmp_path / "pkg"))


def test_missing_package_on_s3_is_refused(bucket):
    with pytest.raises(PackageError, match="is missing"):
        load_model(f"{bucket}/no/such/model")


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(format_version=99), "unknown format version 99"),
    (lambda m: m.update(format="something-else"), "not an mlbatch model"),
    (lambda m: m.pop("thresholds"), "lacks 'thresholds'"),
    (lambda m: m.update(labels=["car", "car", "bus"]), "'car' is repeated"),
])
def test_bad_descriptions_are_refused(tmp_path, change, message):
    save_package(_net(), str(tmp_path), THRESHOLDS)
    meta_path = tmp_path / META_FILE
    meta = json.loads(meta_path.read_text())
    change(meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(PackageError, match=message):
        load_model(str(tmp_path))


def test_a_pickle_in_place_of_the_weights_is_refused(tmp_path):
    """Weights are only ever read with safetensors: a pickle is rejected, never executed."""
    import hashlib
    import pickle

    save_package(_net(), str(tmp_path), THRESHOLDS)
    payload = pickle.dumps({"x": 1})
    (tmp_path / WEIGHTS_FILE).write_bytes(payload)
    meta = json.loads((tmp_path / META_FILE).read_text())
    meta["weights"]["sha256"] = hashlib.sha256(payload).hexdigest()  # even with a matching digest
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(PackageError, match="weights do not fit"):
        load_model(str(tmp_path))


def test_save_needs_a_threshold_per_label(tmp_path):
    with pytest.raises(ValueError, match="no threshold for labels"):
        save_package(_net(), str(tmp_path), {"car": 0.5})


def test_storage_round_trip_helpers(tmp_path):
    storage.write_text(str(tmp_path / "a" / "b.txt"), "hi")
    assert storage.read_text(f"file://{tmp_path}/a/b.txt") == "hi"
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        storage.read_bytes("ftp://host/x.jpg")


def test_the_job_driver_and_decode_tasks_do_not_import_torch():
    """torch costs a second and ~100 MB per process: only the predictor actors should pay it."""
    import subprocess
    import sys

    code = ("import sys, mlbatch, mlbatch.cli, mlbatch.label.job, mlbatch.nightly.night, mlbatch.review.views; "
            "mlbatch.cli.build_parser(); print(sorted(m for m in ('torch', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert callable(mlbatch.load_model)  # still there, imported on first use


def test_the_pixel_input_path_normalises_exactly_as_the_array_path_and_stays_channels_last():
    """The job's uint8 pixels are normalised by ``to_input`` on the model's device; it must give
    ``images.normalise``'s arrays (what ``preprocess`` hands ``predict_arrays``), so both paths feed the
    net alike, and keep the pixels' channels-last memory, which the net runs in, instead of a copy
    into torch's default layout that the net would turn straight back."""
    from mlbatch.core import images
    from mlbatch.model.loaded import to_input

    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 16, 16, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = to_input(torch.from_numpy(pixels), mean, std)
    assert x.shape == (5, 3, 16, 16)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    np.testing.assert_allclose(x.numpy(), images.normalise(pixels, mean, std), atol=1e-6)


@pytest.mark.parametrize("name", ["cnn-small", "resnet-mini"])
def test_the_network_runs_channels_last_and_gives_the_contiguous_layouts_values(name, tmp_path):
    """The network keeps its convolutions' weights and its pictures channels-last (faster on CPU,
    benchmarks/memory_format.py); what a user sees, the probabilities and the package, does not depend
    on it: the same values as torch's default layout, a package that reloads to the same predictions."""
    net = _net(backbone=name)
    convs = [m.weight for m in net.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(w.is_contiguous() for w in convs)   # the test can tell the layouts apart
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        fast = net.predict_proba(x)
        plain = MultiLabelNet(net.spec).eval()
        plain.load_state_dict(net.state_dict())
        plain.to(memory_format=torch.contiguous_format)
        slow = torch.sigmoid(plain.classify(plain.backbone(x)))
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    save_package(net, str(tmp_path / "pkg"), {label: 0.5 for label in LABELS})
    loaded = load_model(str(tmp_path / "pkg"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.net.predict_proba(x), fast, atol=1e-6, rtol=0)
