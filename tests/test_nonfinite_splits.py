"""`train-heads` refuses inf/NaN in the val and test splits before training (molt_cache/finite.py
`check_block`, the check `molt robustness` makes): the feature store checks each block as it
loads it, a streamed split is read through once. The error names the cache, split, array, row,
the item and pair owning the row, its sample id, and advice that fits the cache's dtype; no run
folder (so no metrics.json) is written. The train split's inf/NaN is StepGuard's (test_nonfinite)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from _cache_fixture import TinySpec, write_tiny_cache

from molt_cache.cache.reader import open_cache
from molt_cache.config import HeadsConfig, TrainConfig
from molt_cache.finite import NonFiniteError, _all_finite, _nonfinite, scan_split
from molt_cache.train import train_heads

torch.set_num_threads(1)
SPLITS = {"train": 30, "val": 12, "test": 15}


def poison_row(cache, array: str, row: int, value: float) -> None:
    """Every value of one stored row, written through zarr (the crc32c checksums stay valid)."""
    arr = zarr.open_group(str(cache), mode="r+")[array]
    values = np.asarray(arr[row])
    values[:] = value
    arr[row] = values


def first_row_of(cache, split: str, modality: str, item: int) -> int:
    return int(zarr.open_group(str(cache), mode="r")[f"{split}/{modality}/offsets"][item])


# (split, value, modality/array, item, owner as the message says it, cache dtype)
CASES = [
    ("val", np.nan, "image/layer_1", 1, "image item 1, used by 3 pairs, the first pair 3, sample 'val-3'", "float16"),
    ("test", np.inf, "text/pooled", 2, "text item 2, used by pair 2, sample 'test-2'", "float16"),
    ("val", -np.inf, "text/layer_0", 4, "text item 4, used by pair 4, sample 'val-4'", "float32"),
    ("test", np.nan, "image/final", 0, "image item 0, used by 3 pairs, the first pair 0, sample 'test-0'", "float32"),
]


@pytest.mark.parametrize("store", ["auto", "stream"])
@pytest.mark.parametrize("split,value,array,item,owner,dtype", CASES)
def test_train_heads_refuses_nonfinite_val_and_test_before_training(tmp_path, store, split, value, array, item,
                                                                     owner, dtype):
    cache = tmp_path / "c"
    write_tiny_cache(cache, TinySpec(splits=SPLITS, dtype=dtype))
    modality, name = array.split("/")
    row = item if name == "pooled" else first_row_of(cache, split, modality, item)
    poison_row(cache, f"{split}/{array}", row, value)
    width = zarr.open_group(str(cache), mode="r")[f"{split}/{array}"].shape[1]
    run = tmp_path / "run"
    epochs: list = []
    cfg = TrainConfig(cache=[str(cache)], run_dir=str(run), epochs=2, batch_size=8, device="cpu", amp="off",
                      store=store)
    with pytest.raises(NonFiniteError) as info:
        train_heads(cfg, HeadsConfig(model="molt", d_common=8, layers=2, fbp_stride=2), on_epoch=epochs.append)
    msg = str(info.value)
    assert msg.startswith(f"cache {cache} split {split!r} holds non-finite values (inf/NaN) in {array}, "
                          f"row {row} ({owner}; {width} of {width} values in the row); refusing to evaluate on it: ")
    if dtype == "float16":  # a float16 cache extracted without the checks: the overflow advice
        assert "stored as float16" in msg and "--dtype bfloat16" in msg and "--dtype float32" in msg
    else:  # float32: not an overflow
        assert "no float16 overflow" in msg and f"`molt cache verify {cache}`" in msg and "--dtype" not in msg
    assert not epochs and not run.exists()  # refused before training: no run folder, no metrics.json


def test_a_clean_cache_still_trains_with_the_check(tmp_path):
    cache = tmp_path / "c"
    write_tiny_cache(cache, TinySpec(splits=SPLITS))
    for store in ("device", "stream"):
        run = tmp_path / store
        cfg = TrainConfig(cache=[str(cache)], run_dir=str(run), epochs=1, batch_size=8, device="cpu", amp="off",
                          store=store)
        train_heads(cfg, HeadsConfig(model="baseline", d_common=8, layers=2))
        assert (run / "metrics.json").exists()


def test_scan_split_reads_in_blocks_and_names_the_first_bad_row(tmp_path):
    """Small blocks (as a wide array gets): the row found is the first bad one, wherever the block starts."""
    cache = tmp_path / "c"
    write_tiny_cache(cache, TinySpec(splits={"train": 6, "val": 40}))
    start = first_row_of(cache, "val", "text", 20)
    poison_row(cache, "val/text/layer_1", start, np.nan)
    poison_row(cache, "val/text/layer_1", first_row_of(cache, "val", "text", 30), np.inf)
    split = open_cache(cache).split("val")
    for rows in (None, 1, 3, 7):
        with pytest.raises(NonFiniteError, match=rf"in text/layer_1, row {start} \(text item 20, used by pair 20, "
                                                 r"sample 'val-20'; 6 of 6 values"):
            scan_split(split, rows)
    scan_split(open_cache(cache).split("train"))  # a clean split passes


def test_the_fast_check_agrees_with_isfinite_for_every_stored_dtype():
    """float16 / float32 blocks and bfloat16's raw bits (uint16): ±max and tiny values pass, ±inf
    and NaN of either sign are found, by the fast check and by the per-value one."""
    rng = np.random.default_rng(0)
    for dtype in (np.float16, np.float32):
        block = (rng.standard_normal((50, 8)) * 100).astype(dtype)
        block[0, 0], block[1, 1], block[2, 2] = np.finfo(dtype).max, -np.finfo(dtype).max, np.finfo(dtype).tiny
        assert _all_finite(block, dtype.__name__) and not _nonfinite(block, dtype.__name__).any()
        for value in (np.inf, -np.inf, np.nan, -np.nan):
            bad = block.copy()
            bad[30, 5] = value
            assert not _all_finite(bad, dtype.__name__)
            assert np.argwhere(_nonfinite(bad, dtype.__name__)).tolist() == [[30, 5]]
    bits = np.array([[0x3F80, 0x7F7F, 0xFF7F], [0x0001, 0, 0x8000]], dtype=np.uint16)  # 1, ±max, tiny, ±0
    assert _all_finite(bits, "bfloat16") and not _nonfinite(bits, "bfloat16").any()
    for value in (0x7F80, 0xFF80, 0x7FC0, 0xFFC1):  # ±inf, NaN, -NaN
        bad = bits.copy()
        bad[1, 2] = value
        assert not _all_finite(bad, "bfloat16") and np.argwhere(_nonfinite(bad, "bfloat16")).tolist() == [[1, 2]]
