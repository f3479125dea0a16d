"""Review export and import without a Label Studio server: selection on a known output, hand-made exports."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
import requests

from mlbatch import review
from mlbatch.core import manifest, storage
from mlbatch.cli import main
from reviewdata import CONFIDENCE, LABELS, annotation, task, write_output


@pytest.fixture
def output(tmp_path) -> str:
    out = str(tmp_path / "labels")
    write_output(out)
    return out


def _export(output: str, to: str, **kw) -> tuple[review.ExportResult, list[dict]]:
    result = review.export_review(review.ExportConfig(output=output, to=to, id_column="id", **kw))
    tasks = json.loads(storage.read_text(result.files["tasks"])) if result.files["tasks"].endswith(".json") else []
    return result, tasks


def test_near_threshold_selects_by_each_runs_thresholds(output, tmp_path):
    result, tasks = _export(output, str(tmp_path / "near"), near_threshold=0.03)
    # b1 is within 0.01 of run B's car threshold (0.6) but 0.11 from run A's: per-run thresholds count
    assert [t["data"]["id"] for t in tasks] == ["b1", "a1", "a0"]          # least confident first
    assert result.tasks == 3 and result.rows_considered == 5                 # the error row is never considered
    assert [t["predictions"][0]["score"] for t in tasks] == pytest.approx(
        [CONFIDENCE["b1"], CONFIDENCE["a1"], CONFIDENCE["a0"]], abs=1e-6)
    first = tasks[0]
    assert first["data"] == {"image": "/data/images/b1.jpg", "image_uri": "/data/images/b1.jpg",
                             "source_manifest": "s3://in/run-b.parquet", "source_row": 1, "id": "b1",
                             "mlbatch_id_column": "id", "mlbatch_labels": LABELS}
    prediction = first["predictions"][0]
    assert prediction["model_version"] == "v-run-b"
    assert prediction["result"] == [{"from_name": "labels", "to_name": "image", "type": "choices",
                                     "value": {"choices": ["car"]}}]       # 0.61 >= 0.6; bus 0.29 < 0.3
    assert tasks[1]["predictions"][0]["result"][0]["value"]["choices"] == ["bus"]
    config = ET.fromstring(storage.read_text(result.files["config"]))
    choices = config.find("Choices")
    assert choices.get("choice") == "multiple" and choices.get("toName") == "image"
    assert [c.get("value") for c in choices.findall("Choice")] == LABELS
    assert config.find("Image").get("value") == "$image"
    summary = json.loads(storage.read_text(result.files["summary"]))
    assert summary["tasks"] == 3 and summary["selection"] == "near-threshold 0.03"
    assert summary["model_versions"] == ["v-run-a", "v-run-b"]


def test_most_uncertain_labels_and_where(output, tmp_path):
    _, tasks = _export(output, str(tmp_path / "top"), most_uncertain=4)
    assert [t["data"]["id"] for t in tasks] == ["b1", "a1", "a0", "b0"]
    # only bus reviewed: confidence from bus alone, and the task asks only about bus
    _, tasks = _export(output, str(tmp_path / "bus"), most_uncertain=2, labels=["bus"])
    assert [t["data"]["id"] for t in tasks] == ["a1", "b1"]
    assert [t["predictions"][0]["score"] for t in tasks] == pytest.approx([0.02 / 0.7, 0.01 / 0.3], abs=1e-6)
    assert tasks[0]["data"]["mlbatch_labels"] == ["bus"]
    _, tasks = _export(output, str(tmp_path / "north"), most_uncertain=10, where="camera = 'north'")
    assert [t["data"]["id"] for t in tasks] == ["b1", "a0", "a2"]


def test_csv_and_parquet_exports_have_a_column_per_label_to_fill(output, tmp_path):
    result, _ = _export(output, str(tmp_path / "csv"), near_threshold=0.03, format="csv")
    assert result.files["tasks"].endswith("tasks.csv")
    result, _ = _export(output, str(tmp_path / "pq"), near_threshold=0.03, format="parquet")
    table = pq.read_table(result.files["tasks"])
    assert table.column("id").to_pylist() == ["b1", "a1", "a0"]
    assert table.column("predicted").to_pylist() == ["car", "bus", "car,bus"]
    assert table.column("car").null_count == 3 and str(table.schema.field("bus").type) == "bool"


def test_s3_images_are_presigned_or_kept(s3_endpoint, bucket, tmp_path):
    out = f"{bucket}/labels"
    uris = write_output(out, image_base=f"{bucket}/img")
    s3 = boto3.client("s3")
    name = bucket[len("s3://"):]
    s3.put_object(Bucket=name, Key="img/b1.jpg", Body=b"picture b1")
    result, tasks = _export(out, f"{bucket}/review", near_threshold=0.03, expires=600)
    url = tasks[0]["data"]["image"]
    assert url.startswith("http") and "X-Amz-Expires=600" in url and tasks[0]["data"]["image_uri"] == uris["b1"]
    assert requests.get(url, timeout=10).content == b"picture b1"          # what an annotator's browser gets
    assert json.loads(storage.read_text(result.files["summary"]))["expires_seconds"] == 600
    _, tasks = _export(out, f"{bucket}/review2", near_threshold=0.03, s3_images="s3")
    assert tasks[0]["data"]["image"] == uris["b1"]


def _export_file(tmp_path, tasks: list[dict]) -> str:
    path = str(tmp_path / "export.json")
    with open(path, "w") as f:
        json.dump(tasks, f)
    return path


HAND_MADE = [
    task(1, 10, LABELS, [annotation(["car"])]),                                    # car yes, bus no
    task(2, 11, LABELS, [annotation(None)]),                                       # skipped
    task(3, 12, LABELS, []),                                                       # never annotated
    task(4, 13, ["car"], [annotation([])]),                                        # asked car only: bus unknown
    task(5, 14, LABELS, [annotation(["car", "bus"]), annotation(["car"]), annotation(["bus"])]),  # 2:1 each
    task(6, 15, LABELS, [annotation(["car"]), annotation([]), annotation(None)]),  # car 1:1 tie, bus 0:2
]


def test_import_skips_partial_labels_and_disagreements(tmp_path):
    out = str(tmp_path / "reviewed.parquet")
    result = review.import_reviews(_export_file(tmp_path, HAND_MADE), out)
    assert (result.rows, result.tasks, result.skipped, result.labels) == (4, 6, 2, LABELS)
    table = pq.read_table(out)
    rows = {r["review_task"]: r for r in table.to_pylist()}
    assert sorted(rows) == [1, 4, 5, 6]
    assert (rows[1]["car"], rows[1]["bus"]) == (True, False)
    assert (rows[4]["car"], rows[4]["bus"]) == (False, None)      # a label nobody was asked about is unknown
    assert (rows[5]["car"], rows[5]["bus"]) == (True, True)       # majority
    assert (rows[6]["car"], rows[6]["bus"]) == (None, False)      # a tie is unknown; the skip does not vote
    assert rows[5]["review_annotations"] == 3 and rows[6]["review_annotations"] == 2
    assert (rows[1]["image_uri"], rows[1]["source_manifest"], rows[1]["source_row"], rows[1]["id"]) == \
        ("s3://b/10.jpg", "m.parquet", 10, "r10")
    assert sorted((d["task"], d["label"], d["yes"], d["no"], d["outcome"]) for d in result.disagreements) == \
        [(5, "bus", 2, 1, True), (5, "car", 2, 1, True), (6, "car", 1, 1, None)]
    data = manifest.read_labeled([out], LABELS)                    # what train and evaluate read
    nan = float("nan")
    np.testing.assert_array_equal(data.targets, [[1, 0], [0, nan], [1, 1], [nan, 0]])   # NaN: masked in training


def test_import_cli_reports_disagreements(tmp_path, capsys):
    out = str(tmp_path / "m.parquet")
    assert main(["review", "import", _export_file(tmp_path, HAND_MADE), "--output", out]) == 0
    text = capsys.readouterr().out
    assert "4 reviewed rows of 6 tasks (2 skipped" in text
    assert "disagreement: task 6 s3://b/15.jpg car: 1 yes, 1 no -> unknown (tie)" in text


def test_import_of_a_csv_with_0_1_columns(tmp_path):
    path = tmp_path / "answers.csv"
    path.write_text("image_uri,source_manifest,source_row,car,bus\n"
                    "s3://b/1.jpg,m.parquet,1,1,\n"       # bus not reviewed
                    "s3://b/2.jpg,m.parquet,2,0,1\n"
                    "s3://b/3.jpg,m.parquet,3,,\n")       # not reviewed at all: left out
    out = str(tmp_path / "m.parquet")
    result = review.import_reviews(str(path), out, LABELS)
    assert (result.rows, result.skipped) == (2, 1)
    assert [(r["car"], r["bus"], r["source_row"]) for r in pq.read_table(out).to_pylist()] == \
        [(True, None, 1), (False, True, 2)]


def test_foreign_exports_are_refused_and_nothing_is_written(tmp_path, capsys):
    out = str(tmp_path / "m.parquet")
    other = [task(1, 1, ["cat", "dog"], [annotation(["dog"])])]
    assert main(["review", "import", _export_file(tmp_path, other), "--output", out, "--labels", "car,bus"]) == 2
    err = capsys.readouterr().err
    assert "cat, dog outside car, bus: is this an export of another project? Nothing was written" in err
    stray = [task(1, 1, LABELS, [annotation(["car", "dog"])])]     # a choice outside the tasks' label set
    with pytest.raises(review.ReviewError, match="dog outside car, bus"):
        review.import_reviews(_export_file(tmp_path, stray), out)
    with pytest.raises(review.ReviewError, match="not a Label Studio JSON export"):
        review.import_reviews(_export_file(tmp_path, [{"image": "x", "car": 1}]), out)   # JSON_MIN
    with pytest.raises(review.ReviewError, match="no task has a submitted annotation"):
        review.import_reviews(_export_file(tmp_path, [task(1, 1, LABELS, [annotation(None)])]), out)
    assert not os.path.exists(out)


def test_export_errors_are_clear(output, tmp_path, capsys):
    dest = str(tmp_path / "x")
    assert main(["review", "export", output, "--to", dest, "--near-threshold", "0.1", "--labels", "car,dog"]) == 2
    assert "dog not among the output's labels (car, bus)" in capsys.readouterr().err
    assert main(["review", "export", output, "--to", dest, "--most-uncertain", "2", "--where", "nope = 1"]) == 2
    assert "selecting rows" in capsys.readouterr().err
    assert not os.path.exists(dest)
    assert main(["review", "export", output, "--to", dest, "--most-uncertain", "2", "--id-column", "id"]) == 0
    assert "2 of 5 rows (most-uncertain 2; labels car, bus)" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["review"], ["review", "export"], ["review", "import"], ["models"],
                                  ["models", "register"], ["models", "promote"], ["models", "resolve"]])
def test_every_new_command_explains_itself(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: mlbatch {' '.join(argv)}") and len(text) > 400
