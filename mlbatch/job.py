"""The labeling job: manifests in, the same manifests with multi-hot label columns out, on Ray Data.

    read_parquet -> fetch + decode (CPU tasks) -> Predictor (actor pool) -> write_parquet

Every input row leaves as exactly one output row: a row whose image cannot be fetched or
decoded becomes an *error row* (``status = 'error'`` and the reason) instead of stopping the
job. The job itself fails only for job-level faults: unreadable or schema-invalid manifests,
a refused model package, an unwritable output, or too many error rows.

Resuming uses Ray Data's checkpointing (two-phase commit of each output file with the ids it
holds), keyed on the id column or, without one, the image URI. Output file names start with
``<run_id>-a<attempt>-``: a repeated run deletes its run's files first, a resumed run adds
files of a new attempt, so nothing is doubled. ``_run.json`` then ``_SUCCESS`` are written last.

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
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.datasource import FilenameProvider

from . import images, manifest, storage
from .package import PackageError, column_name, read_package

log = logging.getLogger(__name__)

SUMMARY_FILE = "_run.json"
SUCCESS_FILE = "_SUCCESS"
CHECKPOINTS_DIR = "_checkpoints"
PIXELS, ERROR = "__mlbatch_pixels", "__mlbatch_error"
DECODE_CPUS = 0.5
WRITE_CPUS = 0.5

# Ray Data settings for the run, put back afterwards (settings this Ray lacks are skipped).
RUN_SETTINGS: dict[str, Any] = {
    # Ray Data pauses a streaming task after it has yielded 2 x this many blocks nobody has taken
    # yet. The repartition of a manifest yields hundreds of tiny blocks, and paused it holds a CPU
    # that the decode tasks need: on a 2-CPU node labeling started ~7 s late. The blocks are a
    # few KiB each, so let it run to the end. (A private field.)
    "_max_num_blocks_in_streaming_gen_buffer": None,
    # The v2 Parquet reader lists files in a task and starts footer-reading actors: ~3 s before
    # the first row on a small node. _plan has listed and read every manifest already.
    "use_datasource_v2": False,
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
    id_column: str | None = None
    batch_size: int = 64
    rows_per_file: int = 10_000                        # output files of about this many rows; also the resume unit
    concurrency: int | tuple[int, int] | None = None   # predictor actors; default from the cluster
    num_gpus: float | None = None                      # per predictor actor; default 1 if the cluster has GPUs
    thresholds: dict[str, float] = field(default_factory=dict)  # overrides of the package's thresholds
    max_error_rate: float = 0.05
    max_pixels: int = images.DEFAULT_MAX_PIXELS        # larger images become error rows (decompression bombs)
    run_id: str | None = None
    resume: bool = False
    progress: bool = True
    state_dir: str | None = None   # where _run.json, _SUCCESS and _checkpoints go (default: the output folder)
    extra_summary: dict[str, Any] = field(default_factory=dict)  # recorded in _run.json (nightly uses it)


# ---- the output contract -------------------------------------------------------------------

def output_columns(labels: list[str]) -> list[tuple[str, pa.DataType]]:
    """The columns the job adds after the manifest's own, in order, with their Parquet types."""
    cols = [(f"label_{column_name(x)}", pa.bool_()) for x in labels]
    cols += [(f"prob_{column_name(x)}", pa.float32()) for x in labels]
    return cols + [("labels", pa.list_(pa.string())), ("status", pa.string()), ("error", pa.string()),
                   ("model_name", pa.string()), ("model_version", pa.string()), ("run_id", pa.string()),
                   ("labeled_at", pa.timestamp("us", tz="UTC"))]


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


# ---- the pipeline stages -------------------------------------------------------------------

def decode_batch(batch: pa.Table, uri_column: str, size: int, threads: int = 16,
                 max_pixels: int = images.DEFAULT_MAX_PIXELS) -> pa.Table:
    """Fetch and decode a batch of images to resized uint8 pixels (CPU tasks, their own stage).

    Fetches run in a thread pool (I/O bound); a row that cannot be fetched or decoded gets
    its reason in the error column instead of pixels.
    """
    def one(uri: str | None) -> tuple[bytes | None, str | None]:
        try:
            pic = images.decode(storage.fetch(uri), max_pixels=max_pixels, draft_size=size)
            return images.resize(pic, size).tobytes(), None
        except (storage.FetchError, images.ImageError) as exc:
            return None, str(exc)
        except Exception as exc:  # never let one object kill the job; say what happened
            return None, f"unexpected {type(exc).__name__}: {exc}"

    uris = batch.column(uri_column).to_pylist()
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(uris)))) as pool:
        results = list(pool.map(one, uris))
    batch = batch.append_column(PIXELS, pa.array([r[0] for r in results], pa.binary()))
    return batch.append_column(ERROR, pa.array([r[1] for r in results], pa.string()))


class Predictor:
    """Loads the model once per actor; predicts a batch of pixels and writes the label columns."""

    def __init__(self, model_uri: str, thresholds: dict[str, float], run_id: str, schema_metadata: dict[bytes, bytes]):
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
        self.types = output_columns(self.labels)

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        raw = batch.column(PIXELS).to_pylist()
        errors = batch.column(ERROR).to_pylist()
        ok = np.asarray([p is not None for p in raw], bool)
        probs = np.full((n, len(self.labels)), np.nan, np.float32)
        if ok.any():
            pixels = np.stack([np.frombuffer(p, np.uint8).reshape(self.size, self.size, 3) for p in raw if p is not None])
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


# ---- running it ----------------------------------------------------------------------------

@dataclass
class _Plan:
    files: list[str]
    schema: pa.Schema
    rows_in: int
    key: str
    unique_keys: bool
    meta: dict[str, Any]
    thresholds: dict[str, float]
    run_id: str


def _plan(config: LabelConfig) -> _Plan:
    """Check everything that can be checked before compute: manifests, model, output."""
    files = manifest.expand(config.manifests)
    schema = None
    rows_in = 0
    keys: list[Any] = []
    key = config.id_column or config.uri_column
    for uri in files:
        s = manifest.read_schema(uri).remove_metadata()
        manifest.check_uri_column(uri, s, config.uri_column)
        if config.id_column and config.id_column not in s.names:
            raise manifest.ManifestError(f"manifest {uri}: no id column {config.id_column!r} "
                                         f"(columns: {', '.join(s.names)})")
        if schema is None:
            schema = s
        elif not s.equals(schema):
            raise manifest.ManifestError(f"manifest {uri}: its columns differ from {files[0]}'s "
                                         f"({_schema_diff(schema, s)}); manifests of one run must share a schema")
        table = storage.read_parquet(uri).select([key])
        if table.num_rows == 0:
            raise manifest.ManifestError(f"manifest {uri}: has no rows")
        rows_in += table.num_rows
        keys.append(table.column(key))
    assert schema is not None
    key_values = pa.chunked_array([c for k in keys for c in k.chunks], schema.field(key).type)
    unique = key_values.null_count == 0 and len(pc.unique(key_values)) == len(key_values)
    if config.id_column and not unique:
        raise manifest.ManifestError(_duplicates_message(files, keys, config.id_column))
    try:
        meta, _ = read_package(config.model)
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
    return _Plan(files, schema, rows_in, key, unique, meta, thresholds, run_id)


def _schema_diff(a: pa.Schema, b: pa.Schema) -> str:
    fa, fb = {f.name: f.type for f in a}, {f.name: f.type for f in b}
    parts = [f"missing {n!r}" for n in fa if n not in fb] + [f"extra {n!r}" for n in fb if n not in fa]
    parts += [f"{n!r} is {fb[n]} not {fa[n]}" for n in fa if n in fb and fa[n] != fb[n]]
    return ", ".join(parts) or "column order differs"


def _duplicates_message(files: list[str], keys: list[pa.ChunkedArray], column: str) -> str:
    seen: dict[Any, str] = {}
    for uri, col in zip(files, keys):
        for i, value in enumerate(col.to_pylist()):
            if value is None:
                return f"manifest {uri}: row {i}: id column {column!r} is null; ids must be unique and non-null"
            if value in seen:
                return f"manifest {uri}: row {i}: id {value!r} already appears at {seen[value]}; ids must be unique"
            seen[value] = f"{uri} row {i}"
    return f"id column {column!r} is not unique"


def _default_run_id(files: list[str], model_version: str, output: str) -> str:
    """A digest of the manifests (names and sizes), the model version and the output."""
    sizes = [(e.uri, e.size) for f in files for e in storage.list_files(f)]
    text = json.dumps({"manifests": sizes, "model": model_version, "output": output.rstrip("/")}, sort_keys=True)
    return "run-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def _absolute(uri: str) -> str:
    """Local paths made absolute (Ray's checkpoints need that), URIs as given, no trailing slash."""
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


def _run_files(output: str, run_id: str) -> list[storage.FileEntry]:
    if not storage.exists(output):
        return []
    prefix = f"{run_id}-a"
    return [e for e in storage.list_files(output, suffix=".parquet")
            if e.uri.rsplit("/", 1)[-1].startswith(prefix) and "/" not in e.uri[len(output.rstrip("/")) + 1:]]


def _attempt_of(uri: str, run_id: str) -> int:
    m = re.match(re.escape(run_id) + r"-a(\d+)-", uri.rsplit("/", 1)[-1])
    return int(m.group(1)) if m else -1


class RunFilenames(FilenameProvider):
    """``<run_id>-a<attempt>-<write uuid>-<task>``: the run and attempt in every name (Ray adds ``-<i>.parquet``).

    Ray requires the write's uuid in appended names; the run prefix is what lets a repeated
    run find and replace its own files.
    """

    def __init__(self, run_id: str, attempt: int):
        self.run_id, self.attempt = run_id, attempt

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"{self.run_id}-a{self.attempt:03d}-{write_uuid}-{task_index:06d}.parquet"


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
    """Run one labeling job and return its summary (also written to ``OUT/_run.json``)."""
    started = time.time()
    plan = _plan(config)
    output = _absolute(config.output)
    state = _absolute(config.state_dir) if config.state_dir else output
    if config.resume and storage.exists(storage.join(state, SUCCESS_FILE)):
        done = json.loads(storage.read_text(storage.join(state, SUMMARY_FILE)))
        if done.get("run_id") == plan.run_id:
            log.info("run %s is already complete in %s: nothing to resume", plan.run_id, output)
            return done
    _check_writable(output)
    for name in (SUCCESS_FILE, SUMMARY_FILE):
        storage.delete(storage.join(state, name))
    checkpoint_dir = storage.join(state, CHECKPOINTS_DIR, plan.run_id)
    previous = _run_files(output, plan.run_id)
    if config.resume:
        if not plan.unique_keys:
            raise JobError(f"cannot resume: the rows have no unique key ({plan.key!r} has nulls or duplicates); "
                           "pass --id-column with unique ids, or run again without --resume")
        if previous and not storage.exists(checkpoint_dir):
            raise JobError(f"cannot resume run {plan.run_id}: its checkpoint {checkpoint_dir} is gone; "
                           "run again without --resume")
        attempt = max((_attempt_of(e.uri, plan.run_id) for e in previous), default=-1) + 1
        log.info("resuming run %s (attempt %d, %d files already written)", plan.run_id, attempt, len(previous))
    else:
        for entry in previous:  # a repeated run replaces its own files
            storage.delete(entry.uri)
        storage.delete(checkpoint_dir)
        attempt = 0

    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)
    checkpoint = None
    if plan.unique_keys:
        from ray.data.checkpoint import CheckpointConfig
        # kept until _SUCCESS is written, so a run killed after its last file still resumes
        checkpoint = CheckpointConfig(id_column=plan.key, checkpoint_path=checkpoint_dir,
                                      delete_checkpoint_on_success=False)
    else:
        log.warning("column %r has nulls or duplicates, so this run cannot be resumed if interrupted "
                    "(pass --id-column with unique ids to make it resumable)", plan.key)

    cpus, gpus = _cluster_resources()
    num_gpus = config.num_gpus if config.num_gpus is not None else (1.0 if gpus >= 1 else 0.0)
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

    log.info("labeling %d rows of %d manifests into %s (run %s, %s predictor actors, device %s)",
             plan.rows_in, len(plan.files), output, plan.run_id, concurrency, device)
    with _data_context(enable_progress_bars=config.progress, checkpoint_config=checkpoint, **RUN_SETTINGS):
        _run_pipeline(config, plan, output, attempt, renames, metadata, num_gpus, pool)
    summary = _finish(config, plan, output, state, renames, started, attempt, concurrency, num_gpus, device)
    storage.delete(checkpoint_dir)
    if not storage.list_files(storage.join(state, CHECKPOINTS_DIR)):
        storage.delete(storage.join(state, CHECKPOINTS_DIR))
    return summary


def _run_pipeline(config: LabelConfig, plan: _Plan, output: str, attempt: int, renames: dict[str, str],
                  metadata: dict[bytes, bytes], num_gpus: float, pool: tuple[int, int]) -> None:
    """read -> fetch + decode -> predict -> write, streaming; returns when every file is written."""
    ds = ray.data.read_parquet(plan.files, partitioning=None)  # manifest columns only, no dt=... from paths
    # Blocks of a few batches: manifests are small files, read as one block, so without this a
    # single task would fetch every image. Small blocks spread the fetching over the cluster.
    ds = ds.repartition(target_num_rows_per_block=config.batch_size * 4)
    if renames:
        ds = ds.rename_columns(renames)
    uri_col = renames.get(config.uri_column, config.uri_column)
    # Fetching is half waiting on storage, so a decode task asks for half a CPU. That also keeps
    # Ray from fusing decode into the predictor actors (it fuses stages with equal resources).
    ds = ds.map_batches(decode_batch, fn_kwargs={"uri_column": uri_col, "size": plan.meta["input"]["size"],
                                                   "max_pixels": config.max_pixels},
                        batch_format="pyarrow", batch_size=config.batch_size, num_cpus=DECODE_CPUS)
    ds = ds.map_batches(Predictor, fn_constructor_kwargs={"model_uri": config.model, "thresholds": plan.thresholds,
                                                          "run_id": plan.run_id, "schema_metadata": metadata},
                        batch_format="pyarrow", batch_size=config.batch_size, num_gpus=num_gpus or None,
                        num_cpus=1 if not num_gpus else None,
                        compute=ray.data.ActorPoolStrategy(min_size=pool[0], max_size=pool[1]))
    # Writing is mostly waiting on storage too. At Ray's default of a whole CPU, a 2-CPU node
    # (predictor + decode) wrote nothing until every image was labeled: half a CPU lets files
    # land as the job goes, so memory stays flat and a killed run keeps what it finished.
    ds.write_parquet(output, filename_provider=RunFilenames(plan.run_id, attempt), mode="append",
                     min_rows_per_file=config.rows_per_file, ray_remote_args={"num_cpus": WRITE_CPUS})


def _finish(config: LabelConfig, plan: _Plan, output: str, state: str, renames: dict[str, str], started: float, attempt: int,
            concurrency: Any, num_gpus: float, device: str) -> dict[str, Any]:
    """Count what was written, check nothing is lost, write ``_run.json`` then ``_SUCCESS``."""
    labels = plan.meta["labels"]
    files = _run_files(output, plan.run_id)
    cols = ["status", "error"] + [f"label_{column_name(x)}" for x in labels] + [f"prob_{column_name(x)}" for x in labels]
    tables = [_read_columns(e.uri, cols) for e in files]
    table = pa.concat_tables(tables) if tables else pa.table({c: pa.array([], pa.string()) for c in cols})
    rows_out = table.num_rows
    status = table.column("status").to_pylist()
    n_ok = status.count("ok")
    n_err = rows_out - n_ok
    errors = collections.Counter(e for e, s in zip(table.column("error").to_pylist(), status) if s == "error")
    ok_mask = pc.equal(table.column("status"), "ok")
    per_label = {}
    for x in labels:
        c = column_name(x)
        hits = pc.filter(table.column(f"label_{c}"), ok_mask)
        probs = pc.filter(table.column(f"prob_{c}"), ok_mask)
        per_label[x] = {"positive_rate": _mean(pc.cast(hits, pa.float64())), "mean_probability": _mean(probs),
                        "threshold": plan.thresholds[x]}
    wall = time.time() - started
    summary = {
        "run_id": plan.run_id,
        "status": "complete",
        "output": output,
        "manifests": plan.files,
        "rows_in": plan.rows_in,
        "rows_out": rows_out,
        "ok": n_ok,
        "errors": n_err,
        "error_rate": n_err / rows_out if rows_out else 0.0,
        "top_errors": [{"error": e, "count": c} for e, c in errors.most_common(5)],
        "labels": per_label,
        "model": {"uri": config.model, "name": plan.meta["name"], "version": plan.meta["version"]},
        "renamed_columns": renames,
        "files": len(files),
        "attempts": attempt + 1,
        "predictor": {"concurrency": concurrency, "num_gpus": num_gpus, "device": device},
        "wall_seconds": round(wall, 2),
        "rows_per_second": round(rows_out / wall, 2) if wall > 0 else None,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "arguments": _arguments(config),
        **config.extra_summary,
    }
    if rows_out != plan.rows_in:
        summary["status"] = "failed"
        storage.write_text(storage.join(state, SUMMARY_FILE), json.dumps(summary, indent=2) + "\n")
        raise JobError(f"run {plan.run_id}: {plan.rows_in} rows in but {rows_out} rows out; output is incomplete")
    if summary["error_rate"] > config.max_error_rate:
        summary["status"] = "failed"
        storage.write_text(storage.join(state, SUMMARY_FILE), json.dumps(summary, indent=2) + "\n")
        top = "; ".join(f"{e['count']} x {e['error']}" for e in summary["top_errors"][:3])
        raise JobError(f"run {plan.run_id}: {n_err} of {rows_out} rows are errors ({summary['error_rate']:.1%}), "
                       f"above --max-error-rate {config.max_error_rate:.1%}. Commonest: {top}")
    storage.write_text(storage.join(state, SUMMARY_FILE), json.dumps(summary, indent=2) + "\n")
    storage.write_text(storage.join(state, SUCCESS_FILE), "")
    log.info("run %s complete: %d rows, %d ok, %d errors in %.1fs", plan.run_id, rows_out, n_ok, n_err, wall)
    return summary


def _read_columns(uri: str, columns: list[str]) -> pa.Table:
    import pyarrow.parquet as pq
    fs, path = storage.filesystem(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def _mean(values: pa.Array | pa.ChunkedArray) -> float | None:
    value = pc.mean(values).as_py()
    return None if value is None else round(float(value), 6)


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
             f"predictor device: {summary['predictor']['device']}",
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
