"""How many label decisions a lower precision flips against fp32, on every kind of picture the project makes.

    python -m benchmarks.precision --out benchmarks/precision-results.jsonl

Per kind (``synth`` kinds: street, glyphs, shapes, photos, digits): a dataset, one cnn-small model trained
briefly with its thresholds chosen on validation as ``train`` chooses them, then the test pictures predicted
in fp32, fp16 and bf16 (autocast) by the same ``LoadedModel``; a decision flips where a probability and
its fp32 twin fall on two sides of the label's threshold. Run on this machine's CPU (its autocast); a GPU's
fp16 kernels round differently, so ``gpu.sh``'s own figure is the one to trust there. Nothing is
asserted; the figures go to ``benchmarks/NOTES.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np

from mlbatch.core import manifest
from mlbatch.model.loaded import load_model
from mlbatch.synth import SynthConfig, make_dataset
from mlbatch.train import TrainConfig, train
from mlbatch.train.evaluate import predict_labeled

KINDS = ["street", "glyphs", "shapes", "photos", "digits"]


def flips(kind: str, workdir: str, seed: int, epochs: int) -> dict:
    root = os.path.join(workdir, kind)
    make_dataset(root, SynthConfig(kind=kind, train=600, val=200, test=1000, seed=seed))
    out = os.path.join(workdir, f"{kind}-model")
    train(TrainConfig(manifests=[f"{root}/train.parquet"], val_manifests=[f"{root}/val.parquet"], output=out,
                      epochs=epochs, seed=seed, progress=False))
    data = manifest.read_labeled([f"{root}/test.parquet"], load_model(out).labels)
    probs = {p: predict_labeled(load_model(out, precision=p), data) for p in ("fp32", "fp16", "bf16")}
    model = load_model(out)
    thresholds = np.asarray([model.thresholds[x] for x in model.labels], np.float32)
    row = {"kind": kind, "seed": seed, "epochs": epochs, "pictures": len(data), "decisions": int(probs["fp32"].size)}
    for low in ("fp16", "bf16"):
        row[f"{low}_flipped"] = int(((probs["fp32"] >= thresholds) != (probs[low] >= thresholds)).sum())
        row[f"{low}_largest_gap"] = float(np.abs(probs["fp32"] - probs[low]).max())
        row[f"{low}_mean_gap"] = float(np.abs(probs["fp32"] - probs[low]).mean())
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None, help="append one JSON line per kind here")
    args = p.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="mlbatch-precision-")
    for kind in args.kinds.split(","):
        row = flips(kind, work, args.seed, args.epochs)
        print(json.dumps(row))
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
