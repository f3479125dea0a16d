"""Training: BCE per label (unknowns masked), best epoch on validation, thresholds on validation.

The recipe, read top to bottom in ``train``:

1. Decode the training and validation pictures once into uint8 tensors (the fine-tuning-sized
   sets this is for fit in memory), exactly as the labeling job decodes them.
2. Build the network: a backbone from scratch, from a weights file or package, or from its
   library's hub; its input normalisation comes with the weights.
3. Fine-tune everything, or, with ``freeze_backbone``, compute the backbone's features once
   and train only the shared hidden layer and the heads on them (seconds, not minutes).
4. Epochs under a learning-rate ``schedule`` (``schedule.py``): the default cosine runs
   ``epochs``, a plan that does not depend on the machine's load, and keeps the latest epoch
   within ``MIN_DELTA`` of the best validation mAP; ``plateau`` stops by ``patience`` and keeps
   the best epoch. A ``time_budget``, when given, only shortens the plan, with a warning and a
   note in the package (``time_budget_cut``).
5. Per-label thresholds on the validation scores; write the package with what was done.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ..core import images, manifest
from ..model import calibration
from ..model.net import MultiLabelNet, save_package
from ..model.package import check_backbone
from ..model.spec import DEFAULT_BACKBONE, IMAGENET_MEAN, IMAGENET_STD, ModelSpec
from ..model.weights import InitialWeights, load_backbone_weights, read_initial_weights
from .config import TrainConfig
from .metrics import choose_thresholds, compute_metrics, parse_policy
from .schedule import MIN_DELTA, Schedule

log = logging.getLogger(__name__)


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean binary cross-entropy over the known (non-NaN) targets only."""
    known = ~torch.isnan(targets)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.nan_to_num(targets, nan=0.0), pos_weight=pos_weight, reduction="none")
    return (loss * known).sum() / known.sum().clamp(min=1)


def stop_reason(val_maps: list[float], epochs: int, patience: int | None,
                min_delta: float = MIN_DELTA) -> str | None:
    """Why training stops after the epochs whose validation mAPs are ``val_maps``, or None to go on.

    It stops when ``patience`` epochs in a row have not beaten the best earlier epoch by
    ``min_delta`` (None: never), or when ``epochs`` epochs are done.
    """
    if len(val_maps) >= epochs:
        return f"reached {epochs} epochs"
    if patience is None:
        return None
    best_at = 0
    for i, value in enumerate(val_maps):
        if value > val_maps[best_at] + min_delta:
            best_at = i
    if len(val_maps) - 1 - best_at >= patience:
        return f"validation mAP did not improve for {patience} epochs"
    return None


def budget_ends(time_budget: float | None, elapsed: float, epochs_done: int) -> bool:
    """Whether one more epoch at the pace so far would end past ``time_budget`` (None: never)."""
    return time_budget is not None and elapsed * (epochs_done + 1) / epochs_done > time_budget


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


def _normalise(x: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def _zoom_out(x: torch.Tensor, scales: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
    """Each picture shrunk by its scale and put at its place (0-1 of the free room) on its mean colour."""
    n, c, h, w = x.shape
    out = x.mean(dim=(2, 3), keepdim=True).expand(n, c, h, w).clone()
    for i in range(n):
        if float(scales[i]) >= 1.0:
            out[i] = x[i]
            continue
        sh, sw = max(1, round(h * float(scales[i]))), max(1, round(w * float(scales[i])))
        small = torch.nn.functional.interpolate(x[i:i + 1], size=(sh, sw), mode="bilinear", antialias=True,
                                                align_corners=False)
        dy, dx = int(float(places[i, 0]) * (h - sh + 1) * 0.999), int(float(places[i, 1]) * (w - sw + 1) * 0.999)
        out[i, :, dy:dy + sh, dx:dx + sw] = small[0]
    return out


def _blur(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Each picture through a separable Gaussian of its own sigma (0: unchanged), edges replicated."""
    n, c, h, w = x.shape
    taps = torch.arange(-2, 3, dtype=x.dtype)
    kernels = torch.exp(-taps.square() / (2 * sigmas.clamp(min=1e-3).square().view(n, 1)))
    kernels = torch.where(sigmas.view(n, 1) > 0, kernels, (taps == 0).to(x.dtype))
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)   # (n*c, 5)
    flat = torch.nn.functional.pad(x.reshape(1, n * c, h, w), (2, 2, 2, 2), mode="replicate")
    flat = torch.nn.functional.conv2d(flat, kernels.view(n * c, 1, 1, 5), groups=n * c)
    flat = torch.nn.functional.conv2d(flat, kernels.view(n * c, 1, 5, 1), groups=n * c)
    return flat.view(n, c, h, w)


def augment(x: torch.Tensor, gen: torch.Generator, names: tuple[str, ...]) -> torch.Tensor:
    """The augmentations ``names`` (see ``config.AUGMENTATIONS``) on a uint8 batch -> float batch, 0-255."""
    n, _, h, w = x.shape
    x = x.float()
    if "hflip" in names:
        x = torch.where((torch.rand(n, generator=gen) < 0.5).view(n, 1, 1, 1), x.flip(3), x)
    if "vflip" in names:
        x = torch.where((torch.rand(n, generator=gen) < 0.5).view(n, 1, 1, 1), x.flip(2), x)
    if "shift" in names:
        pad = max(1, h // 16)
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
        offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen).tolist()
        x = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])
    if "zoom" in names:
        scales = torch.rand(n, generator=gen) * 0.3 + 0.7
        scales = torch.where(torch.rand(n, generator=gen) < 0.5, scales, torch.ones(n))   # half the pictures
        x = _zoom_out(x, scales, torch.rand(n, 2, generator=gen))
    if "blur" in names:
        sigmas = torch.rand(n, generator=gen) * 0.7 + 0.3
        x = _blur(x, torch.where(torch.rand(n, generator=gen) < 0.5, sigmas, torch.zeros(n)))
    if "balance" in names:
        warm = (torch.rand(n, 1, 1, generator=gen) - 0.5) * 0.4
        x = x * torch.cat([1 + warm, torch.ones_like(warm), 1 - warm], dim=1).unsqueeze(-1)
    if "color" in names:
        gain = 1 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.4
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        contrast = 1 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.4
        x = ((x - mean) * contrast + mean) * gain
    return x.clamp(0, 255)


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


def _map(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score
    aps = []
    for j in range(y.shape[1]):
        k = ~np.isnan(y[:, j])
        if y[k, j].any():
            aps.append(average_precision_score(y[k, j], s[k, j]))
    return float(np.mean(aps)) if aps else 0.0


@dataclass
class _Data:
    """Training and validation inputs: uint8 pictures, or backbone features when it is frozen."""

    x_train: torch.Tensor
    y_train: np.ndarray
    x_val: torch.Tensor
    y_val: np.ndarray
    split: dict | None = None  # how a held-out validation set was drawn, for the package


def _read_data(config: TrainConfig, labels: list[str], size: int) -> _Data:
    column = config.val_group_column
    data = manifest.read_labeled(config.manifests, labels, group_column=column)
    if config.val_manifests:
        val_data = manifest.read_labeled(config.val_manifests, labels)
        return _Data(load_tensor(data, size, config.progress), data.targets,
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
    return _Data(x_all[tr], data.targets[tr], x_all[va], data.targets[va], split)


def _build(config: TrainConfig, labels: list[str]) -> tuple[MultiLabelNet, dict]:
    """The network with its initial weights, and where they came from (recorded in the package)."""
    init: InitialWeights | None = read_initial_weights(config.backbone_weights) if config.backbone_weights else None
    backbone = config.backbone or (init.backbone if init and init.backbone else DEFAULT_BACKBONE)
    kwargs = config.backbone_kwargs
    if not kwargs and init and init.backbone_kwargs and backbone == init.backbone:
        kwargs = init.backbone_kwargs  # the package's own backbone, as it was built
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if init and init.mean:
        mean, std = init.mean, init.std
    check_backbone({"name": backbone, "kwargs": kwargs})  # what a package may carry, before any work
    spec = ModelSpec(labels=labels, backbone=backbone, backbone_kwargs=dict(kwargs), hidden=config.hidden,
                     image_size=config.image_size, mean=mean, std=std)
    net = MultiLabelNet(spec, pretrained=config.pretrained)
    source: dict = {"weights": "random"}
    if init:
        load_backbone_weights(net, init)
        source = {"weights": init.source.rsplit("/", 1)[-1], "sha256": init.sha256}
    elif config.pretrained:
        cfg = getattr(net.backbone, "pretrained_cfg", None) or {}
        if cfg.get("mean"):  # timm says what its weights expect
            spec.mean, spec.std = tuple(cfg["mean"]), tuple(cfg["std"])
        source = {"weights": f"{backbone} library pretrained", "tag": cfg.get("tag")}
    return net, source


def _features(net: MultiLabelNet, x: torch.Tensor, batch: int = 256, progress: bool = False) -> torch.Tensor:
    """The frozen backbone's features of uint8 pictures, computed once."""
    net.backbone.eval()
    out = []
    with torch.inference_mode():
        for i in tqdm(range(0, len(x), batch), desc="features", unit="batch", disable=not progress, leave=False):
            out.append(net.features(_normalise(x[i:i + batch], net.spec)))
    return torch.cat(out)


def train(config: TrainConfig) -> dict:
    """Train a model and write its package to ``config.output``; returns the package metadata."""
    parse_policy(config.threshold_policy)  # refuse a bad policy before any work
    torch.manual_seed(config.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.monotonic()
    labels = config.labels or manifest.infer_labels(config.manifests)
    log.info("labels: %s", labels)
    net, source = _build(config, labels)
    spec = net.spec
    data = _read_data(config, labels, spec.image_size)
    log.info("training on %d images, validating on %d (%s backbone %s)", len(data.x_train), len(data.x_val),
             "frozen" if config.freeze_backbone else "fine-tuned", spec.backbone)

    if config.freeze_backbone:
        for p in net.backbone.parameters():
            p.requires_grad_(False)
        data.x_train = _features(net, data.x_train, progress=config.progress)
        data.x_val = _features(net, data.x_val, progress=config.progress)
        forward: Callable[[torch.Tensor], torch.Tensor] = net.classify
        prepare: Callable[[torch.Tensor], torch.Tensor] = lambda x: x  # noqa: E731
        groups = [{"params": [*net.hidden.parameters(), *net.heads.parameters()], "lr": config.lr}]
    else:
        forward = net
        prepare = lambda x: _normalise(x, spec)  # noqa: E731
        scale = config.backbone_lr_scale
        scale = scale if scale is not None else (0.1 if config.backbone_weights or config.pretrained else 1.0)
        groups = [{"params": list(net.backbone.parameters()), "lr": config.lr * scale},
                  {"params": [*net.hidden.parameters(), *net.heads.parameters()], "lr": config.lr}]

    def scores(x: torch.Tensor, batch: int = 256) -> np.ndarray:
        net.eval()
        with torch.inference_mode():
            return torch.cat([torch.sigmoid(forward(prepare(x[i:i + batch]))) for i in range(0, len(x), batch)]).numpy()

    def train_step(idx: torch.Tensor) -> torch.Tensor:
        x = data.x_train[idx]
        if not config.freeze_backbone:
            x = augment(x, gen, config.augment)
        return masked_bce(forward(prepare(x)), y_train[idx], pos_weight)

    pos_weight = None
    if config.pos_weight:
        pos = np.nansum(data.y_train, axis=0)
        neg = np.sum(~np.isnan(data.y_train), axis=0) - pos
        pos_weight = torch.tensor(neg / np.maximum(pos, 1), dtype=torch.float32)
    opt = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(data.x_train) // config.batch_size)
    schedule = Schedule(opt, config.lr_schedule, steps_per_epoch, config.epochs, config.time_budget)
    gen = torch.Generator().manual_seed(config.seed)
    y_train = torch.from_numpy(data.y_train)
    best, best_map = (-1.0, 0, None), -1.0   # the kept epoch (its mAP, number, weights); the best mAP seen
    history: list[dict] = []
    stopped = budget_cut = None
    loop_started = time.monotonic()
    for epoch in range(1, config.epochs + 1):
        net.train()
        if config.freeze_backbone:
            net.backbone.eval()
        order = torch.randperm(len(data.x_train), generator=gen)
        bar = tqdm(range(0, len(order), config.batch_size), desc=f"epoch {epoch}", unit="batch",
                   disable=not config.progress, leave=False)
        total = 0.0
        for start in bar:
            idx = order[start:start + config.batch_size]
            loss = train_step(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            total += loss.item() * len(idx)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        val_map = _map(data.y_val, scores(data.x_val))
        epoch_end = time.monotonic() - loop_started   # the pace the schedule plans by, as the history records it
        history.append({"epoch": epoch, "train_loss": round(total / len(data.x_train), 5), "val_map": round(val_map, 5),
                        "lr": opt.param_groups[-1]["lr"], "seconds": round(epoch_end, 1)})
        schedule.epoch_done(val_map, epoch_end)
        log.info("epoch %d: train loss %.4f, validation mAP %.4f", epoch, total / len(data.x_train), val_map)
        if best[2] is None or schedule.keep(val_map, best_map):
            best = (val_map, epoch, copy.deepcopy(net.state_dict()))
        best_map = max(best_map, val_map)
        elapsed = time.monotonic() - loop_started
        stopped = schedule.finished() or stop_reason([h["val_map"] for h in history], config.epochs,
                                                     config.patience if schedule.patience_ends_runs else None)
        if stopped is None and budget_ends(config.time_budget, elapsed, epoch):
            stopped = f"time budget of {config.time_budget:g}s"
            budget_cut = f"the {stopped} ended training after {epoch} of {config.epochs} epochs"
        if stopped:
            break
    budget_cut = budget_cut or schedule.cut
    if budget_cut:
        log.warning("%s: this model depends on the machine's speed; without --time-budget (or with --epochs %d) "
                    "the same data, flags and seed give the same model anywhere", budget_cut, len(history))
    log.info("stopped after epoch %d: %s; best epoch %d (validation mAP %.4f)", len(history), stopped, best[1], best[0])
    net.load_state_dict(best[2])
    raw = scores(data.x_val)
    fitted = calibration.fit(labels, data.y_val, raw, config.calibration)
    val_scores = calibration.apply(fitted, labels, raw)   # what the package will give
    thresholds = choose_thresholds(labels, data.y_val, val_scores, config.threshold_policy)
    val_report = compute_metrics(labels, data.y_val, val_scores, thresholds)
    summary = {
        "data": {"train": manifest.expand(config.manifests), "val": manifest.expand(config.val_manifests)
                 if config.val_manifests else f"held out {config.val_fraction:.0%} of train"
                 + (f", whole groups of {config.val_group_column!r}" if config.val_group_column else ""),
                 "train_rows": int(len(data.x_train)), "val_rows": int(len(data.x_val)), **(data.split or {})},
        "config": {k: v for k, v in asdict(config).items() if k not in ("manifests", "val_manifests", "output")},
        "mode": "frozen backbone" if config.freeze_backbone else "fine-tuned",
        "initial_weights": source,
        "augment": list(config.augment),
        "epochs": len(history),
        "planned_epochs": config.epochs,
        "time_budget_cut": budget_cut,   # None: the plan ran as configured, whatever the machine's load
        "best_epoch": best[1],
        "stopped": stopped,
        "seconds": round(time.monotonic() - started, 1),
        "threshold_policy": config.threshold_policy,
        "history": history,
        "validation": {"macro_f1": val_report.macro_f1, "micro_f1": val_report.micro_f1,
                       "map": val_report.mean_average_precision,
                       "per_label": {m.label: {"f1": m.f1, "precision": m.precision, "recall": m.recall,
                                               "average_precision": m.average_precision} for m in val_report.per_label}},
    }
    return save_package(net, config.output, thresholds, name=config.name, training=summary, calibration=fitted)
