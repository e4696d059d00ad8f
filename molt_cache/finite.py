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
- `check_block` / `scan_split` (train-heads' val and test splits, robustness' evaluated split): a
  cache written before these checks existed, or altered since, is refused before any work. The
  feature store checks each block as it loads it (no second read); a streamed split is read
  through once, block by block. The train split is left to `StepGuard`.

Advice follows the cache: a float16 cache extracted before the checks existed most likely
overflowed (re-extract in bfloat16 or float32); one extracted with them, or stored in bfloat16 /
float32, holds values the encoder produced or that were altered since (`molt cache verify`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch

NONFINITE_CHECK = "every batch, in the storage dtype, before writing"  # recorded in the manifest's extraction
DTYPE_ADVICE = "rerun with --dtype bfloat16 (fp32's range) or --dtype float32"
SHOWN = 5  # pairs / sample ids listed in a message; the rest are counted


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
               run_dir: Any, splits: list | None = None) -> None:
    """Stop training on a non-finite `loss`, a non-finite gradient of `params`, or an `error` the
    forward raised (e.g. `eigh` on NaN) when the batch's cached features are non-finite. Names the
    epoch, the step (1-based within the epoch), the batch's size and first pairs, and the pairs
    whose features are inf/NaN with the arrays holding them (and, given the training `splits`,
    the split, the sample ids and advice that fits the cache's dtype); the best checkpoint so far
    stays as saved. Returns when nothing is non-finite.
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
    bad = BadFeatures.of(batch)
    if error is not None and bad.pairs:
        what = f"cached features ({type(error).__name__} in the forward: {str(error)[:120]})"
    if what is None:
        return
    raise _stop_error(what, epoch, step, batch.index.tolist(), bad, best_epoch, run_dir, splits) from error


@dataclass
class BadFeatures:
    """The pairs of a batch whose cached features hold inf/NaN, and the arrays holding them."""

    pairs: list[int]  # pair indices within their split (FeatureBatch.index)
    arrays: list[tuple[str, str]]  # (modality, array name), in the cache's order

    @classmethod
    def of(cls, batch: Any) -> "BadFeatures":
        """Scan a batch (reads the device)."""
        return cls.from_masks(*nonfinite_array_masks(batch), batch.index)

    @classmethod
    def from_masks(cls, names: list[tuple[str, str]], masks: torch.Tensor, index: torch.Tensor) -> "BadFeatures":
        """From `nonfinite_array_masks`' (K, B) verdicts and the batch's pair ids (one device read)."""
        masks = masks.to(index.device)
        per_array = masks.any(1).tolist()
        return cls(index[masks.any(0)].tolist(), [n for n, bad in zip(names, per_array) if bad])


def _listed(values: list, shown: int = SHOWN) -> str:
    """'[55, 402, 7]' or '[55, 402, 7, 9, 11, …]' (at most `shown` values)."""
    head = ", ".join(map(str, values[:shown]))
    return f"[{head}, …]" if len(values) > shown else f"[{head}]"


def _stop_error(what: str, epoch: int, step: int, pairs: list[int], bad: BadFeatures | None,
                best_epoch: int, run_dir: Any, splits: list | None = None) -> NonFiniteError:
    """The error naming the step; bad None: the batch's features could not be re-checked.
    `splits`: the training splits the batch came from (names split, sample ids and the advice)."""
    kept = (f"the best checkpoint so far (epoch {best_epoch}) is left in {run_dir}" if best_epoch >= 0 else
            f"no epoch finished, so {run_dir} holds the initial heads")
    head = f"non-finite {what} at epoch {epoch}, step {step}; batch of {len(pairs)} pairs {_listed(pairs)}"
    if bad is None:
        cause = ("the cached features of this batch were not re-checked (the loader made other pairs when asked "
                 "for it again)")
    elif not bad.pairs:
        cause = "the cached features of this batch are finite (lower --lr, or train with --amp bf16 or off)"
    else:
        split = splits[0] if splits else None

        def stored(modality: str, name: str) -> bool:  # a perturbed batch may serve E_t apart from layer_{L-1}
            arrays = getattr(split, modality) if split is not None else None
            return not (name == "final" and arrays is not None and arrays.final is arrays.layers[-1])

        arrays = [(m, n) for m, n in bad.arrays if stored(m, n)] or bad.arrays
        prefix = f"{split.name}/" if split is not None else ""
        where = ", ".join(f"{prefix}{m}/{n}" for m, n in arrays[:4]) + (
            f" and {len(arrays) - 4} more arrays" if len(arrays) > 4 else "")
        if split is not None:
            where += f" of cache {split.reader.path}" if len(splits) == 1 else f" of one of the {len(splits)} caches"
        count = f"{len(bad.pairs)} pairs " if len(bad.pairs) > SHOWN else ""
        ids = _sample_ids(splits, bad.pairs[:SHOWN]) if splits else None
        samples = (f" (sample{'s' if len(ids) > 1 else ''} {', '.join(repr(i) for i in ids)}"
                   f"{', …' if len(bad.pairs) > SHOWN else ''})" if ids else "")
        advice = split_advice(split, arrays[0][0]) if split is not None and arrays else dtype_advice(None)
        cause = f"pairs with non-finite cached features: {count}{_listed(bad.pairs)}{samples} in {where}; {advice}"
    return NonFiniteError(f"{head}; {cause}; {kept}")


def _bad_rows(t: torch.Tensor) -> torch.Tensor:
    """(N,) bool on t's device: rows of t holding inf/NaN, without a (N, T, D) bool tensor."""
    flat = t.detach().reshape(t.shape[0], -1)
    if flat.shape[1] == 0:
        return torch.zeros(t.shape[0], dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(flat, dim=1)  # NaN propagates; ±inf shows in min or max; one pass
    return ~(torch.isfinite(lo) & torch.isfinite(hi))


def nonfinite_array_masks(batch: Any) -> tuple[list[tuple[str, str]], torch.Tensor]:
    """Which pairs' cached features hold inf/NaN, per feature array: the (modality, array name)
    of each distinct tensor of the batch (`final` is not repeated when it is `layer_{L-1}`'s
    tensor) and a (K, B) bool on the batch's device. Device work only (no host sync); a
    deduplicated batch is checked once per image and the verdict gathered to pairs."""
    names, masks, seen = [], [], set()
    device = batch.text_pooled.device
    for modality in ("text", "image"):
        layers = getattr(batch, f"{modality}_layers")
        named = [*((f"layer_{k}", t) for k, t in enumerate(layers)),
                 ("final", getattr(batch, f"{modality}_final")), ("pooled", getattr(batch, f"{modality}_pooled"))]
        for name, t in named:
            if id(t) in seen:
                continue
            seen.add(id(t))
            rows = _bad_rows(t)
            if modality == "image" and batch.image_rows is not None:
                rows = rows.index_select(0, batch.image_rows)
            names.append((modality, name))
            masks.append(rows.to(device))
    return names, torch.stack(masks)


def nonfinite_pair_mask(batch: Any) -> torch.Tensor:
    """(B,) bool on the batch's device: which pairs' cached features hold inf/NaN (no host sync)."""
    return nonfinite_array_masks(batch)[1].any(0)


def nonfinite_rows(batch: Any) -> list[int]:
    """Pair indices of a FeatureBatch whose cached features hold inf/NaN (reads the device)."""
    return BadFeatures.of(batch).pairs


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
    raises NonFiniteError naming the epoch, the step, the batch's size and first pairs and those
    with non-finite cached features (with their arrays; the split, sample ids and dtype advice
    when given the training `splits`), the same message as `check_step`. Steps after a non-finite one (until that
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
        features = rebuild if rebuild is not None else nonfinite_array_masks(batch)
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

    def readback(self, *, epoch: int, best_epoch: int, run_dir: Any, loss: torch.Tensor | None = None,
                 splits: list | None = None) -> float | None:
        """One device read: raise NonFiniteError for the first non-finite step since the last
        readback; else forget the pending steps and return `loss` as a float (read in the same
        transfer: the progress bar's value), or None. `splits`: the training splits (for the
        error's split, sample ids and advice)."""
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
                bad = BadFeatures.of(again) if again.index.tolist() == pairs else None
            else:
                bad = BadFeatures.from_masks(*features, index)
            raise _stop_error(what, epoch, step, pairs, bad, best_epoch, run_dir, splits)
        self.pending.clear()
        return value if loss is not None else None

    def readback_pending(self, **where) -> None:
        """Before reporting an error the forward raised: an earlier non-finite step is its cause."""
        if self.pending:
            self.readback(**where)


def _sample_ids(splits: list, pairs: list[int]) -> list[str] | None:
    """The cache's sample ids of `pairs` (pair indices within the split), read one by one; None
    when the training caches (several: mixed copies of one dataset) disagree or lack a pair."""
    from molt_cache.cache.integrity import read_checked

    ids = None
    for split in splits:
        if any(p >= split.num_pairs for p in pairs):
            return None
        try:
            arr = split.group["pairs/sample_id"]
            mine = [str(read_checked(arr, p, p + 1)[0]) for p in pairs]
        except Exception:  # noqa: BLE001 - an error message is being made: it must not fail itself
            return None
        if ids is not None and mine != ids:
            return None
        ids = mine
    return ids


def dtype_advice(stored_dtype: str | None, *, checked: bool = False, cache: Any = None) -> str:
    """What to do about inf/NaN in a cache stored as `stored_dtype` (None: unknown); `checked`:
    its extraction checked every batch (manifest extraction.nonfinite_check), so the values were
    not written by the extractor."""
    verify = f"`molt cache verify {cache}`" if cache is not None else "`molt cache verify CACHE`"
    if stored_dtype is None:
        return (f"a float16 cache most likely overflowed: re-extract it with --dtype bfloat16 or --dtype float32; "
                f"otherwise check the cache with {verify} and re-extract it")
    if checked:
        return (f"its extraction checked every batch for inf/NaN, so the cache was altered or damaged since: "
                f"check it with {verify} and re-extract it")
    if stored_dtype == "float16":
        return ("the cache is stored as float16, which overflows past 65504 (as LLaMA-family late blocks do): "
                "re-extract it with --dtype bfloat16 (fp32's range) or --dtype float32")
    return (f"the cache is stored as {stored_dtype}, so this is no float16 overflow: the encoder itself produced "
            f"inf/NaN, or the cache was altered or damaged after extraction; check it with {verify} and "
            "re-extract it")


def split_advice(split: Any, modality: str) -> str:
    """`dtype_advice` for one modality of one cache split."""
    extraction = split.reader.manifest.get("extraction") or {}
    return dtype_advice(getattr(split, modality).stored_dtype, checked=bool(extraction.get("nonfinite_check")),
                        cache=split.reader.path)


def _nonfinite(block: np.ndarray, stored_dtype: str) -> np.ndarray:
    """inf/NaN in a block as stored; a bfloat16 cache holds the raw bits as uint16."""
    if stored_dtype == "bfloat16" and block.dtype == np.uint16:
        return (block & 0x7F80) == 0x7F80  # all-ones exponent: inf or NaN
    return ~np.isfinite(block)


# 16-bit layouts: (magnitude mask, smallest inf/NaN magnitude): an all-ones exponent
_INF_BITS = {"float16": (0x7FFF, 0x7C00), "bfloat16": (0x7FFF, 0x7F80)}


def _all_finite(block: np.ndarray, stored_dtype: str) -> bool:
    """`not _nonfinite(block, stored_dtype).any()`, faster for 16-bit floats: the largest
    magnitude in the raw bits (inf and NaN have the largest), 3x numpy's float16 isfinite
    (measured ~17 vs 53 ms per 58 MiB); float32's isfinite is fast already."""
    key = "bfloat16" if stored_dtype == "bfloat16" and block.dtype == np.uint16 else block.dtype.name
    if key not in _INF_BITS or block.size == 0:
        return not _nonfinite(block, stored_dtype).any()
    mask, inf = _INF_BITS[key]
    return int((np.ascontiguousarray(block).view(np.uint16) & np.uint16(mask)).max()) < inf


def _whose_row(split: Any, modality: str, name: str, row: int) -> str:
    """'text item 0, used by pair 0, sample 'm00'': who owns stored row `row` of `modality/name`
    (token arrays: the item whose offsets span it; pooled: item `row`). Error path only: reads
    the split's offsets and pair table once."""
    from molt_cache.cache.integrity import read_checked

    arrays = getattr(split, modality)
    if name == "pooled":
        item = row
    else:
        offsets = read_checked(arrays.offsets)
        item = int(np.searchsorted(offsets, row, side="right")) - 1
    index = read_checked(split.text_index if modality == "text" else split.image_index)
    pairs = np.flatnonzero(index == item)
    if not len(pairs):
        return f"{modality} item {item}, used by no pair"
    first = int(pairs[0])
    ids = _sample_ids([split], [first])
    sample = f", sample {ids[0]!r}" if ids else ""
    used = f"used by pair {first}" if len(pairs) == 1 else f"used by {len(pairs)} pairs, the first pair {first}"
    return f"{modality} item {item}, {used}{sample}"


def check_block(split: Any, modality: str, name: str, lo: int, block: np.ndarray) -> None:
    """Raise NonFiniteError when `block` (rows lo.. of `modality/name` of `split`, as stored)
    holds inf/NaN, naming the cache, split, modality, array, first bad row, its item, pair and
    sample id, and advice that fits the cache's dtype. `scan_split` and the feature store (while
    loading a split whose features must be finite) both check through here."""
    stored_dtype = getattr(split, modality).stored_dtype
    if _all_finite(block, stored_dtype):  # the common case: one pass, no bool copy of the block
        return
    bad = _nonfinite(block, stored_dtype)
    per_row = bad.reshape(bad.shape[0], -1)
    r = int(np.flatnonzero(per_row.any(-1))[0])
    row = lo + r
    try:
        owner = _whose_row(split, modality, name, row)
    except Exception as e:  # noqa: BLE001 - the offsets / pair table unreadable: say so, keep the finding
        owner = f"its item not found: {type(e).__name__}"
    raise NonFiniteError(
        f"cache {split.reader.path} split {split.name!r} holds non-finite values (inf/NaN) in {modality}/{name}, "
        f"row {row} ({owner}; {int(per_row[r].sum())} of {per_row.shape[1]} values in the row); "
        f"refusing to evaluate on it: {split_advice(split, modality)}")


def block_rows(arr: Any, budget: int = 64 << 20) -> int:
    """Rows to read at once from a zarr array: whole inner chunks, about `budget` bytes."""
    chunk = max(1, int(arr.chunks[0]))
    row_bytes = max(1, int(np.prod(arr.shape[1:], dtype=np.int64)) * np.dtype(arr.dtype).itemsize)
    return chunk * max(1, budget // (chunk * row_bytes))


def feature_arrays(split: Any, modality: str) -> list[tuple[str, Any]]:
    """(name, zarr array) of every stored feature array of one modality of a split, in the
    cache's order: layer_0.., final when stored apart, pooled."""
    arrays = getattr(split, modality)
    return [(a.basename if hasattr(a, "basename") else str(a.path).rsplit("/", 1)[-1], a)
            for a in [*arrays.token_arrays, arrays.pooled]]


def scan_split(split: Any, chunk_rows: int | None = None) -> None:
    """Read every stored feature array of one cache split (a `CacheSplit`) block by block
    (`chunk_rows` rows, default about 64 MiB: memory stays flat) and raise NonFiniteError naming
    the cache, split, modality, array, first bad row and its sample (`check_block`)."""
    from molt_cache.cache.integrity import read_checked

    for modality in ("text", "image"):
        for name, arr in feature_arrays(split, modality):
            step = chunk_rows or block_rows(arr)
            for lo in range(0, arr.shape[0], step):
                check_block(split, modality, name, lo, read_checked(arr, lo, min(lo + step, arr.shape[0])))
