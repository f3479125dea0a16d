"""Training and evaluation: BCE per label, thresholds chosen on validation, metrics from scikit-learn."""

from ..core.lazy import exports

__all__ = ["TrainConfig", "train"]
__getattr__, __dir__ = exports(__name__, {"train": ".loop", "TrainConfig": ".config"})
