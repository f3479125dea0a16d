"""The stages of labeling, as functions and callable classes that know no engine or layout: read a unit,
fetch and decode, predict, write and commit. ``pipeline`` wires them into Ray Data one way or another,
``local`` into one process tree; ``wiring`` gives both the same arguments. Ray only where a predictor
asks it which GPUs it holds.

Every input row leaves as exactly one output row: a row whose image cannot be fetched or decoded
becomes an *error row* (``status = 'error'`` and the reason) instead of stopping the job.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..core import fetch, heap, images, manifest, storage
from ..core.table import (SOURCE_MANIFEST, SOURCE_ROW, STATUS_ERROR, STATUS_OK, file_metadata, output_columns,
                          predicted_columns, renamed_inputs)
from ..core.lease import Fence
from .commit import Run, data_file_name, marker_text, marker_uri, unit_id
from .config import JobError
from .decoder import decode_uris
from .plan import Plan, footer_digest
from .stats import Stats

PIXELS, ERROR, MANIFEST_INDEX = "__mlbatch_pixels", "__mlbatch_error", "__mlbatch_manifest"
log = logging.getLogger(__name__)

STICKY_ERRORS = ("CUDA error", "cuDNN error", "CUBLAS_STATUS", "device-side assert")   # the device is lost
STICKY_EXIT = 75
OUT_OF_MEMORY = "out of device memory for this picture alone (the model does not fit beside it)"
FUSED_THREADS = 2             # cores a fused labeler uses (it claims 1 CPU, so a write task fits beside it)


@dataclass(frozen=True)
class Wiring:
    """The stages' keyword arguments for a run, the same for every engine and layout."""

    renames: dict[str, str]            # manifest columns that collide with output columns -> their new names
    predictor: dict[str, Any]          # ``Predictor``'s
    labeler: dict[str, Any]            # ``UnitLabeler``'s beyond the predictor's
    decode: dict[str, Any]             # ``decode_batch``'s
    write: dict[str, Any]              # ``write_units``'


def wiring(run: Run) -> Wiring:
    """How a run's stages are set up: what each needs from its configuration and plan."""
    config, plan = run.config, run.plan
    labels = plan.meta["labels"]
    renames = renamed_inputs(plan.schema.names, labels)
    metadata = file_metadata(labels, plan.thresholds, plan.meta["name"], plan.meta["version"], plan.run_id,
                             run.predictor)
    columns = [renames.get(n, n) for n in plan.schema.names] + [name for name, _ in output_columns(labels)]
    uri_column = renames.get(config.uri_column, config.uri_column)
    return Wiring(
        renames=renames,
        predictor={"model_uri": plan.model_uri, "thresholds": plan.thresholds, "run_id": plan.run_id,
                   "schema_metadata": metadata, "decode": config.decode, "max_pixels": config.max_pixels,
                   "require_cuda": config.require_cuda, "precision": config.precision},
        labeler={"renames": renames, "uri_column": uri_column, "batch_size": config.batch_size,
                 "max_bytes": config.max_bytes},
        decode={"uri_column": uri_column, "size": plan.meta["input"]["size"], "max_pixels": config.max_pixels,
                "max_bytes": config.max_bytes, "fetch_only": config.decode != "pil"},
        write={"output": run.output, "markers": run.markers, "run_id": plan.run_id, "fence": run.fence,
               "rows_per_unit": config.rows_per_unit, "columns": columns, "labels": labels, "metadata": metadata},
    )


def _groups(pf: pq.ParquetFile, start: int, stop: int) -> tuple[tuple[int, ...], int]:
    """The row groups that hold rows ``[start, stop)``, and the file row their first one starts at."""
    groups, first, offset = [], None, 0
    for i in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(i).num_rows
        if offset < stop and offset + n > start:
            groups.append(i)
            first = offset if first is None else first
        offset += n
    return tuple(groups), first or 0


def unit_pointers(units: list[tuple[int, int, int]], plan: Plan) -> list[dict[str, Any]]:
    """Units of work as rows of ``manifest, uri, stamp, start, stop``: what a reader reads, and the footer
    it must find there (the one the run was planned from)."""
    return [{"manifest": f, "uri": plan.manifests[f], "stamp": plan.stamps[f], "start": a, "stop": b}
            for f, a, b in units]


def refuse_if_changed(uri: str, pf: pq.ParquetFile, stamp: str | None) -> None:
    """Refuse a manifest rewritten since the run was planned: its row numbers would name other rows. Its footer
    and its version (ETag, or size and mtime) must both be the planned ones: an edit in place that keeps the
    values' lengths and each column's min and max keeps the footer, not the version."""
    digest, _, version = (stamp or "").partition("@")
    if stamp is not None and (footer_digest(pf.metadata) != digest
                                    or (version and storage.version(uri) != version)):
        raise manifest.ManifestError(f"manifest {uri} changed while this run read it (its footer or its version is not the one "
                                     "the run was planned from): its rows now are not the rows the run counted. "
                                     "Run again once it is no longer being written")


def read_range(uri: str, start: int, stop: int, columns: list[str] | None = None,
               stamp: str | None = None) -> pa.Table:
    """Rows ``[start, stop)`` of a Parquet file, reading only the row groups that hold them."""
    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        refuse_if_changed(uri, pf, stamp)
        groups, first = _groups(pf, start, stop)
        table = pf.read_row_groups(groups, columns=columns)
    return table.slice(start - first, stop - start)


class RowGroupReader:
    """``read_range`` that keeps the row groups it read last: the units cut from one large row group (a
    manifest written in one piece holds up to a million rows in one) then read it once, not once per unit.
    It holds at most one unit's row groups, which reading that unit needs anyway."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._table: pa.Table | None = None
        self._first = 0

    def __call__(self, uri: str, start: int, stop: int, stamp: str | None = None) -> pa.Table:
        fs, path = storage.filesystem(uri)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            refuse_if_changed(uri, pf, stamp)
            groups, first = _groups(pf, start, stop)
            if self._key != (uri, groups):
                self._key, self._table = None, None   # the old groups go before the new ones come
                self._table = pf.read_row_groups(groups)
                self._key, self._first = (uri, groups), first
        return self._table.slice(start - self._first, stop - start)


def read_units(batch: pa.Table, renames: dict[str, str], read: Any = read_range) -> pa.Table:
    """Read units of work (rows of ``unit_pointers``): their rows, identity columns appended."""
    tables = []
    for manifest_index, uri, stamp, start, stop in zip(*(batch.column(c).to_pylist() for c in (
            "manifest", "uri", "stamp", "start", "stop"))):
        t = read(uri, start, stop, stamp=stamp).replace_schema_metadata(None)
        t = t.rename_columns([renames.get(n, n) for n in t.column_names])
        n = t.num_rows
        t = t.append_column(SOURCE_MANIFEST, pa.array([uri] * n, pa.string()))
        t = t.append_column(SOURCE_ROW, pa.array(np.arange(start, start + n, dtype=np.int64)))
        tables.append(t.append_column(MANIFEST_INDEX, pa.array(np.full(n, manifest_index, np.int32))))
    return pa.concat_tables(tables)


def _with_pixels(batch: pa.Table, results: list[tuple[bytes | None, str | None]]) -> pa.Table:
    batch = batch.append_column(PIXELS, pa.array([r[0] for r in results], pa.binary()))
    return batch.append_column(ERROR, pa.array([r[1] for r in results], pa.string()))


def stacked_pixels(column: pa.ChunkedArray, size: int) -> np.ndarray:
    """The decoded rows of a pixels column as one uint8 (n_decoded, S, S, 3) array: a view of Arrow's own
    buffer, where a binary column keeps its values back to back and a null (an error row) takes no bytes,
    so the pixels are not copied on their way to the device."""
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    picture = size * size * 3
    decoded = len(array) - array.null_count
    if not decoded:
        return np.zeros((0, size, size, 3), np.uint8)
    offsets = np.frombuffer(array.buffers()[1], np.int64 if pa.types.is_large_binary(array.type) else np.int32)
    first, last = int(offsets[array.offset]), int(offsets[array.offset + len(array)])
    if last - first == decoded * picture:
        return np.frombuffer(array.buffers()[2], np.uint8, last - first, first).reshape(decoded, size, size, 3)
    rows = [np.frombuffer(p, np.uint8) for p in array.to_pylist() if p is not None]   # a null that holds bytes
    return np.stack(rows).reshape(-1, size, size, 3)


def decode_batch(batch: pa.Table, uri_column: str, size: int, threads: int = 16,
                 max_pixels: int = images.DEFAULT_MAX_PIXELS, fetch_only: bool = False,
                 max_bytes: int = fetch.DEFAULT_MAX_BYTES) -> pa.Table:
    """Fetch and decode a batch of images (the split layout's CPU tasks): a row that cannot be
    fetched or decoded gets its reason in the error column instead of pixels."""
    return _with_pixels(batch, decode_uris(batch.column(uri_column).to_pylist(), size, max_pixels, threads,
                                           fetch_only, max_bytes))


class Predictor:
    """Loads the model once per actor; predicts a batch of pixels and writes the label columns.

    ``decode="torchvision"``: the batch holds the objects' encoded bytes, decoded here on the
    predictor's device (``jpeg``; PIL on the CPU for what that will not decode). ``device``: where to
    predict; by default CUDA when Ray gave this actor a GPU and CUDA sees it, else the CPU.
    """

    def __init__(self, model_uri: str, thresholds: dict[str, float], run_id: str, schema_metadata: dict[bytes, bytes],
                 decode: str = "pil", max_pixels: int = images.DEFAULT_MAX_PIXELS, device: str | None = None,
                 require_cuda: bool = False, precision: str = "auto"):
        from ..model.loaded import cuda_problem, load_model

        self.on_ray = device is None   # Ray chooses the device of an actor; the local engine passes its own
        if device is None:
            import ray

            device = "cpu"
            problem = cuda_problem() if ray.get_gpu_ids() or require_cuda else None
            if problem and require_cuda:   # this actor ends, and the run with it, naming the build and driver
                raise RuntimeError(f"--require-cuda: {problem}")
            if ray.get_gpu_ids():
                if problem is None:
                    device = "cuda"
                else:
                    # the driver's probe warned once, and _run.json says so: no warning per actor
                    log.debug("this actor holds GPUs %s but %s: predicting on CPU", ray.get_gpu_ids(), problem)
        self.device = device
        self.model = load_model(model_uri, device=self.device, precision=precision)
        self.labels = self.model.labels
        self.thresholds = np.asarray([thresholds[x] for x in self.labels], np.float32)
        self.run_id = run_id
        self.metadata = schema_metadata
        self.size = self.model.spec.image_size
        self.types = predicted_columns(self.labels)
        self.decode, self.max_pixels = decode, max_pixels
        self.fits: int | None = None   # the largest batch the device held after running out of memory

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        errors = batch.column(ERROR).to_pylist()
        pixels: Any = None
        if self.decode == "torchvision":
            from .jpeg import decode_resize

            pixels, errors = decode_resize(batch.column(PIXELS).to_pylist(), errors, self.size, self.model.device,
                                           self.max_pixels)
            ok = np.asarray([e is None for e in errors], bool)
        else:
            ok = np.array(batch.column(PIXELS).is_valid().to_pylist(), bool)
            pixels = stacked_pixels(batch.column(PIXELS), self.size)
        probs = np.full((n, len(self.labels)), np.nan, np.float32)
        if ok.any():
            probs[ok], lost = self._predict_fitting(pixels)
            for i in np.flatnonzero(ok)[lost]:   # a picture the device cannot hold even alone: an error row
                ok[i], errors[i] = False, OUT_OF_MEMORY
        hits = probs >= self.thresholds
        columns: list[Any] = []
        for j in range(len(self.labels)):
            columns.append(pa.array(hits[:, j], pa.bool_(), mask=~ok))
        for j in range(len(self.labels)):
            columns.append(pa.array(probs[:, j], pa.float32(), mask=~ok))
        names = [[x for x, h in zip(self.labels, row) if h] if good else None for row, good in zip(hits, ok)]
        columns.append(pa.array(names, pa.list_(pa.string())))
        columns.append(pa.array([STATUS_OK if good else STATUS_ERROR for good in ok], pa.string()))
        columns.append(pa.array(errors, pa.string()))
        columns.append(pa.array([self.model.name] * n, pa.string()))
        columns.append(pa.array([self.model.version] * n, pa.string()))
        columns.append(pa.array([self.run_id] * n, pa.string()))
        columns.append(pa.array([datetime.now(timezone.utc)] * n, pa.timestamp("us", tz="UTC")))
        out = batch.drop_columns([PIXELS, ERROR])
        for (name, typ), col in zip(self.types, columns):
            out = out.append_column(pa.field(name, typ), col)
        return out.replace_schema_metadata({**(out.schema.metadata or {}), **self.metadata})


    def _predict_fitting(self, pixels: Any) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities of ``pixels``, and which pictures could not be predicted. A batch the device has no
        memory for is halved and tried again, down to one picture; the size that fit is kept for the next
        batches (``fits``), so a too-large ``--batch-size`` costs one failed try, not one per batch."""
        import torch

        n = len(pixels)
        if self.fits is not None and n > self.fits:
            step = self.fits   # fixed for this split, though a part may lower ``fits`` for those after it
            parts = [self._predict_fitting(pixels[i:i + step]) for i in range(0, n, step)]
            return np.concatenate([p for p, _ in parts]), np.concatenate([m for _, m in parts])
        try:
            return self.model.predict_pixels(pixels), np.zeros(n, bool)
        except torch.OutOfMemoryError:
            pass
        except RuntimeError as exc:
            self._end_on_a_sticky_error(exc)
            raise
        return self._halved(pixels)

    def _halved(self, pixels: Any) -> tuple[np.ndarray, np.ndarray]:
        """After running out of memory: the same pictures, half as many at a time (one that fails alone: lost)."""
        import torch

        n = len(pixels)
        if self.model.device.startswith("cuda"):
            torch.cuda.empty_cache()
        if n == 1:
            return np.full((1, len(self.labels)), np.nan, np.float32), np.ones(1, bool)
        self.fits = n // 2
        log.warning("out of device memory for a batch of %d pictures: predicting %d at a time", n, self.fits)
        return self._predict_fitting(pixels)

    def _end_on_a_sticky_error(self, exc: RuntimeError) -> None:
        """A CUDA error that leaves the device unusable (an illegal access, a device-side assert) fails every
        later batch on this device. On Ray the actor ends, so Ray restarts it (on a healthy device if there is
        one) and retries the batch; here a ``JobError`` ends the run, which ``--resume`` continues."""
        text = str(exc)
        if not any(marker in text for marker in STICKY_ERRORS):
            return
        if self.on_ray:
            log.error("ending this predictor actor so that Ray restarts it: %s", text[:500])
            os._exit(STICKY_EXIT)
        raise JobError(f"the device is in an unusable state after: {text[:500]}. Run again with --resume "
                       "(on another device if it happens again)") from None


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
                 max_pixels: int, decode: str = "pil", threads: int = FUSED_THREADS,
                 max_bytes: int = fetch.DEFAULT_MAX_BYTES, device: str | None = None, require_cuda: bool = False,
                 precision: str = "auto"):
        from .decoder import HelperPool

        # helpers first: their start (a Python without torch or Ray) overlaps importing torch here
        self.decoders = HelperPool(threads)
        import torch

        super().__init__(model_uri, thresholds, run_id, schema_metadata, decode, max_pixels, device, require_cuda,
                         precision)
        if self.device == "cpu":
            torch.set_num_threads(threads)
        self.renames, self.uri_column, self.batch_size, self.max_bytes = renames, uri_column, batch_size, max_bytes
        self.ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlbatch-decode")
        self.read = RowGroupReader()

    def _decode(self, rows: pa.Table) -> pa.Table:
        return _with_pixels(rows, self.decoders.decode(rows.column(self.uri_column).to_pylist(), self.size,
                                                       self.max_pixels, self.max_bytes,
                                                       fetch_only=self.decode != "pil"))

    def close(self) -> None:
        """End the helper processes (a killed labeler's helpers see their stdin close and end too)."""
        decoders = getattr(self, "decoders", None)
        if decoders is not None:
            decoders.close()
            self.decoders = None
        ahead = getattr(self, "ahead", None)
        if ahead is not None:
            ahead.shutdown(wait=False)

    def __del__(self) -> None:
        # Ray Data drops the labeler when its actor shuts down gracefully: end its helpers with it
        self.close()

    def __call__(self, units: pa.Table) -> Iterator[pa.Table]:
        rows = read_units(units, self.renames, self.read)
        batches = [rows.slice(i, self.batch_size) for i in range(0, rows.num_rows, self.batch_size)]
        pending = self.ahead.submit(self._decode, batches[0]) if batches else None
        for i in range(len(batches)):
            decoded = pending.result()
            pending = self.ahead.submit(self._decode, batches[i + 1]) if i + 1 < len(batches) else None
            yield Predictor.__call__(self, decoded)
        heap.release_freed_memory()   # what this unit's batches freed, back to the system (core/heap.py)


def write_units(batch: pa.Table, output: str, markers: str, run_id: str, fence: Fence, rows_per_unit: int,
                columns: list[str], labels: list[str], metadata: dict[bytes, bytes]) -> pa.Table:
    """Write one data file per unit this batch holds rows of, then its commit marker; return the markers.

    The marker is written only after the data file is whole (a local file is renamed into place,
    an S3 object exists only once its upload completed), so it *is* the commit. The names are
    fixed by the unit, its first row and the attempt's lease epoch: a retried task writes the same names
    again. The fence: nothing is written unless this attempt still holds the output's lease with a third of
    its time to live ahead (``Fence.lost``), so a worker whose attempt was superseded, or whose holder
    stopped renewing, stops here; what the next attempt does with a unit that lands anyway is in ``prepare``.
    """
    files = batch.column(MANIFEST_INDEX).to_numpy()
    starts = batch.column(SOURCE_ROW).to_numpy() // rows_per_unit * rows_per_unit
    keys = np.stack([files, starts], axis=1)
    lost = fence.lost()
    if lost:   # a superseded attempt's worker: the attempt that holds the lease labels these rows itself
        log.warning("not committing %d rows of run %s (lease epoch %d): %s", batch.num_rows, run_id, fence.epoch, lost)
        keys = keys[:0]
    out = []
    for f, start in np.unique(keys, axis=0):
        piece = batch.filter(pa.array((files == f) & (starts == start)))
        piece = piece.sort_by(SOURCE_ROW).select(columns).replace_schema_metadata(metadata)
        unit = unit_id(int(f), int(start))
        name = data_file_name(run_id, fence.epoch, unit, piece.column(SOURCE_ROW)[0].as_py())
        storage.write_atomic(storage.join(output, name), piece)
        text = marker_text(name, unit, int(f), fence.epoch, Stats.of_table(piece, labels))
        storage.write_atomic(marker_uri(markers, name), text.encode())
        out.append({"unit": unit, "manifest_index": int(f), "marker": text})
    return pa.Table.from_pylist(out, schema=pa.schema([("unit", pa.string()), ("manifest_index", pa.int64()),
                                                       ("marker", pa.string())]))
