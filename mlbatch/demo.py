"""The end-to-end demo on embedded defaults: local files, the local engine (Ray where one is running), no credentials.

    make-dataset -> train -> evaluate (test split) -> register + promote (the first champion)
    night 1: nightly on REGISTRY/NAME@champion -> query
    review export (the least certain rows) -> answers (Label Studio's API when a server is given, else
    the generator's truth written in Label Studio's export format) -> review import
    retrain from the champion with the reviewed rows added (a short time budget) -> register -> promote or refuse
    night 2: nightly on REGISTRY/NAME@champion, whichever version that is now
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

from .core import storage
from .nightly.config import NightlyConfig
from .nightly.night import nightly
from .registry import promotion, store
from .review.export import ExportConfig, ExportResult, export_review
from .review.ingest import ImportResult, import_reviews
from .review.views import query
from .synth import LABELS, SynthConfig, make_dataset
from .train.config import TrainConfig
from .train.evaluate import evaluate
from .train.loop import train
from .train.metrics import Report

log = logging.getLogger(__name__)

EXAMPLE_SQL = ("SELECT camera, count(*) AS images, "
               "sum(CASE WHEN label_car AND label_pedestrian AND NOT label_bus THEN 1 ELSE 0 END) AS car_and_pedestrian_no_bus, "
               "round(avg(prob_pedestrian), 3) AS mean_prob_pedestrian "
               "FROM labels WHERE status = 'ok' GROUP BY camera ORDER BY camera")


@dataclass
class DemoConfig:
    """Sizes and budgets of the demo; ``quick`` ones make a smoke test."""

    synth: SynthConfig = field(default_factory=SynthConfig)
    epochs: int = TrainConfig.epochs
    night_images: int = 400            # pictures arriving each night
    review_rows: int = 100             # the least certain rows of night 1 sent to review
    retrain_epochs: int = 10           # the retraining starts from the champion: fewer epochs (about 45 s)
    label_studio: str | None = None    # a Label Studio server to answer through (its URL), else answers as a file
    label_studio_token: str | None = None
    progress: bool = True


@dataclass
class DemoResult:
    data: dict[str, str]
    model: dict[str, Any]
    report: Report
    summary: dict[str, Any]            # night 1
    sql: str
    answer: Any
    review: ExportResult
    reviewed: ImportResult
    retrained: dict[str, Any]
    decision: promotion.Decision
    night2: dict[str, Any]


def run_demo(workdir: str, config: DemoConfig | None = None) -> DemoResult:
    """Run every step into ``workdir`` and return what each produced."""
    config = config or DemoConfig()
    data = make_dataset(storage.join(workdir, "data"), config.synth)
    model_uri = storage.join(workdir, "model")
    meta = train(TrainConfig(manifests=[data["train"]], val_manifests=[data["val"]], output=model_uri,
                             epochs=config.epochs, progress=config.progress))
    report = evaluate(model_uri, [data["test"]], storage.join(workdir, "report"))
    reg = storage.join(workdir, "registry")
    first = store.register(model_uri, reg)
    promotion.promote(promotion.PromoteConfig(f"{first['name']}@{first['version']}", reg, [data["test"]]))
    champion = f"{reg}/{first['name']}@champion"

    day1 = date.today()
    out = storage.join(workdir, "labels")
    night1 = _night(workdir, champion, out, day1, seed=101, config=config)
    answer = query(out, EXAMPLE_SQL)

    exported = export_review(ExportConfig(output=out, to=storage.join(workdir, "review"),
                                          most_uncertain=config.review_rows, where=f"dt = DATE '{day1}'",
                                          id_column="id"))
    answers = storage.join(workdir, "review", "answers.json")
    storage.write_bytes(answers, _answer(exported, config))
    reviewed_uri = storage.join(workdir, "review", "reviewed.parquet")
    reviewed = import_reviews(answers, reviewed_uri)

    retrained = train(TrainConfig(manifests=[data["train"], reviewed_uri], val_manifests=[data["val"]],
                                  output=storage.join(workdir, "model-2"), backbone_weights=champion,
                                  epochs=config.retrain_epochs,
                                  progress=config.progress))
    second = store.register(storage.join(workdir, "model-2"), reg)
    decision = promotion.promote(promotion.PromoteConfig(f"{second['name']}@{second['version']}", reg, [data["test"]]))
    night2 = _night(workdir, champion, out, day1 + timedelta(days=1), seed=102, config=config)
    return DemoResult(data, meta, report, night1, EXAMPLE_SQL, answer, exported, reviewed, retrained, decision, night2)


def _night(workdir: str, model: str, out: str, day: date, seed: int, config: DemoConfig) -> dict[str, Any]:
    """New pictures arrive (a manifest under incoming/), and the nightly run labels them."""
    arrived = make_dataset(storage.join(workdir, "arrivals", day.isoformat()),
                           SynthConfig(train=0, val=0, test=config.night_images, seed=seed))["test"]
    storage.write_bytes(storage.join(workdir, "incoming", f"{day.isoformat()}.parquet"), storage.read_bytes(arrived))
    return nightly(NightlyConfig(input=storage.join(workdir, "incoming"), model=model, output=out,
                                 date=day.isoformat(), progress=config.progress))


def _answer(exported: ExportResult, config: DemoConfig) -> bytes:
    """The annotators' answers, from the generator's truth, as Label Studio's JSON export."""
    tasks = json.loads(storage.read_text(exported.files["tasks"]))
    truth: dict[str, list[dict[str, Any]]] = {}
    for t in tasks:
        source = t["data"]["source_manifest"]
        if source not in truth:
            truth[source] = storage.read_parquet(source).select(LABELS).to_pylist()

    def chosen(t: dict[str, Any]) -> list[str]:
        row = truth[t["data"]["source_manifest"]][t["data"]["source_row"]]
        return [label for label in exported.labels if row[label]]

    if config.label_studio:
        from .review.labelstudio import LabelStudio

        studio = LabelStudio(config.label_studio, config.label_studio_token or "")
        project = studio.create_project(f"mlbatch demo review ({len(tasks)} rows)",
                                        storage.read_text(exported.files["config"]))
        studio.import_tasks(project, tasks)
        for t in studio.tasks(project):
            studio.annotate(t["id"], chosen(t))
        log.info("answered %d tasks in Label Studio project %d at %s", len(tasks), project, config.label_studio)
        return studio.export(project)
    done = [{"id": i + 1, "data": t["data"], "predictions": t["predictions"],
             "annotations": [{"id": i + 1, "completed_by": 1, "was_cancelled": False,
                              "result": [{"from_name": "labels", "to_name": "image", "type": "choices",
                                          "value": {"choices": chosen(t)}}]}]}
            for i, t in enumerate(tasks)]
    return (json.dumps(done, indent=1) + "\n").encode()
