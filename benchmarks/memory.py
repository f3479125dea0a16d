"""Does a labeling process's memory grow with rows? (issue 22)

    python -m benchmarks.memory --images 100000 [--engine local] [--env KEY=VALUE ...] [--out FILE]

Runs ``mlbatch label`` in a fresh process over ``--images`` rows (small frames by default: the main
process receives pixels at the model's size, whatever the frames' size, so small frames show its
memory as large ones do, only sooner). Every second it samples the main process's PSS (the decode
helpers apart) and counts the committed units, so memory is tied to rows done, not to time. It reports
the PSS after the first units and at the end, and the slope of a line through the samples of the second
half, in MiB per 100,000 rows: near 0 when memory is bounded, and the same at two sizes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq

from . import emit
from .throughput import _children, _pss_kib, make_frames, make_package

LABELS = ["car", "bus", "pedestrian"]


def _units_done(output: str) -> int:
    """Commit markers written so far (one per unit of work)."""
    return sum(1 for _, _, files in os.walk(output) for f in files
               if f.endswith(".json") and not f.startswith("_"))


def measure(manifest: str, model: str, output: str, n: int, engine: str, env: dict[str, str],
            rows_per_unit: int) -> dict:
    command = [sys.executable, "-m", "mlbatch.cli", "label", "--manifest", manifest, "--model", model,
               "--output", output, "--engine", engine, "--rows-per-unit", str(rows_per_unit)]
    full_env = {**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0", **env}
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    samples = []   # (rows done, main PSS MiB, helpers' PSS MiB)
    while proc.poll() is None:
        main = _pss_kib(proc.pid) / 1024
        helpers = sum(_pss_kib(c) for c in _children(proc.pid)) / 1024
        samples.append((_units_done(output) * rows_per_unit, main, helpers))
        time.sleep(1.0)
    seconds = time.perf_counter() - started
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"mlbatch label failed ({proc.returncode}):\n{err[-3000:]}")
    rows = np.array([s[0] for s in samples], float)
    main = np.array([s[1] for s in samples], float)
    late = rows >= n / 2
    slope = float(np.polyfit(rows[late], main[late], 1)[0]) * 100_000 if late.sum() >= 3 and np.ptp(rows[late]) else None
    after_first = main[rows >= 2 * rows_per_unit]
    return {"images": n, "row_groups": pq.ParquetFile(manifest).metadata.num_row_groups, "engine": engine, "env": env, "rows_per_unit": rows_per_unit,
            "seconds": round(seconds, 1), "images_per_second": round(n / seconds, 1),
            "main_pss_mib_after_2_units": round(float(after_first[0]), 0) if len(after_first) else None,
            "main_pss_mib_peak": round(float(main.max()), 0), "main_pss_mib_last": round(float(main[-1]), 0),
            "helpers_pss_mib_peak": round(float(max(s[2] for s in samples)), 0),
            "tree_pss_mib_peak": round(float(max(s[1] + s[2] for s in samples)), 0),
            "main_mib_per_100k_rows_second_half": None if slope is None else round(slope, 1),
            "main_pss_mib_by_rows": {int(r): round(float(main[rows == r].max()), 0) for r in np.unique(rows)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--engine", default="local", choices=["local", "ray"])
    p.add_argument("--rows-per-unit", type=int, default=10_000)
    p.add_argument("--row-group-rows", type=int, help="rewrite the manifest in row groups of this many rows "
                   "(default: pyarrow's, one row group up to about a million rows)")
    p.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="environment of the labeling process")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mlbatch-memory"))
    p.add_argument("--out", help="append the result as a JSON line to this file")
    args = p.parse_args()
    env = dict(kv.split("=", 1) for kv in args.env)
    manifest = make_frames(os.path.join(args.workdir, f"frames-{args.width}x{args.height}"), args.images,
                           args.width, args.height)
    if args.row_group_rows:
        grouped = manifest.replace(".parquet", f"-rg{args.row_group_rows}.parquet")
        pq.write_table(pq.read_table(manifest), grouped, row_group_size=args.row_group_rows)
        manifest = grouped
    model = make_package(os.path.join(args.workdir, "model"), LABELS)
    output = os.path.join(args.workdir, "out")
    shutil.rmtree(output, ignore_errors=True)
    result = measure(manifest, model, output, args.images, args.engine, env, args.rows_per_unit)
    emit(result, args.out)


if __name__ == "__main__":
    main()
