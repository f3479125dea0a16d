"""The multi-label network, and writing and loading it as a model package.

``MultiLabelNet``: backbone -> shared hidden layer -> one independent linear head per label.
It returns logits; probabilities are ``sigmoid(logits)``, one per label, never a softmax:
labels do not compete and a row's probabilities need not sum to 1.

The package format itself (file names, label rules, reading and checking) is in ``package``,
which needs no torch; ``load_model`` builds the network from what it reads.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from . import images, storage
from .backbones import create_backbone
from .config import DEFAULT_BACKBONE
from .package import FORMAT, FORMAT_VERSION, META_FILE, WEIGHTS_FILE, PackageError, read_package, validate_labels

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape (batch, n_labels). Train on these with BCE-with-logits."""
        return self.classify(self.backbone(x))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Backbone features -> logits: the shared hidden layer, then one head per label."""
        z = self.hidden(features)
        return torch.cat([head(z) for head in self.heads], dim=1)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Independent per-label probabilities in [0, 1], shape (batch, n_labels)."""
        return torch.sigmoid(self(x))


# ---- the package ---------------------------------------------------------------------------

def save_package(net: MultiLabelNet, uri: str, thresholds: dict[str, float], name: str = "mlbatch-multilabel",
                 training: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``net`` as a model package at ``uri``; returns the metadata written."""
    spec = net.spec
    missing = set(spec.labels) - set(thresholds)
    if missing:
        raise ValueError(f"no threshold for labels {sorted(missing)}")
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    weights = save_safetensors(state)
    digest = hashlib.sha256(weights).hexdigest()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": digest[:12],
        "labels": spec.labels,
        "thresholds": {label: float(thresholds[label]) for label in spec.labels},
        "backbone": {"name": spec.backbone, "kwargs": spec.backbone_kwargs},
        "hidden": spec.hidden,
        "dropout": spec.dropout,
        "input": {"size": spec.image_size, "mean": list(spec.mean), "std": list(spec.std), "color": "RGB"},
        "training": training or {},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "weights": {"file": WEIGHTS_FILE, "sha256": digest, "bytes": len(weights)},
    }
    storage.write_bytes(storage.join(uri, WEIGHTS_FILE), weights)
    storage.write_text(storage.join(uri, META_FILE), json.dumps(meta, indent=2) + "\n")
    log.info("wrote model package %s (version %s, labels %s)", uri, meta["version"], spec.labels)
    return meta


def spec_from_meta(meta: dict[str, Any]) -> ModelSpec:
    return ModelSpec(labels=meta["labels"], backbone=meta["backbone"]["name"],
                     backbone_kwargs=meta["backbone"].get("kwargs", {}), hidden=meta.get("hidden", 256),
                     dropout=meta.get("dropout", 0.0), image_size=meta["input"]["size"],
                     mean=meta["input"]["mean"], std=meta["input"]["std"])


class LoadedModel:
    """A model package ready to predict: the one path used by evaluation and the labeling job."""

    def __init__(self, meta: dict[str, Any], net: MultiLabelNet, device: str = "cpu"):
        self.meta = meta
        self.net = net.to(device).eval()
        self.device = device
        self.spec = net.spec

    @property
    def labels(self) -> list[str]:
        return list(self.spec.labels)

    @property
    def thresholds(self) -> dict[str, float]:
        return dict(self.meta["thresholds"])

    @property
    def version(self) -> str:
        return self.meta["version"]

    @property
    def name(self) -> str:
        return self.meta["name"]

    def preprocess(self, img: Image.Image) -> np.ndarray:
        """One decoded RGB picture -> the float32 (3, S, S) array the network takes."""
        return images.to_array(img, self.spec.image_size, self.spec.mean, self.spec.std)

    @torch.inference_mode()
    def predict_arrays(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """Preprocessed batch (n, 3, S, S) -> probabilities float32 (n, n_labels)."""
        if len(batch) == 0:
            return np.zeros((0, len(self.labels)), np.float32)
        x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(batch, np.float32))
        x = x.to(self.device, non_blocking=True)
        if self.device.startswith("cuda"):
            with torch.autocast("cuda", dtype=torch.float16):
                logits = self.net(x)
        else:
            logits = self.net(x)
        return torch.sigmoid(logits.float()).cpu().numpy().astype(np.float32)

    @torch.inference_mode()
    def predict_pixels(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """Resized uint8 pixels (n, S, S, 3) -> probabilities float32 (n, n_labels).

        On a GPU the uint8 pixels are what crosses to the device (a quarter of float32's bytes), from
        pinned host memory without blocking, and are normalised there (``to_input``). Not measured
        here: this machine has no GPU. A tensor is taken where it is (``jpeg`` decodes on the device).
        """
        if not isinstance(pixels, torch.Tensor):
            if not self.device.startswith("cuda") or len(pixels) == 0:
                return self.predict_arrays(images.normalise(pixels, self.spec.mean, self.spec.std))
            host = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.uint8)).pin_memory()
            pixels = host.to(self.device, non_blocking=True)
        return self.predict_arrays(to_input(pixels.to(self.device), self.spec.mean, self.spec.std))

    def predict(self, pictures: Sequence[Image.Image]) -> np.ndarray:
        """PIL images -> probabilities float32 (n_images, n_labels), columns in ``labels`` order.

        JPEGs opened but not yet loaded (``Image.open(path)``) decode at reduced scale exactly
        as the job decodes them (``images.draft``), so the two agree on the same files.
        """
        size = self.spec.image_size
        pictures = [images.draft(p, size) for p in pictures]
        rgb = [p if p.mode == "RGB" else p.convert("RGB") for p in pictures]
        if not rgb:
            return self.predict_arrays(np.zeros((0, 3, size, size), np.float32))
        return self.predict_pixels(np.stack([images.resize(p, size) for p in rgb]))


def to_input(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (n, S, S, 3) on any device -> float32 (n, 3, S, S): ``images.normalise`` in torch, on that device."""
    m = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    return ((x - m) / s).contiguous()


def load_model(uri: str, device: str = "cpu") -> LoadedModel:
    """Load a model package from a local folder or ``s3://`` prefix. Never unpickles anything."""
    meta, weights = read_package(uri)
    net = MultiLabelNet(spec_from_meta(meta))
    try:
        net.load_state_dict(load_safetensors(weights), strict=True)
    except Exception as exc:  # safetensors' and torch's errors for foreign or mismatched bytes
        raise PackageError(f"model package {uri}: weights do not fit the described network: {exc}") from None
    return LoadedModel(meta, net, device)


def read_state_dict(uri: str, data: bytes | None = None) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file, or from a foreign PyTorch checkpoint (``.pt``/``.pth``/``.bin``)
    read with ``torch.load(weights_only=True)``: tensors and plain containers only, so a checkpoint
    that would run code when unpickled is refused, never executed."""
    data = storage.read_bytes(uri) if data is None else data
    if uri.lower().endswith((".pt", ".pth", ".bin")):
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle.UnpicklingError for anything but tensors and containers
            # torch's message suggests weights_only=False: keep only the line that says what was refused
            lines = [x for x in str(exc).splitlines() if x.strip()]
            reason = next((x for x in lines if "GLOBAL" in x or "Unsupported" in x), lines[-1] if lines else "")
            raise PackageError(f"weights {uri}: refused, not a plain PyTorch state dict "
                               f"(read with weights_only=True): {reason}") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise PackageError(f"weights {uri}: expected a state dict of tensors, found {type(state).__name__}")
        return state
    try:
        return load_safetensors(data)
    except Exception as exc:
        raise PackageError(f"weights {uri}: not a safetensors file: {exc}") from None


@dataclass
class InitialWeights:
    """Backbone tensors to start training from, and what they expect of the input."""

    state: dict[str, torch.Tensor]
    source: str
    sha256: str
    backbone: str | None = None              # the backbone they were made for, when recorded
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def read_initial_weights(uri: str) -> InitialWeights:
    """Backbone weights from a safetensors file (``mlbatch convert-weights`` records the backbone
    and normalisation in its header), a plain PyTorch state dict, or an mlbatch model package
    (its backbone and normalisation: to add labels to a model or retrain its heads), by URI or by
    registry reference (``REGISTRY/NAME@champion``)."""
    from .registry import resolve

    uri = resolve(uri)
    if storage.exists(storage.join(uri, META_FILE)):
        meta, weights = read_package(uri)
        tensors = load_safetensors(weights)
        state = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
        return InitialWeights(state, uri, meta["weights"]["sha256"], meta["backbone"]["name"],
                              tuple(meta["input"]["mean"]), tuple(meta["input"]["std"]))
    data = storage.read_bytes(uri)
    digest = hashlib.sha256(data).hexdigest()
    state = read_state_dict(uri, data)
    header = safetensors_metadata(data) if not uri.lower().endswith((".pt", ".pth", ".bin")) else {}
    floats = (lambda key: tuple(json.loads(header[key])) if key in header else None)
    return InitialWeights(state, uri, digest, header.get("backbone"), floats("mean"), floats("std"))


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The string metadata in a safetensors header (``__metadata__``), without reading the tensors."""
    size = int.from_bytes(data[:8], "little")
    return dict(json.loads(data[8:8 + size]).get("__metadata__") or {})


def load_backbone_weights(net: MultiLabelNet, init: InitialWeights) -> None:
    """Load ``init`` into the backbone, exactly: every tensor present and of the right shape, none
    unexpected (the library's own classifier, which mlbatch replaces, is dropped). Anything else
    is an error naming the tensors, never a silent partial load."""
    heads = tuple(getattr(net.backbone, "head_keys", ()))
    state = {k: v for k, v in init.state.items() if not any(k == h or k.startswith(h + ".") for h in heads)}
    own = net.backbone.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = sorted(k for k in state if k not in own)
    misshapen = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in own
                 if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or misshapen:
        def some(names: list[str]) -> str:
            return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        problems = [f"{len(v)} {what} ({some(v)})" for what, v in
                    (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)) if v]
        raise PackageError(f"backbone weights {init.source} do not fit backbone {net.spec.backbone!r}: "
                           + "; ".join(problems))
    net.backbone.load_state_dict(state, strict=True)
    log.info("initialised backbone %s from %s (%d tensors)", net.spec.backbone, init.source, len(state))
