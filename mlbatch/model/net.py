"""The multi-label network, and writing it as a model package.

``MultiLabelNet``: backbone -> shared hidden layer -> one independent linear head per label.
It returns logits; probabilities are ``sigmoid(logits)``, one per label, never a softmax:
labels do not compete and a row's probabilities need not sum to 1.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timezone
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from ..core import storage
from .backbones import create_backbone
from .package import FORMAT, FORMAT_VERSION, META_FILE, WEIGHTS_FILE
from .spec import ModelSpec

log = logging.getLogger(__name__)


class MultiLabelNet(nn.Module):
    """Shared backbone and hidden layer, then one sigmoid output per label."""

    def __init__(self, spec: ModelSpec, pretrained: bool = False):
        super().__init__()
        self.spec = spec
        # pretrained: the backbone library's own weights, fetched from its hub (training only;
        # a package always carries all of its weights)
        self.backbone = create_backbone(spec.backbone, pretrained=pretrained, **spec.backbone_kwargs)
        self.hidden = nn.Sequential(nn.Linear(self.backbone.out_features, spec.hidden), nn.ReLU(inplace=True),
                                    nn.Dropout(spec.dropout))
        self.heads = nn.ModuleList(nn.Linear(spec.hidden, 1) for _ in spec.labels)
        # Convolutions run in channels-last memory (NHWC), weights and pictures alike: on a 2-core
        # CPU, torch 2.14 trains cnn-small 25-31% faster and predicts 27-67% faster so
        # (benchmarks/memory_format.py). Values are unchanged; only strides differ, and a package is
        # saved contiguous, so its bytes do not depend on it.
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape (batch, n_labels). Train on these with BCE-with-logits."""
        return self.classify(self.features(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised pictures (batch, 3, S, S) -> the backbone's features, in the network's memory format."""
        return self.backbone(x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Backbone features -> logits: the shared hidden layer, then one head per label."""
        z = self.hidden(features)
        return torch.cat([head(z) for head in self.heads], dim=1)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Independent per-label probabilities in [0, 1], shape (batch, n_labels)."""
        return torch.sigmoid(self(x))


def save_package(net: MultiLabelNet, uri: str, thresholds: dict[str, float], name: str = "mlbatch-multilabel",
                 training: dict[str, Any] | None = None, calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``net`` as a model package at ``uri``; returns the metadata written.

    The version is the weights' digest; with a calibration, the digest of both (it changes every
    probability, so a run, a resume and the registry must tell the two apart)."""
    spec = net.spec
    missing = set(spec.labels) - set(thresholds)
    if missing:
        raise ValueError(f"no threshold for labels {sorted(missing)}")
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    weights = save_safetensors(state)
    digest = hashlib.sha256(weights).hexdigest()
    calibrated = calibration is not None and calibration.get("method", "none") != "none"
    version = hashlib.sha256(weights + json.dumps(calibration, sort_keys=True).encode()).hexdigest() if calibrated \
        else digest
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version[:12],
        "labels": spec.labels,
        "thresholds": {label: float(thresholds[label]) for label in spec.labels},
        "backbone": {"name": spec.backbone, "kwargs": spec.backbone_kwargs},
        "hidden": spec.hidden,
        "dropout": spec.dropout,
        "input": {"size": spec.image_size, "mean": list(spec.mean), "std": list(spec.std), "color": "RGB"},
        "training": training or {},
        "calibration": calibration or {"method": "none"},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "weights": {"file": WEIGHTS_FILE, "sha256": digest, "bytes": len(weights)},
    }
    storage.write_bytes(storage.join(uri, WEIGHTS_FILE), weights)
    storage.write_text(storage.join(uri, META_FILE), json.dumps(meta, indent=2) + "\n")
    log.info("wrote model package %s (version %s, labels %s)", uri, meta["version"], spec.labels)
    return meta
