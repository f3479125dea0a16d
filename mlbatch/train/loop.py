"""Training: BCE per label (unknowns masked), best epoch on validation, thresholds on validation.

The recipe, read top to bottom in ``train``:

1. Decode the training and validation pictures once into uint8 tensors (the fine-tuning-sized
   sets this is for fit in memory), exactly as the labeling job decodes them (``data.py``).
2. Build the network: a backbone from scratch, from a weights file or package, or from its
   library's hub; its input normalisation comes with the weights.
3. Fine-tune everything, or, with ``freeze_backbone``, compute the backbone's features once
   and train only the shared hidden layer and the heads on them (seconds, not minutes).
4. Epochs under a learning-rate ``schedule`` (``schedule.py``), augmented (``augment.py``): the default cosine runs
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
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ..core import manifest
from ..model import calibration
from ..model.net import MultiLabelNet, save_package
from ..model.package import check_backbone
from ..model.spec import DEFAULT_BACKBONE, IMAGENET_MEAN, IMAGENET_STD, ModelSpec
from ..model.weights import InitialWeights, load_backbone_weights, read_initial_weights
from .augment import augment
from .config import TrainConfig
from .data import TrainingData, read_data
from .metrics import Report, choose_thresholds, compute_metrics, parse_policy
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


def _normalise(x: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def _map(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score
    aps = []
    for j in range(y.shape[1]):
        k = ~np.isnan(y[:, j])
        if y[k, j].any():
            aps.append(average_precision_score(y[k, j], s[k, j]))
    return float(np.mean(aps)) if aps else 0.0


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


@dataclass
class _Fit:
    """What training computes and updates: the whole network on pictures, or (backbone frozen) the hidden
    layer and heads on features computed once."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    prepare: Callable[[torch.Tensor], torch.Tensor]   # a batch of inputs -> what ``forward`` takes
    groups: list[dict]                                # the optimiser's parameter groups


@dataclass
class _Steps:
    """The optimiser and what each step draws on: the schedule, the seeded generator, the targets."""

    opt: torch.optim.Optimizer
    schedule: Schedule
    gen: torch.Generator                    # the batch order and the augmentations
    y_train: torch.Tensor
    pos_weight: torch.Tensor | None         # per label: negatives / positives (``pos_weight``)

    @classmethod
    def start(cls, config: TrainConfig, fit: _Fit, data: TrainingData) -> "_Steps":
        pos_weight = None
        if config.pos_weight:
            pos = np.nansum(data.y_train, axis=0)
            neg = np.sum(~np.isnan(data.y_train), axis=0) - pos
            pos_weight = torch.tensor(neg / np.maximum(pos, 1), dtype=torch.float32)
        opt = torch.optim.AdamW(fit.groups, weight_decay=config.weight_decay)
        schedule = Schedule(opt, config.lr_schedule, -(-len(data.x_train) // config.batch_size), config.epochs,
                            config.time_budget)
        return cls(opt, schedule, torch.Generator().manual_seed(config.seed), torch.from_numpy(data.y_train),
                   pos_weight)


@dataclass
class _Epochs:
    """What the epochs did: their history, the kept epoch (its mAP, number, weights), why they stopped."""

    history: list[dict] = field(default_factory=list)
    best_map: float = -1.0          # the best validation mAP seen, kept or not
    kept_map: float = -1.0
    kept_epoch: int = 0
    kept_weights: dict | None = None
    stopped: str | None = None
    budget_cut: str | None = None   # None: the plan ran as configured, whatever the machine's load


def train(config: TrainConfig) -> dict:
    """Train a model and write its package to ``config.output``; returns the package metadata."""
    parse_policy(config.threshold_policy)  # refuse a bad policy before any work
    torch.manual_seed(config.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.monotonic()
    labels = config.labels or manifest.infer_labels(config.manifests)
    log.info("labels: %s", labels)
    net, source = _build(config, labels)
    data = read_data(config, labels, net.spec.image_size)
    log.info("training on %d images, validating on %d (%s backbone %s)", len(data.x_train), len(data.x_val),
             "frozen" if config.freeze_backbone else "fine-tuned", net.spec.backbone)
    fit = _fit(config, net, data)
    epochs = _run_epochs(config, net, data, fit)
    log.info("stopped after epoch %d: %s; best epoch %d (validation mAP %.4f)", len(epochs.history), epochs.stopped,
             epochs.kept_epoch, epochs.kept_map)
    net.load_state_dict(epochs.kept_weights)
    raw = _scores(net, fit, data.x_val)
    fitted = calibration.fit(labels, data.y_val, raw, config.calibration)
    val_scores = calibration.apply(fitted, labels, raw)   # what the package will give
    thresholds = choose_thresholds(labels, data.y_val, val_scores, config.threshold_policy)
    summary = _training_record(config, data, source, epochs, compute_metrics(labels, data.y_val, val_scores, thresholds),
                               seconds=round(time.monotonic() - started, 1))
    return save_package(net, config.output, thresholds, name=config.name, training=summary, calibration=fitted)


def _fit(config: TrainConfig, net: MultiLabelNet, data: TrainingData) -> _Fit:
    """Fine-tune everything (the backbone at a lower rate from pretrained weights), or freeze the backbone
    and replace the pictures in ``data`` by its features."""
    heads = [*net.hidden.parameters(), *net.heads.parameters()]
    if config.freeze_backbone:
        for p in net.backbone.parameters():
            p.requires_grad_(False)
        data.x_train = _features(net, data.x_train, progress=config.progress)
        data.x_val = _features(net, data.x_val, progress=config.progress)
        return _Fit(net.classify, lambda x: x, [{"params": heads, "lr": config.lr}])
    scale = config.backbone_lr_scale
    scale = scale if scale is not None else (0.1 if config.backbone_weights or config.pretrained else 1.0)
    return _Fit(net, lambda x: _normalise(x, net.spec), [{"params": list(net.backbone.parameters()),
                                                          "lr": config.lr * scale}, {"params": heads, "lr": config.lr}])


def _scores(net: MultiLabelNet, fit: _Fit, x: torch.Tensor, batch: int = 256) -> np.ndarray:
    """The network's probabilities for inputs ``x``, in evaluation mode."""
    net.eval()
    with torch.inference_mode():
        return torch.cat([torch.sigmoid(fit.forward(fit.prepare(x[i:i + batch]))) for i in range(0, len(x), batch)]).numpy()


def _run_epochs(config: TrainConfig, net: MultiLabelNet, data: TrainingData, fit: _Fit) -> _Epochs:
    """Epochs under the schedule until it, patience or the time budget ends them; the kept epoch's weights."""
    steps = _Steps.start(config, fit, data)
    opt, schedule = steps.opt, steps.schedule
    out = _Epochs()
    loop_started = time.monotonic()
    for epoch in range(1, config.epochs + 1):
        loss = _one_epoch(config, net, fit, data, steps, epoch)
        val_map = _map(data.y_val, _scores(net, fit, data.x_val))
        epoch_end = time.monotonic() - loop_started   # the pace the schedule plans by, as the history records it
        out.history.append({"epoch": epoch, "train_loss": round(loss, 5), "val_map": round(val_map, 5),
                            "lr": opt.param_groups[-1]["lr"], "seconds": round(epoch_end, 1)})
        schedule.epoch_done(val_map, epoch_end)
        log.info("epoch %d: train loss %.4f, validation mAP %.4f", epoch, loss, val_map)
        if out.kept_weights is None or schedule.keep(val_map, out.best_map):
            out.kept_map, out.kept_epoch, out.kept_weights = val_map, epoch, copy.deepcopy(net.state_dict())
        out.best_map = max(out.best_map, val_map)
        out.stopped = schedule.finished() or stop_reason([h["val_map"] for h in out.history], config.epochs,
                                                         config.patience if schedule.patience_ends_runs else None)
        if out.stopped is None and budget_ends(config.time_budget, time.monotonic() - loop_started, epoch):
            out.stopped = f"time budget of {config.time_budget:g}s"
            out.budget_cut = f"the {out.stopped} ended training after {epoch} of {config.epochs} epochs"
        if out.stopped:
            break
    out.budget_cut = out.budget_cut or schedule.cut
    if out.budget_cut:
        log.warning("%s: this model depends on the machine's speed; without --time-budget (or with --epochs %d) "
                    "the same data, flags and seed give the same model anywhere", out.budget_cut, len(out.history))
    return out


def _one_epoch(config: TrainConfig, net: MultiLabelNet, fit: _Fit, data: TrainingData, steps: _Steps,
               epoch: int) -> float:
    """One pass over the training set in a seeded order; its mean training loss."""
    net.train()
    if config.freeze_backbone:
        net.backbone.eval()
    order = torch.randperm(len(data.x_train), generator=steps.gen)
    bar = tqdm(range(0, len(order), config.batch_size), desc=f"epoch {epoch}", unit="batch",
               disable=not config.progress, leave=False)
    total = 0.0
    for start in bar:
        idx = order[start:start + config.batch_size]
        x = data.x_train[idx]
        if not config.freeze_backbone:
            x = augment(x, steps.gen, config.augment)
        loss = masked_bce(fit.forward(fit.prepare(x)), steps.y_train[idx], steps.pos_weight)
        steps.opt.zero_grad(set_to_none=True)
        loss.backward()
        steps.opt.step()
        steps.schedule.step()
        total += loss.item() * len(idx)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return total / len(data.x_train)


def _training_record(config: TrainConfig, data: TrainingData, source: dict, epochs: _Epochs,
                     val_report: Report, seconds: float) -> dict:
    """What the package records of its training: data, configuration, epochs, validation figures."""
    held_out = (f"held out {config.val_fraction:.0%} of train"
                + (f", whole groups of {config.val_group_column!r}" if config.val_group_column else ""))
    return {
        "data": {"train": manifest.expand(config.manifests),
                 "val": manifest.expand(config.val_manifests) if config.val_manifests else held_out,
                 "train_rows": int(len(data.x_train)), "val_rows": int(len(data.x_val)), **(data.split or {})},
        "config": {k: v for k, v in asdict(config).items() if k not in ("manifests", "val_manifests", "output")},
        "mode": "frozen backbone" if config.freeze_backbone else "fine-tuned",
        "initial_weights": source,
        "augment": list(config.augment),
        "epochs": len(epochs.history),
        "planned_epochs": config.epochs,
        "time_budget_cut": epochs.budget_cut,   # None: the plan ran as configured, whatever the machine's load
        "best_epoch": epochs.kept_epoch,
        "stopped": epochs.stopped,
        "seconds": seconds,
        "threshold_policy": config.threshold_policy,
        "history": epochs.history,
        "validation": {"macro_f1": val_report.macro_f1, "micro_f1": val_report.micro_f1,
                       "map": val_report.mean_average_precision,
                       "per_label": {m.label: {"f1": m.f1, "precision": m.precision, "recall": m.recall,
                                               "average_precision": m.average_precision} for m in val_report.per_label}},
    }
