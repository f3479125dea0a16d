"""Review import: Label Studio's answers (or a 0/1 CSV) back as a training manifest.

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
from typing import Any

import pyarrow as pa

from ..core import storage
from ..core.table import SOURCE_MANIFEST, SOURCE_ROW
from .export import ID_COLUMN_KEY, LABELS_KEY, ReviewError

log = logging.getLogger(__name__)


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
        if data.get(SOURCE_ROW):
            data[SOURCE_ROW] = int(data[SOURCE_ROW])
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
               SOURCE_MANIFEST: r.data.get(SOURCE_MANIFEST), SOURCE_ROW: r.data.get(SOURCE_ROW),
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
    columns[SOURCE_MANIFEST] = pa.array([r[SOURCE_MANIFEST] for r in rows], pa.string())
    columns[SOURCE_ROW] = pa.array([r[SOURCE_ROW] for r in rows], pa.int64())
    for name in sorted({name for r in rows for name in r["ids"]}):   # ids as strings: JSON may have changed their type
        values = [r["ids"].get(name) for r in rows]
        columns[name] = pa.array([None if v is None else str(v) for v in values], pa.string())
    columns["review_task"] = pa.array([r["review_task"] for r in rows], pa.int64())
    columns["review_annotations"] = pa.array([r["review_annotations"] for r in rows], pa.int64())
    return pa.table(columns)
