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

Import (``import_reviews``) reads Label Studio's JSON export (or a CSV with one 0/1 column per label)
and writes a training manifest: ``image_uri``, one boolean column per label, the row's identity,
and ``review_task``, ``review_annotations``. A label the task asked about is true when the
annotators chose it and false when they did not; a label it did not ask about is null (unknown,
masked in training). Cancelled (skipped) annotations do not count; a task left with none is left
out. Annotators who disagree are settled per label by majority; a tie is null, and every
disagreement is reported. A choice outside the label set (another project's export) is an error,
and nothing is written.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any
from xml.sax.saxutils import quoteattr

import pyarrow as pa

from . import storage
from .package import column_name
from .query import THRESHOLDS_VIEW, VIEW, Output

log = logging.getLogger(__name__)

FORMATS = ("labelstudio", "csv", "parquet")
TASK_FILES = {"labelstudio": "tasks.json", "csv": "tasks.csv", "parquet": "tasks.parquet"}
CONFIG_FILE = "config.xml"
SUMMARY_FILE = "export.json"
FROM_NAME, TO_NAME = "labels", "image"        # the names config.xml gives its Choices and Image
LABELS_KEY = "mlbatch_labels"                  # data field: the labels a task asks about
ID_COLUMN_KEY = "mlbatch_id_column"            # data field: which field holds the row's id
IDENTITY = ("source_manifest", "source_row")


class ReviewError(ValueError):
    """An export or import that cannot be done as asked; nothing was written."""


# ---- export ----------------------------------------------------------------------------------

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
    uri_column: str = "image_uri"
    id_column: str | None = None         # a manifest column carried into each task beside source_manifest/row
    s3_images: str = "presign"           # presign: HTTPS URLs valid `expires` seconds; s3: s3:// URIs as they are
    expires: int = 7 * 24 * 3600         # the longest a SigV4 presigned URL may live


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
    p = {c: f"l.{_ident('prob_' + c)}" for c in cols}
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
    if config.s3_images not in ("presign", "s3"):
        raise ReviewError(f"--s3-images {config.s3_images!r}: use presign or s3")
    if not 1 <= config.expires <= 7 * 24 * 3600:
        raise ReviewError(f"--expires {config.expires}: presigned URLs live 1 s to 7 days (604800 s)")


def select_rows(config: ExportConfig) -> tuple[pa.Table, list[str], int]:
    """The chosen rows (with review_confidence and review_margin), the labels reviewed, and rows considered."""
    import duckdb

    _check_export(config)
    out = Output(config.output)
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
                "source_manifest": row["source_manifest"], "source_row": row["source_row"], LABELS_KEY: labels}
        if config.id_column:
            data[config.id_column] = row[config.id_column]
            data[ID_COLUMN_KEY] = config.id_column
        positive = [label for label in labels if row[f"label_{column_name(label)}"]]
        result = [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": positive}}]
        tasks.append({"data": json.loads(json.dumps(data, default=str)),
                      "predictions": [{"model_version": row["model_version"], "score": row["review_confidence"],
                                       "result": result if positive else []}]})
    return tasks


def to_table(rows: pa.Table, labels: list[str], config: ExportConfig) -> pa.Table:
    """The csv/parquet form: the image, identity, model's view, and an empty column per label to fill with 0/1."""
    cols = [column_name(label) for label in labels]
    out = {"image": [image_url(u, config) for u in rows.column(config.uri_column).to_pylist()],
           "image_uri": rows.column(config.uri_column)}
    for name in (*IDENTITY, *([config.id_column] if config.id_column else []), "model_version"):
        out[name] = rows.column(name)
    out["score"] = rows.column("review_confidence")
    out["margin"] = rows.column("review_margin")
    out["predicted"] = [",".join(label for label, c in zip(labels, cols) if row[f"label_{c}"])
                        for row in rows.select([f"label_{c}" for c in cols]).to_pylist()]
    for c in cols:
        out[f"prob_{c}"] = rows.column(f"prob_{c}")
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


# ---- import ----------------------------------------------------------------------------------

@dataclass
class ImportResult:
    output: str
    labels: list[str]
    rows: int                      # reviewed tasks written to the manifest
    tasks: int                     # tasks in the export
    skipped: int                   # tasks without a submitted annotation (skipped, cancelled, never done)
    disagreements: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Reviewed:
    data: dict[str, Any]
    asked: list[str]               # the labels the task asked about
    votes: list[set[str]]          # one set of chosen labels per submitted annotation
    task: int | None
    declared: list[str] = field(default_factory=list)   # the label set the task belongs to


def _parse_json_export(raw: bytes, source: str) -> list[_Reviewed]:
    try:
        tasks = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ReviewError(f"{source}: not JSON ({exc}); expected Label Studio's JSON export") from None
    if not isinstance(tasks, list) or any(not isinstance(t, dict) or "data" not in t for t in tasks):
        raise ReviewError(f"{source}: not a Label Studio JSON export (expected a list of tasks with 'data' and "
                          "'annotations'; export as JSON, not JSON_MIN)")
    out = []
    for task in tasks:
        votes = []
        for annotation in task.get("annotations") or []:
            if annotation.get("was_cancelled"):
                continue
            chosen: set[str] = set()
            for item in annotation.get("result") or []:
                if item.get("type") == "choices":
                    chosen.update(item.get("value", {}).get("choices", []))
            votes.append(chosen)
        asked = list(task["data"].get(LABELS_KEY) or [])
        out.append(_Reviewed(task["data"], asked, votes, task.get("id"), asked))
    return out


def _parse_csv_export(raw: bytes, source: str, labels: list[str] | None) -> list[_Reviewed]:
    """One row per image; a label's cell is 1/true, 0/false, or empty (not reviewed: null)."""
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8-sig")))
    fields = reader.fieldnames or []
    out = []
    for i, row in enumerate(reader):
        declared = json.loads(row[LABELS_KEY]) if row.get(LABELS_KEY) else list(labels or [])
        if not declared:
            raise ReviewError(f"{source}: no {LABELS_KEY} column to say which columns are labels; pass --labels")
        missing = [label for label in declared if label not in fields]
        if missing:
            raise ReviewError(f"{source}: no column for label(s) {', '.join(missing)} (columns: {', '.join(fields)})")
        asked, chosen = [], set()
        for label in declared:
            value = (row[label] or "").strip().lower()
            if value not in ("1", "true", "0", "false", ""):
                raise ReviewError(f"{source}: row {i}: column {label!r} holds {row[label]!r}; expected 0, 1 or empty")
            if value:
                asked.append(label)
            if value in ("1", "true"):
                chosen.add(label)
        data = {k: v for k, v in row.items() if k not in declared}
        if data.get("source_row"):
            data["source_row"] = int(data["source_row"])
        out.append(_Reviewed(data, asked or declared, [chosen] if asked else [], None, declared))
    return out


def _settle(reviewed: _Reviewed, disagreements: list[dict[str, Any]]) -> dict[str, bool | None]:
    """Per label asked: true/false by majority of the annotations; a tie is null. Disagreements are recorded."""
    values: dict[str, bool | None] = {}
    n = len(reviewed.votes)
    for label in reviewed.asked:
        yes = sum(label in chosen for chosen in reviewed.votes)
        values[label] = True if 2 * yes > n else False if 2 * yes < n else None
        if 0 < yes < n:
            disagreements.append({"task": reviewed.task, "image_uri": reviewed.data.get("image_uri"),
                                  "label": label, "yes": yes, "no": n - yes, "outcome": values[label]})
    return values


def import_reviews(export: str, output: str, labels: list[str] | None = None) -> ImportResult:
    """Label Studio's JSON export (or a 0/1 CSV) -> a training manifest at ``output``; see the module docstring."""
    raw = storage.read_bytes(export)
    if export.lower().endswith(".csv"):
        reviewed = _parse_csv_export(raw, export, labels)
    else:
        reviewed = _parse_json_export(raw, export)
    found = list(dict.fromkeys(label for r in reviewed for label in r.declared))
    if labels is None:
        if not found:
            raise ReviewError(f"{export}: its tasks do not say which labels they ask about ({LABELS_KEY}); "
                              "pass --labels")
        labels = found
    for r in reviewed:
        if not r.asked:
            r.asked = list(labels)
        foreign = list(dict.fromkeys(label for label in r.declared + r.asked if label not in labels))
        chosen = sorted(set().union(*r.votes) - set(r.asked)) if r.votes else []
        if foreign or chosen:
            where = f"task {r.task}" if r.task is not None else f"row {r.data.get('image_uri')}"
            raise ReviewError(f"{export}: {where} has label(s) {', '.join(foreign or chosen)} outside "
                              f"{', '.join(labels)}: is this an export of another project? Nothing was written")
        if "image_uri" not in r.data and "image" not in r.data:
            raise ReviewError(f"{export}: task {r.task} has no image_uri (or image) in its data")
    disagreements: list[dict[str, Any]] = []
    rows = []
    for r in reviewed:
        if not r.votes:
            continue
        values = _settle(r, disagreements)
        row = {"image_uri": r.data.get("image_uri") or r.data.get("image"),
               **{label: values.get(label) for label in labels},
               "source_manifest": r.data.get("source_manifest"), "source_row": r.data.get("source_row"),
               "review_task": r.task, "review_annotations": len(r.votes)}
        id_column = r.data.get(ID_COLUMN_KEY)
        row["ids"] = {id_column: r.data.get(id_column)} if id_column else {}
        rows.append(row)
    skipped = len(reviewed) - len(rows)
    if not rows:
        raise ReviewError(f"{export}: no task has a submitted annotation ({skipped} skipped or not done); "
                          "nothing was written")
    storage.write_parquet(_manifest_table(rows, labels), output)
    log.info("review import: %d reviewed rows (%d tasks skipped, %d disagreements) -> %s", len(rows), skipped,
             len(disagreements), output)
    return ImportResult(output, labels, len(rows), len(reviewed), skipped, disagreements)


def _manifest_table(rows: list[dict[str, Any]], labels: list[str]) -> pa.Table:
    columns: dict[str, pa.Array] = {"image_uri": pa.array([r["image_uri"] for r in rows], pa.string())}
    for label in labels:
        columns[label] = pa.array([r[label] for r in rows], pa.bool_())
    columns["source_manifest"] = pa.array([r["source_manifest"] for r in rows], pa.string())
    columns["source_row"] = pa.array([r["source_row"] for r in rows], pa.int64())
    for name in sorted({name for r in rows for name in r["ids"]}):   # ids as strings: JSON may have changed their type
        values = [r["ids"].get(name) for r in rows]
        columns[name] = pa.array([None if v is None else str(v) for v in values], pa.string())
    columns["review_task"] = pa.array([r["review_task"] for r in rows], pa.int64())
    columns["review_annotations"] = pa.array([r["review_annotations"] for r in rows], pa.int64())
    return pa.table(columns)
