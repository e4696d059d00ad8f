"""A frozen timm CNN backbone as an ImageEncoder.

- layers: the outputs of the last L_s blocks, each (B, C_l, H_l, W_l) flattened to tokens
  (B, H_l*W_l, C_l); widths and token counts differ per layer. What a "block" is depends on the
  model family:
  * EfficientNet / MobileNetV3 (timm classes whose forward_features is conv_stem -> bn1 ->
    blocks [-> conv_head -> bn2]): the stages of `model.blocks`, run by hand one by one (index
    space `timm_blocks`). EfficientNet-Lite0 @ 224: blocks 3..6 = 80/112/192/320 channels at
    14x14, 14x14, 7x7, 7x7. `feature_info` there lists only the stages where the resolution drops
    (blocks 0, 1, 2, 4, 6), so its last 4 would reach back to the 56x56 map of blocks.1.
  * every other timm model (ResNet, ConvNeXt, ...): the last L_s entries of `model.feature_info`
    via `forward_intermediates` (index space `timm_feature_info`).
- final:  `forward_features` output as tokens (EfficientNet: after conv_head/bn2, (B, 49, 1280) at
  224 px);
- pooled: `forward_head(final, pre_logits=True)` = the global-pooled features (head removed).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from .base import EncoderIdentity, EncoderOutput, ImageEncoder
from .layers import TIMM_BLOCKS, TIMM_FEATURE_STAGES, feature_map_to_tokens, last_block_indices
from .noise import add_relative_gaussian_noise
from .runtime import DTYPE_NAMES, freeze


class TimmImageEncoder(ImageEncoder):
    def __init__(
        self,
        model: torch.nn.Module,
        transform: Callable,
        *,
        kind: str,
        name: str,
        weights_sha256: str,
        device: torch.device,
        dtype: torch.dtype,
        layers: int = 4,
        input_size: tuple[int, int, int] | None = None,
        extra: dict[str, Any] | None = None,
    ):
        # None: the feature_info path; else the module names forward_features runs after blocks.
        self.modules_after_blocks = _modules_after_blocks(model)
        if self.modules_after_blocks is None and not (
                hasattr(model, "forward_intermediates") and hasattr(model, "feature_info")):
            raise ValueError(f"timm model {name!r} ({type(model).__name__}) is neither an "
                             "EfficientNet/MobileNetV3 nor has forward_intermediates/feature_info; "
                             "pick a timm backbone that does")
        model.reset_classifier(0)  # pooled = pre-logits features, no ImageNet head
        self.device = device
        self.dtype = dtype
        self.model = freeze(model.to(device=device, dtype=dtype))
        self.transform = transform
        if self.modules_after_blocks is not None:
            self.layer_indices = last_block_indices(len(model.blocks), layers)
            index_space = {"layer_index_space": TIMM_BLOCKS, "num_blocks": len(model.blocks),
                           "modules_after_blocks": list(self.modules_after_blocks)}
        else:
            stages = model.feature_info
            stages = stages.info if hasattr(stages, "info") else list(stages)
            self.layer_indices = last_block_indices(len(stages), layers)
            index_space = {"layer_index_space": TIMM_FEATURE_STAGES,
                           "feature_stages": [dict(s) for s in stages]}
        size = input_size or tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
        # One probe at the transform's input size fixes token counts and widths.
        probe = self.encode(torch.zeros(1, *size))
        self.num_tokens = int(probe.final.shape[1])
        self.identity = EncoderIdentity(
            modality="image",
            kind=kind,
            name=name,
            weights_sha256=weights_sha256,
            layer_indices=list(self.layer_indices),
            layer_widths=[int(t.shape[-1]) for t in probe.layers],
            final_width=int(probe.final.shape[-1]),
            pooled_width=int(probe.pooled.shape[-1]),
            dtype=DTYPE_NAMES[dtype],
            final_is_last_layer=False,
            extra={
                **index_space,
                "layer_tokens": [int(t.shape[1]) for t in probe.layers],
                "layer_grid": "stage maps average-pooled onto the final map's grid",
                "num_tokens": self.num_tokens,
                "input_size": list(size),
                "final": "forward_features as (H*W, C) tokens",
                "pooled": "forward_head(pre_logits=True), global-pooled features",
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
        with torch.inference_mode():
            x = pixels.to(device=self.device, dtype=self.dtype)
            x = add_relative_gaussian_noise(x, input_noise, generator=generator)
            if self.modules_after_blocks is not None:
                features, intermediates = self._forward_blocks(x)
            else:
                features, intermediates = self.model.forward_intermediates(
                    x, indices=list(self.layer_indices), output_fmt="NCHW",
                    intermediates_only=False)
            pooled = self.model.forward_head(features, pre_logits=True)  # (B, C)
            # Every stored array of an image shares one token count (one offsets array per
            # modality, docs/cache-format.md): earlier, finer stage maps are average-pooled onto
            # the final map's grid (EfficientNet-Lite0 @224: 14x14 -> 7x7).
            grid = features.shape[-2:]
            layers = [feature_map_to_tokens(f if f.shape[-2:] == grid else
                                            torch.nn.functional.adaptive_avg_pool2d(f, grid))
                      for f in intermediates]  # (B, H*W, C_l)
            final = feature_map_to_tokens(features)  # (B, H*W, C)
        mask = torch.ones(final.shape[:2], dtype=torch.bool, device=final.device)
        return EncoderOutput(layers=layers, final=final, pooled=pooled, mask=mask)


    def _forward_blocks(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """forward_features by hand, stage by stage, keeping the selected stages' outputs.

        Same modules in the same order as timm's forward_features (checked bit-exact in the tests),
        so `features` is exactly what forward_features returns.
        """
        model = self.model
        selected = set(self.layer_indices)
        x = model.bn1(model.conv_stem(x))
        intermediates = []
        for index, stage in enumerate(model.blocks):
            x = stage(x)
            if index in selected:
                intermediates.append(x)
        for name in self.modules_after_blocks:
            x = getattr(model, name)(x)
        return x, intermediates


def _modules_after_blocks(model: torch.nn.Module) -> list[str] | None:
    """For timm models whose forward_features is conv_stem -> bn1 -> blocks -> <these modules>,
    the names of the modules after `blocks`; None for every other model.

    Matched on the forward_features function itself, not isinstance: a subclass that overrides
    forward_features would no longer be what `_forward_blocks` re-runs. MobileNetV3's conv_head
    runs after global pooling, in forward_head, so nothing follows blocks in its forward_features.
    """
    from timm.models.efficientnet import EfficientNet
    from timm.models.mobilenetv3 import MobileNetV3

    forward_features = getattr(type(model), "forward_features", None)
    if forward_features is EfficientNet.forward_features:
        return ["conv_head", "bn2"]
    if forward_features is MobileNetV3.forward_features:
        return []
    return None


def timm_eval_transform(model: torch.nn.Module, **overrides):
    """timm's own eval preprocessing for this model (resolve_data_config + create_transform)."""
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config(overrides, model=model)
    return create_transform(**config, is_training=False), config


def load_timm_encoder(model_name: str, *, weights: str | None, device: torch.device,
                      dtype: torch.dtype, layers: int) -> TimmImageEncoder:
    """`timm:<name>` with `weights=<local checkpoint>` (strict load into the default head, then
    the head is removed)."""
    import timm

    from molt_cache.checksums import sha256_file

    if weights is None:
        raise ValueError(f"timm:{model_name} needs weights=<local checkpoint path> "
                         "(molt-cache never downloads weights)")
    if not timm.is_model(model_name):
        raise ValueError(f"unknown timm model {model_name!r}; see timm.list_models() for valid names")
    if not Path(weights).is_file():  # timm only logs a missing file and raises an empty error
        raise FileNotFoundError(f"timm:{model_name} weights file {weights} does not exist (expected a "
                                f"local {model_name} checkpoint: a state dict .pth / .bin / .safetensors)")
    model = timm.create_model(model_name, pretrained=False)
    try:
        timm.models.load_checkpoint(model, weights, strict=True)
    except (RuntimeError, FileNotFoundError, KeyError) as err:
        raise ValueError(f"cannot load timm checkpoint {weights} into {model_name}: {err}") from err
    transform, data_config = timm_eval_transform(model)
    return TimmImageEncoder(model, transform, kind="timm", name=model_name,
                            weights_sha256=sha256_file(weights), device=device, dtype=dtype,
                            layers=layers, input_size=tuple(data_config["input_size"]),
                            extra={"weights_path": str(weights),
                                   "data_config": _jsonable(data_config)})


def _jsonable(config: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
