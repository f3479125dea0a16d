"""Threshold policies (issues 21 and 37) and the shifted variants they are measured on."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import f1_score

from mlbatch.train.config import TrainConfig
from mlbatch.train.metrics import choose_threshold, parse_policy, smoothed_f1
from mlbatch.synth import SynthConfig, make_dataset


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.asarray(z, dtype=np.float64)))


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def _labeled(negatives: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Truth and scores for validation rows whose logits are ``negatives`` and ``positives``."""
    return np.r_[np.zeros(len(negatives)), np.ones(len(positives))], _sigmoid(np.r_[negatives, positives])


def test_a_gap_that_validation_leaves_between_the_classes_is_split_in_the_middle_not_at_an_edge():
    """Perfectly separable (negatives' logits in [-8, -4], positives' in [2, 6]): every threshold in the gap has
    F1 1. ``smooth`` takes its middle (logit -1); the default keeps 0.5 (logit 0), well inside it; ``f1`` takes
    the positives' edge, which a shift of view pushes rows across."""
    rng = np.random.default_rng(0)
    y, s = _labeled(rng.uniform(-8, -4, 300), rng.uniform(2, 6, 60))
    assert -1.5 < _logit(choose_threshold(y, s, "smooth:0.5")) < -0.5
    assert choose_threshold(y, s, TrainConfig.threshold_policy) == 0.5
    assert _logit(choose_threshold(y, s, "f1")) == pytest.approx(_logit(s[y == 1].min()))
    # both classes below 0.5 (a model that under-scores a label): 0.5 would miss every positive, so the
    # default moves, to the middle of the gap (logit -7), not to the positives' edge (logit -5)
    y, s = _labeled(rng.uniform(-12, -9, 300), rng.uniform(-5, -1, 60))
    assert -7.5 < _logit(choose_threshold(y, s, TrainConfig.threshold_policy)) < -6.5
    # the classes far apart (issue 37's 0.999): not a positive's score, and not near either class
    y, s = _labeled(rng.uniform(-14, -9, 300), rng.uniform(3, 15, 60))
    for policy in (TrainConfig.threshold_policy, "smooth:0.5"):
        assert -8 < _logit(choose_threshold(y, s, policy)) < 2, policy


def test_a_narrow_spike_of_f1_loses_to_a_wide_plateau():
    """F1 is 1 only between two tight clusters 0.01 logits apart (the spike), and 0.96 on either side of them
    over logits wide (the plateaus): the spike is where a small validation set placed a few rows by chance."""
    rng = np.random.default_rng(0)
    y, s = _labeled(np.r_[rng.uniform(-6, -3, 100), np.linspace(-0.55, -0.5, 4)],
                    np.r_[rng.uniform(1, 4, 50), np.linspace(-0.49, -0.45, 4)])
    assert _logit(choose_threshold(y, s, "f1")) == pytest.approx(-0.49)   # the spike's edge
    for policy in (TrainConfig.threshold_policy, "smooth:0.5", "smooth:2"):
        chosen = _logit(choose_threshold(y, s, policy))
        assert chosen < -0.8 or chosen > -0.2, (policy, chosen)            # well away from the spike
        assert f1_score(y, s >= _sigmoid(chosen)) > 0.96


def test_the_default_moves_from_one_half_only_on_evidence_larger_than_validations_noise():
    """guarded: 0.5 unless the smoothed validation F1 elsewhere beats it by GUARD (0.01)."""
    from mlbatch.train.metrics import GUARD
    y, s = _noisy_validation(2000)                      # calibrated-ish: the F1 peak near 0.5 is noise
    grid, smooth = smoothed_f1(y, s, 0.5)
    assert smooth.max() - smooth[np.argmin(np.abs(grid))] < GUARD
    assert choose_threshold(y, s, "guarded:0.5") == 0.5
    assert choose_threshold(y, s, "smooth:0.5") != 0.5
    y, s = y, _sigmoid(_logit_array(s) - 2.5)           # the same model under-scoring by 2.5 logits: it moves
    assert choose_threshold(y, s, "guarded:0.5") == pytest.approx(choose_threshold(y, s, "smooth:0.5"))
    assert choose_threshold(y, s, "guarded:0.5") < 0.2


def _logit_array(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1 - p))


def test_a_label_with_no_positive_or_no_negative_example_gets_one_half():
    for y in (np.zeros(40), np.ones(40)):
        for policy in (TrainConfig.threshold_policy, "smooth:1", "f1", "plateau:0.05"):
            assert choose_threshold(y, np.linspace(0.01, 0.99, 40), policy) == 0.5


def test_smoothed_f1_is_f1_averaged_over_a_shift_of_every_logit():
    """The smoothed curve at t is the mean F1 of threshold t over shifts of the logits drawn from N(0, W^2)."""
    y, s = _noisy_validation(400)
    grid, smooth = smoothed_f1(y, s, 1.0)
    logits = np.log(s / (1 - s))
    shifts = np.random.default_rng(1).normal(0, 1.0, 20000)
    for t in (-1.0, 0.0, 0.7):
        predicted = logits[None, :] + shifts[:, None] >= t               # one row per shift
        tp = (predicted & y[None, :]).sum(axis=1)
        expected = np.mean(2 * tp / (predicted.sum(axis=1) + y.sum()))
        assert smooth[np.argmin(np.abs(grid - t))] == pytest.approx(expected, abs=0.004)


def _noisy_validation(n: int = 2000, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    return y, 1 / (1 + np.exp(-(rng.normal(0, 1.3, n) + np.where(y, 1.6, -1.6))))


def test_plateau_is_the_median_of_the_thresholds_within_d_of_the_best_f1():
    y, s = _noisy_validation(300)
    candidates = np.unique(s)
    f1 = np.array([f1_score(y, s >= t) for t in candidates])
    for d in (0.0, 0.01, 0.05):
        expected = np.median(candidates[f1 >= f1.max() - d - 1e-12])
        assert choose_threshold(y, s, f"plateau:{d}") == pytest.approx(expected, abs=1e-9)
    assert choose_threshold(y, s, "plateau:0") == pytest.approx(choose_threshold(y, s, "f1"))


def test_the_plateau_moves_less_than_the_spike_when_the_validation_set_is_drawn_again():
    y, s = _noisy_validation()
    rng = np.random.default_rng(3)
    draws = [rng.choice(len(y), 150, replace=True) for _ in range(40)]
    spread = {p: np.std([choose_threshold(y[i], s[i], p) for i in draws]) for p in ("f1", "plateau:0.05")}
    assert spread["plateau:0.05"] < 0.8 * spread["f1"], spread


def test_shrink_and_fixed_and_the_refusals():
    y, s = _noisy_validation(300)
    best = choose_threshold(y, s, "f1")
    assert choose_threshold(y, s, "shrink:0.5") == pytest.approx(0.5 * best + 0.25)
    assert choose_threshold(y, s, "shrink:1") == pytest.approx(best)
    assert choose_threshold(y, s, "fixed:0.3") == 0.3
    for bad in ("plateau:1", "plateau:-0.1", "shrink:1.5", "fixed:0", "fixed:1", "precision:0", "median", "plateau:",
                "smooth:0", "smooth:9", "smooth"):
        with pytest.raises(ValueError, match="unknown threshold policy"):
            parse_policy(bad)


def test_a_shifted_variant_changes_only_the_test_pictures(tmp_path):
    plain = make_dataset(str(tmp_path / "plain"), SynthConfig(kind="glyphs", train=4, val=3, test=5, seed=2))
    shifted = make_dataset(str(tmp_path / "shift"), SynthConfig(kind="glyphs", train=4, val=3, test=5, seed=2,
                                                                shift=True))
    for split in ("train", "val", "test"):
        a, b = pq.read_table(plain[split]), pq.read_table(shifted[split])
        labels = [c for c in a.column_names if c not in ("id", "image_uri", "split")]
        assert a.select(labels).equals(b.select(labels)), split              # the truth holds in either view
        same = [open(u, "rb").read() == open(v, "rb").read()
                for u, v in zip(a.column("image_uri").to_pylist(), b.column("image_uri").to_pylist())]
        assert all(same) if split != "test" else not any(same), split
