"""A frozen open_clip ViT image tower as an ImageEncoder.

The tower is run by hand, step for step as open_clip's `VisionTransformer.forward` does
(`_embeds` = patchify + class token + positions + patch dropout (identity in eval) + ln_pre;
the resblocks; `_pool` + `proj`), so the outputs of the selected resblocks can be kept:
- layers: outputs of the last L_s resblocks, all tokens incl. the class token, (B, T, width);
- final:  E_i = ln_post applied to every token, (B, T, width) (257 tokens for ViT-L/14 @ 224);
- pooled: the projected embedding, exactly what `model.encode_image` returns (unnormalized).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from .base import EncoderIdentity, EncoderOutput, ImageEncoder
from .layers import OPEN_CLIP_RESBLOCKS, last_block_indices
from .noise import add_relative_gaussian_noise
from .runtime import DTYPE_NAMES, freeze


class OpenClipImageEncoder(ImageEncoder):
    def __init__(
        self,
        visual: torch.nn.Module,
        transform: Callable,
        *,
        kind: str,
        name: str,
        weights_sha256: str,
        device: torch.device,
        dtype: torch.dtype,
        layers: int = 4,
        extra: dict[str, Any] | None = None,
    ):
        missing = [a for a in ("_embeds", "_pool", "transformer", "ln_post", "proj")
                   if not hasattr(visual, a)]
        if missing or not hasattr(getattr(visual, "transformer", None), "resblocks"):
            raise ValueError(f"open_clip model {name!r} has a visual tower of type "
                             f"{type(visual).__name__} without {missing or ['transformer.resblocks']}; "
                             "only open_clip ViT towers are supported here (use timm:<name> for CNNs)")
        if getattr(visual, "attn_pool", None) is not None:
            # CoCa-style attentional pooling changes what ln_post sees; E_i would be ambiguous.
            raise ValueError(f"open_clip model {name!r} uses an attentional pooler (CoCa); "
                             "not supported: E_i is defined as ln_post over the resblock tokens")
        self.device = device
        self.dtype = dtype
        self.visual = freeze(visual.to(device=device, dtype=dtype))
        self.transform = transform
        num_blocks = len(self.visual.transformer.resblocks)
        self.layer_indices = last_block_indices(num_blocks, layers)
        self.num_tokens = int(self.visual.positional_embedding.shape[0])
        width = int(self.visual.transformer.width)
        pooled_width = int(self.visual.proj.shape[1]) if self.visual.proj is not None else width
        self.identity = EncoderIdentity(
            modality="image",
            kind=kind,
            name=name,
            weights_sha256=weights_sha256,
            layer_indices=list(self.layer_indices),
            layer_widths=[width] * layers,
            final_width=width,
            pooled_width=pooled_width,
            dtype=DTYPE_NAMES[dtype],
            final_is_last_layer=False,
            extra={
                "layer_index_space": OPEN_CLIP_RESBLOCKS,
                "num_blocks": num_blocks,
                "num_tokens": self.num_tokens,
                "image_size": list(_pair(self.visual.image_size)),
                "pool_type": getattr(self.visual, "pool_type", None),
                "final": "ln_post over all tokens (class token first)",
                "pooled": "open_clip encode_image (projected, unnormalized)",
                **(extra or {}),
            },
        )

    def encode(
        self,
        pixels: torch.Tensor,
        *,
        input_noise: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> EncoderOutput:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels (B, 3, H, W), got {tuple(pixels.shape)}")
        visual = self.visual
        keep = set(self.layer_indices)
        with torch.inference_mode():
            x = pixels.to(device=self.device, dtype=self.dtype)
            x = add_relative_gaussian_noise(x, input_noise, generator=generator)
            x = visual._embeds(x)  # (B, T, width)
            batch_first = getattr(visual.transformer, "batch_first", True)
            if not batch_first:
                x = x.transpose(0, 1)  # (T, B, width): older open_clip blocks are sequence-first
            kept = []
            for i, block in enumerate(visual.transformer.resblocks):
                x = block(x, attn_mask=None)
                if i in keep:
                    kept.append(x if batch_first else x.transpose(0, 1))
            if not batch_first:
                x = x.transpose(0, 1)  # (B, T, width)
            final = visual.ln_post(x)  # E_i: every token, class token included
            pooled, _ = visual._pool(x)  # the tower's own pooling (ln_post inside), as forward()
            if visual.proj is not None:
                # One row at a time: the same (1, width) @ proj product as encode_image on this
                # image alone. A (B, width) matmul takes another BLAS kernel on CPU from B = 4 on,
                # and the embedding would then depend on the batch in its last bits.
                pooled = torch.cat([row @ visual.proj for row in pooled.split(1)])
        mask = torch.ones(final.shape[:2], dtype=torch.bool, device=final.device)
        return EncoderOutput(layers=kept, final=final, pooled=pooled, mask=mask)


def _pair(size) -> tuple[int, int]:
    return tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))


def load_open_clip_encoder(model_name: str, *, weights: str | None, device: torch.device,
                           dtype: torch.dtype, layers: int) -> OpenClipImageEncoder:
    """`open_clip:<model name>` with `weights=<local checkpoint>`: build with pretrained=None,
    load the state dict strictly, keep only the visual tower."""
    import open_clip

    from molt_cache.checksums import sha256_file

    if weights is None:
        raise ValueError(f"open_clip:{model_name} needs weights=<local checkpoint path> "
                         "(molt-cache never downloads weights)")
    valid = open_clip.list_models()
    if model_name not in valid:
        raise ValueError(f"unknown open_clip model {model_name!r}; valid: {valid}")
    if not Path(weights).is_file():
        raise FileNotFoundError(f"open_clip:{model_name} weights file {weights} does not exist (expected a "
                                f"local {model_name} checkpoint: a CLIP state dict .bin / .pt / .safetensors)")
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
    try:
        open_clip.load_checkpoint(model, weights, strict=True)
    except (RuntimeError, FileNotFoundError, KeyError) as err:
        raise ValueError(f"cannot load open_clip checkpoint {weights} into {model_name}: {err}") from err
    visual = model.visual
    del model  # the text tower is not needed
    return OpenClipImageEncoder(visual, preprocess, kind="open_clip", name=model_name,
                                weights_sha256=sha256_file(weights), device=device, dtype=dtype,
                                layers=layers, extra={"weights_path": str(weights)})
