"""Text length limits (positions, tokenizer, --max-length), reported truncation, and special-token
strings in dataset texts tokenizing as text, for every tokenizer kind."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr

from data.make_fixtures import make_manifest
from molt_cache.encoders import create_image_encoder, create_text_encoder
from molt_cache.encoders.text_hf import HFTextEncoder
from molt_cache.encoders.text_limits import position_limit, resolve_max_length
from molt_cache.encoders.tiny import build_tiny_llama, build_tiny_tokenizer
from molt_cache.extract import ExtractConfig, extract, extract_config_from_manifest

torch.set_num_threads(1)
CPU = torch.device("cpu")
GPT2_EOT = "<|endoftext|>"


def gpt2_style_tokenizer():
    """GPT-2's byte-level BPE shape, built in code: 256 byte tokens + <|endoftext|> (BOS = EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[GPT2_EOT] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=GPT2_EOT, eos_token=GPT2_EOT, unk_token=GPT2_EOT)


def gpt2_encoder(n_positions: int = 32, **kw) -> HFTextEncoder:
    from transformers import GPT2Config, GPT2Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2Model(GPT2Config(vocab_size=257, n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=256, eos_token_id=256))
    return HFTextEncoder(model, gpt2_style_tokenizer(), kind="hf", name="tiny-gpt2", weights_sha256="random:0",
                         device=CPU, dtype=torch.float32, layers=2, **kw)


# ------------------------------------------------------------------ the limit
def test_limit_is_the_smallest_of_positions_tokenizer_and_request():
    cfg = SimpleNamespace(max_position_embeddings=1024)
    assert resolve_max_length(cfg, SimpleNamespace(model_max_length=int(1e30)), None, name="m") == (
        1024, {"positions": 1024, "tokenizer": None, "requested": None})  # 1e30: transformers' "unset"
    assert resolve_max_length(cfg, SimpleNamespace(model_max_length=512), None, name="m")[0] == 512
    assert resolve_max_length(cfg, SimpleNamespace(model_max_length=512), 4096, name="m")[0] == 512
    assert resolve_max_length(cfg, SimpleNamespace(model_max_length=512), 100, name="m")[0] == 100
    assert position_limit(SimpleNamespace(n_positions=32)) == 32  # GPT-2's name
    assert position_limit(SimpleNamespace(max_position_embeddings=514, model_type="roberta", pad_token_id=1)) == 512
    with pytest.raises(ValueError, match="pass --max-length"):
        resolve_max_length(SimpleNamespace(), SimpleNamespace(model_max_length=int(1e30)), None, name="alibi")
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        resolve_max_length(cfg, SimpleNamespace(), 0, name="m")


def test_gpt2_32_positions_truncates_instead_of_index_error():
    enc = gpt2_encoder()
    assert enc.max_length == 32
    assert create_text_encoder("tiny:llama", max_length=4096).max_length == 1024  # positions win
    text = "x" * 101
    tok = enc.tokenize_report([text, "short"])
    assert tok.full_lengths == [102, 6] and tok.truncated == [0]  # BOS + 101 bytes
    assert len(tok.ids[0]) == 32 and tok.ids[0][0] == 256 and set(tok.ids[0][1:]) == {tok.ids[1][1] + 5}  # 'x' = 's' + 5
    out = enc.encode(tok.ids)  # runs: no position past 31
    assert out.mask.sum().item() == 32 + 6


# ------------------------------------------------------------------ special tokens stay text
def test_special_token_strings_are_text_tiny_llama():
    enc = create_text_encoder("tiny:llama")
    text = "a</s>b<s><pad><unk>"
    ids = enc.tokenize([text])[0]
    tok = enc.tokenizer
    assert ids[0] == tok.bos_token_id and len(ids) == 1 + len(text.encode())
    assert not {0, 1, 2, 3} & set(ids[1:])  # no pad/BOS/EOS/UNK id from the text itself
    assert tok.decode(ids[1:]) == text


def test_special_token_strings_are_text_gpt2_style():
    enc = gpt2_encoder(n_positions=64)
    ids = enc.tokenize([f"hi{GPT2_EOT}there"])[0]
    assert ids[0] == 256 and ids.count(256) == 1  # only the BOS the encoder prepends
    assert len(ids) == 1 + len(f"hi{GPT2_EOT}there")


def test_special_token_strings_are_text_python_backend():
    """ByT5's tokenizer is a pure-Python (PythonBackend) tokenizer: no files, EOS appended."""
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaModel

    tok = ByT5Tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaModel(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
    enc = HFTextEncoder(model, tok, kind="hf", name="byt5-tok", weights_sha256="random:0", device=CPU,
                        dtype=torch.float32, layers=2)
    ids = enc.tokenize(["a</s>b<pad>"])[0]
    assert ids == [ord(c) + 3 for c in "a</s>b<pad>"] + [tok.eos_token_id]  # ByT5: byte + 3; EOS at the end
    cut = enc.tokenize(["y" * 100])[0]
    assert len(cut) == 64 and cut[-1] == tok.eos_token_id  # truncation keeps the template's EOS


def test_special_token_strings_are_text_smollm2():
    enc = create_text_encoder("shipped:smollm2", max_length=64)
    tok = enc.tokenizer
    special = set(tok.all_special_ids)
    ids = enc.tokenize(["<|im_start|>user<|im_end|> hi<|endoftext|>"])[0]
    assert ids[0] == tok.bos_token_id and not special & set(ids[1:])
    assert tok.decode(ids[1:]) == "<|im_start|>user<|im_end|> hi<|endoftext|>"


def test_tokenizer_that_ignores_split_special_tokens_is_refused():
    class Ignores:
        """Delegates to the tiny tokenizer but drops split_special_tokens, as an old one would."""

        def __init__(self):
            self.inner = build_tiny_tokenizer()

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, *a, split_special_tokens=False, **kw):
            return self.inner(*a, **kw)

    model, _ = build_tiny_llama()
    with pytest.raises(ValueError, match=r"turns the text '<s>' into a control token"):
        HFTextEncoder(model, Ignores(), kind="hf", name="old", weights_sha256="random:0", device=CPU,
                      dtype=torch.float32)


# ------------------------------------------------------------------ extract: up front, reported
def test_extract_reports_truncation_and_notes_and_writes_a_complete_cache(tmp_path):
    # The failing input: GPT-2 architecture, 32 positions, one 101-token text -> IndexError after the
    # image units were written. Now: truncated to 32, counted, cache complete.
    path = make_manifest(tmp_path / "m", with_split=False)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["text"] = "y" * 101
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = ExtractConfig(dataset="manifest", root=str(path), text="hf:tiny-gpt2", image="tiny:vit", layers=2,
                        out_dir=str(tmp_path / "cache"), num_workers=0, device="cpu")
    result = extract(cfg, text_encoder=gpt2_encoder(), image_encoder=create_image_encoder("tiny:vit", layers=2))
    assert result.complete
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    lengths = manifest["text_lengths"]
    assert lengths["max_length"] == 32 and lengths["limits"] == {"positions": 32, "tokenizer": None, "requested": None}
    split_of_long = next(s for s, v in lengths["splits"].items() if v["longest_tokens"] == 102)
    assert lengths["splits"][split_of_long]["truncated"] == 1
    assert sum(v["truncated"] for v in lengths["splits"].values()) == 1
    assert result.text_lengths == lengths
    offsets = np.asarray(zarr.open_group(tmp_path / "cache", mode="r")[f"{split_of_long}/text/offsets"][:])
    assert np.diff(offsets).max() == 32
    assert any("carved images into train/val/test" in n for n in manifest["dataset"]["notes"])
    again = extract_config_from_manifest(manifest)
    assert again.max_length is None


def test_extract_max_length_option_is_recorded(tmp_path):
    path = make_manifest(tmp_path / "m")
    cfg = ExtractConfig(dataset="manifest", root=str(path), text="tiny:llama", image="tiny:vit", layers=2,
                        max_length=6, out_dir=str(tmp_path / "cache"), num_workers=0, device="cpu")
    result = extract(cfg)
    m = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert m["text"]["extra"]["max_length"] == 6 and m["text_lengths"]["limits"]["requested"] == 6
    assert result.text_lengths["splits"]["train"]["truncated"] == 12  # every "caption k of image i" > 5 bytes
    assert extract_config_from_manifest(m).max_length == 6
    with pytest.raises(ValueError, match="max_length must be ≥ 1"):
        ExtractConfig(max_length=0).validate()
