"""The learning rate over a training run.

Both schedules warm up over the first epoch (from a tenth of the rate to all of it). Then:

- ``cosine`` (the default): anneal along half a cosine to zero at the end of the run, the run being
  the epochs that fit the time budget at the pace of the epochs so far (at most ``epochs``), planned
  again after every epoch: a busy machine shortens it, and a first epoch slowed by a passing load
  does not cut it short for good. The rest of the cosine is spread over the epochs left, so the rate
  never jumps, up or down. The run is planned, so patience does not end it; of the epochs within
  ``MIN_DELTA`` of the best validation mAP the latest, most annealed one is kept. Why: some labels
  are learnt late (on the shapes kind a network sits at one validation mAP for ten epochs before it
  tells a circle from a square, and a rate cut during that wait stops it there), and annealed
  weights transfer better to a new view when the training's own view is already learnt
  (validation mAP 0.999 on glyphs).
- ``plateau`` (the old default): cut the rate by ``PLATEAU_FACTOR`` whenever validation mAP has not
  improved for ``PLATEAU_EPOCHS`` epochs; patience ends the run; the best epoch is kept.

Measured in benchmarks/NOTES.md ("Issue 21: the learning-rate schedule").
"""

from __future__ import annotations

import math
from typing import Any

SCHEDULES = ("cosine", "plateau")
PLATEAU_EPOCHS = 3      # validation stalled this long: cut the learning rate
PLATEAU_FACTOR = 0.3
MIN_DELTA = 1e-3        # an improvement of validation mAP smaller than this is no improvement


def planned_epochs(epochs: int, time_budget: float, epoch_seconds: float) -> int:
    """How many epochs the cosine spans: as many as fit ``time_budget`` at ``epoch_seconds`` each, at
    least 2 (the first is warm-up), at most ``epochs``."""
    fit = int(time_budget // max(epoch_seconds, 1e-9))
    return max(min(2, epochs), min(epochs, fit))


class Schedule:
    """Sets a torch optimizer's learning rates (no torch import here: the CLI's ``--help`` reads
    ``SCHEDULES`` without it): ``step()`` after every batch, ``epoch_done()`` after every
    epoch with its validation mAP and the seconds since training began."""

    def __init__(self, opt: Any, kind: str, steps_per_epoch: int, epochs: int,
                 time_budget: float):
        if kind not in SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {kind!r}; choose from {', '.join(SCHEDULES)}")
        self.opt, self.kind, self.steps_per_epoch = opt, kind, steps_per_epoch
        self.epochs, self.time_budget = epochs, time_budget
        self.base = [group["lr"] for group in opt.param_groups]
        self.epoch, self.epoch_steps = 1, 0   # the epoch under way, and its steps so far
        self.planned: int | None = None       # cosine: known once the first epoch is timed
        self.progress = 0.0                   # cosine: how far along it this epoch began
        self.factor = 1.0                     # plateau: the product of the cuts so far
        self.best, self.stalled = -math.inf, 0
        self._set(0.1)

    def _set(self, scale: float) -> None:
        for group, base in zip(self.opt.param_groups, self.base):
            group["lr"] = base * scale

    def step(self) -> None:
        self.epoch_steps += 1
        if self.epoch == 1:
            self._set(min(1.0, 0.1 + 0.9 * self.epoch_steps / self.steps_per_epoch))
        elif self.kind == "cosine":
            self._set(0.5 * (1 + math.cos(math.pi * self._progress())))

    def _progress(self) -> float:
        """How far along the cosine this step is: the rest of it, from where this epoch began, spread
        evenly over the planned epochs left (this one included)."""
        left = max(1, self.planned - self.epoch + 1) * self.steps_per_epoch
        return min(1.0, self.progress + (1 - self.progress) * self.epoch_steps / left)

    def keep(self, val_map: float, best_map: float) -> bool:
        """Whether an epoch's weights replace the kept ones, ``best_map`` being the best validation mAP of the
        epochs before it: plateau, only a better one; cosine, any within ``MIN_DELTA`` of the best."""
        if self.kind == "cosine":
            return val_map >= best_map - MIN_DELTA
        return val_map > best_map + MIN_DELTA

    @property
    def patience_ends_runs(self) -> bool:
        return self.kind == "plateau"

    def finished(self) -> str | None:
        """Why the run ends here by its plan (the cosine's last epoch done), or None."""
        done = self.epoch - 1
        if self.kind == "cosine" and self.planned is not None and done >= self.planned:
            return f"the cosine's {self.planned} epochs are done"
        return None

    def epoch_done(self, val_map: float, elapsed: float) -> None:
        fit = planned_epochs(self.epochs, self.time_budget, elapsed / self.epoch)
        if self.epoch == 1:
            self.planned = fit
            self._set(1.0)
        else:   # slower epochs shorten the cosine, so it still ends within the budget; faster ones lengthen it
            if self.kind == "cosine":
                self.progress = self._progress()
            self.planned = max(fit, self.epoch)
        if self.kind == "plateau":
            if val_map > self.best + MIN_DELTA:
                self.best, self.stalled = val_map, 0
            else:
                self.stalled += 1
                if self.stalled >= PLATEAU_EPOCHS:
                    self.factor, self.stalled = self.factor * PLATEAU_FACTOR, 0
            self._set(self.factor)
        self.epoch, self.epoch_steps = self.epoch + 1, 0
