"""The command line's own checks: `python -m cli` runs like `molt`, and bad option values are
refused up front, each with one line that names the option and what is valid."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from cli.main import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_python_dash_m_cli_is_molt():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    proc = subprocess.run([sys.executable, "-m", "cli", "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Usage: molt" in proc.stdout and "train-heads" in proc.stdout and "robustness" in proc.stdout
