"""The fusion (method.md, 'Fusion and loss'): a one-token query Q_r attends to the final token
states of each modality, E_r,i = CA(Q_r, E_i), E_r,t = CA(Q_r, E_t), and the classifier reads
½·LayerNorm(E_r,i + E_r,t). The classifier is one Linear layer (after optional dropout)."""
from __future__ import annotations

import torch
from torch import nn

from molt_cache.heads.molt import PairSlots, attend, gather_rows, packed_linear


class Fusion(nn.Module):
    """query (B, Q) -> fused (B, d_c). One shared query projection (Q_r), keys and values of
    each modality projected from its own final width to d_c."""

    def __init__(self, query_width: int, image_width: int, text_width: int, d_common: int):
        super().__init__()
        self.query_proj = nn.Linear(query_width, d_common)
        self.image_key = nn.Linear(image_width, d_common)
        self.image_value = nn.Linear(image_width, d_common)
        self.text_key = nn.Linear(text_width, d_common)
        self.text_value = nn.Linear(text_width, d_common)
        self.norm = nn.LayerNorm(d_common)

    def forward(self, query: torch.Tensor, image_final: torch.Tensor, image_mask: torch.Tensor,
                text_final: torch.Tensor, text_mask: torch.Tensor,
                image_present: torch.Tensor | None = None,
                text_present: torch.Tensor | None = None,
                image_rows: torch.Tensor | None = None, slots: PairSlots | None = None,
                text_rows: torch.Tensor | None = None) -> torch.Tensor:
        """query (B, Q); E_i (B, Ti, D_i); E_t (B, Tt, D_t); masks True = real token.
        `*_present` (B,) bool, given only for the 'translate' strategy: an absent modality's
        E_r is replaced by the present one's, so the absent features never reach the output.
        image_rows (B,) int64: E_i and its mask hold the batch's distinct images (U, Ti, ...);
        the image keys/values are projected once per image and gathered to the pairs.
        slots (with image_rows): the same, the K pairs' queries of an image attending to its
        keys together (PairSlots) instead of gathering its keys/values per pair.
        text_rows (`real_token_rows` of text_mask): E_t's keys/values projected on real tokens only."""
        def pairs(t: torch.Tensor) -> torch.Tensor:
            return gather_rows(t, image_rows)

        q = self.query_proj(query)[:, None, :]  # (B, 1, d_c) Q_r
        if slots is not None:
            d = q.shape[-1]
            q_slots = slots.to_slots(q[:, 0]).view(slots.images, slots.per_image, d)
            e_image = slots.to_pairs(attend(q_slots, self.image_key(image_final), self.image_value(image_final),
                                            image_mask).view(slots.count, d))  # (B, d_c) E_r,i
        else:
            e_image = attend(q, pairs(self.image_key(image_final)), pairs(self.image_value(image_final)),
                             pairs(image_mask))[:, 0]  # (B, d_c) E_r,i
        e_text = attend(q, packed_linear(self.text_key, text_final, text_rows),
                        packed_linear(self.text_value, text_final, text_rows),
                        text_mask)[:, 0]  # (B, d_c) E_r,t
        if text_present is not None and image_present is not None:
            e_text_in = e_text
            e_text = torch.where(text_present[:, None], e_text, e_image)
            e_image = torch.where(image_present[:, None], e_image, e_text_in)
        return 0.5 * self.norm(e_image + e_text)
