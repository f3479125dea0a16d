"""The Apache Iceberg table readers see: a run's data files committed in one snapshot, through PyIceberg.

A run writes its Parquet files and commit markers as always; then ``commit_run`` adds the files to
the table (``add_files``: the files already written, referenced where they are, never rewritten) in
one transaction: the schema is widened by name first (a model with a new label adds a column,
older rows read it as null), the rows of the runs it replaces are deleted (``--mode overwrite``),
and the snapshot records the run (``mlbatch.run_id``), its model version and manifests. A reader of
the table sees the whole run or none of it. Concurrent committers are resolved by Iceberg's
optimistic concurrency: a commit that lost the race reloads the table and tries again; a run
already in the table (a retried commit, a resumed complete run) is not added twice.

The catalog is PyIceberg's own configuration (``.pyiceberg.yaml``, or ``PYICEBERG_CATALOG__<NAME>__*``
variables) for ``--catalog NAME``; without one, a local output gets an embedded SQLite catalog and
warehouse beside its files, in ``OUT/_iceberg/`` (underscore: no Parquet engine reads it as data).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import pyarrow as pa

from . import storage

log = logging.getLogger(__name__)

DEFAULT_CATALOG = "mlbatch"
RUN_PROPERTY = "mlbatch.run_id"
EMBEDDED_DIR = "_iceberg"
COMMIT_ATTEMPTS = 8


class TableError(ValueError):
    """The table cannot be found, made or committed to as asked."""


def catalog(name: str, output: str) -> Any:
    """The PyIceberg catalog ``name`` as configured, else an embedded SQLite catalog beside a local output."""
    from pyiceberg.catalog import load_catalog
    from pyiceberg.catalog.sql import SqlCatalog
    from pyiceberg.utils.config import Config

    if Config().get_catalog_config(name):
        return load_catalog(name)
    if storage.is_remote(output):
        raise TableError(f"no PyIceberg catalog {name!r} is configured (.pyiceberg.yaml or "
                         f"PYICEBERG_CATALOG__{name.upper()}__URI ...): an embedded one is only made beside a "
                         f"local output, and {output} is not")
    root = os.path.abspath(storage.local_path(storage.join(output, EMBEDDED_DIR)))
    os.makedirs(root, exist_ok=True)
    return SqlCatalog(name, uri=f"sqlite:///{root}/catalog.db", warehouse=f"file://{root}/warehouse")


def _table_schema(files: list[str]) -> pa.Schema:
    """The union of the files' schemas (footers only), without mlbatch's file metadata."""
    return pa.unify_schemas([storage.read_parquet_schema(f).remove_metadata() for f in files],
                            promote_options="permissive")


def _path(uri: str) -> str:
    return uri if storage.is_remote(uri) or uri.startswith("file://") else os.path.abspath(uri)


def committed_snapshot(table: Any, run_id: str) -> int | None:
    """The snapshot that added ``run_id``'s files, if one of the table's snapshots did."""
    for snap in table.snapshots():
        if snap.summary is not None and snap.summary.get(RUN_PROPERTY) == run_id:
            return snap.snapshot_id
    return None


def commit_run(identifier: str, catalog_name: str, output: str, run_id: str, files: list[str],
               properties: dict[str, str], replaces: list[str] = ()) -> int:
    """Add a run's data files to the table in one snapshot (deleting the rows of the runs it replaces);
    the snapshot's id. Idempotent: a run already in the table is not added again."""
    from pyiceberg.exceptions import CommitFailedException
    from pyiceberg.expressions import In

    if not files:
        raise TableError(f"run {run_id}: no data files to add to table {identifier}")
    namespace, _, name = identifier.rpartition(".")
    if not namespace or not name:
        raise TableError(f"--table {identifier!r}: expected NAMESPACE.TABLE")
    cat = catalog(catalog_name, output)
    cat.create_namespace_if_not_exists(namespace)
    schema = _table_schema(files)
    table = cat.create_table_if_not_exists(identifier, schema=schema)
    props = {RUN_PROPERTY: run_id, **{f"mlbatch.{k}": str(v) for k, v in properties.items()}}
    for attempt in range(COMMIT_ATTEMPTS):
        done = committed_snapshot(table, run_id)
        if done is not None:
            log.info("table %s already holds run %s (snapshot %d)", identifier, run_id, done)
            return done
        try:
            with table.transaction() as tx:
                with tx.update_schema() as update:
                    update.union_by_name(schema)
                if replaces:
                    tx.delete(In("run_id", list(replaces)), snapshot_properties=props)
                tx.add_files([_path(f) for f in files], snapshot_properties=props)
        except CommitFailedException as exc:   # another committer won: reload and try again
            log.info("table %s moved during the commit of run %s (attempt %d): %s", identifier, run_id,
                     attempt + 1, exc)
            table = cat.load_table(identifier)
            continue
        table = cat.load_table(identifier)
        snapshot = table.current_snapshot().snapshot_id
        log.info("table %s: run %s committed as snapshot %d (%d files)", identifier, run_id, snapshot, len(files))
        return snapshot
    raise TableError(f"table {identifier}: run {run_id} lost {COMMIT_ATTEMPTS} commits in a row to other "
                     "committers; its files are written and committed as units: run again with --resume")


def snapshot_files(identifier: str, catalog_name: str, output: str, snapshot_id: int | None = None) -> list[str]:
    """The data files a snapshot of the table reads (its current one by default)."""
    table = catalog(catalog_name, output).load_table(identifier)
    tasks = list(table.scan(snapshot_id=snapshot_id).plan_files())
    if any(t.delete_files for t in tasks):
        raise TableError(f"table {identifier}: the snapshot has row-level delete files, which mlbatch never "
                         "writes; read it with an Iceberg engine")
    return [t.file.file_path for t in tasks]
