"""Human review: the rows the model is unsure about out to annotators, their answers back as training data.

Export (``export_review``) picks rows of labeled output with DuckDB (the same views as
``mlbatch query``) and writes, into one folder:

    tasks.json | tasks.csv | tasks.parquet   the rows, as Label Studio tasks or as a table
    config.xml                               Label Studio's labeling config: one Choices, choice="multiple"
    export.json                              what was selected, how, from where, and how many

Every task's ``data`` holds ``image`` (the picture: a presigned HTTPS URL for ``s3://``, or the
URI itself), ``image_uri``, the row's identity (``source_manifest``, ``source_row``, and the id
column if one is named) and ``mlbatch_labels``, the labels this review asks about. Its one
prediction holds the model's positive labels among those, the model version and ``score``, the
row's *confidence* (below): Label Studio sorts and samples by it, least certain first.

Uncertainty. For a probability p and its label's threshold t, the confidence is how far p is
from t on its side, scaled to [0, 1]: (p - t) / (1 - t) when p >= t, else (t - p) / t. A row's
confidence is the least over the labels reviewed, its *uncertainty* 1 - confidence, and its
*margin* the least |p - t|. ``--near-threshold D`` keeps rows whose margin is at most D (some label
within D of its threshold); ``--most-uncertain N`` keeps the N least confident rows. Ties go by
``source_manifest``, ``source_row``.

The answers come back through ``ingest``.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from xml.sax.saxutils import quoteattr

import pyarrow as pa

from ..core import iceberg, manifest, storage
from ..core.table import IDENTITY, column_name, label_column, prob_column
from .views import THRESHOLDS_VIEW, VIEW, output_of

log = logging.getLogger(__name__)

FORMATS = ("labelstudio", "csv", "parquet")
S3_IMAGES = ("presign", "s3")   # S3 pictures as presigned HTTPS URLs, or as s3:// URIs
TASK_FILES = {"labelstudio": "tasks.json", "csv": "tasks.csv", "parquet": "tasks.parquet"}
CONFIG_FILE = "config.xml"
SUMMARY_FILE = "export.json"
FROM_NAME, TO_NAME = "labels", "image"        # the names config.xml gives its Choices and Image
LABELS_KEY = "mlbatch_labels"                  # data field: the labels a task asks about
ID_COLUMN_KEY = "mlbatch_id_column"            # data field: which field holds the row's id


class ReviewError(ValueError):
    """An export or import that cannot be done as asked; nothing was written."""


@dataclass
class ExportConfig:
    """Which rows of labeled output go to review, and how they are written."""

    output: str                          # labeled output: a `label` folder or a `nightly` root
    to: str                              # folder to write tasks, config.xml and export.json into
    near_threshold: float | None = None  # rows with some label's |p - t| <= this
    most_uncertain: int | None = None    # or: the N least confident rows
    labels: list[str] | None = None      # labels to review (default: all the output's labels)
    where: str | None = None             # SQL condition on the `labels` view, e.g. "dt = DATE '2026-11-24'"
    format: str = "labelstudio"
    uri_column: str = manifest.URI_COLUMN
    id_column: str | None = None         # a manifest column carried into each task beside source_manifest/row
    s3_images: str = "presign"           # presign: HTTPS URLs valid `expires` seconds; s3: s3:// URIs as they are
    expires: int = 7 * 24 * 3600         # the longest a SigV4 presigned URL may live
    table: str | None = None             # read this Iceberg table's snapshot of the output, not every file
    catalog: str = iceberg.DEFAULT_CATALOG
    snapshot_id: int | None = None       # default: the table's current snapshot


@dataclass
class ExportResult:
    tasks: int
    labels: list[str]
    files: dict[str, str]
    selection: str
    rows_considered: int


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def selection_sql(labels: list[str], config: ExportConfig) -> str:
    """DuckDB SQL over the views ``labels`` and ``thresholds``: the chosen rows, least confident first."""
    cols = [column_name(label) for label in labels]
    pivot = ", ".join(f"max(threshold) FILTER (WHERE label = {_sql_string(label)}) AS {_ident('t_' + c)}"
                      for label, c in zip(labels, cols))
    p = {c: f"l.{_ident(prob_column(label))}" for label, c in zip(labels, cols)}
    t = {c: f"t.{_ident('t_' + c)}" for c in cols}
    confidence = ", ".join(f"CASE WHEN {p[c]} >= {t[c]} THEN ({p[c]} - {t[c]}) / greatest(1 - {t[c]}, 1e-9) "
                           f"ELSE ({t[c]} - {p[c]}) / greatest({t[c]}, 1e-9) END" for c in cols)
    margin = ", ".join(f"abs({p[c]} - {t[c]})" for c in cols)
    where = f" AND ({config.where})" if config.where else ""
    inner = (f"SELECT l.*, least({confidence}) AS review_confidence, least({margin}) AS review_margin "
             f"FROM {VIEW} AS l JOIN (SELECT run_id, {pivot} FROM {THRESHOLDS_VIEW} GROUP BY run_id) AS t "
             f"ON l.run_id = t.run_id WHERE l.status = 'ok'{where}")
    order = "ORDER BY review_confidence, source_manifest, source_row"
    if config.most_uncertain is not None:
        return f"SELECT * FROM ({inner}) {order} LIMIT {int(config.most_uncertain)}"
    return f"SELECT * FROM ({inner}) WHERE review_margin <= {float(config.near_threshold)} {order}"


def _check_export(config: ExportConfig) -> None:
    if (config.near_threshold is None) == (config.most_uncertain is None):
        raise ReviewError("give exactly one of --near-threshold D and --most-uncertain N")
    if config.near_threshold is not None and not 0.0 <= config.near_threshold <= 1.0:
        raise ReviewError(f"--near-threshold {config.near_threshold}: expected a number in [0, 1]")
    if config.most_uncertain is not None and config.most_uncertain < 1:
        raise ReviewError(f"--most-uncertain {config.most_uncertain}: expected at least 1")
    if config.format not in FORMATS:
        raise ReviewError(f"--format {config.format!r}: use one of {', '.join(FORMATS)}")
    if config.s3_images not in S3_IMAGES:
        raise ReviewError(f"--s3-images {config.s3_images!r}: use presign or s3")
    if not 1 <= config.expires <= 7 * 24 * 3600:
        raise ReviewError(f"--expires {config.expires}: presigned URLs live 1 s to 7 days (604800 s)")


def select_rows(config: ExportConfig) -> tuple[pa.Table, list[str], int]:
    """The chosen rows (with review_confidence and review_margin), the labels reviewed, and rows considered."""
    import duckdb

    _check_export(config)
    out = output_of(config.output, config.table, config.catalog, config.snapshot_id)
    thresholds = out.thresholds()
    known = list(dict.fromkeys(thresholds.column("label").to_pylist()))
    if not known:
        raise ReviewError(f"{config.output}: no mlbatch metadata (thresholds) in its files: is it labeled output?")
    labels = config.labels or known
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise ReviewError(f"--labels: {', '.join(unknown)} not among the output's labels ({', '.join(known)})")
    dataset = out.dataset()
    for column in [config.uri_column, *IDENTITY, *([config.id_column] if config.id_column else [])]:
        if column not in dataset.schema.names:
            raise ReviewError(f"{config.output}: no column {column!r} in the labeled output")
    con = duckdb.connect()
    try:
        con.register(VIEW, dataset)
        con.register(THRESHOLDS_VIEW, thresholds)
        where = f" AND ({config.where})" if config.where else ""
        considered = con.execute(f"SELECT count(*) FROM {VIEW} AS l WHERE l.status = 'ok'{where}").fetchall()[0][0]
        rows = con.sql(selection_sql(labels, config)).to_arrow_table()
    except duckdb.Error as exc:
        raise ReviewError(f"selecting rows: {exc}") from None
    finally:
        con.close()
    return rows, labels, int(considered)


def image_url(uri: str, config: ExportConfig) -> str:
    """What an annotation tool can open: a presigned HTTPS URL for an S3 object (or its s3:// URI), else the URI."""
    if storage.is_s3(uri) and config.s3_images == "presign":
        return storage.presign(uri, config.expires)
    return uri


def labeling_config(labels: list[str]) -> str:
    """Label Studio's labeling config for these labels: an image and one multiple-choice Choices."""
    choices = "\n".join(f"    <Choice value={quoteattr(label)}/>" for label in labels)
    return (f'<View>\n  <Image name="{TO_NAME}" value="$image"/>\n'
            f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="multiple" showInLine="true">\n'
            f"{choices}\n  </Choices>\n</View>\n")


def to_tasks(rows: pa.Table, labels: list[str], config: ExportConfig) -> list[dict[str, Any]]:
    """Label Studio tasks: data (image, identity, labels asked), one prediction with the positive labels."""
    tasks = []
    for row in rows.to_pylist():
        data = {"image": image_url(row[config.uri_column], config), "image_uri": row[config.uri_column],
                **{name: row[name] for name in IDENTITY}, LABELS_KEY: labels}
        if config.id_column:
            data[config.id_column] = row[config.id_column]
            data[ID_COLUMN_KEY] = config.id_column
        positive = [label for label in labels if row[label_column(label)]]
        result = [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": positive}}]
        tasks.append({"data": json.loads(json.dumps(data, default=str)),
                      "predictions": [{"model_version": row["model_version"], "score": row["review_confidence"],
                                       "result": result if positive else []}]})
    return tasks


def to_table(rows: pa.Table, labels: list[str], config: ExportConfig) -> pa.Table:
    """The csv/parquet form: the image, identity, model's view, and an empty column per label to fill with 0/1."""
    out = {"image": [image_url(u, config) for u in rows.column(config.uri_column).to_pylist()],
           "image_uri": rows.column(config.uri_column)}
    for name in (*IDENTITY, *([config.id_column] if config.id_column else []), "model_version"):
        out[name] = rows.column(name)
    out["score"] = rows.column("review_confidence")
    out["margin"] = rows.column("review_margin")
    decisions = rows.select([label_column(label) for label in labels]).to_pylist()
    out["predicted"] = [",".join(label for label in labels if row[label_column(label)]) for row in decisions]
    for label in labels:
        out[prob_column(label)] = rows.column(prob_column(label))
    out[LABELS_KEY] = [json.dumps(labels)] * rows.num_rows
    for label in labels:
        out[label] = pa.nulls(rows.num_rows, pa.bool_())
    return pa.table(out)


def export_review(config: ExportConfig) -> ExportResult:
    """Select the rows to review and write the tasks, the labeling config and a summary into ``config.to``."""
    rows, labels, considered = select_rows(config)
    rule = (f"near-threshold {config.near_threshold}" if config.near_threshold is not None
            else f"most-uncertain {config.most_uncertain}")
    files = {"tasks": storage.join(config.to, TASK_FILES[config.format]),
             "config": storage.join(config.to, CONFIG_FILE), "summary": storage.join(config.to, SUMMARY_FILE)}
    if config.format == "labelstudio":
        storage.write_text(files["tasks"], json.dumps(to_tasks(rows, labels, config), indent=1) + "\n")
    else:
        table = to_table(rows, labels, config)
        if config.format == "parquet":
            storage.write_parquet(table, files["tasks"])
        else:
            import pyarrow.csv as pcsv
            buf = io.BytesIO()
            pcsv.write_csv(table, buf)
            storage.write_bytes(files["tasks"], buf.getvalue())
    storage.write_text(files["config"], labeling_config(labels))
    summary = {"output": config.output, "selection": rule, "where": config.where, "labels": labels,
               "rows_considered": considered, "tasks": rows.num_rows, "format": config.format,
               "s3_images": config.s3_images, "expires_seconds": config.expires if config.s3_images == "presign" else None,
               "model_versions": sorted(set(rows.column("model_version").to_pylist())) if rows.num_rows else [],
               "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "files": files}
    storage.write_text(files["summary"], json.dumps(summary, indent=2) + "\n")
    log.info("review export: %d of %d rows (%s) -> %s", rows.num_rows, considered, rule, config.to)
    return ExportResult(rows.num_rows, labels, files, rule, considered)
