"""The Apache Iceberg table readers see: a run's (or a night's) data files committed in one snapshot, through PyIceberg.

A run writes its Parquet files and commit markers as always; then ``commit_files`` adds the files to
the table (the files already written, referenced where they are, never rewritten, as ``add_files``
does) in one snapshot: the schema is widened by name first (a model with a new label adds a column,
older rows read it as null), the files it replaces (``--mode overwrite``, a changed manifest's old
rows) are dropped in the same snapshot, and the snapshot records its commit id (``mlbatch.commit``),
run, model version and manifests. A reader of the table sees the whole change or none of it.
Concurrent committers are resolved by Iceberg's optimistic concurrency: a commit that lost the race
reloads the table and tries again; a commit already in the table (a retried commit, a resumed
complete run) is not made twice.

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
from .faults import FAULTS

log = logging.getLogger(__name__)

DEFAULT_CATALOG = "mlbatch"
COMMIT_PROPERTY = "mlbatch.commit"
EMBEDDED_DIR = "_iceberg"
COMMIT_ATTEMPTS = 8


class TableError(ValueError):
    """The table cannot be found, made or committed to as asked."""


def catalog(name: str, output: str) -> Any:
    """The PyIceberg catalog ``name`` as configured, else an embedded SQLite catalog beside a local output."""
    from pyiceberg.catalog import load_catalog
    from pyiceberg.catalog.sql import SqlCatalog
    from pyiceberg.utils.config import Config

    config = Config().get_catalog_config(name)
    if config:   # given whole: PyIceberg's own copy of the configuration is read once, when it is imported
        return load_catalog(name, **{**config, **_aws_defaults(config)})
    if storage.is_remote(output):
        raise TableError(f"no PyIceberg catalog {name!r} is configured (.pyiceberg.yaml or "
                         f"PYICEBERG_CATALOG__{name.upper()}__URI ...): an embedded one is only made beside a "
                         f"local output, and {output} is not")
    root = os.path.abspath(storage.local_path(storage.join(output, EMBEDDED_DIR)))
    os.makedirs(root, exist_ok=True)
    return SqlCatalog(name, uri=f"sqlite:///{root}/catalog.db", warehouse=f"file://{root}/warehouse")


def _aws_defaults(config: dict[str, Any]) -> dict[str, str]:
    """The ordinary AWS settings (``AWS_ENDPOINT_URL[_S3]``, ``AWS_REGION``) as the catalog's S3 properties, where
    its configuration sets none: the table's files are then reached as mlbatch's own are (botocore does the
    same), while PyIceberg's FileIO alone would ignore the endpoint variables."""
    extra = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint and "s3.endpoint" not in config:
        extra["s3.endpoint"] = endpoint
    if region and "s3.region" not in config:
        extra["s3.region"] = region
    return extra


def _table_schema(files: list[str]) -> pa.Schema:
    """The union of the files' schemas (footers only), without mlbatch's file metadata."""
    return pa.unify_schemas([storage.read_parquet_schema(f).remove_metadata() for f in files],
                            promote_options="permissive")


def _path(uri: str) -> str:
    return uri if storage.is_remote(uri) or uri.startswith("file://") else os.path.abspath(uri)


def committed_snapshot(table: Any, key: str) -> int | None:
    """The snapshot that made commit ``key`` (a run id, a night's commit id), if one of the table's snapshots did."""
    for snap in table.snapshots():
        if snap.summary is not None and snap.summary.get(COMMIT_PROPERTY) == key:
            return snap.snapshot_id
    return None


def _table_of(identifier: str, catalog_name: str, output: str, files: list[str]) -> tuple[Any, Any, pa.Schema]:
    namespace, _, name = identifier.rpartition(".")
    if not namespace or not name:
        raise TableError(f"--table {identifier!r}: expected NAMESPACE.TABLE")
    cat = catalog(catalog_name, output)
    cat.create_namespace_if_not_exists(namespace)
    schema = _table_schema(files)
    return cat, cat.create_table_if_not_exists(identifier, schema=schema), schema


def commit_files(identifier: str, catalog_name: str, output: str, key: str, add: list[str],
                 remove: list[str] = (), properties: dict[str, str] | None = None) -> int:
    """In one snapshot, add data files to the table and drop others from it (those it references); the
    snapshot's id. ``key`` names the commit (recorded as ``mlbatch.commit``) and makes it idempotent: a
    commit already in the table is not made again, and a file the table already reads is not added twice.

    Only the table changes: the files dropped are deleted by the caller once this returns (and are
    still there for the table's older snapshots until then).
    """
    from pyiceberg.exceptions import CommitFailedException, ValidationException
    from pyiceberg.io.pyarrow import parquet_file_to_data_file
    from pyiceberg.table import TableProperties

    if not add and not remove:
        raise TableError(f"commit {key}: nothing to add to or drop from table {identifier}")
    cat, table, schema = _table_of(identifier, catalog_name, output, add or remove)
    props = {COMMIT_PROPERTY: key, **{f"mlbatch.{k}": str(v) for k, v in (properties or {}).items()}}
    adding, dropping = [_path(f) for f in add], {_path(f) for f in remove}
    for attempt in range(COMMIT_ATTEMPTS):
        done = committed_snapshot(table, key)
        if done is not None:
            log.info("table %s already holds commit %s (snapshot %d)", identifier, key, done)
            return done
        current = {t.file.file_path: t.file for t in table.scan().plan_files()} if table.current_snapshot() else {}
        new = [f for f in adding if f not in current]
        drop = sorted(dropping & current.keys())
        FAULTS.point()
        try:
            with table.transaction() as tx:
                if add:
                    with tx.update_schema() as update:
                        update.union_by_name(schema)
                if tx.table_metadata.name_mapping() is None:   # as add_files does: columns matched by name
                    tx.set_properties(**{TableProperties.DEFAULT_NAME_MAPPING:
                                         tx.table_metadata.schema().name_mapping.model_dump_json()})
                update = tx.update_snapshot(snapshot_properties=props)
                # adding alone conflicts with nothing; dropping conflicts with what others did meanwhile
                with (update.overwrite() if drop else update.fast_append()) as snapshot:
                    for path in drop:
                        snapshot.delete_data_file(current[path])
                    for path in new:
                        snapshot.append_data_file(parquet_file_to_data_file(table.io, tx.table_metadata, path))
        except (CommitFailedException, ValidationException) as exc:   # another committer won: reload, try again
            log.info("table %s moved during commit %s (attempt %d): %s", identifier, key, attempt + 1, exc)
            table = cat.load_table(identifier)
            continue
        table = cat.load_table(identifier)
        snapshot_id = table.current_snapshot().snapshot_id
        log.info("table %s: commit %s is snapshot %d (%d files added, %d dropped)", identifier, key, snapshot_id,
                 len(new), len(drop))
        return snapshot_id
    raise TableError(f"table {identifier}: commit {key} lost {COMMIT_ATTEMPTS} times in a row to other "
                     "committers; its files are written and committed as units: run again with --resume")


def reads(identifier: str, catalog_name: str, output: str, files: list[str]) -> list[str]:
    """Those of ``files`` that the table's current snapshot reads ([] when there is no such table yet)."""
    from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

    if not files:
        return []
    try:
        current = set(snapshot_files(identifier, catalog_name, output))
    except (NoSuchTableError, NoSuchNamespaceError):
        return []
    return [f for f in files if _path(f) in current]


def snapshot_files(identifier: str, catalog_name: str, output: str, snapshot_id: int | None = None) -> list[str]:
    """The data files a snapshot of the table reads (its current one by default)."""
    table = catalog(catalog_name, output).load_table(identifier)
    tasks = list(table.scan(snapshot_id=snapshot_id).plan_files())
    if any(t.delete_files for t in tasks):
        raise TableError(f"table {identifier}: the snapshot has row-level delete files, which mlbatch never "
                         "writes; read it with an Iceberg engine")
    return [t.file.file_path for t in tasks]
