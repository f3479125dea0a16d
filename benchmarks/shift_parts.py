"""What each part of the shifted view costs a trained model.

    python -m benchmarks.shift_parts --models /tmp/mlbatch-thresholds/models --out benchmarks/shift-parts-results.jsonl

``--models`` is the ``models`` folder that ``benchmarks/thresholds.py`` trains into: one package per kind
and recipe, named ``KIND-shift`` or ``KIND-shift-RECIPE``. For each kind, the test split of
``thresholds.py``'s shifted dataset (the same seed, so the same 500 scenes) is drawn again in the first
view, through each part of ``synth.new_view`` alone (``frame``: 70-85% of the frame on a plain border;
``balance``: another white balance; ``contrast``: 80% of it; ``blur``), through all of them, which is
the shifted test that ``thresholds.py`` reports, and through all but one (the parts add up to more
than their sum). Each package scores every set with its own
thresholds, beside the F1 the best thresholds for those pictures would give. Nothing is trained here,
and nothing here chooses a default: it says which part of a camera change a recipe does not survive.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from mlbatch.core import manifest
from mlbatch.model.loaded import load_model
from mlbatch.synth import SynthConfig, make_dataset
from mlbatch.synth.dataset import VIEW_PARTS
from mlbatch.train.evaluate import predict_labeled

from .thresholds import _macro_f1, _oracle

VIEWS: dict[str, tuple[str, ...] | None] = {"none": None, **{p: (p,) for p in VIEW_PARTS}, "all": VIEW_PARTS,
                                             **{f"all but {p}": tuple(q for q in VIEW_PARTS if q != p) for p in VIEW_PARTS}}


def pictures(kind: str, view: str, workdir: str, seed: int, count: int) -> str:
    """The manifest of the shifted test's scenes seen through ``VIEWS[view]`` (``none``: the first view)."""
    root = os.path.join(workdir, "views", f"{kind}-{view.replace(' ', '-')}")
    parts = VIEWS[view]
    if not os.path.exists(os.path.join(root, "test.parquet")):
        make_dataset(root, SynthConfig(kind=kind, train=0, val=0, test=count, seed=seed, shift=parts is not None,
                                       view=parts or ()))
    return os.path.join(root, "test.parquet")


def score(model_dir: str, kind: str, workdir: str, seed: int, count: int) -> list[dict]:
    model = load_model(model_dir)
    thresholds = [model.thresholds[x] for x in model.labels]
    recipe = os.path.basename(model_dir.rstrip("/")).removeprefix(f"{kind}-shift").lstrip("-") or "defaults"
    rows = []
    for view in VIEWS:
        data = manifest.read_labeled([pictures(kind, view, workdir, seed, count)], model.labels)
        scores = predict_labeled(model, data)
        rows.append({"kind": kind, "recipe": recipe, "view": view, "threshold_policy": model.meta["training"].get(
                     "threshold_policy"), "test_macro_f1": round(_macro_f1(data.targets, scores, thresholds), 4),
                     "test_oracle_macro_f1": round(_oracle(data.targets, scores), 4)})
        logging.info("%s %s %s: %.3f (best thresholds %.3f)", kind, recipe, view, rows[-1]["test_macro_f1"],
                     rows[-1]["test_oracle_macro_f1"])
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: a row per model, a column per view, package thresholds (best thresholds)."""
    lines = ["| kind | recipe | " + " | ".join(VIEWS) + " |", "| --- | --- |" + " --- |" * len(VIEWS)]
    models = dict.fromkeys((r["kind"], r["recipe"]) for r in rows)
    for kind, recipe in models:
        got = {r["view"]: r for r in rows if (r["kind"], r["recipe"]) == (kind, recipe)}
        cells = [f"{got[v]['test_macro_f1']:.3f} ({got[v]['test_oracle_macro_f1']:.3f})" if v in got else ""
                 for v in VIEWS]
        lines.append(f"| {kind} | {recipe} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", required=True, help="thresholds.py's models folder (KIND-shift[-RECIPE])")
    parser.add_argument("--kinds", default="street,glyphs,shapes")
    parser.add_argument("--workdir", default="/tmp/mlbatch-shift-parts")
    parser.add_argument("--seed", type=int, default=0, help="thresholds.py's --seed, for its test scenes")
    parser.add_argument("--count", type=int, default=500, help="test pictures per view (thresholds.py: 500)")
    parser.add_argument("--out", help="append results here (JSON lines)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    for kind in args.kinds.split(","):
        for name in sorted(os.listdir(args.models)):
            if name == f"{kind}-shift" or name.startswith(f"{kind}-shift-"):
                rows += score(os.path.join(args.models, name), kind, args.workdir, args.seed, args.count)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(table(rows))


if __name__ == "__main__":
    main()
