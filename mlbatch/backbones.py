"""Backbones: one registry, one factory (``create_backbone``), like timm's ``create_model``.

A backbone maps a batch of images (B, 3, H, W) to features (B, F) and says F in
``out_features``. A new backbone is one function decorated with ``@register("name")``.
``torchvision:NAME`` and ``timm:NAME`` build those libraries' models (random weights; give
initial weights as a safetensors file) when they are installed; nothing is downloaded.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = fn
        return fn
    return wrap


def available_backbones() -> list[str]:
    return sorted(_REGISTRY) + ["torchvision:NAME", "timm:NAME"]


def create_backbone(name: str, **kwargs) -> nn.Module:
    """Build the backbone called ``name``; the module has an ``out_features`` attribute."""
    if name.startswith("torchvision:"):
        return _torchvision(name.split(":", 1)[1], **kwargs)
    if name.startswith("timm:"):
        return _timm(name.split(":", 1)[1], **kwargs)
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(available_backbones())}")
    return _REGISTRY[name](**kwargs)


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Features(nn.Sequential):
    """A Sequential ending in global average pooling, with ``out_features`` set."""

    def __init__(self, *layers: nn.Module, out_features: int):
        super().__init__(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = out_features


@register("cnn-small")
def cnn_small(width: int = 32) -> nn.Module:
    """A compact VGG-style CNN: trains on a 2-core CPU in minutes at 64x64 input."""
    w = width
    return _Features(
        _conv_bn(3, w, 2), _conv_bn(w, w),
        _conv_bn(w, 2 * w, 2), _conv_bn(2 * w, 2 * w),
        _conv_bn(2 * w, 4 * w, 2), _conv_bn(4 * w, 4 * w, 2),
        out_features=4 * w,
    )


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(cin, cout, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


@register("resnet-mini")
def resnet_mini(width: int = 32, blocks: int = 2) -> nn.Module:
    """A small ResNet (basic residual blocks, four stages) for larger inputs and harder data."""
    layers: list[nn.Module] = [_conv_bn(3, width, 2)]
    cin = width
    for stage in range(4):
        cout = width * 2 ** stage
        for b in range(blocks):
            layers.append(_BasicBlock(cin, cout, 2 if b == 0 and stage > 0 else 1))
            cin = cout
    return _Features(*layers, out_features=cin)


def _with_out_features(model: nn.Module, out_features: int) -> nn.Module:
    model.out_features = out_features
    return model


def _torchvision(arch: str, **kwargs) -> nn.Module:
    try:
        import torchvision
    except Exception as exc:  # ImportError, or the operator errors of a mismatched torch build
        raise ValueError(f"backbone 'torchvision:{arch}' needs torchvision, which does not import: {exc}") from exc
    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    for attr in ("fc", "classifier", "head", "heads"):
        if hasattr(model, attr):
            setattr(model, attr, nn.Identity())
            break
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 224, 224))
    return _with_out_features(model, int(out.shape[1]))


def _timm(arch: str, **kwargs) -> nn.Module:
    try:
        import timm
    except Exception as exc:
        raise ValueError(f"backbone 'timm:{arch}' needs timm, which does not import: {exc}") from exc
    model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    return _with_out_features(model, int(model.num_features))
