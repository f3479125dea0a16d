"""Nights committed to an Iceberg table (issue 19, item 5, the ``nightly`` path): a whole night in one snapshot.

A real PyIceberg SQLite catalog throughout; in the first test its warehouse, the manifests and the
output are on the moto S3 server, configured the way a user configures PyIceberg
(``PYICEBERG_CATALOG__<NAME>__*``), the endpoint from the ordinary AWS settings.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from mlbatch.cli import main
from mlbatch.core import iceberg, storage
from mlbatch.nightly import NightlyConfig, nightly
from mlbatch.nightly import night as night_mod
from mlbatch.nightly import publish as publish_mod
from mlbatch.nightly.state import load_state
from mlbatch.review.views import query
from mlbatch.synth import SynthConfig, make_dataset
from runs import TUNING

TABLE = "labels.nightly"
D1, D2, D3, D4 = (f"2025-04-0{i}" for i in range(1, 5))


def _rows(source: str) -> list[dict]:
    return storage.read_parquet(source).to_pylist()


def _put(uri: str, rows: list[dict], schema: pa.Schema) -> str:
    storage.write_parquet(pa.Table.from_pylist(rows, schema=schema), uri)
    return uri


def _current(table) -> tuple[int, int]:
    """(snapshot id, rows) of the table now."""
    table.refresh()
    return table.current_snapshot().snapshot_id, table.scan().to_arrow().num_rows


def test_nights_on_s3_are_one_snapshot_each_and_a_changed_manifest_moves_the_count_by_its_difference(
        bucket, small_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYICEBERG_CATALOG__LAKE__TYPE", "sql")
    monkeypatch.setenv("PYICEBERG_CATALOG__LAKE__URI", f"sqlite:///{tmp_path}/catalog.db")
    monkeypatch.setenv("PYICEBERG_CATALOG__LAKE__WAREHOUSE", f"{bucket}/warehouse")
    src = make_dataset(f"{bucket}/src", SynthConfig(train=0, val=0, test=60, seed=11))["test"]
    rows, schema = _rows(src), storage.read_parquet_schema(src)
    incoming, out = f"{bucket}/incoming", f"{bucket}/labels"
    config = dict(input=incoming, model=small_model, output=out, table=TABLE, catalog="lake", **TUNING)

    a = _put(f"{incoming}/cam-a.parquet", rows[0:20], schema)
    _put(f"{incoming}/cam-b.parquet", rows[20:32], schema)
    s1 = nightly(NightlyConfig(date=D1, **config))
    table = iceberg.catalog("lake", out).load_table(TABLE)
    assert table.location().startswith(f"{bucket}/warehouse")           # the warehouse is on S3
    first, n1 = _current(table)
    assert s1["table"]["snapshot_id"] == first and n1 == 32 and len(table.snapshots()) == 1
    assert table.current_snapshot().summary["mlbatch.night"] == D1

    # night 2: cam-a grew by 5 rows; the table moves by exactly 5, in one snapshot that drops its old files
    _put(a, rows[0:25], schema)
    s2 = nightly(NightlyConfig(date=D2, **config))
    second, n2 = _current(table)
    assert (n2 - n1, len(table.snapshots())) == (5, 2) and s2["table"]["snapshot_id"] == second
    swap = table.current_snapshot().summary
    assert swap.operation.value == "overwrite" and (swap["deleted-records"], swap["added-records"]) == ("20", "25")
    assert s2["table"]["dropped_files"] >= 1 and s2["labeled"][0]["removed_files"] == 0   # dropped by the table
    # the dropped files went after the commit: the folder and the table read the same rows
    by_pyiceberg = table.scan().to_arrow().sort_by([("source_manifest", "ascending"), ("source_row", "ascending")])
    by_duckdb = query(out, "SELECT * FROM labels ORDER BY source_manifest, source_row", table=TABLE, catalog="lake")
    by_folder = query(out, "SELECT * FROM labels ORDER BY source_manifest, source_row")
    for name in ("source_manifest", "source_row", "image_uri", "label_car", "prob_bus", "run_id"):
        assert by_pyiceberg.column(name).to_pylist() == by_duckdb.column(name).to_pylist() == \
            by_folder.column(name).to_pylist(), name
    assert sorted({str(d) for d in by_duckdb.column("dt").to_pylist()}) == [D1, D2]   # mlbatch's reader: dt from paths
    assert main(["query", out, "SELECT count(*) AS n FROM labels", "--table", TABLE, "--catalog", "lake",
                 "--format", "json"]) == 0
    assert capsys.readouterr().out.strip() == '{"n": 37}'


def test_a_night_killed_mid_way_leaves_the_previous_nights_snapshot_and_the_next_night_commits_it(
        tmp_path, small_dataset, small_model, monkeypatch):
    rows, schema = _rows(small_dataset["test"]), storage.read_parquet_schema(small_dataset["test"])
    wide = schema.append(pa.field("site_note", pa.string()))
    incoming, out = str(tmp_path / "in"), str(tmp_path / "out")
    config = dict(input=incoming, model=small_model, output=out, table=TABLE, **TUNING)
    a = _put(f"{incoming}/a.parquet", rows[0:10], schema)
    nightly(NightlyConfig(date=D1, **config))
    table = iceberg.catalog(iceberg.DEFAULT_CATALOG, out).load_table(TABLE)
    night1 = _current(table)
    assert night1[1] == 10

    # night 2: a changed (10 -> 14 rows) and a new manifest of another schema: two runs. The process dies
    # after the first run is recorded, before the second: the table still reads night 1 exactly.
    _put(a, rows[0:14], schema)
    _put(f"{incoming}/b.parquet", [{**r, "site_note": "north"} for r in rows[20:27]], wide)
    real_run = night_mod._label_run
    calls = []

    def dies_on_the_second_run(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(night_mod, "_label_run", dies_on_the_second_run)
    with pytest.raises(KeyboardInterrupt):
        nightly(NightlyConfig(date=D2, **config))
    assert _current(table) == night1 and len(table.snapshots()) == 1
    assert load_state(out)["table"]["runs"]                     # journaled: the next night takes it

    # night 3: the first night's run of a is still on disk (the table reads it); now the commit takes it all
    monkeypatch.setattr(night_mod, "_label_run", real_run)
    s3 = nightly(NightlyConfig(date=D3, **config))
    snapshot, n = _current(table)
    assert n == 14 + 7 and len(table.snapshots()) == 2 and s3["table"]["snapshot_id"] == snapshot
    assert query(out, "SELECT count(*) AS n FROM labels").column("n").to_pylist() == [21]
    assert load_state(out)["table"] == {"runs": [], "removals": [], "commit": None}

    # night 4: a changes again; the process dies after the commit landed, before the old files went
    _put(a, rows[0:9], schema)
    real_delete = publish_mod._delete

    def dies_deleting(*args, **kwargs):
        raise KeyboardInterrupt("killed after the commit")

    monkeypatch.setattr(publish_mod, "_delete", dies_deleting)
    with pytest.raises(KeyboardInterrupt):
        nightly(NightlyConfig(date=D4, **config))
    after, n = _current(table)
    assert n == 9 + 7 and len(table.snapshots()) == 3               # the table moved, the folder still doubles
    assert query(out, "SELECT count(*) AS n FROM labels").column("n").to_pylist() == [9 + 7 + 14]
    monkeypatch.setattr(publish_mod, "_delete", real_delete)
    # the next run of the night only finishes the deletion: the table is not committed to again
    again = nightly(NightlyConfig(date=D4, **config))
    assert again["table"] is None and _current(table) == (after, 16) and len(table.snapshots()) == 3
    assert query(out, "SELECT count(*) AS n FROM labels").column("n").to_pylist() == [16]


def test_a_failed_table_commit_fails_the_night_and_the_next_night_commits_it(ray_cluster, tmp_path, small_dataset,
                                                                             small_model, monkeypatch, capsys):
    rows, schema = _rows(small_dataset["test"]), storage.read_parquet_schema(small_dataset["test"])
    incoming, out = str(tmp_path / "in"), str(tmp_path / "out")
    _put(f"{incoming}/a.parquet", rows[0:8], schema)
    args = ["nightly", "--input", incoming, "--model", small_model, "--output", out, "--table", TABLE,
            "--batch-size", "16", "--concurrency", "1"]
    real = iceberg.commit_files

    def refused(*a, **k):
        raise iceberg.TableError("the catalog is down")

    monkeypatch.setattr(iceberg, "commit_files", refused)
    assert main([*args, "--date", D1]) == 1
    captured = capsys.readouterr()
    assert "not committed to table labels.nightly (TableError: the catalog is down)" in captured.err
    assert "NOT committed" in captured.out
    monkeypatch.setattr(iceberg, "commit_files", real)
    assert main([*args, "--date", D2]) == 0
    assert "table labels.nightly: snapshot" in capsys.readouterr().out
    table = iceberg.catalog(iceberg.DEFAULT_CATALOG, out).load_table(TABLE)
    assert table.scan().to_arrow().num_rows == 8 and len(table.snapshots()) == 1
