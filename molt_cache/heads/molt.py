"""The MoLT layer (method.md, 'Heads' steps 1-3): project both modalities of one selected layer to
the common space, let each attend to the other, residual + LayerNorm, pool over real tokens.

Attention is single-head scaled dot product with its own query/key/value projections per
direction (d_c -> d_c each) and no output projection: the paper's Q, K, V "transformed from" I'_l
and T'_l, nothing more."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x (..., T, D) over tokens where mask (..., T) is True, in float32 -> (..., D); the
    mask broadcasts over leading dims (an image's mask (U, 1, Ti) for its K pairs (U, K, Ti, D)).
    `where`, not multiply: a padding value of inf/NaN must not leak as 0·inf."""
    x = torch.where(mask[..., None], x.float(), 0.0)
    count = mask.sum(-1, keepdim=True).clamp_min(1).to(x.dtype)
    return x.sum(-2) / count


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d)) v with padding keys masked out. q (B, Tq, d), k/v (B, Tk, d),
    key_mask (B, Tk) True = real. A row with no real key (an absent modality with an empty mask)
    gets 0, not NaN."""
    has_key = key_mask.any(1)  # (B,)
    # Rows without keys attend uniformly to their (masked) padding, then are zeroed: keeps the
    # softmax finite in forward and backward.
    key_mask = key_mask | ~has_key[:, None]
    # Scores in float32 whatever the autocast dtype: under fp16 autocast (CUDA) q·k over d_c = 1024
    # of LLM features (outlier dimensions in the hundreds) passes fp16's 65504, and an inf score
    # turns the softmax into NaN. A no-op in float32; weights @ v below keeps the autocast dtype.
    with torch.autocast(device_type=q.device.type, enabled=False):
        qf = q.to(torch.promote_types(q.dtype, torch.float32))
        scores = qf @ k.to(qf.dtype).transpose(1, 2) / math.sqrt(q.shape[-1])  # (B, Tq, Tk)
    scores = scores.masked_fill(~key_mask[:, None, :], float("-inf"))
    # Zero the weights of keyless rows rather than the output: (B, Tq, Tk) is far smaller than
    # (B, Tq, d) when the keys are ~15 text tokens and the queries 257 image tokens.
    weights = (scores.softmax(-1) * has_key[:, None, None]).to(v.dtype)
    return weights @ v  # (B, Tq, d)


# A batch's texts are padded to its longest, and every projection of a padding token is thrown
# away by the masks: on OpenClipart (batch 64) the padded text holds 6.0x its real tokens. Below
# this share of real tokens the wide text projections run on the real rows only.
PACK_BELOW = 0.8


def real_token_rows(mask: torch.Tensor) -> torch.Tensor | None:
    """mask (B, T) bool -> (N,) int64 flat indices b·T + t of its real tokens, or None where
    packing does not pay (real share above PACK_BELOW) or would cost a host sync.

    CPU only: `nonzero` reads its size back to the host, which a training step on an accelerator
    must not do (no hidden round trips); there the padded product stays (a GPU pays padding in
    FLOPs, not in a stall)."""
    if mask.device.type != "cpu" or mask.numel() == 0:
        return None
    flat = mask.reshape(-1)
    rows = flat.nonzero().squeeze(1)
    return rows if rows.numel() <= PACK_BELOW * flat.numel() else None


def packed_linear(linear: nn.Module, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """linear(x) for x (B, T, D), computed on the flat token rows `rows` only (`real_token_rows`);
    the other (padding) positions are 0 rather than the bias. Every reader of these states masks
    padding out (attention keys, pooling, LayerNorm rows that are never pooled), so the outputs
    and gradients equal linear(x)'s up to float rounding. rows None: plain linear(x)."""
    if rows is None:
        return linear(x)
    B, T, D = x.shape
    y = linear(x.reshape(B * T, D).index_select(0, rows))  # (N, d)
    return y.new_zeros(B * T, y.shape[-1]).index_copy(0, rows, y).view(B, T, y.shape[-1])


class _GatherRows(torch.autograd.Function):
    """t.index_select(0, rows) whose backward sums the pairs' gradients into their image rows
    with index_add_ on a contiguous gradient: the stock backward hands index_add_ the gradient as
    autograd produced it (often transposed, from bmm), which on CPU takes a scatter path ~5x
    slower and was a third of an image-once training step."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.num_rows = t.shape[0]
        return t.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        out = grad.new_zeros((ctx.num_rows, *grad.shape[1:]))
        return out.index_add_(0, rows, grad.contiguous()), None


def gather_rows(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Rows of t (U, ...) per pair: (B, ...) = t[rows]; t itself when rows is None."""
    if rows is None:
        return t
    return _GatherRows.apply(t, rows) if t.requires_grad else t.index_select(0, rows)


# The grouped layout pads each image to the most pairs any image has in the batch; beyond this
# share of padded slots the gathers are cheaper (i.i.d. batches: ~1 pair per image).
MAX_SLOT_PADDING = 1.25


@dataclass(frozen=True)
class PairSlots:
    """The batch's pairs placed in slots by image: U images × K slots (K = the most pairs any image
    has), pair b in slot `slot[b]` = image_rows[b]·K + its rank among its image's pairs; unused
    slots hold zero text with an all-False mask and are never read back.

    In this layout what pairs share with their image is a broadcast, not a gather: the K pairs'
    text tokens of image u attend to its tokens in one (K·Tt, Ti) product, its tokens attend to
    each pair's text through one (Ti, K·Tt) product with a softmax per pair, and I'_l adds to the
    (U, K, Ti, d_c) image states as (U, 1, Ti, d_c). Only pooled (B, d_c) outputs go back to pairs."""

    slot: torch.Tensor  # (B,) int64
    images: int  # U
    per_image: int  # K

    @property
    def count(self) -> int:
        return self.images * self.per_image

    def to_slots(self, t: torch.Tensor) -> torch.Tensor:
        """(B, ...) per pair -> (U·K, ...), zeros (False) in unused slots."""
        return t.new_zeros((self.count, *t.shape[1:])).index_copy(0, self.slot, t)

    def to_pairs(self, t: torch.Tensor) -> torch.Tensor:
        """(U·K, ...) -> (B, ...) per pair."""
        return gather_rows(t, self.slot)


def pair_slots(image_rows: torch.Tensor, images: int, per_image: int) -> PairSlots | None:
    """The grouped layout of pairs whose image is `image_rows` (B,) among `images` rows, each image
    having at most `per_image` pairs (known on the host: FeatureBatch.most_pairs_per_image); None
    when its unused slots would exceed MAX_SLOT_PADDING × B (then gathering per pair is cheaper).
    Built on the rows' device without a host round-trip."""
    b = image_rows.shape[0]
    if b == 0 or images * per_image > MAX_SLOT_PADDING * b:
        return None
    order = torch.argsort(image_rows, stable=True)
    # index_add_, not bincount: CUDA's bincount reads the maximum back to the host
    counts = torch.zeros(images, dtype=image_rows.dtype, device=image_rows.device)
    counts.index_add_(0, image_rows, torch.ones_like(image_rows))
    first = counts.cumsum(0) - counts  # where each image's run starts in `order`
    rank = torch.empty_like(image_rows)
    rank[order] = torch.arange(b, device=image_rows.device) - first[image_rows[order]]
    return PairSlots(image_rows * per_image + rank, images, per_image)


def attend_per_slot(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Each image's tokens attend to each of its K pairs' keys separately: q (U, Tq, d) of the
    image, k/v (U·K, Tk, d) of the slots, key_mask (U·K, Tk) -> (U, K, Tq, d) equal to `attend`
    of the image's q with each slot's k, v (a keyless slot gets 0). The scores are one
    (Tq, K·Tk) product per image; the softmax runs per slot over its Tk keys."""
    U, Tq, d = q.shape
    S, Tk, _ = k.shape
    K = S // U
    key_mask = key_mask.view(U, K, Tk)
    has_key = key_mask.any(-1)  # (U, K)
    key_mask = key_mask | ~has_key[..., None]
    with torch.autocast(device_type=q.device.type, enabled=False):
        qf = q.to(torch.promote_types(q.dtype, torch.float32))
        scores = qf @ k.to(qf.dtype).reshape(U, K * Tk, d).transpose(1, 2) / math.sqrt(d)  # (U, Tq, K·Tk)
    scores = scores.view(U, Tq, K, Tk).masked_fill(~key_mask[:, None], float("-inf"))
    weights = scores.softmax(-1) * has_key[:, None, :, None]  # (U, Tq, K, Tk)
    weights = weights.transpose(1, 2).reshape(S, Tq, Tk).to(v.dtype)
    return (weights @ v).view(U, K, Tq, v.shape[-1])


@dataclass
class LayerStates:
    """One MoLT layer's outputs, pooled over real tokens (float32)."""

    image: torch.Tensor  # (B, d_c) H'_i,l
    text: torch.Tensor  # (B, d_c) H'_t,l
    image_proj: torch.Tensor  # (B, d_c) I'_l
    text_proj: torch.Tensor  # (B, d_c) T'_l


class MoltLayer(nn.Module):
    """One selected layer l: I'_l, T'_l -> cross-attention both ways -> H'_i,l, H'_t,l."""

    def __init__(self, image_width: int, text_width: int, d_common: int, cross_attention: bool = True):
        super().__init__()
        self.image_proj = nn.Linear(image_width, d_common)  # W_i, b_i
        self.text_proj = nn.Linear(text_width, d_common)  # W_t, b_t
        self.cross_attention = cross_attention
        if cross_attention:
            # image queries attend to text keys/values (H_i,l), and the reverse (H_t,l)
            self.image_query = nn.Linear(d_common, d_common)
            self.text_key = nn.Linear(d_common, d_common)
            self.text_value = nn.Linear(d_common, d_common)
            self.text_query = nn.Linear(d_common, d_common)
            self.image_key = nn.Linear(d_common, d_common)
            self.image_value = nn.Linear(d_common, d_common)
        self.image_norm = nn.LayerNorm(d_common)
        self.text_norm = nn.LayerNorm(d_common)

    def project(self, image: torch.Tensor, text: torch.Tensor,
                text_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """image (B, Ti, D_i,l), text (B, Tt, D_t,l) -> I'_l (B, Ti, d_c), T'_l (B, Tt, d_c).
        text_rows (`real_token_rows` of the text mask): W_t runs on the real tokens only and
        T'_l is 0 at padding (masked everywhere it is read)."""
        return self.image_proj(image), packed_linear(self.text_proj, text, text_rows)

    def interact(self, image_proj: torch.Tensor, image_mask: torch.Tensor,
                 text_proj: torch.Tensor, text_mask: torch.Tensor,
                 image_rows: torch.Tensor | None = None, slots: PairSlots | None = None) -> LayerStates:
        """I'_l, T'_l (already in the common space) -> pooled H'_i,l, H'_t,l, I'_l, T'_l, per pair.

        image_rows None: image_proj (B, Ti, d_c), image_mask (B, Ti), one row per pair.
        image_rows (B,) int64: image_proj (U, Ti, d_c) and image_mask (U, Ti) over the batch's
        distinct images, pair b's image at row image_rows[b]. What depends on the image alone
        (Q_i, K_i, V_i, the pooled I'_l, and LN(I'_l) without cross-attention) is computed once per
        distinct image and gathered to the pairs; the values equal the per-pair path's.
        slots (with image_rows): the same values computed in the grouped layout (PairSlots),
        without gathering any (B, Ti, d_c) tensor."""
        if slots is not None and self.cross_attention:
            return self._interact_slots(image_proj, image_mask, text_proj, text_mask, image_rows, slots)
        def pairs(t: torch.Tensor) -> torch.Tensor:
            return gather_rows(t, image_rows)

        image_mask_pairs = pairs(image_mask)
        if self.cross_attention:
            h_image = attend(pairs(self.image_query(image_proj)), self.text_key(text_proj),
                             self.text_value(text_proj), text_mask)  # (B, Ti, d_c) H_i,l
            h_text = attend(self.text_query(text_proj), pairs(self.image_key(image_proj)),
                            pairs(self.image_value(image_proj)), image_mask_pairs)  # (B, Tt, d_c) H_t,l
            image_state = masked_mean(self.image_norm(h_image + pairs(image_proj)), image_mask_pairs)
            text_common = self.text_norm(h_text + text_proj)
        else:  # ablation 'cross-attn': H'_l = LN(I'_l), an image-only quantity
            image_state = pairs(masked_mean(self.image_norm(image_proj), image_mask))
            text_common = self.text_norm(text_proj)
        return LayerStates(
            image=image_state,
            text=masked_mean(text_common, text_mask),
            image_proj=pairs(masked_mean(image_proj, image_mask)),
            text_proj=masked_mean(text_proj, text_mask),
        )

    def _interact_slots(self, image_proj: torch.Tensor, image_mask: torch.Tensor,
                        text_proj: torch.Tensor, text_mask: torch.Tensor,
                        image_rows: torch.Tensor, slots: PairSlots) -> LayerStates:
        U, Ti, d = image_proj.shape
        Tt = text_proj.shape[1]
        text_slots = slots.to_slots(text_proj)  # (S, Tt, d_c)
        mask_slots = slots.to_slots(text_mask)  # (S, Tt)
        # H_t,l: the K pairs' text tokens of image u attend to its tokens together
        h_text = attend(self.text_query(text_slots).view(U, slots.per_image * Tt, d),
                        self.image_key(image_proj), self.image_value(image_proj), image_mask)
        text_common = self.text_norm(h_text.view(slots.count, Tt, d) + text_slots)
        # H_i,l: the image's tokens attend to each pair's text, I'_l broadcast over the pairs
        h_image = attend_per_slot(self.image_query(image_proj), self.text_key(text_slots),
                                  self.text_value(text_slots), mask_slots)  # (U, K, Ti, d_c)
        image_common = self.image_norm(h_image + image_proj[:, None])
        image_state = masked_mean(image_common, image_mask[:, None]).view(slots.count, d)
        return LayerStates(
            image=slots.to_pairs(image_state),
            text=slots.to_pairs(masked_mean(text_common, mask_slots)),
            image_proj=gather_rows(masked_mean(image_proj, image_mask), image_rows),
            text_proj=masked_mean(text_proj, text_mask),
        )
