"""Known inputs for the review and registry tests: a hand-made labeled output, changed model copies, exports."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pyarrow as pa

from mlbatch.core import storage
from mlbatch.core.table import output_columns

LABELS = ["car", "bus"]
# Two runs with different thresholds: a row is measured against its own run's thresholds.
RUNS = {"run-a": {"car": 0.5, "bus": 0.3}, "run-b": {"car": 0.6, "bus": 0.3}}
# (run, id, camera, prob car, prob bus); None: an error row. Per run A/B thresholds, confidence per label is
# (p - t) / (1 - t) above the threshold and (t - p) / t below; a row's is the least of its labels'.
ROWS = [
    ("run-a", "a0", "north", 0.52, 0.90),   # margin .02 (car), confidence .04
    ("run-a", "a1", "south", 0.10, 0.32),   # margin .02 (bus), confidence .02/.7 = .0286
    ("run-a", "a2", "north", 0.95, 0.05),   # margin .25, confidence .8333
    ("run-a", "a3", "north", None, None),   # an error row: never selected
    ("run-b", "b0", "south", 0.55, 0.00),   # margin .05 (car), confidence .05/.6 = .0833
    ("run-b", "b1", "north", 0.61, 0.29),   # margin .01 under run B's thresholds (.11 under run A's), conf .025
]
CONFIDENCE = {"a0": 0.02 / 0.5, "a1": 0.02 / 0.7, "a2": 0.25 / 0.3, "b0": 0.05 / 0.6, "b1": 0.01 / 0.4}


def write_output(folder: str, image_base: str = "/data/images") -> dict[str, str]:
    """A labeled output as ``mlbatch label`` writes it, one file per run; returns {id: image URI}."""
    schema = pa.schema([("id", pa.string()), ("image_uri", pa.string()), ("camera", pa.string()),
                        *output_columns(LABELS)])
    uris = {}
    for run, thresholds in RUNS.items():
        rows = []
        for i, (r, rid, camera, car, bus) in enumerate(x for x in ROWS if x[0] == run):
            uri = f"{image_base}/{rid}.jpg"
            uris[rid] = uri
            ok = car is not None
            positive = [label for label, p in (("car", car), ("bus", bus)) if ok and p >= thresholds[label]]
            rows.append({"id": rid, "image_uri": uri, "camera": camera,
                         "label_car": "car" in positive if ok else None, "label_bus": "bus" in positive if ok else None,
                         "prob_car": car, "prob_bus": bus, "labels": positive if ok else None,
                         "status": "ok" if ok else "error", "error": None if ok else "object not found",
                         "model_name": "street", "model_version": f"v-{run}", "run_id": run,
                         "labeled_at": datetime(2026, 11, 24, tzinfo=timezone.utc),
                         "source_manifest": f"s3://in/{run}.parquet", "source_row": i})
        meta = {"labels": LABELS, "thresholds": thresholds, "model_name": "street", "model_version": f"v-{run}",
                "run_id": run}
        table = pa.Table.from_pylist(rows, schema=schema).replace_schema_metadata({"mlbatch": json.dumps(meta)})
        storage.write_parquet(table, storage.join(folder, f"{run}-f0.parquet"))
    return uris


def changed_copy(src: str, dst: str, bias: float) -> str:
    """The same network with every head's bias moved by ``bias``: a new version (-20: predicts nothing)."""
    import torch

    from mlbatch.model.loaded import load_model
    from mlbatch.model.net import save_package

    model = load_model(src)
    with torch.no_grad():
        for head in model.net.heads:
            head.bias.add_(bias)
    save_package(model.net, dst, model.thresholds, name=model.name)
    return dst


def annotation(choices: list[str] | None, cancelled: bool = False) -> dict:
    """One annotation as Label Studio exports it (``None``: a skip)."""
    result = [] if choices is None else [{"from_name": "labels", "to_name": "image", "type": "choices",
                                          "value": {"choices": choices}}]
    return {"id": 1, "completed_by": 1, "result": result, "was_cancelled": cancelled or choices is None}


def task(task_id: int, row: int, asked: list[str], annotations: list[dict]) -> dict:
    """One task of a Label Studio JSON export, with the data ``review export`` gives it."""
    return {"id": task_id, "annotations": annotations, "predictions": [],
            "data": {"image": f"https://x/{row}.jpg", "image_uri": f"s3://b/{row}.jpg", "source_manifest": "m.parquet",
                     "source_row": row, "id": f"r{row}", "mlbatch_id_column": "id", "mlbatch_labels": asked}}
