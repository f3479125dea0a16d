"""Measurements of mlbatch on this machine; their history is benchmarks/NOTES.md."""

from __future__ import annotations

import json


def emit(result: dict, out: str | None) -> None:
    """Print one result as a JSON line, and append it to ``out`` when given (a results file)."""
    print(json.dumps(result), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(result) + "\n")
