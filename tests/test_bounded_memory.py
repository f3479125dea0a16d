"""What a long labeling run holds does not grow with rows (issue 22).

A manifest written in one piece has one row group of up to a million rows, and every unit of work cut
from it read that whole row group again; and the labeler kept the native memory each unit freed
(glibc's heap, fragmented by torch's activations), so its process grew for the first ~70,000 rows
(benchmarks/NOTES.md, "The local engine's memory"). Now a labeler reads a row group once for all the
units it holds, and gives freed memory back after each unit.

The ``--id-column`` check read its ids the same way, unit by unit, and each unit's slice kept its whole
row group alive: 18 GiB for 8 million ids (benchmarks/NOTES.md, "The id check's memory"). It now streams
each manifest's ids once into DuckDB's group-by, which keeps to its memory limit and spills beyond it.
"""

from __future__ import annotations

import ctypes
import json
import re
import subprocess
import sys
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlbatch.core import heap, storage
from mlbatch.label import LabelConfig, label
from mlbatch.label import stages


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.parametrize("row_group_rows, reads", [(60, 1), (25, 3)])
def test_units_cut_from_one_row_group_read_it_once_and_keep_their_rows(tmp_path, monkeypatch, small_dataset,
                                                                       small_model, row_group_rows, reads):
    manifest = str(tmp_path / "m.parquet")
    source = storage.read_parquet(small_dataset["test"])   # 60 rows
    pq.write_table(source, manifest, row_group_size=row_group_rows)
    read_groups, released = [], []
    original = pq.ParquetFile.read_row_groups

    def counting(self, row_groups, *args, **kwargs):
        if "status" not in self.schema_arrow.names:   # the manifest, not the output
            read_groups.append(tuple(row_groups))
        return original(self, row_groups, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", counting)
    monkeypatch.setattr(heap, "release_freed_memory", lambda: released.append(1) or True)
    label(LabelConfig(manifests=[manifest], model=small_model, output=str(tmp_path / "out"), engine="local",
                      rows_per_unit=20, progress=False))

    # 3 units of 20 rows: one row group of 60 read once; groups of 25 each read once per unit that needs them
    assert len(read_groups) == reads, read_groups
    out = _output(tmp_path / "out")
    assert out.column("source_row").to_pylist() == list(range(60))
    assert out.column("id").to_pylist() == source.column("id").to_pylist()
    assert out.column("image_uri").to_pylist() == source.column("image_uri").to_pylist()
    assert len(released) == 3   # once after each unit


def _output(out) -> pa.Table:
    files = [e.uri for e in storage.list_files(str(out), suffix=".parquet")]
    return pa.concat_tables([storage.read_parquet(f) for f in files]).sort_by("source_row")


def test_the_row_group_reader_reads_again_when_the_unit_needs_other_groups(tmp_path):
    manifest = str(tmp_path / "m.parquet")
    pq.write_table(pa.table({"n": list(range(100))}), manifest, row_group_size=40)
    read = stages.RowGroupReader()
    assert read(manifest, 0, 10).column("n").to_pylist() == list(range(10))
    assert read(manifest, 30, 50).column("n").to_pylist() == list(range(30, 50))   # groups 0 and 1
    assert read(manifest, 85, 100).column("n").to_pylist() == list(range(85, 100))  # group 2 only
    assert read(manifest, 0, 100).column("n").to_pylist() == list(range(100))


def test_freed_heap_memory_goes_back_to_the_system():
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block = 64 * 1024                         # below malloc's mmap threshold: on the heap
    blocks = [libc.malloc(block) for _ in range(4096)]   # 256 MiB
    for b in blocks:
        ctypes.memset(b, 1, block)            # touched, so resident
    before = _rss_mib()
    for b in blocks[:-1]:                     # the last one stays, so the heap's top cannot shrink by itself
        libc.free(b)
    kept = _rss_mib()
    try:
        assert heap.release_freed_memory() is True
        after = _rss_mib()
    finally:
        libc.free(blocks[-1])
    assert before - kept < 64, (before, kept)   # what malloc keeps on its own
    assert kept - after > 200, (kept, after)    # what release gives back


_ID_CHECK = """
import json, sys
from mlbatch.core.manifest import ManifestError
from mlbatch.label import ids
from mlbatch.label.config import LabelConfig
from mlbatch.label.plan import make_plan

manifests, model, out = json.loads(sys.argv[1])
ids.ID_CHECK_MEMORY = "64MB"
plan = make_plan(LabelConfig(manifests=manifests, model=model, output=out, id_column="id", rows_per_unit=10_000))
with open("/proc/self/status") as f:
    before = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
try:
    ids.check_ids(plan, "id", on_ray=False)
    error = None
except ManifestError as exc:
    error = str(exc)
with open("/proc/self/status") as f:   # this process's own peak (ru_maxrss would count the parent's, from fork)
    peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps({"error": error, "mib": (peak - before) // 1024}))
"""


def test_the_id_check_of_two_million_ids_keeps_to_its_memory_limit_and_names_the_repeat(tmp_path, small_model):
    n = 1_000_000                                   # one row group per manifest, 100 units of work each
    manifests = [str(tmp_path / f"m{i}.parquet") for i in range(2)]
    for i, uri in enumerate(manifests):
        names = [f"img-{k:012d}" for k in range(i * n, (i + 1) * n)]
        if i:
            names[-1] = "img-000000123456"          # the last id repeats the first manifest's row 123456
        pq.write_table(pa.table({"image_uri": ["a.jpg"] * n, "id": names}), uri)
    done = subprocess.run([sys.executable, "-c", _ID_CHECK, json.dumps([manifests, small_model, str(tmp_path / "o")])],
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["error"] == (f"manifest {manifests[1]}: row 999999: id 'img-000000123456' already appears at "
                               f"{manifests[0]} row 123456; ids must be unique")
    assert result["mib"] < 400, result   # a 64 MB limit and what DuckDB holds outside it; it was 2.8 GiB


def test_an_id_check_that_does_not_fit_its_memory_limit_says_so_before_labeling(tmp_path, small_model, monkeypatch):
    from mlbatch.label import JobError, ids

    monkeypatch.setattr(ids, "ID_CHECK_MEMORY", "1MB")
    manifest = str(tmp_path / "m.parquet")
    pq.write_table(pa.table({"image_uri": ["a.jpg"] * 100_000, "id": [f"x{i}" for i in range(100_000)]}), manifest)
    with pytest.raises(JobError, match=r"^the --id-column check did not fit in its 1MB \(Out of Memory Error: [^\n]*\)$"):
        label(LabelConfig(manifests=[manifest], model=small_model, output=str(tmp_path / "out"), engine="local",
                          id_column="id", progress=False))
    assert not list(tmp_path.glob("out/*.parquet"))


@pytest.mark.parametrize("per_pass", [10_000_000, 700])
def test_the_id_check_names_the_same_repeat_in_one_pass_or_in_parts_written_to_disk(tmp_path, small_model,
                                                                                    monkeypatch, per_pass):
    from mlbatch.core.manifest import ManifestError
    from mlbatch.label import ids

    monkeypatch.setattr(ids, "IDS_PER_PASS", per_pass)     # 700: 5,000 ids in 8 parts
    spill = tmp_path / "tmp [1]* o'clock"                  # a temporary folder no glob or SQL string may break
    spill.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    names = [f"x{i}" for i in range(5000)]
    names[2500], names[4000], names[4999] = "x3000", "x17", "x2"   # three repeats; x3000's second place is first
    if per_pass < 5000:                                     # in three different parts, so parts are compared
        import duckdb
        assert len({duckdb.execute(f"SELECT hash('{x}') % 8").fetchone()[0] for x in ("x3000", "x17", "x2")}) == 3
    manifest = str(tmp_path / "m.parquet")
    pq.write_table(pa.table({"image_uri": ["a.jpg"] * 5000, "id": names}), manifest, row_group_size=1000)
    with pytest.raises(ManifestError, match=r"m\.parquet: row 3000: id 'x3000' already appears at .*m\.parquet row 2500;"):
        label(LabelConfig(manifests=[manifest], model=small_model, output=str(tmp_path / "out"), engine="local",
                          id_column="id", progress=False))


def test_a_manifest_gone_before_the_id_check_is_named_by_the_reader_not_by_duckdb(tmp_path, small_model, monkeypatch):
    from mlbatch.label import commit

    manifest = str(tmp_path / "m.parquet")
    pq.write_table(pa.table({"image_uri": ["a.jpg"] * 10, "id": [f"x{i}" for i in range(10)]}), manifest)
    check_writable = commit.check_writable

    def gone_after_the_plan(output):
        storage.delete(manifest)
        return check_writable(output)

    monkeypatch.setattr(commit, "check_writable", gone_after_the_plan)
    with pytest.raises(FileNotFoundError, match=re.escape(manifest)):
        label(LabelConfig(manifests=[manifest], model=small_model, output=str(tmp_path / "out"), engine="local",
                          id_column="id", progress=False))
