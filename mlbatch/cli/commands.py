"""The ``mlbatch`` command: one function per sub-command, each calling one library function and printing
what it returns; tests call the same library functions directly. Only this room prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from typing import TYPE_CHECKING, Any, Sequence, TypeVar

from ..train.config import TrainConfig
from .parser import build_parser

T = TypeVar("T")

if TYPE_CHECKING:
    from ..label.config import LabelConfig

OUTPUT_BUSY = 4   # exit code: another live run holds the output's lease; nothing was touched


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # -v is mlbatch's own debug lines: botocore's would print signed requests, session tokens included
    logging.getLogger("mlbatch").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, OSError) as exc:  # our errors say what is wrong; no traceback for them
        print(f"mlbatch {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _make_dataset(args: argparse.Namespace) -> int:
    from ..synth import SynthConfig, make_dataset

    out = make_dataset(args.out, SynthConfig(train=args.train, val=args.val, test=args.test, seed=args.seed,
                                             width=args.width, height=args.height, kind=args.kind,
                                             shift=args.shift))
    for split, uri in out.items():
        print(f"{split:<6} {uri}")
    return 0


def config_of(cls: type[T], args: argparse.Namespace, **parsed: Any) -> T:
    """A configuration dataclass from a command's flags: each field from the flag of its name, then ``parsed``
    (flags named otherwise, or parsed further). The flags' defaults are the fields' (``parser``), so a flag
    left unset leaves the library's default."""
    given = vars(args)
    return cls(**{**{f.name: given[f.name] for f in fields(cls) if f.name in given}, **parsed})


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of ``mlbatch train``'s flags."""
    augment = () if args.augment.strip() == "none" else tuple(a.strip() for a in args.augment.split(",") if a.strip())
    return config_of(TrainConfig, args, manifests=args.manifest, val_manifests=args.val_manifest, augment=augment,
                     labels=[x.strip() for x in args.labels.split(",")] if args.labels else None,
                     backbone_kwargs=dict(args.backbone_kwargs), progress=not args.no_progress)


def _train(args: argparse.Namespace) -> int:
    from ..train.loop import train

    meta = train(train_config(args))
    training = meta["training"]
    val = training["validation"]
    print(f"model {meta['name']} version {meta['version']} -> {args.output}")
    print(f"{meta['backbone']['name']} ({training['mode']}); best epoch {training['best_epoch']} of "
          f"{training['epochs']} ({training['stopped']}); {training['seconds']}s")
    data = training["data"]
    if "val_group_column" in data:
        print(f"validation: {data['val_rows']} rows, {data['val_groups']} of {data['val_groups'] + data['train_groups']} "
              f"groups of {data['val_group_column']!r} (training: {data['train_rows']} rows)")
    print(f"validation macro-F1 {val['macro_f1']:.3f}, mAP {val['map']:.3f}")
    print("thresholds: " + ", ".join(f"{k}={v:.3f}" for k, v in meta["thresholds"].items()))
    return 0


def _convert_weights(args: argparse.Namespace) -> int:
    from ..model.convert import convert_weights

    meta = convert_weights(args.output, args.source)
    print(f"{args.output}: backbone {meta['backbone']} from {meta['source']} (sha256 {meta['source_sha256'][:12]})")
    print(f"train with: --backbone-weights {args.output} [--freeze-backbone]")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from ..train.evaluate import evaluate

    report = evaluate(args.model, args.manifest, args.report)
    print(report.table())
    if args.report:
        print(f"report: {args.report}/metrics.json, {args.report}/pr_curves.png, {args.report}/reliability.png")
    return 0


def label_config(args: argparse.Namespace) -> "LabelConfig":
    """The library's LabelConfig from parsed ``label`` flags (also used by jobs/label_images.py)."""
    from ..label.config import LabelConfig

    return config_of(LabelConfig, args, manifests=args.manifest, thresholds=dict(args.thresholds))


def _label(args: argparse.Namespace) -> int:
    from ..label.config import JobError, OutputBusy
    from ..label.job import label
    from ..label.summary import summary_table

    try:
        summary = label(label_config(args))
    except JobError as exc:
        print(f"mlbatch label: error: {exc}", file=sys.stderr)
        return OUTPUT_BUSY if isinstance(exc, OutputBusy) else 1
    print(summary_table(summary))
    return 0


def _query(args: argparse.Namespace) -> int:
    import duckdb

    from ..review.views import format_table, query

    try:
        table = query(args.output, args.sql, args.table, args.catalog, args.snapshot)
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
        from ..core import storage
        storage.write_bytes(args.out, data)
        print(f"{table.num_rows} rows -> {args.out}")
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    return 0


def _nightly(args: argparse.Namespace) -> int:
    """Exit codes: 0 done, 1 a manifest could not be labeled (or a job-level fault), 3 drift with --fail-on-drift,
    4 another run holds the output."""
    from ..label.config import JobError, OutputBusy
    from ..nightly.config import DriftError, NightlyConfig, NightlyError
    from ..nightly.night import nightly
    from ..nightly.report import nightly_table

    try:
        summary = nightly(config_of(NightlyConfig, args, thresholds=dict(args.thresholds)))
    except NightlyError as exc:  # DriftError included: the night's report first, then the error
        print(nightly_table(exc.summary))
        print(f"mlbatch nightly: error: {exc}", file=sys.stderr)
        return 3 if isinstance(exc, DriftError) else 1
    except JobError as exc:
        print(f"mlbatch nightly: error: {exc}", file=sys.stderr)
        return OUTPUT_BUSY if isinstance(exc, OutputBusy) else 1
    print(nightly_table(summary))
    return 0


def _review(args: argparse.Namespace) -> int:
    from ..review import export, ingest

    if args.review_command == "export":
        result = export.export_review(config_of(export.ExportConfig, args, snapshot_id=args.snapshot))
        print(f"{result.tasks} of {result.rows_considered} rows ({result.selection}; labels "
              f"{', '.join(result.labels)})")
        for what, uri in result.files.items():
            print(f"{what:<8} {uri}")
        return 0
    result = ingest.import_reviews(args.export, args.output, args.labels)
    print(f"{result.rows} reviewed rows of {result.tasks} tasks ({result.skipped} skipped or not annotated) "
          f"-> {result.output}")
    print(f"labels: {', '.join(result.labels)}")
    for d in result.disagreements:
        outcome = "unknown (tie)" if d["outcome"] is None else str(d["outcome"]).lower()
        print(f"disagreement: task {d['task']} {d['image_uri']} {d['label']}: {d['yes']} yes, {d['no']} no "
              f"-> {outcome}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from ..model.package import read_package
    from ..model.refs import resolve
    from ..registry import promotion, store

    if args.models_command == "register":
        result = store.register(args.model, args.registry, args.name)
        print(f"{result['ref']} -> {result['uri']}{'' if result['created'] else ' (already registered)'}")
        return 0
    if args.models_command == "resolve":
        uri = resolve(args.model)
        meta, _ = read_package(uri)
        print(f"{uri}  {meta['name']} {meta['version']}")
        return 0
    try:
        decision = promotion.promote(config_of(promotion.PromoteConfig, args, manifests=args.eval))
    except promotion.PromotionRaceError as exc:   # lost every swap of the alias: nothing changed; run it again
        print(f"mlbatch {args.command} {args.models_command}: error: {exc}", file=sys.stderr)
        return 5
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
    from ..demo import DemoConfig, run_demo
    from ..nightly.report import nightly_table
    from ..review.views import format_table
    from ..synth import SynthConfig

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
