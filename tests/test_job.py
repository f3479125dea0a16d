"""The labeling job on a real Ray cluster (tests/conftest.py) with moto's S3 server as the object store."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import mlbatch
from mlbatch.core import storage
from mlbatch.label import JobError, LabelConfig, label
from mlbatch.core.manifest import ManifestError
from mlbatch.synth import SynthConfig, make_dataset
from procs import RAY, kill_when

REPO = Path(__file__).resolve().parents[1]
LABELS = ["car", "bus", "pedestrian"]
EXPECTED_ADDED = [
    ("label_car", pa.bool_()), ("label_bus", pa.bool_()), ("label_pedestrian", pa.bool_()),
    ("prob_car", pa.float32()), ("prob_bus", pa.float32()), ("prob_pedestrian", pa.float32()),
    ("labels", pa.list_(pa.string())), ("status", pa.string()), ("error", pa.string()),
    ("model_name", pa.string()), ("model_version", pa.string()), ("run_id", pa.string()),
    ("labeled_at", pa.timestamp("us", tz="UTC")), ("source_manifest", pa.string()), ("source_row", pa.int64()),
]


def _copy_package(src: str, dst: str) -> str:
    for name in ("model.safetensors", "mlbatch-model.json"):
        storage.write_bytes(storage.join(dst, name), storage.read_bytes(storage.join(src, name)))
    return dst


def _read_output(uri: str) -> pa.Table:
    files = [e.uri for e in storage.list_files(uri, suffix=".parquet")]
    assert files, f"no output files under {uri}"
    return pa.concat_tables([storage.read_parquet(f) for f in files])


def _config(**kw) -> LabelConfig:
    """A run on the Ray engine (the session's cluster), unless the test names another."""
    return LabelConfig(**{"engine": "ray", "progress": False, **kw})


# ---- end to end on S3 ----------------------------------------------------------------------

def test_label_on_s3_end_to_end(ray_cluster, bucket, small_model):
    # 320x240 frames: the job decodes them at half scale (160x120 >= the model's 64 pixels), and
    # predict on the same lazily opened files must do exactly the same
    manifests = make_dataset(f"{bucket}/data", SynthConfig(train=0, val=0, test=40, seed=11, width=320, height=240))
    model_uri = _copy_package(small_model, f"{bucket}/models/street/v1")
    summary = label(_config(manifests=[manifests["test"]], model=model_uri, output=f"{bucket}/labels/run1"))

    out = _read_output(f"{bucket}/labels/run1")
    source = storage.read_parquet(manifests["test"])
    # the schema: every manifest column unchanged and in order, then the contract's columns
    assert [(f.name, f.type) for f in out.schema] == [(f.name, f.type) for f in source.schema] + EXPECTED_ADDED
    assert out.num_rows == source.num_rows == summary["rows_in"] == summary["rows_out"] == 40
    assert summary["ok"] == 40 and summary["errors"] == 0
    assert summary["predictor"]["layout"] == "fused"      # a cluster without GPUs: one actor fetches, decodes, predicts
    out = out.sort_by("id")
    assert out.select(source.column_names).equals(source.sort_by("id").select(source.column_names))

    # probabilities: the same as the library's own predict on the same images
    model = mlbatch.load_model(model_uri)
    pictures = [Image.open(io.BytesIO(storage.read_bytes(u))) for u in out.column("image_uri").to_pylist()]
    expected = model.predict(pictures)
    got = np.stack([out.column(f"prob_{x}").to_numpy() for x in LABELS], axis=1)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # multi-hot columns follow the package's thresholds; `labels` lists the positives
    for j, x in enumerate(LABELS):
        np.testing.assert_array_equal(out.column(f"label_{x}").to_numpy(), expected[:, j] >= model.thresholds[x])
    for row in out.select(["labels"] + [f"label_{x}" for x in LABELS]).to_pylist():
        assert row["labels"] == [x for x in LABELS if row[f"label_{x}"]]
    assert set(out.column("model_version").to_pylist()) == {model.version}
    assert set(out.column("run_id").to_pylist()) == {summary["run_id"]}

    # file metadata, completion markers and the summary
    first = storage.list_files(f"{bucket}/labels/run1", suffix=".parquet")[0].uri
    fs, path = storage.filesystem(first)
    meta = json.loads(pq.read_metadata(path, filesystem=fs).metadata[b"mlbatch"])
    assert meta["labels"] == LABELS and meta["model_version"] == model.version
    assert meta["thresholds"] == pytest.approx(model.thresholds)
    assert storage.exists(f"{bucket}/labels/run1/_SUCCESS")
    written = json.loads(storage.read_text(f"{bucket}/labels/run1/_run.json"))
    assert written["rows_out"] == 40 and set(written["labels"]) == set(LABELS)
    assert 0 <= written["labels"]["car"]["positive_rate"] <= 1
    # the run's own record: its plan, and one commit marker per data file, naming that file
    from mlbatch.label.commit import PLAN_FILE, markers_dir, read_markers

    units = markers_dir(f"{bucket}/labels/run1", summary["run_id"])
    assert storage.exists(storage.join(units, PLAN_FILE))
    data = {e.uri for e in storage.list_files(f"{bucket}/labels/run1", suffix=".parquet")}
    assert len(data) >= 1 and {storage.join(f"{bucket}/labels/run1", m["data_file"]) for m in read_markers(units)} == data


def test_bad_rows_become_error_rows(ray_cluster, bucket, small_dataset, small_model):
    good = storage.read_parquet(small_dataset["test"]).slice(0, 12)
    jpeg = Path(good.column("image_uri")[0].as_py()).read_bytes()
    storage.write_bytes(f"{bucket}/img/junk.jpg", b"<html>this is not an image</html>")
    storage.write_bytes(f"{bucket}/img/truncated.jpg", jpeg[: len(jpeg) // 2])
    storage.write_bytes(f"{bucket}/img/empty.jpg", b"")
    bad = {"missing": f"{bucket}/img/nope.jpg", "junk": f"{bucket}/img/junk.jpg",
           "truncated": f"{bucket}/img/truncated.jpg", "empty": f"{bucket}/img/empty.jpg", "null": None,
           "scheme": "ftp://example.com/a.jpg"}
    rows = good.to_pylist() + [{**good.slice(0, 1).to_pylist()[0], "id": f"bad-{k}", "image_uri": v}
                               for k, v in bad.items()]
    table = pa.Table.from_pylist(rows, schema=good.schema)
    storage.write_parquet(table, f"{bucket}/manifests/mixed.parquet")

    summary = label(_config(manifests=[f"{bucket}/manifests/mixed.parquet"], model=small_model,
                            output=f"{bucket}/out", id_column="id", max_error_rate=0.5))
    out = {r["id"]: r for r in _read_output(f"{bucket}/out").to_pylist()}
    assert len(out) == 18 and summary["rows_out"] == 18 and summary["errors"] == 6
    expected = {"missing": "object not found", "junk": "not an image", "truncated": "corrupt or truncated image",
                "empty": "empty object", "null": "null or empty image URI", "scheme": "unsupported URI scheme 'ftp'"}
    for key, message in expected.items():
        row = out[f"bad-{key}"]
        assert row["status"] == "error" and message in row["error"], row
        assert row["labels"] is None and row["label_car"] is None and row["prob_bus"] is None
    for row in good.to_pylist():
        assert out[row["id"]]["status"] == "ok" and out[row["id"]]["error"] is None
        assert out[row["id"]]["prob_car"] is not None
    assert {e["error"] for e in summary["top_errors"]} >= {"object not found", "null or empty image URI"}


def test_too_many_errors_fail_the_run(ray_cluster, tmp_path, small_model):
    table = pa.table({"image_uri": [str(tmp_path / f"missing-{i}.jpg") for i in range(5)]})
    pq.write_table(table, tmp_path / "m.parquet")
    with pytest.raises(JobError, match=r"5 of 5 rows are errors \(100.0%\), above --max-error-rate 5.0%.*object not found"):
        label(_config(manifests=[str(tmp_path / "m.parquet")], model=small_model, output=str(tmp_path / "out")))
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    assert json.loads((tmp_path / "out" / "_run.json").read_text())["status"] == "failed"


def test_a_labels_truth_column_is_kept_as_input_labels(ray_cluster, tmp_path, small_dataset, small_model):
    src = storage.read_parquet(small_dataset["test"]).slice(0, 5)
    table = pa.table({"image_uri": src.column("image_uri"),
                      "labels": pa.array([["car"]] * 5, pa.list_(pa.string())), "status": ["new"] * 5})
    pq.write_table(table, tmp_path / "m.parquet")
    summary = label(_config(manifests=[str(tmp_path / "m.parquet")], model=small_model, output=str(tmp_path / "out")))
    out = _read_output(str(tmp_path / "out"))
    assert out.column_names[:3] == ["image_uri", "input_labels", "input_status"]
    assert out.column("input_labels").to_pylist() == [["car"]] * 5
    assert summary["renamed_columns"] == {"labels": "input_labels", "status": "input_status"}


def test_repeating_a_run_replaces_its_files(ray_cluster, tmp_path, small_dataset, small_model):
    config = _config(manifests=[small_dataset["val"]], model=small_model, output=str(tmp_path / "out"),
                     rows_per_unit=30)
    first = label(config)
    second = label(config)
    assert first["run_id"] == second["run_id"]
    out = _read_output(str(tmp_path / "out"))
    assert out.num_rows == 80 and len(set(out.column("id").to_pylist())) == 80


# ---- job-level faults: clear errors, no compute ---------------------------------------------

def test_job_level_faults_are_clear_errors(ray_cluster, tmp_path, small_dataset, small_model):
    out = str(tmp_path / "out")
    with pytest.raises(ManifestError, match="no such file"):
        label(_config(manifests=[str(tmp_path / "none.parquet")], model=small_model, output=out))
    with pytest.raises(JobError, match="mlbatch-model.json is missing"):
        label(_config(manifests=[small_dataset["test"]], model=str(tmp_path / "no-model"), output=out))
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(JobError, match="is not writable"):
        label(_config(manifests=[small_dataset["test"]], model=small_model, output=str(tmp_path / "file" / "out")))
    with pytest.raises(JobError, match="'truck' is not a label of the model"):
        label(_config(manifests=[small_dataset["test"]], model=small_model, output=out, thresholds={"truck": 0.5}))
    pq.write_table(pa.table({"image_uri": ["a.jpg"], "extra": [1]}), tmp_path / "other.parquet")
    with pytest.raises(ManifestError, match="columns differ.*missing 'id'"):
        label(_config(manifests=[small_dataset["test"], str(tmp_path / "other.parquet")], model=small_model, output=out))
    pq.write_table(pa.table({"image_uri": ["a.jpg", "b.jpg"], "id": ["x", "x"]}), tmp_path / "dup.parquet")
    with pytest.raises(ManifestError, match="row 1: id 'x' already appears at .* row 0"):
        label(_config(manifests=[str(tmp_path / "dup.parquet")], model=small_model, output=out, id_column="id"))


@pytest.mark.parametrize("where", ["one task", "cluster group-by"])
def test_a_repeated_id_across_files_names_both_rows(ray_cluster, tmp_path, small_model, monkeypatch, where):
    """Up to ONE_TASK_ID_CHECK_ROWS the ids are checked by one task, beyond by a group-by on the cluster:
    both name the same two rows, and neither reads an id into the driver."""
    from mlbatch.label import ids as id_check

    if where == "cluster group-by":
        monkeypatch.setattr(id_check, "ONE_TASK_ID_CHECK_ROWS", 0)
    ids = [f"id-{i}" for i in range(300)]
    pq.write_table(pa.table({"id": ids, "image_uri": ["a.jpg"] * 300}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": ["new-1", "id-123", "new-2"], "image_uri": ["b.jpg"] * 3}), tmp_path / "b.parquet")
    with pytest.raises(ManifestError, match=r"b.parquet: row 1: id 'id-123' already appears at .*a.parquet row 123; "
                                            "ids must be unique"):
        label(_config(manifests=[str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")], model=small_model,
                      output=str(tmp_path / "out"), id_column="id", rows_per_unit=100))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.parquet"))


def test_unwritable_s3_output_fails_before_compute(ray_cluster, small_dataset, small_model, s3_endpoint):
    started = time.monotonic()
    with pytest.raises(JobError, match="s3://no-such-bucket-here/out is not writable"):
        label(_config(manifests=[small_dataset["test"]], model=small_model, output="s3://no-such-bucket-here/out"))
    assert time.monotonic() - started < 60


# ---- the command line, ray job submit, kill and resume --------------------------------------

def _cli_env(ray_cluster) -> dict:
    return {**os.environ, **ray_cluster.env, "PYTHONUNBUFFERED": "1"}


def test_ray_job_submit_runs_the_entrypoint(ray_cluster, tmp_path, small_dataset, small_model):
    out = tmp_path / "submitted"
    cmd = [*RAY, "job", "submit", "--address", ray_cluster.dashboard_url, "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps({"excludes": [".git", "*.egg-info"]}), "--",
           "python", "jobs/label_images.py", "--manifest", small_dataset["test"], "--model", small_model,
           "--output", str(out), "--id-column", "id"]
    result = subprocess.run(cmd, env=_cli_env(ray_cluster), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    assert "rows in 60, out 60: 60 ok, 0 errors" in result.stdout
    assert (out / "_SUCCESS").exists()
    assert _read_output(str(out)).num_rows == 60


def test_ray_job_submit_needs_the_token(ray_cluster, tmp_path):
    env = {k: v for k, v in _cli_env(ray_cluster).items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    result = subprocess.run([*RAY, "job", "list", "--address", ray_cluster.dashboard_url], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "token authentication is enabled" in (result.stdout + result.stderr).lower()


def _settled_rows(out, quiet: float = 3.0, limit: float = 60.0) -> int:
    """The output's rows once no file has come for ``quiet`` seconds. A killed driver's actors can still
    commit a unit before Ray ends them (a resume drops such a late copy: test_exactly_once)."""
    deadline, seen, since = time.monotonic() + limit, None, time.monotonic()
    while time.monotonic() < deadline:
        now = sorted(p.name for p in out.rglob("*") if p.is_file())
        if now != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return _read_output(str(out)).num_rows
        time.sleep(0.2)
    raise AssertionError(f"the output of a killed run still changed after {limit:.0f} s")


def test_killed_run_resumes_with_every_row_exactly_once(ray_cluster, tmp_path, small_model):
    data = make_dataset(str(tmp_path / "data"), SynthConfig(train=0, val=0, test=400, seed=21))
    out = tmp_path / "out"
    args = [sys.executable, "-m", "mlbatch.cli", "label", "--manifest", data["test"], "--model", small_model,
            "--output", str(out), "--id-column", "id", "--batch-size", "8", "--rows-per-unit", "16"]
    proc = subprocess.Popen(args, env=_cli_env(ray_cluster), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while len(list(out.glob("*.parquet"))) < 3:
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stdout.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "no output files appeared"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = _settled_rows(out)
    assert 0 < partial < 400 and not (out / "_SUCCESS").exists()
    # its committed units were decoded by PIL: a resume that would decode the rest otherwise is refused, keeping them
    other = subprocess.run(args + ["--resume", "--decode", "torchvision"], env=_cli_env(ray_cluster),
                           capture_output=True, text=True, timeout=300)
    assert other.returncode == 1 and "--rows-per-unit or --decode are not those it started with" in other.stderr
    assert _read_output(str(out)).num_rows == partial

    resumed = subprocess.run(args + ["--resume"], env=_cli_env(ray_cluster), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    table = _read_output(str(out))
    ids = table.column("id").to_pylist()
    assert len(ids) == 400 and len(set(ids)) == 400
    summary = json.loads((out / "_run.json").read_text())
    assert summary["rows_out"] == 400 and summary["attempts"] == 2

    # the same labels as one clean run
    clean = label(_config(manifests=[data["test"]], model=small_model, output=str(tmp_path / "clean")))
    assert clean["rows_out"] == 400
    a = table.sort_by("id").select(["id", "prob_car", "prob_bus", "prob_pedestrian", "labels"])
    b = _read_output(str(tmp_path / "clean")).sort_by("id").select(a.column_names)
    assert a.column("labels").equals(b.column("labels"))
    for name in ("prob_car", "prob_bus", "prob_pedestrian"):
        np.testing.assert_allclose(a.column(name).to_numpy(), b.column(name).to_numpy(), atol=1e-5)
    # resuming a complete run does nothing
    again = subprocess.run(args + ["--resume"], env=_cli_env(ray_cluster), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and _read_output(str(out)).num_rows == 400


def test_repeated_uris_without_ids_killed_and_resumed_every_row_once(ray_cluster, tmp_path, small_model):
    """Every image listed twice, across two manifests, no id column: each row is labeled once, by its position."""
    data = make_dataset(str(tmp_path / "data"), SynthConfig(train=0, val=0, test=100, seed=23))
    src = storage.read_parquet(data["test"]).select(["image_uri"])
    twice = pa.concat_tables([src, src.slice(50), src.slice(0, 50)])
    (tmp_path / "in").mkdir()
    pq.write_table(twice.slice(0, 120), tmp_path / "in" / "a.parquet")
    pq.write_table(twice.slice(120), tmp_path / "in" / "b.parquet")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "mlbatch.cli", "label", "--manifest", str(tmp_path / "in"), "--model", small_model,
            "--output", str(out), "--batch-size", "8", "--rows-per-unit", "16", "--concurrency", "1"]
    kill_when(args, _cli_env(ray_cluster), lambda: len(list(out.glob("*.parquet"))) >= 3)
    assert 0 < _read_output(str(out)).num_rows < 200 and not (out / "_SUCCESS").exists()

    resumed = subprocess.run(args + ["--resume"], env=_cli_env(ray_cluster), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "rows in 200, out 200: 200 ok" in resumed.stdout
    table = _read_output(str(out))
    a, b = str(tmp_path / "in" / "a.parquet"), str(tmp_path / "in" / "b.parquet")
    where = sorted(zip(table.column("source_manifest").to_pylist(), table.column("source_row").to_pylist()))
    assert where == sorted([(a, i) for i in range(120)] + [(b, i) for i in range(80)])  # every row exactly once
    # each row carries its own manifest row's URI, and an image listed twice gets the same labels twice
    by_place = {(r["source_manifest"], r["source_row"]): r for r in table.to_pylist()}
    listed = twice.column("image_uri").to_pylist()
    for (m, i), row in by_place.items():
        assert row["image_uri"] == listed[i if m == a else 120 + i]
    probs: dict[str, set] = {}
    for row in by_place.values():
        probs.setdefault(row["image_uri"], set()).add(round(row["prob_car"], 5))
    assert len(probs) == 100 and all(len(v) == 1 for v in probs.values())
    assert json.loads((out / "_run.json").read_text())["attempts"] == 2


GPU_SCRIPT = """
import json, logging, socket, sys
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
import ray
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
ray.init(num_cpus=3, num_gpus=2, include_dashboard=True, dashboard_port=port, logging_level="WARNING")
from ray.util.state import list_actors
from mlbatch.label import LabelConfig, label
summary = label(LabelConfig(manifests=[sys.argv[1]], model=sys.argv[2], output=sys.argv[3], num_gpus=1,
                            concurrency=2, progress=False))
actors = [a for a in list_actors(address=f"http://127.0.0.1:{port}", detail=True, limit=1000)
          if "Predictor" in a.class_name]
print("ACTORS " + json.dumps([a.required_resources for a in actors]))
print("SUMMARY " + json.dumps(summary["predictor"]))
from mlbatch.label import JobError
try:
    label(LabelConfig(manifests=[sys.argv[1]], model=sys.argv[2], output=sys.argv[3] + "-required", num_gpus=1,
                      require_cuda=True, progress=False))
except JobError as exc:
    print("REQUIRED " + json.dumps(str(exc)))
"""


def test_gpu_actors_without_cuda_run_on_cpu_with_one_warning(tmp_path, small_dataset, small_model):
    """A separate local Ray instance that declares two logical GPUs (the session cluster has none): the
    layout chosen is split (decode tasks feed predictors that hold GPUs); without GPUs it is fused. With
    ``--require-cuda`` the same GPUs end the run before anything is written, naming the torch build."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(RAY_AUTH_MODE="disabled", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    result = subprocess.run([sys.executable, "-c", GPU_SCRIPT, small_dataset["test"], small_model,
                             str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    actors = json.loads(result.stdout.split("ACTORS ", 1)[1].splitlines()[0])
    assert len(actors) == 2 and all(a.get("GPU") == 1.0 for a in actors)
    predictor = json.loads(result.stdout.split("SUMMARY ", 1)[1].splitlines()[0])
    assert predictor["num_gpus"] == 1 and predictor["device"].startswith("cpu") and predictor["layout"] == "split"
    warnings = [line for line in result.stderr.splitlines() if "but CUDA is not usable there" in line]
    assert len(warnings) == 1, result.stderr[-3000:]
    assert _read_output(str(tmp_path / "out")).num_rows == 60
    required = json.loads(result.stdout.split("REQUIRED ", 1)[1].splitlines()[0])
    assert required.startswith("--require-cuda: a task given GPUs") and "is built for CUDA" in required
    assert not os.path.exists(str(tmp_path / "out-required" / "_units"))


def test_the_driver_keeps_no_per_block_statistics(ray_cluster, tmp_path, small_dataset, small_model, monkeypatch):
    """Ray Data keeps a BlockStats per output block per operator in the driver (several GB at a
    billion rows); the job drops them as results come in, so the count stays flat as the run goes."""
    import gc

    from ray.data.block import BlockStats

    from mlbatch.label import pipeline

    alive, stream = [], pipeline._stream

    def counting(ds, run):
        for item in stream(ds, run):
            yield item
            gc.collect()
            alive.append(sum(isinstance(o, BlockStats) for o in gc.get_objects()))

    monkeypatch.setattr(pipeline, "_stream", counting)
    # 2-row batches make 8-row blocks: each stage outputs 30 blocks, 5 per unit of 40 rows
    summary = label(LabelConfig(manifests=[small_dataset["train"]], model=small_model, output=str(tmp_path / "out"),
                                batch_size=2, rows_per_unit=40, progress=False))
    assert summary["units"] == 6 and len(alive) >= 3   # one count per block of commits the write stage returns
    # kept, the count grows with every unit (to 3-4 stages x 30 blocks); dropped, it does not
    assert alive[-1] <= alive[1] and alive[-1] < 30, alive
