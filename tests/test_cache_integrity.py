"""Issue 12: a cache you can trust. Each fault of the issue's table is injected into a small cache
made by `extract` (fake encoders, real JPEGs) and must give a named error or, rerunning `extract`
with the same arguments, a byte-identical repair that re-does exactly the damaged units."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from molt_cache.cache.errors import CacheCorruptError, CacheError
from molt_cache.cache.integrity import verify_cache
from molt_cache.cache.lock import CacheLockedError, writer_lock
from molt_cache.cache.loader import make_loader
from molt_cache.cache.reader import open_cache
from molt_cache.config import HeadsConfig, TrainConfig
from molt_cache.train import RunFileError, load_run, train_heads
from molt_cache.extract import extract
from test_extract import FakeImage, FakeReader, FakeText, cfg_for, data_files

torch.set_num_threads(1)
runner = CliRunner()


class ThreeSplits(FakeReader):
    splits = ("train", "val", "test")


def run(root, out, **kw):
    return extract(cfg_for(out, **kw), progress=lambda d, t: None, reader=ThreeSplits(root),
                   text_encoder=FakeText(), image_encoder=FakeImage())


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """(images folder, a complete clean cache); tests copy the cache and damage the copy."""
    from PIL import Image

    base = tmp_path_factory.mktemp("integrity")
    root = base / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    for k in range(10):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f"img{k}.jpg")
    out = base / "clean"
    assert run(root, out).complete
    return root, out


@pytest.fixture
def damaged(clean, tmp_path):
    root, out = clean
    copy = tmp_path / "cache"
    shutil.copytree(out, copy)
    return root, out, copy


def shard(cache: Path, array: str, k: int = 0) -> Path:
    files = sorted((cache / array / "c").rglob("*"), key=lambda p: [int(x) for x in p.relative_to(cache / array / "c").parts])
    return [f for f in files if f.is_file()][k]


def flip(path: Path, offset: int, n: int = 1) -> None:
    data = bytearray(path.read_bytes())
    for i in range(n):
        data[offset + i] ^= 0x01 if n == 1 else 0xFF
    path.write_bytes(bytes(data))


def read_everything(cache: Path) -> None:
    reader = open_cache(cache)
    for s in reader.splits:
        for _ in make_loader([reader.split(s)], batch_size=8, shuffle=False, seed=0, epoch=0, in_memory=False, num_workers=0):
            pass


def assert_repaired(root, clean_out, cache, units_redone: int) -> None:
    res = run(root, cache)
    assert res.complete and not res.reused and res.units_done == units_redone
    assert data_files(cache) == data_files(clean_out)
    assert verify_cache(cache).ok


def test_clean_cache_verifies_and_reruns_as_reuse(clean):
    root, out = clean
    report = verify_cache(out)
    assert report.ok and report.files > 0 and report.all_faults() == []
    assert run(root, out).reused


def test_deleted_target_chunk_is_named_then_repaired(damaged):
    root, clean_out, cache = damaged
    f = shard(cache, "train/pairs/target")
    f.unlink()
    with pytest.raises(CacheCorruptError, match=rf"train/pairs/target lacks chunk file {f}.*rerun the same `molt extract"):
        open_cache(cache)
    report = verify_cache(cache)
    assert not report.ok and any(str(f) in x and "missing" in x for x in report.all_faults())
    assert_repaired(root, clean_out, cache, units_redone=0)  # written at creation: rewritten, no unit


def test_deleted_text_layer_chunk_redoes_exactly_its_unit(damaged):
    root, clean_out, cache = damaged
    f = shard(cache, "train/text/layer_2", 1)
    f.unlink()
    with pytest.raises(CacheCorruptError, match="train/text/layer_2 lacks chunk file"):
        open_cache(cache)
    assert_repaired(root, clean_out, cache, units_redone=1)


@pytest.mark.parametrize("array", ["train/pairs/target", "train/image/layer_1"])
def test_one_flipped_bit_is_named_on_read_and_repaired(damaged, array):
    root, clean_out, cache = damaged
    f = shard(cache, array)
    flip(f, 5)
    with pytest.raises(CacheCorruptError, match=rf"array {array}, chunk \d+ \(rows \d+:\d+\) in file {f} is damaged"):
        read_everything(cache)
    assert any(array in x for x in verify_cache(cache).all_faults())
    assert_repaired(root, clean_out, cache, units_redone=0 if "pairs" in array else 1)


def test_cache_verify_and_info_cli(damaged):
    root, clean_out, cache = damaged
    ok = runner.invoke(app, ["cache", "verify", str(clean_out)])
    assert ok.exit_code == 0 and "pass" in ok.output and "FAIL" not in ok.output
    info = runner.invoke(app, ["cache", "info", str(clean_out)])
    assert info.exit_code == 0 and "format version 2, complete" in info.output and "train" in info.output
    f = shard(cache, "val/text/layer_1", 2)
    flip(f, 3)
    bad = runner.invoke(app, ["cache", "verify", str(cache)])
    flat = " ".join(bad.output.split())
    assert bad.exit_code == 1 and "FAIL" in bad.output and "val/text/layer_1" in flat and "rerun the same" in flat
    missing = runner.invoke(app, ["cache", "info", str(cache / "nowhere")])
    assert missing.exit_code == 2 and "holds no molt-cache manifest" in missing.output


def test_sixteen_flipped_bytes_stop_training_with_a_named_error(damaged, tmp_path):
    root, clean_out, cache = damaged
    f = shard(cache, "train/text/layer_3")
    flip(f, 20, n=16)
    cfg = TrainConfig(cache=[str(cache)], run_dir=str(tmp_path / "run"), epochs=1, batch_size=8, device="cpu")
    with pytest.raises(CacheCorruptError, match=rf"train/text/layer_3, chunk \d+ .* in file {f}"):
        train_heads(cfg, HeadsConfig(d_common=8))
    assert_repaired(root, clean_out, cache, units_redone=1)


def test_truncated_chunk_is_named(damaged):
    root, clean_out, cache = damaged
    f = shard(cache, "val/image/final")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CacheCorruptError, match=rf"val/image/final, chunk \d+ .* in file {f}"):
        read_everything(cache)
    assert any("truncated" in x or "crc32c" in x for x in verify_cache(cache).all_faults())
    assert_repaired(root, clean_out, cache, units_redone=1)


def test_junk_manifest_is_one_named_line_and_rerun_rewrites_it(damaged, tmp_path):
    root, clean_out, cache = damaged
    (cache / "manifest.json").write_text("{junk")
    with pytest.raises(CacheError, match=rf"{cache / 'manifest.json'}: not valid JSON \(line 1, column 2"):
        open_cache(cache)
    res = runner.invoke(app, ["train-heads", "--cache", str(cache), "--run-dir", str(tmp_path / "r"), "--device", "cpu"])
    assert res.exit_code == 2 and "manifest.json: not valid JSON" in res.output and "Traceback" not in res.output
    assert runner.invoke(app, ["cache", "verify", str(cache)]).exit_code == 1
    assert_repaired(root, clean_out, cache, units_redone=0)


def test_swapped_in_well_formed_file_is_caught_by_its_content_hash(damaged):
    """Checksums pass on a shard copied from another unit; the completion record's sha256 does not."""
    root, clean_out, cache = damaged
    a, b = shard(cache, "train/text/layer_0", 0), shard(cache, "train/text/layer_0", 1)
    a.write_bytes(b.read_bytes())  # a valid shard, every crc32c right, but the wrong rows
    faults = verify_cache(cache).all_faults()
    assert any(str(a) in x and "sha256 differs from its completion record" in x for x in faults)
    assert_repaired(root, clean_out, cache, units_redone=1)


def test_every_chunk_is_written_even_when_all_zeros(tmp_path):
    """zarr drops a chunk equal to the fill value by default and reads its absence as zeros;
    format 2 stores it, so an absent file always means damage."""
    from molt_cache.cache.layout import LayoutOptions
    from molt_cache.cache.writer import ModalityPlan, SplitPlan, create_cache

    def modality(name):
        return ModalityPlan(name, np.array([0, 4, 8], dtype=np.int64), {"layer_0": 3}, 3, "float32", 4, 4)

    plan = SplitPlan("train", ["a", "b"], np.zeros(2, np.int64), np.zeros(2, np.int64), np.zeros(2, np.int64),
                     ["k0", "k1"], modality("text"), modality("image"))
    create_cache(tmp_path, [plan], {"format_version": 2}, LayoutOptions(item_chunk_rows=1))
    assert (tmp_path / "train/pairs/target/c/0").is_file()  # all-zero targets (class 0) stored


def test_second_extract_into_a_held_folder_is_refused_naming_the_holder(clean, tmp_path):
    root, _ = clean
    out = tmp_path / "cache"
    with writer_lock(out, job="another-job", options={"noise": 0.2}):
        with pytest.raises(CacheLockedError, match=r"another `molt extract`: pid \d+ on .*noise=0.2"):
            run(root, out)
    assert run(root, out).complete  # the lock dies with its holder: nothing stale


def test_ranks_of_one_job_share_the_lock_and_others_wait_for_nothing(tmp_path):
    with writer_lock(tmp_path, job="torchrun:abc") as held:
        assert held
        with writer_lock(tmp_path, job="torchrun:abc") as shared:  # another rank of the same job
            assert not shared
        with pytest.raises(CacheLockedError, match=r"pid \d+ on "):
            with writer_lock(tmp_path, job="torchrun:other", wait_s=0.2):
                pass
    with writer_lock(tmp_path, job="torchrun:other") as held:  # released on exit
        assert held


def test_two_concurrent_extract_processes_one_is_refused(clean, tmp_path):
    """Two real `molt extract` processes into one folder, one plain and one with --noise 0.2: the
    second is refused (exit 2) naming the first's pid and arguments; the folder holds the first."""
    import os
    import subprocess
    import sys
    import time

    out = tmp_path / "cache"
    script = ("import sys, time\nfrom molt_cache.extract import ExtractConfig, extract\n"
              "cfg = ExtractConfig(dataset='sample', splits=['val'], limit=12, text='tiny:llama', image='tiny:vit',"
              " device='cpu', dtype='float32', num_workers=0, out_dir=sys.argv[1], token_chunk_rows=16,"
              " item_chunk_rows=17, shard_chunks=1)\n"
              "extract(cfg, progress=lambda d, t: None, unit_hook=lambda *a: time.sleep(0.2))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-c", script, str(out)], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / "_progress" / "lock.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-m", "cli.main", "extract", "--dataset", "sample", "--split", "val",
                             "--limit", "12", "--text", "tiny:llama", "--image", "tiny:vit", "--device", "cpu",
                             "--noise", "0.2", "--out-dir", str(out)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert first.wait(timeout=120) == 0, first.stderr.read()
    assert second.returncode == 2, second.stderr
    err = " ".join(second.stderr.split())
    assert f"pid {first.pid}" in err and "another `molt extract`" in err and "Traceback" not in err
    m = json.loads((out / "manifest.json").read_text())
    assert m["perturbation"]["noise"] == 0.0 and verify_cache(out).ok


# ------------------------------------------------------------------ bad values and run files


@pytest.mark.parametrize("args, option", [
    (["--epochs", "0"], "--epochs"), (["--epochs", "-3"], "--epochs"), (["--alpha", "nan"], "--alpha"),
    (["--beta", "inf"], "--beta"), (["--lr", "0"], "--lr"), (["--missing-rate", "1.5"], "--missing-rate"),
    (["--train-noise", "nan"], "--train-noise")])
def test_train_heads_refuses_bad_numbers_by_name_before_work(tmp_path, args, option):
    run_dir = tmp_path / "run"
    res = runner.invoke(app, ["train-heads", "--cache", str(tmp_path / "nowhere"), "--run-dir", str(run_dir), *args])
    assert res.exit_code == 2 and f"{option} must be" in res.output and "Traceback" not in res.output
    assert not run_dir.exists()


def test_robustness_refuses_nan_noise_by_name(tmp_path):
    res = runner.invoke(app, ["robustness", "--run", str(tmp_path / "nowhere"), "--noise", "0.1,nan"])
    assert res.exit_code == 2 and "--noise must be ≥ 0 (a finite number), got nan" in res.output


def test_extract_and_sweep_refuse_bad_numbers_by_name(tmp_path):
    res = runner.invoke(app, ["extract", "--out-dir", str(tmp_path / "c"), "--noise", "nan", "--root", str(tmp_path)])
    assert res.exit_code == 2 and "--noise must be" in res.output
    res = runner.invoke(app, ["sweep", "--cache", str(tmp_path), "--epochs", "0", "--out-dir", str(tmp_path / "s")])
    assert res.exit_code == 2 and "--epochs must be" in res.output and not (tmp_path / "s").exists()


@pytest.fixture(scope="module")
def trained(clean, tmp_path_factory):
    _, cache = clean
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    train_heads(TrainConfig(cache=[str(cache)], run_dir=str(run_dir), epochs=1, batch_size=8, device="cpu"),
                HeadsConfig(d_common=8))
    return run_dir


def test_truncated_checkpoint_and_junk_config_are_named(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    w = run_dir / "heads.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(RunFileError, match=rf"{w}: not a readable safetensors checkpoint"):
        load_run(run_dir)
    res = runner.invoke(app, ["robustness", "--run", str(run_dir), "--report-dir", str(tmp_path / "rep"), "--device", "cpu"])
    assert res.exit_code == 2 and "heads.safetensors: not a readable" in res.output and "Traceback" not in res.output
    shutil.copy(trained / "heads.safetensors", w)
    (run_dir / "config.json").write_text('{"heads": ')
    with pytest.raises(RunFileError, match=r"config.json: not valid JSON"):
        load_run(run_dir)
    (run_dir / "config.json").write_text('{"heads": {}}')
    with pytest.raises(RunFileError, match=r"config.json: not a train-heads config \(KeyError"):
        load_run(run_dir)
