"""The command line's own checks: `python -m cli` runs like `molt`, and bad option values are
refused up front, each with one line that names the option and what is valid."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
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


def _error_line(args: list[str]) -> str:
    """The one `error:` line a refused command prints (exit code 2, no trace)."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.mark.parametrize("option, valid", [("--missing-type", "['both', 'text', 'image']"),
                                           ("--train-noise-on", "['image', 'text', 'both']")])
def test_train_heads_refuses_an_unknown_choice_before_reading_the_cache(tmp_path, option, valid):
    # no --missing-rate / --train-noise: the choice is unused, and still refused; the cache does
    # not exist, so the refusal comes before any cache is read
    line = _error_line(["train-heads", "--cache", str(tmp_path / "no-cache"), "--run-dir", str(tmp_path / "run"),
                        option, "foo"])
    assert line == f"error: unknown {option} 'foo'; valid: {valid}"
    assert not (tmp_path / "run").exists()


def test_train_config_validate_checks_the_choices():
    from molt_cache.config import TrainConfig

    TrainConfig(missing_type="image", train_noise_on="text").validate()
    with pytest.raises(ValueError, match=r"--missing-type 'foo'"):
        TrainConfig(missing_type="foo").validate()
    with pytest.raises(ValueError, match=r"--train-noise-on 'foo'"):
        TrainConfig(train_noise_on="foo").validate()


@pytest.mark.parametrize("args, expected", [
    (["--noise", "0.05,,0.2"], "error: --noise '0.05,,0.2' has an empty item; give comma-separated numbers, "
                               "e.g. --noise 0.05,0.2"),
    (["--noise", "0.1,"], "error: --noise '0.1,' has an empty item; give comma-separated numbers, e.g. --noise 0.1"),
    (["--noise", "0.05,0.05"], "error: --noise '0.05,0.05' repeats 0.05; give each value once"),
    (["--noise", "0.05,0.050"], "error: --noise '0.05,0.050' repeats 0.050; give each value once"),  # same number
    (["--noise", "abc"], "error: --noise: expected comma-separated numbers, got 'abc'"),
    (["--level", "feature,feature"], "error: --level 'feature,feature' repeats feature; give each value once"),
    (["--missing", "text,,image"], "error: --missing 'text,,image' has an empty item; give comma-separated names, "
                                   "e.g. --missing text,image"),
    (["--level", "pixel"], "error: unknown --level 'pixel'; valid: ['feature', 'input']"),
    (["--strategy", "foo"], "error: unknown --strategy 'foo'; valid: ['zero', 'empty', 'translate']"),
])
def test_robustness_refuses_empty_repeated_and_unknown_items(tmp_path, args, expected):
    assert _error_line(["robustness", "--run", str(tmp_path / "no-run"), *args]) == expected


def test_sweep_refuses_repeated_seeds(tmp_path):
    line = _error_line(["sweep", "--cache", str(tmp_path / "no-cache"), "--seeds", "0,1,0"])
    assert line == "error: --seeds '0,1,0' repeats 0; give each value once"


def test_lists_parse_as_before():
    from cli.common import parse_float_list, parse_int_list, parse_list

    assert parse_float_list("0.01, 0.05,0.1", "--noise") == [0.01, 0.05, 0.1]
    assert parse_float_list("", "--noise") == [] and parse_list(" ", "--level") == []
    assert parse_int_list("0,1,2", "--seeds") == [0, 1, 2]
    assert parse_list("text,image", "--missing") == ["text", "image"]


def test_config_line_marks_what_the_cache_fills():
    import io

    from rich.console import Console

    from cli.common import print_config
    from molt_cache.config import HeadsConfig

    out = io.StringIO()
    print_config("train-heads", HeadsConfig(d_common=128), to=Console(file=out, soft_wrap=True),
                 from_cache=("num_classes", "multi_label"))
    line = out.getvalue()
    assert "num_classes=(from the cache)  multi_label=(from the cache)" in line and "d_common=128" in line
    assert "num_classes=0" not in line
