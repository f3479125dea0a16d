"""Threshold policies (issue 21, item 2) and the shifted variants they are measured on (item 1)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import f1_score

from mlbatch.train.metrics import choose_threshold, parse_policy
from mlbatch.synth import SynthConfig, make_dataset


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
    for bad in ("plateau:1", "plateau:-0.1", "shrink:1.5", "fixed:0", "fixed:1", "precision:0", "median", "plateau:"):
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
