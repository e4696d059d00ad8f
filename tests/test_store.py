"""The feature store (molt_cache/cache/store.py) against today's loader: the same pairs in the same
batches with the same values (fp16, bf16, float32, mixed caches, both placements), the same
perturbations for the same seeds, the grouped-by-image order, the host->device byte count,
placement choice and refusals, and train-heads from the store vs streaming."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import zarr
from _cache_fixture import TinySpec, _store, write_tiny_cache

from molt_cache.cache import loader as loader_mod
from molt_cache.cache.loader import grouped_order, make_loader
from molt_cache.cache.reader import open_cache
from molt_cache.cache.store import BufferPool, FeatureStore, Placement, _size, choose_placement
from molt_cache.config import HeadsConfig, TrainConfig
from molt_cache.perturb import MissingTable, make_perturb

CPU = torch.device("cpu")
PLACEMENTS = [Placement("device", "device"), Placement("host", "host"), Placement("host", "device")]
FIELDS = ("text_final", "text_pooled", "text_mask", "image_final", "image_pooled", "image_mask",
          "targets", "index", "text_present", "image_present")


def assert_same_batch(today, store_batch):
    assert store_batch.image_rows is not None
    got = store_batch.per_pair()
    for name in FIELDS:
        assert torch.equal(getattr(today, name), getattr(got, name)), name
    assert len(today.text_layers) == len(got.text_layers)
    for a, b in zip(today.text_layers + today.image_layers, got.text_layers + got.image_layers):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
    assert (today.text_final is today.text_layers[-1]) == (got.text_final is got.text_layers[-1])


def both(splits, placement, perturb=None, **kw):
    args = dict(batch_size=7, shuffle=True, seed=3, epoch=1)
    args.update(kw)
    today = list(make_loader(splits, in_memory=False, num_workers=0, perturb=perturb, **args))
    store = FeatureStore(splits, placement, CPU)
    new = list(store.batches(perturb=perturb, **args))
    assert len(today) == len(new)
    return today, new, store


@pytest.mark.parametrize("placement", PLACEMENTS, ids=lambda p: p.name)
@pytest.mark.parametrize("spec", [
    TinySpec(splits={"train": 37, "val": 11}),
    TinySpec(splits={"train": 23}, task="multi-label", num_labels=4, text_final_is_last_layer=False,
             dtype="float32"),
], ids=["fp16", "fp32-multilabel-separate-final"])
def test_store_serves_todays_batches(tmp_path, spec, placement):
    write_tiny_cache(tmp_path / "c", spec)
    reader = open_cache(tmp_path / "c")
    splits = [reader.split(n) for n in reader.split_names]  # two splits = two mixed caches
    for shuffle in (True, False):
        today, new, _ = both(splits, placement, shuffle=shuffle)
        for a, b in zip(today, new):
            assert_same_batch(a, b)


def _to_bfloat16(path):
    """Rewrite a float32 tiny cache as bfloat16 the way extract stores it (raw 16 bits, uint16)."""
    root = zarr.open_group(str(path), mode="r+")
    for modality in ("text", "image"):
        g = root[f"train/{modality}"]
        for name in [k for k in g.array_keys() if k.startswith(("layer_", "final", "pooled"))]:
            values = np.asarray(g[name][...]).astype(np.float32)
            bits = (values.view(np.uint32) >> 16).astype(np.uint16)  # truncate to bf16
            rows = g[name].chunks[0]
            del g[name]
            _store(g, name, bits, rows)  # format 2's codecs (crc32c, every chunk written)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["text"]["dtype"] = manifest["image"]["dtype"] = "bfloat16"
    root.attrs["molt_cache"] = manifest
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_store_bfloat16_widens_exactly(tmp_path):
    write_tiny_cache(tmp_path / "c", TinySpec(splits={"train": 20}, dtype="float32"))
    _to_bfloat16(tmp_path / "c")
    split = open_cache(tmp_path / "c").split("train")
    for placement in PLACEMENTS[:2]:
        today, new, store = both([split], placement)
        assert store.text.layers[0].dtype == torch.bfloat16  # held as stored
        for a, b in zip(today, new):
            assert_same_batch(a, b)


@pytest.mark.parametrize("strategy", ["zero", "translate"])
def test_perturbations_same_numbers_as_todays_loader(tmp_path, strategy):
    """Missing modality (drawn once per pair) and feature noise (seeded per pair): the same numbers
    on the store's deduplicated batches as on today's per-pair batches."""
    write_tiny_cache(tmp_path / "c", TinySpec(splits={"train": 37}))
    split = open_cache(tmp_path / "c").split("train")
    table = MissingTable.sample(37, 0.6, "both", seed=4)
    for noise_on in ("text", "image", "both"):
        f = make_perturb(noise=0.3, noise_on=noise_on, missing_table=table, strategy=strategy, seed=2)
        today, new, _ = both([split], PLACEMENTS[0], perturb=f)
        for a, b in zip(today, new):
            assert_same_batch(a, b) if b.image_rows is not None else None
            b = b.per_pair()
            for name in FIELDS:
                assert torch.equal(getattr(a, name), getattr(b, name)), (noise_on, name)
            for x, y in zip(a.text_layers + a.image_layers, b.text_layers + b.image_layers):
                assert torch.equal(x, y), noise_on


def test_missing_image_keeps_shared_image_for_other_pairs(tmp_path):
    write_tiny_cache(tmp_path / "c", TinySpec(splits={"train": 12}, pairs_per_image=4))
    split = open_cache(tmp_path / "c").split("train")
    store = FeatureStore([split], PLACEMENTS[0], CPU)
    batch = next(iter(store.batches(batch_size=12, shuffle=False, seed=0, epoch=0)))
    assert batch.image_layers[0].shape[0] == 3  # 12 pairs, 3 images
    kinds = np.zeros(12, np.uint8)
    kinds[[1, 6]] = 2  # one pair of image 0 and one of image 1 lose their image
    out = MissingTable(kinds).apply(batch, "zero")
    assert out.image_layers[0].shape[0] == 5  # each affected image gains a zeroed copy
    full = out.per_pair()
    for b in range(12):
        assert bool(full.image_present[b]) == (b not in (1, 6))
        assert bool(full.image_layers[0][b].any()) == (b not in (1, 6))
        assert torch.equal(full.image_mask[b], batch.per_pair().image_mask[b])  # mask kept


def test_grouped_order_groups_pairs_by_image(tmp_path):
    write_tiny_cache(tmp_path / "c", TinySpec(splits={"train": 40}, pairs_per_image=5))
    split = open_cache(tmp_path / "c").split("train")
    image_index = np.asarray(split.image_index[...])
    s, p = grouped_order([image_index], seed=1, epoch=0, pairs_per_image=3)
    assert sorted(p.tolist()) == list(range(40)) and not s.any()
    # each image's 5 pairs: a group of 3 and one of 2, each consecutive (two groups of one image
    # may land side by side: a run of 5)
    runs = np.split(p, np.flatnonzero(np.diff(image_index[p])) + 1)
    assert sorted({len(r) for r in runs}) <= [2, 3, 5] and 8 <= len(runs) <= 16
    for image in range(8):
        assert sorted(len(r) for r in runs if image_index[r[0]] == image) in ([2, 3], [5])
    again = grouped_order([image_index], seed=1, epoch=0, pairs_per_image=3)
    assert np.array_equal(p, again[1])
    assert not np.array_equal(p, grouped_order([image_index], seed=1, epoch=1, pairs_per_image=3)[1])
    store = FeatureStore([split], PLACEMENTS[0], CPU)
    batches = list(store.batches(batch_size=6, shuffle=True, seed=1, epoch=0, pairs_per_image=3))
    assert [int(i) for b in batches for i in b.index] == p.tolist()
    assert all(b.image_layers[0].shape[0] <= 3 for b in batches)  # 6 pairs: 2 groups, <= 3 images
    stream = make_loader([split], batch_size=6, shuffle=True, seed=1, epoch=0, in_memory=False,
                         num_workers=0, pairs_per_image=3)
    assert [int(i) for b in stream for i in b.index] == p.tolist()
    with pytest.raises(ValueError, match="pairs_per_image"):
        grouped_order([image_index], seed=1, epoch=0, pairs_per_image=0)


def test_bytes_to_device_counts_indices_and_host_rows(tmp_path):
    write_tiny_cache(tmp_path / "c", TinySpec(splits={"train": 37}))
    split = open_cache(tmp_path / "c").split("train")
    offsets = {m: np.asarray(getattr(split, m).offsets[...]) for m in ("text", "image")}
    text_index, image_index = np.asarray(split.text_index[...]), np.asarray(split.image_index[...])
    expected = {"device": 0, "host": 0, "mixed": 0}
    for placement, key in zip(PLACEMENTS, ("device", "host", "mixed")):
        store = FeatureStore([split], placement, CPU)
        for b in store.batches(batch_size=8, shuffle=True, seed=0, epoch=0):
            ids = b.index.numpy()
            images = np.unique(image_index[ids])
            n_idx = 8 * (5 * len(ids) + 3 * len(images))  # packed int64 indices
            t_rows = int(np.diff(offsets["text"])[text_index[ids]].sum())
            i_rows = int(np.diff(offsets["image"])[images].sum())
            text = 2 * (2 * 6 * t_rows + 6 * len(ids))  # 2 layers x 6 wide (final = last), pooled 6
            image = 2 * (5 * 3 * i_rows + 4 * len(images))  # 2 layers + final x 5, pooled 4
            expected[key] += n_idx + {"device": 0, "host": text + image, "mixed": text}[key]
        assert store.bytes_to_device == expected[key], key
        assert store.pairs_served == 37


def test_sizes_read_in_the_unit_that_fits():
    assert _size(3 * 2 ** 30) == "3.00 GiB" and _size(2 ** 30) == "1.00 GiB"
    assert _size(12.5 * 2 ** 20) == "12.50 MiB" and _size(2 ** 30 - 2 ** 20) == "1023.00 MiB"
    assert _size(1536) == "1.5 KiB" and _size(0) == "0.0 KiB"


def test_placement_choice_and_refusals(tmp_path, monkeypatch):
    write_tiny_cache(tmp_path / "c", TinySpec(splits={"train": 37}))
    split = open_cache(tmp_path / "c").split("train")
    placement, line = choose_placement([split], "auto", CPU)
    # a tiny cache is sized in KiB, not "0.00 GiB"; every placement's line says "feature store:"
    assert placement == Placement("device", "device") and re.search(r"text \d+\.\d KiB in RAM", line), line
    placement, line = choose_placement([split], "stream", CPU)
    assert placement.name == "stream" and re.match(r"feature store: stream; streaming from disk \(\d+\.\d KiB stored\)$", line)
    monkeypatch.setattr(loader_mod, "available_memory_bytes", lambda: 1000)
    for kind in ("device", "host"):
        with pytest.raises(MemoryError, match=rf"--store {kind}: .*needs .* KiB .*only 0\.8 KiB"):
            choose_placement([split], kind, CPU)
    assert choose_placement([split], "auto", CPU)[0].name == "stream"  # the fastest that fits
    with pytest.raises(ValueError, match="valid"):
        choose_placement([split], "gpu", CPU)


def _train(cache, run_dir, **kw):
    from molt_cache.train import train_heads

    lines = []
    cfg = TrainConfig(cache=[str(cache)], run_dir=str(run_dir), epochs=2, batch_size=8, device="cpu",
                      amp="off", **kw)
    result = train_heads(cfg, HeadsConfig(d_common=8, layers=2, fbp_stride=2), on_info=lines.append)
    return result, lines, [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]


def test_train_heads_store_matches_streaming(tmp_path):
    """Same seeds: the store (image-once) and streaming (per pair) give the same losses and
    metrics up to float rounding; --in-memory is --store host; placement is reported."""
    write_tiny_cache(tmp_path / "c", TinySpec(splits={"train": 40, "val": 12}))
    stream, lines_s, log_s = _train(tmp_path / "c", tmp_path / "s", store="stream")
    device, lines_d, log_d = _train(tmp_path / "c", tmp_path / "d")
    host, _, log_h = _train(tmp_path / "c", tmp_path / "h", in_memory=True)
    assert "stream" in lines_s[0] and "feature store: device" in lines_d[0]
    for log in (log_d, log_h):
        for a, b in zip(log_s, log):
            for k in ("train_loss", "train_task", "train_cca", "val_accuracy"):
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    for r in (device, host):
        for k, v in stream.val.items():
            assert r.val[k] == pytest.approx(v, abs=1e-6)
    assert json.loads((tmp_path / "h" / "metrics.json").read_text())["feature_store"] == "host"
    with pytest.raises(ValueError, match="--in-memory means --store host"):
        _train(tmp_path / "c", tmp_path / "x", in_memory=True, store="stream")
    grouped, _, _ = _train(tmp_path / "c", tmp_path / "g", pairs_per_image=3)
    assert grouped.epochs_run == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (GPU check)")
def test_store_on_cuda_matches_cpu_without_host_syncs(tmp_path):
    """On a GPU: the device and mixed placements give the CPU store's values, and assembling a
    batch never synchronizes with the device (torch's sync debug mode raises if it does)."""
    write_tiny_cache(tmp_path / "c", TinySpec(splits={"train": 37}))
    split = open_cache(tmp_path / "c").split("train")
    cpu = list(FeatureStore([split], PLACEMENTS[0], CPU).batches(batch_size=8, shuffle=True, seed=0, epoch=0))
    for placement in (PLACEMENTS[0], PLACEMENTS[2]):
        store = FeatureStore([split], placement, torch.device("cuda"))
        loader = store.batches(batch_size=8, shuffle=True, seed=0, epoch=0)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            gpu = list(loader)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for a, b in zip(cpu, gpu):
            b = b.to("cpu")
            assert torch.equal(a.image_rows, b.image_rows)
            assert_same_batch(a.per_pair(), b)


def test_nonfinite_rows_names_every_pair_of_a_shared_bad_image(tmp_path):
    """The non-finite check (molt_cache/finite.py) on a deduplicated batch: a NaN in one stored image
    is reported for each pair that shows it."""
    from molt_cache.finite import nonfinite_rows

    write_tiny_cache(tmp_path / "c", TinySpec(splits={"train": 12}, pairs_per_image=4))
    split = open_cache(tmp_path / "c").split("train")
    batch = next(iter(FeatureStore([split], PLACEMENTS[0], CPU).batches(batch_size=12, shuffle=False,
                                                                       seed=0, epoch=0)))
    batch.image_final[1, 0, 0] = float("nan")  # image 1 = pairs 4..7
    assert nonfinite_rows(batch) == [4, 5, 6, 7]


def test_buffer_pool_reuses_only_buffers_nothing_else_holds():
    """A pooled buffer comes back only when no batch view, autograd-saved tensor or numpy array
    over it is alive; until then the pool hands out another."""
    pool = BufferPool()
    a = pool.take((4, 5), torch.float32)
    b = pool.take((4, 5), torch.float32)
    assert a.data_ptr() != b.data_ptr()  # a still held
    ptr = a.data_ptr()
    del a
    assert pool.take((2, 5), torch.float32).data_ptr() == ptr  # free again (and big enough)
    x = pool.take((4, 5), torch.float32).fill_(1.0)
    ptr = x.data_ptr()
    loss = torch.nn.Linear(5, 1)(x).sum()  # Linear saves its input for the weight gradient
    del x
    assert all(pool.take((4, 5), torch.float32).data_ptr() != ptr for _ in range(3))
    loss.backward()  # the saved input is released
    assert pool.take((4, 5), torch.float32).data_ptr() == ptr
    arr = pool.take((4, 5), torch.float32).numpy()  # a numpy array over it holds it too
    assert pool.take((4, 5), torch.float32).data_ptr() != arr.ctypes.data
    assert pool.take((4, 5), torch.float16).dtype == torch.float16
    small = BufferPool(max_bytes=1000)  # 250 float32: keeps what fits, hands out the rest unpooled
    held = [small.take((100,), torch.float32) for _ in range(4)]
    assert small.nbytes <= 1000 and len({t.data_ptr() for t in held}) == 4
    del held
    assert small.take((100,), torch.float32) is not None and small.nbytes <= 1000


def test_store_batches_held_together_stay_intact(tmp_path):
    """A whole epoch's batches held at once (prefetched, or kept by the caller) equal the same
    batches assembled one at a time without the pool: no later batch overwrote an earlier one."""
    write_tiny_cache(tmp_path / "c", TinySpec(splits={"train": 37}))
    split = open_cache(tmp_path / "c").split("train")
    store = FeatureStore([split], Placement("device", "device"), CPU)
    assert store._pool is not None
    held = list(store.batches(batch_size=5, shuffle=True, seed=1, epoch=0, num_workers=2))
    store._pool = None
    for a, b in zip(held, store.batches(batch_size=5, shuffle=True, seed=1, epoch=0)):
        for x, y in zip([*a.text_layers, *a.image_layers, a.image_final],
                        [*b.text_layers, *b.image_layers, b.image_final]):
            assert torch.equal(x, y)
