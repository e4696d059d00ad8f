"""Text projections on real tokens only (`real_token_rows`, `packed_linear`): logits, CCA loss,
common states and every parameter gradient equal the padded path's, for every heads model,
ablation, layout and missing strategy; padding values never matter."""
import numpy as np
import pytest
import torch
from torch import nn

from _heads_step import assert_same_step, step
from molt_cache.batch import FeatureBatch
from molt_cache.config import HeadsConfig
from molt_cache.heads import FeatureDims, build_heads
from molt_cache.heads import molt as molt_layer
from molt_cache.perturb import missing

torch.set_num_threads(1)

DIMS = FeatureDims(text_layer_widths=[5, 6, 7], image_layer_widths=[4, 4, 8],
                   text_final_width=9, image_final_width=10)


def batch_with_garbage_padding(b=8, u=4, tt=7, ti=5, seed=0, dedup=True,
                               dtype=torch.float64) -> FeatureBatch:
    """Texts of 1..tt real tokens whose padding holds large random values (not zeros), so a
    result that read padding would differ."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, tt + 1, (b,), generator=g)
    lengths[0] = tt  # the batch's longest
    text_mask = torch.arange(tt)[None] < lengths[:, None]
    image_mask = torch.arange(ti)[None] < torch.randint(2, ti + 1, (u,), generator=g)[:, None]

    def tok(n, t, d, mask):
        real = torch.randn(n, t, d, generator=g, dtype=torch.float64)
        garbage = 50 * torch.randn(n, t, d, generator=g, dtype=torch.float64)
        return torch.where(mask[..., None], real, garbage).to(dtype)

    batch = FeatureBatch(
        text_layers=[tok(b, tt, d, text_mask) for d in DIMS.text_layer_widths],
        text_final=tok(b, tt, DIMS.text_final_width, text_mask),
        text_pooled=torch.randn(b, 4, generator=g, dtype=torch.float64).to(dtype), text_mask=text_mask,
        image_layers=[tok(u, ti, d, image_mask) for d in DIMS.image_layer_widths],
        image_final=tok(u, ti, DIMS.image_final_width, image_mask),
        image_pooled=torch.randn(u, 4, generator=g, dtype=torch.float64).to(dtype), image_mask=image_mask,
        targets=torch.randint(0, 3, (b,), generator=g), index=torch.arange(b),
        text_present=torch.ones(b, dtype=torch.bool), image_present=torch.ones(b, dtype=torch.bool),
        image_rows=torch.arange(b) % u)
    return batch if dedup else batch.per_pair()


def heads_for(model="molt", ablate=(), seed=0):
    torch.manual_seed(seed)
    cfg = HeadsConfig(model=model, d_common=8, layers=3, num_classes=3, fbp_stride=2, dropout=0.0,
                      ablate=",".join(ablate))
    return build_heads(cfg, DIMS).double()


def run(heads, batch, strategy, monkeypatch, pack: bool):
    # PACK_BELOW 1.0: always pack (any padding); -1: never
    monkeypatch.setattr(molt_layer, "PACK_BELOW", 1.0 if pack else -1.0)
    return step(heads, batch, strategy)


def assert_packing_changes_nothing(heads, batch, monkeypatch, strategy="zero", tol=1e-10):
    packed, g_packed = run(heads, batch, strategy, monkeypatch, pack=True)
    padded, g_padded = run(heads, batch, strategy, monkeypatch, pack=False)
    assert_same_step(packed, g_packed, padded, g_padded, tol=tol, grad_atol=lambda scale: tol * max(1.0, scale))


def test_real_token_rows_are_the_flat_real_positions():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    rows = molt_layer.real_token_rows(mask)
    np.testing.assert_array_equal(rows.numpy(), np.flatnonzero(mask.numpy()))
    assert rows.dtype == torch.int64


def test_real_token_rows_declines_when_packing_does_not_pay_or_would_sync():
    full = torch.ones(4, 5, dtype=torch.bool)
    full[0, -1] = False  # 95 % real
    assert molt_layer.real_token_rows(full) is None
    assert molt_layer.real_token_rows(torch.zeros(0, 3, dtype=torch.bool)) is None
    # off the CPU the index would be read back to the host: never packed there
    assert molt_layer.real_token_rows(torch.zeros(4, 5, dtype=torch.bool, device="meta")) is None


def test_packed_linear_equals_linear_on_real_rows_and_is_zero_on_padding():
    torch.manual_seed(0)
    lin = nn.Linear(6, 3).double()
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    rows = molt_layer.real_token_rows(mask)
    y = molt_layer.packed_linear(lin, x, rows)
    ref = x.numpy() @ lin.weight.detach().numpy().T + lin.bias.detach().numpy()  # float64 numpy
    np.testing.assert_allclose(y.detach().numpy()[mask.numpy()], ref[mask.numpy()], rtol=1e-12)
    assert (y[~mask] == 0).all()
    # gradients through the real rows equal those of the plain product
    w = torch.randn(3, 4, 3, dtype=torch.float64) * mask[..., None]
    (y * w).sum().backward()
    g_packed = [p.grad.clone() for p in lin.parameters()]
    lin.zero_grad()
    (lin(x) * w).sum().backward()
    for a, b in zip(g_packed, lin.parameters()):
        torch.testing.assert_close(a, b.grad, rtol=1e-12, atol=1e-12)
    assert molt_layer.packed_linear(lin, x, None).equal(lin(x))


@pytest.mark.parametrize("dedup", [True, False], ids=["image-once", "per-pair"])
# 'M' is left out in float64: without M's float64 weights, the pooled states (float32 by design)
# reach the float64 classifier (tests/test_image_once.py checks it in float32).
@pytest.mark.parametrize("ablate", [(), ("cross-attn",), ("fusion",), ("fbp",), ("cca",)],
                         ids=lambda a: ",".join(a) or "full")
def test_molt_heads_packed_equal_padded(ablate, dedup, monkeypatch):
    heads = heads_for("molt", ablate)
    assert_packing_changes_nothing(heads, batch_with_garbage_padding(dedup=dedup), monkeypatch)


@pytest.mark.parametrize("model", ["baseline", "text-only", "image-only"])
def test_other_heads_packed_equal_padded(model, monkeypatch):
    heads = heads_for(model)
    # heads without image-once compute are handed per-pair batches (train.for_heads)
    batch = batch_with_garbage_padding(dedup=getattr(heads, "image_once", False))
    assert_packing_changes_nothing(heads, batch, monkeypatch)


def test_molt_without_m_packed_equal_padded_float32(monkeypatch):
    heads = heads_for("molt", ("M",)).float()
    batch = batch_with_garbage_padding(dtype=torch.float32)
    assert_packing_changes_nothing(heads, batch, monkeypatch, tol=1e-5)


@pytest.mark.parametrize("which", ["text", "image"])
@pytest.mark.parametrize("strategy", ["zero", "translate"])
@pytest.mark.parametrize("model", ["molt", "baseline"])
def test_missing_modality_packed_equal_padded(model, strategy, which, monkeypatch):
    batch = missing(batch_with_garbage_padding(seed=1), which, strategy)
    # half the pairs lose it: the strategies substitute per pair
    assert_packing_changes_nothing(heads_for(model, seed=1), batch, monkeypatch, strategy=strategy)


def test_packing_is_used_by_default_on_padded_cpu_batches(monkeypatch):
    calls = []
    real = molt_layer.packed_linear

    def spy(linear, x, rows):
        calls.append(rows is not None)
        return real(linear, x, rows)

    monkeypatch.setattr(molt_layer, "packed_linear", spy)
    import molt_cache.heads.fusion as fusion
    import molt_cache.heads.model as model
    monkeypatch.setattr(fusion, "packed_linear", spy)
    monkeypatch.setattr(model, "packed_linear", spy)
    batch = batch_with_garbage_padding()
    assert batch.text_mask.float().mean() <= molt_layer.PACK_BELOW  # the fixture is padded enough
    heads_for("molt")(batch)
    # 3 layers' W_t and the fusion's text key and value, each on the real rows only
    assert calls == [True] * 5
