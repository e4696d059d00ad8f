"""Non-finite values (inf, NaN) are never cached and never trained on.

fp16 is the CUDA default for extraction, and LLaMA-family models are known to overflow fp16 in
late blocks (activations past 65504 become inf, then NaN through the norms). Such a state is
useless for every later stage: MoLT's CCA fails in `eigh`, a baseline trains on NaN and still
reports an accuracy. So:

- `check_batch` (stage one): every batch's stored arrays, real tokens only, in the storage dtype
  (a float32 value can still overflow float16 storage), before anything is written; the error
  names the modality, array and item, and `extract` adds the split and sample id.
- `check_step` (train-heads): the loss, and the gradients when no fp16 GradScaler is active (with
  one, an inf gradient is the scaler's signal to skip a step and lower its scale).
- `scan_split` (robustness): a cache written before these checks existed is read through once.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch

NONFINITE_CHECK = "every batch, in the storage dtype, before writing"  # recorded in the manifest's extraction
DTYPE_ADVICE = "rerun with --dtype bfloat16 (fp32's range) or --dtype float32"


class NonFiniteError(ValueError):
    """inf or NaN where features or losses must be finite; the message says where and what to do."""


class NonFiniteFeatureError(NonFiniteError):
    """Raised by `check_batch`; `extract` fills `split` and `sample_id` before it reaches the user."""

    def __init__(self, modality: str, item: int, array: str, dtype: str, count: int):
        self.modality, self.item, self.array, self.dtype, self.count = modality, item, array, dtype, count
        self.split: str | None = None
        self.sample_id: str | None = None
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"split {self.split!r}, " if self.split else ""
        who = f"sample {self.sample_id!r} ({self.modality} item {self.item})" if self.sample_id is not None \
            else f"{self.modality} item {self.item}"
        return (f"non-finite values (inf/NaN) in {where}{who}, {self.modality} array {self.array!r} "
                f"({self.count} values, stored as {self.dtype}): the encoder overflowed; {DTYPE_ADVICE}. "
                "Nothing of this work unit was recorded as done")

    def name_sample(self, plans: Iterable[Any]) -> "NonFiniteFeatureError":
        """Fill the sample id (the first pair using the item) from the extraction's split plans."""
        for p in plans:
            if p.split == self.split:
                index = p.text_index if self.modality == "text" else p.image_index
                hits = np.flatnonzero(np.asarray(index) == self.item)
                if len(hits):
                    self.sample_id = p.sample_ids[int(hits[0])]
        self.args = (self._message(),)
        return self


def check_batch(modality: str, batch: list[int], mask: torch.Tensor, arrays: dict[str, torch.Tensor],
                pooled: torch.Tensor, storage_dtype: str) -> None:
    """Raise NonFiniteFeatureError for the first (array, item) holding inf/NaN.

    arrays: name -> (B, T, D) states; only rows where `mask` (B, T) is True are stored and checked.
    pooled: (B, P). Values are checked after the cast to `storage_dtype` (float16 | bfloat16 |
    float32), so an fp32 value that overflows fp16 storage is caught too."""
    dtype = getattr(torch, storage_dtype)
    mask = mask.to(torch.bool)
    for name, t in [*arrays.items(), ("pooled", pooled)]:
        bad = ~torch.isfinite(t.detach().to(dtype))
        per_item = bad.flatten(2).any(-1) & mask.to(bad.device) if bad.dim() == 3 else bad.any(-1)
        if bool(per_item.any()):
            i = int(torch.nonzero(per_item)[0][0])
            count = int(bad[i][mask[i].to(bad.device)].sum()) if bad.dim() == 3 else int(bad[i].sum())
            raise NonFiniteFeatureError(modality, int(batch[i]), name, storage_dtype, count)


def check_step(*, loss: torch.Tensor | None = None, params: list[torch.nn.Parameter] | None = None,
               error: BaseException | None = None, epoch: int, step: int, batch: Any, best_epoch: int,
               run_dir: Any) -> None:
    """Stop training on a non-finite `loss`, a non-finite gradient of `params`, or an `error` the
    forward raised (e.g. `eigh` on NaN) when the batch's cached features are non-finite. Names the
    epoch, the step (1-based within the epoch), the pairs of the batch and those whose features are
    inf/NaN; the best checkpoint so far stays as saved. Returns when nothing is non-finite."""
    what = None
    if loss is not None and not bool(torch.isfinite(loss.detach()).all()):
        what = f"loss ({float(loss.detach())})"
    grads = [p.grad for p in params or [] if p.grad is not None]
    if grads:
        finite = torch.stack([torch.isfinite(g).all() for g in grads])  # one device sync, not one per tensor
        if not bool(finite.all()):
            what = f"gradient ({int((~finite).sum())} of {len(grads)} parameter tensors)"
    if what is None and error is None:
        return  # the common path: one check of the loss (and of the gradients), no feature scan
    nonfinite_pairs = nonfinite_rows(batch)
    if error is not None and nonfinite_pairs:
        what = f"cached features ({type(error).__name__} in the forward: {str(error)[:120]})"
    if what is None:
        return
    pairs = batch.index.tolist()
    kept = (f"the best checkpoint so far (epoch {best_epoch}) is left in {run_dir}" if best_epoch >= 0 else
            f"no epoch finished, so {run_dir} holds the initial heads")
    cause = (f"pairs with non-finite cached features: {nonfinite_pairs} (re-extract the cache with "
             f"--dtype bfloat16 or --dtype float32)" if nonfinite_pairs else
             "the cached features of this batch are finite (lower --lr, or train with --amp bf16 or off)")
    raise NonFiniteError(f"non-finite {what} at epoch {epoch}, step {step}; batch pairs {pairs}; {cause}; {kept}") \
        from error


def nonfinite_rows(batch: Any) -> list[int]:
    """Pair indices of a FeatureBatch whose cached features hold inf/NaN."""
    batch = batch.per_pair()  # the feature store's batches hold each image once: one row per pair here
    feats = [*batch.text_layers, batch.text_final, batch.text_pooled, *batch.image_layers, batch.image_final,
             batch.image_pooled]
    rows = torch.zeros(batch.size, dtype=torch.bool)
    for t in feats:
        rows |= (~torch.isfinite(t.detach().float())).reshape(t.shape[0], -1).any(-1).cpu()
    return batch.index.cpu()[rows].tolist()


def scan_split(split: Any, chunk_rows: int = 65536) -> None:
    """Read every stored feature array of one cache split (a `CacheSplit`) and raise
    NonFiniteError naming the cache, split, modality, array and first bad row."""
    from molt_cache.cache.integrity import read_checked

    for modality in ("text", "image"):
        arrays = getattr(split, modality)
        named = [(a.basename if hasattr(a, "basename") else str(a.path).rsplit("/", 1)[-1], a)
                 for a in [*arrays.token_arrays, arrays.pooled]]
        for name, arr in named:
            for lo in range(0, arr.shape[0], chunk_rows):
                block = read_checked(arr, lo, min(lo + chunk_rows, arr.shape[0]))  # damage named too
                if arrays.stored_dtype == "bfloat16" and block.dtype == np.uint16:
                    bad = (block & 0x7F80) == 0x7F80  # all-ones exponent: inf or NaN
                else:
                    bad = ~np.isfinite(block)
                if bad.any():
                    row = lo + int(np.flatnonzero(bad.reshape(bad.shape[0], -1).any(-1))[0])
                    raise NonFiniteError(
                        f"cache {split.reader.path} split {split.name!r} holds non-finite values (inf/NaN) in "
                        f"{modality}/{name}, row {row} ({int(bad.sum())} values in rows {lo}..{lo + len(block) - 1}); "
                        f"refusing to evaluate on it: re-extract with --dtype bfloat16 or --dtype float32")
