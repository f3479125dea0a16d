"""Training: BCE per label (unknowns masked), best checkpoint on validation, thresholds on validation.

The training set is decoded once into a uint8 tensor in memory (the synthetic and
fine-tuning sets this is for fit easily), then each epoch augments on the fly.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

from . import images, manifest
from .config import TrainConfig
from .evaluate import choose_thresholds, compute_metrics, parse_policy
from .model import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, MultiLabelNet, load_backbone_weights, save_package

log = logging.getLogger(__name__)


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean binary cross-entropy over the known (non-NaN) targets only."""
    known = ~torch.isnan(targets)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.nan_to_num(targets, nan=0.0), pos_weight=pos_weight, reduction="none")
    return (loss * known).sum() / known.sum().clamp(min=1)


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


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light augmentation on a uint8 batch: horizontal flip, a small shift, brightness/contrast."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    pad = max(1, h // 16)
    padded = torch.nn.functional.pad(x.float(), (pad, pad, pad, pad), mode="replicate")
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    x = padded[:, :, dy:dy + h, dx:dx + w]
    gain = 1 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.4
    bias = (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 40
    return (x * gain + bias).clamp(0, 255)


def _split(data: manifest.LabeledData, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(len(data))
    n_val = max(1, int(round(len(data) * fraction)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _scores(net: MultiLabelNet, x: torch.Tensor, spec: ModelSpec, batch: int = 256) -> np.ndarray:
    net.eval()
    with torch.inference_mode():
        return torch.cat([net.predict_proba(_normalise(x[i:i + batch], spec)) for i in range(0, len(x), batch)]).numpy()


def _map(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score
    aps = []
    for j in range(y.shape[1]):
        k = ~np.isnan(y[:, j])
        if y[k, j].any():
            aps.append(average_precision_score(y[k, j], s[k, j]))
    return float(np.mean(aps)) if aps else 0.0


def train(config: TrainConfig) -> dict:
    """Train a model and write its package to ``config.output``; returns the package metadata."""
    parse_policy(config.threshold_policy)  # refuse a bad policy before any work
    torch.manual_seed(config.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    labels = config.labels or manifest.infer_labels(config.manifests)
    spec = ModelSpec(labels=labels, backbone=config.backbone, hidden=config.hidden, image_size=config.image_size,
                     mean=IMAGENET_MEAN, std=IMAGENET_STD)
    log.info("labels: %s", labels)
    data = manifest.read_labeled(config.manifests, labels)
    if config.val_manifests:
        val_data = manifest.read_labeled(config.val_manifests, labels)
        x_train, y_train = load_tensor(data, spec.image_size, config.progress), data.targets
        x_val, y_val = load_tensor(val_data, spec.image_size, config.progress), val_data.targets
    else:
        x_all = load_tensor(data, spec.image_size, config.progress)
        tr, va = _split(data, config.val_fraction, config.seed)
        x_train, y_train, x_val, y_val = x_all[tr], data.targets[tr], x_all[va], data.targets[va]
    log.info("training on %d images, validating on %d", len(x_train), len(x_val))

    net = MultiLabelNet(spec)
    if config.backbone_weights:
        load_backbone_weights(net, config.backbone_weights)
    pos_weight = None
    if config.pos_weight:
        pos = np.nansum(y_train, axis=0)
        neg = np.sum(~np.isnan(y_train), axis=0) - pos
        pos_weight = torch.tensor(neg / np.maximum(pos, 1), dtype=torch.float32)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * math.ceil(len(x_train) / config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=max(steps, 1), pct_start=0.2)
    gen = torch.Generator().manual_seed(config.seed)
    y_train_t = torch.from_numpy(y_train)
    best = (-1.0, 0, None)
    history = []
    started = time.monotonic()
    for epoch in range(1, config.epochs + 1):
        net.train()
        order = torch.randperm(len(x_train), generator=gen)
        bar = tqdm(range(0, len(order), config.batch_size), desc=f"epoch {epoch}/{config.epochs}", unit="batch",
                   disable=not config.progress, leave=False)
        total = 0.0
        for start in bar:
            idx = order[start:start + config.batch_size]
            x = _normalise(_augment(x_train[idx], gen), spec)
            loss = masked_bce(net(x), y_train_t[idx], pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        val_map = _map(y_val, _scores(net, x_val, spec))
        history.append({"epoch": epoch, "train_loss": total / len(x_train), "val_map": val_map})
        log.info("epoch %d/%d: train loss %.4f, validation mAP %.4f", epoch, config.epochs, total / len(x_train), val_map)
        if val_map > best[0]:
            best = (val_map, epoch, copy.deepcopy(net.state_dict()))
    net.load_state_dict(best[2])
    val_scores = _scores(net, x_val, spec)
    thresholds = choose_thresholds(labels, y_val, val_scores, config.threshold_policy)
    val_report = compute_metrics(labels, y_val, val_scores, thresholds)
    summary = {
        "data": {"train": manifest.expand(config.manifests), "val": manifest.expand(config.val_manifests)
                 if config.val_manifests else f"held out {config.val_fraction:.0%} of train",
                 "train_rows": int(len(x_train)), "val_rows": int(len(x_val))},
        "config": {k: v for k, v in asdict(config).items() if k not in ("manifests", "val_manifests", "output")},
        "epochs": config.epochs,
        "best_epoch": best[1],
        "seconds": round(time.monotonic() - started, 1),
        "threshold_policy": config.threshold_policy,
        "history": history,
        "validation": {"macro_f1": val_report.macro_f1, "micro_f1": val_report.micro_f1,
                       "map": val_report.mean_average_precision,
                       "per_label": {m.label: {"f1": m.f1, "precision": m.precision, "recall": m.recall,
                                               "average_precision": m.average_precision} for m in val_report.per_label}},
    }
    return save_package(net, config.output, thresholds, name=config.name, training=summary)
