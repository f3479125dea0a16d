"""What grows in the driver as runs grow: planning, a full run, and a night of many manifests.

    python -m benchmarks.scale plan [--rows 1000000 10000000]
    python -m benchmarks.scale run [--rows 20000 200000]
    python -m benchmarks.scale nightly [--manifests 200 --rows-each 50 --single 10000]

plan     the driver's planning (``job._plan``: footers, units, package) over manifests of N rows in
         100 files, in a fresh process: its wall time and the peak PSS of that process alone.
         ``--rows-per-unit 100`` at 10M rows plans 100,000 units: as many as 1 billion rows at 10,000.
run      ``mlbatch label`` end to end on N rows of tiny images (32x24 JPEG frames, cycled, a 16-pixel
         model: the driver is what is measured, not the images), on a Ray instance already running:
         the wall time and the peak PSS of the driver process alone, overall and up to each tenth of
         the run (Ray's workers are not the driver; ``throughput.py`` measures the whole tree).
nightly  ``mlbatch nightly`` over M manifests of K rows against one manifest of M x K rows: wall time.

Each prints one JSON line per measurement; benchmarks/NOTES.md keeps the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .throughput import PeakPSS, make_frames, make_package

PLAN_CHILD = """
import json, os, sys, threading, time
def _pss_kib(pid):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
peak = [0]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], _pss_kib(os.getpid()))
        stop.wait(0.05)
threading.Thread(target=sample, daemon=True).start()
time.sleep(0.2)
before = _pss_kib(os.getpid())
from mlbatch.label.config import LabelConfig
from mlbatch.label.plan import make_plan as _plan
start = time.perf_counter()
plan = _plan(LabelConfig(manifests=[sys.argv[1]], model=sys.argv[2], output=sys.argv[3], id_column="id",
                         rows_per_unit=int(sys.argv[4])))
seconds = time.perf_counter() - start
stop.set()
peak[0] = max(peak[0], _pss_kib(os.getpid()))
print(json.dumps({"rows": plan.rows_in, "files": len(plan.manifests), "units": len(plan.units),
                  "plan_seconds": round(seconds, 3), "peak_pss_mib": round(peak[0] / 1024, 1),
                  "pss_at_start_mib": round(before / 1024, 1)}))
"""


def make_manifests(root: str, rows: int, files: int = 100) -> str:
    """``files`` manifests of rows/files rows each: an id and an S3-like image URI per row."""
    folder = os.path.join(root, f"manifests-{rows}")
    if os.path.exists(folder):
        return folder
    os.makedirs(folder)
    each = rows // files
    for f in range(files):
        base = f * each
        n = np.arange(base, base + each)
        ids = pa.array(np.char.add("row-", n.astype(str)))
        uris = pa.array(np.char.add(np.char.add("s3://bucket/images/", n.astype(str)), ".jpg"))
        pq.write_table(pa.table({"id": ids, "image_uri": uris}), os.path.join(folder, f"part-{f:05d}.parquet"))
    return folder


def bench_plan(work: str, rows: int, model: str, rows_per_unit: int = 10_000) -> dict:
    folder = make_manifests(work, rows)
    out = subprocess.run([sys.executable, "-c", PLAN_CHILD, folder, model, os.path.join(work, "out"),
                          str(rows_per_unit)],
                         capture_output=True, text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    return {"measure": "plan", **json.loads(out.stdout.strip().splitlines()[-1])}


class RayHead:
    """``ray start --head --block`` in its own process group and temp dir, ended by signalling that group."""

    def __enter__(self) -> str:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        self.temp_dir = f"/tmp/mlbatch-scale-ray-{os.getpid()}"
        self.head = subprocess.Popen(["ray", "start", "--head", "--block", f"--port={port}",
                                      f"--num-cpus={os.cpu_count()}", "--include-dashboard=false",
                                      "--disable-usage-stats", f"--temp-dir={self.temp_dir}"],
                                     env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        probe = f"import ray; ray.init(address={self.address!r}, logging_level='ERROR'); ray.shutdown()"
        deadline = time.monotonic() + 90
        while subprocess.run([sys.executable, "-c", probe], env=self.env, capture_output=True).returncode != 0:
            if self.head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ray start --head did not come up")
            time.sleep(1)
        return self.address

    def __exit__(self, *exc) -> None:
        os.killpg(self.head.pid, signal.SIGTERM)
        try:
            self.head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.head.pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _driver(cmd: list[str], address: str) -> tuple[float, float, str, list[float]]:
    """Run a CLI command as a driver of the running instance: wall seconds, the driver's own peak PSS,
    its output, and its PSS at each tenth of the run (is it still growing at the end?)."""
    env = {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    samples: list[tuple[float, float]] = []
    with PeakPSS(proc.pid, samples) as mem:   # a tree of one: the driver starts no processes on a running instance
        output, _ = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode not in (0,):
        raise RuntimeError(f"{cmd[3]} failed:\n{output.decode()[-3000:]}")
    tenths = [max((m for t, m in samples if t <= seconds * k / 10), default=0.0) for k in range(1, 11)]
    return seconds, mem.peak, output.decode(), [round(m, 1) for m in tenths]


def bench_run(work: str, rows: int, model: str, address: str) -> dict:
    """``mlbatch label`` on ``rows`` tiny frames with a 16-pixel model: what is measured is the driver,
    so the images are made cheap to decode and predict (a 200,000-row run takes ~3 minutes here)."""
    manifest = make_frames(os.path.join(work, "tiny-frames"), rows, 32, 24)
    out = os.path.join(work, f"run-{rows}")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "mlbatch.cli", "label", "--manifest", manifest, "--model", model, "--output", out]
    seconds, peak, _, tenths = _driver(cmd, address)
    summary = json.load(open(os.path.join(out, "_run.json")))
    return {"measure": "run", "rows": summary["rows_out"], "wall_seconds": round(seconds, 1),
            "driver_peak_pss_mib": round(peak, 1), "driver_peak_pss_by_tenth_mib": tenths,
            "units": summary["units"], "files": summary["files"]}


def bench_nightly(work: str, manifests: int, rows_each: int, single: int, model: str, address: str) -> list[dict]:
    frames = make_frames(os.path.join(work, "frames"), max(single, manifests * rows_each), 128, 96)
    table = pq.read_table(frames)
    results = []
    for name, parts in (("many", manifests), ("one", 1)):
        inp, out = os.path.join(work, f"night-{name}-in"), os.path.join(work, f"night-{name}-out")
        shutil.rmtree(inp, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(inp)
        each = rows_each if parts > 1 else single
        for k in range(parts):
            pq.write_table(table.slice(k * each, each), os.path.join(inp, f"cam-{k:04d}.parquet"))
        cmd = [sys.executable, "-m", "mlbatch.cli", "nightly", "--input", inp, "--model", model, "--output", out,
               "--date", "2026-11-24"]
        seconds, peak, _, _ = _driver(cmd, address)
        summary = json.load(open(os.path.join(out, "_nightly", "runs", "2026-11-24.json")))
        results.append({"measure": "nightly", "manifests": parts, "rows": summary["night"]["rows"],
                        "runs": len({x["run_id"] for x in summary["labeled"]}), "wall_seconds": round(seconds, 1),
                        "driver_peak_pss_mib": round(peak, 1)})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["plan", "run", "nightly"])
    parser.add_argument("--rows", type=int, nargs="+", default=None)
    parser.add_argument("--manifests", type=int, default=200)
    parser.add_argument("--rows-each", type=int, default=50)
    parser.add_argument("--single", type=int, default=10_000)
    parser.add_argument("--rows-per-unit", type=int, default=10_000, help="plan: the unit size")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mlbatch-scale"))
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    model = make_package(os.path.join(args.workdir, "model"), ["car", "bus", "pedestrian"])
    if args.what == "plan":
        for rows in args.rows or [1_000_000, 10_000_000]:
            print(json.dumps(bench_plan(args.workdir, rows, model, args.rows_per_unit)), flush=True)
        return
    with RayHead() as address:
        if args.what == "run":
            tiny = make_package(os.path.join(args.workdir, "model-16px"), ["car", "bus", "pedestrian"], image_size=16)
            for rows in args.rows or [20_000, 200_000]:
                print(json.dumps(bench_run(args.workdir, rows, tiny, address)), flush=True)
        else:
            for r in bench_nightly(args.workdir, args.manifests, args.rows_each, args.single, model, address):
                print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
