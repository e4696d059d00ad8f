"""The feature store: a cache's splits held once, in the stored dtype, where training runs.

Why. The streaming and in-memory loaders (loader.py) widen every pair's token rows to float32 on
the host and copy them once per pair: an image shared by 18 pairs (SNLI-VE) is copied 18 times,
and everything crosses to a GPU in float32 (6.4 MiB per pair at the paper's widths). The store
instead loads each array once and assembles a batch by index gathers where the features live:

  device  every array in device memory (GPU, or RAM when training on the CPU); per batch only the
          index vector crosses from the host (a few int64 per pair).
  host    every array in (pinned) host RAM; per batch the real token rows of the batch's texts and
          of its *distinct* images cross in the stored dtype, padding is added on the device.
  mixed   (auto only, on a GPU) images on the device — deduplicated they are the small part —
          and texts on the host: what crosses per pair is the text's stored rows.
  stream  today's streaming loader (`make_loader`), for caches larger than host memory.

A batch is widened to float32 on the device and carries each distinct image once
(`FeatureBatch.image_rows`), which the heads use to run image-side work once per image.
`bytes_to_device` counts what would cross from host to device whatever the device (on the CPU
nothing moves, but the count is the one a GPU would see).

Order: the same functions as the loaders (`epoch_order`, `grouped_order`), so for a seed the
store and the loaders serve the same pairs in the same batches with the same values.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from molt_cache.batch import FeatureBatch, MostPairs
from molt_cache.cache import loader as _loader
from molt_cache.cache.integrity import read_checked
from molt_cache.cache.reader import CacheSplit, ModalityArrays

PLACEMENTS = ("auto", "device", "host", "stream")
# Share of the free device memory the store may take (the heads' activations need the rest).
DEVICE_MEMORY_SHARE = 0.6


@dataclass(frozen=True)
class Placement:
    """Where each modality's arrays live: 'device' | 'host' | 'stream' (both, then)."""

    text: str
    image: str

    @property
    def name(self) -> str:
        if self.text == self.image:
            return self.text
        return f"mixed (text {self.text}, image {self.image})"


def modality_bytes(arrays: ModalityArrays) -> int:
    """Stored bytes of one modality of one split: token arrays (final once when it is the last
    layer), pooled, offsets."""
    return (sum(math.prod(a.shape) * a.dtype.itemsize for a in [*arrays.token_arrays, arrays.pooled])
            + arrays.offsets.shape[0] * 8)


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * DEVICE_MEMORY_SHARE)
    return int(_loader.available_memory_bytes() * _loader.IN_MEMORY_RAM_SHARE)


def _where(device: torch.device, place: str) -> str:
    if place == "device":
        return f"{device} memory" if device.type == "cuda" else "RAM (the training device is the CPU)"
    return "pinned host RAM" if device.type == "cuda" else "RAM"


def _size(n: float) -> str:
    """Bytes for a person: GiB from 1 GiB, else MiB (else KiB), so a small cache does not read as
    0.00 GiB."""
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 2 ** 10:.1f} KiB"


def choose_placement(splits: list[CacheSplit], store: str, device: torch.device) -> tuple[Placement, str]:
    """The placement for `--store` (auto: the fastest that fits) and a line saying what it needs.

    Raises MemoryError naming the GiB needed and available when an explicit choice does not fit."""
    if store not in PLACEMENTS:
        raise ValueError(f"unknown store {store!r}; valid: {list(PLACEMENTS)}")
    unique = list({id(s): s for s in splits}.values())
    text = sum(modality_bytes(s.text) for s in unique)
    image = sum(modality_bytes(s.image) for s in unique)
    dev_free = _free_bytes(device)
    host_free = _free_bytes(torch.device("cpu"))
    if store == "stream":
        return Placement("stream", "stream"), (
            f"feature store: stream; streaming from disk ({_size(text + image)} stored)")
    on_gpu = device.type == "cuda"
    candidates = [("device", Placement("device", "device"), text + image, 0)]
    if on_gpu:
        candidates.append(("auto", Placement("host", "device"), image, text))
    candidates.append(("host", Placement("host", "host"), 0, text + image))
    for kind, placement, dev_need, host_need in candidates:
        if store not in ("auto", kind):
            continue
        # on the CPU, device and host are one memory
        fits = (dev_need + host_need <= host_free) if not on_gpu else (
            dev_need <= dev_free and host_need <= host_free)
        if fits:
            line = (f"feature store: {placement.name}; text {_size(text)} in "
                    f"{_where(device, placement.text)}, image {_size(image)} in "
                    f"{_where(device, placement.image)}")
            return placement, line
        if store != "auto":
            where = _where(device, kind)
            have = dev_free if kind == "device" and on_gpu else host_free
            raise MemoryError(
                f"--store {store}: the feature store needs {_size(text + image)} "
                f"(text {_size(text)}, image {_size(image)}) in {where} but only "
                f"{_size(have)} may be used; use --store auto, host or stream")
    return Placement("stream", "stream"), (
        f"feature store: stream (text {_size(text)} + image {_size(image)} fit neither "
        f"{device} ({_size(dev_free)} usable) nor host RAM ({_size(host_free)} usable))")


# -- arrays held once -----------------------------------------------------------------------------

def _load_array(arrays: list, dtype: str, rows: int, width: int, device: torch.device,
                pin: bool, check: Callable[[int, int, np.ndarray], None] | None = None) -> torch.Tensor:
    """Concatenate the rows of one array of several splits into one tensor of `rows` + 1 rows in
    the stored dtype; the extra last row stays zero (padding gathers point at it). Filled chunk by
    chunk, so the host never holds a second full copy. `check(k, start, part)`: called on every
    part read (rows start.. of the k-th split's array, as stored), before it is kept."""
    raw = np.dtype(arrays[0].dtype)
    bf16_bits = dtype == "bfloat16" and raw == np.uint16  # numpy has no bfloat16: the raw 16 bits
    tdtype = torch.bfloat16 if bf16_bits else torch.from_numpy(np.zeros(0, raw)).dtype
    out = torch.empty((rows + 1, width), dtype=tdtype, device=device,
                      pin_memory=pin and device.type == "cpu")
    out[rows].zero_()
    lo = 0
    for k, a in enumerate(arrays):
        step = max(1, int(a.chunks[0]) * max(1, (64 << 20) // max(1, int(a.chunks[0]) * width * 2)))
        for start in range(0, a.shape[0], step):
            part = read_checked(a, start, min(start + step, a.shape[0]))  # damage named
            if check is not None:
                check(k, start, part)
            if bf16_bits:
                t = torch.from_numpy(part.view(np.int16)).view(torch.bfloat16)
            else:
                t = torch.from_numpy(part)
            out[lo + start:lo + start + len(part)].copy_(t)
        lo += a.shape[0]
    return out


class _Modality:
    """One modality of the store's splits, concatenated: token arrays, pooled, offsets."""

    def __init__(self, arrays: list[ModalityArrays], place: str, device: torch.device,
                 check: Callable[[int, str, int, np.ndarray], None] | None = None):
        """check(k, name, start, part): see `_load_array` (name: layer_0.., final, pooled)."""
        self.place = place
        self.home = device if place == "device" else torch.device("cpu")
        pin = place == "host" and device.type == "cuda"
        first = arrays[0]
        self.dtype = first.stored_dtype
        offsets, bases, row, items = [], [], 0, 0
        for a in arrays:
            o = read_checked(a.offsets).astype(np.int64, copy=False)
            offsets.append(o[:-1] + row)
            bases.append(items)
            row, items = row + int(o[-1]), items + len(o) - 1
        self.offsets = np.concatenate([*offsets, [row]]).astype(np.int64)  # (N + 1,) host
        self.items_base = bases  # first item id of each split
        self.tokens = row
        final_shared = first.final is first.layers[-1]

        def named(name: str):
            return None if check is None else (lambda k, start, part: check(k, name, start, part))

        self.layers = [_load_array([a.layers[k] for a in arrays], self.dtype, row,
                                   int(first.layers[k].shape[1]), self.home, pin, named(f"layer_{k}"))
                       for k in range(len(first.layers))]
        self.final = self.layers[-1] if final_shared else _load_array(
            [a.final for a in arrays], self.dtype, row, int(first.final.shape[1]), self.home, pin, named("final"))
        n_items = len(self.offsets) - 1
        self.pooled = _load_array([a.pooled for a in arrays], self.dtype, n_items,
                                  int(first.pooled.shape[1]), self.home, pin, named("pooled"))

    @property
    def token_arrays(self) -> list[torch.Tensor]:
        return self.layers if self.final is self.layers[-1] else [*self.layers, self.final]

    def row_bytes(self) -> int:
        """Stored bytes of one token row over all token arrays."""
        return sum(t.shape[1] * t.element_size() for t in self.token_arrays)


def _storage_users(t: torch.Tensor) -> int:
    """Tensors (views, autograd's saved copies of them, numpy arrays over them) holding t's
    storage, not counting t itself."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata) - 2  # t, and the Python storage


class BufferPool:
    """Batch buffers reused on a CPU training device. A fresh float32 tensor of a batch's tokens
    costs more in page faults than widening into it (13 MB per text layer at the `cpu` preset:
    ~2 ms fresh vs ~1.2 ms reused), every batch. A buffer is handed out again only when nothing
    but the pool holds its storage: a batch still in use, prefetched, or saved by autograd for
    backward keeps a view of it, so it is never overwritten. Thread-safe (prefetch threads)."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes  # kept beyond one batch's use; more is allocated unpooled
        self._buffers: dict[torch.dtype, list[torch.Tensor]] = {}  # per dtype, smallest first
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for bufs in self._buffers.values() for b in bufs)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of `shape`: a view of the smallest free pooled buffer that
        holds it, or of a new one (pooled while the pool stays under max_bytes)."""
        numel = math.prod(shape)
        with self._lock:
            buffers = self._buffers.setdefault(dtype, [])
            for b in buffers:
                if b.numel() >= numel and _storage_users(b) == 0:
                    return b[:numel].view(shape)
            buf = torch.empty(numel + numel // 4, dtype=dtype)  # room for a longer batch
            held = self.nbytes
            for bufs in self._buffers.values():  # make room: drop free buffers, smallest first
                for b in [b for b in bufs if _storage_users(b) == 0]:
                    if held + buf.nbytes <= self.max_bytes:
                        break
                    bufs.remove(b)
                    held -= b.nbytes
            if held + buf.nbytes <= self.max_bytes:
                buffers.append(buf)
                buffers.sort(key=torch.Tensor.numel)
            return buf[:numel].view(shape)


def _padded_index(starts: torch.Tensor, lengths: torch.Tensor, T: int, pad_row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat row index (B·T,) of a padded (B, T) gather, padding pointing at `pad_row` (a zero row),
    and the mask (B, T), built on the device from B starts and lengths."""
    pos = torch.arange(T, device=starts.device)
    mask = pos[None, :] < lengths[:, None]
    idx = torch.where(mask, starts[:, None] + pos[None, :], pad_row)
    return idx.reshape(-1), mask


class FeatureStore:
    """The arrays of one or more splits (concatenated, as `--cache A --cache B` trains on), held
    once per `placement` on `device`. `batches()` makes an epoch's loader.

    check_finite: refuse inf/NaN while loading (molt_cache.finite.check_block on every part read:
    no second read of the split), for the splits that are only evaluated (val, test); the train
    split's are caught per step by training's StepGuard."""

    def __init__(self, splits: list[CacheSplit], placement: Placement, device: torch.device, *,
                 check_finite: bool = False):
        if not splits:
            raise ValueError("FeatureStore needs at least one split")
        if "stream" in (placement.text, placement.image):
            raise ValueError("a streaming placement has no store: use make_batches(store='stream')")
        _loader._check_same_shapes(splits)
        self.splits, self.placement, self.device = splits, placement, torch.device(device)
        self.multi_label = splits[0].multi_label

        def check(modality: str):
            if not check_finite:
                return None
            from molt_cache.finite import check_block

            return lambda k, name, start, part: check_block(splits[k], modality, name, start, part)

        self.text = _Modality([s.text for s in splits], placement.text, self.device, check("text"))
        self.image = _Modality([s.image for s in splits], placement.image, self.device, check("image"))
        tables = [_loader._pair_tables(s) for s in splits]
        self.pair_base = np.cumsum([0] + [s.num_pairs for s in splits])[:-1].astype(np.int64)
        self.text_index = np.concatenate([t[0] + b for t, b in zip(tables, self.text.items_base)])
        self.image_index = np.concatenate([t[1] + b for t, b in zip(tables, self.image.items_base)])
        target = np.concatenate([t[2] for t in tables])
        self.targets = (torch.from_numpy(target.astype(np.float32)) if self.multi_label
                        else torch.from_numpy(target.astype(np.int64))).to(self.device)
        self.pair_in_split = torch.from_numpy(
            np.concatenate([np.arange(s.num_pairs, dtype=np.int64) for s in splits])).to(self.device)
        self.text_lengths, self.image_lengths = np.diff(self.text.offsets), np.diff(self.image.offsets)
        self.bytes_to_device = 0  # host -> device bytes so far (counted on every device)
        self.pairs_served = 0
        self._count_lock = threading.Lock()  # prefetch threads assemble batches concurrently
        # on a GPU the caching allocator reuses memory (and knows the streams); on the CPU, pages
        self._pool = BufferPool() if self.device.type == "cpu" else None

    @property
    def num_pairs(self) -> int:
        return len(self.text_index)

    def nbytes(self) -> dict[str, int]:
        """Bytes held per modality (token arrays + pooled)."""
        return {m: sum(t.nbytes for t in [*x.token_arrays, x.pooled])
                for m, x in (("text", self.text), ("image", self.image))}

    # -- one batch -------------------------------------------------------------------------------

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host tensor -> device, counted (what a GPU would receive, even when training on the CPU)."""
        with self._count_lock:
            self.bytes_to_device += t.nbytes
        return t.to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def _host_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=self.device.type == "cuda")

    def _tokens(self, m: _Modality, items: np.ndarray, items_dev: torch.Tensor,
                starts_dev: torch.Tensor, lengths_dev: torch.Tensor, T: int):
        """(layers, final, pooled, mask) of `items` (ids in `m`, on host and device), float32 on
        the device, padded to T tokens with zeros."""
        n = len(items)
        if m.place == "device":
            idx, mask = _padded_index(starts_dev, lengths_dev, T, m.tokens)

            def gather(a: torch.Tensor) -> torch.Tensor:
                if self._pool is None:
                    return a.index_select(0, idx).view(n, T, a.shape[1]).float()
                out = self._pool.take((n, T, a.shape[1]), torch.float32)
                if a.dtype == torch.float32:
                    torch.index_select(a, 0, idx, out=out.view(n * T, a.shape[1]))
                else:  # gather in the stored dtype (half the bytes), widen into the pooled buffer
                    out.copy_(torch.index_select(a, 0, idx, out=self._pool.take((n * T, a.shape[1]), a.dtype))
                              .view(n, T, a.shape[1]))
                return out

            pooled = m.pooled.index_select(0, items_dev)
            pooled = (pooled.float() if self._pool is None
                      else self._pool.take(tuple(pooled.shape), torch.float32).copy_(pooled))
        else:
            # host: only the real rows cross, in the stored dtype; the zero row that padding
            # positions gather from is added on the device
            lo, lengths = m.offsets[items], np.diff(m.offsets)[items]
            total = int(lengths.sum())
            flat = torch.from_numpy(np.repeat(lo - (np.cumsum(lengths) - lengths), lengths)
                                    + np.arange(total, dtype=np.int64))
            idx, mask = _padded_index(lengths_dev.cumsum(0) - lengths_dev, lengths_dev, T, total)

            def gather(a: torch.Tensor) -> torch.Tensor:
                rows = self._host_buffer((total, a.shape[1]), a.dtype)
                torch.index_select(a, 0, flat, out=rows)
                rows = self._to_device(rows)
                rows = torch.cat([rows, rows.new_zeros((1, a.shape[1]))])
                return rows.index_select(0, idx).view(n, T, a.shape[1]).float()

            pooled_rows = self._host_buffer((n, m.pooled.shape[1]), m.pooled.dtype)
            torch.index_select(m.pooled, 0, torch.from_numpy(items), out=pooled_rows)
            pooled = self._to_device(pooled_rows).float()
        layers = [gather(a) for a in m.layers]
        final = layers[-1] if m.final is m.layers[-1] else gather(m.final)
        return layers, final, pooled, mask

    def host_indices(self, global_ids: np.ndarray):
        """The host's share of a batch on the device placement: every index the batch needs, packed
        for one copy. (text items, distinct images, packed int64, Tt, Ti, the most pairs of one
        image)."""
        text_items = self.text_index[global_ids]
        uniq, image_rows = np.unique(self.image_index[global_ids], return_inverse=True)  # sorted
        t_lo, t_len = self.text.offsets[text_items], self.text_lengths[text_items]
        i_lo, i_len = self.image.offsets[uniq], self.image_lengths[uniq]
        packed = np.concatenate([global_ids, text_items, t_lo, t_len, image_rows, uniq, i_lo, i_len])
        most = int(np.bincount(image_rows).max()) if len(image_rows) else 0  # for the heads' layout
        return (text_items, uniq, packed, int(t_len.max()) if len(t_len) else 0,
                int(i_len.max()) if len(i_len) else 0, most)

    def batch(self, global_ids: np.ndarray) -> FeatureBatch:
        """The batch of pairs `global_ids` (positions in the store's concatenated pair table)."""
        text_items, uniq, packed, Tt, Ti, most = self.host_indices(global_ids)
        B, U = len(global_ids), len(uniq)
        # page-locked, so the copy is asynchronous on a GPU (from pageable memory it would wait
        # for the queued kernels: a hidden sync per batch)
        host = self._host_buffer((len(packed),), torch.int64)
        host.numpy()[:] = packed
        dev = self._to_device(host)
        g, t_items, t_lo_d, t_len_d = dev[:B], dev[B:2 * B], dev[2 * B:3 * B], dev[3 * B:4 * B]
        rows_d, uniq_d, i_lo_d, i_len_d = (dev[4 * B:5 * B], dev[5 * B:5 * B + U],
                                           dev[5 * B + U:5 * B + 2 * U], dev[5 * B + 2 * U:])
        text = self._tokens(self.text, text_items, t_items, t_lo_d, t_len_d, Tt)
        image = self._tokens(self.image, uniq, uniq_d, i_lo_d, i_len_d, Ti)
        present = torch.ones(B, dtype=torch.bool, device=self.device)  # made there: no blocking copy
        (t_layers, t_final, t_pooled, t_mask), (i_layers, i_final, i_pooled, i_mask) = text, image
        batch = FeatureBatch(text_layers=t_layers, text_final=t_final, text_pooled=t_pooled, text_mask=t_mask,
                             image_layers=i_layers, image_final=i_final, image_pooled=i_pooled,
                             image_mask=i_mask, targets=self.targets.index_select(0, g),
                             index=self.pair_in_split.index_select(0, g), text_present=present,
                             image_present=present.clone(), image_rows=rows_d,
                             most_pairs=MostPairs(rows_d, most))
        with self._count_lock:
            self.pairs_served += B
        return batch

    # -- an epoch -----------------------------------------------------------------------------------

    def batches(self, *, batch_size: int, shuffle: bool, seed: int, epoch: int,
                pairs_per_image: int = 0, perturb: Callable[[FeatureBatch], FeatureBatch] | None = None,
                num_workers: int = 0, window: int = 4, block_chunks: int | None = None) -> "StoreLoader":
        """One epoch's batches: the loaders' order (`epoch_order`; `grouped_order` when
        pairs_per_image > 0 and shuffled), assembled here."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if pairs_per_image < 0:
            raise ValueError(f"pairs_per_image must be >= 0 (0 = i.i.d. pairs), got {pairs_per_image}")
        if shuffle and pairs_per_image:
            image_index = [_loader._pair_tables(s)[1] for s in self.splits]
            order = _loader.grouped_order(image_index, seed=seed, epoch=epoch,
                                          pairs_per_image=pairs_per_image)
        else:
            blocks = [_loader.split_blocks(s, batch_size, block_chunks)[0] for s in self.splits]
            order = _loader.epoch_order(blocks, [s.num_pairs for s in self.splits], shuffle=shuffle,
                                        seed=seed, epoch=epoch, window=window)
        return StoreLoader(self, order, batch_size=batch_size, perturb=perturb, num_workers=num_workers)


class StoreLoader:
    """Iterable of FeatureBatch (on the store's device, images deduplicated) for one epoch."""

    def __init__(self, store: FeatureStore, order: tuple[np.ndarray, np.ndarray], *, batch_size: int,
                 perturb: Callable[[FeatureBatch], FeatureBatch] | None, num_workers: int):
        self.store = store
        self.split_ids, self.pair_ids = order
        self.global_ids = store.pair_base[self.split_ids] + self.pair_ids
        self.batch_size, self.perturb, self.num_workers = batch_size, perturb, num_workers

    def __len__(self) -> int:
        return math.ceil(len(self.pair_ids) / self.batch_size)

    def _make(self, k: int) -> FeatureBatch:
        batch = self.store.batch(self.global_ids[k * self.batch_size:(k + 1) * self.batch_size])
        return self.perturb(batch) if self.perturb is not None else batch

    def __iter__(self) -> Iterator[FeatureBatch]:
        return _loader.prefetched(self._make, len(self), self.num_workers, "molt-store")

    def batch_at(self, k: int) -> FeatureBatch:
        """Batch k of this epoch again: the same pairs, values and perturbation (the training
        loop's non-finite check re-reads a failed step's batch to name its bad pairs)."""
        return self._make(k)


def open_store(splits: list[CacheSplit], placement: Placement, device: torch.device, *,
               check_finite: bool = False) -> FeatureStore | None:
    """The splits' FeatureStore for `placement`, or None where they stream from disk.
    check_finite: refuse inf/NaN (molt_cache.finite.check_block) before any work: the store checks
    each part as it loads it; a streamed split is read through once here (`scan_split`), block by
    block, since nothing else reads it whole. Raises NonFiniteError naming array, row and sample."""
    if "stream" not in (placement.text, placement.image):
        return FeatureStore(splits, placement, device, check_finite=check_finite)
    if check_finite:
        from molt_cache.finite import scan_split

        for split in splits:
            scan_split(split)
    return None


def make_batches(splits: list[CacheSplit], *, store: FeatureStore | None = None, batch_size: int,
                 shuffle: bool, seed: int, epoch: int, pairs_per_image: int = 0,
                 perturb: Callable[[FeatureBatch], FeatureBatch] | None = None, num_workers: int = 0,
                 pin_memory: bool = False):
    """An epoch's batches from `store` when given, else streamed by `make_loader` (per-pair
    images, float32 on the host)."""
    if store is not None:
        return store.batches(batch_size=batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                             pairs_per_image=pairs_per_image, perturb=perturb, num_workers=num_workers)
    return _loader.make_loader(splits, batch_size=batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                               in_memory=False, num_workers=num_workers, perturb=perturb,
                               pin_memory=pin_memory, pairs_per_image=pairs_per_image)
