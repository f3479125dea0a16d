"""mlbatch: label large image datasets with one shared-backbone multi-label network, on Ray."""

from __future__ import annotations

from typing import Any

__all__ = ["load_model"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # mlbatch.load_model without importing torch for everyone who imports mlbatch (the job's
    # driver and decode tasks, the CLI): torch loads only where a model does.
    if name == "load_model":
        from .model import load_model
        return load_model
    raise AttributeError(f"module 'mlbatch' has no attribute {name!r}")
