"""Evaluating a model package on labeled manifests: the job's own decode and predict, the package's thresholds."""

from __future__ import annotations

import json
import logging

import numpy as np

from ..core import manifest, storage
from ..model.loaded import load_model
from ..model.refs import resolve
from .metrics import Report, compute_metrics, plot_pr_curves, plot_reliability

log = logging.getLogger(__name__)


def predict_labeled(model, data: manifest.LabeledData, batch_size: int = 256, threads: int = 8) -> np.ndarray:
    """Probabilities for every image of ``data`` through ``model.predict`` (the job's path)."""
    scores = []
    for start in range(0, len(data), batch_size):
        pictures = manifest.fetch_decoded(data.image_uris[start:start + batch_size], data.sources[start:start + batch_size],
                                          threads=threads, draft_size=model.spec.image_size)
        scores.append(model.predict(pictures))
    return np.concatenate(scores) if scores else np.zeros((0, len(data.labels)), np.float32)


def evaluate(model_uri: str, manifests: list[str], report_dir: str | None = None) -> Report:
    """Score a model package on labeled manifests with its own thresholds; write a report if asked.

    The report directory gets ``metrics.json``, ``pr_curves.png`` and ``reliability.png`` (calibration).
    """
    resolved = resolve(model_uri)
    model = load_model(resolved)
    data = manifest.read_labeled(manifests, model.labels)
    scores = predict_labeled(model, data)
    report = compute_metrics(model.labels, data.targets, scores, model.thresholds)
    report.model = {"uri": model_uri, "resolved_uri": resolved, "name": model.name, "version": model.version}
    report.data = manifest.expand(manifests)
    if report_dir:
        storage.write_text(storage.join(report_dir, "metrics.json"), json.dumps(report.to_dict(), indent=2) + "\n")
        storage.write_bytes(storage.join(report_dir, "pr_curves.png"),
                            plot_pr_curves(model.labels, data.targets, scores, model.thresholds,
                                           title=f"{model.name} {model.version}: precision-recall per label"))
        storage.write_bytes(storage.join(report_dir, "reliability.png"),
                            plot_reliability(model.labels, data.targets, scores, report.ece_bins,
                                             title=f"{model.name} {model.version}: reliability per label"))
        log.info("wrote report to %s", report_dir)
    return report
