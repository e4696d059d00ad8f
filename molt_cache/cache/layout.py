"""Where everything lives in a cache folder, and how big its chunks and shards are.

One place for names and sizing, so the writer, the reader and docs/cache-format.md agree.
Chunk = rows × the full feature width, ≥ ~1 MiB (what reads independently); shard = a fixed
number of chunks (what one writer writes whole: zarr-python loses data when two writers touch
parts of the same shard).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

FORMAT_VERSION = 2  # 2: crc32c on every chunk, every chunk written, content hashes in records, lock
MANIFEST_ATTR = "molt_cache"  # root group attribute holding the manifest
MANIFEST_FILE = "manifest.json"  # written last, on completion
PROGRESS_DIR = "_progress"  # completion records of work units (resume state)
BAD_IMAGES_FILE = "bad_images.json"  # images that failed to decode under on_bad=skip
CREATED_MARKER = "created"  # in _progress/: rank 0 finished creating every array (JSON: file -> sha256)
POOLED_RECORD = "pooled.json"  # in _progress/: sha256 of the pooled arrays' files, written by rank 0
LOCK_FILE = "lock"  # in _progress/: flock-ed by the writing `molt extract` (one job at a time)
LOCK_HOLDER_FILE = "lock.json"  # in _progress/: pid, host and command of the job holding the lock
MODALITIES = ("text", "image")
BF16_ATTR = "molt_cache_dtype"  # array attribute: "bfloat16" when uint16 holds bf16 bit patterns


@dataclass(frozen=True)
class LayoutOptions:
    """Chunk/shard sizing. Defaults are for real runs; tests shrink them."""

    chunk_bytes: int = 1 << 20  # target bytes of one inner chunk (lower bound)
    shard_chunks: int = 16  # inner chunks per shard (along rows)
    token_chunk_rows: int | None = None  # override rows per chunk of the token arrays (tests)
    item_chunk_rows: int | None = None  # override rows per chunk of per-item arrays (tests)


def token_array_names(n_layers: int, final_is_last_layer: bool) -> list[str]:
    """Flat (N_tokens, D) arrays of one modality, in the order the encoder returns them."""
    names = [f"layer_{i}" for i in range(n_layers)]
    return names if final_is_last_layer else names + ["final"]


def chunk_rows_for(width: int, itemsize: int, chunk_bytes: int) -> int:
    """Rows so one chunk of the full width holds at least `chunk_bytes`."""
    return max(1, math.ceil(chunk_bytes / (width * itemsize)))


def token_chunk_rows(widths: list[int], itemsize: int, n_rows: int, opts: LayoutOptions,
                     multiple_of: int = 1) -> int:
    """One chunk row count shared by every token array of a modality, so their shards cover the
    same token rows and one work unit owns the same shard in each of them. Sized on the narrowest
    array (every chunk ≥ chunk_bytes); rounded up to `multiple_of` (image tokens per image) so
    images never straddle chunks; clipped to the array length."""
    if opts.token_chunk_rows is not None:
        rows = opts.token_chunk_rows
    else:
        rows = chunk_rows_for(min(widths), itemsize, opts.chunk_bytes)
        rows = math.ceil(rows / multiple_of) * multiple_of
    return max(1, min(rows, n_rows))


def item_chunk_rows(width: int, itemsize: int, n_rows: int, opts: LayoutOptions) -> int:
    rows = opts.item_chunk_rows or chunk_rows_for(width, itemsize, opts.chunk_bytes)
    return max(1, min(rows, n_rows))


def shard_rows(chunk_rows: int, n_rows: int, opts: LayoutOptions) -> int:
    """A whole number of chunks; no more chunks than the array needs."""
    chunks_needed = max(1, math.ceil(n_rows / chunk_rows))
    return chunk_rows * min(opts.shard_chunks, chunks_needed)


def unit_record_path(root: Path, split: str, modality: str, unit: int) -> Path:
    """Completion record of one work unit = one shard of the modality's token arrays."""
    return Path(root) / PROGRESS_DIR / split / modality / f"unit-{unit:06d}.done.npz"
