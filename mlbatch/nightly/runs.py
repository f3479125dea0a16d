"""Which manifests a night labels, and in which runs: a crashed night's runs resumed as they were, then one
new run per schema for the rest. A manifest that cannot be labeled at all fails here, alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from ..core import manifest as manifest_mod
from ..label.plan import check_footer
from .config import NightlyConfig
from .discover import Manifest
from .state import NightState

log = logging.getLogger(__name__)


@dataclass
class Todo:
    manifest: Manifest
    reason: str                      # new | changed | relabel
    replaces: dict[str, Any] | None  # the same model version's previous record of this manifest


@dataclass(frozen=True)
class NightRun:
    """One labeling run of a night: a crashed night's run resumed as it was, or a new one."""

    run_id: str
    day: str                 # its partition: a resumed run stays in the night it started in
    jobs: list[Todo]
    resume: bool
    rows_per_unit: int       # a resumed run keeps the unit size it started with


@dataclass(frozen=True)
class Failure:
    """A manifest the night could not label, and why: tried again the next night."""

    manifest: str
    run_id: str | None       # None: it failed before any run (its footer)
    error: str


def sort_manifests(found: list[Manifest], state: NightState, version: str,
          relabel: bool) -> tuple[list[Todo], list[str], list[str]]:
    """The manifests to label tonight (and why), those this version labeled as they are, and those only an
    older version labeled (left alone without ``relabel``)."""
    todo: list[Todo] = []
    unchanged: list[str] = []
    older: list[str] = []
    for m in found:
        records = state["manifests"].get(m.uri, {})
        mine = records.get(version)
        same = [v for v, r in records.items() if r["size"] == m.size and r["etag"] == m.etag]
        if mine is not None and version in same:
            unchanged.append(m.uri)
        elif mine is not None:
            todo.append(Todo(m, "changed", mine))
        elif same and not relabel:
            older.append(m.uri)
        elif same:
            todo.append(Todo(m, "relabel", None))
        else:  # never labeled, or its content changed since an older version labeled it
            todo.append(Todo(m, "new" if not records else "changed", None))
    if older:
        log.warning("%d manifests were labeled by an older model version and are left alone "
                    "(pass --relabel to label them with %s)", len(older), version)
    return todo, unchanged, older


def _manifest_problem(m: Manifest, config: NightlyConfig) -> tuple[str | None, Any]:
    """Why a manifest cannot be labeled, from its footer alone (None if it can), and its schema."""
    try:
        return None, check_footer(m.uri, manifest_mod.read_footer(m.uri), config.uri_column, config.id_column)
    except manifest_mod.ManifestError as exc:
        return str(exc), None


def night_run_id(day: str, manifests: list[Manifest], model_version: str) -> str:
    """``night-<date>-<digest>``: deterministic from the night's manifests (URIs, fingerprints) and the model version."""
    text = json.dumps({"manifests": [[m.uri, m.size, m.etag] for m in manifests], "model": model_version},
                      sort_keys=True)
    return f"night-{day}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def group_runs(config: NightlyConfig, output: str, day: str, version: str, todo: list[Todo],
                state: NightState) -> tuple[list[NightRun], list[Failure]]:
    """The night's labeling runs: first any run a crash left unfinished (resumed with its own manifests, in
    its own partition and with its own unit size), then one run for everything else (one per schema, if
    the manifests differ).

    A manifest that cannot be labeled at all (unreadable, no URI column, no rows) fails here, so it cannot
    fail the others' run.
    """
    runs, left = _resumed_runs(output, version, todo, state)
    failed = []
    by_schema: dict[str, list[Todo]] = {}
    for job in left:
        problem, schema = _manifest_problem(job.manifest, config)
        if problem is not None:
            log.error("nightly %s: %s cannot be labeled: %s", day, job.manifest.uri, problem)
            failed.append(Failure(job.manifest.uri, None, problem))
            continue
        by_schema.setdefault(schema.to_string(), []).append(job)
    for jobs in by_schema.values():
        runs.append(NightRun(night_run_id(day, [j.manifest for j in jobs], version), day, jobs, False,
                             config.rows_per_unit))
    return runs, failed


def _resumed_runs(output: str, version: str, todo: list[Todo],
                  state: NightState) -> tuple[list[NightRun], list[Todo]]:
    """The pending runs a crash left that can be resumed as they were (same model version, the same
    manifests unchanged), and the manifests left for new runs. The other pending runs' rows go."""
    runs = []
    left = {job.manifest.uri: job for job in todo}
    for run_id, pending in list(state.get("pending", {}).items()):
        same = [left[u] for u, fp in pending["manifests"].items()
                if u in left and left[u].manifest.fingerprint() == fp]
        if pending["model_version"] == version and same and len(same) == len(pending["manifests"]):
            runs.append(NightRun(run_id, pending["dt"], same, True, pending["rows_per_unit"]))
            for job in same:
                del left[job.manifest.uri]
        else:   # another model version (its manifests are labeled by this one), or its manifests changed or went
            state.remove_run(output, pending["dt"], run_id)
            del state["pending"][run_id]
    return runs, list(left.values())
