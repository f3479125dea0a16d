"""How the tests of what surrounds labeling (commits, leases, tables, nights) label: small batches, the
local engine. The Ray engine is tested end to end where Ray is the subject (test_job, test_engines,
test_multinode, test_ray_compat, test_hostile_rows, test_reliability, ...), and both engines share
every stage, so these need not pay Ray Data's per-run overhead."""

TUNING = dict(batch_size=16, engine="local", progress=False)


def killed_before_its_last_unit(output: str, run_id: str) -> tuple[str, dict[str, bytes]]:
    """Make a complete local-state run look killed before it committed its last unit: that unit's data file
    and commit marker go, and so do ``_SUCCESS`` and ``_run.json``. Returns the data file's name and what
    was deleted (uri -> bytes), for a test that lands it late."""
    from mlbatch.core import storage
    from mlbatch.label import commit

    name = sorted(u.rsplit("/", 1)[-1] for u in commit.run_files(output, run_id))[-1]
    unit = [storage.join(output, name), commit.marker_uri(commit.markers_dir(output, run_id), name)]
    saved = {uri: storage.read_bytes(uri) for uri in unit}
    for uri in [*unit, storage.join(output, commit.SUCCESS_FILE), storage.join(output, commit.SUMMARY_FILE)]:
        storage.delete(uri)
    return name, saved
