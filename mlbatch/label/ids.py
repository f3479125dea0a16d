"""The ``--id-column`` check: ids non-null and unique, decided on the cluster (the driver holds none), or
in this process for the local engine."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..core import manifest
from .plan import Plan
from .stages import read_range

ONE_TASK_ID_CHECK_ROWS = 10_000_000   # checked by one task up to here, a cluster group-by beyond


def check_ids(plan: Plan, column: str, on_ray: bool = True) -> None:
    """Ids non-null (from the footers' null counts) and unique (a group-by); on the cluster unless not ``on_ray``."""
    _check_null_ids(plan, column, on_ray)
    _check_unique_ids(plan, column, on_ray)


def _remote(fn: Any) -> Any:
    import ray

    from .pipeline import DECODE_CPUS

    return lambda *args: ray.get(ray.remote(num_cpus=DECODE_CPUS)(fn).remote(*args))


def _check_null_ids(plan: Plan, column: str, on_ray: bool) -> None:
    """Only a file whose footer counts nulls (or has no statistics) is read, by a task on the cluster."""
    first_null = _remote(_first_null) if on_ray else _first_null
    for i in plan.null_id_files:
        uri = plan.files[i]
        row = first_null(uri, column)
        if row is not None:
            raise manifest.ManifestError(f"manifest {uri}: row {row}: id column {column!r} is null; "
                                         "ids must be unique and non-null")


def _first_null(uri: str, column: str) -> int | None:
    col = read_range(uri, 0, 1 << 62, [column]).column(0)
    if col.null_count == 0:
        return None
    return int(pc.index(pc.is_null(col), True).as_py())



def _read_ids(batch: pa.Table, column: str) -> pa.Table:
    """The id column of units of work, with each row's position packed in one int64 (file << 40 | row)."""
    tables = []
    for file_index, uri, start, stop in zip(*(batch.column(c).to_pylist() for c in ("file", "uri", "start", "stop"))):
        ids = read_range(uri, start, stop, [column]).column(0)
        pos = (np.int64(file_index) << 40) + np.arange(start, start + len(ids), dtype=np.int64)
        tables.append(pa.table({"id": ids, "pos": pos}))
    return pa.concat_tables(tables)


def _check_unique_ids(plan: Plan, column: str, on_ray: bool) -> None:
    """Every id once, checked on the cluster, never collected in the driver.

    Up to ``ONE_TASK_ID_CHECK_ROWS`` rows it is one task (Arrow's hash group-by over the ids: about a
    second, where Ray Data's distributed group-by pays ~10-20 s of shuffle start-up); beyond, a
    group-by on the cluster, a shuffle of the ids. The local engine runs the one task's work here.
    """
    if not on_ray:
        dup = _duplicate_id(plan.units, plan.files, column)
    elif plan.rows_in <= ONE_TASK_ID_CHECK_ROWS:
        dup = _remote(_duplicate_id)(plan.units, plan.files, column)
    else:
        from ray.data.aggregate import Count, Max, Min
        from ray.data.expressions import col

        from .pipeline import DECODE_CPUS, units_dataset

        ds = units_dataset(plan.units, plan.files).map_batches(_read_ids, fn_kwargs={"column": column},
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

