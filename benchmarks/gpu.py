"""The GPU run, prepared for the first lent GPU: one script of under ten minutes whose figures come back as JSON.

    bash benchmarks/gpu.sh --json gpu.json                      on a machine with a GPU (the figures)
    bash benchmarks/gpu.sh --cpu --json dry.json --frames 64    dry, on a CPU, tiny sizes (a test runs it)

1. **Model only**: images/s of the forward pass from uint8 pixels already on the device, by backbone,
   input size, batch, precision and ``cudnn.benchmark`` (random weights: speed does not read them).
   ``torch.compile`` too, for the two backbones at 224 px, batch 256, fp16: kept behind no flag until
   this says it helps (on this 2-core CPU it made cnn-small's forward 8% faster after a 23 s compile,
   which a labeler pays per batch shape; NOTES).
2. **Decisions flipped**: the same frames through one package in fp32 and in fp16 (bf16 on a CPU),
   how many label decisions differ and the largest probability gap (``--model`` for a trained package).
3. **End to end**: ``mlbatch label`` on N frames, local and Ray engines, PIL and torchvision decoding
   (nvJPEG on a GPU), each a fresh process, with ``--num-gpus 1 --require-cuda`` on a GPU; there also
   Ray with prediction batches of 256, and with two predictors per GPU (``--num-gpus 0.5``: one's host
   work overlaps the other's compute), for the defaults the GPU should choose.
4. **GPU utilisation** while 3 runs: ``nvidia-smi dmon`` samples of SM use (when nvidia-smi exists).

Nothing is asserted here; the figures go to ``benchmarks/NOTES.md``. Timings live here, never in tests.
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

import numpy as np
import torch

from mlbatch.model.loaded import load_model, to_input
from mlbatch.model.net import MultiLabelNet
from mlbatch.model.spec import ModelSpec
from benchmarks.throughput import make_frames, make_package

LABELS = ["car", "bus", "pedestrian"]
GRID = {"backbones": ["cnn-small", "timm:tf_efficientnet_lite0"], "sizes": [64, 224], "batches": [64, 256],
        "precisions": ["fp32", "fp16"], "cudnn": [False, True], "frames": 20_000,
        # torch.compile's settings to measure against the same eager ones (its compile time reported apart)
        "compiled": [("cnn-small", 224, 256, "fp16"), ("timm:tf_efficientnet_lite0", 224, 256, "fp16")]}
DRY = {"backbones": ["cnn-small"], "sizes": [32], "batches": [8], "precisions": ["fp32", "bf16"], "cudnn": [False],
       "frames": 64, "compiled": []}   # compiling takes ~25 s on this CPU: not in the dry run
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def model_only(device: str, backbone: str, size: int, batch: int, precision: str, cudnn: bool,
               seconds: float, compiled: bool = False) -> dict:
    """Images/s of the network alone, from uint8 pixels already on the device (normalisation included);
    ``compiled``: through ``torch.compile``, its first call (the compile) timed apart."""
    torch.backends.cudnn.benchmark = cudnn
    torch.manual_seed(0)
    net = MultiLabelNet(ModelSpec(labels=LABELS, backbone=backbone, image_size=size)).to(device).eval()
    if compiled:
        net = torch.compile(net)
    pixels = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)
    spec = net.spec

    def step() -> None:
        with torch.inference_mode(), torch.autocast(device, dtype=_DTYPES.get(precision, torch.float32),
                                                    enabled=precision in _DTYPES):
            net(to_input(pixels, spec.mean, spec.std))
        if device == "cuda":
            torch.cuda.synchronize()

    started = time.perf_counter()
    for _ in range(3):   # warm up (cudnn.benchmark picks its kernels here, torch.compile compiles)
        step()
    warm_up = time.perf_counter() - started
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        done += batch
    return {"backbone": backbone, "size": size, "batch": batch, "precision": precision, "cudnn_benchmark": cudnn,
            "compiled": compiled, "warm_up_seconds": round(warm_up, 1),
            "images_per_second": round(done / (time.perf_counter() - start), 1)}


def flipped(device: str, package: str, manifest: str, low: str, n: int) -> dict:
    """Decisions that differ between fp32 and ``low`` precision on the same frames, and the largest gap."""
    import pyarrow.parquet as pq
    from PIL import Image

    uris = pq.read_table(manifest).column("image_uri").to_pylist()[:n]
    probs = {}
    for precision in ("fp32", low):
        model = load_model(package, device=device, precision=precision)
        probs[precision] = model.predict([Image.open(u) for u in uris])
    thresholds = np.asarray([model.thresholds[x] for x in model.labels], np.float32)
    flips = int(((probs["fp32"] >= thresholds) != (probs[low] >= thresholds)).sum())
    return {"precision": low, "pictures": len(uris), "decisions": int(probs["fp32"].size), "flipped": flips,
            "largest_gap": float(np.abs(probs["fp32"] - probs[low]).max())}


def end_to_end(engine: str, decode: str, flags: list[str], manifest: str, package: str, out: str, gpu: bool,
               frames: int) -> dict:
    """``mlbatch label`` in a fresh process, wall time from start to exit; ``flags`` after the defaults."""
    command = [sys.executable, "-m", "mlbatch.cli", "label", "--manifest", manifest, "--model", package,
               "--output", out, "--engine", engine, "--decode", decode, "--mode", "overwrite"]
    command += (["--num-gpus", "1", "--require-cuda"] if gpu else ["--num-gpus", "0"]) + flags
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    row = {"engine": engine, "decode": decode, "flags": " ".join(flags), "frames": frames, "exit": done.returncode,
           "seconds": round(seconds, 2), "images_per_second": round(frames / seconds, 1)}
    if done.returncode != 0:
        row["error"] = done.stderr[-2000:]
    return row


class Dmon:
    """``nvidia-smi dmon`` SM utilisation samples, once a second, while the block runs (None without it)."""

    def __enter__(self) -> Dmon:
        self.proc = (subprocess.Popen(["nvidia-smi", "dmon", "-s", "u", "-d", "1"], stdout=subprocess.PIPE, text=True)
                     if shutil.which("nvidia-smi") else None)
        return self

    def __exit__(self, *exc: object) -> None:
        self.sm: list[int] = []
        if self.proc is None:
            return
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        for line in out.splitlines():
            parts = line.split()
            if parts and not line.startswith("#") and len(parts) > 1 and parts[1].isdigit():
                self.sm.append(int(parts[1]))

    def summary(self) -> dict | None:
        if self.proc is None:
            return None
        return {"samples": len(self.sm), "sm_median": statistics.median(self.sm) if self.sm else None,
                "sm_max": max(self.sm) if self.sm else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="dry: tiny sizes on the CPU, so the script cannot rot")
    p.add_argument("--json", required=True, metavar="OUT", help="write the figures here")
    p.add_argument("--frames", type=int, default=None, help="frames for the end-to-end runs (default: 20,000)")
    p.add_argument("--model", default=None, help="a trained package for the decisions-flipped figure")
    p.add_argument("--workdir", default=None, help="frames and outputs here (default: a temporary folder)")
    args = p.parse_args(argv)
    grid = DRY if args.cpu else GRID
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA here: run with --cpu for the dry run")
    frames = args.frames or grid["frames"]
    work = args.workdir or tempfile.mkdtemp(prefix="mlbatch-gpu-")
    manifest = make_frames(work, frames, 640, 480)
    package = args.model or make_package(os.path.join(work, "package"), LABELS, image_size=grid["sizes"][-1])
    report: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
                    "torch": torch.__version__, "cuda": torch.version.cuda, "dry": args.cpu, "model_only": []}
    for backbone in grid["backbones"]:
        for size in grid["sizes"]:
            for batch in grid["batches"]:
                for precision in grid["precisions"]:
                    for cudnn in grid["cudnn"]:
                        report["model_only"].append(model_only(device, backbone, size, batch, precision, cudnn,
                                                               0.5 if args.cpu else 2.0))
    report["model_only"] += [model_only(device, backbone, size, batch, precision, True, 2.0, compiled=True)
                             for backbone, size, batch, precision in grid["compiled"]]
    report["flipped"] = flipped(device, package, manifest, grid["precisions"][-1], min(frames, 2000))
    runs = [("local", "pil", []), ("local", "torchvision", []), ("ray", "pil", [])] + ([] if args.cpu else [
        ("ray", "torchvision", []), ("ray", "pil", ["--batch-size", "256"]),
        ("ray", "pil", ["--batch-size", "256", "--num-gpus", "0.5"])])   # two predictors per GPU: overlap
    with Dmon() as dmon:
        report["end_to_end"] = [end_to_end(engine, decode, flags, manifest, package,
                                           os.path.join(work, f"out-{engine}-{decode}-{k}"), not args.cpu, frames)
                                for k, (engine, decode, flags) in enumerate(runs)]
    report["gpu_utilisation"] = dmon.summary()
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    return 0 if all(r["exit"] == 0 for r in report["end_to_end"]) else 1


if __name__ == "__main__":
    sys.exit(main())
