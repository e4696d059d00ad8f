"""Writes a cache folder: creates every array up front (exact shapes are known after
tokenization), then writes whole shards of the token arrays, one work unit at a time, each
followed by an atomic completion record. Pooled arrays are assembled from the records at the end.

Only whole shards are ever written: zarr-python loses data when two writers fill parts of one
shard, and a whole-shard write from a deterministic unit makes a resumed cache byte-identical.
"""
from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
import zarr.codecs

from molt_cache.cache.integrity import (array_files, hash_files, shard_files_for_rows,
                                        write_json_record)
from molt_cache.cache.layout import (BF16_ATTR, CREATED_MARKER, MANIFEST_ATTR, POOLED_RECORD,
                                     PROGRESS_DIR, LayoutOptions, item_chunk_rows, shard_rows,
                                     unit_record_path)

STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def compressor(level: int = 3) -> zarr.codecs.ZstdCodec:
    """Lossless; zstd level 3 is fast enough to keep up with the encoders."""
    return zarr.codecs.ZstdCodec(level=level)


def bytes_codecs(level: int = 3) -> list:
    """Inner chunk chain after the bytes codec: zstd, then a crc32c of the compressed bytes, so
    any flipped or truncated byte fails on read (format 2; the shard index carries its own crc32c,
    zarr's default index_codecs)."""
    return [compressor(level), zarr.codecs.Crc32cCodec()]


# Every chunk is stored, even one equal to the fill value: an absent chunk must mean damage,
# never "zeros" (zarr's default drops such chunks and reads their absence as the fill value).
WRITE_CONFIG = {"write_empty_chunks": True}


def writable(arr: zarr.Array) -> zarr.Array:
    return arr.with_config(WRITE_CONFIG)


def to_storage(t: torch.Tensor, dtype: str) -> np.ndarray:
    """Tensor → numpy in the cache's storage dtype. zarr has no bfloat16, so bf16 is stored as
    its uint16 bit patterns (lossless; the array carries attrs[BF16_ATTR] = "bfloat16")."""
    t = t.detach().to("cpu")
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return t.to(getattr(torch, dtype)).numpy()


@dataclass
class ModalityPlan:
    """Exact shapes of one modality's arrays in one split."""

    modality: str  # "text" | "image"
    offsets: np.ndarray  # (N_items + 1,) int64
    token_widths: dict[str, int]  # array name -> width, e.g. {"layer_0": 64, ..., "final": 64}
    pooled_width: int
    dtype: str  # "float32" | "float16" | "bfloat16"
    chunk_rows: int  # shared by every token array of this modality
    shard_rows: int  # = rows of one work unit

    @property
    def n_items(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_units(self) -> int:
        return -(-self.n_tokens // self.shard_rows)

    def unit_rows(self, unit: int) -> tuple[int, int]:
        a = unit * self.shard_rows
        return a, min(a + self.shard_rows, self.n_tokens)

    def unit_items(self, unit: int) -> tuple[np.ndarray, np.ndarray]:
        """(items overlapping the unit's token rows, items whose first token row is inside it —
        the unit owns their pooled rows)."""
        a, b = self.unit_rows(unit)
        starts, ends = self.offsets[:-1], self.offsets[1:]
        lo = int(np.searchsorted(ends, a, side="right"))  # first item ending after a
        hi = int(np.searchsorted(starts, b, side="left"))  # first item starting at/after b
        overlap = np.arange(lo, hi)
        owned = overlap[(starts[overlap] >= a) & (starts[overlap] < b)]
        return overlap, owned

    def token_bytes(self) -> int:
        item = np.dtype(STORAGE_DTYPES[self.dtype]).itemsize
        return self.n_tokens * sum(self.token_widths.values()) * item

    def planned_bytes(self) -> int:
        item = np.dtype(STORAGE_DTYPES[self.dtype]).itemsize
        return self.token_bytes() + self.n_items * self.pooled_width * item + (self.n_items + 1) * 8


@dataclass
class SplitPlan:
    split: str
    sample_ids: list[str]
    text_index: np.ndarray  # (N_pairs,) int64
    image_index: np.ndarray  # (N_pairs,) int64
    targets: np.ndarray  # (N_pairs,) int64 or (N_pairs, C) uint8
    image_keys: list[str]
    text: ModalityPlan
    image: ModalityPlan

    def planned_bytes(self) -> int:
        return (self.text.planned_bytes() + self.image.planned_bytes()
                + self.text_index.nbytes + self.image_index.nbytes + self.targets.nbytes)


def _create(group: zarr.Group, name: str, shape: tuple[int, ...], dtype: Any, chunk: int,
            shard: int | None, attrs: dict | None = None) -> zarr.Array:
    chunks = (chunk,) + tuple(shape[1:])
    return writable(group.create_array(
        name, shape=shape, dtype=dtype, chunks=chunks,
        shards=None if shard is None else (shard,) + tuple(shape[1:]),
        compressors=bytes_codecs(), fill_value=0 if shard is not None else None,
        attributes=attrs or {}, overwrite=True, config=WRITE_CONFIG))


def create_cache(root: Path, plans: list[SplitPlan], manifest: dict, opts: LayoutOptions,
                 only: set[str] | None = None) -> None:
    """Rank 0, once: root attrs (the manifest, complete=false) in one call first, so any partial
    folder is recognisable; then every array, writing those known up front (offsets, pairs,
    image keys); then the `_progress/created` record other ranks wait for: the sha256 of every
    file written here (zarr.json of every array, chunks of the arrays filled here).

    `only` (repair): recreate just these arrays ("train/pairs/target", ...), same bytes as before."""
    root = Path(root)
    group = zarr.open_group(root, mode="a")
    group.attrs.put({MANIFEST_ATTR: manifest})
    written: list[str] = []

    def create(g: zarr.Group, name: str, shape, dtype, chunk, shard, attrs=None, values=None) -> None:
        full = f"{g.path}/{name}"
        if only is not None and full not in only:
            written.extend(array_files(g[name]) if values is not None else [f"{full}/zarr.json"])
            return
        arr = _create(g, name, shape, dtype, chunk, shard, attrs)
        if values is not None:
            arr[:] = values
            written.extend(array_files(arr))
        else:
            written.append(f"{full}/zarr.json")  # chunks: the units' records (token) or pooled.json

    for p in plans:
        g = group.require_group(p.split)
        n = len(p.sample_ids)
        rows = item_chunk_rows(8, 8, n, opts)
        create(g, "pairs/text_index", (n,), "int64", rows, shard_rows(rows, n, opts), values=p.text_index)
        create(g, "pairs/image_index", (n,), "int64", rows, shard_rows(rows, n, opts), values=p.image_index)
        tw = p.targets.shape[1] if p.targets.ndim == 2 else 1
        trows = item_chunk_rows(tw, p.targets.itemsize, n, opts)
        create(g, "pairs/target", p.targets.shape, p.targets.dtype, trows, shard_rows(trows, n, opts),
               values=p.targets)
        create(g, "pairs/sample_id", (n,), str, min(n, 1 << 16), None,
               values=np.array(p.sample_ids, dtype=object))
        n_img = len(p.image_keys)
        create(g, "image/image_key", (n_img,), str, min(n_img, 1 << 16), None,
               values=np.array(p.image_keys, dtype=object))
        for m in (p.text, p.image):
            store_dtype = STORAGE_DTYPES[m.dtype]
            attrs = {BF16_ATTR: "bfloat16"} if m.dtype == "bfloat16" else {}
            orows = item_chunk_rows(8, 8, m.n_items + 1, opts)
            create(g, f"{m.modality}/offsets", (m.n_items + 1,), "int64", orows,
                   shard_rows(orows, m.n_items + 1, opts), values=m.offsets)
            for name, width in m.token_widths.items():
                create(g, f"{m.modality}/{name}", (m.n_tokens, width), store_dtype, m.chunk_rows,
                       m.shard_rows, attrs)
            prows = item_chunk_rows(m.pooled_width, np.dtype(store_dtype).itemsize, m.n_items, opts)
            create(g, f"{m.modality}/pooled", (m.n_items, m.pooled_width), store_dtype, prows,
                   shard_rows(prows, m.n_items, opts), attrs)
    if only is not None:
        written = [w for w in written if (root / w).is_file()]
    write_json_record(root / PROGRESS_DIR / CREATED_MARKER, hash_files(root, written))


@dataclass
class UnitResult:
    """Everything one work unit produced: rows [a, b) of each token array, and pooled rows of the
    items it owns (first owned item = `first_item`)."""

    split: str
    modality: str
    unit: int
    rows: tuple[int, int]
    token_arrays: dict[str, np.ndarray]  # name -> (b - a, D)
    first_item: int
    pooled: np.ndarray  # (n_owned, P) storage dtype
    real_tokens: int = 0
    padded_tokens: int = 0  # tokens computed including padding


def write_unit(root: Path, r: UnitResult) -> int:
    """Write the unit's whole shard in every token array, then its completion record (atomic
    rename, after the data). Returns bytes handed to zarr (uncompressed)."""
    group = zarr.open_group(root, mode="r+")
    a, b = r.rows
    nbytes = 0
    files: list[str] = []
    for name, rows in r.token_arrays.items():
        arr = writable(group[f"{r.split}/{r.modality}/{name}"])
        arr[a:b] = rows
        nbytes += rows.nbytes
        files += shard_files_for_rows(arr, a, b)
    hashes = hash_files(root, files)  # the record vouches for exactly these bytes (resume checks them)
    path = unit_record_path(root, r.split, r.modality, r.unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, first_item=np.int64(r.first_item), pooled=r.pooled,
             real_tokens=np.int64(r.real_tokens), padded_tokens=np.int64(r.padded_tokens),
             files=np.array(list(hashes), dtype=str), sha256=np.array(list(hashes.values()), dtype=str))
    os.replace(tmp, path)
    return nbytes + r.pooled.nbytes


def write_pooled(root: Path, plan: SplitPlan) -> None:
    """Assemble pooled arrays from the unit records (rank 0, after every unit is done). Every
    record's pooled rows go to their item rows; the write is one whole-array assignment by one
    writer, and deterministic, so re-running it after a crash rewrites the same bytes."""
    group = zarr.open_group(root, mode="r+")
    for m in (plan.text, plan.image):
        arr = writable(group[f"{plan.split}/{m.modality}/pooled"])
        full = np.zeros(arr.shape, dtype=arr.dtype)
        filled = np.zeros(m.n_items, dtype=bool)
        for unit in range(m.n_units):
            rec = np.load(unit_record_path(root, plan.split, m.modality, unit))
            k0 = int(rec["first_item"])
            pooled = rec["pooled"]
            full[k0:k0 + len(pooled)] = pooled
            filled[k0:k0 + len(pooled)] = True
        if not filled.all():
            missing = np.flatnonzero(~filled)[:5].tolist()
            raise RuntimeError(f"{plan.split}/{m.modality}: no pooled rows recorded for items "
                               f"{missing}...; the unit records are inconsistent")
        arr[:] = full


def write_pooled_record(root: Path, plans: list[SplitPlan]) -> None:
    """After every split's pooled arrays are written: their files' sha256 (checked on rerun)."""
    group = zarr.open_group(root, mode="r")
    files = [f for p in plans for m in ("text", "image")
             for f in array_files(group[f"{p.split}/{m}/pooled"], with_metadata=False)]
    write_json_record(Path(root) / PROGRESS_DIR / POOLED_RECORD, hash_files(root, files))


class BackgroundWriter:
    """Writes units on a thread while the encoders compute the next ones. The bounded queue
    caps memory at `depth` units in flight; the first write error is re-raised to the caller."""

    def __init__(self, root: Path, depth: int = 2):
        self.root = Path(root)
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.bytes_written = 0
        self.units_written = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            r = self.queue.get()
            if r is None:
                return
            if self.error is None:
                try:
                    self.bytes_written += write_unit(self.root, r)
                    self.units_written += 1
                except BaseException as e:  # noqa: BLE001 - handed to the main thread
                    self.error = e

    def put(self, r: UnitResult) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(r)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
