"""The GPU check (`python -m benchmarks gpu`, benchmarks/gpu_check.sh) runs every step at toy sizes
on the CPU, so it is known to work before it meets a GPU; and `molt extract --devices` builds the
torchrun command with the same arguments."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from benchmarks.bench_gpu import STEPS, check_imports
from cli.launch import option_args, parse_devices, torchrun_command
from cli.main import app

REPO = Path(__file__).resolve().parents[1]


def test_tiny_check_runs_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(out)}  # $OUT is where results go by default
    res = subprocess.run([sys.executable, "-m", "benchmarks", "gpu", "--device", "cpu", "--tiny", "--threads", "1"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    r = json.loads((out / "gpu-check.json").read_text())
    assert r["ok"] and [n for n, _ in STEPS] == list(r["steps"])
    assert all(s["status"] == "ok" for s in r["steps"].values()), {n: s.get("error") for n, s in r["steps"].items()}
    st = r["steps"]
    # on a CPU every cuda test is collected and skipped, none fails
    assert st["cuda_tests"]["tests"] >= 8 and st["cuda_tests"]["skipped"] == st["cuda_tests"]["tests"]
    for dtype in ("bfloat16", "float32"):
        t = st["text"][dtype]
        assert t["finite"] and t["texts"] == 48 and t["tokens_per_s"] > 0
        assert t["flops_per_token"] >= 2 * 4 * (3 * 64 * 172 + 4 * 64 * 64)  # 2 × the 4 blocks' matmul weights
    assert st["image"]["images_per_s"] > 0 and st["online"]["pairs_per_s"] > 0
    ex = st["extract"]
    assert ex["pairs"] == 4 * 18 and ex["images"] == 4 and ex["padding_fraction"] == 0.0
    assert ex["text_tokens"] > 0 and ex["text_encode_tflops"] > 0
    two = st["stage_two"]
    assert two["online_pairs_per_s"] == st["online"]["pairs_per_s"]
    for k in ("per-pair", "image-once"):
        assert two[k]["pairs_per_s"] > 0 and two[k]["speedup_vs_online"] > 0 and "break_even_epochs" in two[k]
    assert st["ranks"]["devices"] == "cpu,cpu"
    assert st["ranks"]["float32"]["identical"] and st["ranks"]["float32"]["max_rel_diff"] == 0.0
    table = (out / "gpu-check.md").read_text()
    assert all(f"| {n} (ok" in table for n, _ in STEPS)
    assert table in res.stdout  # the table is printed last


def test_check_imports_names_every_missing_module():
    check_imports(["json", "numpy"])
    with pytest.raises(SystemExit, match=r"no_such_module_a .*no_such_module_b .*fetch_device_wheels\.sh"):
        check_imports(["json", "no_such_module_a", "no_such_module_b"])


def test_gpu_check_sh_without_wheels_runs_the_python_check(tmp_path):
    env = {**os.environ, "WHL_DIR": str(tmp_path / "no-wheels"), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--device", "cpu", "--tiny", "--steps", "env",
                          "--out", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "no wheels in" in res.stdout and "modules import" in res.stdout
    assert json.loads((tmp_path / "out" / "gpu-check.json").read_text())["steps"]["env"]["status"] == "ok"


# ------------------------------------------------------------------------ molt extract --devices


def test_parse_devices():
    assert parse_devices("0,1") == (2, "cuda", {"CUDA_VISIBLE_DEVICES": "0,1"})
    assert parse_devices("2, 3,5") == (3, "cuda", {"CUDA_VISIBLE_DEVICES": "2,3,5"})
    assert parse_devices("0,0") == (2, "cuda:0", {})
    assert parse_devices("cpu,cpu") == (2, "cpu", {})
    for bad in ("", "0,0,1", "cpu,0", "gpu0,gpu1"):
        with pytest.raises(ValueError, match="--devices"):
            parse_devices(bad)


def test_option_args_spell_options_as_typer_does():
    assert option_args({"out_dir": "/x", "split": ["train", "val"], "force": False, "limit": None, "noise": 0.5}) == [
        "--out-dir", "/x", "--split", "train", "--split", "val", "--no-force", "--noise", "0.5"]


def test_devices_launches_torchrun_with_the_same_arguments(monkeypatch):
    """The options `molt extract --devices` hands to torchrun parse back, through the real
    `extract` command, to the very values given (plus each rank's --device)."""
    import cli.launch

    seen = {}

    def fake_run_ranks(devices, command, options):
        seen.update(devices=devices, command=command, options=options)
        return 0

    monkeypatch.setattr(cli.launch, "run_ranks", fake_run_ranks)
    given = ["--dataset", "sample", "--split", "test", "--split", "val", "--text", "tiny:llama", "--image", "tiny:vit",
             "--dtype", "float16", "--out-dir", "/tmp/c", "--limit", "5", "--force", "--noise", "0.25"]
    result = CliRunner().invoke(app, ["extract", *given, "--devices", "0,0"])
    assert result.exit_code == 0, result.output
    assert seen["devices"] == "0,0" and seen["command"] == "extract"
    argv, env = torchrun_command(seen["devices"], seen["command"], seen["options"])
    assert argv[1:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    assert argv[7:9] == ["cli.main", "extract"] and env == {}
    command = typer.main.get_command(app).commands["extract"]
    parsed = command.make_context("extract", argv[9:]).params
    direct = command.make_context("extract", [*given, "--device", "cuda:0"]).params
    assert parsed == direct
    assert parsed["device"] == "cuda:0" and list(parsed["split"]) == ["test", "val"] and parsed["force"] is True


def test_devices_refuses_an_explicit_device():
    result = CliRunner().invoke(app, ["extract", "--devices", "0,1", "--device", "cuda"])
    assert result.exit_code == 2 and "drop --device" in result.output
