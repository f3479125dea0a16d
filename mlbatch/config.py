"""Training's configuration, kept apart from the training code so that the CLI can show its
defaults without importing torch: ``mlbatch label``, ``query`` and ``--help`` start in about a
second instead of three.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_BACKBONE = "cnn-small"


@dataclass
class TrainConfig:
    """What one training run needs; ``mlbatch train`` fills it from flags, ``train.train`` runs it."""

    manifests: list[str]
    output: str
    labels: list[str] | None = None          # default: inferred from the manifests
    val_manifests: list[str] = field(default_factory=list)  # default: hold out val_fraction
    val_fraction: float = 0.15
    backbone: str = DEFAULT_BACKBONE
    backbone_weights: str | None = None      # optional safetensors file for the backbone
    image_size: int = 64
    hidden: int = 256
    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    pos_weight: bool = False                 # weight positives by negatives/positives per label
    threshold_policy: str = "f1"
    seed: int = 0
    name: str = "mlbatch-multilabel"
    progress: bool = True
