"""The ``mlbatch`` command's flags. Their defaults are read from the configuration dataclasses
(``TrainConfig``, ``LabelOptions``, ``NightlyConfig``), the one place each is written. Nothing here
imports torch or Ray, so ``--help`` starts in about a second.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..label.config import DECODERS, ENGINES, LAYOUTS, MODES, PRECISIONS, LabelConfig, LabelOptions, default
from ..nightly.config import NightlyConfig
from ..registry.config import METRICS, PromoteConfig
from ..review.export import FORMATS, S3_IMAGES, ExportConfig

from .help import EPILOG, MODEL_HELP
from .training_parsers import add_training_parsers


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


class _Renamed(argparse.Action):
    """A flag's old name, still accepted (hidden from ``--help``): sets the new flag and says it was renamed."""

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs):
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"mlbatch: warning: {option_string} is now {self.new}; the old name will be removed",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


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
                   help="keep the units a killed run committed and label only the rest (refused when anything "
                        "that changes a row differs from the first try: manifests, model version, thresholds, "
                        "--decode, --max-pixels, --uri-column, --rows-per-unit)")
    _add_table_arguments(p, "also commit each run to this Apache Iceberg table, in one snapshot (its files as "
                            "they are: add_files); readers of the table see whole runs only (docs/querying.md)")
    p.add_argument("--mode", choices=MODES, default=default(LabelConfig, "mode"),
                   help="when the output already holds rows of another run: error refuses (so a second run "
                        "cannot double them), overwrite replaces them once this run has committed, append adds "
                        "this run beside them (default: %(default)s)")


def _add_table_arguments(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--table", default=None, metavar="NAMESPACE.TABLE", help=what)
    p.add_argument("--catalog", default=default(LabelConfig, "catalog"),
                   help="the table's PyIceberg catalog, as .pyiceberg.yaml or PYICEBERG_CATALOG__* configure it; "
                        "without one, an embedded SQLite catalog in OUT/_iceberg/ (default: %(default)s)")


def _add_job_tuning(p: argparse.ArgumentParser) -> None:
    """How to label, in the groups ``--help`` shows; the Ray-only flags apart."""
    g = p.add_argument_group('which engine')
    g.add_argument("--engine", choices=ENGINES, default=default(LabelOptions, "engine"),
                   help="ray: Ray Data on the cluster; local: this machine alone, one process tree without Ray "
                        "(no ~12 s of Ray start-up; the same output, resume and lease); auto: ray when RAY_ADDRESS "
                        "is set (a cluster, `ray job submit`, KubeRay) or a Ray instance is running on this "
                        "machine (`ray start`: a warm start), else local (default: %(default)s)")
    g = p.add_argument_group('reading the manifests')
    g.add_argument("--uri-column", default=default(LabelOptions, "uri_column"), help="manifest column holding image URIs (default: %(default)s)")
    g.add_argument("--id-column", default=None,
                   help="manifest column of unique ids that users join on; checked unique on the cluster "
                        "(rows are always known by position: source_manifest, source_row)")
    g.add_argument("--rows-per-unit", type=int, default=default(LabelOptions, "rows_per_unit"), metavar="N",
                   help="rows of one unit of work (a row range of one manifest): the unit is written, "
                        "committed and resumed whole (default: %(default)s)")
    g.add_argument("--rows-per-file", dest="rows_per_unit", type=int, action=_Renamed, new="--rows-per-unit")
    g = p.add_argument_group('predicting')
    g.add_argument("--batch-size", type=int, default=default(LabelOptions, "batch_size"),
                   help="images per prediction batch; on a GPU larger batches keep it busy (default: %(default)s)")
    g.add_argument("--threshold", dest="thresholds", type=_threshold, action="append", default=[],
                   metavar="NAME=VALUE",
                   help="override one label's decision threshold from the model package; repeatable")
    g.add_argument("--precision", choices=PRECISIONS, default=default(LabelOptions, "precision"),
                   help="what predictors compute in: auto is fp16 mixed precision on CUDA and fp32 on a CPU. Part "
                        "of a run's identity: a --resume on another device or precision is refused, so one "
                        "output never mixes them (default: %(default)s)")
    g.add_argument("--decode", choices=DECODERS, default=default(LabelOptions, "decode"),
                   help="pil: decode on CPU (JPEGs at reduced scale), the pixels training and `predict` use; "
                        "torchvision: the predictor decodes JPEGs on its own device (nvJPEG on a GPU: for GPU "
                        "nodes whose CPUs cannot keep up; PIL for anything else), probabilities move slightly "
                        "(default: %(default)s)")
    g.add_argument("--num-gpus", type=float, default=None, metavar="F",
                   help="GPUs per predictor, 0 to 1 (0.5: two predictors share each GPU). On Ray it is asked for "
                        "whether or not the cluster has GPUs yet (an autoscaler adds GPU nodes; the run waits up "
                        "to --stall-seconds for one); the local engine starts predictors on every visible GPU "
                        "(CUDA_VISIBLE_DEVICES narrows them) (default: 1 where there are GPUs, else 0)")
    g.add_argument("--require-cuda", action="store_true",
                   help="a predictor that cannot use CUDA (no GPU, or a torch build the driver cannot serve) "
                        "ends the run before any row is labeled, naming the torch build and the driver, "
                        "instead of predicting on the CPU")
    g = p.add_argument_group('bad input and one writer')
    g.add_argument("--max-pixels", type=int, default=default(LabelOptions, "max_pixels"), metavar="N",
                   help="refuse images larger than this many pixels as decompression bombs (default: %(default)s)")
    g.add_argument("--max-bytes", type=int, default=default(LabelOptions, "max_bytes"), metavar="N", help="an image "
                   "object over N bytes is an error row, read no further (default: %(default)s)")
    g.add_argument("--max-error-rate", type=_fraction, default=default(LabelOptions, "max_error_rate"), metavar="F",
                   help="fail the run when more than this share of rows are errors (default: %(default)s)")
    g.add_argument("--lease-seconds", type=float, default=default(LabelOptions, "lease_seconds"), metavar="S",
                   help="one run writes an output at a time: it holds the output's lease (OUT/_lease.json) and "
                        "renews it every S/3 seconds; a second run exits 4, touching nothing, until the lease is "
                        "released or, if its holder died, S seconds after its last renewal (default: %(default)s)")
    g = p.add_argument_group("Ray's engine only", 'the local engine has one labeler per device, and a deadline on every fetch and decode')
    g.add_argument("--concurrency", type=_concurrency, default=None, metavar="N|MIN,MAX",
                   help="predictor actors: a fixed count or an autoscaling range "
                        "(default: one per GPU, or one per 2 CPUs without GPUs)")
    g.add_argument("--layout", choices=LAYOUTS, default=default(LabelOptions, "layout"),
                   help="fused: each predictor actor reads, fetches, decodes and predicts its units (no pixels "
                        "cross processes; best on CPU); split: decode tasks feed predictor actors (keeps GPUs "
                        "fed); auto: split when predictors hold GPUs, else fused (default: %(default)s)")
    g.add_argument("--decode-batch-size", type=int, default=default(LabelOptions, "decode_batch_size"), metavar="N",
                   help="images per decode task in the split (GPU) layout, apart from --batch-size, so many small "
                        "decode tasks feed one large prediction batch (default: %(default)s)")
    g.add_argument("--stall-seconds", type=float, default=default(LabelOptions, "stall_seconds"), metavar="S",
                   help="end the run, naming what it waits for, when it makes no progress (no rows committed, "
                        "nothing moving through Ray Data) for S seconds; a --resume can follow. Any value is "
                        "honoured, Ray Data's own 1800 s limit included (0: wait forever; default: %(default)s). "
                        "Ray's engine only: the local engine gives each fetch and decode its own deadline")


def add_nightly_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``mlbatch nightly`` (shared with ``jobs/nightly.py``)."""
    p.add_argument("--input", required=True, metavar="URI", help="prefix where new manifests arrive")
    p.add_argument("--model", required=True, metavar="MODEL_URI", help=MODEL_HELP)
    p.add_argument("--output", required=True, metavar="OUT_URI", help="output table root; partitions dt=YYYY-MM-DD")
    p.add_argument("--date", default=None, metavar="YYYY-MM-DD", help="partition date (default: today, UTC)")
    p.add_argument("--relabel", action="store_true",
                   help="label again every manifest the current model version has not labeled yet, "
                        "including those labeled by older versions")
    p.add_argument("--drift-window", type=int, default=default(NightlyConfig, "drift_window"), metavar="N",
                   help="compare with this many trailing runs (default: %(default)s)")
    p.add_argument("--drift-bound", type=float, default=default(NightlyConfig, "drift_bound"), metavar="F",
                   help="report a label whose positive rate or mean probability moved more than this "
                        "(absolute) from the trailing mean (default: %(default)s)")
    p.add_argument("--fail-on-drift", action="store_true", help="exit non-zero when drift is reported")
    _add_table_arguments(p, "also commit each night to this Apache Iceberg table, in one snapshot: its new files "
                            "added, a changed manifest's old files dropped; readers of the table see whole nights "
                            "only (docs/querying.md)")
    _add_job_tuning(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlbatch",
        description="Label large image datasets with one shared-backbone multi-label network on Ray.",
        epilog=EPILOG,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="mlbatch's debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add_training_parsers(sub)

    p = sub.add_parser("query", help="run SQL over labeled output (DuckDB); the table is called 'labels'",
                       epilog=EPILOG, description="Expose every Parquet file under OUT_URI (all dt= partitions, "
                                                  "dt as a column) as the view 'labels' and run SQL on it.")
    p.add_argument("output", metavar="OUT_URI", help="labeled output folder (local or s3://)")
    p.add_argument("sql", metavar="SQL", help='e.g. "SELECT count(*) FROM labels WHERE label_car"')
    p.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table",
                   help="output format (default: %(default)s)")
    p.add_argument("--out", default=None, metavar="PATH", help="write the result here instead of printing it")
    p.add_argument("--max-rows", type=int, default=50, help="rows printed as a table (default: %(default)s)")
    _add_table_arguments(p, "read the files of this Iceberg table's snapshot instead of every file under OUT_URI "
                            "(what a reader of the table sees: whole runs only)")
    p.add_argument("--snapshot", type=int, default=None, metavar="ID", help="a snapshot id (default: the current)")

    p = sub.add_parser("demo", help="the whole pipeline on synthetic data, locally, in a few minutes",
                       description="make-dataset, train, evaluate, register the model as champion, label a night's "
                                   "arrivals with the local engine (nightly on REGISTRY/NAME@champion; on Ray "
                                   "where one is running) and query them, export the least certain rows for "
                                   "review, answer them from the generator's truth (through Label Studio's API with "
                                   "--label-studio, else as a file in its export format), import the answers, "
                                   "retrain from the champion with them, promote or refuse, and label the next night "
                                   "on the champion. Needs no credentials and downloads nothing.")
    p.add_argument("--workdir", default="mlbatch-demo", help="where to write everything (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a small dataset and 3 epochs: a smoke test, not a model")
    p.add_argument("--label-studio", default=None, metavar="URL",
                   help="answer the review through this Label Studio server (e.g. http://127.0.0.1:8080)")
    p.add_argument("--label-studio-token", default=os.environ.get("LABEL_STUDIO_API_KEY"), metavar="TOKEN",
                   help="its legacy API token (default: $LABEL_STUDIO_API_KEY)")

    p = sub.add_parser("label", help="label the images of Parquet manifests (on Ray, or this machine alone)",
                       epilog=EPILOG,
                       description="Stream manifests' images through the model (a pool of Ray actors on a cluster, "
                                   "or this machine's cores with --engine local, the default where no Ray is there "
                                   "to use) and write the manifests back out with label_*, prob_*, labels and "
                                   "status columns.")
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
    p.add_argument("--format", choices=FORMATS, default=default(ExportConfig, "format"),
                   help="labelstudio: tasks.json; csv/parquet: one row per image with an empty column per label to "
                        "fill with 0/1 (default: %(default)s)")
    p.add_argument("--id-column", default=None, help="a manifest column to carry into each task (e.g. id)")
    p.add_argument("--uri-column", default=default(ExportConfig, "uri_column"),
                   help="column holding image URIs (default: %(default)s)")
    p.add_argument("--s3-images", choices=S3_IMAGES, default=default(ExportConfig, "s3_images"),
                   help="S3 images as presigned HTTPS URLs, or as s3:// URIs for a tool that reads the bucket itself "
                        "(default: %(default)s)")
    p.add_argument("--expires", type=int, default=default(ExportConfig, "expires"), metavar="SECONDS",
                   help="how long presigned URLs stay valid (default: %(default)s, 7 days, the most S3 allows)")
    _add_table_arguments(p, "pick from the files of this Iceberg table's snapshot instead of every file under "
                            "OUT_URI (whole runs only)")
    p.add_argument("--snapshot", type=int, default=None, metavar="ID", help="a snapshot id (default: the current)")

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
                    "Exit codes: 0 promoted (or already champion), 3 refused, 2 bad input (nothing changed), "
                    "5 other promotions moved the champion during every attempt (nothing changed; run it again).")
    p.add_argument("candidate", metavar="NAME@VERSION")
    p.add_argument("--registry", required=True, metavar="URI", help="registry root (local or s3://)")
    p.add_argument("--eval", action="append", required=True, metavar="MANIFEST",
                   help="labeled evaluation manifest with every label's truth; repeatable")
    p.add_argument("--metric", default=default(PromoteConfig, "metric"), choices=METRICS,
                   help="what the candidate must improve (default: %(default)s)")
    p.add_argument("--min-gain", type=float, default=default(PromoteConfig, "min_gain"), metavar="G",
                   help="the least improvement that promotes; the gain must also be above 0 (default: %(default)s)")
    p.add_argument("--max-label-drop", type=float, default=default(PromoteConfig, "max_label_drop"), metavar="D",
                   help="refuse if any label's F1 falls by more than this (default: %(default)s)")

    p = msub.add_parser("resolve", help="print the package a model URI or registry reference names", epilog=EPILOG,
                        description="Resolve REGISTRY/NAME@champion or REGISTRY/NAME@VERSION to its package URI "
                                    "and version, as label, nightly and evaluate do.")
    p.add_argument("model", metavar="MODEL_URI")
