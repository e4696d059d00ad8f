"""Non-finite states are never cached and never trained on (molt_cache/finite.py).

The failing input of the issue: a tiny LLaMA whose block-3 MLP (layers[2].mlp) is scaled by 1e6
overflows fp16 on CPU exactly as LLaMA models do on CUDA: layer_2, layer_3 and pooled are inf/NaN.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from _cache_fixture import TinySpec, write_tiny_cache

from data.make_fixtures import make_manifest
from molt_cache.cache.reader import open_cache
from molt_cache.config import HeadsConfig, TrainConfig
from molt_cache.encoders import create_image_encoder
from molt_cache.encoders.text_hf import HFTextEncoder
from molt_cache.encoders.tiny import build_tiny_llama
from molt_cache.extract import ExtractConfig, extract
from molt_cache.finite import BadFeatures, NonFiniteError, NonFiniteFeatureError, _stop_error, check_batch, dtype_advice
from molt_cache.robustness.evaluate import RobustnessConfig, run_robustness
from molt_cache.train import checkpoint_epoch, load_run, train_heads

torch.set_num_threads(1)
CPU = torch.device("cpu")


def overflowing_llama(dtype: torch.dtype) -> HFTextEncoder:
    model, tok = build_tiny_llama()
    with torch.no_grad():
        model.layers[2].mlp.down_proj.weight.mul_(1e6)
    return HFTextEncoder(model, tok, kind="tiny", name="llama-block3x1e6", weights_sha256="random:0:block3x1e6",
                         device=CPU, dtype=dtype, layers=4)


def run_extract(root: Path, out: Path, dtype: str, text_encoder=None):
    cfg = ExtractConfig(dataset="manifest", root=str(root), text="tiny:llama", image="tiny:vit", dtype=dtype,
                        out_dir=str(out), num_workers=0, device="cpu")
    image = create_image_encoder("tiny:vit", dtype=dtype, layers=4)
    return extract(cfg, text_encoder=text_encoder, image_encoder=image)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_manifest(tmp_path_factory.mktemp("nf") / "m")


def test_fp16_overflow_stops_extraction_naming_split_sample_layer(data, tmp_path):
    out = tmp_path / "cache16"
    with pytest.raises(NonFiniteFeatureError) as info:
        run_extract(data, out, "float16", overflowing_llama(torch.float16))
    msg = str(info.value)
    assert "split 'train'" in msg and "sample 'm00' (text item 0)" in msg and "'layer_2'" in msg
    assert "--dtype bfloat16" in msg and "--dtype float32" in msg and "stored as float16" in msg
    assert not (out / "manifest.json").exists()
    records = sorted(p.relative_to(out / "_progress").as_posix() for p in (out / "_progress").rglob("*")
                     if p.is_file() and p.name != "created")
    assert records and not any("text" in r for r in records)  # image units done, no text unit recorded
    # the suggested fix works: the same weights in float32 give a complete, finite cache
    done = run_extract(data, tmp_path / "cache32", "float32", overflowing_llama(torch.float32))
    assert done.complete
    arr = np.asarray(zarr.open_group(tmp_path / "cache32", mode="r")["train/text/layer_2"][:])
    assert np.isfinite(arr).all() and np.abs(arr).max() > 1000  # the scaled block, finite in fp32


def test_check_batch_storage_dtype_and_padding():
    mask = torch.tensor([[True, True, False]])
    states = torch.zeros(1, 3, 2)
    states[0, 2] = float("nan")  # a padding row: never stored, never checked
    check_batch("text", [5], mask, {"layer_0": states}, torch.zeros(1, 2), "float16")
    states[0, 1, 0] = 70000.0  # finite in fp32, inf once stored as fp16
    check_batch("text", [5], mask, {"layer_0": states}, torch.zeros(1, 2), "float32")
    with pytest.raises(NonFiniteFeatureError, match=r"text item 5, text array 'layer_0' \(1 values, stored as float16\)"):
        check_batch("text", [5], mask, {"layer_0": states}, torch.zeros(1, 2), "float16")
    with pytest.raises(NonFiniteFeatureError, match="'pooled'"):
        check_batch("image", [0], mask, {}, torch.tensor([[1.0, float("inf")]]), "bfloat16")


@pytest.fixture(scope="module")
def clean_cache(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "cache"
    run_extract(data, out, "float32")
    return out


def poison(cache: Path, split: str = "train", text_item: int = 0) -> None:
    """What the old extractor wrote for the overflowing model: inf/NaN in layer_2, layer_3 (= E_t)
    and pooled of a text."""
    g = zarr.open_group(cache, mode="r+")
    offsets = np.asarray(g[f"{split}/text/offsets"][:])
    lo, hi = int(offsets[text_item]), int(offsets[text_item + 1])
    for name in ("layer_2", "layer_3"):
        arr = g[f"{split}/text/{name}"]
        block = np.asarray(arr[lo:hi])
        block[:] = np.nan
        block[0, 0] = np.inf
        arr[lo:hi] = block
    pooled = g[f"{split}/text/pooled"]
    row = np.asarray(pooled[text_item])
    row[:] = np.nan
    pooled[text_item] = row


def copy_cache(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("model", ["baseline", "molt"])
def test_train_stops_on_nan_features_naming_epoch_step_pairs(clean_cache, tmp_path, model):
    cache = copy_cache(clean_cache, tmp_path / "cache")
    poison(cache)
    cfg = TrainConfig(cache=[str(cache)], run_dir=str(tmp_path / "run"), epochs=3, batch_size=4, device="cpu",
                      amp="off")
    with pytest.raises(NonFiniteError, match=r"at epoch 0, step \d+; batch of 4 pairs \[[^\]]*\]; pairs with non-finite "
                                             r"cached features: \[0\].*initial heads") as info:
        train_heads(cfg, HeadsConfig(model=model, d_common=8, layers=4))
    assert not (tmp_path / "run" / "metrics.json").exists()
    # where: split, modality and arrays, the sample id; advice that fits a float32 cache whose
    # extraction checked every batch (it was altered since: no fp16 overflow, no --dtype advice)
    msg = str(info.value)
    assert f"[0] (sample 'm00') in train/text/layer_2, train/text/layer_3, train/text/pooled of cache {cache};" in msg
    assert f"`molt cache verify {cache}`" in msg and "--dtype" not in msg


def test_train_keeps_best_checkpoint_when_nan_appears_later(clean_cache, tmp_path):
    cache = copy_cache(clean_cache, tmp_path / "cache")
    run = tmp_path / "run"
    saved: dict[str, bytes] = {}

    def on_epoch(record):
        if record["epoch"] == 0:
            saved["best"] = (run / "heads.safetensors").read_bytes()
            poison(cache)  # the streaming loader reads zarr each epoch: epoch 1 meets NaN

    # streaming: the feature store (the default) loads the arrays once, before epoch 0
    cfg = TrainConfig(cache=[str(cache)], run_dir=str(run), epochs=3, batch_size=4, device="cpu", amp="off",
                      store="stream")
    with pytest.raises(NonFiniteError, match=r"non-finite loss \(nan\) at epoch 1, step \d+.*best checkpoint so far "
                                             r"\(epoch 0\) is left in"):
        train_heads(cfg, HeadsConfig(model="baseline", d_common=8, layers=4), on_epoch=on_epoch)
    assert (run / "heads.safetensors").read_bytes() == saved["best"]
    # a finished epoch's heads: robustness and predict still load the run (no metrics.json)
    assert checkpoint_epoch(run) == 0 and not (run / "metrics.json").exists()
    load_run(run)


def test_robustness_refuses_a_nonfinite_cache(clean_cache, tmp_path):
    cfg = TrainConfig(cache=[str(clean_cache)], run_dir=str(tmp_path / "run"), epochs=1, batch_size=4,
                      device="cpu", amp="off")
    train_heads(cfg, HeadsConfig(model="baseline", d_common=8, layers=4))
    cache = copy_cache(clean_cache, tmp_path / "cache")
    poison(cache, "test", 1)
    rcfg = RobustnessConfig(runs=[str(tmp_path / "run")], cache=str(cache), noise=[0.1], missing=[], device="cpu",
                            report_dir=str(tmp_path / "rep"))
    with pytest.raises(NonFiniteError, match=r"split 'test' holds non-finite values \(inf/NaN\) in text/layer_2, row \d+"):
        run_robustness(rcfg, log=lambda s: None)
    rows = run_robustness(RobustnessConfig(runs=[str(tmp_path / "run")], cache=str(clean_cache), noise=[0.1],
                                           missing=[], device="cpu", report_dir=str(tmp_path / "rep")),
                          log=lambda s: None)
    assert rows and all(np.isfinite(r["accuracy"]) for r in rows if "accuracy" in r)
    manifest = json.loads((clean_cache / "manifest.json").read_text())
    assert manifest["extraction"]["nonfinite_check"].startswith("every batch")


def test_train_stop_names_split_array_sample_and_float16_advice(tmp_path):
    """A float16 cache extracted without the checks (the tiny fixture records no extraction): the
    message names the batch's size and a few of its pairs, the bad pair, its sample id, the split
    and array, and the overflow advice."""
    cache = tmp_path / "c"
    write_tiny_cache(cache, TinySpec(splits={"train": 30, "val": 12}))
    g = zarr.open_group(str(cache), mode="r+")
    lo, hi = (int(x) for x in g["train/text/offsets"][4:6])  # text 4: pair 4's alone
    arr = g["train/text/layer_1"]  # = E_t (final_is_last_layer): named once
    block = np.asarray(arr[lo:hi])
    block[:] = np.nan
    arr[lo:hi] = block
    run = tmp_path / "run"
    cfg = TrainConfig(cache=[str(cache)], run_dir=str(run), epochs=2, batch_size=8, device="cpu", amp="off")
    with pytest.raises(NonFiniteError) as info:
        train_heads(cfg, HeadsConfig(model="baseline", d_common=8, layers=2))
    msg = str(info.value)
    assert re.search(r"at epoch 0, step \d+; batch of \d pairs \[\d+, \d+, \d+, \d+, \d+, …\]; ", msg), msg
    assert (f"; pairs with non-finite cached features: [4] (sample 'train-4') in train/text/layer_1 of cache {cache}; "
            "the cache is stored as float16, which overflows past 65504") in msg
    assert "--dtype bfloat16" in msg and msg.endswith(f"; no epoch finished, so {run} holds the initial heads")


def test_stop_error_lists_a_few_bad_pairs_with_their_samples(tmp_path):
    write_tiny_cache(tmp_path / "c", TinySpec(splits={"train": 30}))
    split = open_cache(tmp_path / "c").split("train")
    bad = BadFeatures(list(range(10, 20)), [("text", "layer_1"), ("text", "final"), ("image", "final")])
    msg = str(_stop_error("loss (nan)", 1, 7, list(range(64)), bad, 0, "R", [split]))
    assert msg.startswith("non-finite loss (nan) at epoch 1, step 7; batch of 64 pairs [0, 1, 2, 3, 4, …]; ")
    # text/final is layer_1 in this cache (final_is_last_layer): not named twice
    assert ("pairs with non-finite cached features: 10 pairs [10, 11, 12, 13, 14, …] (samples 'train-10', "
            "'train-11', 'train-12', 'train-13', 'train-14', …) in train/text/layer_1, train/image/final of cache "
            f"{tmp_path / 'c'}; ") in msg
    assert msg.endswith("; the best checkpoint so far (epoch 0) is left in R")
    assert "no float16 overflow" in dtype_advice("bfloat16") and "--dtype" not in dtype_advice("float32")
