"""The learning rate over a training run.

Both schedules warm up over the first epoch (from a tenth of the rate to all of it). Then:

- ``cosine`` (the default): anneal along half a cosine to zero at the end of ``epochs``. The plan
  is fixed before the first batch by the configuration alone, so the same data, configuration and
  seed give the same model on a quiet machine and a busy one. A ``time_budget`` (none by default)
  only caps it: after every epoch the cosine spans the epochs that fit the budget at the pace so far
  (at most ``epochs``), the rest of it spread over the epochs left (the rate never jumps, up or
  down), and a cut is reported (``Schedule.cut``) so that training warns and records it in the
  package. The run is planned, so patience does not end it; of the epochs within ``MIN_DELTA`` of
  the best validation mAP the latest, most annealed one is kept. Why: some labels are learnt late
  (on the shapes kind a network sits at one validation mAP for ten epochs before it tells a circle
  from a square, and a rate cut during that wait stops it there), and annealed weights transfer
  better to a new view.
- ``plateau`` (the old default): cut the rate by ``PLATEAU_FACTOR`` whenever validation mAP has not
  improved for ``PLATEAU_EPOCHS`` epochs; patience ends the run; the best epoch is kept.

Measured in benchmarks/NOTES.md ("Issue 21: the learning-rate schedule", "Issue 37: a plan that
does not depend on the machine's load").
"""

from __future__ import annotations

import math
from typing import Any

SCHEDULES = ("cosine", "plateau")
PLATEAU_EPOCHS = 3      # validation stalled this long: cut the learning rate
PLATEAU_FACTOR = 0.3
MIN_DELTA = 1e-3        # an improvement of validation mAP smaller than this is no improvement


def planned_epochs(epochs: int, time_budget: float | None, epoch_seconds: float) -> int:
    """How many epochs the cosine spans: ``epochs``, or with a ``time_budget`` as many as fit it at
    ``epoch_seconds`` each, at least 2 (the first is warm-up), at most ``epochs``."""
    if time_budget is None:
        return epochs
    fit = int(time_budget // max(epoch_seconds, 1e-9))
    return max(min(2, epochs), min(epochs, fit))


class Schedule:
    """Sets a torch optimizer's learning rates (no torch import here: the CLI's ``--help`` reads
    ``SCHEDULES`` without it): ``step()`` after every batch, ``epoch_done()`` after every
    epoch with its validation mAP and the seconds since training began. Wall time is read only
    when a ``time_budget`` is given, and then only to shorten the plan."""

    def __init__(self, opt: Any, kind: str, steps_per_epoch: int, epochs: int,
                 time_budget: float | None = None):
        if kind not in SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {kind!r}; choose from {', '.join(SCHEDULES)}")
        self.opt, self.kind, self.steps_per_epoch = opt, kind, steps_per_epoch
        self.epochs, self.time_budget = epochs, time_budget
        self.base = [group["lr"] for group in opt.param_groups]
        self.epoch, self.epoch_steps = 1, 0   # the epoch under way, and its steps so far
        self.planned = epochs                 # cosine: the epochs it spans, fewer only if the budget cuts it
        self.cut: str | None = None           # how the time budget cut the plan, if it does
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
        if self.kind == "cosine" and done >= self.planned:
            return f"the cosine's {self.planned} epochs are done"
        return None

    def epoch_done(self, val_map: float, elapsed: float) -> None:
        if self.kind == "cosine" and self.epoch > 1:
            self.progress = self._progress()
        if self.kind == "cosine":
            # with a budget, slower epochs shorten the cosine so that it still ends within it, and faster
            # ones give back what they took (never beyond ``epochs``); without one the plan stays as set
            self.planned = max(planned_epochs(self.epochs, self.time_budget, elapsed / self.epoch), self.epoch)
            self.cut = None if self.planned >= self.epochs else (
                f"the time budget of {self.time_budget:g}s cut the plan from {self.epochs} to {self.planned} "
                f"epochs ({elapsed / self.epoch:.1f}s an epoch)")
        if self.epoch == 1:
            self._set(1.0)
        if self.kind == "plateau":
            if val_map > self.best + MIN_DELTA:
                self.best, self.stalled = val_map, 0
            else:
                self.stalled += 1
                if self.stalled >= PLATEAU_EPOCHS:
                    self.factor, self.stalled = self.factor * PLATEAU_FACTOR, 0
            self._set(self.factor)
        self.epoch, self.epoch_steps = self.epoch + 1, 0
