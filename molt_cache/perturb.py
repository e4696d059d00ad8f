"""Feature-level perturbations of a FeatureBatch (method.md, "Robustness").

Every random draw is seeded per sample from (seed, modality, pair index), never from the batch:
the same pair gets the same noise and the same missing modality whatever batch it lands in, in
every run and for every model compared.

They serve training (`--missing-rate`, `--train-noise`) and `molt robustness` alike. Batches from
the feature store hold each distinct image once (`FeatureBatch.image_rows`): image noise, drawn
per pair, first expands the batch to one image row per pair; a missing image adds a zeroed copy
of each affected image instead, so the other pairs sharing it keep theirs.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from molt_cache.batch import FeatureBatch

NOISE_ON = ("image", "text", "both")
MODALITIES = ("text", "image")
MISSING_TYPES = ("both", "text", "image")
# Feature-level strategies; "empty" is input level (a blank input through the frozen encoder) and
# lives in extraction, not here.
STRATEGIES = ("zero", "translate")
_MODALITY_CODE = {"text": 1, "image": 2}  # part of the per-sample seed
# Missing-aware prompting (Lee et al. 2023) splits the missing pairs of "both" in half.
BOTH_IMAGE_SHARE = 0.5
_KIND_NAMES = ("none", "text", "image")  # MissingTable codes 0, 1, 2


def _check(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {list(valid)}")


def _fields(modality: str) -> tuple[str, str, str, str, str]:
    return (f"{modality}_layers", f"{modality}_final", f"{modality}_pooled", f"{modality}_mask",
            f"{modality}_present")


def sample_generator(seed: int, modality: str, index: int) -> np.random.Generator:
    """The noise stream of one pair's modality; depends on nothing else."""
    return np.random.default_rng([int(seed), _MODALITY_CODE[modality], int(index)])


def _noised(x: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """x (n, D) or (D,) real values of one sample: x + N(0, (p·σ_x)²), σ_x over all of x."""
    sigma = float(np.std(x, dtype=np.float64)) if x.size else 0.0
    eps = rng.standard_normal(x.shape)  # float64
    return (x.astype(np.float64) + (p * sigma) * eps).astype(x.dtype)


def _noise_modality(batch: FeatureBatch, modality: str, p: float, seed: int) -> dict:
    layers_f, final_f, pooled_f, mask_f, _ = _fields(modality)
    layers = [t.detach().cpu().numpy().copy() for t in getattr(batch, layers_f)]
    final_t = getattr(batch, final_f)
    final_shared = final_t is getattr(batch, layers_f)[-1]  # final_is_last_layer: one array
    final = None if final_shared else final_t.detach().cpu().numpy().copy()
    pooled = getattr(batch, pooled_f).detach().cpu().numpy().copy()
    lengths = getattr(batch, mask_f).sum(dim=1).cpu().numpy()
    index = batch.index.cpu().numpy()
    for b in range(batch.size):
        n = int(lengths[b])
        # Real tokens are left-aligned (the loader pads at the end); padding stays untouched, so
        # the draw for a sample does not depend on the batch's padded length.
        rng = sample_generator(seed, modality, int(index[b]))
        for a in layers:
            a[b, :n] = _noised(a[b, :n], p, rng)
        if final is not None:
            final[b, :n] = _noised(final[b, :n], p, rng)
        pooled[b] = _noised(pooled[b], p, rng)
    device = final_t.device
    new_layers = [torch.from_numpy(a).to(device) for a in layers]
    return {layers_f: new_layers,
            final_f: new_layers[-1] if final_shared else torch.from_numpy(final).to(device),
            pooled_f: torch.from_numpy(pooled).to(device)}


def gaussian_noise(batch: FeatureBatch, p: float, on: str, seed: int) -> FeatureBatch:
    """x + ε, ε ~ N(0, (p·σ_x)²), σ_x the std of x per sample over its real tokens and features,
    for every cached array of the chosen modality (each layer, final, pooled)."""
    _check("noise modality", on, NOISE_ON)
    if p < 0:
        raise ValueError(f"noise level p must be >= 0, got {p}")
    if p == 0:
        return batch
    if on in ("image", "both"):
        batch = batch.per_pair()  # the noise differs per pair, so a shared image row cannot hold it
    changes = {}
    for modality in MODALITIES:
        if on in (modality, "both"):
            changes.update(_noise_modality(batch, modality, p, seed))
    return replace(batch, **changes)


def _drop(batch: FeatureBatch, modality: str, rows: torch.Tensor, strategy: str) -> FeatureBatch:
    """Mark `modality` absent for the samples where rows (B,) bool is True, and zero its features
    there (for "translate" too: the heads substitute, and nothing of the absent modality leaks)."""
    _check("missing strategy", strategy, STRATEGIES)
    if rows.device.type == "cpu" and not bool(rows.any()):
        return batch  # nothing to drop (asked only where it is free: on a GPU it would be a host sync)
    if modality == "image" and batch.image_rows is not None:
        return _drop_shared_images(batch, rows)
    layers_f, final_f, pooled_f, _, present_f = _fields(modality)
    keep = (~rows).to(getattr(batch, pooled_f).device)

    def zeroed(t: torch.Tensor) -> torch.Tensor:
        return t * keep.view(-1, *([1] * (t.dim() - 1))).to(t.dtype)

    old_layers = getattr(batch, layers_f)
    new_layers = [zeroed(t) for t in old_layers]
    old_final = getattr(batch, final_f)
    new_final = new_layers[-1] if old_final is old_layers[-1] else zeroed(old_final)
    present = getattr(batch, present_f) & keep.to(getattr(batch, present_f).device)
    return replace(batch, **{layers_f: new_layers, final_f: new_final,
                             pooled_f: zeroed(getattr(batch, pooled_f)), present_f: present})


def _drop_shared_images(batch: FeatureBatch, rows: torch.Tensor) -> FeatureBatch:
    """`_drop` of the image for a deduplicated batch: one image row per distinct (image, dropped)
    combination, the dropped copies zeroed (mask kept, as in the per-pair layout).

    On a GPU, `torch.unique` reads its size back (a host sync per such batch). Left so on
    purpose: the sync-free layout (every image twice, kept and zeroed: 2U rows) would double the
    heads' image-side work, most of a step's FLOPs at the paper's widths when images are not
    shared (by count, not measured on a GPU)."""
    device = batch.image_rows.device
    key = batch.image_rows * 2 + rows.to(device).long()  # (B,) image row, dropped?
    combos, new_rows = torch.unique(key, return_inverse=True)  # sorted: (U',)
    source, zero = combos // 2, (combos % 2).bool()

    def take(t: torch.Tensor) -> torch.Tensor:
        t = t.index_select(0, source)
        return t * (~zero).view(-1, *([1] * (t.dim() - 1))).to(t.dtype)

    layers = [take(t) for t in batch.image_layers]
    final = layers[-1] if batch.image_final is batch.image_layers[-1] else take(batch.image_final)
    return replace(batch, image_layers=layers, image_final=final, image_pooled=take(batch.image_pooled),
                   image_mask=batch.image_mask.index_select(0, source), image_rows=new_rows,
                   image_present=batch.image_present & ~rows.to(batch.image_present.device))


def missing(batch: FeatureBatch, which: str, strategy: str) -> FeatureBatch:
    """The whole batch without `which` ("text" | "image"): presence False, features zero; the
    mask is unchanged (it describes the stored tokens)."""
    _check("missing modality", which, MODALITIES)
    return _drop(batch, which, torch.ones(batch.size, dtype=torch.bool, device=batch.text_present.device), strategy)


@dataclass
class MissingTable:
    """Which modality each pair of a split lacks: 0 none, 1 text, 2 image, by pair index.

    Sampled once from the seed, as in missing-aware prompting (Lee et al., CVPR 2023): exactly
    floor(num_pairs · rate) pairs drawn without replacement lack a modality; for "both",
    floor(half) of those lack the image and the rest the text."""

    kinds: np.ndarray  # (num_pairs,) uint8
    # the table as a tensor, copied once per device it is applied on (the device path indexes it
    # there: no per-batch round trip of the pair ids)
    _on_device: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def sample(cls, num_pairs: int, rate: float, missing_type: str, seed: int) -> "MissingTable":
        _check("missing type", missing_type, MISSING_TYPES)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"missing rate must be in [0, 1], got {rate}")
        rng = np.random.default_rng([int(seed), 0x4D495353])  # own stream, apart from the noise
        kinds = np.zeros(num_pairs, np.uint8)
        chosen = rng.choice(num_pairs, size=int(num_pairs * rate), replace=False)
        if missing_type == "text":
            kinds[chosen] = 1
        elif missing_type == "image":
            kinds[chosen] = 2
        else:
            kinds[chosen] = 1
            kinds[rng.choice(chosen, size=int(len(chosen) * BOTH_IMAGE_SHARE), replace=False)] = 2
        return cls(kinds)

    def __len__(self) -> int:
        return len(self.kinds)

    def kind(self, index: int) -> str:
        return _KIND_NAMES[int(self.kinds[index])]

    def counts(self) -> dict[str, int]:
        return {name: int((self.kinds == code).sum()) for code, name in enumerate(_KIND_NAMES)}

    def on(self, device: torch.device) -> torch.Tensor:
        """The table as a (num_pairs,) uint8 tensor on `device` (copied there once)."""
        device = torch.device(device)
        if device not in self._on_device:
            self._on_device[device] = torch.from_numpy(self.kinds).to(device)
        return self._on_device[device]

    def apply(self, batch: FeatureBatch, strategy: str) -> FeatureBatch:
        """Drop each pair's modality per the table, where the batch lives. On the CPU the pair
        ids are checked against the table first (IndexError); on a GPU that check would read the
        device back every batch, and the out-of-range gather fails there instead (device assert).
        A deduplicated batch that loses some images needs `torch.unique` (a data-dependent size:
        one host sync on a GPU, see `_drop_shared_images`)."""
        index = batch.index
        if index.device.type == "cpu" and len(index) and int(index.max()) >= len(self.kinds):
            raise IndexError(f"pair index {int(index.max())} outside the missing table of "
                             f"{len(self.kinds)} pairs (sampled for another split?)")
        kinds = self.on(index.device).index_select(0, index)
        batch = _drop(batch, "text", kinds == 1, strategy)
        return _drop(batch, "image", kinds == 2, strategy)


def make_perturb(noise: float, noise_on: str, missing_table: MissingTable | None, strategy: str,
                 seed: int) -> Callable[[FeatureBatch], FeatureBatch] | None:
    """The loader's per-batch perturbation (missing modality first, then noise), or None when
    there is nothing to do. Arguments are checked here, before any batch is built."""
    _check("noise modality", noise_on, NOISE_ON)
    if missing_table is not None:
        _check("missing strategy", strategy, STRATEGIES)
    if noise < 0:
        raise ValueError(f"noise level must be >= 0, got {noise}")
    table = missing_table if missing_table is not None and missing_table.kinds.any() else None
    if noise == 0 and table is None:
        return None

    def perturb(batch: FeatureBatch) -> FeatureBatch:
        if table is not None:
            batch = table.apply(batch, strategy)
        return gaussian_noise(batch, noise, noise_on, seed)

    return perturb
