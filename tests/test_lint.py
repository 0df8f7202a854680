"""Ruff on the package, tests, benchmarks and the notebooks' code cells (ruff reads .ipynb): lint, and format
(the notebooks excepted: see pyproject.toml).

The rules and the line length live in ``pyproject.toml`` ([tool.ruff]); fix with ``ruff check --fix .`` and
``ruff format .``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CODE = ["wmloc_utils", "tests", "benchmarks", "notebooks"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*args], cwd=REPO, capture_output=True, text=True)


def test_code_passes_ruff_check():
    done = _run(str(BIN / "ruff"), "check", *CODE)
    assert done.returncode == 0, done.stdout + done.stderr


def test_code_is_ruff_formatted():
    done = _run(str(BIN / "ruff"), "format", "--check", *CODE)
    assert done.returncode == 0, "run `ruff format .`:\n" + done.stdout + done.stderr


def test_lint_catches_an_error(tmp_path):
    """The check itself fails on bad code (an undefined name), so a green run means something."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    return undefined_name\n")
    done = subprocess.run(
        [str(BIN / "ruff"), "check", "--config", str(REPO / "pyproject.toml"), str(bad)], capture_output=True, text=True
    )
    assert done.returncode == 1 and "F821" in done.stdout
