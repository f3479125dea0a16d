"""The ``--id-column`` check: ids non-null and unique, decided on the cluster (the driver holds none), or
in this process for the local engine."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..core import manifest, storage
from .config import JobError
from .plan import Plan
from .stages import refuse_if_changed

ONE_TASK_ID_CHECK_ROWS = 10_000_000   # checked by one task up to here, a cluster group-by beyond
ID_CHECK_MEMORY = "1GB"               # the id check's DuckDB memory limit; beyond it, it spills to disk
IDS_PER_PASS = 10_000_000             # ids one group-by holds in that (measured: 8 million in 1.04 GB)
_BATCH_ROWS = 65_536


def check_ids(plan: Plan, column: str, on_ray: bool = True) -> None:
    """Ids non-null (from the footers' null counts) and unique (a group-by); on the cluster unless not ``on_ray``."""
    _check_null_ids(plan, column, on_ray)
    _check_unique_ids(plan, column, on_ray)


def _remote(fn: Any) -> Any:
    import ray

    from .pipeline import DECODE_CPUS, raise_own

    def call(*args: Any) -> Any:
        try:
            return ray.get(ray.remote(num_cpus=DECODE_CPUS)(fn).remote(*args))
        except ray.exceptions.RayTaskError as exc:
            raise_own(exc)
    return call


def _check_null_ids(plan: Plan, column: str, on_ray: bool) -> None:
    """Only a file whose footer counts nulls (or has no statistics) is read, by a task on the cluster."""
    first_null = _remote(_first_null) if on_ray else _first_null
    for i in plan.null_id_manifests:
        uri = plan.manifests[i]
        row = first_null(uri, column, plan.stamps[i])
        if row is not None:
            raise manifest.ManifestError(f"manifest {uri}: row {row}: id column {column!r} is null; "
                                         "ids must be unique and non-null")


def _first_null(uri: str, column: str, stamp: str) -> int | None:
    for batch in _file_ids(0, uri, column, stamp):
        if batch.column(0).null_count:
            return int(batch.column(1)[pc.index(pc.is_null(batch.column(0)), True).as_py()].as_py())
    return None


def _file_ids(manifest_index: int, uri: str, column: str, stamp: str) -> Iterator[pa.RecordBatch]:
    """A manifest's id column in batches, each row's position packed in one int64 (file << 40 | row).

    Streamed: one row group's column chunk at a time, whatever the file's size (a slice of a whole row
    group's read, as ``read_range`` gives, would keep the whole group alive for every unit cut from it)."""
    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        refuse_if_changed(uri, pf, stamp)
        row = 0
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=[column]):
            pos = (np.int64(manifest_index) << 40) + np.arange(row, row + batch.num_rows, dtype=np.int64)
            yield pa.record_batch([batch.column(0), pa.array(pos)], names=["id", "pos"])
            row += batch.num_rows


def _ids_of_files(batch: pa.Table, column: str) -> Iterator[pa.Table]:
    """Ray Data's map over manifests (rows of ``manifest, uri, stamp``): their ids, batch by batch."""
    for manifest_index, uri, stamp in zip(*(batch.column(c).to_pylist() for c in ("manifest", "uri", "stamp"))):
        for ids in _file_ids(manifest_index, uri, column, stamp):
            yield pa.Table.from_batches([ids])


def _check_unique_ids(plan: Plan, column: str, on_ray: bool) -> None:
    """Every id once, checked on the cluster, never collected in the driver.

    Up to ``ONE_TASK_ID_CHECK_ROWS`` rows it is one task (DuckDB's group-by over the streamed ids, in
    ``ID_CHECK_MEMORY``, spilling beyond: seconds, where Ray Data's distributed group-by pays ~10-20 s of
    shuffle start-up); beyond, a group-by on the cluster, a shuffle of the ids. The local engine runs the
    one task's work here.
    """
    id_type = plan.schema.field(column).type
    if not on_ray:
        dup = _duplicate_id(plan.manifests, plan.stamps, column, id_type, plan.rows_in)
    elif plan.rows_in <= ONE_TASK_ID_CHECK_ROWS:
        dup = _remote(_duplicate_id)(plan.manifests, plan.stamps, column, id_type, plan.rows_in)
    else:
        import ray
        from ray.data.aggregate import Count, Max, Min
        from ray.data.expressions import col

        from .pipeline import DECODE_CPUS

        files = [{"manifest": i, "uri": uri, "stamp": fp} for i, (uri, fp) in enumerate(zip(plan.manifests,
                                                                                                plan.stamps))]
        ds = ray.data.from_items(files, override_num_blocks=max(1, min(len(files), 1000))).map_batches(
            _ids_of_files, fn_kwargs={"column": column}, batch_size=1, batch_format="pyarrow", num_cpus=DECODE_CPUS)
        groups = ds.groupby("id").aggregate(Count(alias_name="n"), Min("pos", alias_name="first"),
                                            Max("pos", alias_name="last"))
        dup = next(iter(groups.filter(expr=col("n") > 1).take(1)), None)
    if dup:
        first, second = int(dup["first"]), int(dup["last"])
        mask = (1 << 40) - 1
        raise manifest.ManifestError(f"manifest {plan.manifests[second >> 40]}: row {second & mask}: id {dup['id']!r} "
                                     f"already appears at {plan.manifests[first >> 40]} row {first & mask}; "
                                     "ids must be unique")


def _duplicate_id(files: list[str], stamps: list[str], column: str, id_type: pa.DataType,
                  rows: int) -> dict[str, Any] | None:
    """The first repeated id of the manifests (its first and last position), or None.

    DuckDB's group-by over the ids, streamed file by file, in ``ID_CHECK_MEMORY``. Its hash table spills,
    but not without end (1 GB held 64 million ids, not 128), so beyond ``IDS_PER_PASS`` the ids are first
    written to disk in parts by the hash of the id, and each part is grouped on its own: a billion ids
    need disk, not memory."""
    import duckdb

    failed: list[Exception] = []

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            for i, (uri, stamp) in enumerate(zip(files, stamps)):
                yield from _file_ids(i, uri, column, stamp)
        except Exception as exc:   # DuckDB would report it as its own error, a traceback in its text
            failed.append(exc)
            raise

    ids = pa.RecordBatchReader.from_batches(pa.schema([("id", id_type), ("pos", pa.int64())]), batches())
    parts = -(-rows // IDS_PER_PASS)
    with tempfile.TemporaryDirectory(prefix="mlbatch-ids-") as tmp, duckdb.connect(
            config={"memory_limit": ID_CHECK_MEMORY, "temp_directory": tmp, "threads": 1,
                    "preserve_insertion_order": False}) as con:
        con.execute("SET enable_progress_bar = false")   # a library prints nothing
        con.register("ids", ids)
        written = os.path.join(tmp, "parts")
        try:
            if parts <= 1:
                repeats = [_first_repeat(con, "ids")]
            else:
                con.execute(f"COPY (SELECT id, pos, hash(id) % {parts} AS part FROM ids) TO {_sql_string(written)} "
                            "(FORMAT parquet, PARTITION_BY (part))")
                repeats = [_first_repeat(con, f"read_parquet({_sql_list(part)})")
                           for part in _part_files(written)]
        except duckdb.Error as exc:
            if failed:
                raise failed[0] from None          # a manifest gone or unreadable: the reader's own error
            why = str(exc).splitlines()[0]
            if isinstance(exc, duckdb.OutOfMemoryException):
                raise JobError(f"the --id-column check did not fit in its {ID_CHECK_MEMORY} ({why})") from None
            raise JobError(f"the --id-column check failed on column {column!r} ({id_type}): {why}") from None
    found = [r for r in repeats if r is not None]
    return min(found, key=lambda r: r["last"]) if found else None


def _part_files(folder: str) -> list[list[str]]:
    """The files of each part DuckDB wrote (``part=K/``), by name, not by a glob a temporary path could break."""
    return [sorted(e.path for e in os.scandir(d.path)) for d in sorted(os.scandir(folder), key=lambda d: d.name)
            if d.is_dir()]


def _sql_string(path: str) -> str:
    return "'" + path.replace("'", "''") + "'"


def _sql_list(paths: list[str]) -> str:
    return "[" + ", ".join(map(_sql_string, paths)) + "]"


def _first_repeat(con: Any, ids: str) -> dict[str, Any] | None:
    """Of the ids that ``ids`` (a table expression) holds more than once, the one whose last place comes first."""
    row = con.execute(f"SELECT id, min(pos), max(pos) FROM {ids} GROUP BY id HAVING count(*) > 1 "
                      "ORDER BY max(pos) LIMIT 1").fetchone()
    return None if row is None else {"id": row[0], "first": row[1], "last": row[2]}
