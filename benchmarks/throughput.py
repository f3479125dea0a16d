"""Throughput of mlbatch against its ceilings and against what a user would write instead.

    python -m benchmarks.throughput [--images N] [--width W --height H] [--json OUT]

On the same images and the same model package it measures images/s and peak memory for:
  a  the forward pass alone on decoded, preprocessed tensors (the compute ceiling),
  b  fetch + decode + preprocess alone, as the job does it, on every core (the input ceiling),
  c  a hand-written single-process loop: read the manifest, PIL.open each image, predict in 64s
     (c' the same loop handing predict the files unopened, so it decodes at reduced scale too;
     and c' once more as a script, a fresh process writing its probabilities to Parquet),
  d  `mlbatch label` end to end, wall time including start-up, from local files and from S3 (moto),
     and again on a tenth of the rows: the difference is the streaming rate without start-up,
     and once more on a Ray instance already running (what `ray job submit` pays),
  e  the same labels from one separate binary model per label (what sharing the backbone saves),
and prints one table with d/c, d/h and e/d, where h = 1/(1/a + 1/b) is the combined ceiling when
decoding and the model share the same cores (min(a, b) on a GPU node, ``--num-gpus``, where they do not). Peak memory is the proportional set size (PSS)
summed over the whole process tree, Ray's workers included. Timings live here, never in tests.
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
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

import mlbatch
from mlbatch.core import images, storage
from mlbatch.label.stages import decode_batch
from mlbatch.model.net import MultiLabelNet, save_package
from mlbatch.model.spec import ModelSpec
from mlbatch.synth import render_frame

DISTINCT_FRAMES = 500  # the manifest cycles over this many files, so 20,000 rows need no 20,000 renders


# ---- measuring ------------------------------------------------------------------------------

def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _tree(pid: int) -> list[int]:
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.append(p)
            todo += _children(p)
    return seen


class PeakPSS:
    """Samples the PSS of a process tree every ``interval`` seconds and keeps the largest sum (MiB)."""

    def __init__(self, pid: int | None = None, samples: list[tuple[float, float]] | None = None,
                 interval: float = 0.1):
        self.pid, self.interval = pid or os.getpid(), interval
        self.peak = 0.0
        self.samples = samples   # (seconds since start, MiB) of every sample, when a list is given
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.perf_counter()
        while not self._stop.is_set():
            now = sum(_pss_kib(p) for p in _tree(self.pid)) / 1024
            self.peak = max(self.peak, now)
            if self.samples is not None:
                self.samples.append((time.perf_counter() - start, now))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakPSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, sum(_pss_kib(p) for p in _tree(self.pid)) / 1024)


@dataclass
class Result:
    name: str
    images: int
    seconds: float
    peak_mib: float
    note: str = ""

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds else float("nan")


# ---- data and models ------------------------------------------------------------------------

def make_frames(root: str, n: int, width: int, height: int) -> str:
    """JPEG frames (DISTINCT_FRAMES distinct renders, cycled) and a manifest listing n rows."""
    distinct = min(n, DISTINCT_FRAMES)
    os.makedirs(os.path.join(root, "frames"), exist_ok=True)
    paths = []
    for i in range(distinct):
        path = os.path.join(root, "frames", f"frame-{i:05d}.jpg")
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(render_frame(seed=1, index=i, width=width, height=height))
        paths.append(path)
    uris = [paths[i % distinct] for i in range(n)]
    manifest = os.path.join(root, f"manifest-{n}.parquet")
    pq.write_table(pa.table({"id": [f"row-{i:07d}" for i in range(n)], "image_uri": uris}), manifest)
    return manifest


def make_package(uri: str, labels: list[str], image_size: int = 64) -> str:
    """A package with random weights: throughput does not depend on what the weights say."""
    torch.manual_seed(0)
    net = MultiLabelNet(ModelSpec(labels=labels, image_size=image_size))
    save_package(net, uri, {x: 0.5 for x in labels}, name="bench")
    return uri


# ---- the five measurements ------------------------------------------------------------------

def bench_forward(model_uri: str, n: int, batch: int = 64) -> Result:
    """The model alone on resized pixels, as the predictor is fed (on CUDA when there is one and
    --num-gpus asked for it: then the pixels' copy to the device is included)."""
    device = DEVICE
    model = mlbatch.load_model(model_uri, device=device)
    size = model.spec.image_size
    pixels = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    x = images.normalise(pixels, model.spec.mean, model.spec.std)
    forward = (lambda: model.predict_pixels(pixels)) if device == "cuda" else (lambda: model.predict_arrays(x))
    forward()  # warm up
    with PeakPSS() as mem:
        start = time.perf_counter()
        done = 0
        while done < n:
            forward()
            done += batch
        seconds = time.perf_counter() - start
    threads = f"{torch.get_num_threads()} threads" if device == "cpu" else "CUDA"
    return Result("a  forward pass alone", done, seconds, mem.peak, f"batch {batch}, {threads}")


def _decode_chunk(args: tuple[list[str], int]) -> int:
    uris, size = args
    table = pa.table({"image_uri": uris})
    out = decode_batch(table, "image_uri", size)
    return out.num_rows - out.column("__mlbatch_error").null_count


def bench_decode(manifest: str, size: int, n: int, workers: int) -> Result:
    uris = pq.read_table(manifest).column("image_uri").to_pylist()[:n]
    chunks = [(uris[i:i + 64], size) for i in range(0, len(uris), 64)]
    with PeakPSS() as mem, ProcessPoolExecutor(workers) as pool:
        list(pool.map(_decode_chunk, chunks[:workers]))  # start the workers
        start = time.perf_counter()
        errors = sum(pool.map(_decode_chunk, chunks))
        seconds = time.perf_counter() - start
    return Result("b  fetch + decode + preprocess", len(uris), seconds, mem.peak, f"{workers} processes, {errors} errors")


def bench_hand_loop(manifest: str, model_uri: str, n: int, models: list | None = None, name: str = "",
                    lazy: bool = False) -> Result:
    """What a user writes without mlbatch: one process, PIL, predict in batches of 64.

    ``lazy`` hands ``predict`` the files as opened, not yet decoded, so it decodes JPEGs at
    reduced scale as the job does; the usual ``Image.open(u).convert("RGB")`` decodes in full.
    """
    with PeakPSS() as mem:
        start = time.perf_counter()
        loaded = models or [mlbatch.load_model(model_uri, device=DEVICE)]
        uris = pq.read_table(manifest).column("image_uri").to_pylist()[:n]
        for i in range(0, len(uris), 64):
            batch = [Image.open(u) if lazy else Image.open(u).convert("RGB") for u in uris[i:i + 64]]
            for m in loaded:
                m.predict(batch)
        seconds = time.perf_counter() - start
    return Result(name or "c  hand-written loop", len(uris), seconds, mem.peak, "1 process")


HAND_LOOP_SCRIPT = """
import sys
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
from PIL import Image
import mlbatch
manifest, model_uri, n, out, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
model = mlbatch.load_model(model_uri, device=device)
table = pq.read_table(manifest).slice(0, n)
uris = table.column("image_uri").to_pylist()
probs = np.concatenate([model.predict([Image.open(u) for u in uris[i:i + 64]]) for i in range(0, len(uris), 64)])
for j, label in enumerate(model.labels):
    table = table.append_column(f"prob_{label}", pa.array(probs[:, j]))
pq.write_table(table, out)
"""


def bench_hand_loop_script(manifest: str, model_uri: str, n: int, out: str) -> Result:
    """c' as a user runs it: a fresh Python process (imports torch, loads the model) that writes its
    probabilities to Parquet, the same end-to-end terms as d, which is a fresh process too."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", HAND_LOOP_SCRIPT, manifest, model_uri, str(n), out, DEVICE], check=True)
    return Result("c' as a script (new process, Parquet)", n, time.perf_counter() - start, float("nan"),
                  "1 process, wall time incl. start-up")


JOB_ARGS: list[str] = []   # extra `mlbatch label` flags for every d run (--engine, --num-gpus F from the command line)
DEVICE = "cpu"             # where a, c and e predict: CUDA when --num-gpus asks for a GPU and there is one


def ceiling(a: float, b: float) -> float:
    """h: what the machine can decode and compute at once. On a CPU both share the cores (1/(1/a + 1/b));
    on a GPU node the GPU computes while the CPUs decode, so the slower of the two bounds it."""
    return min(a, b) if DEVICE == "cuda" else 1 / (1 / a + 1 / b)


def bench_job(manifest: str, model_uri: str, out: str, n: int, env: dict | None = None, name: str = "",
              memory: bool = False, args: tuple[str, ...] = ()) -> Result:
    """`mlbatch label` as a user runs it: a fresh process, a fresh local Ray instance.

    Either timed or measured for memory, never both: one PSS sample of Ray's ~20 processes costs
    ~56 ms of CPU, so sampling every 100 ms would take a third of a core from the job it times.
    """
    cmd = [sys.executable, "-m", "mlbatch.cli", "label", "--manifest", manifest, "--model", model_uri,
           "--output", out, "--id-column", "id", *JOB_ARGS, *args]
    run_env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled",
               **(env or {})}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if memory:
        with PeakPSS(proc.pid) as mem:
            output, _ = proc.communicate()
    else:
        output, _ = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"mlbatch label failed:\n{output.decode()[-3000:]}")
    if memory:
        return Result(name or "d  peak memory of mlbatch label", n, seconds, mem.peak, "PSS sampled every 100 ms")
    return Result(name or "d  mlbatch label (local files)", n, seconds, float("nan"), "wall time incl. start-up")


def bench_job_on_running_cluster(manifest: str, model_uri: str, out: str, n: int) -> Result:
    """d again, submitted to a Ray instance that is already up, as `ray job submit` and the nightly
    CronJob do: the job's own start-up without Ray's. The instance is `ray start --head --block`
    in its own process group, ended by signalling that group."""
    import signal
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    # its own temp dir: `ray start` records its address there, and a record left in the default
    # /tmp/ray would make every later `ray.init()` on this machine try to join this dead instance
    temp_dir = f"/tmp/mlbatch-bench-ray-{os.getpid()}"  # short: Ray's socket paths have a length limit
    head = subprocess.Popen(["ray", "start", "--head", "--block", f"--port={port}", f"--num-cpus={os.cpu_count()}",
                             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        probe = f"import ray; ray.init(address={address!r}, logging_level='ERROR'); ray.shutdown()"
        deadline = time.monotonic() + 90
        while subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode != 0:
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ray start --head did not come up")
            time.sleep(1)
        return bench_job(manifest, model_uri, out, n, {"RAY_ADDRESS": address},
                         "d  mlbatch label, Ray already running")
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


# ---- S3 ------------------------------------------------------------------------------------

def s3_copy(manifest: str, model_uri: str, bucket: str) -> tuple[str, str]:
    """Upload frames, a manifest pointing at them, and the package to an S3 bucket."""
    import boto3
    from concurrent.futures import ThreadPoolExecutor

    boto3.client("s3").create_bucket(Bucket=bucket)
    table = pq.read_table(manifest)
    local = sorted(set(table.column("image_uri").to_pylist()))
    remote = {p: f"s3://{bucket}/frames/{os.path.basename(p)}" for p in local}
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: storage.write_bytes(remote[p], open(p, "rb").read()), local))
    table = table.set_column(1, "image_uri", pa.array([remote[u] for u in table.column("image_uri").to_pylist()]))
    s3_manifest = f"s3://{bucket}/manifest.parquet"
    storage.write_parquet(table, s3_manifest)
    s3_model = f"s3://{bucket}/model"
    for name in ("model.safetensors", "mlbatch-model.json"):
        storage.write_bytes(storage.join(s3_model, name), storage.read_bytes(storage.join(model_uri, name)))
    return s3_manifest, s3_model


# ---- the run --------------------------------------------------------------------------------

def _median(runs: list[Result]) -> Result:
    """The run of median time, its note saying how far the others were."""
    mid = sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]
    if len(runs) == 1:
        return mid
    rates = [r.rate for r in runs]
    return Result(mid.name, mid.images, mid.seconds, mid.peak_mib,
                  f"{mid.note}; median of {len(runs)}, {min(rates):.0f}-{max(rates):.0f} img/s")


def _streaming(d: Result, d_small: Result) -> float | None:
    """The job's rate without its start-up: d minus d on a tenth of the rows (None when start-up
    varies more than labeling takes, at a few thousand rows)."""
    extra = d.seconds - d_small.seconds
    return (d.images - d_small.images) / extra if extra > 0.1 * d.seconds else None


def _round_ratios(r: dict[str, Result]) -> dict[str, float | None]:
    h = ceiling(r["a"].rate, r["b"].rate)
    streaming = _streaming(r["d"], r["d_small"])
    out = {"h": round(h, 1), "d": round(r["d"].rate, 1), "d streaming": streaming and round(streaming, 1),
           "d/h": round(r["d"].rate / h, 3), "d streaming/h": streaming and round(streaming / h, 3)}
    if "c_lazy" in r:
        out["d/c'"] = round(r["d"].rate / r["c_lazy"].rate, 3)
        out["d/c' script"] = round(r["d"].rate / r["c_script"].rate, 3)
    return out


def run(n: int, width: int, height: int, workdir: str, with_s3: bool = True, label_counts=(3, 10),
        job_only: bool = False, rounds: int = 1) -> dict:
    manifest = make_frames(workdir, n, width, height)
    model3 = make_package(os.path.join(workdir, "model-3"), ["car", "bus", "pedestrian"])
    size = mlbatch.load_model(model3).spec.image_size
    sample = make_frames(workdir, min(n, 20_000), width, height) if job_only else manifest
    small = max(n // 10, 64)
    small_manifest = make_frames(workdir, small, width, height)
    # The figures the ratios are made of, measured `rounds` times in turn: this VM's speed drifts by
    # 10-25% between minutes, so each round's ratios compare runs made minutes apart, and the report
    # gives each round's and the median ones.
    core = {
        "a": lambda: bench_forward(model3, max(min(n, 20_000), 2048)),
        "b": lambda: bench_decode(sample, size, min(n, 20_000), os.cpu_count() or 1),
        **({} if job_only else {"c_lazy": lambda: bench_hand_loop(manifest, model3, n, lazy=True,
                                                                  name="c' hand loop, reduced-scale decode"),
                                 "c_script": lambda: bench_hand_loop_script(manifest, model3, n,
                                                                            os.path.join(workdir, "c-out.parquet"))}),
        "d": lambda: bench_job(manifest, model3, os.path.join(workdir, "out-local"), n),
        "d_small": lambda: bench_job(small_manifest, model3, os.path.join(workdir, "out-small"), small,
                                     name=f"d  mlbatch label, {small} rows"),
    }
    measured: dict[str, list[Result]] = {k: [] for k in core}
    for _ in range(rounds):
        for k, measure in core.items():
            measured[k].append(measure())
    per_round = [_round_ratios({k: v[i] for k, v in measured.items()}) for i in range(rounds)]
    results: dict[str, Result] = {k: _median(v) for k, v in measured.items()}
    if not job_only:
        results["c"] = bench_hand_loop(manifest, model3, n)
    results["d_memory"] = bench_job(manifest, model3, os.path.join(workdir, "out-local"), n, memory=True)
    results["d_memory_small"] = bench_job(small_manifest, model3, os.path.join(workdir, "out-small"), small,
                                          memory=True, name=f"d  peak memory, {small} rows")
    if not job_only:
        results["d_warm"] = bench_job_on_running_cluster(manifest, model3, os.path.join(workdir, "out-local"), n)
        results["d_split"] = bench_job(manifest, model3, os.path.join(workdir, "out-split"), n,
                                       name="d  mlbatch label --engine ray --layout split",
                                       args=("--engine", "ray", "--layout", "split"))   # the layout is Ray's
        # the predictor decodes JPEGs itself: nvJPEG on a GPU node (--num-gpus), torchvision's libjpeg here
        results["d_torchvision"] = bench_job(manifest, model3, os.path.join(workdir, "out-torchvision"), n,
                                             name="d  mlbatch label --decode torchvision",
                                             args=("--decode", "torchvision"))
    if with_s3 and not job_only:
        from moto.server import ThreadedMotoServer
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
               "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
        os.environ.update(env)
        try:
            s3_manifest, s3_model = s3_copy(manifest, model3, f"bench-{int(time.time())}")
            results["d_s3"] = bench_job(s3_manifest, s3_model, f"{s3_manifest.rsplit('/', 1)[0]}/out", n, env,
                                        "d  mlbatch label (S3, moto)")
        finally:
            server.stop()
    shared_vs_separate = {}
    for k in () if job_only else label_counts:
        labels = [f"label{i}" for i in range(k)]
        shared = make_package(os.path.join(workdir, f"model-{k}"), labels)
        singles = [mlbatch.load_model(make_package(os.path.join(workdir, f"single-{k}-{i}"), [x]), device=DEVICE)
                   for i, x in enumerate(labels)]
        e = bench_hand_loop(manifest, "", min(n, 2000), singles, f"e  {k} separate binary models")
        d_k = results["d"] if k == 3 else bench_job(manifest, shared, os.path.join(workdir, f"out-{k}"), n,
                                                     name=f"d  mlbatch label, {k} labels")
        results[f"e{k}"] = e
        if k != 3:
            results[f"d{k}"] = d_k
        shared_vs_separate[k] = e.rate / d_k.rate
    h = ceiling(results["a"].rate, results["b"].rate)
    d, d_small = results["d"], results["d_small"]
    streaming = _streaming(d, d_small)
    start_up = d.seconds - d.images / streaming if streaming else None
    return {
        "images": n, "width": width, "height": height, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                                  "torch": torch.__version__},
        "results": {k: {"name": r.name, "images": r.images, "seconds": round(r.seconds, 3),
                        "images_per_second": round(r.rate, 2), "peak_pss_mib": None if r.peak_mib != r.peak_mib else round(r.peak_mib, 1), "note": r.note}
                    for k, r in results.items()},
        "h_images_per_second": round(h, 2),
        "d_streaming_images_per_second": streaming and round(streaming, 2),
        "d_start_up_seconds": start_up and round(start_up, 2),
        "ratios": {**({"d/c": round(d.rate / results["c"].rate, 3), "d/c'": round(d.rate / results["c_lazy"].rate, 3),
                      "d/c' script": round(d.rate / results["c_script"].rate, 3),
                      "d (Ray running)/h": round(results["d_warm"].rate / h, 3),
                      "d split/d": round(results["d_split"].rate / d.rate, 3)} if not job_only else {}),
                   "d/h": round(d.rate / h, 3), "d streaming/h": streaming and round(streaming / h, 3),
                   "d memory / d memory on 1/10": round(results["d_memory"].peak_mib
                                                        / results["d_memory_small"].peak_mib, 3),
                   **{f"e/d ({k} labels)": round(v, 3) for k, v in shared_vs_separate.items()}},
        "rounds": per_round,
        "median_of_rounds": {k: _median_known([r[k] for r in per_round]) for k in per_round[0]},
    }


def _median_known(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median_high(known) if known else None


def table(report: dict) -> str:
    lines = [f"{report['images']} images of {report['width']}x{report['height']}, {report['machine']['cpus']} CPUs",
             f"{'':<40}{'images/s':>10}{'seconds':>10}{'peak PSS MiB':>14}  note"]
    for r in report["results"].values():
        peak = "-" if r["peak_pss_mib"] is None else f"{r['peak_pss_mib']:.0f}"
        lines.append(f"{r['name']:<40}{r['images_per_second']:>10.1f}{r['seconds']:>10.1f}{peak:>14}  {r['note']}")
    rule = "min(a, b)" if DEVICE == "cuda" else "1/(1/a+1/b)"
    lines.append(f"{'h  combined ceiling ' + rule:<40}{report['h_images_per_second']:>10.1f}")
    if report["d_streaming_images_per_second"]:
        lines.append(f"{'d  streaming rate (d minus d on 1/10)':<40}{report['d_streaming_images_per_second']:>10.1f}"
                     f"{report['d_start_up_seconds']:>10.1f}  start-up seconds")
    else:
        lines.append("d  streaming rate: not measurable here, start-up varies more than labeling takes")
    lines.append("ratios: " + ", ".join(f"{k} = {v}" for k, v in report["ratios"].items()))
    if len(report["rounds"]) > 1:
        for i, r in enumerate(report["rounds"], 1):
            lines.append(f"round {i}: " + ", ".join(f"{k} = {v}" for k, v in r.items()))
        lines.append("median of rounds: " + ", ".join(f"{k} = {v}" for k, v in report["median_of_rounds"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000, help="rows to label (default: %(default)s)")
    p.add_argument("--width", type=int, default=640, help="frame width (default: %(default)s)")
    p.add_argument("--height", type=int, default=480, help="frame height (default: %(default)s)")
    p.add_argument("--workdir", default=None, help="keep frames and outputs here (default: a temporary folder)")
    p.add_argument("--no-s3", action="store_true", help="skip the S3 (moto) run of d")
    p.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON")
    p.add_argument("--job-only", action="store_true",
                   help="only the ceilings (a, b on up to 20,000 rows) and the job (d, its memory, d on a tenth): "
                        "for large --images, where the hand loops would take as long again")
    p.add_argument("--num-gpus", type=float, default=None, metavar="F",
                   help="pass --num-gpus F to every job run (on Ray unless --engine says otherwise), and run a, c "
                        "and e on CUDA when there is one, with h = min(a, b): the same benchmark on a GPU node")
    p.add_argument("--engine", choices=("auto", "local", "ray"), default=None,
                   help="pass --engine to every job run (default: mlbatch's own choice, ray with --num-gpus)")
    p.add_argument("--rounds", type=int, default=1, metavar="K",
                   help="measure a, b, c' and d (and d on a tenth) K times in turn and report the median run and "
                        "each round's ratios: this VM's speed drifts between minutes (default: %(default)s)")
    args = p.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="mlbatch-bench-")
    global DEVICE
    if args.num_gpus is not None:
        JOB_ARGS.extend(["--num-gpus", str(args.num_gpus)])
        DEVICE = "cuda" if args.num_gpus > 0 and torch.cuda.is_available() else "cpu"
    engine = args.engine or ("ray" if args.num_gpus is not None else None)
    if engine:
        JOB_ARGS.extend(["--engine", engine])
    report = run(args.images, args.width, args.height, workdir, with_s3=not args.no_s3, job_only=args.job_only,
                 rounds=args.rounds)
    print(table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
