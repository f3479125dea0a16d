"""``benchmarks/gpu.sh`` is run by the first lent GPU, so it must not rot while none is lent: its dry mode runs
here (tiny sizes, on the CPU) and must produce every figure it would produce on a GPU."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_the_gpu_script_runs_dry_on_a_cpu_and_reports_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}   # its own Ray, as on a fresh GPU machine
    done = subprocess.run(["bash", "benchmarks/gpu.sh", "--cpu", "--json", str(out), "--frames", "48",
                           "--workdir", str(tmp_path / "work")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry"] and report["model_only"] and all(r["images_per_second"] > 0 for r in report["model_only"])
    assert report["flipped"]["decisions"] == 48 * 3 and 0 <= report["flipped"]["flipped"] <= 48 * 3
    assert [(r["engine"], r["decode"], r["exit"]) for r in report["end_to_end"]] == [
        ("local", "pil", 0), ("local", "torchvision", 0), ("ray", "pil", 0)]
    assert report["gpu_utilisation"] is None           # no nvidia-smi here
