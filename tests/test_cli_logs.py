"""Output sent to a file stays readable: no carriage-return progress redraws from our bars or from
the Hugging Face libraries' (loading the shipped SmolLM2 shows "Loading weights" bars on a
terminal), and no path broken across lines."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_extract_logged_to_a_file_has_no_carriage_returns_and_whole_paths(tmp_path):
    from molt_cache.encoders.shipped import ShippedWeightsMissing, smollm2_converted_dir

    try:
        smollm2_converted_dir()
    except ShippedWeightsMissing:
        pytest.skip("shipped SmolLM2 weights not installed")
    out = tmp_path / ("a-rather-long-folder-name-" * 4) / "cache"
    log = tmp_path / "extract.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "cli.main", "extract", "--dataset", "sample", "--split", "test",
                               "--limit", "3", "--text", "shipped:smollm2", "--image", "tiny:vit", "--device", "cpu",
                               "--num-workers", "0", "--out-dir", str(out)], cwd=ROOT, env=env, stdout=f,
                              stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text and "Loading weights" not in text
    assert f"cache: {out}" in text  # the path printed whole, on one line
    assert "images: 3/3 encoded" in text and "texts: 3/3 encoded" in text
    assert f'out_dir="{out}"' in text  # the config line, whole
