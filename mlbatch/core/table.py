"""The output contract: what a labeled row looks like to Spark, Athena, DuckDB and mlbatch itself.

Every room that writes or reads labeled output (the labeling job, nightly, ``query``, review
export) takes the names from here, so they cannot drift apart:

* the manifest's own columns first (one whose name the output uses is kept as ``input_<name>``);
* ``label_<col>`` (bool) for every label, then ``prob_<col>`` (float32), in the model's label
  order, where ``<col>`` is ``column_name(label)``;
* ``labels`` (the positive labels' names), ``status`` (``ok`` | ``error``), ``error`` (why),
  ``model_name``, ``model_version``, ``run_id``, ``labeled_at``;
* the row's identity last: ``source_manifest`` and ``source_row`` (its position there);
* the Parquet key ``mlbatch`` in every file's metadata: labels, thresholds, model, run.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pyarrow as pa

from . import storage

SOURCE_MANIFEST, SOURCE_ROW = "source_manifest", "source_row"
IDENTITY = (SOURCE_MANIFEST, SOURCE_ROW)
STATUS_OK, STATUS_ERROR = "ok", "error"
METADATA_KEY = b"mlbatch"


def column_name(label: str) -> str:
    """The column-safe form of a label name: lower case, runs of other characters -> ``_``.

    ``"Traffic Light"`` -> ``traffic_light``. Output columns are ``label_<this>`` and
    ``prob_<this>``; the same function names them everywhere.
    """
    return re.sub(r"[^a-z0-9]+", "_", label.strip().lower()).strip("_")


def label_column(label: str) -> str:
    """The boolean decision column of a label."""
    return f"label_{column_name(label)}"


def prob_column(label: str) -> str:
    """The probability column of a label."""
    return f"prob_{column_name(label)}"


def predicted_columns(labels: list[str]) -> list[tuple[str, pa.DataType]]:
    """The columns a predictor adds to a batch, in order, with their Parquet types."""
    cols = [(label_column(x), pa.bool_()) for x in labels]
    cols += [(prob_column(x), pa.float32()) for x in labels]
    return cols + [("labels", pa.list_(pa.string())), ("status", pa.string()), ("error", pa.string()),
                   ("model_name", pa.string()), ("model_version", pa.string()), ("run_id", pa.string()),
                   ("labeled_at", pa.timestamp("us", tz="UTC"))]


def output_columns(labels: list[str]) -> list[tuple[str, pa.DataType]]:
    """The columns the job adds after the manifest's own, in order, with their Parquet types.

    The last two are the row's identity: the manifest file it came from and its row number there.
    """
    return predicted_columns(labels) + [(SOURCE_MANIFEST, pa.string()), (SOURCE_ROW, pa.int64())]


def renamed_inputs(names: list[str], labels: list[str]) -> dict[str, str]:
    """Manifest columns whose names the output uses are kept as ``input_<name>``."""
    taken = {name for name, _ in output_columns(labels)}
    renames = {}
    for name in names:
        if name in taken:
            new = f"input_{name}"
            while new in taken or new in names:
                new = f"input_{new}"
            renames[name] = new
    return renames


def file_metadata(labels: list[str], thresholds: dict[str, float], model_name: str, model_version: str,
                  run_id: str, predictor: str | None = None) -> dict[bytes, bytes]:
    """The ``mlbatch`` key of every output file's Parquet metadata (``predictor``: its device and precision)."""
    extra = {"predictor": predictor} if predictor else {}
    return {METADATA_KEY: json.dumps({"labels": labels, "thresholds": thresholds, "model_name": model_name,
                                      "model_version": model_version, "run_id": run_id, **extra}).encode()}


def read_file_metadata(schema: pa.Schema) -> dict[str, Any] | None:
    """The ``mlbatch`` metadata of a file's schema, or None if it has none (or it is not ours)."""
    return storage.json_object((schema.metadata or {}).get(METADATA_KEY) or None)
