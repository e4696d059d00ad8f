"""Cache reader refusals and the training loader's order, contents and padding, on tiny caches
written directly with zarr (tests/_cache_fixture.py)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import zarr

from _cache_fixture import TinySpec, write_tiny_cache
from molt_cache.cache.loader import make_loader
from molt_cache.cache.reader import CacheError, check_compatible, open_cache

torch.set_num_threads(1)


@pytest.fixture
def cache(tmp_path):
    path = tmp_path / "cache"
    truth = write_tiny_cache(path, TinySpec(splits={"train": 37, "val": 11}))
    return path, truth


# -- reader refusals ------------------------------------------------------------------------------

def test_refuses_missing_and_foreign_folders(tmp_path):
    with pytest.raises(CacheError, match="does not exist"):
        open_cache(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hi")
    with pytest.raises(CacheError, match="no zarr group"):
        open_cache(tmp_path / "plain")
    zarr.open_group(str(tmp_path / "other"), mode="w").attrs["something"] = 1
    with pytest.raises(CacheError, match=r"attrs\['molt_cache'\].*missing"):
        open_cache(tmp_path / "other")


def test_refuses_other_format_version(tmp_path):
    write_tiny_cache(tmp_path / "c", TinySpec(format_version=7))
    with pytest.raises(CacheError, match=r"format_version 7.*format versions \[2\]"):
        open_cache(tmp_path / "c")


def test_refuses_incomplete_cache_naming_resume(tmp_path):
    write_tiny_cache(tmp_path / "c", TinySpec(complete=False))
    with pytest.raises(CacheError, match=r"unfinished.*molt extract"):
        open_cache(tmp_path / "c")


def test_refuses_complete_flag_without_manifest_file(cache):
    path, _ = cache
    (path / "manifest.json").unlink()
    with pytest.raises(CacheError, match="unfinished"):
        open_cache(path)


def test_refuses_truncated_array_naming_it(cache):
    path, _ = cache
    g = zarr.open_group(str(path), mode="r+")
    a = g["train/image/layer_1"]
    a.resize((a.shape[0] - 3, a.shape[1]))
    with pytest.raises(CacheError, match=r"train/image/layer_1 has shape"):
        open_cache(path)


def test_refuses_missing_array_naming_it(cache):
    path, _ = cache
    shutil.rmtree(path / "val" / "text" / "pooled")
    with pytest.raises(CacheError, match=r"val/text/pooled is missing"):
        open_cache(path)


def test_check_compatible_names_each_differing_field(tmp_path):
    a = open_cache(_written(tmp_path / "a", TinySpec()))
    same = open_cache(_written(tmp_path / "same", TinySpec(seed=0, splits={"train": 5})))
    check_compatible([a, same])
    b = open_cache(_written(tmp_path / "b", TinySpec(image_widths=(5, 7), num_labels=4)))
    with pytest.raises(CacheError) as e:
        check_compatible([a, b])
    msg = str(e.value)
    assert "image.layer_widths: [5, 5] vs [5, 7]" in msg
    assert "dataset.labels" in msg and "text." not in msg
    c = open_cache(_written(tmp_path / "c", TinySpec(encoder_name="other")))
    with pytest.raises(CacheError, match=r"text\.name: 'tiny-text' vs 'other-text'"):
        check_compatible([a, c])


def _written(path, spec):
    write_tiny_cache(path, spec)
    return path


def test_pair_random_access_matches_written_values(cache):
    path, truth = cache
    split = open_cache(path).split("train")
    t = truth["train"]
    assert split.num_pairs == 37 and split.task == "single-label"
    assert split.labels == ["label0", "label1", "label2"]
    for i in (0, 5, 35, 36):  # 35, 36 reuse earlier texts
        p = split.pair(i)
        text, image = t.texts[t.text_index[i]], t.images[t.image_index[i]]
        for got, want in zip(p.text_layers, text["layers"]):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(p.text_final, text["layers"][-1])  # final_is_last_layer
        np.testing.assert_array_equal(p.image_final, image["final"])
        np.testing.assert_array_equal(p.image_pooled, image["pooled"])
        assert int(p.target) == t.target[i]
    with pytest.raises(IndexError, match="out of range"):
        split.pair(37)
    with pytest.raises(CacheError, match=r"no split 'test'.*\['train', 'val'\]"):
        open_cache(path).split("test")


# -- loader ---------------------------------------------------------------------------------------

def _loader(splits, **kw):
    args = dict(batch_size=8, shuffle=True, seed=0, epoch=0, in_memory=False, num_workers=0)
    args.update(kw)
    return make_loader(splits, **args)


def _summary(loader):
    return [(b.index.tolist(), b.text_layers[0].sum().item(), b.image_final.sum().item())
            for b in loader]


def test_shuffled_epoch_yields_every_pair_once(cache):
    path, _ = cache
    split = open_cache(path).split("train")
    seen = [i for b in _loader([split]) for i in b.index.tolist()]
    assert sorted(seen) == list(range(37))
    assert seen != list(range(37))


def test_order_is_fixed_by_seed_and_epoch(cache):
    path, _ = cache
    split = open_cache(path).split("train")
    a = _summary(_loader([split], seed=3, epoch=1))
    assert a == _summary(_loader([split], seed=3, epoch=1, num_workers=2))
    assert a != _summary(_loader([split], seed=4, epoch=1))
    assert a != _summary(_loader([split], seed=3, epoch=2))


def test_unshuffled_is_in_order(cache):
    path, _ = cache
    split = open_cache(path).split("val")
    assert [i for b in _loader([split], shuffle=False) for i in b.index.tolist()] == list(range(11))


def test_in_memory_matches_streaming_exactly(cache):
    path, _ = cache
    split = open_cache(path).split("train")
    for stream, ram in zip(_loader([split], seed=5), _loader([split], seed=5, in_memory=True)):
        for name in ("text_final", "text_pooled", "text_mask", "image_final", "image_pooled",
                     "image_mask", "targets", "index"):
            assert torch.equal(getattr(stream, name), getattr(ram, name)), name
        for a, b in zip(stream.image_layers + stream.text_layers, ram.image_layers + ram.text_layers):
            assert torch.equal(a, b)


def test_in_memory_refuses_when_it_does_not_fit(cache, monkeypatch):
    import molt_cache.cache.loader as loader_mod
    path, _ = cache
    split = open_cache(path).split("train")
    monkeypatch.setattr(loader_mod, "available_memory_bytes", lambda: 1000)
    with pytest.raises(MemoryError, match=r"needs .* GiB .*drop --in-memory"):
        _loader([split], in_memory=True)


def test_batches_hold_stored_values_with_correct_padding(cache):
    """Every batch row against the fixture's values, gathered through offsets independently."""
    path, truth = cache
    split = open_cache(path).split("train")
    t = truth["train"]
    for batch in _loader([split], batch_size=6, seed=1):
        assert batch.text_final is batch.text_layers[-1]  # served from layer_{L-1}
        assert batch.text_present.all() and batch.image_present.all()
        assert batch.targets.dtype == torch.int64 and batch.targets.shape == (batch.size,)
        for b, i in enumerate(batch.index.tolist()):
            text, image = t.texts[t.text_index[i]], t.images[t.image_index[i]]
            nt, ni = len(text["final"]), len(image["final"])
            assert batch.text_mask[b].tolist() == [k < nt for k in range(batch.text_mask.shape[1])]
            assert batch.image_mask[b].tolist() == [k < ni for k in range(batch.image_mask.shape[1])]
            for got, want in zip(batch.text_layers, text["layers"]):
                np.testing.assert_array_equal(got[b, :nt].numpy(), want)
                assert not got[b, nt:].any()  # padding is zero
            for got, want in zip(batch.image_layers, image["layers"]):
                np.testing.assert_array_equal(got[b, :ni].numpy(), want)
            np.testing.assert_array_equal(batch.image_final[b, :ni].numpy(), image["final"])
            np.testing.assert_array_equal(batch.text_pooled[b].numpy(), text["pooled"])
            np.testing.assert_array_equal(batch.image_pooled[b].numpy(), image["pooled"])
            assert batch.targets[b].item() == t.target[i]
        assert batch.text_mask.shape[1] == int(batch.text_mask.sum(1).max())  # padded to longest


def test_multi_label_targets_and_separate_final(tmp_path):
    spec = TinySpec(task="multi-label", num_labels=4, text_final_is_last_layer=False,
                    dtype="float32")
    truth = write_tiny_cache(tmp_path / "c", spec)["train"]
    split = open_cache(tmp_path / "c").split("train")
    for batch in _loader([split], in_memory=True):
        assert batch.targets.dtype == torch.float32 and batch.targets.shape == (batch.size, 4)
        np.testing.assert_array_equal(batch.targets.numpy(), truth.target[batch.index.numpy()])
        assert batch.text_final is not batch.text_layers[-1]
        b, i = 0, int(batch.index[0])
        text = truth.texts[truth.text_index[i]]
        np.testing.assert_array_equal(batch.text_final[b, :len(text["final"])].numpy(),
                                      text["final"])


def test_mixed_caches_are_concatenated(tmp_path):
    a = open_cache(_written(tmp_path / "a", TinySpec(splits={"train": 10}))).split("train")
    b = open_cache(_written(tmp_path / "b", TinySpec(splits={"train": 7}, seed=1))).split("train")
    idx = [i for batch in _loader([a, b], shuffle=False) for i in batch.index.tolist()]
    assert idx == list(range(10)) + list(range(7))
    shuffled = sorted(i for batch in _loader([a, b]) for i in batch.index.tolist())
    assert shuffled == sorted(list(range(10)) + list(range(7)))
    c = open_cache(_written(tmp_path / "c", TinySpec(text_widths=(6, 9)))).split("train")
    with pytest.raises(CacheError, match="layer_widths"):
        _loader([a, c])


def test_streaming_reads_each_text_chunk_about_once(tmp_path):
    """Block shuffling keeps reads chunk-local: far fewer chunk decodes than pair reads."""
    write_tiny_cache(tmp_path / "c", TinySpec(splits={"train": 300}, chunk_rows=16))
    split = open_cache(tmp_path / "c").split("train")
    loader = _loader([split], batch_size=16)
    n_batches = sum(1 for _ in loader)
    text_arrays, image_arrays = 3, 4  # layer_0, layer_1 (= final), pooled | layers, final, pooled
    chunks = sum(-(-a.shape[0] // a.chunks[0]) for m in (split.text, split.image)
                 for a in {id(x): x for x in [*m.layers, m.final, m.pooled]}.values())
    assert n_batches == 19
    # each pair would touch text_arrays + image_arrays chunks if nothing were reused
    assert loader.chunk_decodes <= 1.5 * chunks < 300 * (text_arrays + image_arrays) / 4


def test_reads_a_cache_written_by_extract(tmp_path):
    """Integration with the writer (molt_cache/extract/) through its own fake encoders: the
    loader's batches hold the float64 reference forward of each pair's text and image."""
    from PIL import Image

    import test_extract as te

    root = tmp_path / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    for k in range(10):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f"img{k}.jpg")
    te.run(root, tmp_path / "cache")
    split = open_cache(tmp_path / "cache").split("train")
    samples = {s.sample_id: s for s in te.FakeReader(root).samples("train")}
    sample_ids = split.group["pairs/sample_id"][...]
    text_enc, image_enc = te.FakeText(), te.FakeImage()
    seen = 0
    for batch in _loader([split], batch_size=7, seed=2):
        assert batch.text_final is batch.text_layers[-1]
        for b, i in enumerate(batch.index.tolist()):
            s = samples[str(sample_ids[i])]
            t_layers, t_pooled = te.ref_text(text_enc, text_enc.tokenize([s.text])[0])
            n = int(batch.text_mask[b].sum())
            assert n == len(t_layers[0])
            for got, want in zip(batch.text_layers, t_layers):
                np.testing.assert_allclose(got[b, :n].numpy(), want, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(batch.text_pooled[b].numpy(), t_pooled, rtol=1e-5, atol=1e-5)
            i_layers, i_pooled = te.ref_image(image_enc, s.image.path)
            got_image = [*batch.image_layers, batch.image_final]
            for got, want in zip(got_image, i_layers):
                np.testing.assert_allclose(got[b].numpy(), want, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(batch.image_pooled[b].numpy(), i_pooled, rtol=1e-4, atol=1e-4)
            assert batch.targets[b].item() == s.target[0]
            seen += 1
    assert seen == split.num_pairs == 30
