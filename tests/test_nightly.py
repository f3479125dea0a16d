"""Nightly runs on the real Ray cluster (tests/conftest.py) with moto's S3 server: several simulated nights.

The nights share one output, so the S3 scenario is one test in sections; smaller tests cover
local inputs, failures and argument checks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from mlbatch.core import storage
from mlbatch.cli import main
from mlbatch.model.loaded import load_model
from mlbatch.model.net import save_package
from mlbatch.nightly import DriftError, NightlyConfig, NightlyError, nightly
from mlbatch.nightly.config import check_date
from mlbatch.nightly.report import nightly_table
from mlbatch.nightly.state import load_state
from mlbatch.review.views import query
from mlbatch.synth import SynthConfig, make_dataset
from runs import TUNING

REPO = Path(__file__).resolve().parents[1]
LABELS = ["car", "bus", "pedestrian"]
D1, D2, D3, D4, D5, D6 = (f"2025-03-0{i}" for i in range(1, 7))


def _config(input_uri: str, model: str, output: str, day: str, **kw) -> NightlyConfig:
    return NightlyConfig(input=input_uri, model=model, output=output, date=day, **{**TUNING, **kw})


def _copy_package(src: str, dst: str) -> str:
    for name in ("model.safetensors", "mlbatch-model.json"):
        storage.write_bytes(storage.join(dst, name), storage.read_bytes(storage.join(src, name)))
    return dst


def _new_version(src: str, dst: str) -> str:
    """The same network with one head nudged: a new model version."""
    import torch

    model = load_model(src)
    with torch.no_grad():
        model.net.heads[0].bias.add_(0.25)
    save_package(model.net, dst, model.thresholds, name=model.name)
    return dst


def _write_manifest(rows: list[dict], uri: str, schema: pa.Schema) -> list[str]:
    storage.write_parquet(pa.Table.from_pylist(rows, schema=schema), uri)
    return [r["id"] for r in rows]


def _labeled(output: str) -> list[dict]:
    return query(output, "SELECT CAST(dt AS VARCHAR) AS dt, id, run_id, model_version, status, source_manifest "
                         "FROM labels").to_pylist()


def _pool(runs: list[dict], label: str, metric: str) -> float:
    pairs = [(r["labels"][label][metric], r["ok"]) for r in runs]
    return sum(v * w for v, w in pairs) / sum(w for _, w in pairs)


def test_nights_on_s3(ray_cluster, bucket, small_model, tmp_path, capsys):
    src = make_dataset(f"{bucket}/src", SynthConfig(train=0, val=0, test=105, seed=5))["test"]
    pool = storage.read_parquet(src)
    schema = pool.schema
    rows = pool.to_pylist()
    v1 = _copy_package(small_model, f"{bucket}/models/v1")
    version1 = load_model(v1).version
    incoming, out = f"{bucket}/incoming", f"{bucket}/labels"
    expected: dict[str, list[str]] = {}  # manifest -> its ids now

    def put(name: str, part: list[dict]) -> str:
        uri = f"{incoming}/{name}.parquet"
        expected[uri] = _write_manifest(part, uri, schema)
        return uri

    # ---- night 1: two new manifests -------------------------------------------------------
    a = put("2025-03-01/cam-a", rows[0:12])
    b = put("2025-03-01/cam-b", rows[12:24])
    s1 = nightly(_config(incoming, v1, out, D1))
    assert s1["status"] == "complete" and s1["manifests_found"] == 2
    assert [(x["manifest"], x["reason"], x["rows"], x["dt"]) for x in s1["labeled"]] == [(a, "new", 12, D1),
                                                                                          (b, "new", 12, D1)]
    assert s1["drift"]["status"] == "no-history" and s1["night"]["rows"] == 24
    files1 = sorted(e.uri for e in storage.list_files(out))
    assert all(f.startswith(f"{out}/dt={D1}/") for f in files1)

    # the same night again: nothing new, the same report of the night
    again = nightly(_config(incoming, v1, out, D1))
    assert again["labeled"] == [] and again["unchanged"] == 2 and again["night"] == s1["night"]
    assert sorted(e.uri for e in storage.list_files(out)) == files1
    assert len(load_state(out)["runs"]) == 2

    # ---- night 2: a new manifest, and cam-a rewritten (6 rows kept, 10 new) ------------------
    old_a_run = load_state(out)["manifests"][a][version1]["run_id"]
    c = put("2025-03-02/cam-c", rows[24:36])
    put("2025-03-01/cam-a", rows[0:6] + rows[36:46])
    s2 = nightly(_config(incoming, v1, out, D2))
    by = {x["manifest"]: x for x in s2["labeled"]}
    assert set(by) == {a, c} and by[c]["reason"] == "new"
    assert by[a]["reason"] == "changed" and by[a]["replaced_run"] == old_a_run and by[a]["removed_files"] >= 1
    # night 1 was one run of both manifests: cam-a's rows of it are gone, cam-b's stay
    assert s1["labeled"][0]["run_id"] == s1["labeled"][1]["run_id"] == old_a_run
    rows_now = _labeled(out)
    assert not [r for r in rows_now if r["run_id"] == old_a_run and r["source_manifest"] == a]
    assert len([r for r in rows_now if r["run_id"] == old_a_run and r["source_manifest"] == b]) == 12
    assert s2["drift"]["compared_with"] == [D1] and s2["drift"]["status"] in ("ok", "drift")

    # ---- night 3: a run killed part way (a long manifest: 100 units), resumed by the next attempt ----
    long = [dict(r, id=f"{r['id']}-{k}") for k in range(20) for r in rows[46:66]]   # 400 rows, each image 20 times
    d = put("2025-03-03/cam-d", long)
    cmd = [sys.executable, "jobs/nightly.py", "--input", incoming, "--model", v1, "--output", out, "--date", D3,
           "--batch-size", "4", "--rows-per-unit", "4", "--concurrency", "1", "--engine", "ray"]
    env = {**os.environ, **ray_cluster.env, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not storage.list_files(f"{out}/dt={D3}", suffix=".parquet"):
            assert proc.poll() is None, f"the run ended before it was killed: {proc.stdout.read().decode()[-3000:]}"
            assert time.monotonic() < deadline, "no output files appeared"
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    partial = storage.list_files(f"{out}/dt={D3}", suffix=".parquet")
    assert partial and d not in load_state(out)["manifests"]
    e = put("2025-03-03/cam-e", rows[70:81])          # arrives later that night
    s3 = nightly(_config(incoming, v1, out, D3))
    by = {x["manifest"]: x for x in s3["labeled"]}
    assert set(by) == {d, e} and s3["unchanged"] == 3
    assert by[d]["resumed"] and by[d]["attempts"] == 2 and by[d]["rows"] == 400 and by[d]["errors"] == 0
    assert not by[e]["resumed"]

    # drift history: the trailing nights pooled from the recorded runs; tonight from the partition itself
    state = load_state(out)
    drift = s3["drift"]
    assert drift["compared_with"] == [D1, D2] and [h["date"] for h in drift["history"]] == [D1, D2]
    trailing_runs = [r for r in state["runs"] if r["dt"] in (D1, D2)]
    assert len(trailing_runs) == 4  # cam-a's first run stays in the history as observed
    tonight = query(out, f"SELECT avg(label_car::INT) AS car, avg(label_bus::INT) AS bus, "
                         f"avg(label_pedestrian::INT) AS pedestrian, avg(prob_car) AS p_car, avg(prob_bus) AS p_bus, "
                         f"avg(prob_pedestrian) AS p_pedestrian, count(*) AS n FROM labels "
                         f"WHERE dt = DATE '{D3}' AND status = 'ok'").to_pylist()[0]
    assert tonight["n"] == s3["night"]["ok"] == 400 + 11
    for x in LABELS:
        entry = drift["labels"][x]
        assert entry["positive_rate"]["tonight"] == pytest.approx(tonight[x], abs=1e-5)
        assert entry["mean_probability"]["tonight"] == pytest.approx(tonight[f"p_{x}"], abs=1e-5)
        for metric in ("positive_rate", "mean_probability"):
            assert entry[metric]["trailing"] == pytest.approx(_pool(trailing_runs, x, metric), abs=1e-5)
            diff = entry[metric]["tonight"] - entry[metric]["trailing"]
            assert entry[metric]["difference"] == pytest.approx(diff, abs=1e-5)
            assert entry[metric]["drifted"] == (abs(entry[metric]["difference"]) > 0.1)
    largest = max(abs(v["difference"]) for x in LABELS for v in drift["labels"][x].values())

    # the same night through the command line: nothing new; --fail-on-drift against the bound
    argv = ["nightly", "--input", incoming, "--model", v1, "--output", out, "--date", D3, "--fail-on-drift",
            "--concurrency", "1"]
    capsys.readouterr()
    assert main([*argv, "--drift-bound", f"{largest + 0.001:.6f}"]) == 0
    printed = capsys.readouterr().out
    assert f"nightly {D3}: complete" in printed and "0 labeled, 5 already labeled" in printed
    assert largest > 1e-4                   # a bound just under the largest difference is crossed: exit 3
    assert main([*argv, "--drift-bound", f"{largest * 0.9:.6f}"]) == 3

    # ---- night 4: a deliberately shifted night (thresholds pushed to the other extreme) -----------
    f = put("2025-03-04/cam-f", rows[81:93])
    rates = {x: drift["labels"][x]["positive_rate"]["trailing"] for x in LABELS}
    shift = [f"{x}={0.0 if rates[x] < 0.5 else 1.0}" for x in LABELS]
    capsys.readouterr()
    code = main(["nightly", "--input", incoming, "--model", v1, "--output", out, "--date", D4, "--fail-on-drift",
                 "--concurrency", "1", *[arg for t in shift for arg in ("--threshold", t)]])
    captured = capsys.readouterr()
    assert code == 3, captured.out + captured.err
    assert "drift (drift)" in captured.out and "mlbatch nightly: error: nightly 2025-03-04: drift" in captured.err
    s4 = json.loads(storage.read_text(f"{out}/dt={D4}/_run.json"))
    assert s4 == json.loads(storage.read_text(f"{out}/_nightly/runs/{D4}.json"))
    assert s4["drift"]["status"] == "drift" and s4["drift"]["compared_with"] == [D1, D2, D3]
    assert {(x["label"], x["metric"]) for x in s4["drift"]["drifted"]} >= {(x, "positive_rate") for x in LABELS}
    assert [x["manifest"] for x in s4["labeled"]] == [f]  # the night's rows are kept and recorded
    with pytest.raises(DriftError) as raised:             # the library says the same
        nightly(_config(incoming, v1, out, D4, fail_on_drift=True, drift_window=1))
    assert raised.value.summary["drift"]["compared_with"] == [D3] and raised.value.summary["labeled"] == []

    # ---- end state of model version 1: every manifest row exactly once, in its night's partition ---
    state = load_state(out)
    want_dt = {a: D2, b: D1, c: D2, d: D3, e: D3, f: D4}
    got = _labeled(out)
    assert len(got) == sum(len(ids) for ids in expected.values())
    for m, ids in expected.items():
        mine = [r for r in got if r["source_manifest"] == m]
        assert sorted(r["id"] for r in mine) == sorted(ids), m
        assert {r["dt"] for r in mine} == {want_dt[m]} and {r["model_version"] for r in mine} == {version1}
        rec = state["manifests"][m][version1]
        assert rec["dt"] == want_dt[m] and rec["rows"] == len(ids)
    assert [(r["manifest"], r["dt"], r.get("superseded_by") is not None) for r in state["runs"]] == [
        (a, D1, True), (b, D1, False), (a, D2, False), (c, D2, False), (d, D3, False), (e, D3, False), (f, D4, False)]
    assert state["runs"][2]["replaces"] == state["runs"][0]["run_id"] == old_a_run

    # ---- a new model version: new manifests only, then everything with --relabel ----------------
    v2 = _new_version(v1, f"{bucket}/models/v2")
    version2 = load_model(v2).version
    assert version2 != version1
    g = put("2025-03-05/cam-g", rows[93:105])
    s5 = nightly(_config(incoming, v2, out, D5))
    assert [x["manifest"] for x in s5["labeled"]] == [g]
    assert s5["older_version"]["count"] == 6 and s5["drift"]["status"] == "no-history"
    assert "6 manifests were labeled by an older model version and are left alone" in nightly_table(s5)
    s6 = nightly(_config(incoming, v2, out, D6, relabel=True))
    assert sorted(x["manifest"] for x in s6["labeled"]) == sorted([a, b, c, d, e, f])
    assert {x["reason"] for x in s6["labeled"]} == {"relabel"} and s6["drift"]["compared_with"] == [D5]
    assert nightly(_config(incoming, v2, out, D6, relabel=True))["labeled"] == []

    got = _labeled(out)
    state = load_state(out)
    for version, dts in ((version1, want_dt), (version2, {m: D6 for m in expected} | {g: D5})):
        rows_v = [r for r in got if r["model_version"] == version]
        labeled = {m: ids for m, ids in expected.items() if m in dts}
        assert len(rows_v) == sum(len(ids) for ids in labeled.values())
        for m, ids in labeled.items():
            mine = [r for r in rows_v if r["source_manifest"] == m]
            assert sorted(r["id"] for r in mine) == sorted(ids) and {r["dt"] for r in mine} == {dts[m]}
    assert all(r["status"] == "ok" for r in got)


def test_local_input_changes_and_failures(tmp_path, small_dataset, small_model):
    rows = storage.read_parquet(small_dataset["test"]).slice(0, 20)
    inp, out = tmp_path / "in", str(tmp_path / "out")
    inp.mkdir()
    storage.write_parquet(rows.slice(0, 10), str(inp / "one.parquet"))
    (inp / "broken.parquet").write_bytes(b"not parquet")
    (inp / "_uploading.parquet").write_bytes(b"ignored: underscore files are not manifests")

    with pytest.raises(NightlyError, match="1 of 2 manifests could not be labeled.*broken.parquet") as raised:
        nightly(_config(str(inp), small_model, out, D1))
    s1 = raised.value.summary
    assert s1["status"] == "failed" and [x["rows"] for x in s1["labeled"]] == [10]
    assert s1["failed"][0]["manifest"].endswith("broken.parquet")
    state = load_state(out)
    assert list(state["manifests"]) == [str(inp / "one.parquet")]
    # the failed run left nothing behind: only the good run's folder and the night's summary
    assert sorted(os.listdir(os.path.join(out, "_nightly", "runs"))) == sorted([f"{D1}.json", state["runs"][0]["run_id"]])

    # touching a manifest is no change (its MD5 is the same); rewriting it is
    (inp / "broken.parquet").unlink()
    os.utime(inp / "one.parquet", ns=(1, 1))
    assert nightly(_config(str(inp), small_model, out, D2))["labeled"] == []
    first = state["runs"][0]["run_id"]
    storage.write_parquet(rows.slice(5, 15), str(inp / "one.parquet"))
    s3 = nightly(_config(str(inp), small_model, out, D3))
    assert [(x["reason"], x["replaced_run"]) for x in s3["labeled"]] == [("changed", first)]
    got = query(out, "SELECT CAST(dt AS VARCHAR) AS dt, id FROM labels ORDER BY id").to_pylist()
    assert [r["id"] for r in got] == rows.slice(5, 15).column("id").to_pylist() and {r["dt"] for r in got} == {D3}
    assert not any(p.name.startswith(first) for p in Path(out).rglob("*"))


@pytest.mark.parametrize("bad", ["2025-1-01", "2025-02-30", "../../etc", "2025-01-01/../x", "2025-01-01 ",
                                 "٢٠٢٥-٠١-٠١", "", "20250101"])
def test_bad_dates_are_rejected(bad, tmp_path, capsys):
    with pytest.raises(ValueError, match="--date"):
        check_date(bad)
    with pytest.raises(ValueError, match="--date"):
        nightly(NightlyConfig(input=str(tmp_path), model=str(tmp_path / "m"), output=str(tmp_path / "out"), date=bad))
    code = main(["nightly", "--input", str(tmp_path), "--model", "m", "--output", str(tmp_path / "out"), "--date", bad])
    assert code == 2 and "--date" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_good_dates_and_other_arguments(tmp_path):
    assert check_date("2024-02-29") == "2024-02-29"
    assert len(check_date(None)) == 10
    for kw, match in (({"drift_window": 0}, "--drift-window"), ({"drift_bound": -0.1}, "--drift-bound")):
        with pytest.raises(ValueError, match=match):
            nightly(NightlyConfig(input=str(tmp_path), model="m", output=str(tmp_path / "o"), **kw))


def test_a_night_of_many_manifests_is_one_run_with_exact_bookkeeping(tmp_path, small_dataset, small_model):
    """Twelve manifests, one run; the next night one changed, one broken, one mostly missing images and three
    new: one run again, each manifest recorded (or failed) on its own, every row once."""
    rows = storage.read_parquet(small_dataset["test"])
    inp, out = tmp_path / "in", str(tmp_path / "out")
    inp.mkdir()
    want: dict[str, list[str]] = {}

    def put(name: str, part: pa.Table) -> str:
        uri = str(inp / f"{name}.parquet")
        storage.write_parquet(part, uri)
        want[uri] = part.column("id").to_pylist()
        return uri

    for k in range(12):
        put(f"cam-{k:02d}", rows.slice(3 * k, 3))
    s1 = nightly(_config(str(inp), small_model, out, D1))
    assert len(s1["labeled"]) == 12 and len({x["run_id"] for x in s1["labeled"]}) == 1
    first_run = s1["labeled"][0]["run_id"]
    assert [x["rows"] for x in s1["labeled"]] == [3] * 12 and s1["night"]["rows"] == 36

    changed = put("cam-03", rows.slice(40, 4))
    (inp / "broken.parquet").write_bytes(b"not parquet")
    missing = rows.slice(50, 4).set_column(rows.schema.get_field_index("image_uri"), "image_uri",
                                           pa.array([str(tmp_path / f"gone-{i}.jpg") for i in range(4)]))
    storage.write_parquet(missing, str(inp / "lost.parquet"))
    new = [put(f"new-{k}", rows.slice(36 + k, 1)) for k in range(3)]
    with pytest.raises(NightlyError, match="2 of 6 manifests could not be labeled") as raised:
        nightly(_config(str(inp), small_model, out, D2))
    s2 = raised.value.summary
    by = {x["manifest"]: x for x in s2["labeled"]}
    assert set(by) == {changed, *new} and len({x["run_id"] for x in s2["labeled"]}) == 1
    assert by[changed]["reason"] == "changed" and by[changed]["replaced_run"] == first_run
    assert by[changed]["removed_files"] >= 1 and by[changed]["rows"] == 4
    errors = {Path(f["manifest"]).name: f["error"] for f in s2["failed"]}
    assert "not a readable Parquet file" in errors["broken.parquet"]
    assert "4 of 4 rows are errors" in errors["lost.parquet"]

    state = load_state(out)
    assert sorted(state["manifests"]) == sorted(want)          # neither failed manifest is recorded
    got = query(out, "SELECT CAST(dt AS VARCHAR) AS dt, id, source_manifest FROM labels").to_pylist()
    assert len(got) == sum(len(v) for v in want.values())      # the lost manifest's rows were removed
    for uri, ids in want.items():
        mine = [r for r in got if r["source_manifest"] == uri]
        assert sorted(r["id"] for r in mine) == sorted(ids), uri
        assert {r["dt"] for r in mine} == {D2 if uri in (changed, *new) else D1}
    assert all(by[u]["rows"] == 1 for u in new) and s2["night"]["rows"] == 7

    # the next night: the failed manifests, now fixed, are labeled; nothing else is
    (inp / "broken.parquet").unlink()
    storage.write_parquet(rows.slice(50, 4), str(inp / "lost.parquet"))
    s3 = nightly(_config(str(inp), small_model, out, D3))
    assert [Path(x["manifest"]).name for x in s3["labeled"]] == ["lost.parquet"] and s3["status"] == "complete"
    assert query(out, "SELECT count(*) AS n FROM labels").to_pylist()[0]["n"] == len(got) + 4
