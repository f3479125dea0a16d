"""The README's first command: ``mlbatch demo`` (here ``--quick``) runs the whole loop, as on a fresh machine:
no Ray cluster given and none running, so it labels with the local engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile


def test_the_quick_demo_runs_the_whole_loop(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="mlb-", dir="/tmp")   # where `ray start` would have recorded an instance
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": ray_tmp}
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
    runs = [json.loads(p.read_text()) for p in (tmp_path / "w").rglob("_run.json")]
    engines = {r["predictor"]["engine"] for r in runs if "predictor" in r}
    assert engines == {"local"}, engines
    assert os.listdir(ray_tmp) == []   # and no Ray was started
    os.rmdir(ray_tmp)
