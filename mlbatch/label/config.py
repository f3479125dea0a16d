"""What a labeling run needs, and every default of it in one place.

``LabelOptions`` is *how* to label (columns, batch and unit sizes, actors, the decoder, limits):
shared by ``mlbatch label`` and ``mlbatch nightly``, whose ``NightlyConfig`` is made of it too.
``LabelConfig`` adds *what* to label (manifests, model, output) and the run's own identity. The
CLI reads its flags' defaults from these fields (``default``). No Ray and no torch here, so
``--help`` starts fast.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from ..core import fetch, images, manifest
from ..core.iceberg import DEFAULT_CATALOG
from ..core.lease import DEFAULT_TTL_SECONDS
from ..model.spec import PRECISIONS

LAYOUTS = ("auto", "fused", "split")
DECODERS = ("pil", "torchvision")  # who decodes: PIL on CPU before predicting, or the predictor (``jpeg``)
MODES = ("error", "overwrite", "append")   # an output holding another run's rows: refuse, replace, add beside
ENGINES = ("auto", "local", "ray")   # who runs the stages: Ray Data, or this machine's process tree (``engine``)


class JobError(RuntimeError):
    """A job-level fault: the run cannot produce a complete, trustworthy output."""


class OutputBusy(JobError):
    """Another live run holds the output's lease: this run touched nothing (the CLI exits 4)."""


@dataclass(kw_only=True)
class LabelOptions:
    """How to label: the flags ``mlbatch label`` and ``mlbatch nightly`` share."""

    engine: str = "auto"                               # auto | local | ray (``engine.choose_engine``)
    uri_column: str = manifest.URI_COLUMN
    id_column: str | None = None                       # checked unique (on the cluster); rows are identified by position
    batch_size: int = 64                               # images per prediction batch (on a GPU, raise it: --batch-size)
    decode_batch_size: int = 64                        # images per decode task (split layout): decoding apart from predicting
    rows_per_unit: int = 10_000                        # rows of one unit of work (a manifest's row range): the resume unit
    concurrency: int | tuple[int, int] | None = None   # predictor actors; default from the cluster
    num_gpus: float | None = None                      # per predictor, 0..1; default 1 where there are GPUs
    require_cuda: bool = False                         # a predictor that cannot use CUDA is an error, not a CPU fallback
    precision: str = "auto"                            # auto | fp32 | fp16 | bf16 (auto: fp16 on CUDA, fp32 on CPU)
    layout: str = "auto"                               # fused | split | auto (split where predictors hold GPUs)
    decode: str = "pil"                                # pil | torchvision (JPEGs decoded on the predictor's device)
    thresholds: dict[str, float] = field(default_factory=dict)  # overrides of the package's thresholds
    max_error_rate: float = 0.05
    max_pixels: int = images.DEFAULT_MAX_PIXELS        # larger images become error rows (decompression bombs)
    max_bytes: int = fetch.DEFAULT_MAX_BYTES           # larger objects become error rows, read no further
    stall_seconds: float = 900.0                       # end the run when no rows are committed this long (0: never)
    lease_seconds: float = DEFAULT_TTL_SECONDS         # the output's lease lives this long unrenewed (a dead holder's)
    progress: bool = True


@dataclass(kw_only=True)
class LabelConfig(LabelOptions):
    """Everything one labeling run needs; the CLI and ``jobs/label_images.py`` fill it from flags."""

    manifests: list[str]
    model: str
    output: str
    run_id: str | None = None
    resume: bool = False
    mode: str = "error"            # the output holds another run's rows: error | overwrite (once committed) | append
    table: str | None = None       # an Iceberg table (NAMESPACE.TABLE) the run is committed to, in one snapshot
    catalog: str = DEFAULT_CATALOG  # its PyIceberg catalog (an embedded SQLite one beside a local output)
    state_dir: str | None = None   # where _run.json, _SUCCESS and _units go (default: the output folder)
    extra_summary: dict[str, Any] = field(default_factory=dict)  # recorded in _run.json (nightly uses it)


def check_choices(config: LabelOptions) -> None:
    """Refuse a named choice or limit no engine knows, before anything is planned or removed."""
    for flag, value, allowed in (("--engine", config.engine, ENGINES), ("--decode", config.decode, DECODERS),
                                 ("--layout", config.layout, LAYOUTS), ("--precision", config.precision, PRECISIONS),
                                 ("--mode", getattr(config, "mode", "error"), MODES)):
        if value not in allowed:
            raise JobError(f"{flag} {value!r}: choose one of {', '.join(allowed)}")
    for flag, value in (("--batch-size", config.batch_size), ("--decode-batch-size", config.decode_batch_size)):
        if value < 1:
            raise JobError(f"{flag} {value}: must be at least 1")
    if config.num_gpus is not None and not 0 <= config.num_gpus <= 1:
        raise JobError(f"--num-gpus {config.num_gpus:g}: GPUs per predictor, from 0 (none) to 1; a predictor uses "
                       "one GPU, so to use more GPUs run more predictors (--concurrency on Ray; the local engine "
                       "starts one per visible GPU), and below 1 several predictors share one GPU")
    if config.stall_seconds < 0:
        raise JobError(f"--stall-seconds {config.stall_seconds:g}: must be 0 (never) or more")


def options_of(config: LabelOptions) -> dict[str, Any]:
    """The ``LabelOptions`` fields of a configuration, to build another from (nightly -> label)."""
    return {f.name: getattr(config, f.name) for f in fields(LabelOptions)}


def default(cls: type, name: str) -> Any:
    """The default of a configuration field: what the CLI shows and uses when a flag is not given."""
    f = cls.__dataclass_fields__[name]
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    raise KeyError(f"{cls.__name__}.{name} has no default")
