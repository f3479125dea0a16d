"""What a model is, without torch: its labels, backbone, input size and normalisation.

``ModelSpec`` is stored in a package's ``mlbatch-model.json`` and rebuilt from it
(``spec_from_meta``); the CLI and the labeling driver read it without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .package import validate_labels

DEFAULT_BACKBONE = "cnn-small"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRECISIONS = ("auto", "fp32", "fp16", "bf16")   # what a predictor computes in (``loaded.resolve_precision``)


def resolve_precision(requested: str, device: str) -> str:
    """The precision a predictor on ``device`` computes in: ``auto`` is fp16 on CUDA (mixed precision,
    the network's weights stay fp32) and fp32 elsewhere."""
    if requested not in PRECISIONS:
        raise ValueError(f"--precision {requested!r}: choose one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested
    return "fp16" if device.startswith("cuda") else "fp32"


@dataclass
class ModelSpec:
    """Everything needed to rebuild the network and feed it: stored in ``mlbatch-model.json``."""

    labels: list[str]
    backbone: str = DEFAULT_BACKBONE
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    hidden: int = 256
    dropout: float = 0.2
    image_size: int = 64
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        self.labels = validate_labels(self.labels)
        self.mean, self.std = tuple(self.mean), tuple(self.std)


def spec_from_meta(meta: dict[str, Any]) -> ModelSpec:
    return ModelSpec(labels=meta["labels"], backbone=meta["backbone"]["name"],
                     backbone_kwargs=meta["backbone"].get("kwargs", {}), hidden=meta.get("hidden", 256),
                     dropout=meta.get("dropout", 0.0), image_size=meta["input"]["size"],
                     mean=meta["input"]["mean"], std=meta["input"]["std"])
