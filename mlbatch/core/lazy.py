"""Names a package offers without importing their modules until asked (PEP 562).

``mlbatch.label.label`` should not cost an import of Ray to whoever imports ``mlbatch.label.config``,
nor ``mlbatch.load_model`` an import of torch to the CLI.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def exports(package: str, names: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's ``__getattr__`` and ``__dir__`` for ``names`` (name -> module relative to ``package``)."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(names[name], package), name)

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__
