"""Ray's private names behind one door: each present in the pinned Ray, each missing one reported with its
cost, the fallback taken, and the stall limit carried by Ray Data's public setting."""

from __future__ import annotations

import logging
import pathlib
import re
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from mlbatch.label import JobError, LabelConfig, label, ray_compat

NAMES = [ray_compat.STREAMING_GEN_BUFFER, ray_compat.CURRENT_EXECUTOR, ray_compat.TOPOLOGY,
         ray_compat.OUTPUT_BLOCK_STATS, ray_compat.BOOTSTRAP, ray_compat.ADDRESS_RECORD]


def test_the_pinned_ray_has_every_private_name_mlbatch_uses(caplog):
    with caplog.at_level(logging.WARNING, logger="mlbatch.label.ray_compat"):
        assert ray_compat.check(force=True) == []
    assert not caplog.records
    assert sorted(p.name for p in ray_compat.private_names()) == sorted(NAMES)


def test_private_ray_names_appear_in_ray_compat_alone():
    """Every ``ray...._internal`` import and every private Ray attribute lives in ``ray_compat``."""
    root = pathlib.Path(__file__).resolve().parents[1] / "mlbatch"
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "ray_compat.py":
            continue
        text = path.read_text()
        if "ray.data._internal" in text or "ray._private" in text or "_create_executor" in text or any(
                name in text for name in NAMES):
            offenders.append(str(path.relative_to(root)))
    assert offenders == []


@pytest.mark.parametrize("name", NAMES)
def test_a_private_name_missing_from_ray_is_reported_once_with_its_cost(name, monkeypatch, caplog):
    """Simulated by asking for a name this Ray does not have, in place of the real one."""
    cost = {ray_compat.STREAMING_GEN_BUFFER: "start labeling a few seconds late",
            ray_compat.BOOTSTRAP: "does not see a Ray instance started with `ray start`",
            ray_compat.ADDRESS_RECORD: "does not see a Ray instance started with `ray start`"}.get(
                name, "driver's memory grows")
    monkeypatch.setattr(ray_compat, {ray_compat.STREAMING_GEN_BUFFER: "STREAMING_GEN_BUFFER",
                                     ray_compat.CURRENT_EXECUTOR: "CURRENT_EXECUTOR",
                                     ray_compat.TOPOLOGY: "TOPOLOGY",
                                     ray_compat.OUTPUT_BLOCK_STATS: "OUTPUT_BLOCK_STATS",
                                     ray_compat.BOOTSTRAP: "BOOTSTRAP",
                                     ray_compat.ADDRESS_RECORD: "ADDRESS_RECORD"}[name], "_mlbatch_gone")
    with caplog.at_level(logging.WARNING, logger="mlbatch.label.ray_compat"):
        missing = ray_compat.check(force=True)
        assert ray_compat.check() == missing          # checked once: the second call reads the first answer
    assert missing == ["_mlbatch_gone"]
    (record,) = caplog.records
    assert "_mlbatch_gone" in record.getMessage() and "which mlbatch uses (read from Ray 2.60)" in record.getMessage()
    assert cost in record.getMessage()
    ray_compat.check(force=True)   # the real answer again, for the tests after this one


def test_without_the_buffer_field_the_context_is_left_alone(monkeypatch):
    monkeypatch.setattr(ray_compat, "STREAMING_GEN_BUFFER", "_mlbatch_gone")
    ray_compat.check(force=True)
    try:
        ctx = ray.data.DataContext.get_current()
        with ray_compat.data_context(progress=False, stall_seconds=30):
            assert not hasattr(ctx, "_mlbatch_gone")
            assert ctx.execution_no_progress_timeout_s == 30
    finally:
        monkeypatch.undo()
        ray_compat.check(force=True)


def test_block_statistics_are_dropped_as_results_come_and_not_without_the_names(ray_cluster, monkeypatch):
    ds = ray.data.range(64, override_num_blocks=8).map_batches(lambda b: b, batch_size=8)
    dropped = 0
    for _ in ds.iter_batches(batch_size=None, prefetch_batches=0):
        dropped += ray_compat.forget_block_stats(ds)
    assert dropped > 0
    monkeypatch.setattr(ray_compat, "TOPOLOGY", "_mlbatch_gone")
    ray_compat.check(force=True)
    try:
        ds = ray.data.range(64, override_num_blocks=8).map_batches(lambda b: b, batch_size=8)
        assert sum(ray_compat.forget_block_stats(ds) for _ in ds.iter_batches(batch_size=None)) == 0
    finally:
        monkeypatch.undo()
        ray_compat.check(force=True)


@pytest.mark.parametrize("seconds, ray_limit", [(0, -1.0), (30, 30.0), (3600, 3600.0)])
def test_stall_seconds_is_ray_datas_public_no_progress_limit(seconds, ray_limit):
    """0 is never (Ray's -1), and values above Ray's own 1800 s default are honoured, not cut to it."""
    ctx = ray.data.DataContext.get_current()
    before = ctx.execution_no_progress_timeout_s
    with ray_compat.data_context(progress=False, stall_seconds=seconds):
        assert ctx.execution_no_progress_timeout_s == ray_limit
    assert ctx.execution_no_progress_timeout_s == before


def test_a_negative_stall_limit_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(JobError, match=re.escape("--stall-seconds -1: must be 0 (never) or more")):
        label(LabelConfig(manifests=[str(tmp_path / "none.parquet")], model=str(tmp_path / "m"),
                          output=str(tmp_path / "out"), stall_seconds=-1, progress=False))


def _manifest(tmp_path, jpeg: bytes) -> str:
    """A manifest of 4 small images."""
    images = []
    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg)
        images.append(str(tmp_path / f"{i}.jpg"))
    pq.write_table(pa.table({"image_uri": images}), tmp_path / "m.parquet")
    return str(tmp_path / "m.parquet")


def _hold_every_cpu(seconds: float):
    """Someone else's task holding every CPU of the cluster for ``seconds``: no stage of a run can start
    meanwhile, so nothing moves (a named pipe did this before fetch refused pipes)."""
    @ray.remote(num_cpus=ray.cluster_resources()["CPU"])
    def hold(s: float) -> None:
        time.sleep(s)

    ref = hold.remote(seconds)
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) > 0:
        assert time.monotonic() < deadline, f"the holder never took the cluster's CPUs: {ray.available_resources()}"
        time.sleep(0.2)
    return ref


def _jpeg() -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def test_a_stalled_run_ends_with_mlbatchs_message_not_rays(ray_cluster, tmp_path, small_model):
    data = _manifest(tmp_path, _jpeg())
    holder = _hold_every_cpu(120)
    started = time.monotonic()
    try:
        with pytest.raises(JobError) as stalled:
            label(LabelConfig(manifests=[data], model=small_model, engine="ray", output=str(tmp_path / "out"),
                              batch_size=4, run_id="stuck", stall_seconds=3, progress=False))
    finally:
        ray.cancel(holder, force=True)
    message = str(stalled.value)
    assert 3 <= time.monotonic() - started < 120     # it waited out its limit, and no longer than the holder
    assert message.startswith("run stuck: no rows committed for 3 s (--stall-seconds); 0 of 4 rows committed")
    assert "run again with --resume" in message and "free on the cluster: CPU 0 of 4" in message, message
    assert "execution_no_progress_timeout_s" not in message   # Ray's advice to raise its limit is not ours


def test_stall_seconds_zero_outlasts_a_low_limit_left_in_rays_context(ray_cluster, tmp_path, small_model):
    """Ray's limit set low through its public setting, as a user's code or the environment may: a run with
    --stall-seconds 0 (never) still waits out 6 s in which the cluster is busy with other work, and completes."""
    data = _manifest(tmp_path, _jpeg())
    _hold_every_cpu(6)
    held = time.monotonic()
    ctx = ray.data.DataContext.get_current()
    before, ctx.execution_no_progress_timeout_s = ctx.execution_no_progress_timeout_s, 1
    try:
        summary = label(LabelConfig(manifests=[data], model=small_model, engine="ray", output=str(tmp_path / "out"),
                                    batch_size=4, stall_seconds=0, progress=False))
    finally:
        ctx.execution_no_progress_timeout_s = before
    assert summary["status"] == "complete" and summary["rows_out"] == 4 and summary["errors"] == 0
    assert time.monotonic() - held >= 5    # it waited out the busy cluster, well past Ray's 1 s limit
