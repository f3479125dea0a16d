"""``mlbatch query`` over a labeled output built by hand with known values, local and on (moto) S3.

No Ray: the output is written here the way the job writes it (two ``dt=`` partitions, the
``mlbatch`` key in the Parquet metadata), next to the job's private files, which must never be read.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import date, datetime, timezone

import pyarrow as pa
import pytest

from mlbatch.core import storage
from mlbatch.cli import main
from mlbatch.review.views import EXAMPLE_QUERIES, query

D1, D2 = date(2025, 1, 1), date(2025, 1, 2)
LABELS = ["car", "bus", "pedestrian"]
THRESHOLDS = {"r1": {"car": 0.5, "bus": 0.5, "pedestrian": 0.5}, "r2": {"car": 0.6, "bus": 0.4, "pedestrian": 0.5}}
# (id, run, probabilities car/bus/pedestrian or an error)
ROWS = {
    D1: [("d1-a", "r1", (0.9, 0.1, 0.8)), ("d1-b", "r1", (0.55, 0.2, 0.7)), ("d1-c", "r1", (0.8, 0.7, 0.9)),
         ("d1-d", "r1", (0.3, 0.05, 0.45)), ("d1-e", "r1", "object not found"), ("d1-f", "r1", "not an image")],
    D2: [("d2-a", "r2", (0.65, 0.1, 0.95)), ("d2-b", "r2", (0.2, 0.45, 0.1)), ("d2-c", "r2", (0.95, 0.02, 0.3)),
         ("d2-d", "r2", "object not found"), ("d2-e", "r2", "object not found")],
}
SCHEMA = pa.schema([("id", pa.string()), ("image_uri", pa.string())]
                   + [(f"label_{x}", pa.bool_()) for x in LABELS] + [(f"prob_{x}", pa.float32()) for x in LABELS]
                   + [("labels", pa.list_(pa.string())), ("status", pa.string()), ("error", pa.string()),
                      ("model_name", pa.string()), ("model_version", pa.string()), ("run_id", pa.string()),
                      ("labeled_at", pa.timestamp("us", tz="UTC"))])


def _table(rows) -> pa.Table:
    out = []
    for image_id, run, value in rows:
        row = {"id": image_id, "image_uri": f"s3://images/{image_id}.jpg", "model_name": "street",
               "model_version": "v1", "run_id": run, "labeled_at": datetime(2025, 1, 1, 2, tzinfo=timezone.utc)}
        if isinstance(value, str):
            row.update({f"label_{x}": None for x in LABELS} | {f"prob_{x}": None for x in LABELS}
                       | {"labels": None, "status": "error", "error": value})
        else:
            hits = {x: p >= THRESHOLDS[run][x] for x, p in zip(LABELS, value)}
            row.update({f"label_{x}": hits[x] for x in LABELS} | {f"prob_{x}": p for x, p in zip(LABELS, value)}
                       | {"labels": [x for x in LABELS if hits[x]], "status": "ok", "error": None})
        out.append(row)
    return pa.Table.from_pylist(out, schema=SCHEMA)


def _write(table: pa.Table, uri: str, run: str) -> None:
    meta = {"labels": LABELS, "thresholds": THRESHOLDS[run], "model_name": "street", "model_version": "v1",
            "run_id": run}
    table = table.replace_schema_metadata({b"mlbatch": json.dumps(meta).encode()})
    storage.write_parquet(table, uri)


def build_output(root: str) -> str:
    """The known output: dt=2025-01-01 in two files, dt=2025-01-02 in one, plus files that must not be read."""
    day1, day2 = _table(ROWS[D1]), _table(ROWS[D2])
    _write(day1.slice(0, 3), f"{root}/dt=2025-01-01/r1-a000-x-000000-0.parquet", "r1")
    _write(day1.slice(3), f"{root}/dt=2025-01-01/r1-a000-x-000001-0.parquet", "r1")
    _write(day2, f"{root}/dt=2025-01-02/r2-a000-y-000000-0.parquet", "r2")
    # the job's own files: same-looking rows (would double every count) and a clashing schema
    decoy = pa.table({"id": ["ghost"], "status": ["error"], "error": ["object not found"], "dt": [1]})
    for path in ("_nightly/runs/r1/_checkpoints/ckpt.parquet", "_checkpoints/r2/ckpt.parquet",
                 "dt=2025-01-01/_checkpoints/c.parquet", "dt=2025-01-02/.r2-tmp.parquet"):
        storage.write_parquet(decoy, f"{root}/{path}")
    _write(day1, f"{root}/_nightly/runs/r1/copy.parquet", "r1")
    storage.write_text(f"{root}/_nightly/state.json", "{}")
    storage.write_text(f"{root}/dt=2025-01-01/_run.json", "{}")
    storage.write_text(f"{root}/dt=2025-01-01/_SUCCESS", "")
    return root


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> str:
    if request.param == "local":
        return build_output(str(tmp_path / "labels"))
    return build_output(f"{request.getfixturevalue('bucket')}/labels")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["query", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_example_questions(output):
    a = query(output, EXAMPLE_QUERIES["car_and_pedestrian_no_bus"])
    assert a.column_names == ["dt", "id", "image_uri"]
    assert [(r["dt"], r["id"]) for r in a.to_pylist()] == [(D1, "d1-a"), (D1, "d1-b"), (D2, "d2-a")]

    b = query(output, EXAMPLE_QUERIES["positive_rate_per_label_per_day"]).to_pylist()
    got = {(r["dt"], r["label"]): (r["images"], r["positive_rate"]) for r in b}
    assert {r["model_version"] for r in b} == {"v1"}
    expected = {(D1, "car"): (4, 3 / 4), (D1, "bus"): (4, 1 / 4), (D1, "pedestrian"): (4, 3 / 4),
                (D2, "car"): (3, 2 / 3), (D2, "bus"): (3, 1 / 3), (D2, "pedestrian"): (3, 1 / 3)}
    assert got.keys() == expected.keys()
    for key, (n, rate) in expected.items():
        assert got[key][0] == n and got[key][1] == pytest.approx(rate), key

    c = query(output, EXAMPLE_QUERIES["review_queue"]).to_pylist()
    assert [(r["dt"], r["id"], r["label"], r["threshold"]) for r in c] == [
        (D1, "d1-b", "car", 0.5), (D1, "d1-d", "pedestrian", 0.5), (D2, "d2-a", "car", 0.6), (D2, "d2-b", "bus", 0.4)]
    assert [r["probability"] for r in c] == pytest.approx([0.55, 0.45, 0.65, 0.45])

    d = query(output, EXAMPLE_QUERIES["errors_by_cause"]).to_pylist()
    assert d == [{"error": "object not found", "rows": 3}, {"error": "not an image", "rows": 1}]


def test_dt_is_a_date_and_private_files_are_not_read(output):
    t = query(output, "SELECT typeof(dt) AS t, count(*) AS n, count(DISTINCT id) AS ids FROM labels GROUP BY t")
    assert t.to_pylist() == [{"t": "DATE", "n": 11, "ids": 11}]
    assert query(output, "SELECT count(*) AS n FROM labels WHERE id = 'ghost'").column("n").to_pylist() == [0]
    one_day = query(output, "SELECT count(*) AS n FROM labels WHERE dt = DATE '2025-01-02'")
    assert one_day.column("n").to_pylist() == [5]
    as_text = query(output, "SELECT count(*) AS n FROM labels WHERE dt >= '2025-01-01' AND dt < '2025-01-02'")
    assert as_text.column("n").to_pylist() == [6]
    thresholds = query(output, "SELECT run_id, label, threshold FROM thresholds ORDER BY run_id, label").to_pylist()
    assert thresholds == [{"run_id": r, "label": x, "threshold": THRESHOLDS[r][x]}
                          for r in ("r1", "r2") for x in sorted(LABELS)]


def test_cli_formats_and_out(output, tmp_path, capsys):
    sql = EXAMPLE_QUERIES["car_and_pedestrian_no_bus"]
    code, out, _ = _run(capsys, output, sql)
    assert code == 0 and "d1-a" in out and "(3 rows)" in out

    code, out, _ = _run(capsys, output, sql, "--format", "csv", "--out", str(tmp_path / "a.csv"))
    assert code == 0 and "3 rows ->" in out
    rows = list(csv.DictReader(io.StringIO((tmp_path / "a.csv").read_text())))
    assert [(r["dt"], r["id"]) for r in rows] == [("2025-01-01", "d1-a"), ("2025-01-01", "d1-b"), ("2025-01-02", "d2-a")]

    code, _, _ = _run(capsys, output, sql, "--format", "json", "--out", str(tmp_path / "a.jsonl"))
    lines = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert code == 0 and [(r["dt"], r["id"]) for r in lines] == [("2025-01-01", "d1-a"), ("2025-01-01", "d1-b"),
                                                                 ("2025-01-02", "d2-a")]

    target = f"{output}-results/a.parquet"  # next to the output: S3 for the S3 case
    code, _, _ = _run(capsys, output, sql, "--format", "parquet", "--out", target)
    back = storage.read_parquet(target)
    assert code == 0 and back.schema.field("dt").type == pa.date32()
    assert back.column("id").to_pylist() == ["d1-a", "d1-b", "d2-a"]

    code, _, _ = _run(capsys, output, sql, "--out", str(tmp_path / "a.txt"))
    assert code == 0 and "(3 rows)" in (tmp_path / "a.txt").read_text()

    code, out, _ = _run(capsys, output, sql, "--format", "csv")
    assert code == 0 and out.splitlines()[0].replace('"', "") == "dt,id,image_uri" and len(out.splitlines()) == 4


def test_cli_errors_are_clear(output, tmp_path, capsys):
    code, _, err = _run(capsys, output, "SELECT nope FROM labels")
    assert code == 2 and "mlbatch query: error:" in err and "nope" in err
    code, _, err = _run(capsys, str(tmp_path / "empty"), "SELECT 1")
    assert code == 2 and "no Parquet files" in err


def test_bad_partition_value_is_named(tmp_path):
    root = build_output(str(tmp_path / "labels"))
    _write(_table(ROWS[D2]), f"{root}/dt=yesterday/z.parquet", "r2")
    with pytest.raises(ValueError, match="dt='yesterday' is not a YYYY-MM-DD date"):
        query(root, "SELECT count(*) FROM labels")


def test_unpartitioned_output_has_null_dt(tmp_path):
    _write(_table(ROWS[D1]), str(tmp_path / "out" / "r1-a000-x.parquet"), "r1")
    t = query(str(tmp_path / "out"), "SELECT count(*) AS n, count(dt) AS with_dt, typeof(any_value(dt)) AS t FROM labels")
    assert t.to_pylist() == [{"n": 6, "with_dt": 0, "t": "DATE"}]
