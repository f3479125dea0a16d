"""The labeling job, on Ray Data or on this machine alone (``engine``): plan -> prepare -> pipeline -> commit ->
summary (``job.label``)."""

from ..core.lazy import exports

__all__ = ["JobError", "LabelConfig", "LabelOptions", "label"]
__getattr__, __dir__ = exports(__name__, {"label": ".job", "LabelConfig": ".config", "LabelOptions": ".config",
                                          "JobError": ".config"})
