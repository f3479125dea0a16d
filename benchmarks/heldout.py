"""The held-out judge: defaults chosen on the project's kinds, judged on photographs that are not in the project.

    python -m benchmarks.heldout --photos /path/to/photos --out benchmarks/heldout-results.jsonl

``--photos`` is a folder of photographs (PNG or JPEG) outside the project: ``subjects/`` holds one per
label, ``backgrounds/`` at least two (the figures in NOTES.md used sample photographs that
scikit-image 0.26 and scikit-learn ship, which the project neither contains nor depends on). Each 96x96 picture is a
crop of a background with one to three patches of subjects on it; a patch is cut from the left 60%
of its subject for training and validation, and from the right 40% for the test: a shift of view the
defaults never saw. Nothing here chooses a default: the defaults were set before it ran.

For each recipe (``--recipe 'NAME=KEY=VALUE;KEY=VALUE'``, ``pretrained_lite0=True`` for EfficientNet-Lite0's
ImageNet weights; ``defaults`` is ``mlbatch train`` as shipped), one model is trained; for the package's
own thresholds and for each threshold policy (chosen on validation) it reports test macro-F1, beside
the F1 the best test thresholds would give (no policy can know them), the macro ECE and the training time.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mlbatch.core import manifest
from mlbatch.model.loaded import load_model
from mlbatch.train import TrainConfig, train
from mlbatch.train.evaluate import predict_labeled
from mlbatch.train.metrics import choose_thresholds

from .thresholds import POLICIES, _macro_ece, _macro_f1, _oracle, calibrated, parse_recipe, train_settings

SIZE = 96
COUNTS = {"train": 2400, "val": 500, "test": 600}


def _photos(folder: str) -> list[tuple[str, Image.Image]]:
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".png", ".jpg", ".jpeg")))
    photos = [(os.path.splitext(n)[0], Image.open(os.path.join(folder, n)).convert("RGB")) for n in names]
    if len(photos) < 2:
        raise SystemExit(f"{folder}: {len(photos)} photographs, need at least 2")
    return photos


def _crop(rng: np.random.Generator, img: Image.Image, side: int, x0: float, x1: float) -> Image.Image:
    """A square crop of ``img`` (about a third of its height) from the horizontal band [x0, x1) of it."""
    w, h = img.size
    box = int(min(h, (x1 - x0) * w) * rng.uniform(0.35, 0.6))
    left = int(rng.uniform(x0 * w, x1 * w - box))
    top = int(rng.uniform(0, h - box))
    return img.crop((left, top, left + box, top + box)).resize((side, side), Image.BILINEAR)


def make(folder: str, out: str, seed: int = 0) -> dict[str, str]:
    """Write the pictures and the three manifests (``id``, ``image_uri``, one truth column per subject)."""
    subjects, backgrounds = _photos(os.path.join(folder, "subjects")), _photos(os.path.join(folder, "backgrounds"))
    labels = [name.replace("-", "_") for name, _ in subjects]
    uris = {}
    for s, (split, count) in enumerate(COUNTS.items()):
        rows = []
        band = (0.6, 1.0) if split == "test" else (0.0, 0.6)
        os.makedirs(os.path.join(out, "images", split), exist_ok=True)
        for i in range(count):
            rng = np.random.default_rng([seed, s, i])
            canvas = _crop(rng, backgrounds[int(rng.integers(len(backgrounds)))][1], SIZE, 0.0, 1.0)
            present = rng.random(len(subjects)) < 0.25
            if not present.any():
                present[int(rng.integers(len(subjects)))] = True
            for j in np.flatnonzero(present)[:3]:
                side = int(rng.integers(30, 46))
                canvas.paste(_crop(rng, subjects[j][1], side, *band),
                             (int(rng.integers(0, SIZE - side)), int(rng.integers(0, SIZE - side))))
            kept = np.zeros(len(subjects), bool)
            kept[np.flatnonzero(present)[:3]] = True
            path = os.path.abspath(os.path.join(out, "images", split, f"{i:05d}.jpg"))
            buf = io.BytesIO()
            canvas.save(buf, "JPEG", quality=90)
            with open(path, "wb") as f:
                f.write(buf.getvalue())
            rows.append({"id": f"{split}-{i:05d}", "image_uri": path, **{x: bool(k) for x, k in zip(labels, kept)}})
        uris[split] = os.path.join(out, f"{split}.parquet")
        pq.write_table(pa.Table.from_pylist(rows), uris[split])
    return uris


def judge(data: dict[str, str], out: str, recipe: dict, workdir: str) -> list[dict]:
    """Train with ``recipe`` (TrainConfig overrides) once; for the package's own thresholds and for every
    policy (chosen on validation, as ``train`` chooses), the test as ``mlbatch evaluate`` would see it."""
    settings = train_settings(recipe, workdir)
    seconds = None
    if not os.path.exists(os.path.join(out, "mlbatch-model.json")):
        started = time.monotonic()
        train(TrainConfig(manifests=[data["train"]], val_manifests=[data["val"]], output=out, progress=False,
                          **settings))
        seconds = round(time.monotonic() - started, 1)
    model = load_model(out)
    val, test = (manifest.read_labeled([data[s]], model.labels) for s in ("val", "test"))
    raw = {"val": predict_labeled(model, val), "test": predict_labeled(model, test)}
    by_calibration = calibrated(model, val.targets, raw)
    y = test.targets
    rows = []
    for method, scores in by_calibration.items():
        common = {"calibration": method, "train_seconds": seconds,
                  "test_oracle_macro_f1": round(_oracle(y, scores["test"]), 4),
                  "test_macro_ece": _macro_ece(y, scores["test"])}
        for policy in ["package", *POLICIES]:
            if policy == "package" and method == "platt":
                continue  # the package's thresholds were chosen on the uncalibrated scores
            chosen = model.thresholds if policy == "package" else choose_thresholds(model.labels, val.targets,
                                                                                   scores["val"], policy)
            ts = [chosen[x] for x in model.labels]
            rows.append({"policy": policy, **common,
                         "val_macro_f1": round(_macro_f1(val.targets, scores["val"], ts), 4),
                         "test_macro_f1": round(_macro_f1(y, scores["test"], ts), 4),
                         "thresholds": {x: round(t, 3) for x, t in zip(model.labels, ts)}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", required=True, help="a folder of photographs outside the project")
    parser.add_argument("--workdir", default="/tmp/mlbatch-heldout")
    parser.add_argument("--recipe", action="append", default=[], metavar="NAME=KEY=VALUE;KEY=VALUE",
                        help="a recipe to judge besides the defaults, e.g. "
                             "'before=threshold_policy=f1;augment=(\"shift\",\"color\")'")
    parser.add_argument("--no-defaults", action="store_true", help="only the --recipe models")
    parser.add_argument("--out", default=None, help="append results here (JSON lines)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data_dir = os.path.join(args.workdir, "data")
    data = ({s: os.path.join(data_dir, f"{s}.parquet") for s in COUNTS}
            if os.path.exists(os.path.join(data_dir, "test.parquet")) else make(args.photos, data_dir))
    for name, recipe in ([] if args.no_defaults else [("defaults", {})]) + [parse_recipe(r) for r in args.recipe]:
        settings = {k: list(v) if isinstance(v, tuple) else v for k, v in recipe.items()}
        for row in judge(data, os.path.join(args.workdir, "models", name), recipe, args.workdir):
            row = {"recipe": name, "settings": settings, **row}
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
