"""A frozen Hugging Face text model (decoder LLM or BERT-style encoder) as a TextEncoder.

What is kept (method.md, docs/encoders.md): the outputs of the last L_s blocks from
`hidden_states`, the final normalized states E_t = `last_hidden_state`, and the mean of E_t over
real tokens. When `hidden_states[-1]` *is* `last_hidden_state` (LLaMA / Mistral / Qwen apply the
final RMSNorm before recording the last entry; BERT-style encoders have no final norm, so their
last block output is the final output), `final` is returned as the very tensor `layers[-1]` and
`final_is_last_layer=True`, so the cache stores those bytes once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .base import EncoderIdentity, EncoderOutput, TextEncoder
from .layers import HF_HIDDEN_STATES, hf_hidden_state_indices
from .noise import add_relative_gaussian_noise
from .runtime import DTYPE_NAMES, freeze
from .text_limits import Tokenized, resolve_max_length


class HFTextEncoder(TextEncoder):
    """Wraps an already-loaded `transformers` base model and its tokenizer.

    Build it through `create_text_encoder("hf:<path>")`, `"shipped:smollm2"` or `"tiny:llama"`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        kind: str,
        name: str,
        weights_sha256: str,
        device: torch.device,
        dtype: torch.dtype,
        layers: int = 4,
        max_length: int | None = None,
        extra: dict[str, Any] | None = None,
    ):
        if getattr(model.config, "is_encoder_decoder", False):
            raise ValueError(f"{name!r} is an encoder-decoder model ({type(model).__name__}); "
                             "molt-cache needs a decoder LM or a BERT-style encoder")
        self.device = device
        self.dtype = dtype
        self.model = freeze(model.to(device=device, dtype=dtype))
        self.tokenizer = tokenizer
        # The smallest of the position limit, the tokenizer's real model_max_length and the
        # request (text_limits.py): a longer text would index past the position table.
        self.max_length, self.length_limits = resolve_max_length(model.config, tokenizer, max_length, name=name)
        # Causal LMs whose tokenizer adds no BOS itself (SmolLM2, GPT-2) get one prepended, so every
        # text — the empty one included — has at least one token and position 0 is never content.
        bos = tokenizer.bos_token_id
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.prepend_bos = bos is not None and (len(probe) == 0 or probe[0] != bos)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._check_special_tokens_stay_text(name)

        # One probe run fixes the layer count and whether hidden_states[-1] is already final.
        out = self._run(torch.tensor([self.tokenize(["a"])[0]], device=device), None)
        num_states = len(out.hidden_states)
        self._num_hidden_states = num_states
        self.layer_indices = hf_hidden_state_indices(num_states, layers)
        self.final_is_last_layer = bool(torch.equal(out.hidden_states[-1], out.last_hidden_state))
        widths = [int(out.hidden_states[i].shape[-1]) for i in self.layer_indices]
        final_width = int(out.last_hidden_state.shape[-1])
        self.identity = EncoderIdentity(
            modality="text",
            kind=kind,
            name=name,
            weights_sha256=weights_sha256,
            layer_indices=list(self.layer_indices),
            layer_widths=widths,
            final_width=final_width,
            pooled_width=final_width,
            dtype=DTYPE_NAMES[dtype],
            final_is_last_layer=self.final_is_last_layer,
            extra={
                "layer_index_space": HF_HIDDEN_STATES,
                "num_hidden_states": num_states,
                "architecture": type(model).__name__,
                "max_length": self.max_length,
                "max_length_limits": dict(self.length_limits),
                "special_tokens_in_text": "tokenized as text (split_special_tokens=True)",
                "prepend_bos": self.prepend_bos,
                "bos_token_id": bos,
                "pooled": "mean of final states over real tokens",
                **(extra or {}),
            },
        )

    # -- tokenization -------------------------------------------------------------------------
    def _call_tokenizer(self, texts: list[str], budget: int | None) -> list[list[int]]:
        """The tokenizer's template (its own BOS/EOS/CLS/SEP) around the text; special-token
        strings inside a text split into ordinary pieces (`split_special_tokens=True`), so a
        dataset text never injects a control token. `budget`: truncate (template kept) to it."""
        kwargs: dict[str, Any] = {"add_special_tokens": True, "split_special_tokens": True, "verbose": False}
        if budget is not None:
            kwargs.update(truncation=True, max_length=budget)
        return [list(ids) for ids in self.tokenizer(list(texts), **kwargs)["input_ids"]]

    def _with_bos(self, ids: list[int]) -> list[int]:
        if self.prepend_bos and (not ids or ids[0] != self.tokenizer.bos_token_id):
            return [self.tokenizer.bos_token_id] + ids
        return ids

    def tokenize_report(self, texts: list[str]) -> Tokenized:
        """Token ids per text (special tokens included, at most `max_length`), and each text's
        length before truncation, so the caller can report what was cut."""
        if isinstance(texts, str):
            raise TypeError("tokenize takes a list of texts, got a single str")
        texts = list(texts)
        result = [self._with_bos(ids) for ids in self._call_tokenizer(texts, None)]
        full = [len(ids) for ids in result]
        long_ = [i for i, n in enumerate(full) if n > self.max_length]
        if long_:
            budget = self.max_length - (1 if self.prepend_bos else 0)
            cut = self._call_tokenizer([texts[i] for i in long_], budget) if budget > 0 else [[] for _ in long_]
            for i, ids in zip(long_, cut):
                result[i] = self._with_bos(ids)[: self.max_length]
        for i, ids in enumerate(result):
            if not ids:
                raise ValueError(f"text #{i} {texts[i][:80]!r} tokenized to zero tokens and the "
                                 f"tokenizer has no BOS token; cannot encode an empty sequence")
        return Tokenized(result, full, self.max_length, dict(self.length_limits))

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenize_report(texts).ids

    def _check_special_tokens_stay_text(self, name: str) -> None:
        """Refuse a tokenizer that ignores split_special_tokens: with it, a dataset text holding
        "</s>" or "<|endoftext|>" would become a control token (and end or reset the sequence)."""
        special = set(self.tokenizer.all_special_ids) - {self.tokenizer.unk_token_id}
        template = self._with_bos(self._call_tokenizer([""], None)[0])
        for token in self.tokenizer.all_special_tokens:
            if not token:
                continue
            ids = self._with_bos(self._call_tokenizer([f"x{token}x"], None)[0])
            if sum(i in special for i in ids) != sum(i in special for i in template):
                raise ValueError(f"the tokenizer of {name!r} ({type(self.tokenizer).__name__}) turns the text "
                                 f"{token!r} into a control token even with split_special_tokens=True; "
                                 "dataset texts could inject special tokens")

    # -- forward ------------------------------------------------------------------------------
    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             inputs_embeds: torch.Tensor | None = None):
        kwargs: dict[str, Any] = {"attention_mask": attention_mask, "output_hidden_states": True,
                                  "return_dict": True}
        if hasattr(self.model.config, "use_cache"):
            kwargs["use_cache"] = False
        with torch.inference_mode():
            if inputs_embeds is None:
                return self.model(input_ids=input_ids, **kwargs)
            return self.model(inputs_embeds=inputs_embeds, **kwargs)

    def encode(
        self,
        token_ids: list[list[int]],
        *,
        input_noise: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> EncoderOutput:
        if not token_ids:
            raise ValueError("encode got an empty batch")
        for i, ids in enumerate(token_ids):
            if len(ids) == 0:
                raise ValueError(f"sample #{i} of the batch has zero tokens; tokenize() always "
                                 "returns at least the BOS token")
            if len(ids) > self.max_length:
                raise ValueError(f"sample #{i} has {len(ids)} tokens > max_length={self.max_length}")
        longest = max(len(ids) for ids in token_ids)
        ids = torch.full((len(token_ids), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(token_ids), longest), dtype=torch.bool)
        for i, row in enumerate(token_ids):  # right padding: causal real tokens never see pads
            ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
        ids, mask = ids.to(self.device), mask.to(self.device)

        with torch.inference_mode():
            embeds = None
            if input_noise > 0:
                embeds = self.model.get_input_embeddings()(ids)  # (B, T, D)
                embeds = add_relative_gaussian_noise(embeds, input_noise, mask=mask,
                                                     generator=generator)
            elif input_noise < 0:
                raise ValueError(f"input_noise must be >= 0, got {input_noise}")
            out = self._run(ids, mask.long(), embeds)
            states = out.hidden_states
            if len(states) != self._num_hidden_states:
                raise RuntimeError(f"model returned {len(states)} hidden states, expected "
                                   f"{self._num_hidden_states} (as probed at load time)")
            layers = [states[i] for i in self.layer_indices]
            final = layers[-1] if self.final_is_last_layer else out.last_hidden_state
            weight = mask.unsqueeze(-1).float()  # (B, T, 1)
            pooled = (final.float() * weight).sum(1) / weight.sum(1)  # float32 accumulate
        return EncoderOutput(layers=layers, final=final, pooled=pooled.to(self.dtype), mask=mask,
                             final_is_last_layer=self.final_is_last_layer)


def load_hf_text_encoder(path_or_name: str, *, device: torch.device, dtype: torch.dtype,
                         layers: int, max_length: int | None, kind: str = "hf",
                         weights_sha256: str | None = None, name: str | None = None,
                         extra: dict[str, Any] | None = None) -> HFTextEncoder:
    """Load `AutoModel` + `AutoTokenizer` from a local folder (or an already-cached hub name when
    HF_HUB_OFFLINE=1). Never downloads: `local_files_only=True` always."""
    from transformers import AutoModel, AutoTokenizer

    source = str(path_or_name)
    local = Path(source).expanduser()
    if local.exists():
        source = str(local)
    elif source.startswith(("/", "./", "../", "~")) or local.is_absolute():
        # A path, not a hub name: say so instead of transformers' "Repo id must be in the form ...".
        raise FileNotFoundError(f"text model folder {source} does not exist (expected a local folder "
                                "with config.json, the weights (*.safetensors / *.bin) and the tokenizer files; "
                                "molt-cache never downloads)")
    # else: a hub name that may already sit in the local HF cache; local_files_only decides.
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModel.from_pretrained(source, local_files_only=True, dtype=dtype)
    except OSError as err:
        raise FileNotFoundError(
            f"cannot load text model {path_or_name!r} from local files (molt-cache never "
            f"downloads; pass hf:<folder with config.json, weights and tokenizer>): {err}") from err
    if weights_sha256 is None:
        weights_sha256 = _sha256_of_weight_files(Path(source)) if Path(source).is_dir() else \
            f"unverified:{path_or_name}"
    return HFTextEncoder(model, tokenizer, kind=kind, name=name or str(path_or_name),
                         weights_sha256=weights_sha256, device=device, dtype=dtype,
                         layers=layers, max_length=max_length, extra=extra)


def _sha256_of_weight_files(folder: Path) -> str:
    """sha256 over the sorted weight files' own sha256s (one file: its plain sha256)."""
    import hashlib

    from molt_cache.checksums import sha256_file

    files = sorted(p for p in folder.iterdir()
                   if p.suffix in {".safetensors", ".bin", ".pt", ".pth", ".gguf"})
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) in {folder}")
    if len(files) == 1:
        return sha256_file(files[0])
    digest = hashlib.sha256()
    for p in files:
        digest.update(f"{p.name}:{sha256_file(p)}\n".encode())
    return digest.hexdigest()
