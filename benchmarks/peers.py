"""mlbatch against its peers, side by side in rounds: what a user would run instead, on the same frames.

    python -m benchmarks.peers --images 20000 --rounds 3 --json benchmarks/peers-20000.json
    python -m benchmarks.peers --images 20000 --daft-python /path/to/venv-with-daft/bin/python
    python -m benchmarks.peers --images 200000 --rounds 1 --smaller benchmarks/peers-20000.json

Every contender is a fresh process (Python start, imports, model load and the write included) that
reads the same manifest of 640x480 JPEG frames and writes Parquet with one probability per label,
all through mlbatch's own ``predict`` on files opened lazily (so every contender decodes JPEGs alike,
at reduced scale):

- ``mlbatch local``: ``mlbatch label --engine local`` (the default on one machine with no Ray);
- ``mlbatch ray``: ``mlbatch label --engine ray``, on a Ray instance it starts;
- ``ray data``: Ray Data's documented batch-inference pattern (``read_parquet`` -> ``map_batches``
  with a callable class -> ``write_parquet``), sized so it does not hang: one predictor actor of
  one CPU, leaving the rest to reading and writing (actors claiming every CPU back-pressure the
  write stage forever);
- ``daft``: Daft's local runner with a ``@daft.cls`` model and a batch method (Daft is not one of
  mlbatch's dependencies: ``--daft-python`` names an interpreter that has it and sees mlbatch);
- ``hand loop``: one process, batches of 64, the simplest loop a user writes.

Rounds run the contenders one after another, in a rotated order, so a slow minute of the machine
falls on all of them. Peak memory is the PSS of each contender's process tree, sampled every
second (sampling a tree of Ray's ~20 processes every 100 ms costs a third of a core). Timings
live here, never in tests.

Two sizes separate a contender's fixed cost (start-up, model load, shutdown) from its streaming
rate: with ``--smaller REPORT`` (a run at fewer frames, best the same session's) the table adds
streaming = (N - n) / (T - t) per contender, its start-up t - n / streaming, and the streaming
rate as a fraction of the hand loop's ("h").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import pyarrow.parquet as pq

from .throughput import PeakPSS, make_frames, make_package

LABELS = ["car", "bus", "pedestrian"]

RAY_DATA = """
import sys
import numpy as np
import ray
from PIL import Image
import mlbatch
manifest, model_uri, out = sys.argv[1:4]

class Model:
    def __init__(self):
        self.model = mlbatch.load_model(model_uri)
    def __call__(self, batch):
        probs = self.model.predict([Image.open(u) for u in batch["image_uri"]])
        for j, label in enumerate(self.model.labels):
            batch[f"prob_{label}"] = probs[:, j]
        return batch

ray.init(address="local", logging_level="ERROR")
ray.data.read_parquet(manifest).map_batches(Model, batch_size=64, batch_format="numpy", concurrency=1,
                                            num_cpus=1).write_parquet(out)
"""

DAFT = """
import sys
import numpy as np
import daft
from daft import DataType
from PIL import Image
import mlbatch
manifest, model_uri, out = sys.argv[1:4]

@daft.cls
class Model:
    def __init__(self):
        self.model = mlbatch.load_model(model_uri)
    @daft.method.batch(return_dtype=DataType.list(DataType.float32()), batch_size=64)
    def __call__(self, uris):
        return [list(p) for p in self.model.predict([Image.open(u) for u in uris.to_pylist()])]

df = daft.read_parquet(manifest)
df = df.with_column("probs", Model()(df["image_uri"]))
df.write_parquet(out)
"""

HAND_LOOP = """
import sys
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
from PIL import Image
import mlbatch
manifest, model_uri, out = sys.argv[1:4]
model = mlbatch.load_model(model_uri)
table = pq.read_table(manifest)
uris = table.column("image_uri").to_pylist()
probs = np.concatenate([model.predict([Image.open(u) for u in uris[i:i + 64]]) for i in range(0, len(uris), 64)])
for j, label in enumerate(model.labels):
    table = table.append_column(f"prob_{label}", pa.array(probs[:, j]))
pq.write_table(table, out + ".parquet")
"""


def _contenders(daft_python: str | None) -> dict[str, list[str]]:
    label = [sys.executable, "-m", "mlbatch.cli", "label", "--id-column", "id", "--mode", "overwrite"]
    out = {"mlbatch local": label + ["--engine", "local"], "mlbatch ray": label + ["--engine", "ray"],
           "ray data": [sys.executable, "-c", RAY_DATA], "hand loop": [sys.executable, "-c", HAND_LOOP]}
    if daft_python:
        out["daft"] = [daft_python, "-c", DAFT]
    return out


def _command(name: str, base: list[str], manifest: str, model: str, output: str) -> list[str]:
    if name.startswith("mlbatch"):
        return base + ["--manifest", manifest, "--model", model, "--output", output]
    return base + [manifest, model, output]


def _rows_written(output: str) -> int:
    if os.path.isfile(output + ".parquet"):
        return pq.ParquetFile(output + ".parquet").metadata.num_rows
    files = [os.path.join(d, f) for d, _, fs in os.walk(output) for f in fs if f.endswith(".parquet")]
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def measure(name: str, command: list[str], n: int, output: str) -> dict:
    """One fresh process: wall time, images/s, peak PSS of its tree; the rows it wrote are checked."""
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONWARNINGS": "ignore"}
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    with PeakPSS(proc.pid, interval=1.0) as mem:
        text, _ = proc.communicate()
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{text.decode()[-3000:]}")
    rows = _rows_written(output)
    if rows != n:
        raise RuntimeError(f"{name} wrote {rows} rows, not {n}")
    return {"contender": name, "images": n, "seconds": round(seconds, 2), "images_per_second": round(n / seconds, 1),
            "peak_pss_mib": round(mem.peak, 0)}


def run(n: int, rounds: int, workdir: str, daft_python: str | None, only: list[str] | None = None) -> dict:
    manifest = make_frames(os.path.join(workdir, "frames"), n, 640, 480)
    model = make_package(os.path.join(workdir, "model"), LABELS)
    contenders = _contenders(daft_python)
    unknown = sorted(set(only or []) - set(contenders))
    if unknown:
        raise SystemExit(f"--only: no contender {unknown[0]!r}; choose from {', '.join(contenders)}")
    names = [name for name in contenders if not only or name in only]
    results = []
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            output = os.path.join(workdir, "out", name.replace(" ", "-"), str(r))
            shutil.rmtree(output, ignore_errors=True)
            os.makedirs(os.path.dirname(output), exist_ok=True)
            row = {"round": r, **measure(name, _command(name, contenders[name], manifest, model, output), n, output)}
            print(json.dumps(row), flush=True)
            results.append(row)
    return {"images": n, "rounds": rounds, "cpus": os.cpu_count(), "machine": platform.platform(),
            "results": results, "medians": medians(results)}


def medians(results: list[dict]) -> dict[str, dict]:
    out = {}
    for name in dict.fromkeys(r["contender"] for r in results):
        mine = [r for r in results if r["contender"] == name]
        out[name] = {"images_per_second": statistics.median(r["images_per_second"] for r in mine),
                     "seconds": statistics.median(r["seconds"] for r in mine),
                     "peak_pss_mib": max(r["peak_pss_mib"] for r in mine)}
    return out


def streaming(small: dict, large: dict) -> dict[str, dict]:
    """Per contender of both reports: streaming img/s and fixed start-up seconds, from the medians."""
    out = {}
    for name, big in large["medians"].items():
        little = small["medians"].get(name)
        if little is None or big["seconds"] <= little["seconds"]:
            continue
        rate = (large["images"] - small["images"]) / (big["seconds"] - little["seconds"])
        out[name] = {"images_per_second": round(rate, 1),
                     "startup_seconds": round(little["seconds"] - small["images"] / rate, 1)}
    return out


def table(report: dict) -> str:
    m, stream = report["medians"], report.get("streaming", {})
    hand = stream.get("hand loop", {}).get("images_per_second")
    extra = " streaming img/s | start-up s | streaming / h |" if stream else ""
    lines = [f"{report['images']} frames, {report['rounds']} rounds, {report['cpus']} CPUs (medians; peak PSS the "
             "largest of the rounds)" + (f"; streaming from {report['smaller_images']} frames" if stream else ""),
             "| contender | img/s | seconds | peak PSS MiB | vs mlbatch local |" + extra,
             "| --- | --- | --- | --- | --- |" + (" --- | --- | --- |" if stream else "")]
    base = m.get("mlbatch local", {}).get("images_per_second")
    for name, v in m.items():
        ratio = f"{v['images_per_second'] / base:.2f}x" if base else ""
        row = f"| {name} | {v['images_per_second']:.0f} | {v['seconds']:.1f} | {v['peak_pss_mib']:.0f} | {ratio} |"
        if stream:
            st = stream.get(name)
            row += (f" {st['images_per_second']:.0f} | {st['startup_seconds']:.1f} | "
                    f"{st['images_per_second'] / hand:.2f} |" if st and hand else " | | |")
        lines.append(row)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="keep frames and outputs here (default: a temporary folder)")
    parser.add_argument("--daft-python", default=None, metavar="PYTHON",
                        help="an interpreter with Daft installed that imports mlbatch (without it, no Daft row)")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME",
                        help="measure only these contenders (e.g. 'mlbatch local' 'hand loop')")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results here")
    parser.add_argument("--smaller", default=None, metavar="REPORT",
                        help="the JSON of a run at fewer frames: adds each contender's streaming rate and start-up")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: print the table of --json (with --smaller's streaming)")
    args = parser.parse_args()
    if args.report_only and not args.json:
        parser.error("--report-only prints the table of a report: give it with --json")
    if args.report_only:
        with open(args.json) as f:
            report = json.load(f)
    else:
        workdir = args.workdir or tempfile.mkdtemp(prefix="mlbatch-peers-")
        report = run(args.images, args.rounds, workdir, args.daft_python, args.only)
    if args.smaller:
        with open(args.smaller) as f:
            small = json.load(f)
        report["smaller_images"], report["streaming"] = small["images"], streaming(small, report)
    if args.json and (args.smaller or not args.report_only):
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print(table(report))


if __name__ == "__main__":
    main()
