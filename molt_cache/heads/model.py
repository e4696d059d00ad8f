"""The stage-two heads: MoltHeads (MoLT layers -> FBP -> layer weights M -> fusion -> classifier),
BaselineHeads (the same fusion and classifier with a learned query) and UnimodalHeads (text-only /
image-only: the baseline's fusion reading one modality, the reference a fused model falls back to
when the other modality is absent). `build_heads` is the one factory; it validates the config
(model name, ablations) before building anything."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from molt_cache.batch import FeatureBatch
from molt_cache.config import HeadsConfig
from molt_cache.heads.fbp import factorized_bilinear_pool
from molt_cache.heads.fusion import Fusion
from molt_cache.heads.molt import (LayerStates, MoltLayer, PairSlots, attend, packed_linear, pair_slots,
                                   real_token_rows)
from molt_cache.losses.cca import dcca_loss

MODELS = ("molt", "baseline", "text-only", "image-only")
ABLATIONS = ("cross-attn", "cca", "M", "fusion", "fbp")  # paper Table 2
MISSING_STRATEGIES = ("zero", "empty", "translate")


@dataclass
class FeatureDims:
    """Feature widths of one cache (its manifest's text/image encoder identities)."""

    text_layer_widths: list[int]  # widths of the cached layers, oldest first
    image_layer_widths: list[int]
    text_final_width: int  # E_t
    image_final_width: int  # E_i

    @classmethod
    def from_manifest(cls, manifest: dict) -> "FeatureDims":
        """From the cache manifest (docs/cache-format.md): text/image layer_widths, final_width."""
        try:
            return cls(text_layer_widths=[int(w) for w in manifest["text"]["layer_widths"]],
                       image_layer_widths=[int(w) for w in manifest["image"]["layer_widths"]],
                       text_final_width=int(manifest["text"]["final_width"]),
                       image_final_width=int(manifest["image"]["final_width"]))
        except KeyError as e:
            raise ValueError(f"cache manifest lacks {e}; FeatureDims needs text/image "
                             f"layer_widths and final_width") from None


@dataclass
class CommonStates:
    """One selected layer's common-space states, pooled over real tokens (float32)."""

    image: torch.Tensor  # (B, d_c) H'_i,l
    text: torch.Tensor  # (B, d_c) H'_t,l
    image_proj: torch.Tensor  # (B, d_c) I'_l, before cross-attention
    text_proj: torch.Tensor  # (B, d_c) T'_l


@dataclass
class HeadsOutput:
    logits: torch.Tensor  # (B, C)
    cca_loss: torch.Tensor | None  # scalar float32, mean over layers; None: ablated / baseline
    common: list[CommonStates]  # one per selected layer, oldest first; empty for the baseline
    robust: torch.Tensor | None  # (B, d_c/s) H_r ((B, 2·d_c) with 'fbp' ablated); None: baseline


def _parse_ablations(ablate: list[str] | str) -> frozenset[str]:
    names = [a.strip() for a in ablate.split(",")] if isinstance(ablate, str) else list(ablate)
    names = [a for a in names if a]
    unknown = sorted(set(names) - set(ABLATIONS))
    if unknown:
        raise ValueError(f"unknown ablation(s) {unknown}; valid: {list(ABLATIONS)}")
    return frozenset(names)


def _check_strategy(missing_strategy: str) -> None:
    if missing_strategy not in MISSING_STRATEGIES:
        raise ValueError(f"unknown missing_strategy {missing_strategy!r}; "
                         f"valid: {list(MISSING_STRATEGIES)}")


def _present_flags(batch: FeatureBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(image_present, text_present) as bool; refuses a sample with neither modality."""
    image_present, text_present = batch.image_present.bool(), batch.text_present.bool()
    neither = (~image_present & ~text_present).nonzero().flatten()
    if len(neither):
        raise ValueError(f"'translate' needs one present modality per sample; batch rows "
                         f"{neither.tolist()[:10]} (pair index "
                         f"{batch.index[neither].tolist()[:10]}) have neither")
    return image_present, text_present


def _slots(batch: FeatureBatch) -> PairSlots | None:
    """The grouped layout of a deduplicated batch (PairSlots), None when per pair or too padded."""
    if batch.image_rows is None:
        return None
    return pair_slots(batch.image_rows, batch.image_mask.shape[0], batch.most_pairs_per_image())


def _pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """Pad the token axis (dim 1) of (B, T, ...) with zeros (or False) to `length`."""
    extra = length - x.shape[1]
    if extra == 0:
        return x
    return torch.cat([x, x.new_zeros((x.shape[0], extra, *x.shape[2:]))], 1)


class _Classifier(nn.Module):
    def __init__(self, width: int, num_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(x))


class MoltHeads(nn.Module):
    """MoLT per selected layer -> pooled common states (CCA input) -> FBP -> M-weighted mean
    H_r -> fusion with E_i, E_t -> classifier. Ablations per `cfg.ablate` (paper Table 2)."""

    image_once = True  # takes deduplicated batches (FeatureBatch.image_rows): image work per image

    def __init__(self, cfg: HeadsConfig, dims: FeatureDims):
        super().__init__()
        self.cfg = cfg
        self.ablate = _parse_ablations(cfg.ablate)
        n = cfg.layers
        # Pair from the end of each encoder: the last n cached layers of each.
        self.text_widths = list(dims.text_layer_widths[-n:])
        self.image_widths = list(dims.image_layer_widths[-n:])
        self.layers = nn.ModuleList(
            MoltLayer(wi, wt, cfg.d_common, cross_attention="cross-attn" not in self.ablate)
            for wi, wt in zip(self.image_widths, self.text_widths))
        if "M" not in self.ablate:
            self.layer_weights = nn.Parameter(torch.ones(n))  # M, init ones
        robust_width = 2 * cfg.d_common if "fbp" in self.ablate else cfg.d_common // cfg.fbp_stride
        self.robust_width = robust_width
        if "fusion" in self.ablate:
            self.fusion = None
            classifier_width = robust_width
        else:
            self.fusion = Fusion(robust_width, dims.image_final_width, dims.text_final_width,
                                 cfg.d_common)
            classifier_width = cfg.d_common
        self.classifier = _Classifier(classifier_width, cfg.num_classes, cfg.dropout)

    def _check_batch(self, batch: FeatureBatch) -> None:
        n = self.cfg.layers
        if len(batch.text_layers) < n or len(batch.image_layers) < n:
            raise ValueError(f"heads use the last {n} layers; batch holds "
                             f"{len(batch.text_layers)} text and {len(batch.image_layers)} image")
        got_t = [t.shape[-1] for t in batch.text_layers[-n:]]
        got_i = [t.shape[-1] for t in batch.image_layers[-n:]]
        if got_t != self.text_widths or got_i != self.image_widths:
            raise ValueError(f"batch layer widths text {got_t} image {got_i} differ from the "
                             f"heads' text {self.text_widths} image {self.image_widths} "
                             f"(built for another cache?)")

    def _layer_states(self, layer: MoltLayer, image: torch.Tensor, text: torch.Tensor,
                      batch: FeatureBatch, translate: bool, slots: PairSlots | None,
                      text_rows: torch.Tensor | None) -> LayerStates:
        # (B or U, Ti, d_c), (B, Tt, d_c): I'_l once per distinct image when image_rows is set
        image_proj, text_proj = layer.project(image, text, text_rows)
        image_mask, text_mask = batch.image_mask.bool(), batch.text_mask.bool()
        if not translate:
            return layer.interact(image_proj, image_mask, text_proj, text_mask, batch.image_rows, slots)
        if batch.image_rows is not None:  # the substitutions below are per pair
            image_proj = image_proj.index_select(0, batch.image_rows)
            image_mask = image_mask.index_select(0, batch.image_rows)
        # 'translate': the absent modality's projected tokens are replaced by the present one's
        # (so no cross-attention reads the absent features), then its pooled states by the
        # present modality's.
        image_present, text_present = _present_flags(batch)
        length = max(image_proj.shape[1], text_proj.shape[1])
        image_proj, text_proj = _pad_tokens(image_proj, length), _pad_tokens(text_proj, length)
        image_mask, text_mask = _pad_tokens(image_mask, length), _pad_tokens(text_mask, length)
        t_ok, i_ok = text_present[:, None], image_present[:, None]
        states = layer.interact(
            torch.where(i_ok[..., None], image_proj, text_proj), torch.where(i_ok, image_mask, text_mask),
            torch.where(t_ok[..., None], text_proj, image_proj), torch.where(t_ok, text_mask, image_mask))
        return LayerStates(
            image=torch.where(i_ok, states.image, states.text),
            text=torch.where(t_ok, states.text, states.image),
            image_proj=torch.where(i_ok, states.image_proj, states.text_proj),
            text_proj=torch.where(t_ok, states.text_proj, states.image_proj),
        )

    def forward(self, batch: FeatureBatch, missing_strategy: str = "zero") -> HeadsOutput:
        _check_strategy(missing_strategy)
        self._check_batch(batch)
        translate = missing_strategy == "translate"
        n = self.cfg.layers
        # translate substitutes per pair: it expands to pairs and needs no layout
        slots = None if translate else _slots(batch)
        text_rows = real_token_rows(batch.text_mask.bool())  # once for every layer and the fusion
        common = [self._layer_states(layer, image, text, batch, translate, slots, text_rows)
                  for layer, image, text in zip(self.layers, batch.image_layers[-n:],
                                                batch.text_layers[-n:])]

        cca_loss = None
        # Under no_grad (evaluation, robustness) the loss is never used: skip its eigh/SVD work.
        if "cca" not in self.ablate and (self.training or torch.is_grad_enabled()):
            if batch.size >= 2:
                cca_loss = torch.stack([
                    dcca_loss(s.image, s.text, ridge=self.cfg.cca_ridge, top_k=self.cfg.cca_top_k)
                    for s in common]).mean()
            elif self.training:
                raise ValueError("the CCA loss needs at least 2 samples per training batch "
                                 "(use drop_last=True, or a larger batch)")
            # eval with a single sample: canonical correlations are undefined, cca_loss = None

        if "fbp" in self.ablate:
            per_layer = [torch.cat([s.image, s.text], -1) for s in common]  # (B, 2·d_c)
        else:
            per_layer = [factorized_bilinear_pool(s.image, s.text, stride=self.cfg.fbp_stride,
                                                  signed_sqrt=self.cfg.fbp_signed_sqrt)
                         for s in common]  # (B, d_c/s), unit norm
        stacked = torch.stack(per_layer)  # (L_s, B, r)
        if "M" not in self.ablate:
            stacked = self.layer_weights[:, None, None] * stacked
        robust = stacked.mean(0)  # (B, r) H_r

        if self.fusion is None:
            fused = robust
        else:
            present = _present_flags(batch) if translate else (None, None)
            fused = self.fusion(robust, batch.image_final, batch.image_mask.bool(),
                                batch.text_final, batch.text_mask.bool(), *present,
                                image_rows=batch.image_rows, slots=slots, text_rows=text_rows)
        return HeadsOutput(
            logits=self.classifier(fused),
            cca_loss=cca_loss,
            common=[CommonStates(s.image, s.text, s.image_proj, s.text_proj) for s in common],
            robust=robust,
        )


class BaselineHeads(nn.Module):
    """Paper Table 3's baseline: the same fusion and classifier, a learned query vector in
    place of H_r; no MoLT, no CCA."""

    image_once = True  # the fusion projects E_i once per distinct image

    def __init__(self, cfg: HeadsConfig, dims: FeatureDims):
        super().__init__()
        self.cfg = cfg
        self.query = nn.Parameter(torch.empty(cfg.d_common).normal_(std=0.02))
        self.fusion = Fusion(cfg.d_common, dims.image_final_width, dims.text_final_width,
                             cfg.d_common)
        self.classifier = _Classifier(cfg.d_common, cfg.num_classes, cfg.dropout)

    def forward(self, batch: FeatureBatch, missing_strategy: str = "zero") -> HeadsOutput:
        _check_strategy(missing_strategy)
        present = _present_flags(batch) if missing_strategy == "translate" else (None, None)
        query = self.query.expand(batch.size, -1)  # (B, d_c)
        text_mask = batch.text_mask.bool()
        fused = self.fusion(query, batch.image_final, batch.image_mask.bool(),
                            batch.text_final, text_mask, *present,
                            image_rows=batch.image_rows, slots=_slots(batch),
                            text_rows=real_token_rows(text_mask))
        return HeadsOutput(logits=self.classifier(fused), cca_loss=None, common=[], robust=None)


class UnimodalHeads(nn.Module):
    """Text-only or image-only reference heads: the baseline's learned query attends to one
    modality's final states, E_r,m = CA(Q_r, E_m), and the classifier reads ½·LayerNorm(E_r,m),
    which is the fusion's output when both of its branches carry that modality (what 'translate'
    gives a fused model whose other modality is absent), up to LayerNorm's ε. The other modality is never read, so
    its accuracy is the ceiling a fused model can reach with that modality alone."""

    def __init__(self, cfg: HeadsConfig, dims: FeatureDims, modality: str):
        super().__init__()
        if modality not in ("text", "image"):
            raise ValueError(f"unimodal heads read 'text' or 'image', got {modality!r}")
        self.cfg, self.modality = cfg, modality
        width = dims.text_final_width if modality == "text" else dims.image_final_width
        self.query = nn.Parameter(torch.empty(cfg.d_common).normal_(std=0.02))
        self.query_proj = nn.Linear(cfg.d_common, cfg.d_common)
        self.key = nn.Linear(width, cfg.d_common)
        self.value = nn.Linear(width, cfg.d_common)
        self.norm = nn.LayerNorm(cfg.d_common)
        self.classifier = _Classifier(cfg.d_common, cfg.num_classes, cfg.dropout)

    def forward(self, batch: FeatureBatch, missing_strategy: str = "zero") -> HeadsOutput:
        _check_strategy(missing_strategy)  # nothing to translate from: one modality is all it has
        final, mask = ((batch.text_final, batch.text_mask) if self.modality == "text"
                       else (batch.image_final, batch.image_mask))
        mask = mask.bool()
        rows = real_token_rows(mask)  # texts are padded to the batch's longest
        q = self.query_proj(self.query.expand(batch.size, -1))[:, None, :]  # (B, 1, d_c)
        e = attend(q, packed_linear(self.key, final, rows), packed_linear(self.value, final, rows),
                   mask)[:, 0]  # (B, d_c) E_r,m
        return HeadsOutput(logits=self.classifier(0.5 * self.norm(e)), cca_loss=None, common=[], robust=None)


def build_heads(cfg: HeadsConfig, dims: FeatureDims) -> nn.Module:
    """MoltHeads or BaselineHeads per `cfg.model`; bad configs fail here, naming the fix."""
    if cfg.model not in MODELS:
        raise ValueError(f"unknown heads model {cfg.model!r}; valid: {list(MODELS)}")
    ablate = _parse_ablations(cfg.ablate)
    if cfg.num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (set it from the dataset), got {cfg.num_classes}")
    if cfg.d_common < 1:
        raise ValueError(f"d_common must be >= 1, got {cfg.d_common}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.model != "molt" and ablate:
        raise ValueError(f"ablations {sorted(ablate)} apply to model 'molt' only; the "
                         f"{cfg.model} heads have no MoLT, FBP, M or CCA (use --model molt, or drop --ablate)")
    if cfg.model == "baseline":
        return BaselineHeads(cfg, dims)
    if cfg.model in ("text-only", "image-only"):
        return UnimodalHeads(cfg, dims, cfg.model.removesuffix("-only"))
    available = min(len(dims.text_layer_widths), len(dims.image_layer_widths))
    if not 1 <= cfg.layers <= available:
        raise ValueError(f"layers (L_s) = {cfg.layers}, but the cache holds {len(dims.text_layer_widths)} "
                         f"text and {len(dims.image_layer_widths)} image layers; valid: 1..{available}")
    if "fbp" not in ablate and (cfg.fbp_stride < 1 or cfg.d_common % cfg.fbp_stride):
        raise ValueError(f"fbp_stride {cfg.fbp_stride} must be >= 1 and divide d_common {cfg.d_common}")
    if "cca" not in ablate:
        if cfg.cca_ridge < 0:
            raise ValueError(f"cca_ridge must be >= 0, got {cfg.cca_ridge}")
        if cfg.cca_top_k < 0:
            raise ValueError(f"cca_top_k must be >= 0 (0 = all), got {cfg.cca_top_k}")
    return MoltHeads(cfg, dims)
