"""Weights to start training from: state dicts, converted backbones, or another model package."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors

from ..core import storage
from .net import MultiLabelNet
from .package import META_FILE, PackageError, read_package
from .refs import resolve

log = logging.getLogger(__name__)


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
    backbone_kwargs: dict | None = None      # and its arguments (a package records them)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def read_initial_weights(uri: str) -> InitialWeights:
    """Backbone weights from a safetensors file (``mlbatch convert-weights`` records the backbone
    and normalisation in its header), a plain PyTorch state dict, or an mlbatch model package
    (its backbone and normalisation: to add labels to a model or retrain its heads), by URI or by
    registry reference (``REGISTRY/NAME@champion``)."""
    uri = resolve(uri)
    if storage.exists(storage.join(uri, META_FILE)):
        meta, weights = read_package(uri)
        tensors = load_safetensors(weights)
        state = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
        return InitialWeights(state, uri, meta["weights"]["sha256"], meta["backbone"]["name"],
                              dict(meta["backbone"].get("kwargs") or {}), tuple(meta["input"]["mean"]),
                              tuple(meta["input"]["std"]))
    data = storage.read_bytes(uri)
    digest = hashlib.sha256(data).hexdigest()
    state = read_state_dict(uri, data)
    header = safetensors_metadata(data) if not uri.lower().endswith((".pt", ".pth", ".bin")) else {}
    floats = (lambda key: tuple(json.loads(header[key])) if key in header else None)
    return InitialWeights(state, uri, digest, header.get("backbone"), None, floats("mean"), floats("std"))


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
