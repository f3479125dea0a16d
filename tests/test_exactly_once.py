"""Exactly once between runs (issue 19): one writer per output, reruns that never double, resumes that never
mix settings, removals a crash cannot strand, a night that survives one bad run. Each test replays a sequence
that broke it before."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mlbatch.cli import main
from mlbatch.core import storage, versioned
from mlbatch.core.lease import Lease, LeaseHeld, LeaseLost, lease_uri
from mlbatch.core.table import SOURCE_ROW
from mlbatch.label import JobError, LabelConfig, label
from mlbatch.label import commit, local
from mlbatch.core.manifest import ManifestError
from mlbatch.label.config import OutputBusy
from mlbatch.nightly import NightlyConfig, NightlyError, nightly
from mlbatch.nightly.state import load_state, state_uri
from mlbatch.review.views import query
from runs import TUNING, killed_before_its_last_unit



def _rows(uri: str, n: int, out: str) -> str:
    """The first ``n`` rows of a labeled manifest, as a manifest at ``out``."""
    table = pq.read_table(uri).slice(0, n)
    pq.write_table(table, out)
    return out


def _count(output: str) -> list[tuple]:
    return [tuple(r.values()) for r in query(output, "SELECT source_manifest, source_row, count(*) AS n FROM labels "
                                                     "GROUP BY ALL ORDER BY ALL").to_pylist()]


# ---- the lease ------------------------------------------------------------------------------

def _lease_folder(where: str, tmp_path, request) -> str:
    return str(tmp_path / "out") if where == "local" else f"{request.getfixturevalue('bucket')}/lease-out"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_held_lease_refuses_another_run_naming_its_holder_and_a_renewal_extends_it(where, tmp_path, request):
    folder = _lease_folder(where, tmp_path, request)
    with Lease(folder, "run-a", ttl=30) as first:
        with pytest.raises(LeaseHeld, match=r"being written by run 'run-a' \(owner .*host .*pid \d+; last heartbeat"):
            Lease(folder, "run-b", ttl=30).acquire()
        before = json.loads(versioned.read_versioned(lease_uri(folder))[0])
        time.sleep(0.05)
        first.renew()
        after = json.loads(versioned.read_versioned(lease_uri(folder))[0])
    assert after["heartbeat_at"] > before["heartbeat_at"] and after["expires_at"] > before["expires_at"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_released_lease_is_free_at_once_and_nothing_to_warn_of(where, tmp_path, request, caplog):
    folder = _lease_folder(where, tmp_path, request)
    Lease(folder, "run-a", ttl=30).acquire().release()
    with caplog.at_level(logging.INFO, logger="mlbatch.core.lease"), Lease(folder, "run-b", ttl=30):
        assert [r.levelname for r in caplog.records if r.name == "mlbatch.core.lease"] == ["INFO"], caplog.text
        assert "run 'run-a' released it" in caplog.text


@pytest.mark.parametrize("where", ["local", "s3"])
def test_an_expired_lease_is_taken_over_with_a_warning_and_its_holder_on_waking_has_lost_it(where, tmp_path, request,
                                                                                           caplog):
    """The holder's renewals stopped long ago (its record rewritten as expired, as after a pause past its
    time to live: no sleeping against a clock); the next run takes over and says so; the holder, waking,
    finds it has lost the output."""
    folder = _lease_folder(where, tmp_path, request)
    holder = Lease(folder, "run-b", ttl=30).acquire()    # its next renewal is ttl/3 = 10 s away
    try:
        record, token = versioned.read_versioned(lease_uri(folder))
        expired = {**json.loads(record), "expires_at": time.time() - 1}
        assert versioned.swap(lease_uri(folder), json.dumps(expired).encode(), token) is not None
        with caplog.at_level(logging.INFO, logger="mlbatch.core.lease"), Lease(folder, "run-c", ttl=30):
            assert [r.levelname for r in caplog.records if r.name == "mlbatch.core.lease"] == ["WARNING"]
            assert "took over the expired lease of run 'run-b'" in caplog.text
            assert json.loads(versioned.read_versioned(lease_uri(folder))[0])["run"] == "run-c"
            holder.renew()                                   # the holder wakes up: it has lost the lease
            with pytest.raises(LeaseLost, match="taken over by run 'run-c'"):
                holder.check()
    finally:
        holder.release()


def test_a_dead_holder_is_taken_over_at_once_only_from_its_own_process_table(tmp_path):
    """Issue 38, item 6: pods with hostNetwork (or containers with --network host) share a host name, not
    their process ids: a holder's pid absent here says nothing there. Only the same host, boot and PID
    namespace takes a dead holder's lease before it expires."""
    import socket
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, out = int(ended.stdout), str(tmp_path / "out")
    with open("/proc/sys/kernel/random/boot_id") as f:
        here = {"host": socket.gethostname(), "boot": f.read().strip(), "pidns": os.readlink("/proc/self/ns/pid")}
    doc = {"owner": "x", "run": "run-gone", **here, "pid": dead_pid, "acquired_at": time.time(),
           "heartbeat_at": time.time(), "expires_at": time.time() + 600}
    for other in ({"pidns": "pid:[1]"}, {"boot": "another-boot"}, {"pidns": None}):
        storage.write_bytes(lease_uri(out), json.dumps({**doc, **other}).encode())
        with pytest.raises(LeaseHeld, match="run-gone"):
            Lease(out, "run-b", ttl=30).acquire()
    storage.write_bytes(lease_uri(out), json.dumps(doc).encode())    # this process table: the holder is gone
    Lease(out, "run-b", ttl=30).acquire().release()


def test_a_second_label_run_on_a_held_output_exits_4_touching_nothing(ray_cluster, tmp_path, small_dataset,
                                                                        small_model, capsys):
    out = str(tmp_path / "out")
    holder = Lease(out, "run-elsewhere", ttl=60).acquire()
    try:
        code = main(["label", "--manifest", small_dataset["test"], "--model", small_model, "--output", out])
    finally:
        holder.release()
    assert code == 4
    assert "is being written by run 'run-elsewhere'" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["_lease.json", "_lease.json.lock"]   # no probe, no plan, no rows


def test_two_label_runs_started_seconds_apart_one_labels_the_other_exits_4(tmp_path, small_dataset, small_model):
    """The first run is paused (SIGSTOP) once it holds the output's lease, so the second surely meets a live
    holder, however fast the first would have finished; then the first goes on and labels every row once."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "mlbatch.cli", "label", "--manifest", small_dataset["train"], "--model",
            small_model, "--output", str(out), "--batch-size", "8", "--rows-per-unit", "32", "--engine", "local"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (out / "_lease.json").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lease"
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGSTOP)
        second = subprocess.run(args, capture_output=True, text=True, timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=600) == 0, first.stdout.read().decode()[-3000:]
    assert second.returncode == 4, second.stderr[-3000:]
    assert "is being written by run 'run-" in second.stderr and "this run touched nothing" in second.stderr
    rows = pq.read_table(small_dataset["train"]).num_rows
    assert sum(n for *_, n in _count(str(out))) == rows and all(n == 1 for *_, n in _count(str(out)))


# ---- reruns and resumes ----------------------------------------------------------------------

def test_a_rerun_after_the_manifest_grew_is_refused_or_replaces_never_doubles(tmp_path, small_dataset,
                                                                             small_model):
    manifest = _rows(small_dataset["test"], 40, str(tmp_path / "m.parquet"))
    out = str(tmp_path / "out")
    first = label(LabelConfig(manifests=[manifest], model=small_model, output=out, **TUNING))
    _rows(small_dataset["test"], 41, manifest)                       # one row more: another default run id
    with pytest.raises(JobError, match=rf"already holds rows this run did not write: run {first['run_id']} "
                                       r"\(1 files\)\. .*--mode overwrite.*--mode append"):
        label(LabelConfig(manifests=[manifest], model=small_model, output=out, **TUNING))
    assert sum(n for *_, n in _count(out)) == 40                    # refused before anything was removed
    again = label(LabelConfig(manifests=[manifest], model=small_model, output=out, mode="overwrite", **TUNING))
    counts = _count(out)
    assert again["run_id"] != first["run_id"] and again["replaced_files"] == 1
    assert len(counts) == 41 and all(n == 1 for *_, n in counts)
    assert commit.run_files(out, first["run_id"]) == [] and not storage.exists(
        commit.markers_dir(out, first["run_id"]))


def test_a_champion_promoted_between_two_runs_does_not_double_the_output(tmp_path, small_dataset,
                                                                        small_model):
    from test_nightly import _new_version

    newer = _new_version(small_model, str(tmp_path / "v2"))
    manifest = _rows(small_dataset["test"], 24, str(tmp_path / "m.parquet"))
    out = str(tmp_path / "out")
    label(LabelConfig(manifests=[manifest], model=small_model, output=out, **TUNING))
    with pytest.raises(JobError, match="already holds rows this run did not write"):
        label(LabelConfig(manifests=[manifest], model=newer, output=out, **TUNING))
    both = label(LabelConfig(manifests=[manifest], model=newer, output=out, mode="append", **TUNING))
    versions = query(out, "SELECT model_version, count(*) AS n FROM labels GROUP BY ALL ORDER BY ALL").to_pylist()
    assert [v["n"] for v in versions] == [24, 24] and both["model"]["version"] in [v["model_version"] for v in versions]


def test_run_ids_match_exactly_not_as_a_prefix(tmp_path, small_dataset, small_model):
    manifest = _rows(small_dataset["test"], 16, str(tmp_path / "m.parquet"))
    out = str(tmp_path / "out")
    label(LabelConfig(manifests=[manifest], model=small_model, output=out, run_id="eval-august", **TUNING))
    label(LabelConfig(manifests=[manifest], model=small_model, output=out, run_id="eval", mode="append", **TUNING))
    assert len(commit.run_files(out, "eval")) == len(commit.run_files(out, "eval-august")) == 1
    label(LabelConfig(manifests=[manifest], model=small_model, output=out, run_id="eval", mode="append", **TUNING))
    assert len(commit.run_files(out, "eval-august")) == 1            # a fresh 'eval' left 'eval-august' alone


def test_a_resume_with_a_changed_threshold_or_a_rewritten_manifest_is_refused(tmp_path, small_dataset,
                                                                             small_model):
    manifest = _rows(small_dataset["test"], 32, str(tmp_path / "m.parquet"))
    out = str(tmp_path / "out")
    common = dict(manifests=[manifest], model=small_model, output=out, run_id="r", rows_per_unit=16, **TUNING)
    label(LabelConfig(**common))
    storage.delete(storage.join(out, commit.SUCCESS_FILE))           # as if killed before the end
    with pytest.raises(JobError, match=r"cannot resume run r: the thresholds changed \(\{.*\} -> \{.*'car': 0\.9"):
        label(LabelConfig(**common, resume=True, thresholds={"car": 0.9}))
    table = pq.read_table(manifest)
    ids = table.column("id").to_pylist()
    pq.write_table(table.set_column(0, "id", pa.array(ids[::-1])), manifest)   # same size, other rows
    with pytest.raises(JobError, match=r"cannot resume run r: manifest .*m\.parquet changed since the run started"):
        label(LabelConfig(**common, resume=True))
    assert len(commit.run_files(out, "r")) == 2                        # both refusals kept the committed units


def test_a_cut_summary_or_lease_is_named_and_redone_and_a_cut_plan_record_refuses_the_resume(
        tmp_path, small_dataset, small_model, caplog):
    manifest = _rows(small_dataset["test"], 32, str(tmp_path / "m.parquet"))
    out = str(tmp_path / "out")
    common = dict(manifests=[manifest], model=small_model, output=out, run_id="r", rows_per_unit=16, **TUNING)
    label(LabelConfig(**common))
    summary, lease = storage.join(out, commit.SUMMARY_FILE), lease_uri(out)
    for uri in (summary, lease):
        storage.write_bytes(uri, storage.read_bytes(uri)[:20])            # cut, as a foreign tool might leave it
    with caplog.at_level(logging.WARNING):
        again = label(LabelConfig(**common, resume=True))
    assert f"{summary} is not a run summary (cut, or made by something else): resuming from the commit markers" \
        in caplog.text
    assert f"took over {lease}, which is not a lease" in caplog.text
    assert again["rows_out"] == 32 and sum(n for *_, n in _count(out)) == 32
    assert json.loads(storage.read_text(summary))["run_id"] == "r"         # written whole again

    plan_record = storage.join(commit.markers_dir(out, "r"), commit.PLAN_FILE)
    storage.write_bytes(plan_record, b"\x00\xff not json")
    storage.delete(storage.join(out, commit.SUCCESS_FILE))
    with pytest.raises(JobError, match=r"cannot resume run r: its plan record is not one \(cut, or made by "
                                       r"something else\) \(.*_plan\.json\)"):
        label(LabelConfig(**common, resume=True))


def test_a_cut_nightly_state_is_refused_by_name(tmp_path):
    out = str(tmp_path / "out")
    storage.write_bytes(state_uri(out), b'{"format": "mlbatch-nig')
    with pytest.raises(JobError, match=re.escape(f"{state_uri(out)} is not an mlbatch nightly state")):
        load_state(out)


@pytest.mark.parametrize("engine, id_column", [("local", None), ("ray", None), ("local", "id"), ("ray", "id")])
def test_a_manifest_rewritten_after_the_plan_fails_the_run_naming_it(engine, id_column, tmp_path, small_dataset,
                                                                    small_model, monkeypatch, request, caplog):
    """Whichever reads it first (the id check, before any labeling, or a unit's read) refuses it."""
    if engine == "ray":
        request.getfixturevalue("ray_cluster")
    manifest = _rows(small_dataset["test"], 32, str(tmp_path / "m.parquet"))
    out = str(tmp_path / "out")
    table = pq.read_table(manifest)
    rewritten = table.set_column(0, "id", pa.array(table.column("id").to_pylist()[::-1]))   # same size, other rows
    check_writable = commit.check_writable

    def rewritten_after_the_plan(output):     # an upstream job rewrites the manifest in place
        pq.write_table(rewritten, manifest)
        return check_writable(output)

    monkeypatch.setattr(commit, "check_writable", rewritten_after_the_plan)
    common = dict(manifests=[manifest], model=small_model, output=out, run_id="r", rows_per_unit=16,
                  id_column=id_column, **{**TUNING, "engine": engine})
    with caplog.at_level(logging.INFO), pytest.raises(
            ManifestError, match=f"^{re.escape(f'manifest {manifest} changed while this run read it')}"):
        label(LabelConfig(**common))
    assert ("labeling 32 rows" in caplog.text) == (id_column is None)
    assert not commit.run_files(out, "r") and not storage.exists(storage.join(out, commit.SUCCESS_FILE))
    monkeypatch.undo()
    label(LabelConfig(**common))                        # a fresh run labels the manifest as it is now, once
    ids = [r["id"] for r in query(out, "SELECT id FROM labels ORDER BY source_row").to_pylist()]
    assert ids == rewritten.column("id").to_pylist()


def test_a_lease_read_short_once_is_read_again_not_taken_from_its_live_holder(tmp_path, monkeypatch):
    folder = str(tmp_path / "out")
    holder = Lease(folder, "run-a", ttl=30).acquire()
    real, short = versioned.read_versioned, [lease_uri(folder)]

    def read_once_short(uri):                 # an S3 GET answered empty once, its ETag the real one
        raw, token = real(uri)
        if uri in short:
            short.remove(uri)
            return b"", token
        return raw, token

    monkeypatch.setattr(versioned, "read_versioned", read_once_short)
    with pytest.raises(LeaseHeld, match="being written by run 'run-a'"):
        Lease(folder, "run-b", ttl=30).acquire()
    assert not short
    holder.release()


def test_a_completed_resume_sweeps_a_file_no_marker_names(tmp_path, small_dataset, small_model):
    manifest = _rows(small_dataset["test"], 16, str(tmp_path / "m.parquet"))
    out = str(tmp_path / "out")
    done = label(LabelConfig(manifests=[manifest], model=small_model, output=out, run_id="r", **TUNING))
    (name,) = [u.rsplit("/", 1)[-1] for u in commit.run_files(out, "r")]
    stray = storage.join(out, re.sub(r"-a\d+-", "-a007-", name))   # written, then killed before its marker
    storage.write_bytes(stray, storage.read_bytes(storage.join(out, name)))
    again = label(LabelConfig(manifests=[manifest], model=small_model, output=out, run_id="r", resume=True, **TUNING))
    assert again == done and not storage.exists(stray) and sum(n for *_, n in _count(out)) == 16


def test_a_resume_relabels_a_unit_whose_marker_outlived_its_data_file(tmp_path, small_dataset, small_model):
    """A marker vouches for a data file; with the file gone (deleted by hand, a removal cut between its two
    deletes) the unit is not committed: the resume labels it again rather than call 16 missing rows done."""
    out = str(tmp_path / "out")
    common = dict(manifests=[small_dataset["test"]], model=small_model, output=out, run_id="r", rows_per_unit=16,
                  engine="local", progress=False)
    label(LabelConfig(**common))
    storage.delete(sorted(commit.run_files(out, "r"))[1])
    storage.delete(storage.join(out, "_SUCCESS"))
    again = label(LabelConfig(**common, resume=True))
    assert again["rows_out"] == sum(n for *_, n in _count(out)) == 60
    assert len(commit.run_files(out, "r")) == 4


def test_a_marker_read_short_is_read_again_and_a_cut_or_foreign_one_is_refused_by_name(tmp_path, small_dataset,
                                                                                        small_model, monkeypatch):
    manifest = _rows(small_dataset["test"], 32, str(tmp_path / "m.parquet"))
    out = str(tmp_path / "out")
    common = dict(manifests=[manifest], model=small_model, output=out, run_id="r", rows_per_unit=16, **TUNING)
    label(LabelConfig(**common))
    first = storage.list_files(commit.markers_dir(out, "r"), suffix=".json")[0].uri
    text = storage.read_text(first)
    real, short = storage.read_bytes, {first}

    def read_once_short(uri: str) -> bytes:        # an S3 GET answered empty once, as seen under load
        if uri in short:
            short.discard(uri)
            return b""
        return real(uri)

    storage.delete(storage.join(out, commit.SUCCESS_FILE))
    monkeypatch.setattr(storage, "read_bytes", read_once_short)
    label(LabelConfig(**common, resume=True))
    monkeypatch.undo()
    assert not short and all("-a001-" in u for u in commit.run_files(out, "r"))   # both units kept, none redone

    for bad in (text[: len(text) // 2], json.dumps({"file": "x.parquet"})):
        storage.delete(storage.join(out, commit.SUCCESS_FILE))
        storage.write_bytes(first, bad.encode())
        with pytest.raises(JobError, match=re.escape(f"commit marker {first} is not a marker ({len(bad)} bytes")
                           + ".*Delete it and rerun with --resume"):
            label(LabelConfig(**common, resume=True))
    storage.delete(first)
    label(LabelConfig(**common, resume=True))
    assert sum(n for *_, n in _count(out)) == 32 and len(commit.run_files(out, "r")) == 2


def test_a_unit_a_killed_runs_worker_commits_after_the_resume_began_is_in_the_output_once(
        tmp_path, small_dataset, small_model, monkeypatch, caplog):
    """On Ray a killed driver's actors can finish a unit seconds after it died (seen in CI): after a resume
    listed the commits, so the resume labels that unit too. The late copy must not double its rows."""
    manifest = _rows(small_dataset["test"], 32, str(tmp_path / "m.parquet"))
    out = str(tmp_path / "out")
    config = dict(manifests=[manifest], model=small_model, output=out, run_id="r", rows_per_unit=16, **TUNING)
    label(LabelConfig(**config))
    _, saved = killed_before_its_last_unit(out, "r")   # as if the first attempt was killed before it...
    files = list(saved)
    job_module = sys.modules["mlbatch.label.job"]
    prepare = job_module.prepare

    def commits_late(*args, **kwargs):   # ...and its worker commits it just after the resume listed the commits
        run = prepare(*args, **kwargs)
        for uri, body in saved.items():
            storage.write_bytes(uri, body)
        return run

    monkeypatch.setattr(job_module, "prepare", commits_late)
    again = label(LabelConfig(**config, resume=True))
    assert again["rows_out"] == 32 and again["attempts"] == 2
    assert _count(out) == [(os.path.abspath(manifest), row, 1) for row in range(32)]
    assert not any(storage.exists(uri) for uri in files)           # the late copy, marker and data, is gone
    assert "removed 1 commits of units this attempt labeled itself" in caplog.text


def test_a_killed_runs_worker_that_commits_after_the_resume_has_finished_writes_nothing(
        tmp_path, small_dataset, small_model, monkeypatch, caplog):
    """The fence: a worker of an earlier attempt checks the output's lease before it writes, so a unit it
    finishes after a resume (whole, with _SUCCESS) does not come back as a second copy of its rows."""
    manifest = _rows(small_dataset["test"], 32, str(tmp_path / "m.parquet"))
    out = str(tmp_path / "out")
    config = dict(manifests=[manifest], model=small_model, output=out, run_id="r", rows_per_unit=16, **TUNING)
    calls = []
    write = local.write_units

    def recording(batch, **kwargs):
        calls.append((batch, kwargs))
        return write(batch, **kwargs)

    monkeypatch.setattr(local, "write_units", recording)
    label(LabelConfig(**config))
    monkeypatch.setattr(local, "write_units", write)
    killed_before_its_last_unit(out, "r")
    assert label(LabelConfig(**config, resume=True))["attempts"] == 2
    batch, kwargs = next((b, k) for b, k in calls if b.num_rows and pc.max(b.column(SOURCE_ROW)).as_py() >= 16)
    assert kwargs["fence"].epoch == 1
    assert write(batch, **kwargs).num_rows == 0          # the killed run's worker, late: no marker...
    assert _count(out) == [(os.path.abspath(manifest), row, 1) for row in range(32)]   # ...and no second copy
    assert f"not committing {batch.num_rows} rows of run r (lease epoch 1): epoch 2 of the lease" in caplog.text
    commit.remove_run(out, out, "r")                     # a run removed under it: nothing comes back either
    assert write(batch, **kwargs).num_rows == 0 and commit.run_files(out, "r") == []


# ---- nights ----------------------------------------------------------------------------------

def _night(tmp_path, model: str, day: str, **kw) -> NightlyConfig:
    return NightlyConfig(input=str(tmp_path / "in"), model=model, output=str(tmp_path / "out"), date=day,
                         **{**TUNING, **kw})


def test_two_overlapping_nights_the_second_exits_4_touching_nothing(tmp_path, small_dataset, small_model, capsys):
    os.makedirs(tmp_path / "in")
    _rows(small_dataset["test"], 8, str(tmp_path / "in" / "a.parquet"))
    holder = Lease(str(tmp_path / "out"), "nightly-2025-04-01", ttl=60).acquire()   # last night, still running
    try:
        with pytest.raises(OutputBusy, match="being written by run 'nightly-2025-04-01'"):
            nightly(_night(tmp_path, small_model, "2025-04-02"))
        code = main(["nightly", "--input", str(tmp_path / "in"), "--model", small_model, "--output",
                     str(tmp_path / "out"), "--date", "2025-04-02"])
    finally:
        holder.release()
    assert code == 4 and "being written by run 'nightly-2025-04-01'" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "out")) == ["_lease.json", "_lease.json.lock"]


def test_a_ray_error_in_one_of_a_nights_runs_fails_its_manifests_and_the_night_goes_on(
        ray_cluster, tmp_path, small_dataset, small_model, monkeypatch):
    from mlbatch.nightly import night as night_module

    os.makedirs(tmp_path / "in")
    _rows(small_dataset["test"], 8, str(tmp_path / "in" / "a.parquet"))
    # b has another schema: the night labels it in a run of its own
    pq.write_table(pq.read_table(small_dataset["test"]).slice(8, 8).drop_columns(["split"]), tmp_path / "in" / "b.parquet")
    real = night_module.label

    def flaky(config):
        if any(m.endswith("b.parquet") for m in config.manifests):
            import ray
            raise ray.exceptions.RaySystemError("the node holding the predictor was lost")
        return real(config)

    monkeypatch.setattr(night_module, "label", flaky)
    with pytest.raises(NightlyError) as failed:
        nightly(_night(tmp_path, small_model, "2025-04-02"))
    summary = failed.value.summary
    assert [x["manifest"].rsplit("/", 1)[-1] for x in summary["labeled"]] == ["a.parquet"]
    (bad,) = summary["failed"]
    assert bad["manifest"].endswith("b.parquet") and bad["error"].startswith("RaySystemError: ")
    assert "the node holding the predictor was lost" in bad["error"]
    state = load_state(str(tmp_path / "out"))
    assert list(state["manifests"]) == [str(tmp_path / "in" / "a.parquet")] and not state.get("pending")
    monkeypatch.setattr(night_module, "label", real)                     # the next night retries b alone
    again = nightly(_night(tmp_path, small_model, "2025-04-03"))
    assert [x["manifest"].rsplit("/", 1)[-1] for x in again["labeled"]] == ["b.parquet"] and again["unchanged"] == 1
    assert sum(n for *_, n in _count(str(tmp_path / "out"))) == 16


def test_a_kill_between_removing_data_and_markers_strands_nothing(ray_cluster, tmp_path, small_dataset, small_model,
                                                                 monkeypatch):
    """A changed manifest's old rows are removed after its relabel; a crash part way through that removal
    fails the night for it, and the next night finishes the job: every row once, no file left behind."""
    os.makedirs(tmp_path / "in")
    manifest = str(tmp_path / "in" / "a.parquet")
    _rows(small_dataset["test"], 32, manifest)
    nightly(_night(tmp_path, small_model, "2025-04-01", rows_per_unit=16))
    _rows(small_dataset["test"], 24, manifest)                       # the manifest changed
    real_delete = storage.delete
    calls = {"n": 0}

    def dying_delete(uri):
        if "_units" in uri and uri.endswith(".json") and "2025-04-01" in uri:
            calls["n"] += 1
            raise OSError("killed")                                 # after the old data files went
        return real_delete(uri)

    monkeypatch.setattr(storage, "delete", dying_delete)
    with pytest.raises(NightlyError, match="killed"):
        nightly(_night(tmp_path, small_model, "2025-04-02", rows_per_unit=16))
    monkeypatch.setattr(storage, "delete", real_delete)
    assert calls["n"] == 1
    nightly(_night(tmp_path, small_model, "2025-04-03", rows_per_unit=16))
    counts = _count(str(tmp_path / "out"))
    assert len(counts) == 24 and all(n == 1 for *_, n in counts)
    data = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "out") for f in fs
            if f.endswith(".parquet") and "/_" not in d]
    assert len(data) == 2 and all("dt=2025-04-03" in f for f in data)


# ---- a conditional write whose answer was lost after the server applied it (issue 38, item 1) ----

def test_a_conditional_write_that_landed_but_whose_answer_was_lost_is_known_to_have_landed(
        bucket, s3_endpoint, monkeypatch):
    """The server applies the PUT, the answer never arrives, botocore sends the same request again and
    meets the condition the first try already changed (412). That is this writer's own write, not
    another writer's: ``swap`` reads the object back and returns its token."""
    from faultproxy import FaultProxy

    lost = []

    def lose_first_conditional_put(method: str, path: str, headers: dict[str, str]) -> bool:
        conditional = {k.lower() for k in headers} & {"if-match", "if-none-match"}
        if method == "PUT" and conditional and len(lost) < 1:
            lost.append(path)
            return True
        return False

    uri, fresh = f"{bucket}/_nightly/state.json", f"{bucket}/_lease.json"
    first = versioned.swap(uri, b'{"night": 1}', None)
    with FaultProxy(s3_endpoint, rate=0.0, lose_reply=lose_first_conditional_put) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        token = versioned.swap(uri, b'{"night": 2}', first)            # If-Match, its answer lost
        assert proxy.stats["lost_reply"] == 1
        assert token is not None, "a write that landed was reported as lost to another writer"
        assert versioned.read_versioned(uri) == (b'{"night": 2}', token)
        # another writer really did get there first: still None, nothing written
        assert versioned.swap(uri, b'{"night": 3}', first) is None
        assert storage.read_bytes(uri) == b'{"night": 2}'
        lost.clear()
        created = versioned.swap(fresh, b'{"owner": "a"}', None)       # If-None-Match: *, its answer lost
        assert proxy.stats["lost_reply"] == 2 and created is not None
        assert versioned.swap(fresh, b'{"owner": "b"}', None) is None  # the object exists: b did not create it
        lost.clear()
        lease = Lease(f"{bucket}/out", "run-a", ttl=30).acquire()     # its answer lost: the lease is still its
        assert proxy.stats["lost_reply"] == 3
        with pytest.raises(LeaseHeld, match="run-a"):
            Lease(f"{bucket}/out", "run-b", ttl=30).acquire()
        lease.release()
    assert storage.read_bytes(fresh) == b'{"owner": "a"}'


def test_a_marker_that_names_a_path_outside_its_own_data_file_is_refused_and_nothing_is_deleted(
        tmp_path, small_dataset, small_model):
    """Issue 38, item 5: a marker's ``data_file`` is joined onto the output and deleted by a resume's sweep or a
    relabel; one written by someone else naming ``../victim`` must not steer a delete outside the output."""
    manifest = _rows(small_dataset["test"], 32, str(tmp_path / "m.parquet"))
    out, victim = str(tmp_path / "out"), tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("not mlbatch's")
    common = dict(manifests=[manifest], model=small_model, output=out, run_id="r", rows_per_unit=16, **TUNING)
    label(LabelConfig(**common))
    first = storage.list_files(commit.markers_dir(out, "r"), suffix=".json")[0].uri
    marker = json.loads(storage.read_text(first))
    hostiles = ("../victim", "r-a000-f000000-r000000000000-r000000000000.parquet/../../victim",
                "other-a000-f000000-r000000000016-r000000000016.parquet")   # another run's name
    for key, hostile in itertools.product(("data_file", "file"), hostiles):   # "file": an older mlbatch's name
        storage.delete(storage.join(out, commit.SUCCESS_FILE))
        storage.write_bytes(first, json.dumps({**{k: v for k, v in marker.items() if k != "data_file"},
                                               key: hostile}).encode())
        with pytest.raises(JobError, match=re.escape(f"commit marker {first} names the data file {hostile!r}")
                           + ".*nothing was deleted"):
            label(LabelConfig(**common, resume=True))
        assert (victim / "keep.txt").read_text() == "not mlbatch's"
    storage.write_bytes(first, json.dumps(marker).encode())   # the marker as mlbatch wrote it: resumes cleanly
    label(LabelConfig(**common, resume=True))
    assert sum(n for *_, n in _count(out)) == 32


def test_the_unit_check_catches_any_one_or_two_rows_missing_or_doubled():
    """Issue 38, item 6: count and row sum pass two compensating faults (rows 101 and 102 missing, 100 and 103
    written twice); the sum of squares beside them catches every such pair, enumerated here."""
    from mlbatch.label.stats import Stats, whole
    start, stop = 100, 112
    rows = list(range(start, stop))

    def stats(positions: list[int]) -> Stats:
        n = len(positions)
        table = pa.table({SOURCE_ROW: pa.array(positions, pa.int64()), "status": ["ok"] * n, "error": [None] * n})
        return Stats.from_dict(json.loads(json.dumps(Stats.of_table(table, []).to_dict())))   # as a marker holds it

    assert whole(stats(rows), start, stop)
    faults = 0
    for missing in [(a,) for a in rows] + [(a, b) for a in rows for b in rows if a < b]:
        kept = [r for r in rows if r not in missing]
        for doubled in {tuple(sorted(d)) for d in itertools.product(kept, repeat=len(missing))}:
            faults += 1
            assert not whole(stats(sorted(kept + list(doubled))), start, stop), (missing, doubled)
    compensating = stats(sorted([100, 100, 103, 103] + rows[4:]))            # 101 and 102 missing
    assert (compensating.rows, compensating.row_sum) == (stats(rows).rows, stats(rows).row_sum)
    old = Stats(rows=compensating.rows, row_sum=compensating.row_sum, row_square_sum=None)
    assert whole(old, start, stop)   # a marker from before the squares: count and sum only, as it was
    print(f"{faults} one- and two-row faults, every one caught")


# ---- issue 38: cleanup a crash cannot strand, resume that trusts no file alone ----------------

def test_a_removal_cut_at_any_point_is_never_resumed_as_complete(tmp_path, small_dataset, small_model, monkeypatch):
    """Removing a run deletes what vouches for it first (``_SUCCESS``, the summary, the plan record), and a
    resume calls a run complete only with all of them, a whole commit per unit and every file. Cut the
    removal at each of its deletes in turn: the resume then finishes the run or refuses it, never reports a
    run with rows missing as complete."""
    import shutil

    manifest = _rows(small_dataset["test"], 32, str(tmp_path / "m.parquet"))
    pristine = str(tmp_path / "pristine")
    config = dict(manifests=[manifest], model=small_model, run_id="r", rows_per_unit=8, **TUNING)
    label(LabelConfig(**config, output=pristine))
    real_delete, deletes = storage.delete, []

    def cut_at(k: int):
        def delete(uri):
            deletes.append(uri)
            if len(deletes) == k:
                raise OSError("killed")
            return real_delete(uri)
        return delete

    outcomes = []
    for k in itertools.count(1):
        out = str(tmp_path / f"cut{k}")
        shutil.copytree(pristine, out)
        deletes.clear()
        monkeypatch.setattr(storage, "delete", cut_at(k))
        try:
            commit.remove_run(out, out, "r")
        except OSError:
            pass
        monkeypatch.setattr(storage, "delete", real_delete)
        if len(deletes) < k:      # the removal ran whole: every cut point is covered
            break
        try:
            again = label(LabelConfig(**config, output=out, resume=True))
        except JobError as exc:
            assert "cannot resume run r: its plan record is gone" in str(exc)
            outcomes.append("refused")
            continue
        assert again["rows_out"] == 32 and _count(out) == [(os.path.abspath(manifest), r, 1) for r in range(32)]
        outcomes.append("finished")
    assert len(outcomes) == 8 and outcomes[:2] == ["finished", "finished"] and "refused" in outcomes


def test_a_unit_landed_late_beside_a_complete_run_is_found_by_the_next_resume(tmp_path, small_dataset, small_model):
    """A writer paused between its fence check and its write can still land one unit after the attempt that
    took over finished (no object store fences a write by another object). ``_SUCCESS`` alone no longer
    vouches: the next resume finds the unit committed twice and labels it once again."""
    manifest = _rows(small_dataset["test"], 32, str(tmp_path / "m.parquet"))
    out = str(tmp_path / "out")
    config = dict(manifests=[manifest], model=small_model, output=out, run_id="r", rows_per_unit=16, **TUNING)
    label(LabelConfig(**config))
    markers = commit.markers_dir(out, "r")
    first, _ = killed_before_its_last_unit(out, "r")
    label(LabelConfig(**config, resume=True))              # the attempt that took over labels it and finishes
    name = sorted(u.rsplit("/", 1)[-1] for u in commit.run_files(out, "r"))[-1]
    late = first                                           # the earlier attempt's copy lands after all
    storage.write_bytes(storage.join(out, late), storage.read_bytes(storage.join(out, name)))
    marker = json.loads(storage.read_bytes(commit.marker_uri(markers, name)))
    storage.write_bytes(commit.marker_uri(markers, late),
                        json.dumps({**marker, "data_file": late, "attempt": 0}).encode())
    assert sum(n for *_, n in _count(out)) == 48          # what a reader of the folder sees until then
    again = label(LabelConfig(**config, resume=True))
    assert again["rows_out"] == 32 and _count(out) == [(os.path.abspath(manifest), r, 1) for r in range(32)]


# ---- issue 38: fencing ------------------------------------------------------------------------

def test_a_fresh_reruns_fence_stops_the_earlier_attempts_workers(tmp_path, small_dataset, small_model, monkeypatch):
    """A fresh rerun with the same run id takes a new lease epoch, so a worker of the earlier attempt that
    finishes a unit afterwards writes nothing (it used to pass: both attempts were attempt 0)."""
    manifest = _rows(small_dataset["test"], 32, str(tmp_path / "m.parquet"))
    out = str(tmp_path / "out")
    common = dict(manifests=[manifest], model=small_model, output=out, run_id="r", **TUNING)
    calls, write = [], local.write_units

    def recording(batch, **kwargs):
        calls.append((batch, kwargs))
        return write(batch, **kwargs)

    monkeypatch.setattr(local, "write_units", recording)
    label(LabelConfig(**common, rows_per_unit=32))
    monkeypatch.setattr(local, "write_units", write)
    label(LabelConfig(**common, rows_per_unit=8))           # the same run id again, from the start
    batch, kwargs = calls[0]
    assert write(batch, **kwargs).num_rows == 0             # the first attempt's worker, late
    assert _count(out) == [(os.path.abspath(manifest), r, 1) for r in range(32)]


def test_a_paused_overwrite_run_that_wakes_after_another_committed_removes_nothing(
        tmp_path, small_dataset, small_model, monkeypatch):
    """``--mode overwrite`` removes the other runs' rows once it is whole. Paused past its lease (renewals
    too) just before that, it wakes after another run took the output over and committed: it must remove
    nothing. Its fence reads the lease itself, not the renewal's last answer, which a paused holder lacks."""
    manifest = _rows(small_dataset["test"], 16, str(tmp_path / "m.parquet"))
    out = str(tmp_path / "out")
    common = dict(manifests=[manifest], model=small_model, output=out, **TUNING)
    label(LabelConfig(**common, run_id="old"))
    leases, acquire, drop = [], Lease.acquire, commit.drop_late_commits

    def recording(self):
        leases.append(self)
        return acquire(self)

    def paused(run):
        if run.plan.run_id == "new":
            leases[-1]._stop.set()                              # the whole process sleeps: no renewals
            leases[-1]._thread.join()
            time.sleep(3.2)
            label(LabelConfig(**common, run_id="other", mode="append"))   # takes the expired lease over
        return drop(run)

    monkeypatch.setattr(Lease, "acquire", recording)
    monkeypatch.setattr(commit, "drop_late_commits", paused)
    with pytest.raises(JobError, match="no longer holds its lease"):
        label(LabelConfig(**common, run_id="new", mode="overwrite", lease_seconds=3))
    assert commit.run_files(out, "other") and commit.run_files(out, "old")   # nobody's rows removed
    assert storage.json_object(storage.read_bytes(storage.join(out, commit.SUMMARY_FILE)))["run_id"] == "other"


# ---- issue 38: a rerun into a table -----------------------------------------------------------

def test_a_rerun_into_a_table_never_deletes_or_rewrites_a_file_the_table_reads(tmp_path, small_dataset, small_model):
    """The same command with another threshold is another run (its id covers every setting that changes a
    row), which meets the first as rows it did not write; with ``--mode overwrite`` it replaces them in one
    snapshot. The same run id labeled afresh is refused while the table reads its files."""
    from mlbatch.core import iceberg

    manifest = _rows(small_dataset["test"], 16, str(tmp_path / "m.parquet"))
    out = str(tmp_path / "out")
    common = dict(manifests=[manifest], model=small_model, output=out, table="ns.t", **TUNING)
    first = label(LabelConfig(**common))
    label_name = next(iter(first["labels"]))
    other = {label_name: 0.01}
    with pytest.raises(JobError, match="already holds rows this run did not write"):
        label(LabelConfig(**common, thresholds=other))
    again = label(LabelConfig(**common, thresholds=other, mode="overwrite"))
    assert again["run_id"] != first["run_id"]
    read = iceberg.snapshot_files("ns.t", iceberg.DEFAULT_CATALOG, out)
    assert read and all(os.path.exists(storage.local_path(f)) for f in read)
    rows = iceberg.catalog(iceberg.DEFAULT_CATALOG, out).load_table("ns.t").scan(
        row_filter=f"label_{label_name} = true").to_arrow()
    assert rows.num_rows == round(again["labels"][label_name]["positive_rate"] * again["ok"]) and rows.num_rows > 0
    with pytest.raises(JobError, match=f"run {again['run_id']} is committed to table ns.t"):
        label(LabelConfig(**common, run_id=again["run_id"], thresholds=other, mode="overwrite"))
    assert iceberg.snapshot_files("ns.t", iceberg.DEFAULT_CATALOG, out) == read


def test_a_nightly_state_naming_paths_outside_its_output_is_refused_and_nothing_is_deleted(
        tmp_path, small_dataset, small_model):
    """A run id or a date read back from the state becomes a folder that a night deletes (a pending run whose
    manifests went): it passes the one rule for names first, so a state written by someone else cannot
    point a removal outside the output."""
    os.makedirs(tmp_path / "in")
    _rows(small_dataset["test"], 8, str(tmp_path / "in" / "a.parquet"))
    nightly(_night(tmp_path, small_model, "2025-04-01"))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    uri = state_uri(str(tmp_path / "out"))
    for run_id, day in (("../../../victim", "2025-04-01"), ("x", "2025-04-01/../../../victim")):
        state = json.loads(storage.read_bytes(uri))
        state["pending"] = {run_id: {"dt": day, "model_version": "gone", "rows_per_unit": 8, "manifests": {}}}
        storage.write_bytes(uri, json.dumps(state).encode())
        with pytest.raises(JobError, match="run id|partition's --date"):
            nightly(_night(tmp_path, small_model, "2025-04-02"))
        assert (victim / "keep.txt").read_text() == "mine"


def test_a_manifest_edited_in_place_keeping_its_footer_fails_the_run_naming_it(tmp_path, small_dataset, small_model,
                                                                            monkeypatch):
    """Two image URIs of one length swapped across two units: the same values, lengths, minimum and maximum,
    so the same footer. A unit read after the edit would label the other unit's picture again (one picture
    twice, one never): the manifest's version (its mtime here, its ETag on S3) is checked with its footer."""
    from mlbatch.label.plan import footer_digest

    manifest = _rows(small_dataset["test"], 32, str(tmp_path / "m.parquet"))
    table, probe = pq.read_table(manifest), str(tmp_path / "e.parquet")

    def swapped(i: int, j: int) -> pa.Table:
        uris = table.column("image_uri").to_pylist()
        uris[i], uris[j] = uris[j], uris[i]
        return table.set_column(table.schema.get_field_index("image_uri"), "image_uri", pa.array(uris))

    def same_footer(edit: pa.Table) -> bool:   # compressed sizes move with the order for most pairs
        pq.write_table(edit, probe)
        return footer_digest(pq.read_metadata(manifest)) == footer_digest(pq.read_metadata(probe))

    edited = next(e for e in (swapped(i, j) for i in range(16) for j in range(16, 32)) if same_footer(e))
    real = local.UnitLabeler.__call__
    units = []

    def edited_after_the_first_unit(self, unit):
        units.append(unit)
        if len(units) == 2:
            pq.write_table(edited, manifest)      # an upstream job edits it in place, between two units' reads
        return real(self, unit)

    monkeypatch.setattr(local.UnitLabeler, "__call__", edited_after_the_first_unit)
    with pytest.raises(ManifestError, match=f"^{re.escape(f'manifest {manifest} changed while this run read it')}"):
        label(LabelConfig(manifests=[manifest], model=small_model, output=str(tmp_path / "out"), run_id="r",
                          rows_per_unit=16, **TUNING))
