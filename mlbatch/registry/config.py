"""What a promotion needs, and its defaults in one place: no torch here, so the CLI's ``--help`` reads them."""

from __future__ import annotations

from dataclasses import dataclass

from ..model.refs import CHAMPION

METRICS = ("macro_f1", "micro_f1", "mean_average_precision", "subset_accuracy")  # higher is better


@dataclass
class PromoteConfig:
    """Promote ``candidate`` (``NAME@VERSION``) to champion of ``registry`` if it wins on ``manifests``."""

    candidate: str
    registry: str
    manifests: list[str]
    metric: str = "macro_f1"
    min_gain: float = 0.0          # candidate - champion must be at least this (and above 0)
    max_label_drop: float = 0.05   # no label's F1 may fall by more than this
    attempts: int = 5              # compare-and-swap rounds before giving up
    alias: str = CHAMPION
    backoff: float = 0.05          # seconds: a retry waits a random part of backoff * 2**(retry - 1)
