"""Non-finite values (inf, NaN) are never cached and never trained on.

fp16 is the CUDA default for extraction, and LLaMA-family models are known to overflow fp16 in
late blocks (activations past 65504 become inf, then NaN through the norms). Such a state is
useless for every later stage: MoLT's CCA fails in `eigh`, a baseline trains on NaN and still
reports an accuracy. So:

- `check_batch` (stage one): every batch's stored arrays, real tokens only, in the storage dtype
  (a float32 value can still overflow float16 storage), before anything is written; the error
  names the modality, array and item, and `extract` adds the split and sample id.
- `StepGuard` (train-heads): the loss, and the gradients when no fp16 GradScaler is active (with
  one, an inf gradient is the scaler's signal to skip a step and lower its scale), checked on the
  device every step; a non-finite step leaves the heads and the optimizer state as they were (the
  update is masked on the device), and the host reads the verdict back only every few steps and at
  the epoch's end, before anything is evaluated or saved: no host sync per step on a GPU.
  `check_step` raises the same error at once (the forward's own errors, e.g. `eigh` on NaN).
- `scan_split` (robustness): a cache written before these checks existed is read through once.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

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
    inf/NaN; the best checkpoint so far stays as saved. Returns when nothing is non-finite.
    Reads the device at once (a host sync): the training loop uses `StepGuard` instead and calls
    this only when the forward raised."""
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
    raise _stop_error(what, epoch, step, batch.index.tolist(), nonfinite_pairs, best_epoch, run_dir) from error


def _stop_error(what: str, epoch: int, step: int, pairs: list[int], nonfinite_pairs: list[int] | None,
                best_epoch: int, run_dir: Any) -> NonFiniteError:
    """The error naming the step; nonfinite_pairs None: the batch's features could not be re-checked."""
    kept = (f"the best checkpoint so far (epoch {best_epoch}) is left in {run_dir}" if best_epoch >= 0 else
            f"no epoch finished, so {run_dir} holds the initial heads")
    cause = ("the cached features of this batch were not re-checked (the loader made other pairs when asked "
             "for it again)" if nonfinite_pairs is None else
             f"pairs with non-finite cached features: {nonfinite_pairs} (re-extract the cache with "
             f"--dtype bfloat16 or --dtype float32)" if nonfinite_pairs else
             "the cached features of this batch are finite (lower --lr, or train with --amp bf16 or off)")
    return NonFiniteError(f"non-finite {what} at epoch {epoch}, step {step}; batch pairs {pairs}; {cause}; {kept}")


def nonfinite_pair_mask(batch: Any) -> torch.Tensor:
    """(B,) bool on the batch's device: which pairs' cached features hold inf/NaN. Device work only
    (no host sync); a deduplicated batch is checked once per image and the verdict gathered to pairs."""
    def bad_rows(t: torch.Tensor) -> torch.Tensor:
        flat = t.detach().reshape(t.shape[0], -1)
        if flat.shape[1] == 0:
            return torch.zeros(t.shape[0], dtype=torch.bool, device=t.device)
        lo, hi = torch.aminmax(flat, dim=1)  # NaN propagates; ±inf shows in min or max; one pass, no (B, T, D) bool
        return ~(torch.isfinite(lo) & torch.isfinite(hi))

    text = [*batch.text_layers, batch.text_final, batch.text_pooled]
    image = [*batch.image_layers, batch.image_final, batch.image_pooled]
    rows = torch.stack([bad_rows(t) for t in {id(t): t for t in text}.values()]).any(0)
    image_bad = torch.stack([bad_rows(t) for t in {id(t): t for t in image}.values()]).any(0)
    if batch.image_rows is not None:
        image_bad = image_bad.index_select(0, batch.image_rows)
    return rows | image_bad.to(rows.device)


def nonfinite_rows(batch: Any) -> list[int]:
    """Pair indices of a FeatureBatch whose cached features hold inf/NaN (reads the device)."""
    return batch.index[nonfinite_pair_mask(batch).to(batch.index.device)].tolist()


class StepGuard:
    """The optimizer step of `train-heads`, never taken on a non-finite loss or gradient, without a
    host sync per step (issue 13: a GPU must not wait for the host every step).

    Each step: the loss (and, without an fp16 GradScaler, every gradient) is checked on the device;
    the Adam update is computed as usual and then kept only where that flag is true (`torch.where`
    on the parameters and the optimizer's moment tensors), so a finite step is bit for bit the
    plain `optimizer.step()` and a non-finite one changes nothing on the device. With an fp16
    scaler, the scaler skips steps with inf/NaN gradients itself (torch's GradScaler reads its
    flag back for a non-fused optimizer: that sync is torch's, see docs/heads.md).

    The first non-finite step of the epoch is recorded on the device; `readback` (every LOG_EVERY
    steps and at the epoch's end, before evaluating or saving) reads it with one transfer and
    raises NonFiniteError naming the epoch, the step, the batch's pairs and those with non-finite
    cached features, the same message as `check_step`. Steps after a non-finite one (until that
    readback) train on from the unchanged heads; Adam's host-side step count still advances, which
    is moot since the run stops there. What is kept per pending step: the batch's pair ids, the
    loss and the count of bad gradients (small device tensors), and `rebuild`, a callable that
    makes the batch again (the loaders' `batch_at`): its features are scanned only when the step
    failed. Without `rebuild` the features are scanned every step on the device (one read of the
    batch: up to a third of a light step on the CPU, docs/benchmarks.md)."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], *, check_grads: bool,
                 device: torch.device):
        self.optimizer, self.params, self.check_grads, self.device = optimizer, params, check_grads, device
        self.first_bad = torch.zeros((), dtype=torch.int64, device=device)  # step number, 0 = none yet
        self.pending: dict[int, tuple] = {}  # step -> (loss, bad gradient tensors, grad tensors, pairs, bad pairs)

    def step(self, scaler: torch.amp.GradScaler, loss: torch.Tensor, batch: Any, step: int,
             rebuild: Callable[[], Any] | None = None) -> None:
        """After `scaler.scale(loss).backward()`: check, record, and step (or not) on the device."""
        loss = loss.detach()
        ok = torch.isfinite(loss)
        grads = [p.grad for p in self.params if p.grad is not None]
        bad_grads = torch.zeros((), dtype=torch.int64, device=loss.device)
        if self.check_grads and grads:
            bad_grads = (~torch.stack([torch.isfinite(g).all() for g in grads])).sum()
            ok = ok & (bad_grads == 0)
        self.first_bad = torch.where((self.first_bad == 0) & ~ok, step, self.first_bad)
        features = rebuild if rebuild is not None else nonfinite_pair_mask(batch)
        self.pending[step] = (loss, bad_grads, len(grads), batch.index, features)
        if scaler.is_enabled():
            scaler.step(self.optimizer)  # skips non-finite gradients itself
        else:
            self._masked_step(ok)

    def _masked_step(self, ok: torch.Tensor) -> None:
        # what the update may change: the parameters with a gradient and their moment tensors
        # (Adam's `step` count lives on the host for a non-capturable optimizer: not masked)
        live = [p for p in self.params if p.grad is not None]
        before = [(p, p.detach().clone()) for p in live]
        before += [(v, v.clone()) for p in live for k, v in self.optimizer.state.get(p, {}).items()
                   if k != "step" and torch.is_tensor(v) and v.is_floating_point()]
        known = {id(t) for t, _ in before}
        self.optimizer.step()
        with torch.no_grad():
            for t, old in before:
                t.copy_(torch.where(ok, t, old))
            for p in live:  # moments created by this step (the first one): as Adam initialises them, zeros
                for k, v in self.optimizer.state.get(p, {}).items():
                    if k != "step" and torch.is_tensor(v) and v.is_floating_point() and id(v) not in known:
                        v.copy_(torch.where(ok, v, torch.zeros_like(v)))

    def readback(self, *, epoch: int, best_epoch: int, run_dir: Any, loss: torch.Tensor | None = None) -> float | None:
        """One device read: raise NonFiniteError for the first non-finite step since the last
        readback; else forget the pending steps and return `loss` as a float (read in the same
        transfer: the progress bar's value), or None."""
        if not self.pending and loss is None:
            return None
        values = torch.stack([self.first_bad.double(), (loss if loss is not None else self.first_bad).detach().double()])
        first, value = values.tolist()
        if first:
            step = int(first)
            step_loss, bad_grads, n_grads, index, features = self.pending[step]
            if not bool(torch.isfinite(step_loss)):
                what = f"loss ({float(step_loss)})"
            else:
                what = f"gradient ({int(bad_grads)} of {n_grads} parameter tensors)"
            pairs = index.tolist()
            if callable(features):  # the failed step's batch, made again
                again = features()
                bad = nonfinite_rows(again) if again.index.tolist() == pairs else None
            else:
                bad = index[features.to(index.device)].tolist()
            raise _stop_error(what, epoch, step, pairs, bad, best_epoch, run_dir)
        self.pending.clear()
        return value if loss is not None else None

    def readback_pending(self, **where) -> None:
        """Before reporting an error the forward raised: an earlier non-finite step is its cause."""
        if self.pending:
            self.readback(**where)


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
