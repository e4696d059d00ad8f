"""`molt datasets check` on every fixture layout and on the bundled sample."""
from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from cli.main import app
from data.make_fixtures import make_fixtures

runner = CliRunner()
GOOD = {"snli-ve": "snli-ve", "snli-ve-old": "snli-ve", "food101": "food101", "food101-nosplit": "food101",
        "mmimdb": "mmimdb", "mmimdb-hdf5": "mmimdb-hdf5", "mmimdb-hdf5-padded": "mmimdb-hdf5",
        "manifest-jsonl": "manifest", "manifest-csv-multi": "manifest", "manifest-jsonl-multi": "manifest"}
BAD = {"snli-ve-bad": "snli-ve", "food101-bad": "food101", "mmimdb-bad": "mmimdb", "manifest-bad": "manifest",
       "manifest-csv-bad": "manifest"}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return make_fixtures(tmp_path_factory.mktemp("fixtures"))


@pytest.mark.parametrize("fixture", sorted(GOOD))
def test_check_counts_every_fixture(fixtures, fixture, tmp_path):
    from molt_cache.datasets import open_dataset

    result = runner.invoke(app, ["datasets", "check", "--dataset", GOOD[fixture], "--root", str(fixtures[fixture]),
                                 "--bad-report", str(tmp_path / "bad.json")])
    assert result.exit_code == 0, result.output
    assert "no bad rows" in result.output and "label histogram" in result.output
    reader = open_dataset(GOOD[fixture], fixtures[fixture])
    for split in reader.splits:  # counted independently, straight from the reader
        samples = list(reader.samples(split))
        row = rf"│\s*{split}\s*│\s*{len(samples)}\s*│\s*{len({s.text for s in samples})}\s*│" \
              rf"\s*{len({s.image_key for s in samples})}\s*│"
        assert re.search(row, result.output), f"{split}: {row}\n{result.output}"


@pytest.mark.parametrize("fixture", sorted(BAD))
def test_check_bad_rows_error_then_skip_and_report(fixtures, fixture, tmp_path):
    args = ["datasets", "check", "--dataset", BAD[fixture], "--root", str(fixtures[fixture])]
    failed = runner.invoke(app, args)
    assert failed.exit_code == 2 and "--on-bad skip" in failed.output and "Traceback" not in failed.output
    report = tmp_path / "bad.json"
    skipped = runner.invoke(app, [*args, "--on-bad", "skip", "--bad-report", str(report), "--decode-images"])
    assert skipped.exit_code == 0, skipped.output
    rows = json.loads(report.read_text())
    assert rows and all(r["source"] and r["reason"] for r in rows)
    assert f"{len(rows)} bad rows skipped" in skipped.output


def test_check_the_bundled_sample():
    result = runner.invoke(app, ["datasets", "check", "--dataset", "sample"])
    assert result.exit_code == 0, result.output
    assert "408" in result.output and "red_cat" in result.output and "no bad rows" in result.output


@pytest.mark.parametrize("command", ["extract", "train-heads", "robustness", "sweep", "demo",
                                     "datasets list", "datasets check"])
def test_every_command_help_shows_an_example(command):
    result = runner.invoke(app, [*command.split(), "--help"])
    assert result.exit_code == 0 and "Example: molt" in result.output


def test_check_writes_bad_rows_only_into_the_folder_named(fixtures, tmp_path, monkeypatch):
    fixture = sorted(BAD)[0]
    args = ["datasets", "check", "--dataset", BAD[fixture], "--root", str(fixtures[fixture]), "--on-bad", "skip"]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    plain = runner.invoke(app, args)
    assert plain.exit_code == 0, plain.output
    assert list(cwd.iterdir()) == []  # nothing lands in the current folder by default
    assert "pass --report-dir DIR" in plain.output and "bad rows skipped" in plain.output
    folder = tmp_path / "reports" / "check"
    named = runner.invoke(app, [*args, "--report-dir", str(folder)])
    assert named.exit_code == 0, named.output
    rows = json.loads((folder / "bad_rows.json").read_text())
    assert rows and f"listed in {folder / 'bad_rows.json'}" in named.output
    assert list(cwd.iterdir()) == []
