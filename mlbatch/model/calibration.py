"""Per-label calibration of the network's probabilities: Platt scaling, fitted on validation data.

A label's probability is ``sigmoid(a * z + b)`` for the network's logit ``z``: ``a`` and ``b`` are
fitted on the validation split by logistic regression on the logit (scikit-learn), so that a
``prob_car`` of 0.8 means about 80% of such pictures hold a car. It is monotone, so it reorders
nothing: ranking and average precision stay; thresholds are chosen on the calibrated scores.

The package records it (``calibration`` in ``mlbatch-model.json``) and ``LoadedModel`` applies it
to every prediction, so ``evaluate``, ``predict`` and the labeling job give the same probabilities.
No torch here: the driver and the CLI read it as they read the rest of the description.
"""

from __future__ import annotations

from typing import Any

import numpy as np

METHODS = ("none", "platt")
_EPS = 1e-6


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def fit(labels: list[str], y_true: np.ndarray, scores: np.ndarray, method: str) -> dict[str, Any]:
    """The calibration to record: ``{"method": "none"}`` or Platt's ``a`` and ``b`` per label (unknown truth
    left out; a label with one class only in validation keeps a=1, b=0)."""
    if method not in METHODS:
        raise ValueError(f"calibration {method!r}: choose one of {', '.join(METHODS)}")
    if method == "none":
        return {"method": "none"}
    from sklearn.linear_model import LogisticRegression

    out = {}
    for j, label in enumerate(labels):
        known = ~np.isnan(y_true[:, j])
        y = y_true[known, j].astype(int)
        if y.min(initial=1) == y.max(initial=0):
            out[label] = {"a": 1.0, "b": 0.0}
            continue
        model = LogisticRegression(C=1e4).fit(logit(scores[known, j]).reshape(-1, 1), y)
        out[label] = {"a": float(model.coef_[0, 0]), "b": float(model.intercept_[0])}
    return {"method": "platt", "labels": out}


def coefficients(calibration: dict[str, Any] | None, labels: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """(a, b) arrays in label order, or None when nothing is applied."""
    if not calibration or calibration.get("method", "none") == "none":
        return None
    per = calibration["labels"]
    return (np.array([per[x]["a"] for x in labels], np.float32), np.array([per[x]["b"] for x in labels], np.float32))


def apply(calibration: dict[str, Any] | None, labels: list[str], scores: np.ndarray) -> np.ndarray:
    """Calibrated probabilities from uncalibrated ones (the training loop's validation scores)."""
    ab = coefficients(calibration, labels)
    if ab is None:
        return scores
    return (1 / (1 + np.exp(-(ab[0] * logit(scores) + ab[1])))).astype(np.float32)


def check(calibration: Any, labels: list[str]) -> None:
    """A package's ``calibration`` field: a known method, and bounded numbers for every label."""
    if calibration is None:
        return
    if not isinstance(calibration, dict) or calibration.get("method") not in METHODS:
        raise ValueError(f"calibration: expected {{\"method\": one of {', '.join(METHODS)}, ...}}")
    if calibration["method"] == "platt":
        per = calibration.get("labels")
        if not isinstance(per, dict) or set(per) != set(labels):
            raise ValueError("calibration.labels: expected a and b for every label")
        for label, ab in per.items():
            ok = isinstance(ab, dict) and all(isinstance(ab.get(k), (int, float)) and not isinstance(ab.get(k), bool)
                                              and np.isfinite(ab[k]) and abs(ab[k]) <= 1e3 for k in ("a", "b"))
            if not ok:
                raise ValueError(f"calibration.labels.{label}: expected finite numbers a and b within 1000")
