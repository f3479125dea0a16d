"""The end-to-end demo on embedded defaults: local files, a local Ray instance, no credentials.

    make-dataset -> train -> evaluate (test split) -> label (test split, on Ray) -> query
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from . import storage
from .evaluate import Report, evaluate
from .job import LabelConfig, label
from .query import query
from .synth import SynthConfig, make_dataset
from .train import TrainConfig, train

log = logging.getLogger(__name__)

EXAMPLE_SQL = ("SELECT camera, count(*) AS images, "
               "sum(CASE WHEN label_car AND label_pedestrian AND NOT label_bus THEN 1 ELSE 0 END) AS car_and_pedestrian_no_bus, "
               "round(avg(prob_pedestrian), 3) AS mean_prob_pedestrian "
               "FROM labels WHERE status = 'ok' GROUP BY camera ORDER BY camera")


@dataclass
class DemoResult:
    data: dict[str, str]
    model: dict[str, Any]
    report: Report
    summary: dict[str, Any]
    sql: str
    answer: Any


def run_demo(workdir: str, synth: SynthConfig = SynthConfig(), epochs: int = TrainConfig.epochs,
             progress: bool = True) -> DemoResult:
    """Run every step into ``workdir`` (data/, model/, report/, labels/) and return what each produced."""
    data = make_dataset(storage.join(workdir, "data"), synth)
    model_uri = storage.join(workdir, "model")
    meta = train(TrainConfig(manifests=[data["train"]], val_manifests=[data["val"]], output=model_uri,
                             epochs=epochs, progress=progress))
    report = evaluate(model_uri, [data["test"]], storage.join(workdir, "report"))
    out = storage.join(workdir, "labels")
    summary = label(LabelConfig(manifests=[data["test"]], model=model_uri, output=out, id_column="id",
                                progress=progress))
    return DemoResult(data, meta, report, summary, EXAMPLE_SQL, query(out, EXAMPLE_SQL))
