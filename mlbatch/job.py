"""The labeling job: manifests in, the same manifests with multi-hot label columns out, on Ray Data.

    fused (CPU):  units of work -> UnitLabeler actors [read rows -> fetch + decode -> predict] -> write + commit
    split (GPU):  units of work -> read rows -> fetch + decode (CPU tasks) -> Predictor actors -> write + commit

The *layout* follows the cluster (``choose_layout``, ``--layout`` forces one): where predictors
hold GPUs, separate decode tasks keep the GPUs fed; on CPU, one actor per unit reads, fetches,
decodes (in its own helper processes) and predicts, so pixels never go through the object store
and reading never runs ahead of decoding. Both use the same functions, so their output is the
same, row for row.

Every input row leaves as exactly one output row: a row whose image cannot be fetched or
decoded becomes an *error row* (``status = 'error'`` and the reason) instead of stopping the
job. The job itself fails only for job-level faults: unreadable or schema-invalid manifests,
duplicate ids, a refused model package, an unwritable output, a stalled cluster, or too many
error rows.

The *unit of work* carries the run, as img2dataset's shard does. A unit is a row range of one
manifest file (``--rows-per-file`` rows); a row's identity is its position, ``(source_manifest,
source_row)``, both written to the output. The plan is made from Parquet footers alone (row
counts, schemas, null counts), so the driver holds per-file and per-unit records, never
per-row ones. Each read task gets a unit's pointer, not rows; the unit's file index travels
with its rows as a column. A write task writes, for each unit it holds rows of, one data file
(``<run_id>-a<attempt>-<unit>-r<first row>.parquet``) and, after that file is closed, a small
JSON *commit marker* with the file's statistics (rows, ok, errors, per-label positives and
probability sums, commonest errors) under ``STATE/_units/<run_id>/``. A unit is done when its
committed rows are exactly its rows. ``--resume`` lists the markers (O(units)), skips the done
units, deletes every file of the others and labels them again: a file written part way (a
local file is written under a hidden name and renamed; an S3 multipart upload that never
completed leaves no object) has no marker, so it is never counted and never doubled. The run
summary adds up the markers' statistics; nobody re-reads the output. ``_run.json`` then
``_SUCCESS`` are written last.

Why a write stage and not a ``Datasink``: a sink's results reach the driver only when every
task has finished. The write stage commits each unit inside its task just the same, and its
small results stream to the driver, which sums them and so sees progress: a run in which no
rows are committed for ``--stall-seconds`` ends with a message naming what it waits for,
instead of hanging (a cluster that lost the node its predictor or decode tasks needed).

Why not Ray Data's ``download`` expression for the fetch: its planner actor holds a whole CPU,
which deadlocks a 2-CPU node next to the predictor actor, and it turns every failure into a
null with no reason. ``storage.fetch`` (boto3, standard retry mode) runs in a thread pool in
the decode tasks instead and says exactly why an object could not be read.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import queue
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from . import images, manifest, storage
from .decoder import decode_uris
from .package import PackageError, column_name, read_package
from .registry import resolve

log = logging.getLogger(__name__)

SUMMARY_FILE = "_run.json"
SUCCESS_FILE = "_SUCCESS"
UNITS_DIR = "_units"          # STATE/_units/<run_id>/: the commit markers and the plan of a run
PLAN_FILE = "_plan.json"
PIXELS, ERROR, FILE_INDEX = "__mlbatch_pixels", "__mlbatch_error", "__mlbatch_file"
SOURCE_MANIFEST, SOURCE_ROW = "source_manifest", "source_row"
DECODE_CPUS = 0.5
WRITE_CPUS = 0.5
TOP_ERRORS_KEPT = 20          # distinct error messages kept per file's marker (and 5x that per run)
DEFAULT_STALL_SECONDS = 900.0
LAYOUTS = ("auto", "fused", "split")
DECODERS = ("pil", "torchvision")  # who decodes: PIL on CPU before predicting, or the predictor (``jpeg``)
FUSED_THREADS = 2             # cores a fused labeler uses (it claims 1 CPU, so a write task fits beside it)
ONE_TASK_ID_CHECK_ROWS = 10_000_000   # --id-column: checked by one task up to here, a cluster group-by beyond

# Ray Data settings for the run, put back afterwards (settings this Ray lacks are skipped).
RUN_SETTINGS: dict[str, Any] = {
    # Ray Data pauses a streaming task after it has yielded 2 x this many blocks nobody has taken
    # yet. The split of a unit yields many tiny blocks, and paused it holds a CPU that the decode
    # tasks need: on a 2-CPU node labeling started ~7 s late. The blocks are a few KiB each, so
    # let it run to the end. (A private field.)
    "_max_num_blocks_in_streaming_gen_buffer": None,
}


class JobError(RuntimeError):
    """A job-level fault: the run cannot produce a complete, trustworthy output."""


@dataclass
class LabelConfig:
    """Everything one labeling run needs; the CLI and ``jobs/label_images.py`` fill it from flags."""

    manifests: list[str]
    model: str
    output: str
    uri_column: str = manifest.URI_COLUMN
    id_column: str | None = None                       # checked unique (on the cluster); rows are identified by position
    batch_size: int = 64
    rows_per_file: int = 10_000                        # rows of one unit of work (a manifest's row range): the resume unit
    concurrency: int | tuple[int, int] | None = None   # predictor actors; default from the cluster
    num_gpus: float | None = None                      # per predictor actor; default 1 if the cluster has GPUs
    layout: str = "auto"                               # fused | split | auto (split where predictors hold GPUs)
    decode: str = "pil"                                # pil | torchvision (JPEGs decoded on the predictor's device)
    thresholds: dict[str, float] = field(default_factory=dict)  # overrides of the package's thresholds
    max_error_rate: float = 0.05
    max_pixels: int = images.DEFAULT_MAX_PIXELS        # larger images become error rows (decompression bombs)
    run_id: str | None = None
    resume: bool = False
    progress: bool = True
    state_dir: str | None = None   # where _run.json, _SUCCESS and _units go (default: the output folder)
    stall_seconds: float = DEFAULT_STALL_SECONDS       # end the run when no rows are committed this long (0: never)
    extra_summary: dict[str, Any] = field(default_factory=dict)  # recorded in _run.json (nightly uses it)


# ---- the output contract -------------------------------------------------------------------

def _predicted_columns(labels: list[str]) -> list[tuple[str, pa.DataType]]:
    cols = [(f"label_{column_name(x)}", pa.bool_()) for x in labels]
    cols += [(f"prob_{column_name(x)}", pa.float32()) for x in labels]
    return cols + [("labels", pa.list_(pa.string())), ("status", pa.string()), ("error", pa.string()),
                   ("model_name", pa.string()), ("model_version", pa.string()), ("run_id", pa.string()),
                   ("labeled_at", pa.timestamp("us", tz="UTC"))]


def output_columns(labels: list[str]) -> list[tuple[str, pa.DataType]]:
    """The columns the job adds after the manifest's own, in order, with their Parquet types.

    The last two are the row's identity: the manifest file it came from and its row number there.
    """
    return _predicted_columns(labels) + [(SOURCE_MANIFEST, pa.string()), (SOURCE_ROW, pa.int64())]


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


def unit_id(file_index: int, start: int) -> str:
    """The name of a unit of work: its manifest's place in the run's sorted file list and first row."""
    return f"f{file_index:06d}-r{start:012d}"


# ---- statistics that add up ----------------------------------------------------------------

@dataclass
class Stats:
    """Counts of some labeled rows (one file, a unit, a manifest, a run) that add up by ``add``.

    ``row_sum`` (the sum of the rows' ``source_row``) with ``rows`` tells a unit that is whole
    from one with a row missing or written twice.
    """

    rows: int = 0
    row_sum: int = 0
    ok: int = 0
    positives: dict[str, int] = field(default_factory=dict)
    prob_sums: dict[str, float] = field(default_factory=dict)
    error_counts: dict[str, int] = field(default_factory=dict)  # the commonest error messages

    @property
    def errors(self) -> int:
        return self.rows - self.ok

    def add(self, other: Stats, keep: int = 5 * TOP_ERRORS_KEPT) -> Stats:
        self.rows += other.rows
        self.row_sum += other.row_sum
        self.ok += other.ok
        for name, n in other.positives.items():
            self.positives[name] = self.positives.get(name, 0) + n
        for name, v in other.prob_sums.items():
            self.prob_sums[name] = self.prob_sums.get(name, 0.0) + v
        counts = collections.Counter(self.error_counts)
        counts.update(other.error_counts)
        self.error_counts = dict(counts.most_common(keep))
        return self

    @classmethod
    def of_table(cls, table: pa.Table, labels: list[str]) -> Stats:
        ok_mask = pc.equal(table.column("status"), "ok")
        ok = table.filter(ok_mask)
        errors = collections.Counter(table.filter(pc.invert(ok_mask)).column("error").to_pylist())
        return cls(rows=table.num_rows, row_sum=int(pc.sum(table.column(SOURCE_ROW)).as_py() or 0), ok=ok.num_rows,
                   positives={x: int(pc.sum(pc.cast(ok.column(f"label_{column_name(x)}"), pa.int64())).as_py() or 0)
                              for x in labels},
                   prob_sums={x: float(pc.sum(pc.cast(ok.column(f"prob_{column_name(x)}"), pa.float64())).as_py() or 0.0)
                              for x in labels},
                   error_counts=dict(errors.most_common(TOP_ERRORS_KEPT)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stats:
        return cls(**{k: d[k] for k in ("rows", "row_sum", "ok", "positives", "prob_sums", "error_counts")})

    def per_label(self, thresholds: dict[str, float]) -> dict[str, dict[str, float | None]]:
        return {x: {"positive_rate": round(self.positives.get(x, 0) / self.ok, 6) if self.ok else None,
                    "mean_probability": round(self.prob_sums.get(x, 0.0) / self.ok, 6) if self.ok else None,
                    "threshold": thresholds[x]} for x in thresholds}

    def top_errors(self, n: int = 5) -> list[dict[str, Any]]:
        return [{"error": e, "count": c} for e, c in collections.Counter(self.error_counts).most_common(n)]


# ---- the pipeline stages -------------------------------------------------------------------

def read_range(uri: str, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
    """Rows ``[start, stop)`` of a Parquet file, reading only the row groups that hold them."""
    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        groups, first, offset = [], None, 0
        for i in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(i).num_rows
            if offset < stop and offset + n > start:
                groups.append(i)
                first = offset if first is None else first
            offset += n
        table = pf.read_row_groups(groups, columns=columns)
    return table.slice(start - (first or 0), stop - start)


def read_units(batch: pa.Table, renames: dict[str, str]) -> pa.Table:
    """Read units of work (rows of ``file, uri, start, stop``): their rows, identity columns appended."""
    tables = []
    for file_index, uri, start, stop in zip(*(batch.column(c).to_pylist() for c in ("file", "uri", "start", "stop"))):
        t = read_range(uri, start, stop).replace_schema_metadata(None)
        t = t.rename_columns([renames.get(n, n) for n in t.column_names])
        n = t.num_rows
        t = t.append_column(SOURCE_MANIFEST, pa.array([uri] * n, pa.string()))
        t = t.append_column(SOURCE_ROW, pa.array(np.arange(start, start + n, dtype=np.int64)))
        tables.append(t.append_column(FILE_INDEX, pa.array(np.full(n, file_index, np.int32))))
    return pa.concat_tables(tables)


def _with_pixels(batch: pa.Table, results: list[tuple[bytes | None, str | None]]) -> pa.Table:
    batch = batch.append_column(PIXELS, pa.array([r[0] for r in results], pa.binary()))
    return batch.append_column(ERROR, pa.array([r[1] for r in results], pa.string()))


def decode_batch(batch: pa.Table, uri_column: str, size: int, threads: int = 16,
                 max_pixels: int = images.DEFAULT_MAX_PIXELS, fetch_only: bool = False) -> pa.Table:
    """Fetch and decode a batch of images (the split layout's CPU tasks): a row that cannot be
    fetched or decoded gets its reason in the error column instead of pixels."""
    return _with_pixels(batch, decode_uris(batch.column(uri_column).to_pylist(), size, max_pixels, threads,
                                           fetch_only))


class Predictor:
    """Loads the model once per actor; predicts a batch of pixels and writes the label columns.

    ``decode="torchvision"``: the batch holds the objects' encoded bytes, decoded here on the
    predictor's device (``jpeg``; PIL on the CPU for what that will not decode).
    """

    def __init__(self, model_uri: str, thresholds: dict[str, float], run_id: str, schema_metadata: dict[bytes, bytes],
                 decode: str = "pil", max_pixels: int = images.DEFAULT_MAX_PIXELS):
        import torch  # here, not at the top: the driver and the decode tasks never need torch

        from .model import load_model

        self.device = "cpu"
        if ray.get_gpu_ids():
            if torch.cuda.is_available():
                self.device = "cuda"
            else:
                log.debug("this actor holds a GPU but no CUDA device is visible: predicting on CPU")
        self.model = load_model(model_uri, device=self.device)
        self.labels = self.model.labels
        self.thresholds = np.asarray([thresholds[x] for x in self.labels], np.float32)
        self.run_id = run_id
        self.metadata = schema_metadata
        self.size = self.model.spec.image_size
        self.types = _predicted_columns(self.labels)
        self.decode, self.max_pixels = decode, max_pixels

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        raw = batch.column(PIXELS).to_pylist()
        errors = batch.column(ERROR).to_pylist()
        pixels: Any = None
        if self.decode == "torchvision":
            from .jpeg import decode_resize

            pixels, errors = decode_resize(raw, errors, self.size, self.model.device, self.max_pixels)
            ok = np.asarray([e is None for e in errors], bool)
        else:
            ok = np.asarray([p is not None for p in raw], bool)
            if ok.any():
                pixels = np.stack([np.frombuffer(p, np.uint8).reshape(self.size, self.size, 3)
                                   for p in raw if p is not None])
        probs = np.full((n, len(self.labels)), np.nan, np.float32)
        if ok.any():
            probs[ok] = self.model.predict_pixels(pixels)
        hits = probs >= self.thresholds
        columns: list[Any] = []
        for j in range(len(self.labels)):
            columns.append(pa.array(hits[:, j], pa.bool_(), mask=~ok))
        for j in range(len(self.labels)):
            columns.append(pa.array(probs[:, j], pa.float32(), mask=~ok))
        names = [[x for x, h in zip(self.labels, row) if h] if good else None for row, good in zip(hits, ok)]
        columns.append(pa.array(names, pa.list_(pa.string())))
        columns.append(pa.array(["ok" if good else "error" for good in ok], pa.string()))
        columns.append(pa.array(errors, pa.string()))
        columns.append(pa.array([self.model.name] * n, pa.string()))
        columns.append(pa.array([self.model.version] * n, pa.string()))
        columns.append(pa.array([self.run_id] * n, pa.string()))
        columns.append(pa.array([datetime.now(timezone.utc)] * n, pa.timestamp("us", tz="UTC")))
        out = batch.drop_columns([PIXELS, ERROR])
        for (name, typ), col in zip(self.types, columns):
            out = out.append_column(pa.field(name, typ), col)
        return out.replace_schema_metadata({**(out.schema.metadata or {}), **self.metadata})



class UnitLabeler(Predictor):
    """The CPU layout: one actor reads a unit's rows, fetches and decodes them, and predicts.

    Nothing goes through the object store between reading and writing. Fetching and decoding run
    in ``FUSED_THREADS`` helper processes of the actor (``decoder``: in threads of one process the
    GIL's share of each decode held it to ~1,100 img/s on 2 cores, against ~1,400 in two processes;
    NOTES), while the actor predicts the batch before on torch's threads. Reading a unit only
    when a labeler is free keeps Ray from reading every unit ahead of the decoders. Each batch is yielded as it is
    done, so the write stage streams. Same functions as the split layout (``read_units``,
    ``decode_uris``, ``Predictor.__call__``), so the same output, row for row.
    """

    def __init__(self, model_uri: str, thresholds: dict[str, float], run_id: str,
                 schema_metadata: dict[bytes, bytes], renames: dict[str, str], uri_column: str, batch_size: int,
                 max_pixels: int, decode: str = "pil", threads: int = FUSED_THREADS):
        from .decoder import HelperPool

        # helpers first: their start (a Python without torch or Ray) overlaps importing torch here
        self.decoders = HelperPool(threads)
        import torch

        super().__init__(model_uri, thresholds, run_id, schema_metadata, decode, max_pixels)
        if self.device == "cpu":
            torch.set_num_threads(threads)
        self.renames, self.uri_column, self.batch_size = renames, uri_column, batch_size
        self.ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlbatch-decode")

    def _decode(self, rows: pa.Table) -> pa.Table:
        return _with_pixels(rows, self.decoders.decode(rows.column(self.uri_column).to_pylist(), self.size,
                                                       self.max_pixels, fetch_only=self.decode != "pil"))

    def __del__(self) -> None:
        # Ray Data drops the labeler when its actor shuts down gracefully: end its helpers with it (a
        # killed actor's helpers see their stdin close and end too)
        decoders = getattr(self, "decoders", None)
        if decoders is not None:
            decoders.close()

    def __call__(self, units: pa.Table) -> Iterator[pa.Table]:
        rows = read_units(units, self.renames)
        batches = [rows.slice(i, self.batch_size) for i in range(0, rows.num_rows, self.batch_size)]
        pending = self.ahead.submit(self._decode, batches[0]) if batches else None
        for i in range(len(batches)):
            decoded = pending.result()
            pending = self.ahead.submit(self._decode, batches[i + 1]) if i + 1 < len(batches) else None
            yield Predictor.__call__(self, decoded)


def write_units(batch: pa.Table, output: str, markers: str, run_id: str, attempt: int, rows_per_unit: int,
                columns: list[str], labels: list[str], metadata: dict[bytes, bytes]) -> pa.Table:
    """Write one data file per unit this batch holds rows of, then its commit marker; return the markers.

    The marker is written only after the data file is whole (a local file is renamed into place,
    an S3 object exists only once its upload completed), so it *is* the commit. The names are
    fixed by the unit and its first row: a retried task writes the same names again.
    """
    files = batch.column(FILE_INDEX).to_numpy()
    starts = batch.column(SOURCE_ROW).to_numpy() // rows_per_unit * rows_per_unit
    keys = np.stack([files, starts], axis=1)
    out = []
    for f, start in np.unique(keys, axis=0):
        piece = batch.filter(pa.array((files == f) & (starts == start)))
        piece = piece.sort_by(SOURCE_ROW).select(columns).replace_schema_metadata(metadata)
        unit = unit_id(int(f), int(start))
        name = f"{run_id}-a{attempt:03d}-{unit}-r{piece.column(SOURCE_ROW)[0].as_py():012d}.parquet"
        _write_whole(piece, storage.join(output, name))
        stats = Stats.of_table(piece, labels)
        marker = {"file": name, "unit": unit, "file_index": int(f), "attempt": attempt, **stats.to_dict()}
        text = json.dumps(marker)
        _write_whole(text.encode(), storage.join(markers, name[: -len(".parquet")] + ".json"))
        out.append({"unit": unit, "file_index": int(f), "marker": text})
    return pa.Table.from_pylist(out, schema=pa.schema([("unit", pa.string()), ("file_index", pa.int64()),
                                                       ("marker", pa.string())]))


def _write_whole(data: pa.Table | bytes, uri: str) -> None:
    """Write a Parquet file (a table) or bytes so that the file is either absent or complete under its name."""
    fs, path = storage.filesystem(uri)
    if storage.is_s3(uri):   # the object appears only when its upload completes
        pq.write_table(data, path, filesystem=fs) if isinstance(data, pa.Table) else storage.write_bytes(uri, data)
        return
    folder, name = os.path.split(path)
    fs.create_dir(folder, recursive=True)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")   # hidden: no listing or engine reads it
    if isinstance(data, pa.Table):
        pq.write_table(data, tmp, filesystem=fs)
    else:
        with open(tmp, "wb") as f:
            f.write(data)
    os.replace(tmp, path)


# ---- planning: footers only ----------------------------------------------------------------

@dataclass
class _Plan:
    files: list[str]
    rows: list[int]                 # per file
    schema: pa.Schema
    units: list[tuple[int, int, int]]   # (file index, start, stop)
    meta: dict[str, Any]
    model_uri: str                  # the package itself: a registry reference resolved once, for every actor
    thresholds: dict[str, float]
    run_id: str
    null_id_files: list[int]        # files whose footers do not rule out a null id

    @property
    def rows_in(self) -> int:
        return sum(self.rows)


def _plan(config: LabelConfig) -> _Plan:
    """Check everything that can be checked before compute, from the manifests' footers: no rows are read."""
    if config.rows_per_file < 1:
        raise JobError(f"--rows-per-file {config.rows_per_file}: must be at least 1")
    files = manifest.expand(config.manifests)
    schema = None
    rows: list[int] = []
    null_id_files: list[int] = []
    pool = ThreadPoolExecutor(max_workers=min(32, len(files)))
    try:
        footers = pool.map(manifest.read_footer, files)   # a few KiB each, in order, none kept
        for i, (uri, footer) in enumerate(zip(files, footers)):
            s = footer.schema.to_arrow_schema().remove_metadata()
            manifest.check_uri_column(uri, s, config.uri_column)
            if config.id_column and config.id_column not in s.names:
                raise manifest.ManifestError(f"manifest {uri}: no id column {config.id_column!r} "
                                             f"(columns: {', '.join(s.names)})")
            if schema is None:
                schema = s
            elif not s.equals(schema):
                raise manifest.ManifestError(f"manifest {uri}: its columns differ from {files[0]}'s "
                                             f"({_schema_diff(schema, s)}); manifests of one run must share a schema")
            if footer.num_rows == 0:
                raise manifest.ManifestError(f"manifest {uri}: has no rows")
            rows.append(footer.num_rows)
            if config.id_column and _may_hold_nulls(footer, config.id_column):
                null_id_files.append(i)
    finally:
        pool.shutdown(cancel_futures=True)
    assert schema is not None
    step = config.rows_per_file
    units = [(i, start, min(start + step, n)) for i, n in enumerate(rows) for start in range(0, n, step)]
    try:
        model_uri = resolve(config.model)
        meta, _ = read_package(model_uri)
    except PackageError as exc:
        raise JobError(str(exc)) from None
    thresholds = dict(meta["thresholds"])
    for name, value in config.thresholds.items():
        if name not in thresholds:
            raise JobError(f"--threshold {name}={value}: {name!r} is not a label of the model ({', '.join(meta['labels'])})")
        thresholds[name] = float(value)
    run_id = config.run_id or _default_run_id(files, meta["version"], _absolute(config.output))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", run_id):
        raise JobError(f"run id {run_id!r}: use letters, digits, '_' and '-' (at most 64), nothing that could "
                       "make a path")
    return _Plan(files, rows, schema, units, meta, model_uri, thresholds, run_id, null_id_files)


def _schema_diff(a: pa.Schema, b: pa.Schema) -> str:
    fa, fb = {f.name: f.type for f in a}, {f.name: f.type for f in b}
    parts = [f"missing {n!r}" for n in fa if n not in fb] + [f"extra {n!r}" for n in fb if n not in fa]
    parts += [f"{n!r} is {fb[n]} not {fa[n]}" for n in fa if n in fb and fa[n] != fb[n]]
    return ", ".join(parts) or "column order differs"


def _check_ids(plan: _Plan, column: str) -> None:
    """Ids non-null (from the footers' null counts) and unique (a group-by on the cluster); the driver holds none."""
    _check_null_ids(plan, column)
    _check_unique_ids(plan, column)


def _may_hold_nulls(footer: pq.FileMetaData, column: str) -> bool:
    j = [footer.schema.column(k).path for k in range(footer.num_columns)].index(column)
    stats = [footer.row_group(g).column(j).statistics for g in range(footer.num_row_groups)]
    return not all(s is not None and s.has_null_count and s.null_count == 0 for s in stats)


def _check_null_ids(plan: _Plan, column: str) -> None:
    """Only a file whose footer counts nulls (or has no statistics) is read, by a task on the cluster."""
    for i in plan.null_id_files:
        uri = plan.files[i]
        row = ray.get(_first_null.remote(uri, column))
        if row is not None:
            raise manifest.ManifestError(f"manifest {uri}: row {row}: id column {column!r} is null; "
                                         "ids must be unique and non-null")


def _first_null_local(uri: str, column: str) -> int | None:
    col = read_range(uri, 0, 1 << 62, [column]).column(0)
    if col.null_count == 0:
        return None
    return int(pc.index(pc.is_null(col), True).as_py())


_first_null = ray.remote(num_cpus=DECODE_CPUS)(_first_null_local)


def _read_ids(batch: pa.Table, column: str) -> pa.Table:
    """The id column of units of work, with each row's position packed in one int64 (file << 40 | row)."""
    tables = []
    for file_index, uri, start, stop in zip(*(batch.column(c).to_pylist() for c in ("file", "uri", "start", "stop"))):
        ids = read_range(uri, start, stop, [column]).column(0)
        pos = (np.int64(file_index) << 40) + np.arange(start, start + len(ids), dtype=np.int64)
        tables.append(pa.table({"id": ids, "pos": pos}))
    return pa.concat_tables(tables)


def _check_unique_ids(plan: _Plan, column: str) -> None:
    """Every id once, checked on the cluster, never collected in the driver.

    Up to ``ONE_TASK_ID_CHECK_ROWS`` rows it is one task (Arrow's hash group-by over the ids: about a
    second, where Ray Data's distributed group-by pays ~10-20 s of shuffle start-up); beyond, a
    group-by on the cluster, a shuffle of the ids.
    """
    if plan.rows_in <= ONE_TASK_ID_CHECK_ROWS:
        dup = ray.get(_duplicate_id_task.remote(plan.units, plan.files, column))
    else:
        from ray.data.aggregate import Count, Max, Min
        from ray.data.expressions import col

        ds = _units_dataset(plan.units, plan.files).map_batches(_read_ids, fn_kwargs={"column": column},
                                                                  batch_size=1, batch_format="pyarrow",
                                                                  num_cpus=DECODE_CPUS)
        groups = ds.groupby("id").aggregate(Count(alias_name="n"), Min("pos", alias_name="first"),
                                            Max("pos", alias_name="last"))
        dup = next(iter(groups.filter(expr=col("n") > 1).take(1)), None)
    if dup:
        first, second = int(dup["first"]), int(dup["last"])
        mask = (1 << 40) - 1
        raise manifest.ManifestError(f"manifest {plan.files[second >> 40]}: row {second & mask}: id {dup['id']!r} "
                                     f"already appears at {plan.files[first >> 40]} row {first & mask}; "
                                     "ids must be unique")


def _duplicate_id(units: list[tuple[int, int, int]], files: list[str], column: str) -> dict[str, Any] | None:
    """The first repeated id of the units (its first and last position), or None: Arrow's group-by."""
    items = pa.Table.from_pylist([{"file": f, "uri": files[f], "start": a, "stop": b} for f, a, b in units])
    ids = _read_ids(items, column)
    groups = ids.group_by("id").aggregate([("pos", "count"), ("pos", "min"), ("pos", "max")])
    groups = groups.filter(pc.greater(groups.column("pos_count"), 1))
    if not groups.num_rows:
        return None
    first = groups.sort_by("pos_max").slice(0, 1).to_pylist()[0]
    return {"id": first["id"], "first": first["pos_min"], "last": first["pos_max"]}


_duplicate_id_task = ray.remote(num_cpus=DECODE_CPUS)(_duplicate_id)


def _units_dataset(units: list[tuple[int, int, int]], files: list[str]) -> ray.data.Dataset:
    items = [{"file": f, "uri": files[f], "start": a, "stop": b} for f, a, b in units]
    return ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 1000)))


def _default_run_id(files: list[str], model_version: str, output: str) -> str:
    """A digest of the manifests (names and sizes), the model version and the output."""
    sizes = [(e.uri, e.size) for f in files for e in storage.list_files(f)]
    text = json.dumps({"manifests": sizes, "model": model_version, "output": output.rstrip("/")}, sort_keys=True)
    return "run-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def _absolute(uri: str) -> str:
    """Local paths made absolute, URIs as given, no trailing slash."""
    if "://" not in uri:
        uri = os.path.abspath(uri)
    return uri.rstrip("/")


def _check_writable(output: str) -> None:
    """Fail before any compute if the output cannot be written."""
    probe = storage.join(output, f"_mlbatch_probe_{os.getpid()}_{int(time.time() * 1000)}")
    try:
        storage.write_bytes(probe, b"ok")
        storage.delete(probe)
    except (OSError, ValueError) as exc:
        raise JobError(f"output {output} is not writable: {exc}") from None


# ---- what earlier attempts committed ------------------------------------------------------

_NAME_RE = r"-a(\d+)-(f\d{6}-r\d{12})-r\d{12}\.parquet"


def run_files(output: str, run_id: str) -> list[str]:
    """The data files of a run directly under ``output``: names start with ``<run_id>-a``."""
    if not storage.exists(output):
        return []
    prefix, base = f"{run_id}-a", output.rstrip("/") + "/"
    return [e.uri for e in storage.list_files(output, suffix=".parquet")
            if e.uri.startswith(base) and "/" not in e.uri[len(base):] and e.uri[len(base):].startswith(prefix)]


def _attempt_of(uri: str, run_id: str) -> int:
    m = re.match(re.escape(run_id) + r"-a(\d+)-", uri.rsplit("/", 1)[-1])
    return int(m.group(1)) if m else -1


def read_markers(markers: str) -> list[dict[str, Any]]:
    """Every commit marker of a run (one small JSON per committed data file)."""
    if not storage.exists(markers):
        return []
    uris = [e.uri for e in storage.list_files(markers, suffix=".json")]
    with ThreadPoolExecutor(max_workers=32) as pool:
        return list(pool.map(lambda u: json.loads(storage.read_text(u)), uris))


def _whole(rows: int, row_sum: int, start: int, stop: int) -> bool:
    """Rows ``[start, stop)`` each once: their count and the sum of their row numbers."""
    return rows == stop - start and row_sum == (start + stop - 1) * (stop - start) // 2


@dataclass
class _Run:
    """One attempt of a run: where it writes, what earlier attempts committed, what is left to label."""

    config: LabelConfig
    plan: _Plan
    output: str
    state: str
    markers: str
    attempt: int
    done: dict[str, tuple[int, int]]        # unit -> committed (rows, row_sum), earlier attempts and this one
    file_stats: list[Stats]                 # per manifest file
    total: Stats                            # the whole run
    todo: list[tuple[int, int, int]]
    files_written: int = 0


def _prepare(config: LabelConfig, plan: _Plan) -> _Run:
    """Start a run afresh, or (``--resume``) keep its whole committed units and clear away the rest."""
    output = _absolute(config.output)
    state = _absolute(config.state_dir) if config.state_dir else output
    markers = storage.join(state, UNITS_DIR, plan.run_id)
    for name in (SUCCESS_FILE, SUMMARY_FILE):
        storage.delete(storage.join(state, name))
    # what a resumed run must share with the units it keeps (the decoder: --decode torchvision's pixels differ)
    plan_record = {"files": [[u, n] for u, n in zip(plan.files, plan.rows)], "rows_per_unit": config.rows_per_file,
                   "decode": config.decode}
    plan_uri = storage.join(markers, PLAN_FILE)
    files = run_files(output, plan.run_id)
    done: dict[str, tuple[int, int]] = {}
    file_stats = [Stats() for _ in plan.files]
    total = Stats()
    attempt = 0
    if config.resume and (files or storage.exists(plan_uri)):
        before = json.loads(storage.read_text(plan_uri)) if storage.exists(plan_uri) else None
        if before is not None:
            before.setdefault("decode", "pil")  # runs started before --decode existed
        if before is None or {k: v for k, v in before.items() if k != "attempt"} != plan_record:
            raise JobError(f"cannot resume run {plan.run_id}: its manifests, --rows-per-file or --decode are not "
                           f"those it started with ({plan_uri} {'is gone' if before is None else 'differs'}); "
                           "run again without --resume")
        committed: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        for m in read_markers(markers):
            committed[m["unit"]].append(m)
        bounds = {unit_id(f, a): (a, b) for f, a, b in plan.units}
        for unit, ms in committed.items():
            stats = Stats()
            for m in ms:
                stats.add(Stats.from_dict(m), keep=TOP_ERRORS_KEPT)
            if unit in bounds and _whole(stats.rows, stats.row_sum, *bounds[unit]):
                done[unit] = (stats.rows, stats.row_sum)
                file_stats[ms[0]["file_index"]].add(stats)
                total.add(stats)
        keep = {m["file"] for u in done for m in committed[u]}
        for unit, ms in committed.items():       # a part of a unit is no commit: markers first, then the data
            if unit not in done:
                for m in ms:
                    storage.delete(storage.join(markers, m["file"][: -len(".parquet")] + ".json"))
        stale = [u for u in files if u.rsplit("/", 1)[-1] not in keep]
        for uri in stale:
            storage.delete(uri)
        attempt = max([_attempt_of(u, plan.run_id) for u in files] + [before.get("attempt", 0)]) + 1
        log.info("resuming run %s (attempt %d): %d of %d units committed, %d files of unfinished units removed",
                 plan.run_id, attempt, len(done), len(plan.units), len(stale))
    else:
        for uri in files:  # a repeated run replaces its own files
            storage.delete(uri)
        storage.delete(markers)
    storage.write_text(plan_uri, json.dumps({**plan_record, "attempt": attempt}))
    todo = [u for u in plan.units if unit_id(u[0], u[1]) not in done]
    return _Run(config, plan, output, state, markers, attempt, done, file_stats, total, todo)


# ---- running it ----------------------------------------------------------------------------

@contextlib.contextmanager
def _data_context(**settings: Any) -> Iterator[None]:
    """Set Ray Data's context fields for one run and put the old values back after."""
    ctx = ray.data.DataContext.get_current()
    old = {name: getattr(ctx, name) for name in settings if hasattr(ctx, name)}
    for name in old:
        setattr(ctx, name, settings[name])
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(ctx, name, value)


def _cluster_resources() -> tuple[float, float]:
    res = ray.cluster_resources()
    return float(res.get("CPU", 1)), float(res.get("GPU", 0))


def _predictor_device_check(num_gpus: float) -> str:
    """Ask a task holding a GPU whether CUDA is usable there; warn once on the driver if not."""

    @ray.remote(num_gpus=num_gpus, num_cpus=0)
    def probe() -> tuple[list, bool]:
        import torch
        return ray.get_gpu_ids(), torch.cuda.is_available()

    ids, cuda = ray.get(probe.remote())
    if not cuda:
        log.warning("predictor actors are given GPUs %s, but no CUDA device is visible to them: "
                    "predicting on CPU", ids)
        return "cpu (GPU assigned, no CUDA device)"
    return "cuda"


def label(config: LabelConfig) -> dict[str, Any]:
    """Run one labeling job and return its summary (also written to ``STATE/_run.json``).

    plan (footers) -> check ids (cluster) -> prepare (resume) -> pipeline (stream of commits) -> add up
    """
    started = time.time()
    if config.decode not in DECODERS:  # before anything is planned or removed
        raise JobError(f"--decode {config.decode!r}: choose one of {', '.join(DECODERS)}")
    plan = _plan(config)
    output = _absolute(config.output)
    state = _absolute(config.state_dir) if config.state_dir else output
    if config.resume and storage.exists(storage.join(state, SUCCESS_FILE)):
        done = json.loads(storage.read_text(storage.join(state, SUMMARY_FILE)))
        if done.get("run_id") == plan.run_id:
            log.info("run %s is already complete in %s: nothing to resume", plan.run_id, output)
            return done
    _check_writable(output)
    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)
    with _data_context(enable_progress_bars=config.progress, **RUN_SETTINGS):
        if config.id_column:
            _check_ids(plan, config.id_column)
        run = _prepare(config, plan)
        predictor = _run_pipeline(run) if run.todo else {"layout": None, "concurrency": None, "num_gpus": None,
                                                                  "device": None, "decode": None}
    return _finish(run, started, predictor)


def choose_layout(requested: str, num_gpus: float) -> str:
    """``split`` where predictors hold GPUs (decode tasks keep the GPU fed), ``fused`` on CPU.

    On CPU, a separate decode stage sends each image's pixels through the object store (decode
    task -> predictor) and lets Ray read units ahead of decoding; one actor per unit with its own
    decode helpers does neither, and measured 1.18x and 1.00x split's speed on 2 cores (benchmarks/NOTES.md).
    """
    if requested not in LAYOUTS:
        raise JobError(f"--layout {requested!r}: choose one of {', '.join(LAYOUTS)}")
    if requested != "auto":
        return requested
    return "split" if num_gpus > 0 else "fused"


def _run_pipeline(run: _Run) -> dict[str, Any]:
    """units -> [read -> fetch + decode -> predict] -> write + commit, streaming; returns the predictor's set-up.

    ``split``: read, fetch + decode (CPU tasks) and predict (actors, GPUs) are stages of their own;
    ``fused``: one actor does all three per unit of work (the CPU layout, ``UnitLabeler``).
    """
    config, plan = run.config, run.plan
    cpus, gpus = _cluster_resources()
    num_gpus = config.num_gpus if config.num_gpus is not None else (1.0 if gpus >= 1 else 0.0)
    layout = choose_layout(config.layout, num_gpus)
    if config.concurrency is not None:
        concurrency = config.concurrency
    elif num_gpus > 0:
        concurrency = (1, max(1, int(gpus // num_gpus)))
    else:
        concurrency = max(1, int(cpus // 2))
    device = _predictor_device_check(num_gpus) if num_gpus > 0 else "cpu"
    labels = plan.meta["labels"]
    renames = renamed_inputs(plan.schema.names, labels)
    if renames:
        log.info("manifest columns kept under new names (the output uses their names): %s", renames)
    metadata = {b"mlbatch": json.dumps({"labels": labels, "thresholds": plan.thresholds,
                                        "model_name": plan.meta["name"], "model_version": plan.meta["version"],
                                        "run_id": plan.run_id}).encode()}
    pool = concurrency if isinstance(concurrency, tuple) else (concurrency, concurrency)
    columns = [renames.get(n, n) for n in plan.schema.names] + [name for name, _ in output_columns(labels)]
    log.info("labeling %d rows (%d units of work) of %d manifests into %s (run %s, %s layout, %s predictor actors, "
             "device %s, %s decoding)", sum(b - a for _, a, b in run.todo), len(run.todo), len(plan.files),
             run.output, plan.run_id, layout, concurrency, device, config.decode)

    uri_col = renames.get(config.uri_column, config.uri_column)
    predictor_args = {"model_uri": plan.model_uri, "thresholds": plan.thresholds, "run_id": plan.run_id,
                      "schema_metadata": metadata, "decode": config.decode, "max_pixels": config.max_pixels}
    ds = _units_dataset(run.todo, plan.files)
    if layout == "fused":
        ds = ds.map_batches(UnitLabeler, fn_constructor_kwargs={
                                **predictor_args, "renames": renames, "uri_column": uri_col,
                                "batch_size": config.batch_size},
                            batch_size=1, batch_format="pyarrow", num_gpus=num_gpus or None,
                            num_cpus=1 if not num_gpus else None,
                            compute=ray.data.ActorPoolStrategy(min_size=pool[0], max_size=pool[1]))
    else:
        ds = ds.map_batches(read_units, fn_kwargs={"renames": renames}, batch_size=1, batch_format="pyarrow",
                            num_cpus=DECODE_CPUS)
        # Blocks of a few batches: a unit is read as one block, so without this a single task would
        # fetch every image of it. Small blocks spread the fetching over the cluster.
        ds = ds.repartition(target_num_rows_per_block=config.batch_size * 4)
        # Fetching is half waiting on storage, so a decode task asks for half a CPU. That also keeps
        # Ray from fusing decode into the predictor actors (it fuses stages with equal resources).
        ds = ds.map_batches(decode_batch, fn_kwargs={"uri_column": uri_col, "size": plan.meta["input"]["size"],
                                                       "max_pixels": config.max_pixels,
                                                       "fetch_only": config.decode != "pil"},
                            batch_format="pyarrow", batch_size=config.batch_size, num_cpus=DECODE_CPUS)
        ds = ds.map_batches(Predictor, fn_constructor_kwargs=predictor_args,
                            batch_format="pyarrow", batch_size=config.batch_size, num_gpus=num_gpus or None,
                            num_cpus=1 if not num_gpus else None,
                            compute=ray.data.ActorPoolStrategy(min_size=pool[0], max_size=pool[1]))
    # Writing is mostly waiting on storage too: half a CPU lets files land as the job goes, so a
    # 2-CPU node (predictor + decode) keeps memory flat and a killed run keeps what it finished.
    ds = ds.map_batches(write_units, fn_kwargs={"output": run.output, "markers": run.markers, "run_id": plan.run_id,
                                                "attempt": run.attempt, "rows_per_unit": config.rows_per_file,
                                                "columns": columns, "labels": labels, "metadata": metadata},
                        batch_format="pyarrow", batch_size=config.rows_per_file, num_cpus=WRITE_CPUS)
    for batch in _stream(ds, config.stall_seconds, run):
        for unit, file_index, text in zip(*(batch.column(c).to_pylist() for c in ("unit", "file_index", "marker"))):
            stats = Stats.from_dict(json.loads(text))
            rows, row_sum = run.done.get(unit, (0, 0))
            run.done[unit] = (rows + stats.rows, row_sum + stats.row_sum)
            run.file_stats[file_index].add(stats)
            run.total.add(stats)
            run.files_written += 1
    return {"layout": layout, "concurrency": concurrency, "num_gpus": num_gpus, "device": device,
            "decode": config.decode}


def _stream(ds: ray.data.Dataset, stall_seconds: float, run: _Run) -> Iterator[pa.Table]:
    """The write stage's results as they come; a ``JobError`` if none comes for ``stall_seconds``."""
    results: queue.Queue = queue.Queue(maxsize=64)
    end = object()
    # Ray Data has no public way to stop a running dataset, and it keeps the executor on the
    # dataset only once a first result came: so keep it from the start, to stop it on a stall.
    executors: list[Any] = []
    create = ds._create_executor

    def create_and_keep() -> Any:
        executors.append(create())
        return executors[-1]

    ds._create_executor = create_and_keep  # type: ignore[method-assign]

    def consume() -> None:
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
                results.put(batch)
            results.put(end)
        except BaseException as exc:  # handed to the driver's thread, raised there
            results.put(exc)

    thread = threading.Thread(target=consume, name="mlbatch-commits", daemon=True)
    thread.start()
    last = time.monotonic()
    while True:
        try:
            item = results.get(timeout=5.0)
        except queue.Empty:
            if stall_seconds and time.monotonic() - last > stall_seconds:
                message = _stall_message(run, stall_seconds)
                for executor in executors:   # ends its tasks and actors, so the cluster is free again
                    executor.shutdown(force=True)
                raise JobError(message) from None
            continue
        if item is end:
            return
        if isinstance(item, BaseException):
            raise item
        last = time.monotonic()
        for executor in executors:
            _forget_block_stats(executor)
        yield item


def _forget_block_stats(executor: Any) -> None:
    """Drop the per-block statistics Ray Data keeps in the driver, so the driver stays flat.

    Each map operator keeps a ``BlockStats`` (~0.5 KiB) for every block it has output, for
    ``Dataset.stats()``: at 256-row blocks a billion rows would hold several GB in the driver. A
    labeling run keeps its own statistics per unit, so these are dropped as results come in (the
    executor's final ``stats()`` then covers only the last blocks). Private fields: should a
    later Ray rename them, nothing is dropped and nothing else changes.
    """
    for op in getattr(executor, "_topology", None) or {}:
        kept = getattr(op, "_output_blocks_stats", None)
        if isinstance(kept, list):
            kept.clear()


def _stall_message(run: _Run, stall_seconds: float) -> str:
    """What the run waits for: committed rows, the cluster's free resources, pending actors and tasks."""
    committed = run.total.rows
    parts = [f"run {run.plan.run_id}: no rows committed for {stall_seconds:.0f} s (--stall-seconds); "
             f"{committed} of {run.plan.rows_in} rows committed"]
    try:
        total, free = ray.cluster_resources(), ray.available_resources()
        parts.append("free on the cluster: " + ", ".join(f"{k} {free.get(k, 0):g} of {v:g}" for k, v in
                                                         sorted(total.items()) if k in ("CPU", "GPU")))
        alive = [n for n in ray.nodes() if n.get("Alive")]
        parts.append(f"{len(alive)} live node{'s' if len(alive) != 1 else ''}")
        from ray.util.state import list_actors, list_tasks
        job = ray.get_runtime_context().get_job_id()
        pending = collections.Counter(
            f"{a.class_name} actor {a.state.lower().replace('_', ' ')} (needs {a.required_resources})"
            for a in list_actors(filters=[("job_id", "=", job)], detail=True, limit=1000, raise_on_missing_output=False)
            if a.state in ("PENDING_CREATION", "RESTARTING", "DEPENDENCIES_UNREADY"))
        pending.update(
            f"{t.name} task {t.state.lower().replace('_', ' ')} (needs {t.required_resources})"
            for t in list_tasks(filters=[("job_id", "=", job)], detail=True, limit=10_000, raise_on_missing_output=False)
            if t.state in ("PENDING_NODE_ASSIGNMENT", "PENDING_ARGS_AVAIL") and t.required_resources)
        waiting = [f"{n} x {what}" for what, n in pending.most_common(6)]
        parts.append("waiting for: " + ("; ".join(waiting) if waiting else "nothing pending that Ray reports"))
    except Exception as exc:  # the report must not hide the stall
        parts.append(f"(cluster state unavailable: {exc})")
    return ". ".join(parts) + ". Its committed units are kept: run again with --resume when the cluster has room."


def _finish(run: _Run, started: float, predictor: dict[str, Any]) -> dict[str, Any]:
    """Add up the units' statistics, check every unit is whole, write ``_run.json`` then ``_SUCCESS``."""
    config, plan = run.config, run.plan
    total = run.total
    broken = [(unit_id(f, a), run.done[unit_id(f, a)][0], b - a) for f, a, b in plan.units
              if unit_id(f, a) in run.done and not _whole(*run.done[unit_id(f, a)], a, b)]
    missing = sum(1 for f, a, _ in plan.units if unit_id(f, a) not in run.done)
    wall = time.time() - started
    rows_out = total.rows
    summary = {
        "run_id": plan.run_id,
        "status": "complete",
        "output": run.output,
        "manifests": plan.files,
        "rows_in": plan.rows_in,
        "rows_out": rows_out,
        "ok": total.ok,
        "errors": total.errors,
        "error_rate": total.errors / rows_out if rows_out else 0.0,
        "top_errors": total.top_errors(),
        "labels": total.per_label(plan.thresholds),
        "per_manifest": [{"manifest": uri, "rows": s.rows, "ok": s.ok, "errors": s.errors,
                          "labels": s.per_label(plan.thresholds)} for uri, s in zip(plan.files, run.file_stats)],
        "model": {"uri": config.model, "resolved_uri": plan.model_uri, "name": plan.meta["name"],
                  "version": plan.meta["version"]},
        "renamed_columns": renamed_inputs(plan.schema.names, plan.meta["labels"]),
        "units": len(plan.units),
        "files": len(read_markers(run.markers)) if run.attempt else run.files_written,
        "attempts": run.attempt + 1,
        "predictor": predictor,
        "wall_seconds": round(wall, 2),
        "rows_per_second": round(rows_out / wall, 2) if wall > 0 else None,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "arguments": _arguments(config),
        **config.extra_summary,
    }
    summary_uri = storage.join(run.state, SUMMARY_FILE)
    if broken or missing or rows_out != plan.rows_in:
        summary["status"] = "failed"
        storage.write_text(summary_uri, json.dumps(summary, indent=2) + "\n")
        detail = f"; unit {broken[0][0]} has {broken[0][1]} of {broken[0][2]} rows" if broken else ""
        raise JobError(f"run {plan.run_id}: {plan.rows_in} rows in but {rows_out} rows out, {missing} units "
                       f"uncommitted{detail}; output is incomplete: run again with --resume")
    if summary["error_rate"] > config.max_error_rate:
        summary["status"] = "failed"
        storage.write_text(summary_uri, json.dumps(summary, indent=2) + "\n")
        top = "; ".join(f"{e['count']} x {e['error']}" for e in summary["top_errors"][:3])
        raise JobError(f"run {plan.run_id}: {total.errors} of {rows_out} rows are errors ({summary['error_rate']:.1%}), "
                       f"above --max-error-rate {config.max_error_rate:.1%}. Commonest: {top}")
    storage.write_text(summary_uri, json.dumps(summary, indent=2) + "\n")
    storage.write_text(storage.join(run.state, SUCCESS_FILE), "")
    log.info("run %s complete: %d rows, %d ok, %d errors in %.1fs", plan.run_id, rows_out, total.ok, total.errors, wall)
    return summary


def _arguments(config: LabelConfig) -> dict[str, Any]:
    """The run's arguments as given: no environment, so no credentials."""
    out = asdict(config)
    out.pop("extra_summary", None)
    out["concurrency"] = list(config.concurrency) if isinstance(config.concurrency, tuple) else config.concurrency
    return out


def summary_table(summary: dict[str, Any]) -> str:
    """A short plain-text table of a run summary, for the console."""
    lines = [f"run {summary['run_id']}: {summary['status']}  ->  {summary['output']}",
             f"rows in {summary['rows_in']}, out {summary['rows_out']}: {summary['ok']} ok, {summary['errors']} errors "
             f"({summary['error_rate']:.2%})   {summary['wall_seconds']}s, {summary['rows_per_second']} rows/s",
             f"model {summary['model']['name']} {summary['model']['version']}   "
             f"predictor device: {summary['predictor']['device']}, layout: {summary['predictor'].get('layout')}, "
             f"decode: {summary['predictor'].get('decode')}",
             f"{'label':<16}{'threshold':>10}{'positive rate':>15}{'mean prob':>11}"]
    for name, s in summary["labels"].items():
        rate = "n/a" if s["positive_rate"] is None else f"{s['positive_rate']:.3f}"
        mean = "n/a" if s["mean_probability"] is None else f"{s['mean_probability']:.3f}"
        lines.append(f"{name:<16}{s['threshold']:>10.3f}{rate:>15}{mean:>11}")
    for e in summary["top_errors"]:
        lines.append(f"  error x{e['count']}: {e['error']}")
    if summary.get("renamed_columns"):
        lines.append("kept under new names: " + ", ".join(f"{a} -> {b}" for a, b in summary["renamed_columns"].items()))
    return "\n".join(lines)
