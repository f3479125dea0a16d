"""Training's configuration, kept apart from the training code so that the CLI can show its
defaults without importing torch: ``mlbatch label``, ``query`` and ``--help`` start in about a
second instead of three.

The defaults were chosen by validation on three kinds of synthetic data (street scenes, glyphs
on clutter, coloured shapes with counts; ``benchmarks/recipe.py``), never on test data, and
must hold on pictures nobody tuned for: so the default augmentation is only what preserves
every label in any domain (a mirror image turns a left arrow into a right one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..model.calibration import METHODS as CALIBRATIONS
from .schedule import SCHEDULES

# Augmentations by name. The default ones preserve labels in any domain; flips and quarter
# turns do not (digits, text, left/right signs, "above"), so they are options to switch on.
AUGMENTATIONS = {
    "shift": "move the picture by up to 1/16 of its side (edges replicated)",
    "color": "brightness and contrast within +-20%",
    "zoom": "shrink half the pictures to 70-100% of their side, at a random place on a border of their mean "
            "colour (everything stays in view: a farther camera)",
    "balance": "white balance up to 20% warmer or cooler (another camera, another light)",
    "blur": "soften half the pictures with a Gaussian of 0.3-1 pixel (a softer lens, a focus slightly off)",
    "hflip": "mirror left-right (only where a mirrored picture has the same labels)",
    "vflip": "mirror top-bottom (aerial or microscope pictures)",
}
DEFAULT_AUGMENT = ("shift", "color")


@dataclass
class TrainConfig:
    """What one training run needs; ``mlbatch train`` fills it from flags, ``train.train`` runs it."""

    manifests: list[str]
    output: str
    labels: list[str] | None = None          # default: inferred from the manifests
    val_manifests: list[str] = field(default_factory=list)  # default: hold out val_fraction
    val_fraction: float = 0.15
    val_group_column: str | None = None      # hold out whole groups (a camera, a day) of this column
    backbone: str | None = None              # default: the one backbone_weights records, else cnn-small
    backbone_kwargs: dict = field(default_factory=dict)  # to the backbone's factory; default: what a package records
    backbone_weights: str | None = None      # safetensors / .pt state dict / model package to start from
    pretrained: bool = False                 # the backbone library's own pretrained weights (needs its hub)
    freeze_backbone: bool = False            # train only the hidden layer and heads, on features computed once
    image_size: int = 64
    hidden: int = 256
    epochs: int = 50                         # the plan: the cosine spans them (plateau: at most, patience ends it)
    patience: int = 8                        # plateau schedule: stop when validation mAP has not improved this long
    time_budget: float | None = None         # seconds: shortens the plan if it would not fit (warned, recorded)
    batch_size: int = 64
    lr: float = 3e-3
    lr_schedule: str = "cosine"              # or "plateau": cut by 3 when validation stalls (train.schedule)
    backbone_lr_scale: float | None = None   # backbone lr = lr * this; default 1, or 0.1 from pretrained weights
    weight_decay: float = 1e-4
    augment: tuple[str, ...] = DEFAULT_AUGMENT
    pos_weight: bool = False                 # weight positives by negatives/positives per label
    threshold_policy: str = "guarded:0.5"    # chosen leave-one-kind-out; never below 0.5 (docs/training.md)
    calibration: str = "none"   # none | platt: per-label Platt scaling fitted on validation, before the thresholds
    seed: int = 0
    name: str = "mlbatch-multilabel"
    progress: bool = True

    def __post_init__(self) -> None:
        self.augment = tuple(self.augment)
        unknown = [a for a in self.augment if a not in AUGMENTATIONS]
        if unknown:
            raise ValueError(f"unknown augmentation {unknown[0]!r}; choose from {', '.join(AUGMENTATIONS)}")
        if not isinstance(self.backbone_kwargs, dict) or not all(isinstance(k, str) for k in self.backbone_kwargs):
            raise ValueError("backbone_kwargs: expected a mapping of argument names to values")
        if self.pretrained and self.backbone_weights:
            raise ValueError("give either pretrained (the library's hub weights) or backbone_weights, not both")
        if self.freeze_backbone and not (self.pretrained or self.backbone_weights):
            raise ValueError("freezing the backbone needs pretrained weights (--pretrained or --backbone-weights); "
                             "a frozen random backbone learns nothing")
        if self.val_group_column is not None:
            if not self.val_group_column.strip():
                raise ValueError("the validation group column is empty; name a manifest column")
            if self.val_manifests:
                raise ValueError("a validation group column splits the training manifests; it cannot be combined "
                                 "with validation manifests (give one or the other)")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration {self.calibration!r}: choose one of {', '.join(CALIBRATIONS)}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"learning-rate schedule {self.lr_schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.epochs < 1 or self.patience < 1 or (self.time_budget is not None and self.time_budget <= 0):
            raise ValueError("epochs and patience must be at least 1 and the time budget positive")
