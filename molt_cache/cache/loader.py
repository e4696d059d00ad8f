"""Stage two's training loader: FeatureBatches from one or more cache splits.

Order. Pairs are grouped into *blocks*: the pairs whose text starts in the same run of
`block_chunks` text token chunks (texts are written in pair order, so a block is a contiguous,
chunk-aligned stretch of the text arrays). A shuffled epoch permutes the blocks, then shuffles
pairs within consecutive groups of `window` blocks, and cuts batches from that sequence. The order
is a pure function of (seed, epoch, cache layout): streaming and in-memory give the same batches.

Reads. Streaming decodes whole inner chunks into small per-array LRUs and copies token rows out of
them: a window's text chunks are decoded once each, and an image shared by many pairs (SNLI-VE:
~17 pairs per Flickr30k image) is served from the image LRU. Feature memory is bounded by the LRU
capacities (≈ (window + 1) blocks of text + `image_cache_chunks` chunks per image array), not by
the dataset; only the pair tables and offsets (16–40 bytes per pair) are held whole.

Prefetch. Background *threads* build batches ahead, in order. Threads rather than DataLoader
worker processes because zarr's codecs (blosc/zstd) and numpy copies release the GIL, because one
shared image LRU is what makes shared images cheap (per-process LRUs decode each image once per
worker), and because nothing — zarr stores, LRUs — has to be pickled into workers.
docs/benchmarks.md ("Training loader") has the measurements.
"""
from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import zarr

from molt_cache.batch import FeatureBatch
from molt_cache.cache.integrity import read_checked
from molt_cache.cache.reader import CacheError, CacheSplit, ModalityArrays, to_float32

# Refuse in-memory loading beyond this share of available RAM (the trainer needs the rest).
IN_MEMORY_RAM_SHARE = 0.8


# -- feature sources: rows of one stored array, from an LRU of decoded chunks or from RAM -----------

class ChunkLRU:
    """Rows of one zarr array, served from whole decoded inner chunks kept in an LRU.
    Thread-safe; two threads missing the same chunk at once may both decode it (harmless)."""

    def __init__(self, array: zarr.Array, capacity: int):
        self.array = array
        self.rows_per_chunk = int(array.chunks[0])
        self.capacity = max(1, int(capacity))
        self.decodes = 0  # chunks read from disk (tests and benchmarks check locality with it)
        self._chunks: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def _chunk(self, c: int) -> np.ndarray:
        with self._lock:
            hit = self._chunks.get(c)
            if hit is not None:
                self._chunks.move_to_end(c)
                return hit
        lo = c * self.rows_per_chunk
        data = read_checked(self.array, lo, min(lo + self.rows_per_chunk, self.array.shape[0]))
        with self._lock:
            self.decodes += 1
            self._chunks[c] = data
            while len(self._chunks) > self.capacity:
                self._chunks.popitem(last=False)
        return data

    def rows(self, lo: int, hi: int) -> np.ndarray:
        r = self.rows_per_chunk
        c0, c1 = lo // r, max(lo, hi - 1) // r
        if c0 == c1:
            return self._chunk(c0)[lo - c0 * r:hi - c0 * r]
        parts = [self._chunk(c) for c in range(c0, c1 + 1)]
        return np.concatenate(parts)[lo - c0 * r:hi - c0 * r]


class InMemoryArray:
    """Rows of one array loaded whole into RAM."""

    def __init__(self, array: zarr.Array):
        self.data = read_checked(array)

    def rows(self, lo: int, hi: int) -> np.ndarray:
        return self.data[lo:hi]


@dataclass
class _ModalitySource:
    offsets: np.ndarray  # (N + 1,) int64, held whole
    layers: list  # ChunkLRU | InMemoryArray per layer
    final: object  # the same object as layers[-1] when final_is_last_layer
    pooled: object
    stored_dtype: str
    widths: tuple[int, ...]  # layer widths..., final width, pooled width


def _estimate_bytes(arrays: ModalityArrays) -> int:
    return sum(math.prod(a.shape) * a.dtype.itemsize
               for a in [*arrays.token_arrays, arrays.pooled])


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# -- per-split plan: pair tables and blocks ------------------------------------------------------

@dataclass
class _SplitPlan:
    split: CacheSplit
    text_index: np.ndarray  # (N,) int64
    image_index: np.ndarray  # (N,) int64
    target: np.ndarray  # (N,) int64 | (N, C) uint8
    text: _ModalitySource
    image: _ModalitySource
    blocks: list[np.ndarray]  # pair ids per block, each ascending


def _pair_tables(split: CacheSplit) -> tuple[np.ndarray, ...]:
    cached = getattr(split, "_loader_tables", None)
    if cached is None:
        cached = (read_checked(split.text_index).astype(np.int64, copy=False),
                  read_checked(split.image_index).astype(np.int64, copy=False),
                  read_checked(split.target),
                  read_checked(split.text.offsets).astype(np.int64, copy=False),
                  read_checked(split.image.offsets).astype(np.int64, copy=False))
        split._loader_tables = cached
    return cached


def _in_memory_sources(split: CacheSplit) -> dict[str, list]:
    """Load each array of the split once (memoized on the split: the trainer builds a loader per
    epoch)."""
    cached = getattr(split, "_loader_in_memory", None)
    if cached is None:
        cached = {}
        for modality, arrays in (("text", split.text), ("image", split.image)):
            layers = [InMemoryArray(a) for a in arrays.layers]
            final = layers[-1] if arrays.final is arrays.layers[-1] else InMemoryArray(arrays.final)
            cached[modality] = [layers, final, InMemoryArray(arrays.pooled)]
        split._loader_in_memory = cached
    return cached


def _check_fits_in_memory(splits: list[CacheSplit]) -> None:
    need = 0
    for s in {id(s): s for s in splits}.values():
        if getattr(s, "_loader_in_memory", None) is None:
            need += _estimate_bytes(s.text) + _estimate_bytes(s.image)
    have = available_memory_bytes()
    if need > IN_MEMORY_RAM_SHARE * have:
        names = ", ".join(f"{s.reader.path}:{s.name}" for s in splits)
        raise MemoryError(
            f"in-memory loading of {names} needs {need / 2**30:.2f} GiB but only "
            f"{have / 2**30:.2f} GiB is available ({IN_MEMORY_RAM_SHARE:.0%} may be used); "
            "drop --in-memory to stream from disk")


def _blocks(text_index: np.ndarray, text_offsets: np.ndarray, block_rows: int) -> list[np.ndarray]:
    """Group pairs by the run of `block_rows` text token rows where their text starts."""
    block_of_pair = text_offsets[text_index] // block_rows  # (N,)
    order = np.argsort(block_of_pair, kind="stable")
    _, starts = np.unique(block_of_pair[order], return_index=True)
    return np.split(order, starts[1:]) if len(order) else []


def split_blocks(split: CacheSplit, batch_size: int,
                 block_chunks: int | None = None) -> tuple[list[np.ndarray], int]:
    """The split's blocks (pair ids per block) and the text token rows per block. The feature
    store shuffles by the same blocks, so both give the same batches for the same seed."""
    text_index, _, _, text_offsets, _ = _pair_tables(split)
    base_rows = int(split.text.layers[0].chunks[0])
    if block_chunks is None:
        # Enough chunks that a block holds about a batch of pairs: smaller blocks shuffle better,
        # larger ones read fewer partial runs.
        n_tokens = max(1, int(text_offsets[-1]))
        pairs_per_chunk = max(1e-9, base_rows * split.num_pairs / n_tokens)
        block_chunks = max(1, math.ceil(batch_size / pairs_per_chunk))
    block_rows = base_rows * block_chunks
    return _blocks(text_index, text_offsets, block_rows), block_rows


def _plan(split: CacheSplit, *, in_memory: bool, batch_size: int, window: int,
          block_chunks: int | None, image_cache_chunks: int) -> _SplitPlan:
    text_index, image_index, target, text_offsets, image_offsets = _pair_tables(split)
    blocks, block_rows = split_blocks(split, batch_size, block_chunks)

    def sources(modality: str, arrays: ModalityArrays, offsets: np.ndarray) -> _ModalitySource:
        if in_memory:
            layers, final, pooled = _in_memory_sources(split)[modality]
        else:
            def lru(a: zarr.Array, rows_per_block: int | None) -> ChunkLRU:
                if rows_per_block is None:  # image arrays: random access, fixed small LRU
                    return ChunkLRU(a, image_cache_chunks)
                per_block = math.ceil(rows_per_block / int(a.chunks[0])) + 1
                return ChunkLRU(a, (window + 1) * per_block + 2)

            text = modality == "text"
            texts_per_block = max((len(b) for b in blocks), default=1)
            layers = [lru(a, block_rows if text else None) for a in arrays.layers]
            final = (layers[-1] if arrays.final is arrays.layers[-1]
                     else lru(arrays.final, block_rows if text else None))
            pooled = lru(arrays.pooled, texts_per_block if text else None)
        widths = (*[int(a.shape[1]) for a in arrays.layers], int(arrays.final.shape[1]),
                  int(arrays.pooled.shape[1]))
        return _ModalitySource(offsets, layers, final, pooled, arrays.stored_dtype, widths)

    return _SplitPlan(split, text_index, image_index, target,
                      sources("text", split.text, text_offsets),
                      sources("image", split.image, image_offsets), blocks)


# -- order --------------------------------------------------------------------------------------

def epoch_order(block_lists: list[list[np.ndarray]], num_pairs: list[int], *, shuffle: bool,
                seed: int, epoch: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(split id, pair id) per position in the epoch. Unshuffled: every split in pair order."""
    if not shuffle:
        split_ids = np.concatenate([np.full(n, k, np.int64) for k, n in enumerate(num_pairs)])
        pair_ids = np.concatenate([np.arange(n, dtype=np.int64) for n in num_pairs])
        return split_ids, pair_ids
    rng = np.random.default_rng([seed, epoch])
    tagged = [(k, b) for k, blocks in enumerate(block_lists) for b in blocks]
    perm = rng.permutation(len(tagged))
    split_parts, pair_parts = [], []
    for g in range(0, len(perm), window):
        group = [tagged[i] for i in perm[g:g + window]]
        s = np.concatenate([np.full(len(b), k, np.int64) for k, b in group])
        p = np.concatenate([b for _, b in group]).astype(np.int64)
        shuffle_within = rng.permutation(len(p))
        split_parts.append(s[shuffle_within])
        pair_parts.append(p[shuffle_within])
    if not pair_parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(split_parts), np.concatenate(pair_parts)


def grouped_order(image_index: list[np.ndarray], *, seed: int, epoch: int,
                  pairs_per_image: int) -> tuple[np.ndarray, np.ndarray]:
    """(split id, pair id) per position, pairs grouped by image (`--pairs-per-image K`).

    Each image's pairs are shuffled and cut into groups of K (an image with fewer pairs, or the
    rest of one, gives a smaller group); the groups of all images are shuffled and laid end to end,
    so a batch of B pairs holds about B/K images with K pairs each. An image is (split, image id):
    mixed caches do not share images. Fixed by (seed, epoch)."""
    if pairs_per_image < 1:
        raise ValueError(f"pairs_per_image must be >= 1, got {pairs_per_image}")
    rng = np.random.default_rng([seed, epoch, 0x47525550])  # apart from epoch_order's stream
    groups: list[tuple[int, np.ndarray]] = []
    for k, images in enumerate(image_index):
        order = np.argsort(images, kind="stable")  # pairs by image
        starts = np.flatnonzero(np.r_[True, images[order][1:] != images[order][:-1]]) if len(order) else []
        for pairs in np.split(order, starts[1:]) if len(order) else []:
            pairs = rng.permutation(pairs)
            groups += [(k, pairs[i:i + pairs_per_image]) for i in range(0, len(pairs), pairs_per_image)]
    if not groups:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    perm = rng.permutation(len(groups))
    split_ids = np.concatenate([np.full(len(groups[i][1]), groups[i][0], np.int64) for i in perm])
    pair_ids = np.concatenate([groups[i][1] for i in perm]).astype(np.int64)
    return split_ids, pair_ids


# -- batch assembly -------------------------------------------------------------------------------

def _gather_tokens(items: list[tuple[object, int, int]], width: int, T: int,
                   stored_dtype: str) -> np.ndarray:
    out = np.zeros((len(items), T, width), np.float32)  # (B, T, D), padding stays 0
    bf16 = stored_dtype == "bfloat16"
    for b, (src, lo, hi) in enumerate(items):
        if hi > lo:
            # float16/float32 widen during the assignment itself: no temporary float32 copy
            out[b, :hi - lo] = to_float32(src.rows(lo, hi), stored_dtype) if bf16 else src.rows(lo, hi)
    return out


def _gather_modality(parts: list[tuple[_ModalitySource, int]]):
    """parts: (source, row) per batch item, row = text / image id within its split."""
    spans = [(src, int(src.offsets[row]), int(src.offsets[row + 1])) for src, row in parts]
    lengths = np.array([hi - lo for _, lo, hi in spans], np.int64)
    T = int(lengths.max()) if len(lengths) else 0
    first = parts[0][0]
    n_layers = len(first.layers)
    layers = []
    for k in range(n_layers):
        items = [(src.layers[k], lo, hi) for (src, lo, hi) in spans]
        layers.append(torch.from_numpy(_gather_tokens(items, first.widths[k], T, first.stored_dtype)))
    if first.final is first.layers[-1]:
        final = layers[-1]  # stored once (final_is_last_layer); served as the same tensor
    else:
        items = [(src.final, lo, hi) for (src, lo, hi) in spans]
        final = torch.from_numpy(_gather_tokens(items, first.widths[-2], T, first.stored_dtype))
    pooled = np.stack([to_float32(src.pooled.rows(row, row + 1), src.stored_dtype)[0]
                       for src, row in parts])
    mask = torch.from_numpy(np.arange(T)[None, :] < lengths[:, None])  # (B, T) bool
    return layers, final, torch.from_numpy(pooled), mask


def _build_batch(plans: list[_SplitPlan], split_ids: np.ndarray, pair_ids: np.ndarray,
                 multi_label: bool) -> FeatureBatch:
    text_parts = [(plans[s].text, int(plans[s].text_index[p])) for s, p in zip(split_ids, pair_ids)]
    image_parts = [(plans[s].image, int(plans[s].image_index[p]))
                   for s, p in zip(split_ids, pair_ids)]
    targets = np.stack([plans[s].target[p] for s, p in zip(split_ids, pair_ids)])
    targets_t = (torch.from_numpy(targets.astype(np.float32)) if multi_label
                 else torch.from_numpy(targets.astype(np.int64)))
    return FeatureBatch.complete_pairs(_gather_modality(text_parts), _gather_modality(image_parts),
                                       targets_t, torch.from_numpy(pair_ids.astype(np.int64)))


def _pin(batch: FeatureBatch) -> FeatureBatch:
    """Page-lock every tensor once, keeping text_final the same tensor as text_layers[-1]."""
    pinned: dict[int, torch.Tensor] = {}

    def pin(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in pinned:
            pinned[id(t)] = t.pin_memory()
        return pinned[id(t)]

    return FeatureBatch(
        text_layers=[pin(t) for t in batch.text_layers], text_final=pin(batch.text_final),
        text_pooled=pin(batch.text_pooled), text_mask=pin(batch.text_mask),
        image_layers=[pin(t) for t in batch.image_layers], image_final=pin(batch.image_final),
        image_pooled=pin(batch.image_pooled), image_mask=pin(batch.image_mask),
        targets=pin(batch.targets), index=pin(batch.index), text_present=pin(batch.text_present),
        image_present=pin(batch.image_present))


# -- the loader ----------------------------------------------------------------------------------

class FeatureLoader:
    """Iterable of FeatureBatch for one epoch; iterating again repeats the same batches."""

    def __init__(self, plans: list[_SplitPlan], order: tuple[np.ndarray, np.ndarray], *,
                 batch_size: int, num_workers: int, multi_label: bool,
                 perturb: Callable[[FeatureBatch], FeatureBatch] | None, pin_memory: bool):
        self.plans = plans
        self.split_ids, self.pair_ids = order
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.multi_label = multi_label
        self.perturb = perturb
        self.pin_memory = pin_memory

    def __len__(self) -> int:
        return math.ceil(len(self.pair_ids) / self.batch_size)

    def _make(self, k: int) -> FeatureBatch:
        sl = slice(k * self.batch_size, (k + 1) * self.batch_size)
        batch = _build_batch(self.plans, self.split_ids[sl], self.pair_ids[sl], self.multi_label)
        if self.perturb is not None:
            batch = self.perturb(batch)
        return _pin(batch) if self.pin_memory else batch

    def __iter__(self) -> Iterator[FeatureBatch]:
        return prefetched(self._make, len(self), self.num_workers, "molt-loader")

    def batch_at(self, k: int) -> FeatureBatch:
        """Batch k of this epoch again: the same pairs, values and perturbation (the training
        loop's non-finite check re-reads a failed step's batch to name its bad pairs)."""
        return self._make(k)

    @property
    def chunk_decodes(self) -> int:
        """Chunks read from disk so far by the streaming LRUs (0 in memory)."""
        total = 0
        for plan in self.plans:
            for src in (plan.text, plan.image):
                for s in {id(x): x for x in [*src.layers, src.final, src.pooled]}.values():
                    total += getattr(s, "decodes", 0)
        return total


def _check_same_shapes(splits: list[CacheSplit]) -> None:
    first = splits[0]
    for other in splits[1:]:
        for modality in ("text", "image"):
            a = first.reader.manifest[modality]
            b = other.reader.manifest[modality]
            for f in ("layer_widths", "final_width", "pooled_width", "final_is_last_layer", "dtype"):
                if a[f] != b[f]:
                    raise CacheError(f"cannot mix {first!r} and {other!r}: {modality}.{f} is "
                                     f"{a[f]!r} vs {b[f]!r}")
        if first.task != other.task or first.labels != other.labels:
            raise CacheError(f"cannot mix {first!r} and {other!r}: task/labels differ "
                             f"({first.task} {first.labels} vs {other.task} {other.labels})")


def make_loader(splits: list[CacheSplit], *, batch_size: int, shuffle: bool, seed: int,
                epoch: int, in_memory: bool, num_workers: int, window: int = 4,
                perturb: Callable[[FeatureBatch], FeatureBatch] | None = None,
                pin_memory: bool | None = None, block_chunks: int | None = None,
                image_cache_chunks: int = 16, pairs_per_image: int = 0) -> FeatureLoader:
    """Batches over the concatenation of `splits` (several caches: `--cache A --cache B`).

    shuffle=False: pairs in order, split after split (evaluation). shuffle=True: block-shuffled
    order fixed by (seed, epoch). in_memory loads each array once (refused if it does not fit).
    num_workers background threads prefetch batches (0: built on demand in the caller).
    pin_memory None = pin when CUDA is available. `index` is the pair index within its split.
    pairs_per_image K > 0 (shuffled epochs only): batches of pairs grouped by image
    (`grouped_order`); 0 = the block-shuffled order.
    """
    if not splits:
        raise ValueError("make_loader needs at least one split")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if window < 1:
        raise ValueError(f"window must be >= 1 block, got {window}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    _check_same_shapes(splits)
    if in_memory:
        _check_fits_in_memory(splits)
    plans = [_plan(s, in_memory=in_memory, batch_size=batch_size, window=window,
                   block_chunks=block_chunks, image_cache_chunks=image_cache_chunks)
             for s in splits]
    if shuffle and pairs_per_image:
        order = grouped_order([p.image_index for p in plans], seed=seed, epoch=epoch,
                              pairs_per_image=pairs_per_image)
    else:
        order = epoch_order([p.blocks for p in plans], [s.num_pairs for s in splits],
                            shuffle=shuffle, seed=seed, epoch=epoch, window=window)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return FeatureLoader(plans, order, batch_size=batch_size, num_workers=num_workers,
                         multi_label=splits[0].multi_label, perturb=perturb,
                         pin_memory=pin_memory)


def prefetched(make: Callable[[int], FeatureBatch], n: int, num_workers: int, name: str) -> Iterator[FeatureBatch]:
    """make(0) … make(n - 1) in order; with workers, built ahead on a thread pool (the streaming
    loader and the feature store share this)."""
    if num_workers == 0:
        for k in range(n):
            yield make(k)
        return
    ahead = 2 * num_workers  # bounded look-ahead keeps memory at a few batches
    with ThreadPoolExecutor(num_workers, thread_name_prefix=name) as pool:
        pending = [pool.submit(make, k) for k in range(min(ahead, n))]
        for k in range(n):
            batch = pending[k].result()
            pending[k] = None  # drop the reference: the consumer owns the batch now
            if k + ahead < n:
                pending.append(pool.submit(make, k + ahead))
            yield batch
