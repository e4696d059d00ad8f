"""Writes a tiny cache in the documented layout (docs/cache-format.md v2: crc32c on every chunk, every chunk written) directly with zarr, so
the reader/loader tests do not depend on the extraction code. Returns the values written."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
import zarr.codecs


@dataclass
class TinySpec:
    splits: dict[str, int] = field(default_factory=lambda: {"train": 37})
    task: str = "single-label"
    num_labels: int = 3
    text_widths: tuple[int, ...] = (6, 6)
    text_final_is_last_layer: bool = True  # HF LLaMA style: no text/final array
    image_widths: tuple[int, ...] = (5, 5)
    final_width: int = 5  # image final width (text final width = last text width)
    pooled: tuple[int, int] = (6, 4)  # (text P, image P)
    dtype: str = "float16"
    chunk_rows: int = 8  # token rows per inner chunk (tiny, so reads cross chunks)
    pairs_per_image: int = 3  # images shared by consecutive pairs, as in SNLI-VE
    text_len: tuple[int, int] = (1, 7)
    image_len: tuple[int, int] = (2, 5)
    format_version: int = 2
    complete: bool = True
    encoder_name: str = "tiny"
    seed: int = 0


@dataclass
class Truth:
    """Per pair: lists of float32 arrays exactly as stored (after the dtype round trip)."""

    text_index: np.ndarray
    image_index: np.ndarray
    target: np.ndarray
    texts: list[dict]  # per text: {"layers": [...], "final": ..., "pooled": ...}
    images: list[dict]


def _identity(spec: TinySpec, modality: str) -> dict:
    if modality == "text":
        widths = list(spec.text_widths)
        final_width, last = widths[-1], spec.text_final_is_last_layer
    else:
        widths, final_width, last = list(spec.image_widths), spec.final_width, False
    return {"modality": modality, "kind": "random", "name": f"{spec.encoder_name}-{modality}",
            "weights_sha256": f"random:{spec.seed}", "layer_indices": list(range(len(widths))),
            "layer_widths": widths, "final_width": final_width,
            "pooled_width": spec.pooled[0 if modality == "text" else 1], "dtype": spec.dtype,
            "final_is_last_layer": last, "extra": {}}


def _store(group: zarr.Group, name: str, values: np.ndarray, rows: int) -> None:
    chunks = (max(1, rows),) + values.shape[1:]
    dtype = str if values.dtype.kind == "U" else values.dtype  # variable-length UTF-8 in zarr v3
    arr = group.create_array(name, shape=values.shape, dtype=dtype, chunks=chunks,
                             compressors=[zarr.codecs.ZstdCodec(level=3), zarr.codecs.Crc32cCodec()],
                             config={"write_empty_chunks": True})
    arr[...] = values


def _modality(g: zarr.Group, rng, n: int, widths, final_width, pooled_width, final_is_last,
              lens, spec: TinySpec) -> list[dict]:
    lengths = rng.integers(lens[0], lens[1] + 1, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    total = int(offsets[-1])
    np_dtype = np.float16 if spec.dtype == "float16" else np.float32
    layers = [(rng.standard_normal((total, w)) * (k + 1) + k).astype(np_dtype)
              for k, w in enumerate(widths)]
    final = layers[-1] if final_is_last else rng.standard_normal((total, final_width)).astype(np_dtype)
    pooled = rng.standard_normal((n, pooled_width)).astype(np_dtype)
    _store(g, "offsets", offsets, spec.chunk_rows)
    for k, a in enumerate(layers):
        _store(g, f"layer_{k}", a, spec.chunk_rows)
    if not final_is_last:
        _store(g, "final", final, spec.chunk_rows)
    _store(g, "pooled", pooled, spec.chunk_rows)
    out = []
    for k in range(n):
        lo, hi = offsets[k], offsets[k + 1]
        out.append({"layers": [a[lo:hi].astype(np.float32) for a in layers],
                    "final": final[lo:hi].astype(np.float32),
                    "pooled": pooled[k].astype(np.float32)})
    return out


def write_tiny_cache(path: str | Path, spec: TinySpec | None = None) -> dict[str, Truth]:
    spec = spec or TinySpec()
    path = Path(path)
    rng = np.random.default_rng(spec.seed)
    root = zarr.open_group(str(path), mode="w-")
    truth: dict[str, Truth] = {}
    counts = {}
    for split, n_pairs in spec.splits.items():
        g = root.create_group(split)
        n_images = -(-n_pairs // spec.pairs_per_image)
        image_index = (np.arange(n_pairs) // spec.pairs_per_image).astype(np.int64)
        # Two pairs reuse an earlier text (identical texts stored once) so the text rows are
        # not simply the pair order.
        n_texts = max(1, n_pairs - 2)
        text_index = np.concatenate([np.arange(n_texts), [0, n_texts // 2]])[:n_pairs]
        text_index = text_index.astype(np.int64)
        if spec.task == "single-label":
            target = rng.integers(0, spec.num_labels, size=n_pairs).astype(np.int64)
        else:
            target = (rng.random((n_pairs, spec.num_labels)) < 0.4).astype(np.uint8)
        p = g.create_group("pairs")
        _store(p, "text_index", text_index, 16)
        _store(p, "image_index", image_index, 16)
        _store(p, "target", target, 16)
        _store(p, "sample_id", np.array([f"{split}-{i}" for i in range(n_pairs)], dtype=str), 16)
        ti = _identity(spec, "text")
        texts = _modality(g.create_group("text"), rng, n_texts, ti["layer_widths"],
                          ti["final_width"], ti["pooled_width"], ti["final_is_last_layer"],
                          spec.text_len, spec)
        ii = _identity(spec, "image")
        ig = g.create_group("image")
        images = _modality(ig, rng, n_images, ii["layer_widths"], ii["final_width"],
                           ii["pooled_width"], False, spec.image_len, spec)
        _store(ig, "image_key", np.array([f"img{k}.jpg" for k in range(n_images)], dtype=str), 16)
        counts[split] = {"pairs": n_pairs, "texts": n_texts, "images": n_images,
                         "text_tokens": int(sum(len(t["final"]) for t in texts)),
                         "image_tokens": int(sum(len(t["final"]) for t in images))}
        truth[split] = Truth(text_index, image_index, target, texts, images)
    manifest = {
        "format_version": spec.format_version, "molt_cache_version": "0.1.0",
        "dataset": {"name": "tiny", "root": "", "task": spec.task,
                    "labels": [f"label{k}" for k in range(spec.num_labels)], "fingerprint": "x"},
        "splits": counts, "text": _identity(spec, "text"), "image": _identity(spec, "image"),
        "perturbation": {"level": "none", "noise": 0.0, "noise_on": "both", "empty": None,
                         "seed": 0},
        "complete": spec.complete,
    }
    root.attrs["molt_cache"] = manifest
    if spec.complete:
        (path / "manifest.json").write_text(json.dumps(manifest, indent=2))
    else:
        (path / "_progress").mkdir()
    return truth
