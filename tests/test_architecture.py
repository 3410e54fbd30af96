"""The core's layers (README, architecture): import-linter's contracts in pyproject.toml.

``layers``: a module imports only from layers below its own (exhaustive: a new subpackage or
top-level module must be placed). ``acyclic_siblings``: no import cycle among the modules of
any package of bitlm_core, function-local imports included. Both are checked on the code as it
is, and on a copy with one upward import planted in it, which must break them: a contract that
cannot fail checks nothing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = "from importlinter.cli import lint_imports_command; lint_imports_command()"


def lint(project: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on ``project`` (its pyproject.toml and its bitlm_core), no cache."""
    return subprocess.run([sys.executable, "-c", LINT, "--config", "pyproject.toml",
                           "--no-cache", "--no-logo"], cwd=project, capture_output=True,
                          text=True, env={"PYTHONPATH": str(project), "PATH": ""}, timeout=120)


def copy_of_core(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "bitlm_core", tmp_path / "bitlm_core",
                    ignore=shutil.ignore_patterns("__pycache__", "*.gz"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_core_keeps_its_layers_and_has_no_import_cycle():
    proc = lint(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 kept, 0 broken" in proc.stdout, proc.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    project = copy_of_core(tmp_path)
    spec = project / "bitlm_core" / "spec.py"
    spec.write_text(spec.read_text() + "\n\ndef _up():\n    from bitlm_core.app import run\n")
    proc = lint(project)
    assert proc.returncode != 0
    assert "imports point down BROKEN" in proc.stdout
    assert "bitlm_core.spec -> bitlm_core.app.run" in proc.stdout, proc.stdout


def test_a_function_local_cycle_inside_a_layer_breaks_acyclicity(tmp_path):
    project = copy_of_core(tmp_path)
    optim = project / "bitlm_core" / "engine" / "optim.py"
    optim.write_text(optim.read_text()
                     + "\n\ndef _back():\n    from bitlm_core.engine import trainer\n")
    proc = lint(project)
    assert proc.returncode != 0
    assert "at any depth BROKEN" in proc.stdout, proc.stdout
    assert "bitlm_core.engine" in proc.stdout
