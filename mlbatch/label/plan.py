"""Planning a run from the manifests' Parquet footers alone: no rows are read, nothing grows with rows.

A *unit of work* is a row range of one manifest (``--rows-per-unit`` rows), named by its
manifest's place in the run's sorted list (its *manifest index*) and its first row
(``commit.unit_id``). The plan holds per-manifest and per-unit records only; the model reference is resolved once here, so every
actor loads the same package.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..core import manifest, storage
from ..model.package import PackageError, read_package
from ..model.refs import resolve
from .config import JobError, LabelConfig


@dataclass
class Plan:
    manifests: list[str]            # the run's manifest files, sorted: a unit names one by its place here
    rows: list[int]                 # per manifest
    schema: pa.Schema
    units: list[tuple[int, int, int]]   # (manifest index, start, stop)
    meta: dict[str, Any]
    model_uri: str                  # the package itself: a registry reference resolved once, for every actor
    thresholds: dict[str, float]
    run_id: str
    null_id_manifests: list[int]    # manifests whose footers do not rule out a null id
    stamps: list[str]               # per manifest: its footer digest, "@", its version (ETag, or mtime)

    @property
    def rows_in(self) -> int:
        return sum(self.rows)


def make_plan(config: LabelConfig) -> Plan:
    """Check everything that can be checked before compute, from the manifests' footers: no rows are read."""
    if config.rows_per_unit < 1:
        raise JobError(f"--rows-per-unit {config.rows_per_unit}: must be at least 1")
    files = manifest.expand(config.manifests)
    schema = None
    rows: list[int] = []
    stamps: list[str] = []
    null_id_manifests: list[int] = []
    pool = ThreadPoolExecutor(max_workers=min(32, len(files)))
    try:
        footers = pool.map(_versioned_footer, files)   # a few KiB each, in order, none kept
        for i, (uri, (version, footer)) in enumerate(zip(files, footers)):
            s = check_footer(uri, footer, config.uri_column, config.id_column)
            if schema is None:
                schema = s
            elif not s.equals(schema):
                raise manifest.ManifestError(f"manifest {uri}: its columns differ from {files[0]}'s "
                                             f"({_schema_diff(schema, s)}); manifests of one run must share a schema")
            rows.append(footer.num_rows)
            stamps.append(f"{footer_digest(footer)}@{version}")
            if config.id_column and may_hold_nulls(footer, config.id_column):
                null_id_manifests.append(i)
    finally:
        pool.shutdown(cancel_futures=True)
    assert schema is not None
    step = config.rows_per_unit
    units = [(i, start, min(start + step, n)) for i, n in enumerate(rows) for start in range(0, n, step)]
    model_uri, meta, thresholds = resolve_model(config.model, config.thresholds)
    settings = {"thresholds": thresholds, "decode": config.decode, "max_pixels": config.max_pixels,
                "max_bytes": config.max_bytes, "uri_column": config.uri_column,
                "rows_per_file": config.rows_per_unit}   # the unit size's old name, kept: it digests into run ids
    run_id = config.run_id or default_run_id(files, meta["version"], absolute(config.output), settings)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", run_id):
        raise JobError(f"run id {run_id!r}: use letters, digits, '_' and '-' (at most 64), nothing that could "
                       "make a path")
    return Plan(files, rows, schema, units, meta, model_uri, thresholds, run_id, null_id_manifests, stamps)


def _versioned_footer(uri: str) -> tuple[str, pq.FileMetaData]:
    """A manifest's version, then its footer: rewritten in between, the version no longer matches."""
    return storage.version(uri), manifest.read_footer(uri)


def footer_digest(footer: pq.FileMetaData) -> str:
    """A manifest's identity by content, from its footer: rewritten in place with other rows, it changes."""
    return hashlib.sha256(json.dumps(footer.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_footer(uri: str, footer: pq.FileMetaData, uri_column: str, id_column: str | None) -> pa.Schema:
    """A manifest's schema, once its footer shows it can be labeled: the URI (and id) column, some rows."""
    schema = footer.schema.to_arrow_schema().remove_metadata()
    manifest.check_uri_column(uri, schema, uri_column)
    if id_column and id_column not in schema.names:
        raise manifest.ManifestError(f"manifest {uri}: no id column {id_column!r} (columns: {', '.join(schema.names)})")
    if footer.num_rows == 0:
        raise manifest.ManifestError(f"manifest {uri}: has no rows")
    return schema


def resolve_model(model: str, overrides: dict[str, float]) -> tuple[str, dict[str, Any], dict[str, float]]:
    """The package a model URI names (resolved once), its metadata, and its thresholds with ``overrides``."""
    try:
        model_uri = resolve(model)
        meta, _ = read_package(model_uri)
    except PackageError as exc:
        raise JobError(str(exc)) from None
    thresholds = dict(meta["thresholds"])
    for name, value in overrides.items():
        if name not in thresholds:
            raise JobError(f"--threshold {name}={value}: {name!r} is not a label of the model ({', '.join(meta['labels'])})")
        thresholds[name] = float(value)
    return model_uri, meta, thresholds


def _schema_diff(a: pa.Schema, b: pa.Schema) -> str:
    fa, fb = {f.name: f.type for f in a}, {f.name: f.type for f in b}
    parts = [f"missing {n!r}" for n in fa if n not in fb] + [f"extra {n!r}" for n in fb if n not in fa]
    parts += [f"{n!r} is {fb[n]} not {fa[n]}" for n in fa if n in fb and fa[n] != fb[n]]
    return ", ".join(parts) or "column order differs"


def may_hold_nulls(footer: pq.FileMetaData, column: str) -> bool:
    j = [footer.schema.column(k).path for k in range(footer.num_columns)].index(column)
    stats = [footer.row_group(g).column(j).statistics for g in range(footer.num_row_groups)]
    return not all(s is not None and s.has_null_count and s.null_count == 0 for s in stats)


def default_run_id(files: list[str], model_version: str, output: str, settings: dict[str, Any]) -> str:
    """A digest of the manifests (names and sizes), the model version, the output and every setting that changes
    a row's value (thresholds, decoding, limits, unit size): the same command with another threshold is
    another run, which meets the first as rows it did not write, never as its own files to rewrite."""
    sizes = [(e.uri, e.size) for f in files for e in storage.list_files(f)]
    text = json.dumps({"manifests": sizes, "model": model_version, "output": output.rstrip("/"), **settings},
                      sort_keys=True)
    return "run-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def absolute(uri: str) -> str:
    """Local paths made absolute, URIs as given, no trailing slash."""
    if "://" not in uri:
        uri = os.path.abspath(uri)
    return uri.rstrip("/")
