"""Manifests: Parquet files listing images (``image_uri``) and, for training, their truth.

Truth comes either as a ``labels`` list<string> column (the positive labels of the row) or
as one boolean / 0-1 column per label. A null in a per-label column means *unknown*: it is
masked out of the loss and the metrics. Every problem is a ``ManifestError`` naming the
file, and the row or column where there is one.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from . import images, storage

log = logging.getLogger(__name__)

URI_COLUMN = "image_uri"
LABELS_COLUMN = "labels"


class ManifestError(ValueError):
    """A manifest is missing, unreadable or not of the expected shape."""


def expand(uris: list[str]) -> list[str]:
    """Each URI may be a file, a folder/prefix or a glob: the Parquet files they name, sorted."""
    files: list[str] = []
    for uri in uris:
        try:
            found = [e.uri for e in storage.list_files(uri)]
        except (OSError, ValueError) as exc:
            raise ManifestError(f"manifest {uri}: cannot list it: {exc}") from None
        if not found:
            raise ManifestError(f"manifest {uri}: no such file, or no files under that folder/prefix/glob")
        files.extend(f for f in found if f not in files)
    return files


def read_schema(uri: str) -> pa.Schema:
    try:
        return storage.read_parquet_schema(uri)
    except FileNotFoundError:
        raise ManifestError(f"manifest {uri}: not found") from None
    except (OSError, pa.ArrowInvalid) as exc:
        raise ManifestError(f"manifest {uri}: not a readable Parquet file ({exc})") from None


def read_footer(uri: str) -> pq.FileMetaData:
    """A manifest's Parquet footer: its row count, schema and column statistics, without its rows."""
    try:
        return storage.read_parquet_metadata(uri)
    except FileNotFoundError:
        raise ManifestError(f"manifest {uri}: not found") from None
    except (OSError, pa.ArrowInvalid) as exc:
        raise ManifestError(f"manifest {uri}: not a readable Parquet file ({exc})") from None


def check_uri_column(uri: str, schema: pa.Schema, uri_column: str = URI_COLUMN) -> None:
    """The image URI column must exist and hold strings."""
    if uri_column not in schema.names:
        raise ManifestError(f"manifest {uri}: no {uri_column!r} column (columns: {', '.join(schema.names)})")
    typ = schema.field(uri_column).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise ManifestError(f"manifest {uri}: column {uri_column!r} must be string, found {typ}")


def read(uri: str, uri_column: str = URI_COLUMN) -> pa.Table:
    """Read one manifest and check that it lists images."""
    schema = read_schema(uri)
    check_uri_column(uri, schema, uri_column)
    try:
        table = storage.read_parquet(uri)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ManifestError(f"manifest {uri}: not a readable Parquet file ({exc})") from None
    if table.num_rows == 0:
        raise ManifestError(f"manifest {uri}: has no rows")
    return table


@dataclass
class LabeledData:
    """Images and their truth: ``targets`` is float32 (n, n_labels), 1/0, NaN where unknown."""

    labels: list[str]
    image_uris: list[str]
    targets: np.ndarray
    sources: list[str]  # "file row N" for each image, for error messages
    groups: list[str] | None = None  # each row's value of the group column, as text, when one was asked for

    def __len__(self) -> int:
        return len(self.image_uris)


def infer_labels(uris: list[str]) -> list[str]:
    """Label names from the manifests: the sorted values of ``labels``, else the boolean columns."""
    from_lists: set[str] = set()
    from_columns: list[str] = []
    for uri in expand(uris):
        table = read(uri)
        if LABELS_COLUMN in table.column_names:
            from_lists.update(v for v in pc.unique(pc.list_flatten(table[LABELS_COLUMN])).to_pylist() if v)
        else:
            from_columns += [f.name for f in table.schema if pa.types.is_boolean(f.type) and f.name not in from_columns]
    found = sorted(from_lists) or from_columns
    if not found:
        raise ManifestError(f"cannot infer the labels from {', '.join(uris)}: no {LABELS_COLUMN!r} column and no "
                            "boolean columns; pass --labels")
    return found


def read_labeled(uris: list[str], labels: list[str], group_column: str | None = None) -> LabeledData:
    """Read labeled manifests into one ``LabeledData``, checking every row.

    With ``group_column``, every manifest must have that column without nulls; its values, as
    text, become ``groups``.
    """
    image_uris: list[str] = []
    sources: list[str] = []
    blocks: list[np.ndarray] = []
    groups: list[str] = []
    for uri in expand(uris):
        table = read(uri)
        col = table[URI_COLUMN].to_pylist()
        for i, value in enumerate(col):
            if value is None or not value.strip():
                raise ManifestError(f"manifest {uri}: row {i}: {URI_COLUMN!r} is {'null' if value is None else 'empty'}")
        blocks.append(_targets(uri, table, labels))
        if group_column is not None:
            groups += _groups(uri, table, group_column)
        image_uris += col
        sources += [f"{uri} row {i}" for i in range(len(col))]
    return LabeledData(labels, image_uris, np.concatenate(blocks), sources,
                       groups if group_column is not None else None)


def _groups(uri: str, table: pa.Table, column: str) -> list[str]:
    if column not in table.column_names:
        raise ManifestError(f"manifest {uri}: no group column {column!r} (columns: {', '.join(table.column_names)})")
    values = table[column].to_pylist()
    for i, v in enumerate(values):
        if v is None or isinstance(v, float) and np.isnan(v):
            raise ManifestError(f"manifest {uri}: row {i}: group column {column!r} is {'null' if v is None else 'NaN'}; "
                                "every row needs a group")
    return [str(v) for v in values]


def _targets(uri: str, table: pa.Table, labels: list[str]) -> np.ndarray:
    n = table.num_rows
    per_label = [name for name in labels if name in table.column_names]
    if LABELS_COLUMN in table.column_names and not per_label:
        return _targets_from_list(uri, table[LABELS_COLUMN], labels)
    if not per_label:
        raise ManifestError(f"manifest {uri}: no truth columns: expected a {LABELS_COLUMN!r} list column or "
                            f"columns named after the labels {labels}")
    missing = [name for name in labels if name not in table.column_names]
    if missing:
        raise ManifestError(f"manifest {uri}: missing label columns {missing} (has {per_label})")
    out = np.full((n, len(labels)), np.nan, np.float32)
    for j, name in enumerate(labels):
        column = table[name]
        typ = column.type
        if not (pa.types.is_boolean(typ) or pa.types.is_integer(typ) or pa.types.is_floating(typ)):
            raise ManifestError(f"manifest {uri}: label column {name!r} must be boolean or 0/1, found {typ}")
        values = column.to_pylist()
        for i, v in enumerate(values):
            if v is None:
                continue
            if v not in (0, 1) or isinstance(v, float) and np.isnan(v):
                raise ManifestError(f"manifest {uri}: row {i}: label column {name!r} holds {v!r}; "
                                    "expected true/false, 0/1 or null for unknown")
            out[i, j] = float(v)
    return out


def _targets_from_list(uri: str, column: pa.ChunkedArray, labels: list[str]) -> np.ndarray:
    typ = column.type
    if not (pa.types.is_list(typ) or pa.types.is_large_list(typ)) or not (
            pa.types.is_string(typ.value_type) or pa.types.is_large_string(typ.value_type)):
        raise ManifestError(f"manifest {uri}: column {LABELS_COLUMN!r} must be list<string>, found {typ}")
    index = {name: j for j, name in enumerate(labels)}
    out = np.zeros((len(column), len(labels)), np.float32)
    for i, row in enumerate(column.to_pylist()):
        if row is None:
            out[i] = np.nan  # the whole row is unknown
            continue
        for name in row:
            if name not in index:
                raise ManifestError(f"manifest {uri}: row {i}: label {name!r} is not one of {labels}")
            out[i, index[name]] = 1.0
    return out


def fetch_decoded(uris: list[str], sources: list[str], threads: int = 8, draft_size: int | None = None) -> list[Image.Image]:
    """Fetch and decode images; a missing or bad image is an error naming its manifest row.

    Pass the model's input side as ``draft_size`` to decode as the job does (``images.draft``).
    """
    def one(k: int) -> Image.Image:
        try:
            return images.decode(storage.read_bytes(uris[k]), draft_size=draft_size)
        except (OSError, ValueError) as exc:
            raise ManifestError(f"{sources[k]}: cannot use image {uris[k]}: {exc}") from None

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(len(uris))))
