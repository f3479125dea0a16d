"""Evaluation methodology: per-label metrics, threshold selection, reports.

Thresholds are chosen per label on *validation* data (``choose_thresholds``) and only
applied to test data (``evaluate.evaluate``). Unknown truth (NaN) is left out per label. The numbers
come from scikit-learn so they mean what everyone expects them to mean. Calibration (how far each label's
probabilities are from the frequencies they promise) is the expected calibration error over equal-width bins.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import (accuracy_score, average_precision_score, f1_score, hamming_loss,
                             precision_recall_curve, precision_recall_fscore_support)


log = logging.getLogger(__name__)


# ---- thresholds ----------------------------------------------------------------------------

POLICIES = "'guarded:W', 'smooth:W', 'f1', 'plateau:D', 'shrink:A', 'fixed:T' or 'precision:P'"
LOGIT_LIMIT = 16.0     # scores are clipped to sigmoid(+-16): float32 sigmoids saturate beyond
LOGIT_STEP = 0.01      # the grid the smoothed F1 is evaluated on
GUARD = 0.01           # guarded: a smoothed validation F1 gain over 0.5 smaller than this is taken for noise


def parse_policy(policy: str) -> tuple[str, float | None]:
    """``f1``; ``guarded:W`` and ``smooth:W`` (0 < W <= 8); ``plateau:D`` (0 <= D < 1); ``shrink:A``
    (0 <= A <= 1); ``fixed:T`` (0 < T < 1); ``precision:P`` (0 < P <= 1)."""
    if policy == "f1":
        return "f1", None
    kind, _, value = policy.partition(":")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    bounds = {"guarded": (0.0, 8.0, False, True), "smooth": (0.0, 8.0, False, True), "plateau": (0.0, 1.0, True, False), "shrink": (0.0, 1.0, True, True),
              "fixed": (0.0, 1.0, False, False), "precision": (0.0, 1.0, False, True)}
    if kind in bounds:
        low, high, low_in, high_in = bounds[kind]
        if (low < number or (low_in and number == low)) and (number < high or (high_in and number == high)):
            return kind, number
    raise ValueError(f"unknown threshold policy {policy!r}: use {POLICIES}")


def smoothed_f1(y_true: np.ndarray, y_score: np.ndarray, width: float) -> tuple[np.ndarray, np.ndarray]:
    """F1 over a grid of thresholds in logit space, and its average over a Gaussian of ``width`` logits.

    The average at t is the F1 that threshold t would give, in expectation, if every logit moved by
    an amount drawn from N(0, width^2): the same scores seen through another camera, another season.
    Returns (grid of logits, smoothed F1).
    """
    from scipy.ndimage import gaussian_filter1d
    from scipy.special import logit

    logits = np.clip(logit(np.asarray(y_score, dtype=np.float64)), -LOGIT_LIMIT, LOGIT_LIMIT)   # 0, 1 -> +-inf -> +-16
    grid = np.arange(-LOGIT_LIMIT - 4 * width, LOGIT_LIMIT + 4 * width + LOGIT_STEP / 2, LOGIT_STEP)
    positives, negatives = np.sort(logits[y_true == 1]), np.sort(logits[y_true == 0])
    tp = len(positives) - np.searchsorted(positives, grid, side="left")   # predicted positive: logit >= t
    fp = len(negatives) - np.searchsorted(negatives, grid, side="left")
    f1 = 2 * tp / np.maximum(tp + fp + len(positives), 1)
    return grid, gaussian_filter1d(f1.astype(np.float64), width / LOGIT_STEP, mode="nearest")


def _smooth_threshold(y_true: np.ndarray, y_score: np.ndarray, width: float, guard: float | None = None) -> float:
    """The peak of ``smoothed_f1``; where it is flat, the middle of the flat top (in logit space). With
    ``guard``: 0.5 instead, unless the peak beats the smoothed F1 at 0.5 by at least ``guard``."""
    grid, f1 = smoothed_f1(y_true, y_score, width)
    if guard is not None and f1[np.argmin(np.abs(grid))] > f1.max() - guard:
        return 0.5
    top = f1 >= f1.max() - 1e-9
    peak = int(np.argmax(f1))
    start, end = peak, peak   # the run of the flat top that holds the first peak
    while end + 1 < len(top) and top[end + 1]:
        end += 1
    return float(1 / (1 + np.exp(-(grid[start] + grid[end]) / 2)))


def choose_threshold(y_true: np.ndarray, y_score: np.ndarray, policy: str = "f1") -> float:
    """One label's decision threshold from validation truth (0/1) and scores.

    ``smooth:W``: the peak of validation F1 averaged over a Gaussian of W logits (``smoothed_f1``): the
    threshold with the most room on both sides. Where validation separates the classes it lands in the
    middle of the gap between them (in logit space), not at an edge; a narrow spike of F1 that a small
    validation set places by chance weighs less than a wide plateau. ``guarded:W``: 0.5, which BCE
    training calibrates, unless that peak beats the smoothed F1 at 0.5 by ``GUARD`` or more: validation
    moves a threshold only for a gain that is not within the noise of a few hundred pictures (the guard is
    fixed, not scaled by a label's positives). ``f1``: the threshold that maximises F1. ``plateau:D``: the median of the thresholds whose F1
    is within D of the best, the middle of the plateau rather than its spike, which a small
    validation set places by chance. ``shrink:A``: A times the F1 threshold plus (1 - A) times 0.5.
    ``fixed:T``: T. ``precision:P``: the lowest threshold whose precision reaches P (the most recall
    at that precision); if none does, the threshold of the highest precision, with a warning.
    A label with no positive (or no negative) example gets 0.5.
    """
    kind, value = parse_policy(policy)
    if kind == "fixed":
        return float(value)
    y_true = np.asarray(y_true).astype(int)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.sum() == 0 or y_true.sum() == len(y_true):
        log.warning("no %s examples to choose a threshold from: using 0.5",
                    "positive" if y_true.sum() == 0 else "negative")
        return 0.5
    if kind in ("smooth", "guarded"):
        return _smooth_threshold(y_true, y_score, value, GUARD if kind == "guarded" else None)
    precision, recall, thresholds = precision_recall_curve(y_true, y_score)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    if kind in ("f1", "plateau", "shrink"):
        f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision),
                       where=(precision + recall) > 0)
        best = float(thresholds[int(np.argmax(f1))])
        if kind == "f1":
            return best
        if kind == "shrink":
            return float(value * best + (1 - value) * 0.5)
        return float(np.median(thresholds[f1 >= f1.max() - value]))
    reaching = np.flatnonzero(precision >= value)
    if len(reaching) == 0:
        best_at = int(np.argmax(precision))
        log.warning("no threshold reaches precision %.3f (best %.3f): using the best", value, precision[best_at])
        return float(thresholds[best_at])
    return float(thresholds[reaching[0]])  # thresholds ascend: the first is the lowest


def choose_thresholds(labels: list[str], y_true: np.ndarray, y_score: np.ndarray, policy: str = "f1") -> dict[str, float]:
    """Per-label thresholds; unknown truth (NaN) is left out of each label's choice."""
    out = {}
    for j, label in enumerate(labels):
        known = ~np.isnan(y_true[:, j])
        out[label] = choose_threshold(y_true[known, j], y_score[known, j], policy)
    return out


# ---- calibration ---------------------------------------------------------------------------

ECE_BINS = 10


def calibration_bins(y_true: np.ndarray, y_score: np.ndarray,
                     n_bins: int = ECE_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One label's equal-width bins over [0, 1]: mean predicted probability, observed frequency, row count.

    Rows whose truth is unknown (NaN) are left out. Empty bins have count 0 and NaN means. The means are
    scikit-learn's ``calibration_curve`` (which drops empty bins); the counts use the same bin edges.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, not {n_bins}")
    y_true = np.asarray(y_true, dtype=np.float64).ravel()
    y_score = np.clip(np.asarray(y_score, dtype=np.float64).ravel(), 0.0, 1.0)
    known = ~np.isnan(y_true)
    yt, ys = y_true[known].astype(int), y_score[known]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], ys), minlength=n_bins)  # calibration_curve's binning
    mean_pred, observed = np.full(n_bins, np.nan), np.full(n_bins, np.nan)
    if len(yt):
        observed[counts > 0], mean_pred[counts > 0] = calibration_curve(yt, ys, n_bins=n_bins, strategy="uniform")
    return mean_pred, observed, counts


def expected_calibration_error(y_true: np.ndarray, y_score: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE of one label: sum over bins of (bin rows / known rows) * |observed frequency - mean probability|.

    Unknown truth (NaN) is left out; NaN when no row's truth is known.
    """
    mean_pred, observed, counts = calibration_bins(y_true, y_score, n_bins)
    filled = counts > 0
    if not filled.any():
        return float("nan")
    return float(np.sum(counts[filled] * np.abs(observed[filled] - mean_pred[filled])) / counts.sum())


# ---- metrics -------------------------------------------------------------------------------

@dataclass
class LabelMetrics:
    label: str
    threshold: float
    precision: float
    recall: float
    f1: float
    average_precision: float
    support: int          # known positives
    known: int            # rows whose truth for this label is known
    predicted_positive_rate: float
    ece: float = float("nan")  # expected calibration error over the known rows, ``Report.ece_bins`` bins


@dataclass
class Report:
    per_label: list[LabelMetrics]
    micro_f1: float
    macro_f1: float
    mean_average_precision: float
    subset_accuracy: float
    hamming_loss: float
    rows: int
    macro_ece: float = float("nan")  # the mean of the labels' ECE (labels with known truth)
    ece_bins: int = ECE_BINS
    model: dict[str, Any] = field(default_factory=dict)
    data: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """A plain-text table, one line per label and a summary."""
        head = f"{'label':<16}{'thresh':>8}{'prec':>8}{'recall':>8}{'f1':>8}{'AP':>8}{'ECE':>8}{'support':>9}{'pred+':>8}"
        lines = [head, "-" * len(head)]
        for m in self.per_label:
            lines.append(f"{m.label:<16}{m.threshold:>8.3f}{m.precision:>8.3f}{m.recall:>8.3f}{m.f1:>8.3f}"
                         f"{_fmt(m.average_precision):>8}{_fmt(m.ece):>8}{m.support:>9d}{m.predicted_positive_rate:>8.3f}")
        lines.append("-" * len(head))
        lines.append(f"rows {self.rows}   micro-F1 {self.micro_f1:.3f}   macro-F1 {self.macro_f1:.3f}   "
                     f"mAP {_fmt(self.mean_average_precision)}   subset accuracy {self.subset_accuracy:.3f}   "
                     f"Hamming loss {self.hamming_loss:.4f}   macro-ECE {_fmt(self.macro_ece)} "
                     f"({self.ece_bins} bins)")
        return "\n".join(lines)


def _fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def compute_metrics(labels: list[str], y_true: np.ndarray, y_score: np.ndarray,
                    thresholds: dict[str, float], n_bins: int = ECE_BINS) -> Report:
    """All metrics for truth (0/1/NaN) and scores, decisions at ``thresholds``; ECE over ``n_bins`` bins."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_score = np.asarray(y_score, dtype=np.float64)
    t = np.asarray([thresholds[label] for label in labels])
    y_pred = (y_score >= t).astype(int)
    known = ~np.isnan(y_true)
    truth = np.where(known, y_true, 0).astype(int)
    per_label = []
    for j, label in enumerate(labels):
        k = known[:, j]
        yt, yp, ys = truth[k, j], y_pred[k, j], y_score[k, j]
        p, r, f, _ = precision_recall_fscore_support(yt, yp, average="binary", zero_division=0)
        ap = average_precision_score(yt, ys) if yt.any() else float("nan")
        per_label.append(LabelMetrics(label, float(t[j]), float(p), float(r), float(f), float(ap), int(yt.sum()),
                                      int(k.sum()), float(yp.mean()) if len(yp) else float("nan"),
                                      expected_calibration_error(yt, ys, n_bins)))
    # micro-F1 and Hamming loss over every known (row, label) cell
    micro = f1_score(truth[known], y_pred[known], zero_division=0) if known.any() else float("nan")
    hamming = hamming_loss(truth[known], y_pred[known]) if known.any() else float("nan")
    full = known.all(axis=1)  # subset accuracy needs the whole truth of a row
    subset = accuracy_score(truth[full], y_pred[full]) if full.any() else float("nan")
    aps = [m.average_precision for m in per_label if not math.isnan(m.average_precision)]
    eces = [m.ece for m in per_label if not math.isnan(m.ece)]
    return Report(per_label=per_label, micro_f1=float(micro), macro_f1=float(np.mean([m.f1 for m in per_label])),
                  mean_average_precision=float(np.mean(aps)) if aps else float("nan"),
                  subset_accuracy=float(subset), hamming_loss=float(hamming), rows=int(len(y_true)),
                  macro_ece=float(np.mean(eces)) if eces else float("nan"), ece_bins=n_bins)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    return buf.getvalue()


def plot_pr_curves(labels: list[str], y_true: np.ndarray, y_score: np.ndarray, thresholds: dict[str, float],
                   title: str = "") -> bytes:
    """PNG bytes: each label's precision-recall curve with its threshold marked."""
    fig, ax = _pyplot().subplots(figsize=(6, 5), dpi=100)
    for j, label in enumerate(labels):
        known = ~np.isnan(y_true[:, j])
        yt, ys = y_true[known, j].astype(int), y_score[known, j]
        if not yt.any():
            continue
        precision, recall, thr = precision_recall_curve(yt, ys)
        line, = ax.plot(recall, precision, label=f"{label} (AP {average_precision_score(yt, ys):.3f}, "
                                                 f"threshold {thresholds[label]:.2f})")
        pred = ys >= thresholds[label]
        p_at = (yt[pred].mean() if pred.any() else 1.0)
        r_at = pred[yt == 1].mean()
        ax.plot([r_at], [p_at], "o", color=line.get_color(), markersize=8)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(title or "precision-recall per label (dots: decision thresholds)")
    return _png(fig)


def plot_reliability(labels: list[str], y_true: np.ndarray, y_score: np.ndarray, n_bins: int = ECE_BINS,
                     title: str = "") -> bytes:
    """PNG bytes: a reliability diagram, one line per label (mean probability against observed frequency
    per bin, the diagonal is perfect calibration) over the rows per bin; unknown truth is left out."""
    y_true, y_score = np.asarray(y_true, dtype=np.float64), np.asarray(y_score, dtype=np.float64)
    fig, (top, bottom) = _pyplot().subplots(2, 1, figsize=(6, 7), dpi=100, sharex=True,
                                            gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfectly calibrated")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    for j, label in enumerate(labels):
        mean_pred, observed, counts = calibration_bins(y_true[:, j], y_score[:, j], n_bins)
        if not counts.any():
            continue
        filled = counts > 0
        ece = expected_calibration_error(y_true[:, j], y_score[:, j], n_bins)
        line, = top.plot(mean_pred[filled], observed[filled], "o-", markersize=5, label=f"{label} (ECE {ece:.3f})")
        bottom.stairs(counts, edges, color=line.get_color(), linewidth=1.5)
    top.set_ylabel("observed frequency of the label")
    top.set_xlim(0, 1)
    top.set_ylim(-0.02, 1.02)
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=8)
    top.set_title(title or f"reliability per label ({n_bins} equal-width bins)")
    bottom.set_yscale("symlog", linthresh=1)
    bottom.set_xlabel("predicted probability")
    bottom.set_ylabel("rows per bin")
    bottom.grid(alpha=0.3)
    return _png(fig)
