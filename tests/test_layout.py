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


def _modules() -> list[pathlib.Path]:
    return sorted(p for p in (ROOT / "mlbatch").rglob("*.py") if p.name not in ("__init__.py", "__main__.py"))


def test_every_module_is_named_in_the_readmes_layout():
    """The README's layout is a newcomer's map: a module it does not name is one they will not find."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Project layout", 1)[1].split("```", 2)[1]
    lines = {line.split()[0]: line for line in block.strip().splitlines()}
    unnamed = []
    for path in _modules():
        rel = str(path.relative_to(ROOT))
        room = rel.rsplit("/", 1)[0] + "/"
        if rel not in lines and not (room in lines and f" {path.name} " in f" {lines[room]} "):
            unnamed.append(rel)
    assert unnamed == []


def test_every_module_of_the_labeling_room_has_its_layer_in_the_import_contract():
    """A labeling module left out of the layers contract may import anything in its room, upwards too."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c["layers"] for c in contracts if c["name"] == "the labeling job reads top to bottom")
    placed = {name.strip() for layer in layers for name in layer.split("|")}
    label = {f"mlbatch.label.{p.stem}" for p in _modules() if p.parent.name == "label"}
    assert label - placed == set()


def test_ci_runs_the_readmes_test_command_and_both_commands_work_in_a_virtual_environment():
    """A newcomer's first two commands: each makes (or reuses) .venv and installs there, as Debian's and
    Ubuntu's own Python demand (PEP 668); .ci/run runs the test command exactly."""
    import re

    demo, tests = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)[:2]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == [tests]
    venv = "python3 -m venv --system-site-packages .venv && . .venv/bin/activate && pip install "
    assert demo.startswith(venv) and demo.endswith("&& mlbatch demo")
    assert tests.startswith(venv) and tests.endswith("python -m pytest")
