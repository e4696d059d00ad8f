"""Image-side work once per distinct image (FeatureBatch.image_rows): logits, CCA loss, common
states and every parameter gradient equal the per-pair path's, for every model / ablation and
the 'translate' strategy."""
import dataclasses

import pytest
import torch

from molt_cache.batch import FeatureBatch, MostPairs
from molt_cache.config import HeadsConfig
from molt_cache.heads import ABLATIONS, FeatureDims, build_heads
from molt_cache.heads.molt import pair_slots
from _heads_step import assert_same_step, step

torch.set_num_threads(1)

DIMS = FeatureDims(text_layer_widths=[5, 6, 7], image_layer_widths=[4, 4, 8],
                   text_final_width=9, image_final_width=10)


# image_rows of pairs over 3 images, one per layout the heads choose (PairSlots):
LAYOUTS = {
    "slots": [0, 2, 1, 0, 2, 1, 0, 2, 1],  # 3 pairs each: grouped, no unused slot
    "slots-padded": [1, 0, 1, 2, 0, 1, 2, 0, 1, 2],  # 3, 4, 3 pairs: 12 slots ≤ 1.25 × 10, 2 unused
    "gather": [0, 0, 0, 0, 0, 1, 2, 1, 0],  # 6, 2, 1 pairs: 18 slots > 1.25 × 9, per-pair gathers
}


def dedup_batch(b=9, u=3, tt=5, ti=6, seed=0, dtype=torch.float64, rows=None,
                empty_text=(), empty_image=()) -> FeatureBatch:
    """b pairs over u distinct images (pair b has image b % u, unsorted on purpose, or `rows`);
    pairs `empty_text` and images `empty_image` get an all-False mask (an absent modality)."""
    b = b if rows is None else len(rows)
    g = torch.Generator().manual_seed(seed)
    text_mask = torch.arange(tt)[None] < torch.randint(1, tt + 1, (b,), generator=g)[:, None]
    image_mask = torch.arange(ti)[None] < torch.randint(1, ti + 1, (u,), generator=g)[:, None]
    text_mask[list(empty_text)] = False
    image_mask[list(empty_image)] = False

    def tok(n, t, d, mask):
        return (torch.randn(n, t, d, generator=g) * mask[..., None]).to(dtype)

    return FeatureBatch(
        text_layers=[tok(b, tt, d, text_mask) for d in DIMS.text_layer_widths],
        text_final=tok(b, tt, DIMS.text_final_width, text_mask),
        text_pooled=torch.randn(b, 4, generator=g).to(dtype), text_mask=text_mask,
        image_layers=[tok(u, ti, d, image_mask) for d in DIMS.image_layer_widths],
        image_final=tok(u, ti, DIMS.image_final_width, image_mask),
        image_pooled=torch.randn(u, 4, generator=g).to(dtype), image_mask=image_mask,
        targets=torch.randint(0, 3, (b,), generator=g), index=torch.arange(b),
        text_present=torch.ones(b, dtype=torch.bool), image_present=torch.ones(b, dtype=torch.bool),
        image_rows=(torch.arange(b) * 2) % u if rows is None else torch.tensor(rows))


def assert_same(heads, batch, strategy="zero", tol=1e-10, grad_rtol=None):
    once, g_once = step(heads, batch, strategy)
    pairs, g_pairs = step(heads, batch.per_pair(), strategy)
    # gradients relative to their own size
    assert_same_step(once, g_once, pairs, g_pairs, tol=tol, grad_atol=lambda scale: max(tol, (grad_rtol or tol) * scale))


def heads_for(**kw):
    torch.manual_seed(0)
    cfg = HeadsConfig(**{**dict(d_common=8, layers=2, fbp_stride=2, num_classes=3, cca_ridge=1.0,
                                cca_top_k=0), **kw})
    return build_heads(cfg, DIMS).double()


# 'M' is checked in float32 below: without M's float64 weights, FBP's float32 output feeds the
# fusion query as float32, which float64 heads cannot take.
@pytest.mark.parametrize("ablate", [[], *[[a] for a in ABLATIONS if a != "M"]])
def test_image_once_equals_per_pair_molt(ablate):
    """float64 reference: the two paths differ only in summation order (gather vs scatter-add)."""
    heads = heads_for(ablate=ablate)
    assert heads.image_once
    # Without cross-attention h_i,l depends on the image alone: 3 distinct images give a rank-3
    # image covariance in d_c = 8, and the CCA's eigen-gradients amplify float64 rounding of the
    # image-side gradients to ~1e-7 relative (logits and loss stay equal to the last bit).
    assert_same(heads, dedup_batch(), grad_rtol=1e-6 if "cross-attn" in ablate else None)


def test_image_once_equals_per_pair_baseline():
    assert_same(heads_for(model="baseline"), dedup_batch(seed=1))


@pytest.mark.parametrize("absent", ["text", "image"])
def test_image_once_translate_equals_per_pair(absent):
    batch = dedup_batch(seed=2)
    present = torch.tensor([True, False, True, True, False, True, True, True, False])
    batch = dataclasses.replace(batch, **{f"{absent}_present": present})
    assert_same(heads_for(), batch, strategy="translate")


@pytest.mark.parametrize("ablate", [[], ["M"]])
def test_image_once_float32_within_float_tolerance(ablate):
    """In float32 (training's dtype) the paths agree to rounding."""
    heads = heads_for(ablate=ablate).float()
    batch = dedup_batch(seed=3, dtype=torch.float32)
    assert_same(heads, batch, tol=1e-5)


def test_per_pair_expands_and_keeps_shared_final():
    batch = dedup_batch()
    batch = dataclasses.replace(batch, image_final=batch.image_layers[-1])
    full = batch.per_pair()
    assert full.image_rows is None and full.image_final is full.image_layers[-1]
    for k, r in enumerate(batch.image_rows.tolist()):
        assert torch.equal(full.image_layers[0][k], batch.image_layers[0][r])
        assert torch.equal(full.image_mask[k], batch.image_mask[r])
        assert torch.equal(full.image_pooled[k], batch.image_pooled[r])
    assert full.per_pair() is full


def test_layouts_are_the_ones_named():
    """The cases below exercise both image-once paths: grouped slots and per-pair gathers."""
    for name, rows in LAYOUTS.items():
        slots = pair_slots(torch.tensor(rows), 3, dedup_batch(rows=rows).most_pairs_per_image())
        assert (slots is None) == (name == "gather"), name
        if slots is not None:  # every pair its own slot, within its image's K slots
            assert len(set(slots.slot.tolist())) == len(rows)
            assert all(s // slots.per_image == r for s, r in zip(slots.slot.tolist(), rows))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("ablate", [[], ["cross-attn"], ["fusion"]])
def test_each_layout_equals_per_pair_with_absent_modalities(layout, ablate):
    """float64: grouped and gathered image-once paths equal the per-pair path, with a pair whose
    text is empty and an image whose mask is empty (keyless attention rows in both directions)."""
    batch = dedup_batch(seed=4, rows=LAYOUTS[layout], empty_text=(3,), empty_image=(2,))
    assert_same(heads_for(ablate=ablate), batch, grad_rtol=1e-6 if "cross-attn" in ablate else None)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_layout_baseline_and_translate(layout):
    batch = dedup_batch(seed=5, rows=LAYOUTS[layout], empty_text=(1,))
    assert_same(heads_for(model="baseline"), batch)
    present = torch.ones(batch.size, dtype=torch.bool)
    present[[0, 6]] = False
    for model in ("molt", "baseline"):
        assert_same(heads_for(model=model), dataclasses.replace(batch, text_present=present),
                    strategy="translate")


def test_host_count_of_pairs_per_image_is_used_only_for_its_rows():
    """The store's host-side count (MostPairs) saves a device read; a batch whose image_rows were
    rebuilt (a perturbation) counts again instead of trusting a stale number."""
    batch = dedup_batch(rows=LAYOUTS["slots-padded"])
    assert batch.most_pairs_per_image() == 4
    counted = dataclasses.replace(batch, most_pairs=MostPairs(batch.image_rows, 4))
    assert counted.most_pairs_per_image() == 4
    moved = counted.to("cpu", non_blocking=False)
    assert moved.most_pairs.rows is moved.image_rows
    stale = dataclasses.replace(counted, image_rows=torch.tensor(LAYOUTS["gather"]))
    assert stale.most_pairs_per_image() == 6
    assert counted.per_pair().most_pairs is None and counted.per_pair().most_pairs_per_image() == 1


def test_grouped_slots_run_under_bf16_autocast():
    """Under bf16 autocast (the CUDA default) the grouped layout's mixed dtypes fit together
    (float32 scores, bf16 products) and stay near the per-pair path."""
    heads = heads_for().float()
    batch = dedup_batch(seed=6, dtype=torch.float32, rows=LAYOUTS["slots-padded"], empty_text=(2,))
    assert pair_slots(batch.image_rows, 3, batch.most_pairs_per_image()) is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        once, pairs = heads(batch), heads(batch.per_pair())
    assert torch.isfinite(once.logits).all()
    torch.testing.assert_close(once.logits.float(), pairs.logits.float(), rtol=0.05, atol=0.05)
