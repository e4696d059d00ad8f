"""Feature-level perturbations: exact identities, noise statistics against a float64 numpy
reference, per-sample seeding independent of batching, and the missing-modality table."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from molt_cache.batch import FeatureBatch
from molt_cache.perturb import (MissingTable, gaussian_noise, make_perturb, missing)

torch.set_num_threads(1)


def make_batch(index, seed=0, lengths_t=None, lengths_i=None, share_final=True) -> FeatureBatch:
    """Per-sample values depend on the pair index only, so a sample is the same in any batch."""
    B = len(index)
    lengths_t = lengths_t or [3 + i % 5 for i in index]
    lengths_i = lengths_i or [4 + i % 3 for i in index]
    Tt, Ti = max(lengths_t), max(lengths_i)

    def tokens(T, lengths, D, scale, tag):
        out = torch.zeros(B, T, D)
        for b, i in enumerate(index):
            g = np.random.default_rng([seed, tag, i])
            out[b, :lengths[b]] = torch.from_numpy(
                (g.standard_normal((lengths[b], D)) * scale * (1 + i % 4) + 0.5).astype(np.float32))
        return out

    def pooled(D, tag):
        return torch.stack([torch.from_numpy(np.random.default_rng([seed, tag, i])
                                             .standard_normal(D).astype(np.float32) * 2)
                            for i in index])

    text_layers = [tokens(Tt, lengths_t, 64, 1.0, 10 + k) for k in range(2)]
    image_layers = [tokens(Ti, lengths_i, 48, 3.0, 20 + k) for k in range(2)]
    return FeatureBatch(
        text_layers=text_layers,
        text_final=text_layers[-1] if share_final else tokens(Tt, lengths_t, 64, 1.0, 12),
        text_pooled=pooled(32, 13), text_mask=torch.arange(Tt)[None] < torch.tensor(lengths_t)[:, None],
        image_layers=image_layers, image_final=tokens(Ti, lengths_i, 40, 0.5, 22),
        image_pooled=pooled(24, 23), image_mask=torch.arange(Ti)[None] < torch.tensor(lengths_i)[:, None],
        targets=torch.tensor([i % 3 for i in index]), index=torch.tensor(index, dtype=torch.int64),
        text_present=torch.ones(B, dtype=torch.bool), image_present=torch.ones(B, dtype=torch.bool))


def arrays(batch: FeatureBatch, modality: str) -> list[torch.Tensor]:
    return [*getattr(batch, f"{modality}_layers"), getattr(batch, f"{modality}_final"),
            getattr(batch, f"{modality}_pooled")]


def real_rows(t: torch.Tensor, mask: torch.Tensor, b: int) -> np.ndarray:
    """Sample b's real values as float64 (tokens × features, or features for pooled)."""
    x = t[b].double().numpy()
    return x if t.dim() == 2 else x[: int(mask[b].sum())]


def test_p_zero_is_exact_identity():
    batch = make_batch(list(range(6)))
    out = gaussian_noise(batch, 0.0, "both", seed=1)
    for a, b in zip(arrays(out, "text") + arrays(out, "image"),
                    arrays(batch, "text") + arrays(batch, "image")):
        assert torch.equal(a, b)


@pytest.mark.parametrize("p", [0.01, 0.2])
def test_noise_std_is_p_sigma_per_sample_and_array(p):
    batch = make_batch(list(range(8)))
    out = gaussian_noise(batch, p, "image", seed=7)
    for before, after in zip(arrays(batch, "image"), arrays(out, "image")):
        for b in range(batch.size):
            x = real_rows(before, batch.image_mask, b)
            y = real_rows(after, batch.image_mask, b)
            sigma = np.std(x)  # float64 reference
            rel = np.std(y - x) / sigma
            # ≥ 96 draws per sample-array; a 4-sigma band of the sample std's spread
            assert abs(rel - p) < 4 * p / np.sqrt(2 * x.size) + 1e-3 * p, (rel, p)
            assert abs(np.mean(y - x)) < 5 * p * sigma / np.sqrt(x.size)
            if before.dim() == 3:  # padding untouched
                n = int(batch.image_mask[b].sum())
                assert torch.equal(after[b, n:], before[b, n:])
    for a, b in zip(arrays(out, "text"), arrays(batch, "text")):
        assert torch.equal(a, b)  # the other modality is untouched


def test_noise_on_final_is_last_layer_is_shared_and_both_modalities_change():
    batch = make_batch(list(range(4)))
    out = gaussian_noise(batch, 0.1, "both", seed=0)
    assert out.text_final is out.text_layers[-1]
    for before, after in zip(arrays(batch, "text") + arrays(batch, "image"),
                             arrays(out, "text") + arrays(out, "image")):
        assert not torch.equal(before, after)
    # different layers of one sample get different (independent) noise
    d0 = (out.image_layers[0] - batch.image_layers[0])[0, :4] / batch.image_layers[0][0, :4].std()
    d1 = (out.image_layers[1] - batch.image_layers[1])[0, :4] / batch.image_layers[1][0, :4].std()
    assert not torch.allclose(d0, d1)


def test_noise_is_seeded_per_sample_not_per_batch():
    """Pair 5 in two batches of different composition, position and padded length."""
    a = make_batch([5, 1, 2], lengths_t=[4, 9, 2])
    b = make_batch([8, 0, 3, 5], lengths_t=[7, 3, 5, 4])
    na, nb = gaussian_noise(a, 0.05, "both", seed=11), gaussian_noise(b, 0.05, "both", seed=11)
    for ta, tb, ma, mb in [(na.text_layers[0], nb.text_layers[0], a.text_mask, b.text_mask),
                           (na.image_final, nb.image_final, a.image_mask, b.image_mask),
                           (na.text_pooled, nb.text_pooled, a.text_mask, b.text_mask)]:
        np.testing.assert_array_equal(real_rows(ta, ma, 0), real_rows(tb, mb, 3))
    other_seed = gaussian_noise(a, 0.05, "both", seed=12)
    assert not torch.equal(other_seed.text_layers[0], na.text_layers[0])


def test_missing_zeroes_only_that_modality():
    batch = make_batch(list(range(5)), share_final=False)
    for which, other in (("text", "image"), ("image", "text")):
        for strategy in ("zero", "translate"):
            out = missing(batch, which, strategy)
            assert not getattr(out, f"{which}_present").any()
            assert getattr(out, f"{other}_present").all()
            assert all(not t.any() for t in arrays(out, which))
            assert all(torch.equal(x, y) for x, y in zip(arrays(out, other), arrays(batch, other)))
            assert torch.equal(getattr(out, f"{which}_mask"), getattr(batch, f"{which}_mask"))
    assert missing(batch, "text", "zero").text_final is not None
    with pytest.raises(ValueError, match=r"valid: \['zero', 'translate'\]"):
        missing(batch, "text", "empty")
    with pytest.raises(ValueError, match="valid"):
        missing(batch, "audio", "zero")


@pytest.mark.parametrize("kind", ["both", "text", "image"])
def test_missing_table_rates(kind):
    t = MissingTable.sample(1001, 0.7, kind, seed=3)
    c = t.counts()
    assert c["none"] == 1001 - int(1001 * 0.7)
    if kind == "both":
        assert c["image"] == int(700 * 0.5) and c["text"] == 700 - int(700 * 0.5)
    else:
        assert c[kind] == 700 and c["image" if kind == "text" else "text"] == 0
    again = MissingTable.sample(1001, 0.7, kind, seed=3)
    np.testing.assert_array_equal(t.kinds, again.kinds)
    assert not np.array_equal(t.kinds, MissingTable.sample(1001, 0.7, kind, seed=4).kinds)


def test_missing_table_apply_per_pair():
    t = MissingTable.sample(20, 0.5, "both", seed=0)
    batch = make_batch([3, 17, 0, 9, 12, 4, 11])
    out = t.apply(batch, "zero")
    for b, i in enumerate(batch.index.tolist()):
        kind = t.kind(i)
        assert bool(out.text_present[b]) == (kind != "text")
        assert bool(out.image_present[b]) == (kind != "image")
        assert bool(out.text_layers[0][b].any()) == (kind != "text")
        assert bool(out.image_pooled[b].any()) == (kind != "image")
    with pytest.raises(IndexError, match="outside the missing table"):
        MissingTable.sample(5, 0.5, "text", 0).apply(batch, "zero")
    assert MissingTable.sample(10, 0.0, "both", 0).counts()["none"] == 10
    with pytest.raises(ValueError, match="valid"):
        MissingTable.sample(10, 0.5, "audio", 0)


def _apply_as_before(table: MissingTable, batch: FeatureBatch, strategy: str) -> FeatureBatch:
    """The table lookup as it was before the device path: pair ids read back, numpy indexing."""
    from molt_cache.perturb import _drop

    kinds = torch.from_numpy(table.kinds[batch.index.cpu().numpy()].astype(np.int64))
    return _drop(_drop(batch, "text", kinds == 1, strategy), "image", kinds == 2, strategy)


def assert_batches_equal(a: FeatureBatch, b: FeatureBatch) -> None:
    for name in ("text_present", "image_present", "text_mask", "image_mask", "index", "targets"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for modality in ("text", "image"):
        for x, y in zip(arrays(a, modality), arrays(b, modality)):
            assert torch.equal(x, y), modality
    assert (a.text_final is a.text_layers[-1]) == (b.text_final is b.text_layers[-1])


@pytest.mark.parametrize("strategy", ["zero", "translate"])
def test_missing_table_on_the_device_gives_the_host_lookups_numbers(strategy):
    """The table is indexed where the batch lives (one copy per device, kept); same batches as the
    numpy lookup it replaces, for every missing type and a batch where nothing is dropped."""
    batch = make_batch([3, 17, 0, 9, 12, 4, 11, 19])
    for kind in ("both", "text", "image"):
        t = MissingTable.sample(20, 0.5, kind, seed=1)
        assert_batches_equal(_apply_as_before(t, batch, strategy), t.apply(batch, strategy))
        assert t.on("cpu") is t.on(torch.device("cpu")) and t.on("cpu").tolist() == t.kinds.tolist()
    none = MissingTable(np.zeros(20, np.uint8))
    assert none.apply(batch, strategy).text_layers[0] is batch.text_layers[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (GPU check)")
def test_missing_table_and_missing_on_cuda_match_the_cpu_and_do_not_sync():
    """On a GPU: per-pair batches lose their modality without any host sync (no `rows.any()`,
    no pair ids read back) and with the CPU's numbers."""
    batch = make_batch([3, 17, 0, 9, 12, 4, 11, 19])
    table = MissingTable.sample(20, 0.5, "both", seed=1)
    gpu = batch.to("cuda")
    table.on("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = table.apply(gpu, "zero")
        gone = missing(gpu, "image", "zero")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_batches_equal(table.apply(batch, "zero"), out.to("cpu"))
    assert_batches_equal(missing(batch, "image", "zero"), gone.to("cpu"))


def test_make_perturb_composes_missing_then_noise():
    assert make_perturb(0.0, "both", None, "zero", 0) is None
    assert make_perturb(0.0, "both", MissingTable.sample(9, 0.0, "both", 0), "zero", 0) is None
    table = MissingTable.sample(10, 1.0, "text", seed=0)
    f = make_perturb(noise=0.1, noise_on="both", missing_table=table, strategy="zero", seed=2)
    batch = make_batch(list(range(6)))
    out = f(batch)
    assert not out.text_present.any() and all(not t.any() for t in arrays(out, "text"))
    expect = gaussian_noise(batch, 0.1, "image", seed=2)
    assert all(torch.equal(a, b) for a, b in zip(arrays(out, "image"), arrays(expect, "image")))
    with pytest.raises(ValueError, match="valid"):
        make_perturb(0.1, "audio", None, "zero", 0)


def test_loader_applies_perturbation_same_noise_in_any_order(tmp_path):
    from _cache_fixture import TinySpec, write_tiny_cache
    from molt_cache.cache.loader import make_loader
    from molt_cache.cache.reader import open_cache

    write_tiny_cache(tmp_path / "c", TinySpec(splits={"train": 30}))
    split = open_cache(tmp_path / "c").split("train")
    f = make_perturb(noise=0.2, noise_on="text", missing_table=None, strategy="zero", seed=1)

    def per_pair(seed, bs):
        out = {}
        for b in make_loader([split], batch_size=bs, shuffle=True, seed=seed, epoch=0,
                             in_memory=False, num_workers=0, perturb=f):
            for k, i in enumerate(b.index.tolist()):
                out[i] = b.text_layers[0][k, : int(b.text_mask[k].sum())].clone()
        return out

    a, b = per_pair(0, 4), per_pair(9, 7)
    assert all(torch.equal(a[i], b[i]) for i in range(30))
    clean = {}
    for batch in make_loader([split], batch_size=30, shuffle=False, seed=0, epoch=0,
                             in_memory=True, num_workers=0):
        for k in range(30):
            clean[k] = batch.text_layers[0][k, : int(batch.text_mask[k].sum())]
    assert not any(torch.equal(a[i], clean[i]) for i in range(30))


def test_robustness_plot_starts_at_zero_and_names_split_pairs_and_seed():
    import matplotlib.pyplot as plt

    from molt_cache.robustness.report import noise_figure

    rows = [{"model": m, "condition": c, "level": lvl, "missing": miss, "noise": p, "noise_on": "both",
             "split": "test", "pairs": 96, "seed": 3, "accuracy": acc}
            for m, base in (("molt", 0.9), ("baseline", 0.85))
            for c, lvl, miss, p, acc in (("clean", "clean", None, 0.0, base),
                                         ("noise 10% on both (feature)", "feature", None, 0.1, base - 0.02),
                                         ("text absent (feature, zero)", "feature", "text", 0.0, base - 0.3))]
    fig = noise_figure(rows, "accuracy")
    try:
        assert all(ax.get_ylim()[0] == 0 for ax in fig.axes)
        assert fig._suptitle.get_text() == "accuracy: 96 test pairs, seed 3"
    finally:
        plt.close(fig)
