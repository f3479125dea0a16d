"""The README's first command: ``mlbatch demo`` (here ``--quick``, on the test cluster) runs the whole loop."""

from __future__ import annotations

import os
import subprocess
import sys


def test_the_quick_demo_runs_the_whole_loop(ray_cluster, tmp_path):
    env = {**os.environ, **ray_cluster.env}
    result = subprocess.run([sys.executable, "-m", "mlbatch.cli", "demo", "--quick", "--workdir", str(tmp_path / "w")],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for section in ("== evaluation on the test split", "== night 1: mlbatch nightly --model", "== mlbatch query",
                    "== review: the 30 least certain of", "imported", "== retrained from the champion",
                    "== night 2 on the champion"):
        assert section in out, section
    assert "nightly " in out and ": complete" in out
    assert (tmp_path / "w" / "labels" / "_nightly" / "state.json").exists()
