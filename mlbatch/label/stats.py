"""Statistics of labeled rows that add up: per output file (in its commit marker), unit, manifest and run.

The run's summary is the sum of its markers' statistics, so nobody re-reads the output.
"""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..core.table import SOURCE_ROW, STATUS_OK, label_column, prob_column

TOP_ERRORS_KEPT = 20          # distinct error messages kept per commit marker (and 5x that per run)
SQUARES_MODULUS = 2 ** 64     # row_square_sum wraps, as numpy's uint64 sums do


@dataclass
class Stats:
    """Counts of some labeled rows (one file, a unit, a manifest, a run) that add up by ``add``.

    ``rows``, ``row_sum`` (the sum of the rows' ``source_row``) and ``row_square_sum`` (the sum of their
    squares, modulo 2**64) tell a unit that is whole from one with any one or two rows missing or
    written twice (``whole``); ``row_square_sum`` is None in markers written before it existed.
    """

    rows: int = 0
    row_sum: int = 0
    row_square_sum: int | None = 0
    ok: int = 0
    positives: dict[str, int] = field(default_factory=dict)
    prob_sums: dict[str, float] = field(default_factory=dict)
    error_counts: dict[str, int] = field(default_factory=dict)  # the commonest error messages

    @property
    def errors(self) -> int:
        return self.rows - self.ok

    def add(self, other: Stats, keep: int = 5 * TOP_ERRORS_KEPT) -> Stats:
        self.rows += other.rows
        self.row_sum += other.row_sum
        squares = (self.row_square_sum, other.row_square_sum)
        self.row_square_sum = None if None in squares else (squares[0] + squares[1]) % SQUARES_MODULUS
        self.ok += other.ok
        for name, n in other.positives.items():
            self.positives[name] = self.positives.get(name, 0) + n
        for name, v in other.prob_sums.items():
            self.prob_sums[name] = self.prob_sums.get(name, 0.0) + v
        counts = collections.Counter(self.error_counts)
        counts.update(other.error_counts)
        self.error_counts = dict(counts.most_common(keep))
        return self

    @classmethod
    def of_table(cls, table: pa.Table, labels: list[str]) -> Stats:
        ok_mask = pc.equal(table.column("status"), STATUS_OK)
        ok = table.filter(ok_mask)
        errors = collections.Counter(table.filter(pc.invert(ok_mask)).column("error").to_pylist())
        positions = table.column(SOURCE_ROW).to_numpy().astype(np.uint64)
        return cls(rows=table.num_rows, row_sum=int(pc.sum(table.column(SOURCE_ROW)).as_py() or 0),
                   row_square_sum=int(np.sum(positions * positions, dtype=np.uint64)), ok=ok.num_rows,
                   positives={x: int(pc.sum(pc.cast(ok.column(label_column(x)), pa.int64())).as_py() or 0)
                              for x in labels},
                   prob_sums={x: float(pc.sum(pc.cast(ok.column(prob_column(x)), pa.float64())).as_py() or 0.0)
                              for x in labels},
                   error_counts=dict(errors.most_common(TOP_ERRORS_KEPT)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stats:
        return cls(**{k: d[k] for k in ("rows", "row_sum", "ok", "positives", "prob_sums", "error_counts")},
                   row_square_sum=d.get("row_square_sum"))

    def per_label(self, thresholds: dict[str, float]) -> dict[str, dict[str, float | None]]:
        return {x: {"positive_rate": round(self.positives.get(x, 0) / self.ok, 6) if self.ok else None,
                    "mean_probability": round(self.prob_sums.get(x, 0.0) / self.ok, 6) if self.ok else None,
                    "threshold": thresholds[x]} for x in thresholds}

    def top_errors(self, n: int = 5) -> list[dict[str, Any]]:
        return [{"error": e, "count": c} for e, c in collections.Counter(self.error_counts).most_common(n)]


def whole(stats: Stats, start: int, stop: int) -> bool:
    """Rows ``[start, stop)`` each once, by their count, the sum of their row numbers and the sum of their squares.

    Count and sum alone pass two compensating faults (rows 1 and 2 missing, 0 and 3 twice); with the squares,
    any one or two rows missing or doubled fail (for row numbers below 2**31, where the modulus cannot hide
    it). Three can still pass ({1, 5, 6} missing, {2, 3, 7} twice): that is the limit of what this proves.
    """
    def squares(n: int) -> int:   # 0**2 + ... + (n - 1)**2
        return (n - 1) * n * (2 * n - 1) // 6
    if stats.rows != stop - start or stats.row_sum != (start + stop - 1) * (stop - start) // 2:
        return False
    return stats.row_square_sum is None or stats.row_square_sum == (squares(stop) - squares(start)) % SQUARES_MODULUS
