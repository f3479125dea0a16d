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
from typing import Any, Sequence

from ..core import storage
from ..core.table import column_name

FORMAT = "mlbatch-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "mlbatch-model.json"


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


def _read_package_file(uri: str, name: str) -> bytes:
    path = storage.join(uri, name)
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
    except ValueError as exc:
        raise PackageError(f"model package {uri}: {exc}") from None
    weights = _read_package_file(uri, meta["weights"].get("file", WEIGHTS_FILE))
    digest = hashlib.sha256(weights).hexdigest()
    if digest != meta["weights"].get("sha256"):
        raise PackageError(f"model package {uri}: {WEIGHTS_FILE} does not match the sha256 recorded in "
                           f"{META_FILE} (found {digest[:12]}..., expected {str(meta['weights'].get('sha256'))[:12]}...)"
                           "; the weights were changed or damaged")
    return meta, weights
