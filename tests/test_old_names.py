"""Names an older mlbatch used are still understood: a flag renamed warns, and the commit markers, plan
records and nightly state it wrote are read in today's words (a run it started resumes; a night goes on)."""

from __future__ import annotations

import json

import pytest

from mlbatch.cli.parser import build_parser
from mlbatch.core import storage
from mlbatch.label import LabelConfig, label
from mlbatch.label.commit import markers_dir, read_markers
from mlbatch.nightly.state import load_state, state_uri
from runs import killed_before_its_last_unit


def test_rows_per_file_is_a_hidden_alias_of_rows_per_unit(capsys):
    parser = build_parser()
    args = parser.parse_args(["label", "--manifest", "m", "--model", "x", "--output", "o", "--rows-per-file", "7"])
    assert args.rows_per_unit == 7
    assert "--rows-per-file is now --rows-per-unit" in capsys.readouterr().err
    assert parser.parse_args(["label", "--manifest", "m", "--model", "x", "--output", "o"]).rows_per_unit == 10_000
    with pytest.raises(SystemExit):
        parser.parse_args(["label", "--help"])
    shown = capsys.readouterr().out
    assert "--rows-per-unit" in shown and "--rows-per-file" not in shown


def _to_old_words(out: str, run_id: str) -> int:
    """Rewrite a run's markers and plan record as an older mlbatch wrote them; how many markers."""
    markers = markers_dir(out, run_id)
    uris = [e.uri for e in storage.list_files(markers, suffix=".json")]   # underscore files not listed
    for uri in uris:
        record = json.loads(storage.read_bytes(uri))
        record["file"], record["file_index"] = record.pop("data_file"), record.pop("manifest_index")
        storage.write_bytes(uri, json.dumps(record).encode())
    plan = storage.join(markers, "_plan.json")
    record = json.loads(storage.read_bytes(plan))
    record["files"] = record.pop("manifests")
    storage.write_bytes(plan, json.dumps(record).encode())
    return len(uris)


def test_a_run_an_older_mlbatch_started_resumes(tmp_path, small_dataset, small_model):
    out = str(tmp_path / "out")
    common = dict(manifests=[small_dataset["test"]], model=small_model, output=out, run_id="r", rows_per_unit=16,
                  engine="local", progress=False)
    label(LabelConfig(**common))
    files = sorted(e.uri for e in storage.list_files(out, suffix=".parquet"))
    assert _to_old_words(out, "r") == len(files) == 4
    killed_before_its_last_unit(out, "r")           # its last unit's data file and old-style marker go
    again = label(LabelConfig(**common, resume=True))
    assert (again["rows_out"], again["attempts"]) == (60, 2)
    assert sorted(m["manifest_index"] for m in read_markers(markers_dir(out, "r"))) == [0, 0, 0, 0]
    assert len(storage.list_files(out, suffix=".parquet")) == 4


def test_a_nightly_state_an_older_mlbatch_wrote_reads_in_todays_words(tmp_path):
    out = str(tmp_path)
    old = {"format": "mlbatch-nightly-state", "format_version": 1,
           "manifests": {"s3://b/m.parquet": {"v1": {"run_id": "n1", "file_index": 2, "dt": "2025-01-01"}}},
           "runs": [{"run_id": "n1", "manifest": "s3://b/m.parquet", "file_index": 2}],
           "pending": {"n2": {"dt": "2025-01-02", "model_version": "v1", "rows_per_file": 8, "manifests": {}}},
           "table": {"runs": [], "removals": [{"run_id": "n0", "dt": "2024-12-31", "file_index": 1}], "commit": None}}
    storage.write_bytes(state_uri(out), json.dumps(old).encode())
    state = load_state(out)
    assert state["manifests"]["s3://b/m.parquet"]["v1"]["manifest_index"] == 2
    assert state["runs"][0]["manifest_index"] == 2 and "file_index" not in state["runs"][0]
    assert state["pending"]["n2"]["rows_per_unit"] == 8
    assert state["table"]["removals"][0]["manifest_index"] == 1
