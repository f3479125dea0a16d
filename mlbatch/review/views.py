"""SQL over labeled output with DuckDB: the output folder (all ``dt=`` partitions) as a view ``labels``.

The files are opened as a pyarrow dataset (local or ``s3://``, through the same AWS settings as
everything else) and handed to DuckDB, which scans it with column and filter pushdown (a
``WHERE dt = ...`` reads only that partition). That needs no DuckDB extension, so it works on
machines that cannot download one.

What is read: every ``*.parquet`` file under the output, except anything under a folder or
file whose name starts with ``_`` or ``.`` (``_nightly/``, ``_units/``, ``_run.json``),
as every Parquet engine does.

Two views:

* ``labels``: the rows. ``dt`` is always a column of type **DATE**: the ``dt=YYYY-MM-DD``
  partition a row's file is in, NULL for files outside any ``dt=`` partition (the output of a
  plain ``mlbatch label`` run). Compare it with dates: ``dt = DATE '2025-01-02'`` (DuckDB also
  casts a string literal: ``dt = '2025-01-02'``). Files of several model versions are read
  under one schema (a column a file lacks is NULL); filter on ``model_version`` to keep one.
* ``thresholds``: ``(model_name, model_version, run_id, label, column_name, threshold)``, the
  decision thresholds each run used, from the ``mlbatch`` key of the files' Parquet metadata.
  Join on ``run_id`` and ``label`` (see ``EXAMPLE_QUERIES['review_queue']``).
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ..core import iceberg, storage
from ..core.table import column_name, read_file_metadata

log = logging.getLogger(__name__)

VIEW = "labels"
THRESHOLDS_VIEW = "thresholds"
PARTITION = "dt"
THRESHOLDS_SCHEMA = pa.schema([("model_name", pa.string()), ("model_version", pa.string()), ("run_id", pa.string()),
                               ("label", pa.string()), ("column_name", pa.string()), ("threshold", pa.float64())])

# The README's example questions, for the labels of the synthetic street scenes (car, bus,
# pedestrian). The README and tests/test_query.py use exactly this text.
EXAMPLE_QUERIES: dict[str, str] = {
    # (a) images with a car and a pedestrian but no bus
    "car_and_pedestrian_no_bus": (
        "SELECT dt, id, image_uri FROM labels "
        "WHERE status = 'ok' AND label_car AND label_pedestrian AND NOT label_bus "
        "ORDER BY dt, id"),
    # (b) the positive rate of every label, per day (and model version), over the images labeled ok
    "positive_rate_per_label_per_day": (
        "SELECT dt, model_version, label, count(*) AS images, "
        "avg(CASE WHEN positive THEN 1.0 ELSE 0.0 END) AS positive_rate "
        "FROM (UNPIVOT (SELECT dt, model_version, label_car AS car, label_bus AS bus, label_pedestrian AS pedestrian "
        "FROM labels WHERE status = 'ok') ON car, bus, pedestrian INTO NAME label VALUE positive) "
        "GROUP BY dt, model_version, label ORDER BY dt, model_version, label"),
    # (c) a review queue: label probabilities within 0.1 of the threshold their run used
    "review_queue": (
        "SELECT p.dt, p.id, p.image_uri, p.label, p.probability, t.threshold "
        "FROM (UNPIVOT (SELECT dt, id, image_uri, run_id, prob_car AS car, prob_bus AS bus, "
        "prob_pedestrian AS pedestrian FROM labels WHERE status = 'ok') "
        "ON car, bus, pedestrian INTO NAME label VALUE probability) AS p "
        "JOIN thresholds AS t ON t.run_id = p.run_id AND t.label = p.label "
        "WHERE abs(p.probability - t.threshold) <= 0.1 "
        "ORDER BY p.dt, p.id, p.label"),
    # (d) error rows by cause
    "errors_by_cause": (
        "SELECT error, count(*) AS rows FROM labels WHERE status = 'error' "
        "GROUP BY error ORDER BY rows DESC, error"),
}

_DT_RE = re.compile(r"(?:^|/)dt=([^/]*)/")


class Output:
    """The Parquet files of an output, their schemas, and the dataset and views made of them."""

    def __init__(self, uri: str, files: list[str] | None = None):
        """Every Parquet file under ``uri``, or ``files`` (a table snapshot's, under ``uri``)."""
        if files is None:
            files = [e.uri for e in storage.list_files(uri, suffix=".parquet")]  # skips _nightly/, _units/, .hidden
        if not files:
            raise FileNotFoundError(f"no Parquet files under {uri}")
        self.uri = uri
        self.fs, self.root = storage.filesystem(uri)
        self.paths = [storage.filesystem(f)[1] for f in files]
        with ThreadPoolExecutor(max_workers=min(16, len(self.paths))) as pool:  # footers: one request each
            self.schemas = list(pool.map(self._schema, self.paths))

    def _schema(self, path: str) -> pa.Schema:
        with self.fs.open_input_file(path) as f:
            return pq.read_schema(f)

    def dataset(self) -> pads.Dataset:
        """One dataset over every file, under the union of their schemas, with ``dt`` (DATE) from the path."""
        schema = pa.unify_schemas([s.remove_metadata() for s in self.schemas], promote_options="permissive")
        partitioned = False
        for path in self.paths:
            rel = path[len(self.root):].lstrip("/")
            for value in _DT_RE.findall(rel):
                partitioned = True
                if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value):
                    raise ValueError(f"{path}: partition dt={value!r} is not a YYYY-MM-DD date")
        if PARTITION in schema.names:
            if partitioned:
                raise ValueError(f"files under {self.uri} have a column {PARTITION!r} and are also in "
                                 f"{PARTITION}= partitions: the two clash")
            return pads.dataset(self.paths, schema=schema, format="parquet", filesystem=self.fs)
        part_schema = pa.schema([(PARTITION, pa.date32())])
        return pads.dataset(self.paths, schema=pa.unify_schemas([schema, part_schema]), format="parquet",
                            filesystem=self.fs, partitioning=pads.HivePartitioning(part_schema),
                            partition_base_dir=self.root)

    def thresholds(self) -> pa.Table:
        """The thresholds each run used, one row per (run, label), from the files' ``mlbatch`` metadata."""
        rows, seen = [], set()
        for schema in self.schemas:
            meta = read_file_metadata(schema)
            if meta is None:
                continue
            try:
                pairs = [(label, float(meta["thresholds"][label])) for label in meta["labels"]]
            except (ValueError, KeyError, TypeError):
                continue
            for label, threshold in pairs:
                key = (meta.get("model_version"), meta.get("run_id"), label)
                if key not in seen:
                    seen.add(key)
                    rows.append({"model_name": meta.get("model_name"), "model_version": meta.get("model_version"),
                                 "run_id": meta.get("run_id"), "label": label, "column_name": column_name(label),
                                 "threshold": threshold})
        return pa.Table.from_pylist(rows, schema=THRESHOLDS_SCHEMA)


def output_of(uri: str, table: str | None = None, catalog: str = iceberg.DEFAULT_CATALOG,
              snapshot_id: int | None = None) -> Output:
    """The output at ``uri``: every file there, or with ``table`` the files of that Iceberg table's snapshot."""
    return Output(uri, iceberg.snapshot_files(table, catalog, uri, snapshot_id) if table else None)


def query(uri: str, sql: str, table: str | None = None, catalog: str = iceberg.DEFAULT_CATALOG,
          snapshot_id: int | None = None) -> pa.Table:
    """Run ``sql`` against the views ``labels`` and ``thresholds`` over the output at ``uri``: every file
    there, or with ``table`` the files of that Iceberg table's snapshot (its current one by default)."""
    import duckdb

    out = output_of(uri, table, catalog, snapshot_id)
    dataset = out.dataset()
    thresholds = out.thresholds()
    con = duckdb.connect()
    try:
        con.register(VIEW, dataset)
        con.register(THRESHOLDS_VIEW, thresholds)
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
