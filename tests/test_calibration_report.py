"""Calibration in evaluation reports: the expected calibration error per label and the reliability diagram."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from mlbatch.train.metrics import calibration_bins, compute_metrics, expected_calibration_error, plot_reliability

PNG = b"\x89PNG\r\n\x1a\n"


def _calibrated(per_bin: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities 0.05, 0.15, ... 0.95, each bin's frequency of positives exactly its probability."""
    truth, scores = [], []
    for p in np.arange(10) / 10 + 0.05:
        positives = round(p * per_bin)
        truth += [1.0] * positives + [0.0] * (per_bin - positives)
        scores += [p] * per_bin
    return np.array(truth), np.array(scores)


def test_ece_of_perfectly_calibrated_scores_is_zero():
    y, s = _calibrated()
    assert expected_calibration_error(y, s) == pytest.approx(0.0, abs=1e-12)
    rng = np.random.default_rng(0)  # sampled from the probabilities themselves: close to 0
    p = rng.uniform(size=200_000)
    assert expected_calibration_error((rng.uniform(size=p.size) < p).astype(float), p) < 0.01


def test_ece_of_overconfident_scores_is_the_gap():
    y = np.array([1.0, 0.0] * 50)
    assert expected_calibration_error(y, np.full(100, 0.9)) == pytest.approx(0.4)
    # two bins, weighted by their rows: 30 rows at 0.9 with 60% positives, 70 at 0.1 with none
    y = np.array([1.0] * 18 + [0.0] * 12 + [0.0] * 70)
    s = np.array([0.9] * 30 + [0.1] * 70)
    assert expected_calibration_error(y, s) == pytest.approx(0.3 * 0.3 + 0.7 * 0.1)


def test_bins_count_every_known_row_and_match_calibration_curve():
    y, s = _calibrated()
    mean_pred, observed, counts = calibration_bins(y, s)
    assert counts.tolist() == [20] * 10
    np.testing.assert_allclose(mean_pred, np.arange(10) / 10 + 0.05)
    np.testing.assert_allclose(observed, mean_pred)
    mean_pred, observed, counts = calibration_bins(np.array([1.0, 0.0]), np.array([0.95, 0.92]), n_bins=5)
    assert counts.tolist() == [0, 0, 0, 0, 2] and np.isnan(mean_pred[:4]).all()
    assert (mean_pred[4], observed[4]) == (pytest.approx(0.935), 0.5)


def test_unknown_truth_is_left_out_of_ece():
    y = np.array([1.0, 0.0] * 50 + [np.nan] * 40)
    s = np.array([0.9] * 100 + [0.01] * 40)  # the unknown rows would pull the ECE anywhere else
    assert expected_calibration_error(y, s) == pytest.approx(0.4)
    assert calibration_bins(y, s)[2].sum() == 100
    assert np.isnan(expected_calibration_error(np.full(5, np.nan), np.full(5, 0.5)))


def test_report_carries_ece_per_label_and_macro_in_dict_and_table():
    ya, sa = _calibrated()
    yb = np.array([1.0, 0.0] * 100)
    yb[:20] = np.nan  # unknown truth for some rows of b only
    sb = np.full(200, 0.9)
    r = compute_metrics(["a", "b"], np.stack([ya, yb], axis=1), np.stack([sa, sb], axis=1), {"a": 0.5, "b": 0.5})
    a, b = r.per_label
    assert a.ece == pytest.approx(0.0, abs=1e-12) and b.ece == pytest.approx(0.4)
    assert r.macro_ece == pytest.approx(0.2) and r.ece_bins == 10
    d = json.loads(json.dumps(r.to_dict()))
    assert [m["ece"] for m in d["per_label"]] == [pytest.approx(0.0, abs=1e-12), pytest.approx(0.4)]
    assert d["macro_ece"] == pytest.approx(0.2) and d["ece_bins"] == 10
    table = r.table()
    assert "ECE" in table.splitlines()[0]
    assert "0.400" in next(line for line in table.splitlines() if line.startswith("b "))
    assert "macro-ECE 0.200" in table
    assert compute_metrics(["a"], ya[:, None], sa[:, None], {"a": 0.5}, n_bins=5).ece_bins == 5


def test_reliability_diagram_is_a_png():
    y, s = _calibrated()
    y2 = np.where(np.arange(y.size) % 3 == 0, np.nan, 1 - y)
    png = plot_reliability(["a", "b", "never known"], np.stack([y, y2, np.full(y.size, np.nan)], axis=1),
                           np.stack([s, s, s], axis=1))
    assert png.startswith(PNG)
    from PIL import Image
    assert Image.open(io.BytesIO(png)).size[0] > 0


def test_evaluate_writes_the_reliability_diagram_and_ece(small_model, small_dataset, tmp_path):
    from PIL import Image

    from mlbatch.train.evaluate import evaluate

    report = evaluate(small_model, [small_dataset["test"]], report_dir=str(tmp_path / "report"))
    png = (tmp_path / "report" / "reliability.png").read_bytes()
    assert png.startswith(PNG) and len(png) > 1000
    image = Image.open(io.BytesIO(png))
    image.verify()
    assert (tmp_path / "report" / "pr_curves.png").exists()
    assert all(0.0 <= m.ece <= 1.0 for m in report.per_label)
    assert report.macro_ece == pytest.approx(np.mean([m.ece for m in report.per_label]))
    written = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert [m["ece"] for m in written["per_label"]] == pytest.approx([m.ece for m in report.per_label])
    assert written["macro_ece"] == pytest.approx(report.macro_ece) and written["ece_bins"] == 10
    assert "macro-ECE" in report.table()
