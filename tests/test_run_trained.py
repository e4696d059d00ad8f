"""A run whose training finished no epoch holds the initial heads (train-heads saves them before
epoch 0): `molt robustness` and `molt predict` refuse it, naming the run folder, instead of
scoring untrained heads. The marker is the checkpoint's own epoch (safetensors metadata, written
with the weights); older checkpoints without it count as trained when log.jsonl or metrics.json
says an epoch finished."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import zarr
from _cache_fixture import TinySpec, write_tiny_cache
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli.main import app
from molt_cache import Classifier
from molt_cache.config import HeadsConfig, TrainConfig
from molt_cache.finite import NonFiniteError
from molt_cache.robustness.evaluate import RobustnessConfig, run_robustness
from molt_cache.train import EPOCH_KEY, RunFileError, checkpoint_epoch, load_run, train_heads

torch.set_num_threads(1)
runner = CliRunner()
HEADS = dict(model="molt", d_common=8, layers=2, fbp_stride=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished run, and one stopped in epoch 0 by NaN in a train pair's features."""
    root = tmp_path_factory.mktemp("runs")
    clean, bad = root / "clean", root / "bad"
    write_tiny_cache(clean, TinySpec(splits={"train": 30, "val": 12, "test": 15}))
    shutil.copytree(clean, bad)
    arr = zarr.open_group(str(bad), mode="r+")["train/image/layer_0"]
    block = np.asarray(arr[0:2])
    block[:] = np.nan
    arr[0:2] = block
    train_heads(TrainConfig(cache=[str(clean)], run_dir=str(root / "trained"), epochs=2, batch_size=8, device="cpu",
                            amp="off"), HeadsConfig(**HEADS))
    with pytest.raises(NonFiniteError, match="no epoch finished"):
        train_heads(TrainConfig(cache=[str(bad)], run_dir=str(root / "stopped"), epochs=2, batch_size=8,
                                device="cpu", amp="off"), HeadsConfig(**HEADS))
    return root


def untrained_message(run) -> str:
    return (rf"{run}: training finished no epoch: its heads.safetensors holds the initial, untrained heads "
            r"\(train-heads stopped before the end of epoch 0\); train it again with `molt train-heads`")


def test_the_checkpoint_records_its_epoch(runs):
    assert sorted(p.name for p in (runs / "stopped").iterdir()) == ["config.json", "heads.safetensors"]
    assert checkpoint_epoch(runs / "stopped") == -1
    assert checkpoint_epoch(runs / "trained") in (0, 1)
    heads, *_ = load_run(runs / "trained")
    assert heads is not None


def test_robustness_and_predict_refuse_a_run_that_finished_no_epoch(runs, tmp_path):
    stopped, trained = runs / "stopped", runs / "trained"
    with pytest.raises(RunFileError, match=untrained_message(stopped)):
        load_run(stopped)
    lines: list[str] = []
    cfg = RobustnessConfig(runs=[str(trained), str(stopped)], noise=[0.1], missing=[], device="cpu",
                           report_dir=str(tmp_path / "rep"))
    with pytest.raises(RunFileError, match=untrained_message(stopped)):
        run_robustness(cfg, log=lines.append)
    assert not lines  # refused before the first run was evaluated
    with pytest.raises(RunFileError, match=untrained_message(stopped)):
        Classifier.from_run(stopped, device="cpu")
    for args in (["robustness", "--run", str(stopped), "--report-dir", str(tmp_path / "rep"), "--device", "cpu"],
                 ["predict", "--run", str(stopped), "--text", "a cat", "--device", "cpu"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, res.output
        assert "training finished no epoch" in res.output and "Traceback" not in res.output
        assert not (tmp_path / "rep" / "results.json").exists()


def resave_without_epoch(run) -> None:
    """What molt-cache wrote before the checkpoint recorded its epoch: the same weights, no metadata."""
    save_file(load_file(str(run / "heads.safetensors")), str(run / "heads.safetensors"))
    assert checkpoint_epoch(run) is None


def test_older_checkpoints_fall_back_to_log_and_metrics(runs, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(runs / "trained", old)
    resave_without_epoch(old)
    load_run(old)  # metrics.json and log.jsonl: trained
    (old / "metrics.json").unlink()
    load_run(old)  # an epoch record in log.jsonl (a run stopped after an epoch): trained
    (old / "log.jsonl").write_text('{"epoch": 0, "val_accu')  # a record cut short does not count
    with pytest.raises(RunFileError, match=rf"{old}: training finished no epoch: no epoch record in its log.jsonl "
                                           r"and no metrics.json, so heads.safetensors holds the initial, untrained "
                                           r"heads \(a copy of a run that did finish an epoch needs its log.jsonl"):
        load_run(old)
    stopped_old = tmp_path / "stopped-old"
    shutil.copytree(runs / "stopped", stopped_old)
    resave_without_epoch(stopped_old)
    with pytest.raises(RunFileError, match="training finished no epoch: no epoch record"):
        load_run(stopped_old)
    # the checkpoint's own epoch wins over log.jsonl (a crash between the log line and the save)
    shutil.copy(runs / "trained" / "log.jsonl", runs / "stopped" / "log.jsonl")
    try:
        with pytest.raises(RunFileError, match=untrained_message(runs / "stopped")):
            load_run(runs / "stopped")
    finally:
        (runs / "stopped" / "log.jsonl").unlink()
    bad = tmp_path / "bad-meta"
    shutil.copytree(runs / "trained", bad)
    save_file(load_file(str(bad / "heads.safetensors")), str(bad / "heads.safetensors"), metadata={EPOCH_KEY: "x"})
    with pytest.raises(RunFileError, match=rf"metadata {EPOCH_KEY}='x' is not an epoch number"):
        load_run(bad)
