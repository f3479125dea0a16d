"""Does the ``--id-column`` check's memory grow with rows? (the local engine's, and the one-task path on Ray)

    python -m benchmarks.idcheck --rows 2000000 8000000 [--files 4] [--out FILE]

For each size it writes ``--files`` manifests of string ids (pyarrow's default row groups, no duplicate:
the check reads every id) and runs ``ids.check_ids`` as the local engine does, in a fresh process. It
reports the check's seconds and how far it raised the process's peak resident memory above what the
process held before it (its own ``VmHWM``): bounded when that figure is the same at both sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import emit
from .throughput import make_package

_CHILD = """
import json, sys, time
from mlbatch.label.config import LabelConfig
from mlbatch.label.ids import check_ids
from mlbatch.label.plan import make_plan

manifests, model, output = json.loads(sys.argv[1])
plan = make_plan(LabelConfig(manifests=manifests, model=model, output=output, id_column="id"))
with open("/proc/self/status") as f:
    before = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
started = time.perf_counter()
check_ids(plan, "id", on_ray=False)
seconds = time.perf_counter() - started
with open("/proc/self/status") as f:   # this process's own peak (ru_maxrss would count the parent's, from fork)
    peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps({"seconds": round(seconds, 2), "rss_before_mib": round(before / 1024),
                  "check_peak_above_before_mib": round(max(0, peak - before) / 1024)}))
"""


def make_manifests(folder: str, rows: int, files: int) -> list[str]:
    """``files`` manifests of ``rows`` string ids in all, each id once."""
    os.makedirs(folder, exist_ok=True)
    uris = []
    for i, part in enumerate(np.array_split(np.arange(rows), files)):
        uri = os.path.join(folder, f"part-{i}.parquet")
        if not os.path.exists(uri):
            ids = pa.array([f"img-{n:012d}" for n in part.tolist()])
            pq.write_table(pa.table({"image_uri": pa.repeat(pa.scalar("s3://bucket/a.jpg"), len(part)),
                                     "id": ids}), uri)
        uris.append(uri)
    return uris


def measure(manifests: list[str], model: str, output: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([manifests, model, output])],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the id check failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[2_000_000, 8_000_000])
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--variant", default="", help="a name for the code measured, recorded with the result")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mlbatch-idcheck"))
    p.add_argument("--out", help="append each result as a JSON line to this file")
    args = p.parse_args()
    model = make_package(os.path.join(args.workdir, "model"), ["car"])
    for rows in args.rows:
        manifests = make_manifests(os.path.join(args.workdir, f"ids-{rows}-{args.files}"), rows, args.files)
        result = {"variant": args.variant, "rows": rows, "files": args.files,
                  **measure(manifests, model, os.path.join(args.workdir, "out"))}
        emit(result, args.out)


if __name__ == "__main__":
    main()
