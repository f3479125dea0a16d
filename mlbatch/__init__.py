"""mlbatch: label large image datasets with one shared-backbone multi-label network, on Ray."""

from __future__ import annotations

from .core.lazy import exports

__version__ = "0.1.0"
__all__ = ["load_model"]
# mlbatch.load_model without importing torch for everyone who imports mlbatch (the job's driver and
# decode tasks, the CLI): torch loads only where a model does.
__getattr__, __dir__ = exports(__name__, {"load_model": ".model.loaded"})
