"""SQL over labeled output with DuckDB: the output folder (all ``dt=`` partitions) as a view ``labels``.

The files are opened as a pyarrow dataset (local or ``s3://``, through the same AWS settings as
everything else) and handed to DuckDB, which scans it with column and filter pushdown. That
needs no DuckDB extension, so it works on machines that cannot download one.
"""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from . import storage

log = logging.getLogger(__name__)

VIEW = "labels"


def open_output(uri: str) -> pads.Dataset:
    """Every Parquet file under ``uri`` (Hive ``dt=`` partitions become a column), one schema for all."""
    files = [e for e in storage.list_files(uri, suffix=".parquet")]
    if not files:
        raise FileNotFoundError(f"no Parquet files under {uri}")
    fs, root = storage.filesystem(uri)
    paths = [storage.filesystem(e.uri)[1] for e in files]
    schemas = []
    for p in paths:
        with fs.open_input_file(p) as f:
            schemas.append(pq.read_schema(f))
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    partitioning = pads.partitioning(flavor="hive")
    dataset = pads.dataset(paths, schema=None, format="parquet", filesystem=fs,
                           partitioning=partitioning, partition_base_dir=root)
    # files of older model versions may lack newer label columns: read them all under the union
    return pads.dataset(paths, schema=pa.unify_schemas([schema, dataset.schema], promote_options="permissive"),
                        format="parquet", filesystem=fs, partitioning=partitioning, partition_base_dir=root)


def query(uri: str, sql: str) -> pa.Table:
    """Run ``sql`` against the view ``labels`` over the output at ``uri``; the result as an Arrow table."""
    import duckdb

    dataset = open_output(uri)
    con = duckdb.connect()
    try:
        con.register(VIEW, dataset)
        return con.sql(sql).to_arrow_table()
    finally:
        con.close()


def format_table(table: pa.Table, max_rows: int = 50) -> str:
    """A plain-text table for the console."""
    cols = table.column_names
    rows = table.slice(0, max_rows).to_pylist()
    cells = [[_cell(r[c]) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    if table.num_rows > max_rows:
        lines.append(f"... {table.num_rows - max_rows} more rows")
    lines.append(f"({table.num_rows} rows)")
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "NULL" if value is None else str(value)
