"""Nightly annotation: label what arrived since the last night into a dt= partition, watch for drift."""

from ..core.lazy import exports

__all__ = ["DriftError", "NightlyConfig", "NightlyError", "nightly"]
__getattr__, __dir__ = exports(__name__, {"nightly": ".night", "NightlyConfig": ".config", "NightlyError": ".config",
                                          "DriftError": ".config"})
