"""More than one Ray node: a head and two worker nodes on this machine, each started with its own CPUs.

Each node is ``ray start ... --block`` in its own process group, started one at a time and ended
by signalling that group (and the node's worker processes, by pid). Losing a node is that, done
with SIGKILL, in the middle of a run: the raylet, its object store and every worker process on it
go at once, as when a spot instance is reclaimed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
import pytest
import ray
from ray.exceptions import RayError

from mlbatch.core import storage
from mlbatch.label import JobError, LabelConfig, label
from mlbatch.synth import SynthConfig, make_dataset
from procs import RAY

ROWS = 480


@dataclass
class Node:
    proc: subprocess.Popen
    node_id: str = ""


@dataclass
class Cluster:
    nodes: dict[str, Node]
    add_worker: Callable[[str, int], Node]   # (name, cpus): joins, and is waited for, before it returns

    def alive_workers(self) -> list[str]:
        return [n for n, node in self.nodes.items() if n != "head" and node.proc.poll() is None]


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_node(node: Node) -> None:
    """SIGKILL the node's process group (ray start, raylet, its agents) and every worker process it ran."""
    pids = _processes_of_group(node.proc.pid)
    pids += [p for p in _children_of(pids) if p not in pids]
    try:
        os.killpg(node.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    node.proc.wait(timeout=30)


def _processes_of_group(pgid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,pgid="], capture_output=True, text=True).stdout.split("\n")
    return [int(line.split()[0]) for line in out if line.strip() and int(line.split()[1]) == pgid]


def _children_of(pids: list[int]) -> list[int]:
    """Every descendant of ``pids`` (Ray's workers put themselves in process groups of their own)."""
    table = [line.split() for line in subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True,
                                                     text=True).stdout.split("\n") if line.strip()]
    found, frontier = [], set(pids)
    while frontier:
        kids = {int(p) for p, pp in table if int(pp) in frontier and int(p) not in found}
        found += sorted(kids)
        frontier = kids
    return found


@pytest.fixture(scope="module")
def three_nodes(s3_endpoint, tmp_path_factory):
    """A head with 1 CPU and two worker nodes with 2 CPUs each, token auth as the session cluster has."""
    base = tmp_path_factory.mktemp("multinode")
    port = _free_port()
    temp_dir = f"/tmp/mlbatch-mn-{os.getpid()}"
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    address = f"127.0.0.1:{port}"
    nodes: dict[str, Node] = {}
    logs = []

    def start(name: str, args: list[str]) -> Node:
        log = open(base / f"{name}.log", "w")
        logs.append(log)
        proc = subprocess.Popen([*RAY, "start", "--block", "--disable-usage-stats", *args], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        nodes[name] = Node(proc)
        return nodes[name]

    saved = os.environ.get("RAY_ADDRESS")
    ray.shutdown()  # this module's tests drive the three-node cluster, not the session's
    try:
        start("head", ["--head", f"--port={port}", "--num-cpus=1", "--num-gpus=0", "--include-dashboard=true",
                       f"--dashboard-port={_free_port()}", "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}"])
        _wait_for_nodes(address, 1, nodes["head"])
        def add_worker(name: str, cpus: int) -> Node:
            alive = sum(node.proc.poll() is None for node in nodes.values())
            start(name, [f"--address={address}", f"--num-cpus={cpus}", "--num-gpus=0"])
            _wait_for_nodes(address, alive + 1, nodes[name])
            return nodes[name]

        for name in ("worker-1", "worker-2"):   # one at a time: each joins before the next starts
            add_worker(name, 2)
        os.environ["RAY_ADDRESS"] = address
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        by_cpus = {}
        for n in ray.nodes():
            if n["Alive"]:
                by_cpus.setdefault(n["Resources"].get("CPU", 0), []).append(n["NodeID"])
        nodes["head"].node_id = by_cpus[1.0][0]
        yield Cluster(nodes, add_worker)
    finally:
        ray.shutdown()
        for name in reversed(list(nodes)):
            if nodes[name].proc.poll() is None:
                _kill_node(nodes[name])
        for log in logs:
            log.close()
        if saved is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = saved
        import shutil
        shutil.rmtree(temp_dir, ignore_errors=True)
        if saved:  # give the other test modules their session cluster back
            ray.init(address=saved, logging_level="WARNING", log_to_driver=False)


def _wait_for_nodes(address: str, count: int, node: Node) -> None:
    probe = (f"import ray; ray.init(address={address!r}, logging_level='ERROR'); "
             f"print(sum(n['Alive'] for n in ray.nodes()))")
    deadline = time.monotonic() + 120
    while True:
        assert node.proc.poll() is None, f"ray start exited with {node.proc.returncode}"
        out = subprocess.run(["python", "-c", probe], capture_output=True, text=True, env={**os.environ,
                             "RAY_ADDRESS": ""})
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        assert time.monotonic() < deadline, f"{count} nodes did not come up: {out.stderr[-2000:]}"
        time.sleep(1)


def _wait_until_ray_sees(alive: int) -> None:
    deadline = time.monotonic() + 60
    while sum(n["Alive"] for n in ray.nodes()) != alive:
        assert time.monotonic() < deadline, f"Ray does not see {alive} live nodes: {ray.nodes()}"
        time.sleep(0.5)


def _read_output(uri: str) -> pa.Table:
    files = [e.uri for e in storage.list_files(uri, suffix=".parquet")]
    return pa.concat_tables([storage.read_parquet(f) for f in files])


def _same(got: pa.Table, want: pa.Table) -> None:
    key = ["source_manifest", "source_row"]
    got = got.sort_by([(k, "ascending") for k in key]).drop_columns(["labeled_at"])
    want = want.sort_by([(k, "ascending") for k in key]).drop_columns(["labeled_at"])
    assert got.num_rows == want.num_rows == ROWS
    for name in got.column_names:
        if name.startswith("prob_"):
            assert max(abs(a - b) for a, b in zip(got.column(name).to_pylist(), want.column(name).to_pylist())) < 1e-6
        else:
            assert got.column(name).equals(want.column(name)), name


def _wait_for_commits(markers: str, count: int = 2, limit: float = 120) -> None:
    """Until a run has committed ``count`` units: whole commit markers in its folder (not the plan record,
    ``_plan.json``, nor a marker still being written, ``.<name>.tmp-...``). Two, not one: a node lost just
    after a unit's marker was written can lose the write task's answer on its way to the driver, which then
    counts that unit only when a resume reads its marker."""
    deadline = time.monotonic() + limit
    while not (os.path.isdir(markers) and len([f for f in os.listdir(markers)
                                               if f.endswith(".json") and not f.startswith(("_", "."))]) >= count):
        assert time.monotonic() < deadline, f"fewer than {count} units committed in {limit} s"
        time.sleep(0.1)


def test_decoding_and_prediction_spread_over_the_nodes_and_a_lost_node_costs_at_most_one_resume(
        three_nodes, tmp_path, small_model):
    from ray.util.state import list_actors, list_tasks

    data = make_dataset(str(tmp_path / "data"), SynthConfig(train=0, val=0, test=ROWS, seed=31))["test"]
    common = dict(manifests=[data], model=small_model, batch_size=8, rows_per_unit=16, concurrency=2,
                  run_id="nodes", progress=False)

    # a clean run: Ray's own state says where units were fetched, decoded and predicted (the fused
    # layout on CPU: each call of a UnitLabeler actor does all three for one unit)
    job = ray.get_runtime_context().get_job_id()
    clean = label(LabelConfig(output=str(tmp_path / "clean"), **common))
    assert clean["rows_out"] == ROWS and clean["predictor"]["layout"] == "fused"
    calls = [t.node_id for t in list_tasks(filters=[("job_id", "=", job)], detail=True, limit=10_000)
             if "UnitLabeler" in t.name and t.node_id and "__init__" not in t.name]
    print("units labeled per node:", {n[:8]: calls.count(n) for n in set(calls)})
    labeler_nodes = {a.node_id for a in list_actors(filters=[("job_id", "=", job)], detail=True, limit=1000)
                     if "UnitLabeler" in a.class_name and a.node_id}
    assert len(set(calls)) == 2 and len(labeler_nodes) == 2, (set(calls), labeler_nodes)

    # a worker is lost once the run has committed a unit: Ray absorbs it, or one --resume finishes the run
    out = str(tmp_path / "lost")
    killed = threading.Event()

    def lose_worker() -> None:
        # mid-run, the worker node that runs a predictor actor (worker-2 if neither does) goes, all its processes
        _wait_for_commits(os.path.join(out, "_units", "nodes"))
        pids = {a.pid for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
                if "UnitLabeler" in a.class_name}
        name = next((n for n in ("worker-1", "worker-2")
                     if pids & set(_children_of([three_nodes.nodes[n].proc.pid]))), "worker-2")
        print(f"losing {name} (predictor actors at pids {sorted(pids)})")
        _kill_node(three_nodes.nodes[name])
        killed.set()

    threading.Thread(target=lose_worker, daemon=True).start()
    try:
        summary = label(LabelConfig(output=out, stall_seconds=60, **common))
        resumed = False
    except (JobError, RayError) as exc:  # a stall, or Ray's word for the lost node: a --resume follows
        print(f"the run after the node loss ended: {type(exc).__name__}: {str(exc)[:500]}")
        summary = label(LabelConfig(output=out, resume=True, stall_seconds=60, **common))
        resumed = True
    assert killed.is_set(), "the node was not lost during the run"
    # the run can end before Ray's health checks have declared the killed node dead: give them time
    deadline = time.monotonic() + 60
    while sum(n["Alive"] for n in ray.nodes()) != 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert sum(n["Alive"] for n in ray.nodes()) == 2
    print(f"node lost mid-run: {'one --resume' if resumed else 'absorbed by Ray'}; attempts {summary['attempts']}")
    assert summary["rows_out"] == ROWS and summary["attempts"] == (2 if resumed else 1)
    _same(_read_output(out), _read_output(str(tmp_path / "clean")))


def test_losing_the_node_the_run_needs_ends_in_a_clear_stall_and_one_resume_finishes(three_nodes, tmp_path,
                                                                                    small_model):
    """A head (1 CPU) and one worker (2 CPUs); the worker goes mid-run. What is left cannot hold a predictor
    actor and a decode task at once, so Ray waits for room forever: the stall limit ends the run with a
    message naming what it waits for, committed units are kept, and once a new node joins, one --resume
    finishes the run: every row exactly once, identical to a clean run."""
    data = make_dataset(str(tmp_path / "data"), SynthConfig(train=0, val=0, test=ROWS, seed=31))["test"]
    # the split layout: it needs the most room (a predictor actor, a repartition task and a decode task)
    common = dict(manifests=[data], model=small_model, batch_size=8, rows_per_unit=16, concurrency=2,
                  run_id="needed", progress=False, layout="split")
    clean = str(tmp_path / "clean")
    label(LabelConfig(output=clean, **common))
    for name in three_nodes.alive_workers()[1:]:       # one worker left (the test before may have lost one)
        _kill_node(three_nodes.nodes[name])
    (worker,) = three_nodes.alive_workers()
    _wait_until_ray_sees(alive=2)                        # else Ray may still place work on the dead node
    out = str(tmp_path / "lost")
    markers = os.path.join(out, "_units", "needed")

    def lose_worker_after_first_commit() -> None:
        _wait_for_commits(markers)
        _kill_node(three_nodes.nodes[worker])

    threading.Thread(target=lose_worker_after_first_commit, daemon=True).start()
    with pytest.raises(JobError) as stalled:
        label(LabelConfig(output=out, stall_seconds=20, **common))
    message = str(stalled.value)
    print(message)
    assert "run needed: no rows committed for 20 s (--stall-seconds)" in message
    assert "1 live node" in message and "waiting for:" in message
    assert "run again with --resume" in message
    committed = int(message.split("; ")[1].split(" of ")[0])
    assert 0 < committed < ROWS

    three_nodes.add_worker("worker-3", 2)
    summary = label(LabelConfig(output=out, resume=True, stall_seconds=60, **common))
    assert summary["rows_out"] == ROWS and summary["attempts"] == 2
    _same(_read_output(out), _read_output(clean))

