"""The model package format, without torch: file names, label rules, reading and checking.

A *model package* is a folder (local or ``s3://``) holding ``model.safetensors`` (the
weights, no pickle) and ``mlbatch-model.json`` (labels in output order, thresholds, backbone,
input size, normalisation, training summary, sha256 of the weights). ``read_package`` refuses a
package whose weights do not match the recorded digest, a missing file or an unknown format.
The labeling job's driver and its decode tasks need only this module, so they never import
torch; ``model`` builds the network from what this reads.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any, Sequence

from ..core import storage
from ..core.names import NameError_, check_inside, check_segment
from ..core.table import column_name
from . import calibration

FORMAT = "mlbatch-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "mlbatch-model.json"


MAX_INPUT_SIZE = 1024   # pixels a side: far above any backbone's input, far below a size that exhausts memory
# What a package may pass to its backbone's constructor, per backbone (a name or a library), and the bounds of
# each value: a package comes from someone else, so nothing else reaches timm or torchvision (timm's
# checkpoint_path, say, would make it load any local file).
BACKBONE_KWARGS: dict[str, dict[str, tuple[type, float, float]]] = {
    "cnn-small": {"width": (int, 1, 1024), "standardize": (int, 0, 2)},
    "resnet-mini": {"width": (int, 1, 1024), "blocks": (int, 1, 16)},
    "timm": {"drop_rate": (float, 0.0, 1.0), "drop_path_rate": (float, 0.0, 1.0), "feature_maps": (int, 1, 16)},
    "torchvision": {"dropout": (float, 0.0, 1.0)},
}
_BACKBONE_RE = re.compile(r"(?:(timm|torchvision):)?[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class PackageError(ValueError):
    """A model package is missing, changed or not one we can read."""


def validate_labels(labels: Sequence[str]) -> list[str]:
    """Labels must be unique, non-empty and map to distinct valid column names."""
    labels = list(labels)
    if not labels:
        raise ValueError("the label set is empty")
    seen: dict[str, str] = {}
    for label in labels:
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"label names must be non-empty strings, got {label!r}")
        col = column_name(label)
        if not col or not col[0].isalpha():
            raise ValueError(f"label {label!r} gives column name {col!r}, which must start with a letter")
        if col in seen:
            what = "is repeated" if seen[col] == label else f"and {seen[col]!r} both give column name {col!r}"
            raise ValueError(f"label {label!r} {what}")
        seen[col] = label
    return labels


def _number(value: Any, kind: type, low: float, high: float) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        return False
    return math.isfinite(value) and low <= value <= high


def check_backbone(backbone: Any) -> None:
    """A package's ``backbone``: a name we can build and only the constructor arguments allowed for it."""
    if not isinstance(backbone, dict) or not isinstance(backbone.get("name"), str) \
            or not _BACKBONE_RE.fullmatch(backbone["name"]):
        raise ValueError("backbone: expected {\"name\": \"cnn-small\" | \"timm:NAME\" | \"torchvision:NAME\", "
                         "\"kwargs\": {...}}")
    name, kwargs = backbone["name"], backbone.get("kwargs", {})
    family = name.split(":", 1)[0] if ":" in name else name
    allowed = BACKBONE_KWARGS.get(family, {})
    if not isinstance(kwargs, dict):
        raise ValueError("backbone.kwargs: expected an object")
    for key, value in kwargs.items():
        if key not in allowed:
            raise ValueError(f"backbone.kwargs: {key!r} is not allowed for {name} (allowed: "
                             f"{', '.join(sorted(allowed)) or 'none'})")
        kind, low, high = allowed[key]
        if not _number(value, kind, low, high):
            raise ValueError(f"backbone.kwargs.{key}: expected {kind.__name__} in [{low}, {high}], got {value!r}")


def check_description(meta: dict[str, Any]) -> None:
    """Every field of a package description that steers a path, a constructor or memory, checked field by
    field (``ValueError`` naming the field): a package may come from anyone."""
    for key in ("name", "version"):
        check_segment(meta[key], f"package {key}")
    weights = meta["weights"]
    if not isinstance(weights, dict) or not isinstance(weights.get("sha256"), str):
        raise ValueError("weights: expected {\"file\": NAME, \"sha256\": HEX}")
    check_segment(weights.get("file", WEIGHTS_FILE), "weights.file")
    check_backbone(meta["backbone"])
    spec = meta["input"]
    if not isinstance(spec, dict) or not _number(spec.get("size"), int, 8, MAX_INPUT_SIZE):
        raise ValueError(f"input.size: expected an int in [8, {MAX_INPUT_SIZE}], got "
                         f"{spec.get('size') if isinstance(spec, dict) else spec!r}")
    for key, low in (("mean", -10.0), ("std", 1e-6)):
        values = spec.get(key)
        if not isinstance(values, list) or len(values) != 3 or not all(_number(v, float, low, 10.0) for v in values):
            raise ValueError(f"input.{key}: expected three numbers in [{low}, 10], got {values!r}")
    for key, kind, low, high in (("hidden", int, 1, 65536), ("dropout", float, 0.0, 1.0)):
        if key in meta and not _number(meta[key], kind, low, high):
            raise ValueError(f"{key}: expected {kind.__name__} in [{low}, {high}], got {meta[key]!r}")
    thresholds = meta["thresholds"]
    if not isinstance(thresholds, dict) or not all(_number(v, float, 0.0, 1.0) for v in thresholds.values()):
        raise ValueError("thresholds: expected an object of numbers in [0, 1]")
    calibration.check(meta.get("calibration"), meta["labels"])


def _read_package_file(uri: str, name: str) -> bytes:
    path = storage.join(uri, name)
    if not storage.is_remote(path):   # a link inside the package must not lead out of it
        try:
            check_inside(storage.local_path(uri), storage.local_path(path), f"model package {uri}: {name}")
        except NameError_ as exc:
            raise PackageError(str(exc)) from None
    try:
        return storage.read_bytes(path)
    except FileNotFoundError:
        raise PackageError(f"model package {uri}: {name} is missing") from None
    except OSError as exc:
        if "not found" in str(exc).lower() or "NoSuchKey" in str(exc) or "NoSuchBucket" in str(exc):
            raise PackageError(f"model package {uri}: {name} is missing ({exc})") from None
        raise PackageError(f"model package {uri}: cannot read {name}: {exc}") from None


def read_package(uri: str) -> tuple[dict[str, Any], bytes]:
    """Read and check a package folder: metadata and the weight bytes whose digest it records.

    A registry reference (``REGISTRY/NAME@champion``) is resolved by the caller, once (``refs.resolve``).
    """
    raw = _read_package_file(uri, META_FILE)
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise PackageError(f"model package {uri}: {META_FILE} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PackageError(f"model package {uri}: {META_FILE} is not an mlbatch model description")
    if meta.get("format_version") != FORMAT_VERSION:
        raise PackageError(f"model package {uri}: unknown format version {meta.get('format_version')!r} "
                           f"(this mlbatch reads version {FORMAT_VERSION})")
    for key in ("labels", "thresholds", "backbone", "input", "weights", "version", "name"):
        if key not in meta:
            raise PackageError(f"model package {uri}: {META_FILE} lacks {key!r}")
    try:
        validate_labels(meta["labels"])
        check_description(meta)
    except ValueError as exc:
        raise PackageError(f"model package {uri}: {META_FILE}: {exc}") from None
    name = meta["weights"].get("file", WEIGHTS_FILE)
    weights = _read_package_file(uri, name)
    if hashlib.sha256(weights).hexdigest() != meta["weights"]["sha256"]:
        raise PackageError(f"model package {uri}: {name} does not match the sha256 recorded in {META_FILE}; the "
                           "weights were changed or damaged")
    return meta, weights
