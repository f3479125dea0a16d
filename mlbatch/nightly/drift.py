"""Drift: for each label, the positive rate and the mean probability of this night's partition
(all runs of the current model version recorded for ``DATE``, pooled, weighted by their ok
rows) are compared with the same statistics pooled over the trailing ``drift_window`` nights
of the state history (nights before ``DATE`` labeled by the same model version; a new model
version starts without history). A label drifts when the absolute difference exceeds
``drift_bound``. The history is what was observed each night: relabeling a changed manifest
later does not rewrite it.
"""

from __future__ import annotations

from typing import Any

METRICS = ("positive_rate", "mean_probability")


def pool(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows, ok, errors and per-label statistics of runs pooled, each run weighted by its ok rows."""
    labels: dict[str, dict[str, float | None]] = {}
    names = [name for r in runs for name in r["labels"]]
    for name in dict.fromkeys(names):
        stats = {}
        for metric in METRICS:
            pairs = [(r["labels"][name][metric], r["ok"]) for r in runs
                     if name in r["labels"] and r["labels"][name].get(metric) is not None and r["ok"]]
            weight = sum(w for _, w in pairs)
            stats[metric] = round(sum(v * w for v, w in pairs) / weight, 6) if weight else None
        labels[name] = stats
    return {"runs": len(runs), "rows": sum(r["rows"] for r in runs), "ok": sum(r["ok"] for r in runs),
            "errors": sum(r["errors"] for r in runs), "labels": labels}


def _runs_of(state: dict[str, Any], day: str, version: str) -> list[dict[str, Any]]:
    return [r for r in state["runs"] if r["dt"] == day and r["model_version"] == version]


def night_stats(state: dict[str, Any], day: str, version: str) -> dict[str, Any]:
    """Every run of the current model version recorded for this night (so a second run that night sees them)."""
    runs = _runs_of(state, day, version)
    return {"run_ids": [r["run_id"] for r in runs], **pool(runs)}


def drift(state: dict[str, Any], day: str, version: str, night: dict[str, Any], window: int,
           bound: float) -> dict[str, Any]:
    out: dict[str, Any] = {"window": window, "bound": bound, "model_version": version, "compared_with": [],
                           "history": [], "trailing": None, "labels": {}, "drifted": []}
    nights = sorted({r["dt"] for r in state["runs"] if r["model_version"] == version and r["dt"] < day})[-window:]
    if not night["ok"]:
        out.update(status="nothing-labeled", message=f"no rows of model version {version} were labeled for {day}: "
                                                     "nothing to compare")
        return out
    if not nights:
        out.update(status="no-history", message=f"no earlier nights of model version {version} in the history: "
                                                 "nothing to compare with yet")
        return out
    history = [{"date": d, **pool(_runs_of(state, d, version))} for d in nights]
    trailing = pool([r for d in nights for r in _runs_of(state, d, version)])
    out.update(compared_with=nights, history=history, trailing=trailing)
    for name, stats in night["labels"].items():
        entry = {}
        for metric in METRICS:
            now, before = stats.get(metric), trailing["labels"].get(name, {}).get(metric)
            diff = None if now is None or before is None else round(now - before, 6)
            drifted = diff is not None and abs(diff) > bound
            entry[metric] = {"tonight": now, "trailing": before, "difference": diff, "drifted": drifted}
            if drifted:
                out["drifted"].append({"label": name, "metric": metric, "tonight": now, "trailing": before,
                                       "difference": diff})
        out["labels"][name] = entry
    out["status"] = "drift" if out["drifted"] else "ok"
    span = f"the trailing {len(nights)} night{'s' if len(nights) > 1 else ''} ({nights[0]} to {nights[-1]})"
    out["message"] = (f"{len(out['drifted'])} label statistics moved more than {bound} from {span}"
                      if out["drifted"] else f"every label within {bound} of {span}")
    return out
