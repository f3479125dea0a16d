"""Review import: Label Studio's answers (or a 0/1 CSV) back as a training manifest.

Import (``import_reviews``) reads Label Studio's JSON export (or a CSV with one 0/1 column per label)
and writes a training manifest: ``image_uri``, one boolean column per label, the row's identity,
and ``review_task``, ``review_annotations``. A label the task asked about is true when the
annotators chose it and false when they did not; a label it did not ask about is null (unknown,
masked in training). Cancelled (skipped) annotations do not count; a task left with none is left
out. Annotators who disagree are settled per label by majority; a tie is null, and every
disagreement is reported. A choice outside the label set (another project's export) is an error,
and nothing is written.

The export is not trusted: every field is checked for its type before it is used, and a bad one is
an ``ExportFieldError`` naming the task (index and id), the field and what was expected. Label
names and the id column become columns of the manifest, so they must be one safe name
(``names.check_segment``) and may not take a column of the manifest or of the output contract
(``core.table``): ``image_uri``, the identity, ``status``, ``run_id``, ``label_*``, ``prob_*`` ...
"""


from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import pyarrow as pa

from ..core import storage
from ..core.manifest import URI_COLUMN
from ..core.names import NameError_, check_segment
from ..core.table import SOURCE_MANIFEST, SOURCE_ROW, label_column, output_columns, prob_column
from .export import ID_COLUMN_KEY, LABELS_KEY, ReviewError

log = logging.getLogger(__name__)

REVIEW_TASK, REVIEW_ANNOTATIONS = "review_task", "review_annotations"   # the columns import adds
IMAGE_KEY = "image"          # data field: what the annotators were shown; the URI when there is no image_uri
# Names a label or the id column may not take, compared without case (DuckDB ignores it): the manifest's own
# columns and every column of the output contract, whose per-label columns are label_<col> and prob_<col>.
_RESERVED_NAMES = (URI_COLUMN, REVIEW_TASK, REVIEW_ANNOTATIONS, *(name for name, _ in output_columns([])))
_RESERVED = frozenset(name.lower() for name in _RESERVED_NAMES)
_RESERVED_PREFIXES = (label_column(""), prob_column(""))
_NOT_JSON_EXPORT = ("not a Label Studio JSON export (expected a list of tasks with 'data' and 'annotations'; "
                    "export as JSON, not JSON_MIN)")
_MISSING = object()


class ExportFieldError(ReviewError):
    """A field of the export that is missing, of the wrong type, or would take a column it may not; nothing written."""


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
    where: str = ""                                      # "task 3 (id 17)" or "row 3", for messages
    id_column: str | None = None                         # the data field holding the row's id


def _found(value: object) -> str:
    """What a field holds, in JSON's words, for an error message."""
    if value is _MISSING:
        return "no such field"
    if value is None:
        return "null"
    kind = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), f"a {type(value).__name__}")
    shown = repr(value)
    return f"{kind} {shown[:60]}{'...' if len(shown) > 60 else ''}"


def _bad(source: str, where: str, name: str, expected: str, value: object) -> ExportFieldError:
    return ExportFieldError(f"{source}: {where}: {name}: expected {expected}, found {_found(value)}; "
                            "nothing was written")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _is_object(value: object) -> bool:
    return isinstance(value, dict)


_LABEL = "a label name (a string)"


def _list_of(source: str, where: str, name: str, value: object, item: str,
             ok: Callable[[Any], bool] | None = None) -> list[Any]:
    """``value`` as a list (null: empty) of ``item`` (each passing ``ok``); else ``ExportFieldError``."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad(source, where, name, f"a list, each {item}", value)
    for k, element in enumerate(value):
        if ok is not None and not ok(element):
            raise _bad(source, where, f"{name}[{k}]", item, element)
    return value


def _chosen(source: str, where: str, j: int, annotation: object) -> tuple[bool, set[str]]:
    """(cancelled, the labels chosen) of one annotation, every field checked."""
    name = f"annotations[{j}]"
    if not isinstance(annotation, dict):
        raise _bad(source, where, name, "an object", annotation)
    cancelled = annotation.get("was_cancelled")
    if cancelled is not None and not isinstance(cancelled, bool):
        raise _bad(source, where, f"{name}.was_cancelled", "true or false", cancelled)
    chosen: set[str] = set()
    for k, item in enumerate(_list_of(source, where, f"{name}.result", annotation.get("result"), "an object",
                                      _is_object)):
        if item.get("type") != "choices":
            continue
        value = item.get("value", {})
        if not isinstance(value, dict):
            raise _bad(source, where, f"{name}.result[{k}].value", "an object with 'choices'", value)
        chosen.update(_list_of(source, where, f"{name}.result[{k}].value.choices", value.get("choices", []),
                               _LABEL, _is_str))
    return bool(cancelled), chosen


def _check_data(source: str, where: str, data: dict[str, Any]) -> str | None:
    """Check the fields of a task's data that import uses; returns its id column (or None)."""
    key = URI_COLUMN if data.get(URI_COLUMN) or IMAGE_KEY not in data else IMAGE_KEY
    uri = data.get(key, _MISSING)
    if not isinstance(uri, str) or not uri.strip():
        raise _bad(source, where, f"data.{key}", f"the image's URI, a non-empty string (in data.{URI_COLUMN} "
                   f"or data.{IMAGE_KEY})", uri)
    if data.get(SOURCE_MANIFEST) is not None and not isinstance(data[SOURCE_MANIFEST], str):
        raise _bad(source, where, f"data.{SOURCE_MANIFEST}", "a string (the manifest the row came from)",
                   data[SOURCE_MANIFEST])
    if data.get(SOURCE_ROW) is not None and not _is_int(data[SOURCE_ROW]):
        raise _bad(source, where, f"data.{SOURCE_ROW}", "an integer (the row's number in its manifest)",
                   data[SOURCE_ROW])
    id_column = data.get(ID_COLUMN_KEY)
    if id_column is None:
        return None
    if not isinstance(id_column, str):
        raise _bad(source, where, f"data.{ID_COLUMN_KEY}", "a column name (a string)", id_column)
    try:
        check_segment(id_column, f"{source}: {where}: data.{ID_COLUMN_KEY}")
    except NameError_ as exc:
        raise ExportFieldError(f"{exc}; nothing was written") from None
    value = data.get(id_column)
    if value is not None and not isinstance(value, (str, int, float)):
        raise _bad(source, where, f"data.{id_column}", "the row's id (a string or a number)", value)
    return id_column


def _parse_json_export(raw: bytes, source: str) -> list[_Reviewed]:
    try:
        tasks = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReviewError(f"{source}: not JSON ({exc}); expected Label Studio's JSON export") from None
    if not isinstance(tasks, list):
        raise ReviewError(f"{source}: {_NOT_JSON_EXPORT}")
    out = []
    for i, task in enumerate(tasks):
        if not isinstance(task, dict):
            raise ExportFieldError(f"{source}: task {i}: expected a task (an object), found {_found(task)}: "
                                   f"{_NOT_JSON_EXPORT}; nothing was written")
        task_id = task.get("id")
        where = f"task {i} (id {task_id!r})"
        if task_id is not None and not _is_int(task_id):
            raise _bad(source, where, "id", "an integer (Label Studio's task id)", task_id)
        data = task.get("data", _MISSING)
        if not isinstance(data, dict):
            raise ExportFieldError(f"{source}: {where}: data: expected an object, found {_found(data)}: "
                                   f"{_NOT_JSON_EXPORT}; nothing was written")
        votes = []
        for j, annotation in enumerate(_list_of(source, where, "annotations", task.get("annotations"), "an object")):
            cancelled, chosen = _chosen(source, where, j, annotation)
            if not cancelled:
                votes.append(chosen)
        asked = list(_list_of(source, where, f"data.{LABELS_KEY}", data.get(LABELS_KEY), _LABEL, _is_str))
        id_column = _check_data(source, where, data)
        out.append(_Reviewed(data, asked, votes, task_id, asked, where, id_column))
    return out


def _parse_csv_export(raw: bytes, source: str, labels: list[str] | None) -> list[_Reviewed]:
    """One row per image; a label's cell is 1/true, 0/false, or empty (not reviewed: null)."""
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8-sig")))
    fields = reader.fieldnames or []
    out = []
    for i, row in enumerate(reader):
        if row.get(LABELS_KEY):
            try:
                declared = json.loads(row[LABELS_KEY])
            except json.JSONDecodeError:
                declared = row[LABELS_KEY]                 # not JSON: reported as the string it is
            declared = list(_list_of(source, f"row {i}", f"column {LABELS_KEY}", declared, _LABEL, _is_str))
        else:
            declared = list(labels or [])
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
            if not data[SOURCE_ROW].strip().isdigit():
                raise _bad(source, f"row {i}", f"column {SOURCE_ROW}", "an integer", data[SOURCE_ROW])
            data[SOURCE_ROW] = int(data[SOURCE_ROW])
        out.append(_Reviewed(data, asked or declared, [chosen] if asked else [], None, declared, f"row {i}"))
    return out


def _check_labels(labels: list[Any], source: str, origin: str) -> list[str]:
    """The label set, each a safe name that takes no column of the manifest or the output contract."""
    for label in labels:
        try:
            check_segment(label, f"{source}: {origin}: label")
        except NameError_ as exc:
            raise ExportFieldError(f"{exc}; nothing was written") from None
    taken = [label for label in labels if _reserved(label)]
    if taken:
        raise ExportFieldError(
            f"{source}: {origin}: label(s) {', '.join(taken)} would overwrite columns of the manifest or of the "
            f"labeled output (no label may be {', '.join(_RESERVED_NAMES)} or start with "
            f"{' or '.join(_RESERVED_PREFIXES)}, case ignored): rename them; nothing was written")
    seen: dict[str, str] = {}
    for label in labels:
        if label.lower() in seen:
            raise ExportFieldError(f"{source}: {origin}: labels {seen[label.lower()]!r} and {label!r} are one "
                                   "column name (case is ignored); nothing was written")
        seen[label.lower()] = label
    return labels


def _reserved(name: str) -> bool:
    lower = name.lower()
    return lower in _RESERVED or lower.startswith(_RESERVED_PREFIXES)


def _settle(reviewed: _Reviewed, disagreements: list[dict[str, Any]]) -> dict[str, bool | None]:
    """Per label asked: true/false by majority of the annotations; a tie is null. Disagreements are recorded."""
    values: dict[str, bool | None] = {}
    n = len(reviewed.votes)
    for label in reviewed.asked:
        yes = sum(label in chosen for chosen in reviewed.votes)
        values[label] = True if 2 * yes > n else False if 2 * yes < n else None
        if 0 < yes < n:
            disagreements.append({"task": reviewed.task, "image_uri": reviewed.data.get(URI_COLUMN),
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
        field_name = f"column {LABELS_KEY}" if export.lower().endswith(".csv") else f"data.{LABELS_KEY}"
        for r in reviewed:                          # name the first task that declares a bad label
            _check_labels(r.declared, export, f"{r.where}: {field_name}")
        labels = _check_labels(found, export, field_name)
    else:
        if not labels:
            raise ReviewError(f"{export}: --labels: the label set is empty")
        labels = _check_labels(list(labels), export, "--labels")
    label_names = {label.lower() for label in labels}
    for r in reviewed:
        if not r.asked:
            r.asked = list(labels)
        foreign = list(dict.fromkeys(label for label in r.declared + r.asked if label not in labels))
        chosen = sorted(set().union(*r.votes) - set(r.asked)) if r.votes else []
        if foreign or chosen:
            where = f"task {r.task}" if r.task is not None else f"row {r.data.get(URI_COLUMN)}"
            raise ReviewError(f"{export}: {where} has label(s) {', '.join(foreign or chosen)} outside "
                              f"{', '.join(labels)}: is this an export of another project? Nothing was written")
        if URI_COLUMN not in r.data and IMAGE_KEY not in r.data:
            raise ReviewError(f"{export}: {r.where} has no {URI_COLUMN} (or {IMAGE_KEY}) in its data")
        if r.id_column and (_reserved(r.id_column) or r.id_column.lower() in label_names):
            raise ExportFieldError(f"{export}: {r.where}: data.{ID_COLUMN_KEY} {r.id_column!r} would overwrite a "
                                   "label column or a column of the manifest or of the labeled output; "
                                   "nothing was written")
    disagreements: list[dict[str, Any]] = []
    rows = []
    for r in reviewed:
        if not r.votes:
            continue
        values = _settle(r, disagreements)
        row = {URI_COLUMN: r.data.get(URI_COLUMN) or r.data.get(IMAGE_KEY),
               **{label: values.get(label) for label in labels},
               SOURCE_MANIFEST: r.data.get(SOURCE_MANIFEST), SOURCE_ROW: r.data.get(SOURCE_ROW),
               REVIEW_TASK: r.task, REVIEW_ANNOTATIONS: len(r.votes)}
        row["ids"] = {r.id_column: r.data.get(r.id_column)} if r.id_column else {}
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
    columns: dict[str, pa.Array] = {URI_COLUMN: pa.array([r[URI_COLUMN] for r in rows], pa.string())}
    for label in labels:
        columns[label] = pa.array([r[label] for r in rows], pa.bool_())
    columns[SOURCE_MANIFEST] = pa.array([r[SOURCE_MANIFEST] for r in rows], pa.string())
    columns[SOURCE_ROW] = pa.array([r[SOURCE_ROW] for r in rows], pa.int64())
    for name in sorted({name for r in rows for name in r["ids"]}):   # ids as strings: JSON may have changed their type
        values = [r["ids"].get(name) for r in rows]
        columns[name] = pa.array([None if v is None else str(v) for v in values], pa.string())
    columns[REVIEW_TASK] = pa.array([r[REVIEW_TASK] for r in rows], pa.int64())
    columns[REVIEW_ANNOTATIONS] = pa.array([r[REVIEW_ANNOTATIONS] for r in rows], pa.int64())
    return pa.table(columns)
