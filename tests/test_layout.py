"""The rooms' shape: imports run one way (import-linter's contracts in pyproject.toml), no module over 400
lines, and one owner for each contract the output's readers rely on."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _lint(package_parent: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                           "lint_imports_command()", "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=package_parent, capture_output=True, text=True,
                          env={"PYTHONPATH": str(package_parent), "PATH": "/usr/bin:/bin"})


def test_the_import_contracts_hold():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 kept, 0 broken" in result.stdout


def test_a_deliberate_violation_breaks_its_contract(tmp_path):
    """torch imported by the planner, and the planner importing the pipeline above it: both contracts fail."""
    shutil.copytree(ROOT / "mlbatch", tmp_path / "mlbatch", ignore=shutil.ignore_patterns("__pycache__"))
    plan = tmp_path / "mlbatch" / "label" / "plan.py"
    plan.write_text(plan.read_text() + "\n\ndef _violation():\n    import torch  # noqa\n"
                    "    from .pipeline import run_pipeline  # noqa\n")
    result = _lint(tmp_path)
    assert result.returncode == 1, result.stdout
    assert "the labeling job reads top to bottom BROKEN" in result.stdout
    assert "no torch behind planning, commits, configurations or the package format BROKEN" in result.stdout
    assert "mlbatch.label.plan -> torch" in result.stdout or "mlbatch.label.plan -> mlbatch" in result.stdout


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "mlbatch").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_output_column_names_are_spelled_in_the_table_contract_alone():
    """``label_``/``prob_`` names, the identity columns and the metadata key come from ``core.table``."""
    offenders = []
    for path in (ROOT / "mlbatch").rglob("*.py"):
        if path.name == "table.py":
            continue
        text = path.read_text()
        for spelled in ('f"label_{', 'f"prob_{', "'prob_' +", 'b"mlbatch"', '"source_manifest", "source_row"'):
            if spelled in text:
                offenders.append(f"{path.relative_to(ROOT)}: {spelled}")
    assert offenders == []
