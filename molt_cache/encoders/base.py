"""What a frozen encoder gives stage one.

Text encoders take token-id lists (tokenized once, up front, so lengths are known before any
compute and texts can be bucketed by length); image encoders take pixel batches made by their own
picklable `transform` in DataLoader workers. Both return `EncoderOutput`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class EncoderOutput:
    """Padded batch outputs; only rows where `mask` is True are real tokens and get stored.

    layers: L_s tensors, each (B, T, D_l): outputs of the selected blocks, oldest first.
    final:  (B, T, D) final normalized token states (E_t / E_i). May be the same tensor object as
            layers[-1] when the model's last hidden state is already normed (HF LLaMA); then
            `final_is_last_layer` is True and the cache stores those bytes once.
    pooled: (B, P) the model's own pooled embedding (CLIP: projected image embedding; text: mean of
            final states over real tokens).
    mask:   (B, T) bool, True for real tokens.
    """

    layers: list[torch.Tensor]
    final: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor
    final_is_last_layer: bool = False


@dataclass
class EncoderIdentity:
    """Everything that makes two caches comparable; recorded in the cache manifest."""

    modality: str  # "text" | "image"
    kind: str  # "hf", "open_clip", "timm", "shipped:smollm2", ...
    name: str  # model name or path as given
    weights_sha256: str  # checksum of the weights actually loaded ("random:<seed>" for tiny random)
    layer_indices: list[int]  # absolute indices into the model's hidden states / blocks
    layer_widths: list[int]
    final_width: int
    pooled_width: int
    dtype: str  # "float32" | "float16" | "bfloat16"
    final_is_last_layer: bool
    extra: dict[str, Any] = field(default_factory=dict)


class FrozenEncoder(ABC):
    """eval(), requires_grad_(False), run under torch.inference_mode()."""

    identity: EncoderIdentity
    device: torch.device
    dtype: torch.dtype


class TextEncoder(FrozenEncoder):
    max_length: int  # tokens per text, special tokens included (encoders/text_limits.py)

    @abstractmethod
    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, special tokens included, truncated to the model's max length."""

    def tokenize_report(self, texts: list[str]):
        """`text_limits.Tokenized`: the ids and each text's length before truncation. This
        default cannot see truncation (full length = stored length); HF encoders override it."""
        from .text_limits import Tokenized

        ids = self.tokenize(texts)
        return Tokenized(ids, [len(t) for t in ids], getattr(self, "max_length", max(map(len, ids), default=0)))

    @abstractmethod
    def encode(
        self,
        token_ids: list[list[int]],
        *,
        input_noise: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> EncoderOutput:
        """Pad to the batch's longest, run the model, return states.

        input_noise p > 0 adds N(0, (p·σ)²) to the input token embeddings, σ the std of each
        sample's embeddings over its real tokens (method.md, input-level noise).
        """


class ImageEncoder(FrozenEncoder):
    transform: Callable  # PIL.Image -> (3, H, W) float tensor, normalized; picklable
    num_tokens: int

    @abstractmethod
    def encode(
        self,
        pixels: torch.Tensor,
        *,
        input_noise: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> EncoderOutput:
        """pixels (B, 3, H, W) as made by `transform`. input_noise as for text, on the normalized
        pixels, σ per sample."""
