"""The Iceberg table readers see (issue 19, item 5, the ``label`` path): one snapshot per run, through a real
PyIceberg SQLite catalog; the table read by PyIceberg and by DuckDB over the snapshot's files alike."""

from __future__ import annotations

import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlbatch.cli import main
from mlbatch.core import iceberg, storage
from mlbatch.label import JobError, LabelConfig, label
from mlbatch.label import commit
from mlbatch.review.views import query
from runs import TUNING

TABLE = "labels.street"


def _manifest(src: str, n: int, out: str) -> str:
    pq.write_table(pq.read_table(src).slice(0, n), out)
    return out


def _table(output: str):
    return iceberg.catalog(iceberg.DEFAULT_CATALOG, output).load_table(TABLE)


def test_a_run_is_one_snapshot_that_pyiceberg_and_duckdb_read_alike(tmp_path, small_dataset,
                                                                     small_model, capsys):
    manifest = _manifest(small_dataset["test"], 40, str(tmp_path / "m.parquet"))
    out = str(tmp_path / "out")
    summary = label(LabelConfig(manifests=[manifest], model=small_model, output=out, table=TABLE, rows_per_unit=16,
                                **TUNING))
    table = _table(out)
    (snap,) = table.snapshots()
    assert summary["table"] == {"identifier": TABLE, "catalog": "mlbatch", "snapshot_id": snap.snapshot_id}
    assert snap.summary[iceberg.COMMIT_PROPERTY] == f"{summary['run_id']}@{summary['lease_epoch']}"   # this attempt's
    assert snap.summary["mlbatch.run_id"] == summary["run_id"] and snap.summary["added-data-files"] == "3"
    assert snap.summary["mlbatch.model_version"] == summary["model"]["version"]
    by_pyiceberg = table.scan().to_arrow().sort_by("source_row")
    by_duckdb = query(out, "SELECT * FROM labels ORDER BY source_row", table=TABLE)
    assert by_pyiceberg.num_rows == by_duckdb.num_rows == 40
    for name in ("source_row", "image_uri", "label_car", "prob_car", "status"):
        assert by_pyiceberg.column(name).to_pylist() == by_duckdb.column(name).to_pylist(), name
    assert main(["query", out, "SELECT count(*) AS n FROM labels", "--table", TABLE, "--format", "json"]) == 0
    assert capsys.readouterr().out.strip() == '{"n": 40}'
    # resumed again (complete): the table is not given the run twice
    again = label(LabelConfig(manifests=[manifest], model=small_model, output=out, table=TABLE, rows_per_unit=16,
                              resume=True, **TUNING))
    assert again["table"]["snapshot_id"] == snap.snapshot_id and len(_table(out).snapshots()) == 1


def test_a_replacing_run_changes_the_table_by_exactly_its_difference_in_one_commit(tmp_path,
                                                                                  small_dataset, small_model):
    manifest = _manifest(small_dataset["test"], 32, str(tmp_path / "m.parquet"))
    out = str(tmp_path / "out")
    first = label(LabelConfig(manifests=[manifest], model=small_model, output=out, table=TABLE, **TUNING))
    _manifest(small_dataset["test"], 37, manifest)                   # the manifest grew by 5 rows
    second = label(LabelConfig(manifests=[manifest], model=small_model, output=out, table=TABLE, mode="overwrite",
                               **TUNING))
    table = _table(out)
    current = table.scan().to_arrow()
    assert current.num_rows == 37 and set(current.column("run_id").to_pylist()) == {second["run_id"]}
    ops = [s.summary.operation.value for s in table.snapshots()]
    assert ops == ["append", "overwrite"]                            # the second run: one snapshot
    swap = table.current_snapshot().summary
    assert (swap["deleted-records"], swap["added-records"]) == ("32", "37")
    assert commit.run_files(out, first["run_id"]) == []              # its files went only after the commit
    assert query(out, "SELECT count(*) AS n FROM labels").column("n").to_pylist() == [37]


def test_a_run_killed_before_its_table_commit_leaves_the_tables_snapshot_as_it_was(tmp_path,
                                                                                  small_dataset, small_model,
                                                                                  monkeypatch):
    manifest = _manifest(small_dataset["test"], 24, str(tmp_path / "m.parquet"))
    out = str(tmp_path / "out")
    label(LabelConfig(manifests=[manifest], model=small_model, output=out, table=TABLE, run_id="one", **TUNING))
    before = _table(out).current_snapshot().snapshot_id
    real = iceberg.commit_files

    def killed(*args, **kwargs):
        raise iceberg.TableError("killed before the commit")

    monkeypatch.setattr(iceberg, "commit_files", killed)
    with pytest.raises(JobError, match="killed before the commit"):
        label(LabelConfig(manifests=[manifest], model=small_model, output=out, table=TABLE, run_id="two",
                          mode="append", **TUNING))
    assert _table(out).current_snapshot().snapshot_id == before
    assert _table(out).scan().to_arrow().num_rows == 24                # readers of the table: run one only
    from mlbatch.review import ExportConfig, export_review
    from_table = export_review(ExportConfig(output=out, to=str(tmp_path / "review"), most_uncertain=5, table=TABLE))
    from_folder = export_review(ExportConfig(output=out, to=str(tmp_path / "review2"), most_uncertain=5))
    assert (from_table.rows_considered, from_folder.rows_considered) == (24, 48)   # the folder has run two's rows
    monkeypatch.setattr(iceberg, "commit_files", real)
    done = label(LabelConfig(manifests=[manifest], model=small_model, output=out, table=TABLE, run_id="two",
                             mode="append", resume=True, **TUNING))
    assert done["table"]["snapshot_id"] != before and _table(out).scan().to_arrow().num_rows == 48


def test_a_model_with_a_new_label_widens_the_table_and_older_rows_read_null(tmp_path, small_dataset,
                                                                           small_model):
    from mlbatch.model.loaded import load_model
    from mlbatch.model.net import MultiLabelNet, save_package
    from mlbatch.model.spec import ModelSpec

    spec = load_model(small_model).spec
    wider = ModelSpec(labels=[*spec.labels, "truck"], backbone=spec.backbone, hidden=spec.hidden,
                      image_size=spec.image_size)
    truck = str(tmp_path / "truck-model")
    save_package(MultiLabelNet(wider), truck, {x: 0.5 for x in wider.labels})
    manifest = _manifest(small_dataset["test"], 16, str(tmp_path / "m.parquet"))
    out = str(tmp_path / "out")
    label(LabelConfig(manifests=[manifest], model=small_model, output=out, table=TABLE, **TUNING))
    label(LabelConfig(manifests=[manifest], model=truck, output=out, table=TABLE, mode="append", **TUNING))
    rows = _table(out).scan().to_arrow()
    assert "label_truck" in rows.column_names and rows.num_rows == 32
    older = load_model(small_model).version
    truck_of = {}
    for r in rows.select(["model_version", "label_truck"]).to_pylist():
        truck_of.setdefault(r["model_version"] == older, set()).add(r["label_truck"])
    assert truck_of[True] == {None} and None not in truck_of[False]


def test_two_committers_at_once_both_land(tmp_path):
    """Two runs' files committed to one table at the same moment: Iceberg's optimistic concurrency makes one
    retry on the other's snapshot; nothing lost, nothing doubled."""
    out = str(tmp_path / "out")
    schema = pa.schema([("image_uri", pa.string()), ("run_id", pa.string()), ("source_row", pa.int64())])
    files = {}
    for run in ("a", "b"):
        path = storage.join(out, f"{run}-a000-f000000-r000000000000-r000000000000.parquet")
        storage.write_atomic(path, pa.table({"image_uri": ["x"] * 5, "run_id": [run] * 5,
                                             "source_row": list(range(5))}, schema=schema))
        files[run] = [path]
    iceberg.commit_files(TABLE, "mlbatch", out, "seed", files.pop("a"))     # the table exists before the race
    barrier, errors = threading.Barrier(2), []
    extra = storage.join(out, "c-a000-f000000-r000000000000-r000000000000.parquet")
    storage.write_atomic(extra, pa.table({"image_uri": ["y"] * 3, "run_id": ["c"] * 3, "source_row": [0, 1, 2]},
                                         schema=schema))
    files["c"] = [extra]

    def commit_one(run: str) -> None:
        barrier.wait()
        try:
            iceberg.commit_files(TABLE, "mlbatch", out, run, files[run])
        except Exception as exc:   # pragma: no cover - the assertion below says what
            errors.append(exc)

    threads = [threading.Thread(target=commit_one, args=(r,)) for r in ("b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    table = iceberg.catalog("mlbatch", out).load_table(TABLE)
    runs = table.scan().to_arrow().column("run_id").to_pylist()
    assert sorted(set(runs)) == ["a", "b", "c"] and len(runs) == 13
    assert sorted(s.summary[iceberg.COMMIT_PROPERTY] for s in table.snapshots()) == ["b", "c", "seed"]
