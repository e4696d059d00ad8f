"""Training-loader throughput vs a raw sequential zarr read of the same arrays.

Writes a synthetic cache in the documented layout (1 MiB zstd chunks, fp16, SNLI-VE-like sharing:
`pairs_per_image` pairs per image), then times
  raw      every array read once, chunk by chunk, in storage order (the floor for disk + decode)
  stream   make_loader(in_memory=False), shuffled epoch, num_workers 0 / 2 threads
  procs    the alternative design: torch DataLoader worker *processes* over an IterableDataset of
           whole batches, batch k on worker k % W (keeps order); each worker its own LRUs
  memory   make_loader(in_memory=True): load once, then a shuffled epoch
and replaces the "## Training loader" section of docs/benchmarks.md (other sections are kept).
Run: python -m benchmarks.bench_loader [--pairs N] [--out docs/benchmarks.md]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from benchmarks.report import replace_section
from molt_cache.cache.loader import make_loader
from molt_cache.cache.reader import open_cache

SECTION = "## Training loader"


def _ident(modality, widths, final_width, pooled, final_is_last):
    return {"modality": modality, "kind": "random", "name": f"bench-{modality}",
            "weights_sha256": "random:0", "layer_indices": list(range(len(widths))),
            "layer_widths": widths, "final_width": final_width, "pooled_width": pooled,
            "dtype": "float16", "final_is_last_layer": final_is_last, "extra": {}}


def _codecs(checksums: bool) -> list:
    """Format 2: zstd then crc32c on every chunk; `checksums=False` only for the cost benchmark."""
    zstd = zarr.codecs.ZstdCodec(level=3)
    return [zstd, zarr.codecs.Crc32cCodec()] if checksums else [zstd]


def _array(g, name, values, chunk_bytes=1 << 20, checksums=True):
    row_bytes = max(1, values[0].nbytes if values.ndim > 1 else values.itemsize)
    rows = max(1, min(len(values), chunk_bytes // row_bytes))
    a = g.create_array(name, shape=values.shape, dtype=values.dtype, chunks=(rows, *values.shape[1:]),
                       compressors=_codecs(checksums), config={"write_empty_chunks": True})
    a[...] = values


def write_bench_cache(path: Path, pairs: int, pairs_per_image: int = 4, text_tokens: int = 24,
                      text_width: int = 576, image_tokens: int = 50, image_width: int = 768,
                      layers: int = 4, seed: int = 0, checksums: bool = True) -> int:
    """SmolLM2-135M-like text (576 wide, final = last layer) and ViT-B/32-like image (50 tokens,
    768 wide). Returns the stored bytes of the feature arrays (uncompressed).
    `checksums=False` leaves out the crc32c (the reader refuses that; benchmarks only)."""
    rng = np.random.default_rng(seed)

    def put(g, name, values):
        _array(g, name, values, checksums=checksums)

    root = zarr.open_group(str(path), mode="w-")
    g = root.create_group("train")
    n_images = -(-pairs // pairs_per_image)
    lengths = rng.integers(text_tokens // 2, text_tokens * 3 // 2 + 1, pairs)
    t_off = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    i_off = (np.arange(n_images + 1) * image_tokens).astype(np.int64)
    put(g, "pairs/text_index", np.arange(pairs, dtype=np.int64))
    put(g, "pairs/image_index", (np.arange(pairs) // pairs_per_image).astype(np.int64))
    put(g, "pairs/target", rng.integers(0, 3, pairs).astype(np.int64))
    sid = g.create_array("pairs/sample_id", shape=(pairs,), dtype=str, chunks=(pairs,),
                         compressors=_codecs(checksums))
    sid[:] = np.array([f"s{i}" for i in range(pairs)], dtype=object)
    stored = 0
    for modality, off, width, n, final_is_last, pooled in (
            ("text", t_off, text_width, pairs, True, text_width),
            ("image", i_off, image_width, n_images, False, 512)):
        put(g, f"{modality}/offsets", off)
        names = [f"layer_{k}" for k in range(layers)] + ([] if final_is_last else ["final"])
        for name in names:
            values = (rng.standard_normal((int(off[-1]), width), dtype=np.float32)).astype(np.float16)
            put(g, f"{modality}/{name}", values)
            stored += values.nbytes
        p = rng.standard_normal((n, pooled), dtype=np.float32).astype(np.float16)
        put(g, f"{modality}/pooled", p)
        stored += p.nbytes
    keys = g.create_array("image/image_key", shape=(n_images,), dtype=str, chunks=(n_images,),
                          compressors=_codecs(checksums))
    keys[:] = np.array([f"i{k}" for k in range(n_images)], dtype=object)
    manifest = {
        "format_version": 2, "molt_cache_version": "0.1.0",
        "dataset": {"name": "bench", "root": "", "task": "single-label", "labels": ["a", "b", "c"],
                    "fingerprint": "bench"},
        "splits": {"train": {"pairs": pairs, "texts": pairs, "images": n_images,
                             "text_tokens": int(t_off[-1]), "image_tokens": int(i_off[-1])}},
        "text": _ident("text", [text_width] * layers, text_width, text_width, True),
        "image": _ident("image", [image_width] * layers, image_width, 512, False),
        "perturbation": {"level": "none", "noise": 0.0, "noise_on": "both", "empty": None, "seed": 0},
        "complete": True,
    }
    root.attrs["molt_cache"] = manifest
    (path / "manifest.json").write_text(json.dumps(manifest))
    return stored


def _raw_read(split) -> float:
    t0 = time.perf_counter()
    for m in (split.text, split.image):
        for a in [*m.token_arrays, m.pooled]:
            r = a.chunks[0]
            for lo in range(0, a.shape[0], r):
                np.asarray(a[lo:lo + r])
    return time.perf_counter() - t0


def _epoch(loader) -> tuple[float, int]:
    """Seconds for one pass, and the float32 bytes of the batches delivered (padding included;
    a shared image is delivered once per pair)."""
    t0 = time.perf_counter()
    delivered = 0
    for batch in loader:
        tensors = [*batch.text_layers, *batch.image_layers, batch.image_final, batch.text_pooled,
                   batch.image_pooled]
        if batch.text_final is not batch.text_layers[-1]:
            tensors.append(batch.text_final)
        delivered += sum(t.nbytes for t in tensors)
    return time.perf_counter() - t0, delivered


class _BatchShards(torch.utils.data.IterableDataset):
    """Batch k on worker k % W: the DataLoader's round-robin over workers keeps the order."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for k in range(wid, len(self.loader), nw):
            yield self.loader._make(k)


def run(out_md: str | Path = "docs/benchmarks.md", pairs: int = 3000, batch_size: int = 64) -> str:
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache"
        stored = write_bench_cache(path, pairs)
        split = open_cache(path).split("train")
        mb = stored / 2**20
        _raw_read(split)  # warm the page cache so every row compares decode + copy, not the disk
        t = min(_raw_read(split) for _ in range(2))
        rows.append(("raw sequential zarr read (each chunk once)", t, None, stored))
        kw = dict(batch_size=batch_size, shuffle=True, seed=0, in_memory=False, pin_memory=False)
        for workers in (0, 2):
            best = None
            for epoch in range(2):
                loader = make_loader([split], epoch=epoch, num_workers=workers, **kw)
                t, n = _epoch(loader)
                best = min(best or t, t)
            rows.append((f"streaming, {workers} prefetch threads", best, loader.chunk_decodes, n))
        for workers in (2,):
            loader = make_loader([split], epoch=0, num_workers=0, **kw)
            dl = torch.utils.data.DataLoader(_BatchShards(loader), batch_size=None,
                                             num_workers=workers)
            t, n = _epoch(dl)
            rows.append((f"streaming, torch DataLoader, {workers} worker processes", t, None, n))
        t0 = time.perf_counter()
        loader = make_loader([split], epoch=0, num_workers=0, **{**kw, "in_memory": True})
        load = time.perf_counter() - t0
        t, n = _epoch(loader)
        rows.append((f"in memory (load {load:.2f} s, then one epoch)", t, None, n))
        n_batches = len(loader)
    lines = [SECTION, "",
             f"`python -m benchmarks.bench_loader` on {platform.machine()}, {os.cpu_count()} cores "
             f"(shared), torch {torch.__version__}, zarr {zarr.__version__}. Synthetic cache: "
             f"{pairs} pairs, 4 pairs per image, text 4 × 576 wide (~24 tokens, final = last layer), "
             f"image 4 layers + final × 768 wide (50 tokens), fp16, 1 MiB zstd chunks: "
             f"{mb:.0f} MiB of feature arrays. Shuffled epoch, batch {batch_size} ({n_batches} "
             "batches), page cache warm, no perturbation, no pinning.", "",
             "| reader | epoch s | stored MiB/s | delivered float32 MiB/s | pairs/s | chunk decodes |",
             "|---|---|---|---|---|---|"]
    for name, t, decodes, delivered in rows:
        lines.append(f"| {name} | {t:.2f} | {mb / t:.0f} | {delivered / 2**20 / t:.0f} | "
                     f"{pairs / t:.0f} | {'' if decodes is None else decodes} |")
    lines.append("")
    section = "\n".join(lines)
    replace_section(SECTION, section, Path(out_md))
    return section


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=3000)
    ap.add_argument("--out", default="docs/benchmarks.md")
    a = ap.parse_args()
    print(run(a.out, pairs=a.pairs))
