"""Exactly once, proven against every crash point (issue 38): each flow is ended at every one of its
writes and deletes in turn, then recovered as a user would, and every manifest row must then be in the
output exactly once (in the folder, and in the table's current snapshot for the nightly); and each of its
conditional writes has its answer lost once after it was applied. ``tests/crashpoints.py`` drives it;
the counts it reports are in docs/reliability.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)


def _run(flow: str, tmp_path, small_dataset, small_model) -> dict:
    answer = subprocess.run([sys.executable, os.path.join(HERE, "crashpoints.py"), flow, str(tmp_path),
                             small_dataset["test"], small_model], capture_output=True, text=True, timeout=900)
    assert answer.returncode == 0, answer.stderr[-3000:]
    report = json.loads(answer.stdout.strip().splitlines()[-1])
    print(f"{flow}: {report['crash_points']} crash points ({report['crashed']} crashed there, {report['paused']} "
          f"paused there), {report['lost_answers']} lost answers")
    return report


@pytest.mark.slow
@pytest.mark.parametrize("flow", ["label", "rerun", "overwrite", "nightly"])
def test_every_crash_point_and_lost_answer_of_a_local_flow_keeps_every_row_exactly_once(
        flow, tmp_path, small_dataset, small_model):
    report = _run(flow, tmp_path, small_dataset, small_model)
    assert report["failures"] == [] and report["outside_touched"] == []
    assert report["crashed"] == report["crash_points"] >= 20 and report["lost_answers"] >= 2


@pytest.mark.slow
def test_every_crash_point_and_lost_answer_of_a_label_run_on_s3_keeps_every_row_exactly_once(
        tmp_path, small_dataset, small_model, bucket, s3_endpoint, monkeypatch):
    monkeypatch.setenv("MLBATCH_CRASH_BUCKET", bucket)
    report = _run("label-s3", tmp_path, small_dataset, small_model)
    assert report["failures"] == [] and report["outside_touched"] == []
    assert report["crashed"] == report["crash_points"] >= 10 and report["lost_answers"] >= 2


@pytest.mark.slow
def test_a_run_paused_past_its_lease_at_any_write_adds_or_removes_nothing_once_it_wakes(
        tmp_path, small_dataset, small_model):
    """The fence, at every write: stopped there until its lease expired and a ``--resume`` took the output
    over and finished, the run wakes and may finish the one write it was stopped before (no object store
    fences a write by another object), and nothing more; the next ``--resume`` leaves every row once."""
    report = _run("pause", tmp_path, small_dataset, small_model)
    assert report["failures"] == [] and report["outside_touched"] == [], report["failures"]
    assert report["crash_points"] > report["paused"] >= 10   # not inside a local compare-and-swap's lock


@pytest.mark.slow
def test_every_crash_point_and_lost_answer_of_a_promotion_leaves_the_alias_and_its_evidence_whole(
        tmp_path, small_dataset, small_model):
    """The alias names the candidate after the rerun a user would make, the folder it names holds that
    decision's whole evidence, and no piece of evidence in the registry is left half written."""
    report = _run("promotion", tmp_path, small_dataset, small_model)
    assert report["failures"] == [] and report["outside_touched"] == [], report["failures"]
    assert report["crashed"] == report["crash_points"] >= 5 and report["lost_answers"] >= 1
