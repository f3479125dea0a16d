"""A night committed to an Apache Iceberg table (``--table``): the whole night in one snapshot, or none of it.

Without ``--table`` a changed manifest's old files are deleted as soon as its new rows are
recorded. With it, the table's current snapshot still reads those old files until the night
commits, so they stay on disk until then. The state journals what the table still has to take
(``state["table"]``): the runs recorded since the last commit and the old files to drop. At the end of
the night one commit adds the runs' files and drops the old ones (``iceberg.commit_files``: one
snapshot, idempotent by its commit id); only then are the old files deleted and the journal
cleared. A crash anywhere in between is finished by the next night:

* before the commit landed: the journal is still there, and the next night's commit takes it with
  its own runs (the table then jumps from the last committed night to a whole new one);
* after it landed: the commit id is in the table, so the next night only deletes the old files.

The first night with ``--table`` on an output that has a history also adds every file the state
records as labeled, so the table starts out holding what the folder holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from ..core import iceberg
from ..label import commit
from .config import NightlyConfig
from .state import NightState, partition_uri, run_dir

log = logging.getLogger(__name__)


def journal(state: NightState) -> dict[str, Any]:
    """What the table has still to take: ``runs`` [{run_id, dt}], ``removals`` [{run_id, dt, manifest_index}], ``commit``."""
    return state.setdefault("table", {"runs": [], "removals": [], "commit": None})


def _table_exists(config: NightlyConfig, output: str) -> bool:
    return iceberg.catalog(config.catalog, output).table_exists(config.table)


def settle(config: NightlyConfig, output: str, state: NightState) -> None:
    """Finish a previous night whose commit landed but whose old files were not all deleted yet."""
    todo = state.get("table")
    if not todo or not todo.get("commit") or not _table_exists(config, output):
        return
    table = iceberg.catalog(config.catalog, output).load_table(config.table)
    if iceberg.committed_snapshot(table, todo["commit"]) is None:
        log.info("nightly: commit %s never reached table %s; tonight's commit takes its runs", todo["commit"],
                 config.table)
        return
    _delete(state, output, todo["removals"])
    state["table"] = {"runs": [], "removals": [], "commit": None}
    state.save()


def _manifest_files(output: str, record: dict[str, Any]) -> list[str]:
    """One manifest's files in a run (``manifest_index`` None: the run's, all of them)."""
    partition, run_id = partition_uri(output, record["dt"]), record["run_id"]
    if record.get("manifest_index") is None:
        return commit.run_files(partition, run_id)
    return commit.manifest_data_files(partition, run_dir(output, run_id), run_id, record["manifest_index"])


def _files(output: str, todo: dict[str, Any], adopt: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(files to add, files to drop): the journaled runs' files (and, for a new table, every recorded
    manifest's), less the old files being dropped."""
    drop = [f for r in todo["removals"] for f in _manifest_files(output, r)]
    add = [f for r in todo["runs"] for f in commit.run_files(partition_uri(output, r["dt"]), r["run_id"])]
    add += [f for r in adopt for f in _manifest_files(output, r)]
    gone = set(drop)
    return sorted({f for f in add if f not in gone}), drop


def publish(config: NightlyConfig, day: str, output: str, state: NightState,
            model_version: str) -> dict[str, Any] | None:
    """Commit what the journal holds to the table in one snapshot, then delete the old files; what was done
    (None if the table had nothing to take)."""
    todo = journal(state)
    journaled = {r["run_id"] for r in todo["runs"]}
    adopt = [] if _table_exists(config, output) else [
        record for versions in state["manifests"].values() for record in versions.values()
        if record["run_id"] not in journaled]
    add, drop = _files(output, todo, adopt)
    if not add and not drop:
        return None
    what = json.dumps({"runs": todo["runs"], "removals": todo["removals"], "adopted": len(adopt)}, sort_keys=True)
    todo["commit"] = f"nightly-{day}-{hashlib.sha256(what.encode()).hexdigest()[:12]}"
    state.save()   # the commit id first: a crash after the commit lands is recognised by it
    runs = sorted(journaled | {r["run_id"] for r in adopt})
    snapshot = iceberg.commit_files(config.table, config.catalog, output, todo["commit"], add, drop,
                                    {"night": day, "model_version": model_version, "runs": ",".join(runs)})
    done = {"identifier": config.table, "catalog": config.catalog, "snapshot_id": snapshot,
            "commit": todo["commit"], "added_files": len(add), "dropped_files": len(drop), "adopted": len(adopt)}
    _delete(state, output, todo["removals"])
    state["table"] = {"runs": [], "removals": [], "commit": None}
    state.save()
    log.info("nightly %s: table %s at snapshot %d (%d files added, %d dropped)", day, config.table, snapshot,
             len(add), len(drop))
    return done


def _delete(state: NightState, output: str, removals: list[dict[str, Any]]) -> None:
    for r in removals:
        state.remove_manifest(output, r["dt"], r["run_id"], r["manifest_index"])
