"""mlbatch: label large image datasets with one shared-backbone multi-label network, on Ray."""

from .model import load_model

__all__ = ["load_model"]
__version__ = "0.1.0"
