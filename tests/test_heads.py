"""MoLT / baseline heads: padding invariance, FBP, ablations by parameter count, the 'translate'
strategy, autocast, and a tiny overfit."""
import dataclasses

import pytest
import torch

from molt_cache.batch import FeatureBatch
from molt_cache.config import HeadsConfig
from molt_cache.heads import ABLATIONS, FeatureDims, build_heads
from molt_cache.heads.fbp import factorized_bilinear_pool
from molt_cache.losses.task import task_loss

torch.set_num_threads(1)

DIMS = FeatureDims(text_layer_widths=[5, 6, 7], image_layer_widths=[4, 4, 8],
                   text_final_width=9, image_final_width=10)
D_C, STRIDE, LAYERS, CLASSES = 8, 2, 2, 3


def cfg(**kw) -> HeadsConfig:
    base = dict(d_common=D_C, layers=LAYERS, fbp_stride=STRIDE, num_classes=CLASSES,
                cca_ridge=1.0, cca_top_k=0)
    base.update(kw)
    return HeadsConfig(**base)


def make_batch(b=6, tt=5, ti=4, seed=0, dims=DIMS) -> FeatureBatch:
    g = torch.Generator().manual_seed(seed)
    text_len = torch.randint(1, tt + 1, (b,), generator=g)
    image_len = torch.randint(1, ti + 1, (b,), generator=g)
    text_mask = torch.arange(tt)[None] < text_len[:, None]
    image_mask = torch.arange(ti)[None] < image_len[:, None]

    def tok(t, d, mask):  # padding positions hold zeros, as the reader pads
        return torch.randn(b, t, d, generator=g) * mask[..., None]

    return FeatureBatch(
        text_layers=[tok(tt, d, text_mask) for d in dims.text_layer_widths],
        text_final=tok(tt, dims.text_final_width, text_mask),
        text_pooled=torch.randn(b, 4, generator=g), text_mask=text_mask,
        image_layers=[tok(ti, d, image_mask) for d in dims.image_layer_widths],
        image_final=tok(ti, dims.image_final_width, image_mask),
        image_pooled=torch.randn(b, 4, generator=g), image_mask=image_mask,
        targets=torch.randint(0, CLASSES, (b,), generator=g), index=torch.arange(b),
        text_present=torch.ones(b, dtype=torch.bool), image_present=torch.ones(b, dtype=torch.bool))


def pad_more(batch: FeatureBatch, extra: int, seed=1) -> FeatureBatch:
    """Extend both token axes by `extra` masked positions filled with random values, and
    overwrite the existing padding with random values too."""
    g = torch.Generator().manual_seed(seed)

    def grow(x, mask):
        x = torch.cat([x, torch.zeros(x.shape[0], extra, x.shape[2])], 1)
        noise = torch.randn(x.shape, generator=g) * 100
        return torch.where(mask[..., None], x, noise)

    tm = torch.cat([batch.text_mask, torch.zeros(batch.size, extra, dtype=torch.bool)], 1)
    im = torch.cat([batch.image_mask, torch.zeros(batch.size, extra, dtype=torch.bool)], 1)
    return dataclasses.replace(
        batch, text_mask=tm, image_mask=im,
        text_layers=[grow(t, tm) for t in batch.text_layers], text_final=grow(batch.text_final, tm),
        image_layers=[grow(t, im) for t in batch.image_layers], image_final=grow(batch.image_final, im))


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def lin(a, b):
    return a * b + b


def expected_params(ablate=(), model="molt") -> int:
    """Independent count from the dims (docs/heads.md lists every parameter)."""
    ln = 2 * D_C
    fusion = lambda q: lin(q, D_C) + 2 * lin(DIMS.image_final_width, D_C) + 2 * lin(DIMS.text_final_width, D_C) + ln
    if model == "baseline":
        return D_C + fusion(D_C) + lin(D_C, CLASSES)
    total = 0
    for wt, wi in zip(DIMS.text_layer_widths[-LAYERS:], DIMS.image_layer_widths[-LAYERS:]):
        total += lin(wi, D_C) + lin(wt, D_C) + 2 * ln
        if "cross-attn" not in ablate:
            total += 6 * lin(D_C, D_C)
    if "M" not in ablate:
        total += LAYERS
    robust = 2 * D_C if "fbp" in ablate else D_C // STRIDE
    if "fusion" in ablate:
        total += lin(robust, CLASSES)
    else:
        total += fusion(robust) + lin(D_C, CLASSES)
    return total


@pytest.mark.parametrize("model", ["molt", "baseline"])
def test_padding_changes_nothing(model):
    torch.manual_seed(0)
    heads = build_heads(cfg(model=model), DIMS).eval()
    batch = make_batch()
    a, b = heads(batch), heads(pad_more(batch, extra=3))
    torch.testing.assert_close(a.logits, b.logits)
    if model == "molt":
        torch.testing.assert_close(a.cca_loss, b.cca_loss)
        torch.testing.assert_close(a.robust, b.robust)


def test_output_shapes_and_common_states():
    torch.manual_seed(0)
    out = build_heads(cfg(), DIMS)(make_batch())
    assert out.logits.shape == (6, CLASSES)
    assert out.cca_loss.dtype == torch.float32 and out.cca_loss.dim() == 0
    assert len(out.common) == LAYERS
    for s in out.common:
        for t in (s.image, s.text, s.image_proj, s.text_proj):
            assert t.shape == (6, D_C)
    assert out.robust.shape == (6, D_C // STRIDE)


def test_fbp_shape_norm_and_signed_sqrt():
    g = torch.Generator().manual_seed(0)
    hi, ht = torch.randn(5, 12, generator=g), torch.randn(5, 12, generator=g)
    out = factorized_bilinear_pool(hi, ht, stride=4)
    assert out.shape == (5, 3)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))
    pooled = (hi * ht).view(5, 3, 4).sum(-1)
    torch.testing.assert_close(out, pooled / pooled.norm(dim=-1, keepdim=True))
    sq = factorized_bilinear_pool(hi, ht, stride=4, signed_sqrt=True)
    ssq = pooled.sign() * pooled.abs().sqrt()
    torch.testing.assert_close(sq, ssq / ssq.norm(dim=-1, keepdim=True), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sq.norm(dim=-1), torch.ones(5))
    with pytest.raises(ValueError, match="divide"):
        factorized_bilinear_pool(hi, ht, stride=5)


def test_layer_weights_m_scale_robust():
    torch.manual_seed(0)
    heads = build_heads(cfg(), DIMS)
    batch = make_batch()
    before = heads(batch).robust
    with torch.no_grad():
        heads.layer_weights.mul_(3.0)
    torch.testing.assert_close(heads(batch).robust, 3.0 * before)


def test_full_model_parameter_count():
    assert n_params(build_heads(cfg(), DIMS)) == expected_params()


@pytest.mark.parametrize("name", ABLATIONS)
def test_each_ablation_removes_exactly_its_part(name):
    torch.manual_seed(0)
    heads = build_heads(cfg(ablate=[name]), DIMS)
    assert n_params(heads) == expected_params(ablate=(name,))
    out = heads(make_batch())
    assert out.logits.shape == (6, CLASSES)
    assert (out.cca_loss is None) == (name == "cca")
    if name == "fbp":
        assert out.robust.shape == (6, 2 * D_C)


def test_combined_ablations_and_validation():
    both = ("fbp", "fusion")
    assert n_params(build_heads(cfg(ablate=list(both)), DIMS)) == expected_params(ablate=both)
    with pytest.raises(ValueError, match="valid"):
        build_heads(cfg(ablate=["cross_attention"]), DIMS)
    with pytest.raises(ValueError, match="baseline"):
        build_heads(cfg(model="baseline", ablate=["cca"]), DIMS)
    with pytest.raises(ValueError, match="valid"):
        build_heads(cfg(model="mlp"), DIMS)
    with pytest.raises(ValueError, match="layers"):
        build_heads(cfg(layers=4), DIMS)
    with pytest.raises(ValueError, match="missing_strategy"):
        build_heads(cfg(), DIMS)(make_batch(), missing_strategy="drop")


def test_baseline_has_no_molt_parameters():
    heads = build_heads(cfg(model="baseline"), DIMS)
    assert n_params(heads) == expected_params(model="baseline")
    names = {n.split(".")[0] for n, _ in heads.named_parameters()}
    assert names == {"query", "fusion", "classifier"}
    out = heads(make_batch())
    assert out.cca_loss is None and out.common == [] and out.robust is None


def scramble(batch: FeatureBatch, modality: str, seed=5) -> FeatureBatch:
    """Replace one modality's features (all of them, real tokens too) with random values."""
    g = torch.Generator().manual_seed(seed)
    r = lambda x: torch.randn(x.shape, generator=g) * 10
    if modality == "text":
        return dataclasses.replace(batch, text_layers=[r(t) for t in batch.text_layers],
                                   text_final=r(batch.text_final))
    return dataclasses.replace(batch, image_layers=[r(t) for t in batch.image_layers],
                               image_final=r(batch.image_final))


@pytest.mark.parametrize("model", ["molt", "baseline"])
@pytest.mark.parametrize("absent", ["text", "image"])
def test_translate_absent_modality_does_not_reach_outputs(model, absent):
    torch.manual_seed(0)
    heads = build_heads(cfg(model=model), DIMS).eval()
    batch = make_batch()
    flags = torch.tensor([True, False, True, False, False, True])  # mixed batch
    batch = dataclasses.replace(batch, **{f"{absent}_present": flags})
    a = heads(batch, missing_strategy="translate")
    b = heads(scramble(batch, absent), missing_strategy="translate")
    gone = ~flags
    torch.testing.assert_close(a.logits[gone], b.logits[gone])
    assert not torch.allclose(a.logits[flags], b.logits[flags])  # present rows do read it
    if model == "molt":
        for sa, sb in zip(a.common, b.common):
            torch.testing.assert_close(sa.text[gone], sb.text[gone])
            torch.testing.assert_close(sa.image[gone], sb.image[gone])
            torch.testing.assert_close(sa.text[gone], sa.image[gone])  # the stand-in
    # the 'zero' strategy does read the features (so the test above can fail)
    z1, z2 = heads(batch).logits, heads(scramble(batch, absent)).logits
    assert not torch.allclose(z1[gone], z2[gone])


def test_translate_refuses_sample_with_neither_modality():
    batch = make_batch()
    none = torch.zeros(batch.size, dtype=torch.bool)
    batch = dataclasses.replace(batch, text_present=none, image_present=none)
    with pytest.raises(ValueError, match="neither"):
        build_heads(cfg(), DIMS)(batch, missing_strategy="translate")


def test_runs_under_bf16_autocast_with_float32_cca():
    torch.manual_seed(0)
    heads = build_heads(cfg(), DIMS)
    batch = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = heads(batch)
        loss = 0.1 * out.cca_loss + 0.9 * task_loss(out.logits, batch.targets, multi_label=False)
    assert out.cca_loss.dtype == torch.float32
    loss.backward()
    grads = [p.grad for p in heads.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    ref = heads(batch)
    torch.testing.assert_close(out.logits.float(), ref.logits, atol=0.1, rtol=0.1)


def test_tiny_overfit_reduces_loss():
    torch.manual_seed(0)
    batch = make_batch(b=16, seed=3)
    # separable: class shifts the final states of both modalities
    shift = torch.nn.functional.one_hot(batch.targets, 10).float()[:, None, :] * 3
    batch = dataclasses.replace(batch, image_final=batch.image_final + shift * batch.image_mask[..., None])
    heads = build_heads(cfg(), DIMS)
    opt = torch.optim.Adam(heads.parameters(), lr=1e-2)

    def loss_fn():
        out = heads(batch)
        return 0.1 * out.cca_loss + 0.9 * task_loss(out.logits, batch.targets, multi_label=False), out

    first_task = task_loss(heads(batch).logits, batch.targets, multi_label=False).item()
    for _ in range(40):
        loss, _ = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    out = heads(batch)
    last_task = task_loss(out.logits, batch.targets, multi_label=False).item()
    assert last_task < 0.5 * first_task
    assert (out.logits.argmax(-1) == batch.targets).float().mean() > 0.9


def test_multi_label_and_single_sample_eval():
    heads = build_heads(cfg(multi_label=True), DIMS)
    batch = make_batch()
    y = (torch.rand(batch.size, CLASSES) > 0.5).float()
    out = heads(batch)
    assert torch.isfinite(task_loss(out.logits, y, multi_label=True))
    one = make_batch(b=1)
    assert heads.eval()(one).cca_loss is None  # undefined for one sample; logits still come
    with pytest.raises(ValueError, match="at least 2"):
        heads.train()(one)


# --- unimodal reference heads (text-only / image-only) -------------------------------------
@pytest.mark.parametrize("modality", ["text", "image"])
def test_unimodal_heads_read_only_their_modality(modality):
    torch.manual_seed(0)
    heads = build_heads(cfg(model=f"{modality}-only"), DIMS).eval()
    width = DIMS.text_final_width if modality == "text" else DIMS.image_final_width
    assert n_params(heads) == D_C + lin(D_C, D_C) + 2 * lin(width, D_C) + 2 * D_C + lin(D_C, CLASSES)
    batch = make_batch()
    other = "image" if modality == "text" else "text"
    a = heads(batch).logits
    torch.testing.assert_close(a, heads(scramble(batch, other)).logits)  # the other is never read
    assert not torch.allclose(a, heads(scramble(batch, modality)).logits)
    torch.testing.assert_close(a, heads(pad_more(batch, extra=3)).logits)  # padding changes nothing
    out = heads(batch)
    assert out.cca_loss is None and out.common == [] and out.robust is None
    with pytest.raises(ValueError, match="apply to model 'molt' only"):
        build_heads(cfg(model=f"{modality}-only", ablate=["cca"]), DIMS)


@pytest.mark.parametrize("modality", ["text", "image"])
def test_unimodal_heads_match_float64_reference(modality):
    """½·LayerNorm(softmax(q Kᵀ/√d) V) · W_cls in numpy float64, over real tokens only."""
    import numpy as np

    torch.manual_seed(1)
    heads = build_heads(cfg(model=f"{modality}-only"), DIMS).eval()
    batch = make_batch(seed=3)
    final = (batch.text_final if modality == "text" else batch.image_final).double().numpy()
    mask = (batch.text_mask if modality == "text" else batch.image_mask).numpy()
    P = {n: p.detach().double().numpy() for n, p in heads.named_parameters()}
    q = P["query"] @ P["query_proj.weight"].T + P["query_proj.bias"]
    expect = []
    for b in range(batch.size):
        x = final[b][mask[b]]
        k = x @ P["key.weight"].T + P["key.bias"]
        v = x @ P["value.weight"].T + P["value.bias"]
        s = k @ q / np.sqrt(D_C)
        w = np.exp(s - s.max())
        e = (w / w.sum()) @ v
        ln = (e - e.mean()) / np.sqrt(e.var() + 1e-5) * P["norm.weight"] + P["norm.bias"]
        expect.append(0.5 * ln @ P["classifier.linear.weight"].T + P["classifier.linear.bias"])
    np.testing.assert_allclose(heads(batch).logits.detach().double().numpy(), np.stack(expect), rtol=1e-4, atol=1e-5)


def test_unimodal_heads_equal_baseline_fusion_translating_from_that_modality():
    """The docstring's claim: text-only heads are the baseline's fusion when every image is absent
    and 'translate' stands the text in for it (same query, projections and norm), up to LayerNorm's
    ε (the fusion normalizes 2·E_r,t, whose variance is 4× larger against the same ε = 1e-5)."""
    torch.manual_seed(2)
    uni = build_heads(cfg(model="text-only"), DIMS).eval()
    base = build_heads(cfg(model="baseline"), DIMS).eval()
    with torch.no_grad():
        base.query.copy_(uni.query)
        base.fusion.query_proj.load_state_dict(uni.query_proj.state_dict())
        base.fusion.text_key.load_state_dict(uni.key.state_dict())
        base.fusion.text_value.load_state_dict(uni.value.state_dict())
        base.fusion.norm.load_state_dict(uni.norm.state_dict())
        base.classifier.load_state_dict(uni.classifier.state_dict())
    batch = make_batch()
    batch = dataclasses.replace(batch, image_present=torch.zeros(batch.size, dtype=torch.bool))
    torch.testing.assert_close(uni(batch).logits, base(batch, missing_strategy="translate").logits,
                               rtol=1e-3, atol=2e-4)
