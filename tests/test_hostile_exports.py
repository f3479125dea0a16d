"""Review import does not trust the export: wrong types, contract column names and unsafe names are clean errors.

Each case is an export Label Studio would not write (hand-edited, another tool's, or hostile); each must be
refused with an error naming the task, the field and what was expected, and nothing may be written.
"""

from __future__ import annotations

import json
import os

import pytest

from mlbatch.cli import main
from mlbatch.review import ReviewError, import_reviews
from mlbatch.review.ingest import ExportFieldError
from reviewdata import LABELS, annotation, task


def _write(tmp_path, tasks: list, name: str = "export.json") -> str:
    path = str(tmp_path / name)
    with open(path, "w") as f:
        json.dump(tasks, f)
    return path


def _valid() -> list[dict]:
    """Two good tasks; the cases below spoil the second (index 1, id 2)."""
    return [task(1, 10, LABELS, [annotation(["car"])]), task(2, 11, LABELS, [annotation(["bus"])])]


def _refused(tmp_path, tasks: list, labels: list[str] | None = None, name: str = "export.json") -> str:
    """Import ``tasks``; the ExportFieldError's message, after checking nothing was written."""
    out = str(tmp_path / "reviewed.parquet")
    with pytest.raises(ExportFieldError) as info:
        import_reviews(_write(tmp_path, tasks, name), out, labels)
    assert not os.path.exists(out)
    assert str(info.value).endswith("; nothing was written")
    return str(info.value)


def _spoil(path: list, value) -> list[dict]:
    """The valid export with the field at ``path`` in task 1 set to ``value`` (or removed, for ``...``)."""
    tasks = _valid()
    where = tasks[1]
    for key in path[:-1]:
        where = where[key]
    if value is ...:
        del where[path[-1]]
    else:
        where[path[-1]] = value
    return tasks


WRONG_TYPES = [   # (field path in task 1, bad value, words the message must hold)
    (["annotations"], "car", ["annotations: expected a list", "found a string 'car'"]),
    (["annotations"], {"result": []}, ["annotations: expected a list", "found an object"]),
    (["annotations", 0], "car", ["annotations[0]: expected an object", "found a string"]),
    (["annotations", 0, "result"], "car", ["annotations[0].result: expected a list", "found a string"]),
    (["annotations", 0, "result", 0], ["car"], ["annotations[0].result[0]: expected an object", "found a list"]),
    (["annotations", 0, "result", 0, "value"], "bus",
     ["annotations[0].result[0].value: expected an object", "found a string 'bus'"]),
    (["annotations", 0, "result", 0, "value", "choices"], {"bus": True},
     ["annotations[0].result[0].value.choices: expected a list", "found an object"]),
    (["annotations", 0, "result", 0, "value", "choices"], "bus",
     ["annotations[0].result[0].value.choices: expected a list", "found a string 'bus'"]),
    (["annotations", 0, "result", 0, "value", "choices"], ["bus", 7],
     ["annotations[0].result[0].value.choices[1]: expected a label name (a string)", "found a number 7"]),
    (["annotations", 0, "was_cancelled"], "yes", ["annotations[0].was_cancelled: expected true or false"]),
    (["id"], "two", ["task 1 (id 'two'): id: expected an integer", "found a string 'two'"]),
    (["data"], ..., ["task 1 (id 2): data: expected an object", "found no such field",
                     "not a Label Studio JSON export"]),
    (["data"], "s3://b/11.jpg", ["task 1 (id 2): data: expected an object", "found a string"]),
    (["data", "mlbatch_labels"], "car", ["data.mlbatch_labels: expected a list", "found a string 'car'"]),
    (["data", "mlbatch_labels"], ["car", 5], ["data.mlbatch_labels[1]: expected a label name (a string)"]),
    (["data", "image_uri"], 11, ["data.image_uri: expected the image's URI", "found a number 11"]),
    (["data", "source_row"], "11", ["data.source_row: expected an integer", "found a string '11'"]),
    (["data", "source_manifest"], ["m.parquet"], ["data.source_manifest: expected a string", "found a list"]),
    (["data", "mlbatch_id_column"], 3, ["data.mlbatch_id_column: expected a column name", "found a number 3"]),
    (["data", "id"], {"r": 11}, ["data.id: expected the row's id", "found an object"]),
]


@pytest.mark.parametrize("path, value, words", WRONG_TYPES,
                         ids=[".".join(map(str, p)) + f"={type(v).__name__}" for p, v, _ in WRONG_TYPES])
def test_fields_of_the_wrong_type_are_named(tmp_path, path, value, words):
    message = _refused(tmp_path, _spoil(path, value))
    assert "task 1 (id " in message
    for w in words:
        assert w in message


def test_a_task_that_is_not_an_object_is_named(tmp_path):
    message = _refused(tmp_path, [_valid()[0], "s3://b/11.jpg"])
    assert "task 1: expected a task (an object), found a string" in message


@pytest.mark.parametrize("name", ["image_uri", "source_manifest", "source_row", "status", "error", "run_id",
                                  "model_version", "labels", "labeled_at", "review_task", "Review_Annotations",
                                  "label_car", "prob_car", "LABEL_bus"])
def test_labels_that_take_a_contract_column_are_refused(tmp_path, name):
    asked = ["car", name]
    message = _refused(tmp_path, [task(1, 10, asked, [annotation(["car", name])])])
    assert f"task 0 (id 1): data.mlbatch_labels: label(s) {name} would overwrite columns" in message


def test_labels_flag_that_takes_a_contract_column_is_refused(tmp_path):
    tasks = [task(1, 10, [], [annotation(["car"])])]           # the tasks do not say: --labels does
    message = _refused(tmp_path, tasks, ["car", "status", "image_uri"])
    assert "--labels: label(s) status, image_uri would overwrite columns" in message


def test_labels_that_are_one_column_are_refused(tmp_path):
    tasks = [task(1, 10, ["car"], [annotation(["car"])]), task(2, 11, ["Car"], [annotation(["Car"])])]
    message = _refused(tmp_path, tasks)
    assert "labels 'car' and 'Car' are one column name" in message
    assert "--labels: labels 'car' and 'car'" in _refused(tmp_path, [task(1, 10, [], [annotation(["car"])])],
                                                          ["car", "car"])


@pytest.mark.parametrize("name", ["../x", "a b", ".hidden", "x" * 129])
def test_label_names_must_be_safe(tmp_path, name):
    message = _refused(tmp_path, [task(1, 10, ["car", name], [annotation([name])])])
    assert "task 0 (id 1): data.mlbatch_labels: label" in message
    assert "use 1 to 128 letters, digits" in message


@pytest.mark.parametrize("column", ["image_uri", "source_row", "car", "BUS", "review_task", "prob_car"])
def test_an_id_column_that_takes_another_column_is_refused(tmp_path, column):
    message = _refused(tmp_path, _spoil(["data", "mlbatch_id_column"], column))
    assert f"task 1 (id 2): data.mlbatch_id_column {column!r} would overwrite" in message


def test_an_unsafe_id_column_is_refused(tmp_path):
    message = _refused(tmp_path, _spoil(["data", "mlbatch_id_column"], "../id"))
    assert "task 1 (id 2): data.mlbatch_id_column '../id': use 1 to 128 letters" in message


@pytest.mark.parametrize("labels, row, words", ids=["labels-not-json", "label-not-a-string", "source-row",
                                                    "contract-label"], argvalues=[
    ("car,bus", 's3://b/1.jpg,m.parquet,1,"car,bus",1,0', "row 0: column mlbatch_labels: expected a list"),
    ("car,bus", 's3://b/1.jpg,m.parquet,1,"[""car"",2]",1,0', "row 0: column mlbatch_labels[1]: expected a label"),
    ("car,bus", 's3://b/1.jpg,m.parquet,one,"[""car"",""bus""]",1,0', "row 0: column source_row: expected an "
                                                                        "integer, found a string 'one'"),
    ("car,status", 's3://b/1.jpg,m.parquet,1,"[""car"",""status""]",1,0', "row 0: column mlbatch_labels: "
                                                                            "label(s) status would overwrite"),
])
def test_csv_fields_are_checked(tmp_path, labels, row, words):
    path = tmp_path / "answers.csv"
    path.write_text(f"image_uri,source_manifest,source_row,mlbatch_labels,{labels}\n{row}\n")
    out = str(tmp_path / "m.parquet")
    with pytest.raises(ExportFieldError) as info:
        import_reviews(str(path), out)
    assert words in str(info.value)
    assert not os.path.exists(out)


def test_the_cli_refuses_a_contract_label_in_one_line(tmp_path, capsys):
    out = str(tmp_path / "reviewed.parquet")
    export = _write(tmp_path, [task(1, 10, ["car", "image_uri"], [annotation(["image_uri"])])])
    assert main(["review", "import", export, "--output", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlbatch review: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "label(s) image_uri would overwrite columns of the manifest" in err
    assert not os.path.exists(out)


def test_the_cli_refuses_a_field_of_the_wrong_type_in_one_line(tmp_path, capsys):
    out = str(tmp_path / "reviewed.parquet")
    export = _write(tmp_path, _spoil(["annotations", 0, "result"], "bus"))
    assert main(["review", "import", export, "--output", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlbatch review: error: ") and err.count("\n") == 1
    assert "task 1 (id 2): annotations[0].result: expected a list" in err
    assert not os.path.exists(out)
    assert issubclass(ExportFieldError, ReviewError)            # what the CLI already turns into exit code 2
