"""The batch that stage two's heads consume: what the cache reader yields and what robustness
perturbations transform. Token dims are padded per batch; masks mark real tokens.

Two image layouts. Per pair (`image_rows is None`): every image tensor has one row per pair.
Deduplicated (`image_rows` set, what the feature store serves): the image tensors hold one row
per *distinct* image of the batch (U ≤ B) and pair b's image is row `image_rows[b]`, so an image
shared by 18 pairs (SNLI-VE) is gathered and widened once; `per_pair()` expands to the first
layout for code that needs it."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass(frozen=True)
class MostPairs:
    """The most pairs any one image has in a deduplicated batch, counted on the host (the feature
    store does, with the batch's indices), for the `image_rows` tensor it was counted on. A
    perturbation that rebuilds image_rows leaves it stale; FeatureBatch ignores it then."""

    rows: torch.Tensor  # the image_rows it counts (identity, not value, is checked)
    most: int


@dataclass
class FeatureBatch:
    text_layers: list[torch.Tensor]  # L_s × (B, Tt, D_t,l), oldest selected layer first
    text_final: torch.Tensor  # (B, Tt, D_t)  E_t
    text_pooled: torch.Tensor  # (B, P_t)
    text_mask: torch.Tensor  # (B, Tt) bool, True = real token
    image_layers: list[torch.Tensor]  # L_s × (B, Ti, D_i,l); (U, Ti, D_i,l) when image_rows is set
    image_final: torch.Tensor  # (B, Ti, D_i)  E_i; (U, Ti, D_i)
    image_pooled: torch.Tensor  # (B, P_i); (U, P_i)
    image_mask: torch.Tensor  # (B, Ti) bool; (U, Ti)
    targets: torch.Tensor  # (B,) int64 for single-label; (B, C) float 0/1 for multi-label
    index: torch.Tensor  # (B,) int64 pair index within its split (seeds per-sample noise/missing)
    text_present: torch.Tensor  # (B,) bool; False = text absent (robustness / missing-rate)
    image_present: torch.Tensor  # (B,) bool, always per pair
    image_rows: torch.Tensor | None = None  # (B,) int64 row of each pair's image; None = per pair
    most_pairs: MostPairs | None = None  # host-side count for image_rows (see most_pairs_per_image)

    @classmethod
    def complete_pairs(cls, text: tuple, image: tuple, targets: torch.Tensor, index: torch.Tensor) -> "FeatureBatch":
        """A batch where every pair has both modalities; `text` and `image` are each
        (layers, final, pooled, mask). Perturbations set the presence flags later."""
        b = targets.shape[0]
        t_layers, t_final, t_pooled, t_mask = text
        i_layers, i_final, i_pooled, i_mask = image
        return cls(text_layers=t_layers, text_final=t_final, text_pooled=t_pooled, text_mask=t_mask,
                   image_layers=i_layers, image_final=i_final, image_pooled=i_pooled, image_mask=i_mask,
                   targets=targets, index=index, text_present=torch.ones(b, dtype=torch.bool),
                   image_present=torch.ones(b, dtype=torch.bool))

    @property
    def size(self) -> int:
        return self.targets.shape[0]

    def most_pairs_per_image(self) -> int:
        """The most pairs any one image has (1 per pair when image_rows is None). From the host
        count when it was made for this image_rows, else counted here (on a GPU: a host read)."""
        if self.image_rows is None:
            return 1
        if self.most_pairs is not None and self.most_pairs.rows is self.image_rows:
            return self.most_pairs.most
        if self.image_rows.numel() == 0:
            return 0
        return int(torch.bincount(self.image_rows).max())

    def per_pair(self) -> "FeatureBatch":
        """The same batch with one image row per pair (a gather; no-op when already per pair)."""
        if self.image_rows is None:
            return self
        rows = self.image_rows
        gathered: dict[int, torch.Tensor] = {}

        def g(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in gathered:  # keep image_final shared with image_layers[-1] if it was
                gathered[id(t)] = t.index_select(0, rows)
            return gathered[id(t)]

        return replace(self, image_layers=[g(t) for t in self.image_layers], image_final=g(self.image_final),
                       image_pooled=g(self.image_pooled), image_mask=g(self.image_mask), image_rows=None,
                       most_pairs=None)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "FeatureBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "FeatureBatch":
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn) -> "FeatureBatch":
        """fn applied once per distinct tensor: a tensor shared by two fields (text_final is
        text_layers[-1] when final_is_last_layer) stays shared after a move to CUDA, so it is
        copied once and perturbations that test `final is layers[-1]` act alike on every device."""
        done: dict[int, torch.Tensor] = {}

        def one(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in done:
                done[id(t)] = fn(t)
            return done[id(t)]

        def move(x):
            if x is None:
                return None
            if isinstance(x, MostPairs):  # its rows stay the same tensor as image_rows
                return MostPairs(one(x.rows), x.most)
            return [one(t) for t in x] if isinstance(x, list) else one(x)

        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)})
