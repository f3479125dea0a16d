"""Backbones: one registry, one factory (``create_backbone``), like timm's ``create_model``.

A backbone maps a batch of images (B, 3, H, W) to features (B, F) and says F in
``out_features``. Names are:

- ``timm:NAME`` and ``torchvision:NAME``: any model of those libraries, its classifier removed.
  ``pretrained=True`` asks the library for its own pretrained weights (its hub must be
  reachable, as on most clusters); elsewhere start from a safetensors file instead
  (``mlbatch convert-weights``, ``--backbone-weights``).
- a registered name: the few backbones that no library offers in the form we want. A new one
  is one function decorated with ``@register("name")``.

Keyword arguments go to the library's factory (a package may carry only those in
``package.BACKBONE_KWARGS``), except ``feature_maps=N`` on a ``timm:`` backbone, which is mlbatch's:
the features are then the model's own final map and its last N stage outputs, each average and max
pooled (``_PooledMaps``).

``head_keys`` on the returned module names the state-dict prefixes of the classifier that was
removed, so that a foreign checkpoint of the whole network loads into the backbone exactly.
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
    return sorted(_REGISTRY) + ["timm:NAME", "torchvision:NAME"]


def create_backbone(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """Build the backbone called ``name``; the module has ``out_features`` and ``head_keys``.

    ``pretrained`` loads the library's own pretrained weights (``timm:``/``torchvision:`` only).
    """
    if name.startswith("timm:"):
        return _timm(name.split(":", 1)[1], pretrained, **kwargs)
    if name.startswith("torchvision:"):
        return _torchvision(name.split(":", 1)[1], pretrained, **kwargs)
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(available_backbones())}")
    if pretrained:
        raise ValueError(f"backbone {name!r} has no pretrained weights; use a timm: or torchvision: backbone, "
                         "or give initial weights with --backbone-weights")
    try:
        model = _REGISTRY[name](**kwargs)
    except TypeError as exc:
        raise _bad_arguments(name, kwargs, exc) from None
    return _finish(model, head_keys=(), input_size=64)


def _bad_arguments(name: str, kwargs: dict, exc: TypeError) -> ValueError:
    """A factory's TypeError (an argument it does not take, or of the wrong type), named as the user gave it."""
    return ValueError(f"backbone {name!r} with arguments {kwargs}: {exc}")


def _finish(model: nn.Module, head_keys: tuple[str, ...], input_size: int) -> nn.Module:
    """Set ``out_features``, measured by one forward pass (some models' attributes say otherwise),
    and ``head_keys``."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model.out_features = int(model(torch.zeros(1, 3, input_size, input_size)).shape[1])
    model.train(was_training)
    model.head_keys = tuple(head_keys)
    return model


# ---- hand-written: only what no library gives ------------------------------------------------

def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _AvgMaxPool(nn.Module):
    """Global average and global max pooling side by side: the max answers "is it anywhere?",
    which is what a multi-label presence question asks of a small object in clutter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


class _Features(nn.Sequential):
    """A Sequential ending in global average + max pooling."""

    def __init__(self, *layers: nn.Module):
        super().__init__(*layers, _AvgMaxPool())


class _Standardize(nn.Module):
    """Each picture to mean 0 and standard deviation 1, so the contrast and the tint of a new camera or a new
    light change (almost) nothing the network sees. ``per_channel``: each channel its own deviation too, which
    also takes out a white balance, and with it the picture's overall colour (colours within it stay apart).
    No weights."""

    def __init__(self, per_channel: bool):
        super().__init__()
        self.per_channel = per_channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = x.std(dim=(2, 3), keepdim=True) if self.per_channel else (x - mean).square().mean(
            dim=(1, 2, 3), keepdim=True).sqrt()
        return (x - mean) / (std + 0.05)   # 0.05: ~3 grey levels in ImageNet-normalised units; a flat picture stays flat


@register("cnn-small")
def cnn_small(width: int = 32, standardize: int = 0) -> nn.Module:
    """A compact VGG-style CNN (0.3M parameters), average and max pooled. It earns its place as the default: it trains
    from scratch on a 2-core CPU in minutes at 64x64 input and predicts at thousands of images a
    second there, which no pretrained library model of this machine's choice does. ``standardize``
    puts ``_Standardize`` first: 1 per channel, 2 one deviation for all three."""
    w = width
    return _Features(
        *([_Standardize(per_channel=standardize == 1)] if standardize else []),
        _conv_bn(3, w, 2), _conv_bn(w, w),
        _conv_bn(w, 2 * w, 2), _conv_bn(2 * w, 2 * w),
        _conv_bn(2 * w, 4 * w, 2), _conv_bn(4 * w, 4 * w, 2),
    )


@register("resnet-mini")
def resnet_mini(width: int = 32, blocks: int = 2) -> nn.Module:
    """timm's ResNet with basic blocks at a quarter of ResNet-18's widths: for harder data than
    cnn-small fits, still trainable from scratch on a CPU."""
    from timm.models.resnet import BasicBlock, ResNet
    return ResNet(BasicBlock, [blocks] * 4, num_classes=0, channels=tuple(width * 2 ** i for i in range(4)),
                  stem_width=width, global_pool="catavgmax")


class _PooledMaps(nn.Module):
    """A timm model's final feature map and its last ``maps`` stage outputs, each average and max pooled,
    side by side. A frozen ImageNet network's last map is 2x2 at 64 pixels and says "what" in ImageNet's
    terms; the earlier maps keep the colour, texture and small parts that other data's labels ask about.

    It holds the model's own modules under their own names, so the model's state dict (a converted
    checkpoint, a package) loads into it unchanged."""

    def __init__(self, model: nn.Module, maps: int):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_model", model)  # not registered: its modules are registered above
        self.maps = maps
        self.pretrained_cfg = getattr(model, "pretrained_cfg", {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        final, stages = self._model.forward_intermediates(x, indices=self.maps)
        if final.ndim != 4:
            raise ValueError("feature_maps needs a convolutional timm model, whose maps are (batch, C, H, W)")
        return torch.cat([pooled for m in (final, *stages) for pooled in (m.mean(dim=(2, 3)), m.amax(dim=(2, 3)))],
                         dim=1)


# ---- the field's libraries -----------------------------------------------------------------

def _timm(arch: str, pretrained: bool, feature_maps: int | None = None, **kwargs) -> nn.Module:
    import timm
    if not timm.is_model(arch.split(".")[0]):
        raise ValueError(f"timm has no model {arch!r} (see timm.list_models())")
    if feature_maps is not None and (isinstance(feature_maps, bool) or not isinstance(feature_maps, int)
                                     or feature_maps < 1):
        raise ValueError(f"feature_maps={feature_maps!r}: expected a whole number of stage outputs, at least 1")
    try:
        model = timm.create_model(arch, pretrained=pretrained, num_classes=0, **kwargs)
    except TypeError as exc:
        raise _bad_arguments(f"timm:{arch}", kwargs, exc) from None
    except Exception as exc:  # the hub unreachable, or no pretrained weights for that name
        if not pretrained:
            raise
        raise ValueError(f"could not load timm's pretrained weights for {arch!r}: {type(exc).__name__}: "
                         f"{str(exc)[:300]}. Where no hub is reachable, pass a safetensors file with "
                         "--backbone-weights (see mlbatch convert-weights)") from None
    head = model.pretrained_cfg.get("classifier", "classifier")
    if feature_maps is not None:
        stages = len(getattr(model, "feature_info", []) or [])
        if not hasattr(model, "forward_intermediates") or not stages:
            raise ValueError(f"timm model {arch!r} gives no stage outputs (forward_intermediates); "
                             "feature_maps needs them")
        if feature_maps > stages:
            raise ValueError(f"feature_maps={feature_maps}: timm model {arch!r} has {stages} stage outputs")
        model = _PooledMaps(model, feature_maps)
    return _finish(model, head_keys=(head,) if isinstance(head, str) else tuple(head),
                   input_size=model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])


def _torchvision(arch: str, pretrained: bool, **kwargs) -> nn.Module:
    import torchvision
    if arch not in torchvision.models.list_models():
        raise ValueError(f"torchvision has no model {arch!r} (see torchvision.models.list_models())")
    try:
        model = torchvision.models.get_model(arch, weights="DEFAULT" if pretrained else None, **kwargs)
    except TypeError as exc:
        raise _bad_arguments(f"torchvision:{arch}", kwargs, exc) from None
    except Exception as exc:
        if not pretrained:
            raise
        raise ValueError(f"could not load torchvision's pretrained weights for {arch!r}: {type(exc).__name__}: "
                         f"{str(exc)[:300]}. Where no hub is reachable, pass a safetensors file with "
                         "--backbone-weights") from None
    head = next(a for a in ("fc", "classifier", "head", "heads") if hasattr(model, a))
    setattr(model, head, nn.Identity())
    return _finish(model, head_keys=(head,), input_size=224)
