"""Crash at every write: the driver behind ``test_crash_points.py``.

    python tests/crashpoints.py FLOW WORKDIR MANIFEST MODEL      (prints one JSON line: the flow's counts)

A flow is run once to count its writes and conditional writes (``mlbatch.core.faults``). Then, for every
k, a child process runs it and is ended at its k-th write (``os._exit``: no cleanup, no atexit); a second
child does what a user would next (the same command with ``--resume``, or the next night); a third reads
the output and checks the flow's invariant. And for every j, a child runs it with the answer of its j-th
conditional write lost after the write was applied, and must succeed as if nothing happened.

Every run happens in a forked child of this process, which itself never labels, reads S3 or opens a
table: each child starts from the same clean state, and a crash in one cannot leave threads or
connections behind in the next. The children inherit the AWS settings from the environment.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

OK, FAILED = 0, 1
CHILD_SECONDS = 120
PARALLEL_POINTS = 2


def in_child(fn: Callable[[], Any], result: str | None = None) -> int:
    """Run ``fn`` in a forked child; its exit status (``faults.CRASHED`` for a crash point). What it returns is
    written as JSON to ``result``."""
    pid = os.fork()
    if pid == 0:
        signal.alarm(CHILD_SECONDS)   # a child that hangs ends, and the flow reports it, instead of CI waiting
        _own_core()
        status = OK
        try:
            value = fn()
            if result:
                with open(result, "w") as f:
                    json.dump(value, f)
        except BaseException:   # noqa: BLE001 - the child reports every failure by its status
            traceback.print_exc()
            status = FAILED
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _own_core() -> None:
    """Keep a child to the core of the thread that forked it: points run side by side (``PARALLEL_POINTS``),
    and a child that sees one core starts one decode helper and one torch thread, not two of each."""
    cores = sorted(os.sched_getaffinity(0))
    name = threading.current_thread().name
    if len(cores) > 1 and name.rsplit("_", 1)[-1].isdigit():
        os.sched_setaffinity(0, {cores[int(name.rsplit("_", 1)[-1]) % len(cores)]})


def _fault(crash_at: int | None = None, lose_reply_at: int | None = None, pause_at: int | None = None) -> None:
    from mlbatch.core.faults import FAULTS

    FAULTS.crash_at, FAULTS.lose_reply_at, FAULTS.pause_at, FAULTS.points, FAULTS.swaps = (
        crash_at, lose_reply_at, pause_at, 0, 0)


def _counted(fn: Callable[[], Any]) -> Callable[[], dict[str, int]]:
    """The flow's writes and conditional writes, and the point at which it takes its lease."""
    def run() -> dict[str, int]:
        from mlbatch.core import versioned
        from mlbatch.core.faults import FAULTS

        swap, first = versioned.swap, []

        def noting(*args: Any) -> Any:
            first.append(FAULTS.points + 1)
            return swap(*args)

        versioned.swap = noting
        _fault()
        fn()
        return {"points": FAULTS.points, "swaps": FAULTS.swaps, "lease_point": first[0]}
    return run


def _faulted(fn: Callable[[], Any], **fault: int) -> Callable[[], Any]:
    def run() -> Any:
        _fault(**fault)
        return fn()
    return run


def _rows_once(folder: str, manifests: list[str], expect: dict[str, int]) -> None:
    """Every row of every manifest exactly once among the Parquet data files under ``folder`` (underscore
    folders and hidden files are not data, as for every engine)."""
    import pyarrow.dataset as ds

    data = ds.dataset(folder, format="parquet", partitioning="hive",
                      ignore_prefixes=["_", "."]).to_table(columns=["source_manifest", "source_row"])
    seen: dict[tuple[str, int], int] = {}
    for m, r in zip(*(data.column(c).to_pylist() for c in ("source_manifest", "source_row"))):
        seen[(m, r)] = seen.get((m, r), 0) + 1
    want = {(m, r): 1 for m in manifests for r in range(expect[m])}
    if seen != want:
        doubled = sorted(k for k, n in seen.items() if n > 1)[:3]
        missing = sorted(k for k in want if k not in seen)[:3]
        raise AssertionError(f"{folder}: {len(data)} rows, {len(want)} wanted; doubled {doubled}, missing {missing}")


def _table_rows_once(out: str, manifests: list[str], expect: dict[str, int]) -> None:
    from mlbatch.core import iceberg

    table = iceberg.catalog(iceberg.DEFAULT_CATALOG, out).load_table("ns.t").scan().to_arrow()
    pairs = list(zip(table.column("source_manifest").to_pylist(), table.column("source_row").to_pylist()))
    want = sorted((m, r) for m in manifests for r in range(expect[m]))
    if sorted(pairs) != want:
        raise AssertionError(f"table ns.t: {len(pairs)} rows, {len(want)} wanted (doubled or missing)")


def _untouched(root: str) -> dict[str, tuple[int, int]]:
    """What lies outside the outputs: (size, mtime) of each file under ``root``."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(d, f))
            out[os.path.join(d, f)] = (st.st_size, st.st_mtime_ns)
    return out


class Flow:
    """One user-visible flow: how to start it, what a user runs after a crash, and what must then hold."""

    def __init__(self, name: str, work: str, manifest: str, model: str):
        self.name, self.work, self.model = name, work, model
        self.inputs = os.path.join(work, "inputs")
        self.remote = name.endswith("-s3")
        os.makedirs(self.inputs, exist_ok=True)
        import pyarrow.parquet as pq

        rows = pq.read_table(manifest)
        self.manifests = []
        # rows per manifest, at 3 rows a unit: a manifest of two units and one of one is every case (a manifest
        # part done, one not started, one whole); more units only repeat the same writes (CI minutes)
        sizes = {"pause": (6,), "promotion": (6, 5), "rerun": (3, 2), "overwrite": (3, 2)}.get(name, (6, 2))
        for i, n in enumerate(sizes):
            path = os.path.join(self.inputs, f"m{i}.parquet")
            pq.write_table(rows.slice(3 * i, n), path)
            self.manifests.append(path)
        self.expect = {m: len(pq.read_table(m)) for m in self.manifests}
        if name == "promotion":   # the candidate: the model as trained (the package's own name and version)
            meta = json.loads(open(os.path.join(model, "mlbatch-model.json")).read())
            self.candidate = (meta["name"], meta["version"])

    def output(self, case: str) -> str:
        if self.name == "promotion":
            return os.path.join(self.work, case, "registry")
        if self.remote:
            return f"{os.environ['MLBATCH_CRASH_BUCKET']}/{self.name}/{case}"
        return os.path.join(self.work, case, "out")

    def _label(self, out: str, **kw: Any) -> dict[str, Any]:
        from mlbatch.label import LabelConfig, label

        config = dict(manifests=self.manifests, model=self.model, output=out, run_id="r", rows_per_unit=3,
                      batch_size=8, engine="local", progress=False)
        return label(LabelConfig(**{**config, **kw}))

    def _night(self, out: str) -> dict[str, Any]:
        from mlbatch.nightly import NightlyConfig, nightly

        return nightly(NightlyConfig(input=self.inputs, model=self.model, output=out, date="2026-01-01",
                                     table="ns.t", rows_per_unit=3, batch_size=8, engine="local", progress=False))

    def _promote(self, registry: str) -> Any:
        from mlbatch import registry as reg

        name, version = self.candidate
        return reg.promote(reg.PromoteConfig(f"{name}@{version}", registry, self.manifests))

    def setup(self, out: str) -> None:
        """What is there before the flow starts."""
        if self.name == "promotion":      # a weak champion, and the candidate registered beside it
            from mlbatch import registry as reg
            from reviewdata import changed_copy

            weak = os.path.join(self.work, "weak")
            if not os.path.exists(weak):
                changed_copy(self.model, weak, -20.0)
            first = reg.register(weak, out)
            reg.promote(reg.PromoteConfig(f"{first['name']}@{first['version']}", out, self.manifests))
            reg.register(self.model, out)
        if self.name == "overwrite":
            self._label(out, run_id="old")
        if self.name == "rerun":          # the same command again, from the start: it removes the run first
            self._label(out)

    def start(self, out: str, **kw: Any) -> Any:
        if self.name == "promotion":
            return self._promote(out)
        if self.name.startswith("nightly"):
            return self._night(out)
        if self.name == "overwrite":
            return self._label(out, run_id="new", mode="overwrite", **kw)
        return self._label(out, **kw)

    def recover(self, out: str, **kw: Any) -> Any:
        """What a user runs after the crash: the same command with --resume (and without, if it says so), or
        the night again."""
        from mlbatch.label import JobError

        if self.name == "promotion":
            return self._promote(out)
        if self.name.startswith("nightly"):
            return self._night(out)
        given = dict(run_id="new", mode="overwrite", **kw) if self.name == "overwrite" else kw
        try:
            return self._label(out, resume=True, **given)
        except JobError as exc:
            if "run again without --resume" not in str(exc):
                raise
            return self._label(out, **given)

    def _check_promotion(self, registry: str) -> None:
        """The alias names the candidate, and the folder it names holds that decision's whole evidence; every
        piece of evidence in the registry parses (none was left half written)."""
        from mlbatch import registry as reg
        from mlbatch.core import storage

        name, version = self.candidate
        alias, _ = reg.read_alias(registry, name)
        decision = json.loads(storage.read_bytes(storage.join(alias["reports"], "decision.json")))
        if alias["version"] != version or not decision["promoted"] or decision.get("superseded"):
            raise AssertionError(f"alias {alias}, decision {decision}")
        for e in storage.list_files(registry, suffix=".json"):
            json.loads(storage.read_bytes(e.uri))
        for side in ("candidate", "champion"):
            json.loads(storage.read_bytes(storage.join(alias["reports"], side, "metrics.json")))

    def check(self, out: str) -> None:
        """The invariant: every manifest row exactly once for a reader of the folder (and of the table)."""
        from mlbatch.core import storage

        if self.name == "promotion":
            return self._check_promotion(out)
        if self.remote:   # read back into a local folder, as a reader of the bucket would see it
            local = os.path.join(self.work, out.rsplit("/", 1)[-1], "read")   # the case's own folder
            shutil.rmtree(local, ignore_errors=True)
            for e in storage.list_files(out, suffix=".parquet"):
                path = os.path.join(local, e.uri[len(out) + 1:])
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(storage.read_bytes(e.uri))
            out_read = local
        else:
            out_read = out
        _rows_once(out_read, [os.path.abspath(m) for m in self.manifests],
                   {os.path.abspath(m): n for m, n in self.expect.items()})
        if self.name.startswith("nightly"):
            _table_rows_once(out, [os.path.abspath(m) for m in self.manifests],
                             {os.path.abspath(m): n for m, n in self.expect.items()})
        if self.name == "overwrite" and any("/old-" in e.uri for e in storage.list_files(out, suffix=".parquet")):
            raise AssertionError("the replaced run's rows are still there")

    def fresh_case(self, case: str) -> str:
        out = self.output(case)
        if not self.remote:
            os.makedirs(os.path.dirname(out), exist_ok=True)
        if in_child(lambda: self.setup(out)) != OK:
            raise SystemExit(f"{self.name}: setup failed")
        return out


PAUSED_LEASE_SECONDS = 3.0


def _data_files(out: str) -> set[str]:
    return {os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs
            if f.endswith(".parquet") and "/_" not in d[len(out):] and not f.startswith((".", "_"))}


def paused_past_the_lease(flow: Flow, k: int, holder: bool) -> tuple[bool, str | None]:
    """Stop the run at its k-th write (SIGSTOP; not inside a local compare-and-swap's lock, which others wait
    for as they must) until its lease expired and a ``--resume`` took the output over and finished; then
    let it wake. A ``holder`` (paused after it took the lease) may finish the one write it was stopped
    before, and nothing more: no other data file appears or goes (one paused before it took the lease is a
    later run when it wakes). One more ``--resume`` then leaves every row exactly once. Whether it was
    paused, and what failed."""
    out = flow.fresh_case(f"pause{k}")
    pid = os.fork()
    if pid == 0:
        signal.alarm(CHILD_SECONDS)
        _fault(pause_at=k)
        try:
            flow.start(out, lease_seconds=PAUSED_LEASE_SECONDS)
        except BaseException:   # noqa: BLE001 - its lease is gone when it wakes: it is meant to fail
            os._exit(FAILED)
        os._exit(OK)
    _, status = os.waitpid(pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):   # a point inside a local lock: not paused there
        return False, None if os.waitstatus_to_exitcode(status) == OK else f"pause point {k}: the run failed"
    time.sleep(PAUSED_LEASE_SECONDS + 0.5)
    if in_child(lambda: flow.recover(out, lease_seconds=PAUSED_LEASE_SECONDS)) != OK:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return True, f"pause point {k}: the run that took the lease over failed"
    before = _data_files(out)
    os.kill(pid, signal.SIGCONT)
    os.waitpid(pid, 0)
    after = _data_files(out)
    if holder and (len(after - before) > 1 or before - after):
        return True, (f"pause point {k}: the paused run wrote {len(after - before)} data files and removed "
                      f"{len(before - after)} after it woke")
    if in_child(lambda: (flow.recover(out), flow.check(out))) != OK:
        return True, f"pause point {k}: the resume after it, or the invariant, failed"
    return True, None


def _preload() -> None:
    """Import once what every child would import (torch alone takes seconds), and run nothing of it: a fork
    is safe before torch's first operation starts its threads."""
    import importlib

    for module in ("torch", "pyiceberg.catalog.sql", "mlbatch.label.local", "mlbatch.model.loaded", "mlbatch.nightly"):
        importlib.import_module(module)


def _crash_point(flow: Flow, k: int) -> tuple[bool, str | None]:
    """Ended at its k-th write, then recovered as a user would: whether it crashed there, and what failed."""
    from mlbatch.core.faults import CRASHED

    out = flow.fresh_case(f"crash{k}")
    status = in_child(_faulted(lambda: flow.start(out), crash_at=k))
    if status not in (CRASHED, OK):
        return False, f"crash point {k}: the run exited {status} before its crash point"
    if in_child(lambda: (flow.recover(out) if status == CRASHED else None, flow.check(out))) != OK:
        return status == CRASHED, f"crash point {k}: the recovery failed, or the invariant after it"
    return status == CRASHED, None


def _lost_answer(flow: Flow, j: int) -> str | None:
    """The answer of its j-th conditional write lost after the write was applied: the run must not notice."""
    out = flow.fresh_case(f"lost{j}")
    if in_child(_faulted(lambda: flow.start(out), lose_reply_at=j)) != OK:
        return f"lost answer {j}: the run failed"
    if in_child(lambda: flow.check(out)) != OK:
        return f"lost answer {j}: the invariant fails"
    return None


def main(name: str, work: str, manifest: str, model: str) -> dict[str, Any]:
    _preload()
    flow = Flow(name, work, manifest, model)
    outside = [os.path.dirname(os.path.abspath(model)), flow.inputs]
    before = {p: v for root in outside for p, v in _untouched(root).items()}
    counts = os.path.join(work, "counts.json")
    out = flow.fresh_case("counted")
    if in_child(_counted(lambda: flow.start(out)), counts) != OK:
        raise SystemExit(f"{name}: the flow fails without any fault")
    with open(counts) as f:
        total = json.load(f)
    points = range(1, total["points"] + 1)
    # Each point is its own case folder and children, so points run two at a time (each child mostly uses
    # one core; CI minutes). The threads here only fork and wait: they hold no lock a child could inherit.
    with ThreadPoolExecutor(max_workers=PARALLEL_POINTS) as pool:
        if name == "pause":
            crashes: list[tuple[bool, str | None]] = []
            lost: list[str | None] = []
            paused = list(pool.map(lambda k: paused_past_the_lease(flow, k, holder=k > total["lease_point"]), points))
        else:
            crashes = list(pool.map(lambda k: _crash_point(flow, k), points))
            lost = list(pool.map(lambda j: _lost_answer(flow, j), range(1, total["swaps"] + 1)))
            paused = []
    failures = [f for _, f in crashes + paused if f] + [f for f in lost if f]
    after = {p: v for root in outside for p, v in _untouched(root).items()}
    touched = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    return {"flow": name, "crash_points": total["points"], "crashed": sum(c for c, _ in crashes),
            "lost_answers": total["swaps"], "paused": sum(p for p, _ in paused), "failures": failures,
            "outside_touched": touched}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:5])))
