"""What `molt extract` is asked (ExtractConfig) and what it reports back (ExtractResult)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from molt_cache.cache.layout import LayoutOptions
from molt_cache.cache.writer import STORAGE_DTYPES
from molt_cache.validate import COUNT, NON_NEGATIVE, NON_NEGATIVE_INT, Range, check_numbers


@dataclass
class ExtractConfig:
    """`molt extract`: one cache per (dataset, encoder pair, perturbation)."""

    dataset: str = "sample"  # a name from molt_cache.datasets.list_datasets()
    root: str | None = None  # dataset folder (None only for the bundled "sample", "openclipart-sample")
    dataset_options: dict[str, Any] = field(default_factory=dict)  # passed to open_dataset
    splits: list[str] | None = None  # None = every split the reader has
    limit: int | None = None  # keep the first N usable pairs of each split (reader order, before dedup)
    text: str = "tiny:llama"  # text encoder spec (molt_cache.encoders.create_text_encoder)
    image: str = "tiny:vit"  # image encoder spec
    image_weights: str | None = None  # optional weights file for the image tower
    max_length: int | None = None  # cap on text tokens; the model's position limit applies anyway
    layers: int = 4  # L_s: last blocks kept per encoder
    dtype: str = "auto"  # "auto" (float16 on CUDA, float32 on CPU) | float32 | float16 | bfloat16
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1"; ranks use cuda:LOCAL_RANK
    out_dir: str = "molt-out/cache"
    batch_tokens: int = 16384  # text batches: longest × count ≤ this (after sorting by length)
    image_batch_size: int = 64
    num_workers: int = min(4, os.cpu_count() or 1)  # DataLoader workers decoding + transforming images
    on_bad: str = "error"  # "error" | "skip" (bad rows and images are reported, never dropped silently)
    force: bool = False  # write even if free disk is below the uncompressed upper bound
    noise: float = 0.0  # input-level Gaussian noise level p (method.md, Robustness)
    noise_on: str = "both"  # "image" | "text" | "both"
    empty: str | None = None  # None | "text" (every text "") | "image" (a mid-gray image)
    seed: int = 0  # seeds input-level noise, per (seed, split, modality, item)
    rank: int | None = None  # None = from torchrun's RANK, else 0
    world_size: int | None = None  # None = from WORLD_SIZE, else 1
    rank_wait_s: float | None = None  # how long ranks wait for each other (None = forever)
    chunk_bytes: int = 1 << 20  # layout: inner chunk ≥ this many bytes
    shard_chunks: int = 16  # layout: chunks per shard = rows per work unit / chunk rows
    token_chunk_rows: int | None = None  # layout override (tests)
    item_chunk_rows: int | None = None  # layout override (tests)

    NUMERIC: ClassVar[dict[str, Range]] = {
        "limit": Range(lo=1, integer=True, optional=True), "layers": COUNT, "batch_tokens": COUNT,
        "image_batch_size": COUNT, "num_workers": NON_NEGATIVE_INT, "noise": NON_NEGATIVE,
        "seed": NON_NEGATIVE_INT, "rank": Range(lo=0, integer=True, optional=True),
        "world_size": Range(lo=1, integer=True, optional=True),
        "rank_wait_s": Range(lo=0, optional=True), "chunk_bytes": COUNT, "shard_chunks": COUNT,
        "token_chunk_rows": Range(lo=1, integer=True, optional=True),
        "item_chunk_rows": Range(lo=1, integer=True, optional=True)}

    def validate(self) -> None:
        """Bad option combinations fail before any work, naming the fix."""
        check_numbers(self)
        if self.dtype not in ("auto", *STORAGE_DTYPES):
            raise ValueError(f"unknown dtype {self.dtype!r}; valid: ['auto', {', '.join(map(repr, STORAGE_DTYPES))}]")
        if self.on_bad not in ("error", "skip"):
            raise ValueError(f"unknown on_bad {self.on_bad!r}; valid: ['error', 'skip']")
        if self.noise_on not in ("image", "text", "both"):
            raise ValueError(f"unknown noise_on {self.noise_on!r}; valid: ['image', 'text', 'both']")
        if self.empty not in (None, "text", "image"):
            raise ValueError(f"unknown empty {self.empty!r}; valid: None, 'text', 'image'")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be ≥ 1 (or None for the model's own limit), got {self.max_length}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be ≥ 1 (or None for every pair), got {self.limit}")
        if self.noise < 0:
            raise ValueError(f"noise must be ≥ 0, got {self.noise}")
        if self.noise > 0 and self.empty is not None:
            raise ValueError("choose one perturbation per cache: noise > 0 or empty, not both")
        if self.layers < 1 or self.batch_tokens < 1 or self.image_batch_size < 1 or self.shard_chunks < 1:
            raise ValueError("layers, batch_tokens, image_batch_size and shard_chunks must be ≥ 1")

    def layout(self) -> LayoutOptions:
        return LayoutOptions(chunk_bytes=self.chunk_bytes, shard_chunks=self.shard_chunks,
                             token_chunk_rows=self.token_chunk_rows, item_chunk_rows=self.item_chunk_rows)

    def perturbation(self) -> dict[str, Any]:
        perturbed = self.noise > 0 or self.empty is not None
        return {"level": "input" if perturbed else "none", "noise": float(self.noise),
                "noise_on": self.noise_on if self.noise > 0 else "both", "empty": self.empty,
                "seed": self.seed if self.noise > 0 else 0}


@dataclass
class ExtractResult:
    out_dir: Path
    complete: bool  # manifest.json written (False: other ranks still working)
    reused: bool  # the folder already held this exact complete cache
    units_done: int = 0  # units this call encoded
    units_skipped: int = 0  # units found done (resume)
    text_tokens: int = 0  # real text tokens this call encoded
    images: int = 0  # images this call encoded
    padding_tokens: int = 0  # padding text tokens computed by this call's batches
    padding_fraction: float = 0.0  # padding / real text tokens, over this call's batches
    bytes_planned: int = 0  # uncompressed upper bound of the whole cache
    bytes_written: int = 0  # uncompressed bytes this call handed to zarr
    bytes_on_disk: int = 0  # folder size after this call
    seconds: float = 0.0  # the whole call: reading, tokenizing, model loading, encoding, writing
    text_seconds: float = 0.0  # wall time of the text units (encoding while writes overlap)
    image_seconds: float = 0.0  # wall time of the image units (decode workers, encoding)
    text_lengths: dict[str, Any] = field(default_factory=dict)  # max length, truncated texts per split

    @property
    def tokens_per_s(self) -> float:
        return self.text_tokens / self.text_seconds if self.text_seconds else 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / self.image_seconds if self.image_seconds else 0.0


def extract_config_from_manifest(manifest: dict, **overrides: Any) -> ExtractConfig:
    """The config that rebuilds `manifest`'s cache (robustness: same encoders and data, a
    perturbation given in `overrides`)."""
    ex = manifest.get("extraction", {})
    cfg = ExtractConfig(
        dataset=manifest["dataset"]["name"], root=manifest["dataset"].get("root"),
        dataset_options=dict(ex.get("dataset_options", {})), text=ex["text_spec"], image=ex["image_spec"],
        image_weights=ex.get("image_weights"), layers=len(manifest["text"]["layer_indices"]),
        dtype=manifest["text"]["dtype"], batch_tokens=ex.get("batch_tokens", 16384),
        image_batch_size=ex.get("image_batch_size", 64), on_bad=ex.get("on_bad", "error"),
        limit=manifest["dataset"].get("limit"),
        max_length=manifest["text"].get("extra", {}).get("max_length_limits", {}).get("requested"))
    return dataclasses.replace(cfg, **overrides)

