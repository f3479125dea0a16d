"""The local engine and the choice of engine (issue 22).

The local engine labels on this machine without Ray: the same rows, error rows and resume as Ray's
engine. ``--engine auto`` labels locally unless Ray is there to use, and uses a Ray instance already
running on the machine (a warm start) rather than starting a second one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlbatch.cli import main
from mlbatch.core import storage
from mlbatch.core.manifest import ManifestError
from mlbatch.label import JobError, LabelConfig, label
from mlbatch.label import engine as engines
from mlbatch.synth import SynthConfig, make_dataset

from badrows import MAX_BYTES, bad_input_manifest
from procs import RAY, kill_when

SAME_EXACTLY = ["id", "image_uri", "source_manifest", "source_row", "status", "error", "labels", "label_car",
                "label_bus", "label_pedestrian", "model_name", "model_version"]
PROBS = ["prob_car", "prob_bus", "prob_pedestrian"]


def _output(out: str | Path) -> pa.Table:
    files = [e.uri for e in storage.list_files(str(out), suffix=".parquet")]
    return pa.concat_tables([storage.read_parquet(f) for f in files]).sort_by([("source_row", "ascending")])


def _assert_same_rows(a: pa.Table, b: pa.Table) -> None:
    """Row for row the same values; probabilities to 1e-5 (null where the other is null)."""
    assert a.num_rows == b.num_rows
    assert a.schema.remove_metadata() == b.schema.remove_metadata()
    for name in SAME_EXACTLY:
        assert a.column(name).to_pylist() == b.column(name).to_pylist(), name
    for name in PROBS:
        x, y = a.column(name).to_numpy(zero_copy_only=False), b.column(name).to_numpy(zero_copy_only=False)
        np.testing.assert_array_equal(np.isnan(x.astype(float)), np.isnan(y.astype(float)))
        np.testing.assert_allclose(x.astype(float), y.astype(float), atol=1e-5, equal_nan=True)


def _env(**changes) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for k, v in changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


# ---- the same output ------------------------------------------------------------------------

def test_both_engines_label_the_bad_input_matrix_alike(ray_cluster, bucket, tmp_path, small_dataset, small_model):
    manifest, bad, good = bad_input_manifest(tmp_path, bucket, small_dataset["test"])
    summaries = {}
    for engine in ("local", "ray"):
        summaries[engine] = label(LabelConfig(manifests=[manifest], model=small_model, output=str(tmp_path / engine),
                                              engine=engine, id_column="id", max_bytes=MAX_BYTES,
                                              max_error_rate=1.0, batch_size=8, progress=False))
        assert summaries[engine]["predictor"]["engine"] == engine
    local, on_ray = _output(tmp_path / "local"), _output(tmp_path / "ray")
    _assert_same_rows(local, on_ray)
    by_id = {r["id"]: r for r in local.to_pylist()}
    for key, (_, message) in bad.items():
        assert by_id[key]["status"] == "error" and by_id[key]["error"].startswith(message), (key, by_id[key]["error"])
    assert [by_id[i]["status"] for i in good] == ["ok"] * len(good)
    for field in ("rows_out", "ok", "errors", "top_errors", "labels"):
        assert summaries["local"][field] == summaries["ray"][field], field
    assert summaries["local"]["predictor"]["engine_reason"] == "--engine local"


def test_the_local_engine_checks_ids_and_refuses_a_repeated_one(tmp_path, small_dataset, small_model):
    table = storage.read_parquet(small_dataset["test"]).slice(0, 6)
    ids = table.column("id").to_pylist()
    repeated = table.set_column(table.schema.get_field_index("id"), "id", pa.array(ids[:5] + ids[:1]))
    storage.write_parquet(repeated, str(tmp_path / "m.parquet"))
    with pytest.raises(ManifestError, match=rf"row 5: id {ids[0]!r} already appears at .* row 0"):
        label(LabelConfig(manifests=[str(tmp_path / "m.parquet")], model=small_model, output=str(tmp_path / "out"),
                          engine="local", id_column="id", progress=False))
    assert not list(tmp_path.glob("out/*.parquet"))


@pytest.mark.parametrize("resumed_by", ["local", "ray"])
def test_a_killed_local_run_resumes_every_row_once_on_either_engine(ray_cluster, tmp_path, small_model, resumed_by):
    data = make_dataset(str(tmp_path / "data"), SynthConfig(train=0, val=0, test=400, seed=21))
    out = tmp_path / "out"
    args = [sys.executable, "-m", "mlbatch.cli", "label", "--manifest", data["test"], "--model", small_model,
            "--output", str(out), "--id-column", "id", "--batch-size", "8", "--rows-per-unit", "16"]
    kill_when(args + ["--engine", "local"], _env(), lambda: len(list(out.glob("*.parquet"))) >= 3)
    partial = _output(out).num_rows
    assert 0 < partial < 400 and not (out / "_SUCCESS").exists()

    resumed = subprocess.run(args + ["--resume", "--engine", resumed_by], env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "rows in 400, out 400: 400 ok" in resumed.stdout
    summary = json.loads((out / "_run.json").read_text())
    assert summary["attempts"] == 2 and summary["predictor"]["engine"] == resumed_by
    table = _output(out)
    assert sorted(table.column("id").to_pylist()) == sorted(set(table.column("id").to_pylist()))
    clean = label(LabelConfig(manifests=[data["test"]], model=small_model, output=str(tmp_path / "clean"),
                              engine="ray", progress=False))
    assert clean["rows_out"] == 400
    _assert_same_rows(table, _output(tmp_path / "clean"))


# ---- which engine --------------------------------------------------------------------------

def test_an_unknown_engine_is_refused_before_anything_is_read(tmp_path):
    with pytest.raises(JobError, match=r"--engine 'spark': choose one of auto, local, ray"):
        label(LabelConfig(manifests=[str(tmp_path / "none.parquet")], model="m", output=str(tmp_path / "o"),
                          engine="spark", progress=False))


def test_auto_labels_locally_without_starting_ray_when_none_is_there(tmp_path, small_dataset, small_model):
    ray_tmp = Path(tempfile.mkdtemp(prefix="mlb-", dir="/tmp"))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "mlbatch.cli", "label", "--manifest", small_dataset["test"],
                           "--model", small_model, "--output", str(out)],
                          env=_env(RAY_ADDRESS=None, RAY_TMPDIR=str(ray_tmp)), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "engine: local (no Ray cluster given (RAY_ADDRESS unset) and none running on this machine)" in done.stdout
    assert json.loads((out / "_run.json").read_text())["predictor"]["engine"] == "local"
    assert list(ray_tmp.iterdir()) == []            # no Ray session was made
    ray_tmp.rmdir()


def test_choosing_the_local_engine_does_not_import_ray(tmp_path):
    """Auto on a machine without Ray costs no import of Ray (about a second of every small run)."""
    probe = ("import sys; from mlbatch.label.engine import choose_engine; "
             "print(choose_engine('auto')[0], 'ray' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], env=_env(RAY_ADDRESS=None, RAY_TMPDIR=str(tmp_path)),
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["local", "False"], done.stderr[-2000:]


def test_auto_uses_the_ray_instance_running_on_this_machine_and_says_so(tmp_path, small_dataset, small_model):
    """`ray start` on the machine, no RAY_ADDRESS: the run joins it (a warm start); once it is gone, local."""
    ray_tmp = tempfile.mkdtemp(prefix="mlb-", dir="/tmp")   # short: Ray's socket paths have a length limit
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _env(RAY_ADDRESS=None, RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0")
    head = subprocess.Popen([*RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
                             "--include-dashboard=false", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    args = [sys.executable, "-m", "mlbatch.cli", "label", "--manifest", small_dataset["test"], "--model", small_model]
    try:
        record = Path(ray_tmp, "ray", "ray_current_cluster")
        deadline = time.monotonic() + 90
        while not (record.exists() and engines._listening(record.read_text().strip())):
            assert head.poll() is None and time.monotonic() < deadline, "ray start did not come up"
            time.sleep(0.5)
        warm = subprocess.run(args + ["--output", str(tmp_path / "warm")], env=env, capture_output=True, text=True,
                              timeout=300)
        assert warm.returncode == 0, warm.stderr[-3000:]
        address = record.read_text().strip()                      # this machine's address, and the port given
        assert address.endswith(f":{port}")
        assert f"using the Ray instance already running at {address} (a warm start" in warm.stderr
        summary = json.loads((tmp_path / "warm" / "_run.json").read_text())
        assert summary["predictor"]["engine"] == "ray"
        assert summary["predictor"]["engine_reason"] == f"a Ray instance is running on this machine ({address})"
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    # the record of the killed instance stays behind: it is not followed
    assert record.exists()
    cold = subprocess.run(args + ["--output", str(tmp_path / "cold")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert cold.returncode == 0, cold.stderr[-3000:]
    assert json.loads((tmp_path / "cold" / "_run.json").read_text())["predictor"]["engine"] == "local"
    subprocess.run(["rm", "-rf", ray_tmp], check=False)


def test_require_cuda_without_cuda_exits_before_anything_is_prepared(tmp_path, small_dataset, small_model, capsys):
    """On this CPU machine: the message names the torch build and the driver, and the output holds nothing."""
    out = str(tmp_path / "out")
    code = main(["label", "--manifest", small_dataset["test"], "--model", small_model, "--output", out,
                 "--engine", "local", "--require-cuda"])
    err = capsys.readouterr().err
    assert code != 0 and "--require-cuda: CUDA is not usable here: torch 2.14.1" in err and "driver:" in err
    assert not os.path.exists(os.path.join(out, "_units")) and not [f for f in os.listdir(out) if f.endswith(".parquet")]


@pytest.mark.slow
def test_a_gpu_asked_for_on_a_cluster_without_one_is_waited_for_then_named(ray_cluster, tmp_path, small_dataset,
                                                                             small_model):
    """``--num-gpus 1`` asks for a GPU whether or not the cluster has one now (an autoscaler would add it): the
    run waits up to the stall limit, then ends naming what it waits for. It used to wait without end."""
    config = dict(manifests=[small_dataset["test"]], model=small_model, output=str(tmp_path / "out"),
                  engine="ray", progress=False)
    started = time.monotonic()
    with pytest.raises(JobError, match=r"no task with 1 GPU\(s\) could start within --stall-seconds 5: .* the "
                                       r"cluster has 0 GPUs"):
        label(LabelConfig(**config, num_gpus=1, stall_seconds=5))
    assert time.monotonic() - started < 60
    with pytest.raises(JobError, match="--require-cuda: the predictors ask for no GPU"):
        label(LabelConfig(**config, require_cuda=True))


def test_a_device_out_of_memory_halves_the_batch_and_labels_every_row(tmp_path, small_dataset, small_model,
                                                                       monkeypatch):
    """A fake device that holds at most 5 pictures at a time: every row is labeled, with the probabilities of a
    device that holds them all. One that holds one picture, and not one particular picture even alone: that
    row is an error row naming why, never a dead job."""
    import torch

    from mlbatch.label.stages import OUT_OF_MEMORY
    from mlbatch.model.loaded import LoadedModel

    def read(out: str) -> dict[int, dict]:
        rows = pa.concat_tables([pq.read_table(e.uri) for e in storage.list_files(out, suffix=".parquet")])
        return {r["source_row"]: r for r in rows.to_pylist()}

    common = dict(manifests=[small_dataset["test"]], model=small_model, run_id="r", batch_size=16, engine="local",
                  progress=False)
    label(LabelConfig(**common, output=str(tmp_path / "whole")))
    real, sizes, singles = LoadedModel.predict_pixels, [], []

    def device_of(limit: int):
        def predict(self, pixels):
            sizes.append(len(pixels))
            if len(pixels) == 1:
                singles.append(1)
            if len(pixels) > limit or (limit == 1 and len(singles) == 3):   # the third picture seen alone
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real(self, pixels)
        return predict

    monkeypatch.setattr(LoadedModel, "predict_pixels", device_of(5))
    summary = label(LabelConfig(**common, output=str(tmp_path / "five")))
    whole, five = read(str(tmp_path / "whole")), read(str(tmp_path / "five"))
    assert summary["rows_out"] == summary["ok"] == len(whole) == 60 and sizes[:3] == [16, 8, 4]
    assert all(abs(five[i]["prob_car"] - whole[i]["prob_car"]) < 1e-6 for i in whole)
    monkeypatch.setattr(LoadedModel, "predict_pixels", device_of(1))
    summary = label(LabelConfig(**common, output=str(tmp_path / "one")))
    one = read(str(tmp_path / "one"))
    bad = [r for r in one.values() if r["status"] != "ok"]
    assert summary["rows_out"] == 60 and summary["ok"] == 59 and [r["error"] for r in bad] == [OUT_OF_MEMORY]
    assert bad[0]["prob_car"] is None and bad[0]["label_car"] is None


def test_a_sticky_device_error_ends_the_run_for_a_resume_instead_of_failing_every_batch(
        tmp_path, small_dataset, small_model, monkeypatch):
    """A CUDA error that leaves the device unusable fails every later batch on it. The local engine ends the run
    naming it (on Ray the actor ends, so Ray restarts it); the units already committed stay for --resume."""
    from mlbatch.model.loaded import LoadedModel

    real, calls = LoadedModel.predict_pixels, []

    def lost_device(self, pixels):
        calls.append(len(pixels))
        if len(calls) > 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(self, pixels)

    monkeypatch.setattr(LoadedModel, "predict_pixels", lost_device)
    common = dict(manifests=[small_dataset["test"]], model=small_model, output=str(tmp_path / "out"), run_id="r",
                  batch_size=16, rows_per_unit=16, engine="local", progress=False)
    with pytest.raises(JobError, match="the device is in an unusable state after: CUDA error: an illegal memory"):
        label(LabelConfig(**common))
    assert len(calls) == 3                      # ended at the first sticky error, not tried batch after batch
    monkeypatch.setattr(LoadedModel, "predict_pixels", real)
    assert label(LabelConfig(**common, resume=True))["rows_out"] == 60


def test_precision_is_part_of_a_runs_identity(tmp_path, small_dataset, small_model):
    """GPU actors compute in fp16 and a CPU in fp32: their probabilities differ by ~1e-3, enough to flip a
    decision near a threshold. The device and precision are in _run.json and every file's metadata, and a
    --resume on another one is refused, naming what changed, so one output never mixes them."""
    from mlbatch.core.table import read_file_metadata

    out = str(tmp_path / "out")
    common = dict(manifests=[small_dataset["test"]], model=small_model, output=out, run_id="r", rows_per_unit=16,
                  engine="local", progress=False)
    first = label(LabelConfig(**common, precision="bf16"))        # CPU autocast: what this machine can show
    assert (first["predictor"]["device"], first["predictor"]["precision"]) == ("cpu", "bf16")
    files = storage.list_files(out, suffix=".parquet")
    assert {read_file_metadata(pq.read_schema(e.uri))["predictor"] for e in files} == {"cpu bf16"}
    storage.delete(files[-1].uri)                                 # as if the run stopped before its last unit
    storage.delete(storage.join(out, "_SUCCESS"))
    with pytest.raises(JobError, match=r"the device and precision \(--precision, --num-gpus\) changed "
                                       r"\(cpu bf16 -> cpu fp32\)"):
        label(LabelConfig(**common, resume=True))                 # auto on a CPU is fp32
    again = label(LabelConfig(**common, precision="bf16", resume=True))
    assert again["rows_out"] == 60 and again["attempts"] == 2
    fp32 = label(LabelConfig(**{**common, "output": str(tmp_path / "fp32")}))
    assert fp32["predictor"]["precision"] == "fp32"
    gap = max(abs(a["mean_probability"] - b["mean_probability"])
              for a, b in zip(first["labels"].values(), fp32["labels"].values()))
    assert 0 < gap < 0.05                                         # bf16 is really used, and close


def test_the_local_engine_places_one_predictor_per_visible_gpu_or_share_of_one(monkeypatch):
    """``--num-gpus`` is GPUs per predictor: by default one predictor per visible GPU, 0.5 two per GPU, 0 the
    CPU; more than 1 is refused (a predictor uses one GPU), as on Ray."""
    from mlbatch.label import local
    from mlbatch.label.config import check_choices

    monkeypatch.setattr("mlbatch.model.loaded.cuda_problem", lambda: None)
    monkeypatch.setattr(local, "visible_gpus", lambda: 2)
    config = dict(manifests=["m"], model="p", output="o")
    devices = {f: local.predictor_devices(LabelConfig(**config, num_gpus=f)) for f in (None, 1, 0.5, 0.3, 0)}
    assert devices == {None: ["cuda:0", "cuda:1"], 1: ["cuda:0", "cuda:1"], 0: ["cpu"],
                       0.5: ["cuda:0", "cuda:0", "cuda:1", "cuda:1"], 0.3: ["cuda:0"] * 3 + ["cuda:1"] * 3}
    monkeypatch.setattr(local, "visible_gpus", lambda: 0)
    assert local.predictor_devices(LabelConfig(**config)) == ["cpu"]
    with pytest.raises(JobError, match=r"--num-gpus 2: GPUs per predictor, from 0 \(none\) to 1; a predictor uses "
                                       r"one GPU, so to use more GPUs run more predictors"):
        check_choices(LabelConfig(**config, num_gpus=2))
    with pytest.raises(JobError, match=r"--decode-batch-size 0: must be at least 1"):
        check_choices(LabelConfig(**config, decode_batch_size=0))


def test_the_local_engine_with_two_fake_devices_starts_two_predictors_and_labels_every_row_once(
        tmp_path, small_dataset, small_model, monkeypatch):
    """Two visible GPUs (faked: each predictor told ``cuda:i`` computes on the CPU): two labelers start, one per
    device, both take units of work, and the output is row for row a one-predictor run's."""
    from mlbatch.label import local

    started, units = [], {}

    class FakeDevice(local.UnitLabeler):
        def __init__(self, *args, device, **kw):
            started.append(device)
            super().__init__(*args, device="cpu", **kw)
            self.fake = device

        def __call__(self, unit):
            units[self.fake] = units.get(self.fake, 0) + 1
            yield from super().__call__(unit)

    common = dict(manifests=[small_dataset["test"]], model=small_model, run_id="r", rows_per_unit=8, batch_size=8,
                  engine="local", progress=False, precision="fp32")
    label(LabelConfig(**common, output=str(tmp_path / "one")))
    monkeypatch.setattr("mlbatch.model.loaded.cuda_problem", lambda: None)
    monkeypatch.setattr(local, "visible_gpus", lambda: 2)
    monkeypatch.setattr(local, "UnitLabeler", FakeDevice)
    summary = label(LabelConfig(**common, output=str(tmp_path / "two")))
    assert started == ["cuda:0", "cuda:1"] and sorted(units) == ["cuda:0", "cuda:1"] and sum(units.values()) == 8
    assert summary["predictor"]["devices"] == ["cuda:0", "cuda:1"] and summary["predictor"]["concurrency"] == 2
    assert summary["rows_out"] == 60
    _assert_same_rows(_output(tmp_path / "one"), _output(tmp_path / "two"))


@pytest.mark.parametrize("command", ["label", "nightly"])
def test_help_puts_the_flags_only_rays_engine_reads_in_a_group_of_their_own(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    flags = []
    for line in text.split("Ray's engine only:", 1)[1].splitlines()[1:]:
        if line and not line.startswith(" "):   # the next group's title
            break
        flags += [line.split()[0]] if line.startswith("  --") else []
    assert flags == ["--concurrency", "--layout", "--decode-batch-size", "--stall-seconds"]
