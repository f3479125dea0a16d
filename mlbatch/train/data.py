"""The training and validation sets: decoded once into uint8 tensors, exactly as the labeling job decodes,
and a held-out validation set drawn by rows or by whole groups (a group is never on both sides).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from ..core import images, manifest
from .config import TrainConfig

log = logging.getLogger(__name__)


def load_tensor(data: manifest.LabeledData, size: int, progress: bool = False, chunk: int = 512) -> torch.Tensor:
    """All images of ``data`` resized to ``size``: uint8 (n, 3, size, size)."""
    out = torch.empty((len(data), 3, size, size), dtype=torch.uint8)
    bar = tqdm(total=len(data), desc="loading images", unit="img", disable=not progress, leave=False)
    for start in range(0, len(data), chunk):
        end = min(start + chunk, len(data))
        # decoded and resized as the labeling job does, so training sees the pixels inference will see
        pictures = manifest.fetch_decoded(data.image_uris[start:end], data.sources[start:end], draft_size=size)
        for k, pic in enumerate(pictures):
            out[start + k] = torch.from_numpy(images.resize(pic, size).transpose(2, 0, 1).copy())
        bar.update(end - start)
    bar.close()
    return out


@dataclass
class TrainingData:
    """Training and validation inputs: uint8 pictures, or backbone features when it is frozen."""

    x_train: torch.Tensor
    y_train: np.ndarray
    x_val: torch.Tensor
    y_val: np.ndarray
    split: dict | None = None  # how a held-out validation set was drawn, for the package


def read_data(config: TrainConfig, labels: list[str], size: int) -> TrainingData:
    column = config.val_group_column
    data = manifest.read_labeled(config.manifests, labels, group_column=column)
    if config.val_manifests:
        val_data = manifest.read_labeled(config.val_manifests, labels)
        return TrainingData(load_tensor(data, size, config.progress), data.targets,
                     load_tensor(val_data, size, config.progress), val_data.targets)
    split = None
    if column is None:
        tr, va = _split(data, config.val_fraction, config.seed)
    else:
        assert data.groups is not None
        found = sorted(set(data.groups))
        if len(found) < 2:
            raise manifest.ManifestError(
                f"group column {column!r} of {', '.join(config.manifests)} holds {len(found)} group"
                f"{'' if len(found) == 1 else 's'} ({', '.join(map(repr, found[:3]))}); a group split needs at least 2")
        tr, va = group_split(data.groups, config.val_fraction, config.seed)
        split = {"val_group_column": column, "train_groups": len({data.groups[i] for i in tr}),
                 "val_groups": len({data.groups[i] for i in va})}
        log.info("validation: %d of %d groups of %r (%d of %d rows)", split["val_groups"], len(found), column,
                 len(va), len(data))
    x_all = load_tensor(data, size, config.progress)  # after the split, so a bad group column fails fast
    return TrainingData(x_all[tr], data.targets[tr], x_all[va], data.targets[va], split)


def _split(data: manifest.LabeledData, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(len(data))
    n_val = max(1, int(round(len(data) * fraction)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def group_split(groups: list[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, validation) holding out about ``fraction`` of the rows, whole groups only.

    The groups are visited in an order shuffled by ``seed``; each joins validation when that
    brings the validation row count closer to ``fraction`` of all rows. Guaranteed: no group on
    both sides; at least one group on each side; the same split for the same groups and seed;
    validation rows within half the largest group's rows of the target, unless keeping a group
    on each side forces more. (scikit-learn's GroupShuffleSplit counts groups, not rows.)
    """
    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must be between 0 and 1, not {fraction}")
    names, inverse, sizes = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    if len(names) < 2:
        raise ValueError(f"a group split needs at least 2 groups, found {len(names)}")
    target = fraction * len(groups)
    taken = np.zeros(len(names), bool)
    n_val = 0
    for g in np.random.default_rng(seed).permutation(len(names)):
        if n_val + sizes[g] / 2 < target:  # |n_val + size - target| < |n_val - target|
            taken[g] = True
            n_val += sizes[g]
    if not taken.any() or taken.all():  # keep a group on each side: move the smallest one across
        taken[np.argmin(sizes)] = not taken.any()
    in_val = taken[inverse.ravel()]
    return np.flatnonzero(~in_val), np.flatnonzero(in_val)
