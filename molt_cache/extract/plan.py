"""Planning: everything `molt extract` decides before encoding anything.

Read every split's rows (ids and texts, never pixels), dedup texts and images, tokenize, fix exact
array shapes and the manifest, compare with any cache already in `out_dir`, check free disk.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from molt_cache.cache.layout import BAD_IMAGES_FILE, PROGRESS_DIR, shard_rows, token_array_names, token_chunk_rows
from molt_cache.cache.manifest import (CacheMismatchError, ManifestError, build_manifest, compare_manifests,
                                       dataset_fingerprint, read_manifest_attrs, read_manifest_file)
from molt_cache.cache.writer import STORAGE_DTYPES, ModalityPlan, SplitPlan
from molt_cache.datasets.base import DatasetError, DatasetReader, ImageRef
from molt_cache.encoders.base import ImageEncoder, TextEncoder
from molt_cache.extract.config import ExtractConfig
from molt_cache.encoders.text_limits import tokenize_splits
from molt_cache.extract.encode import BLANK_IMAGE_KEY, TEXT_BATCHING
from molt_cache.finite import NONFINITE_CHECK


@dataclass
class _Rows:
    """One split's pairs after dedup; texts and image refs only, never pixels."""


    split: str
    sample_ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # unique, first-appearance order
    text_index: list[int] = field(default_factory=list)
    image_keys: list[str] = field(default_factory=list)  # unique, first-appearance order
    image_refs: list[ImageRef | None] = field(default_factory=list)  # None = the blank image
    image_first_sample: list[str] = field(default_factory=list)  # names the image in errors
    image_index: list[int] = field(default_factory=list)
    targets: list[tuple[int, ...]] = field(default_factory=list)


def _resolve_rank(cfg: ExtractConfig) -> tuple[int, int, int]:
    rank = cfg.rank if cfg.rank is not None else int(os.environ.get("RANK", 0))
    world = cfg.world_size if cfg.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world_size {world}")
    return rank, world, local


def _resolve_device(cfg: ExtractConfig, local_rank: int, world: int) -> str:
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and world > 1:
        device = f"cuda:{local_rank}"
    try:
        parsed = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {cfg.device!r}; valid: 'auto', 'cpu', 'cuda', 'cuda:<index>'") from e
    if parsed.type == "cuda":
        # Fail here, naming the fix, not deep inside model.to() with "Torch not compiled with CUDA".
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA "
                             f"device(s) are visible (LOCAL_RANK={local_rank}); valid: "
                             f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


def _read_bad_images(out: Path) -> set[str]:
    path = out / BAD_IMAGES_FILE
    return {r["image_key"] for r in json.loads(path.read_text())} if path.exists() else set()


# What each release's root holds (the readers' docstrings), for errors about a wrong --root.
EXPECTED_ROOT_FILES = {
    "snli-ve": "snli_ve_train.jsonl, snli_ve_dev.jsonl, snli_ve_test.jsonl and the Flickr30k images in "
               "Flickr30K/flickr30k_images/ or flickr30k_images/ (or pass --image-dir)",
    "food101": "images/{train,test}/<class>/*.jpg and texts/{train,test}_titles.csv",
    "mmimdb": "split.json and dataset/<id>.json + dataset/<id>.jpeg",
    "mmimdb-hdf5": "multimodal_imdb.hdf5 and metadata.npy",
    "manifest": "manifest.jsonl or manifest.csv (or pass the manifest file itself)",
    "openclipart": "png/<category>/…/<name>.png beside svg/<category>/…/<name>.svg "
                   "(/usr/share/openclipart, or the folder the Debian packages were dpkg-deb -x'ed into)",
    "sample": "manifest.jsonl and its images (data/sample/)",
    "openclipart-sample": "manifest.jsonl, labels.json and its images (data/openclipart_sample/)",
}


def _open_reader(cfg: ExtractConfig) -> DatasetReader:
    """open_dataset, with a wrong root named together with what the release should hold."""
    from molt_cache.datasets import open_dataset

    expected = EXPECTED_ROOT_FILES.get(cfg.dataset)
    if cfg.root is not None and not Path(cfg.root).exists():
        raise FileNotFoundError(f"dataset root {cfg.root} does not exist"
                                + (f"; {cfg.dataset} expects there: {expected}" if expected else ""))
    try:
        return open_dataset(cfg.dataset, cfg.root, on_bad=cfg.on_bad, **cfg.dataset_options)
    except DatasetError as e:
        if expected is None or expected in str(e):
            raise
        raise DatasetError(f"{e} ({cfg.dataset} expects in its root {cfg.root}: {expected})") from e


def _collect(reader: DatasetReader, split: str, cfg: ExtractConfig, excluded: set[str]) -> tuple[_Rows, list]:
    """Stream the split once; dedup texts by exact string and images by image_key."""
    rows = _Rows(split)
    text_pos: dict[str, int] = {}
    image_pos: dict[str, int] = {}
    fp_rows = []
    for s in reader.samples(split):
        if cfg.limit is not None and len(rows.sample_ids) >= cfg.limit:
            break  # stop reading: a limited run never streams the rest of a large split
        where = s.source or f"sample {s.sample_id}"
        if not s.text.strip():
            reader.report.bad(where, "empty text")
            continue
        if s.image_key in excluded:
            reader.report.bad(where, f"image {s.image_key} failed to decode in an earlier run "
                                     f"(listed in {BAD_IMAGES_FILE})")
            continue
        if s.image_key not in image_pos and s.image.kind == "file" and not os.path.exists(s.image.path):
            # Cheap up-front check; decode errors are found later, while encoding.
            reader.report.bad(where, f"image file {s.image.path} does not exist (sample {s.sample_id})")
            excluded = excluded | {s.image_key}
            continue
        if reader.task == "single-label" and len(s.target) != 1:
            raise DatasetError(f"{where}: single-label dataset {reader.name} needs exactly one target, "
                               f"got {list(s.target)}")
        fp_rows.append((split, s.sample_id, s.image_key, s.text, tuple(s.target)))
        text = "" if cfg.empty == "text" else s.text
        key, ref = (BLANK_IMAGE_KEY, None) if cfg.empty == "image" else (s.image_key, s.image)
        if text not in text_pos:
            text_pos[text] = len(rows.texts)
            rows.texts.append(text)
        if key not in image_pos:
            image_pos[key] = len(rows.image_keys)
            rows.image_keys.append(key)
            rows.image_refs.append(ref)
            rows.image_first_sample.append(s.sample_id)
        rows.sample_ids.append(s.sample_id)
        rows.text_index.append(text_pos[text])
        rows.image_index.append(image_pos[key])
        rows.targets.append(tuple(s.target))
    if not rows.sample_ids:
        raise DatasetError(f"split {split!r} of {reader.name} has no usable samples")
    return rows, fp_rows


def _modality_plan(modality: str, lengths: np.ndarray, enc, cfg: ExtractConfig, multiple_of: int) -> ModalityPlan:
    ident = enc.identity
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    names = token_array_names(len(ident.layer_widths), ident.final_is_last_layer)
    widths = list(ident.layer_widths) + ([] if ident.final_is_last_layer else [ident.final_width])
    itemsize = np.dtype(STORAGE_DTYPES[ident.dtype]).itemsize
    n_tokens = int(offsets[-1])
    chunk = token_chunk_rows(widths, itemsize, n_tokens, cfg.layout(), multiple_of=multiple_of)
    return ModalityPlan(modality=modality, offsets=offsets, token_widths=dict(zip(names, widths)),
                        pooled_width=ident.pooled_width, dtype=ident.dtype, chunk_rows=chunk,
                        shard_rows=shard_rows(chunk, n_tokens, cfg.layout()))


def _check_out_dir(out: Path, wanted: dict, log: Callable[[str], None] = lambda line: None) -> str:
    """'new' | 'resume' | 'complete'; refuses any other content, listing differing fields."""
    try:
        done = read_manifest_file(out)
    except ManifestError as e:  # the arrays and records decide; the finish rewrites manifest.json
        log(f"{e}; resuming, it is rewritten at the end")
        done = None
    if done is not None:
        diffs = compare_manifests(done, wanted)
        if diffs:
            raise CacheMismatchError(f"{out} holds a complete cache made differently; differing fields:\n  "
                                     + "\n  ".join(diffs) + "\nchoose another --out-dir")
        return "complete"
    started = read_manifest_attrs(out)
    if started is not None:
        diffs = compare_manifests(started, wanted)
        if diffs:
            raise CacheMismatchError(f"{out} holds a partial cache made differently; differing fields:\n  "
                                     + "\n  ".join(diffs) + "\nchoose another --out-dir, or delete it")
        return "resume"
    if out.exists():
        other = sorted(p.name for p in out.iterdir() if p.name not in (BAD_IMAGES_FILE, PROGRESS_DIR))
        if other:
            raise CacheMismatchError(f"{out} is not empty and holds no molt cache ({other[:5]}); "
                                     "choose an empty or new folder")
    return "new"


def open_encoders(cfg: ExtractConfig, device: str, dtype: str, text_encoder: TextEncoder | None = None,
                  image_encoder: ImageEncoder | None = None) -> tuple[TextEncoder, ImageEncoder]:
    """The encoders `cfg` names (unless given), checked: a storable dtype and cfg.layers layers."""
    if text_encoder is None or image_encoder is None:
        from molt_cache.encoders import create_image_encoder, create_text_encoder
        text_encoder = text_encoder or create_text_encoder(cfg.text, device=device, dtype=dtype, layers=cfg.layers,
                                                           max_length=cfg.max_length)
        image_encoder = image_encoder or create_image_encoder(cfg.image, device=device, dtype=dtype,
                                                              layers=cfg.layers, weights=cfg.image_weights)
    for enc in (text_encoder, image_encoder):
        if enc.identity.dtype not in STORAGE_DTYPES:
            raise ValueError(f"encoder {enc.identity.name} has dtype {enc.identity.dtype!r}; "
                             f"valid: {list(STORAGE_DTYPES)}")
        if len(enc.identity.layer_widths) != cfg.layers:
            raise ValueError(f"encoder {enc.identity.name} keeps {len(enc.identity.layer_widths)} layers; "
                             f"this run asks for {cfg.layers}")
    return text_encoder, image_encoder


def tokenize_texts(text_encoder: TextEncoder, texts: list[str]) -> list[list[int]]:
    """Token ids per text; an encoder that gives a text no token at all is refused (the cache
    stores every text as ≥ 1 token row)."""
    ids = text_encoder.tokenize(texts)
    empty_ids = [texts[k] for k, t in enumerate(ids) if len(t) == 0]
    if empty_ids:
        raise ValueError(f"text encoder {text_encoder.identity.name} gives no tokens for "
                         f"{empty_ids[0]!r}; it must add at least one special token")
    return ids


@dataclass
class ExtractPlan:
    """What a run will write: per split its rows, token ids and exact array shapes; the manifest."""

    splits: list[SplitPlan]
    rows: list[_Rows]  # per split, same order
    token_ids: list[list[list[int]]]  # per split, per unique text
    manifest: dict  # complete=False until finish
    excluded: set[str]  # image keys listed in BAD_IMAGES_FILE by an earlier run
    text_lengths: dict = field(default_factory=dict)  # encoders/text_limits.tokenize_splits: max length, truncation

    @property
    def bytes_planned(self) -> int:
        return sum(p.planned_bytes() for p in self.splits)


def read_rows(cfg: ExtractConfig, reader: DatasetReader, out: Path) -> tuple[list[_Rows], list, set[str]]:
    """Every requested split's rows after dedup, the dataset-fingerprint rows, the excluded images."""
    splits = list(cfg.splits) if cfg.splits else list(reader.splits)
    unknown = [s for s in splits if s not in reader.splits]
    if unknown:
        raise ValueError(f"splits {unknown} not in {reader.name}; valid: {list(reader.splits)}")
    excluded = _read_bad_images(out)
    collected, fp_rows = [], []
    for split in splits:
        rows, fp = _collect(reader, split, cfg, excluded)
        collected.append(rows)
        fp_rows += fp
    return collected, fp_rows, excluded


def plan_extraction(cfg: ExtractConfig, reader: DatasetReader, collected: list[_Rows], fp_rows: list,
                    excluded: set[str], text_encoder: TextEncoder, image_encoder: ImageEncoder) -> ExtractPlan:
    """Tokenize, size every array exactly, and build the (incomplete) manifest."""
    plans: list[SplitPlan] = []
    # every split tokenized and length-checked before any unit runs; truncation counted per split
    token_ids_per_split, text_lengths = tokenize_splits(text_encoder, [(r.split, r.texts) for r in collected])
    for rows, ids in zip(collected, token_ids_per_split):
        lengths = np.array([len(t) for t in ids], dtype=np.int64)
        n_img = image_encoder.num_tokens
        task_multi = reader.task == "multi-label"
        if task_multi:
            targets = np.zeros((len(rows.targets), len(reader.labels)), dtype=np.uint8)
            for i, t in enumerate(rows.targets):
                targets[i, list(t)] = 1
        else:
            targets = np.array([t[0] for t in rows.targets], dtype=np.int64)
        plans.append(SplitPlan(
            split=rows.split, sample_ids=rows.sample_ids,
            text_index=np.array(rows.text_index, dtype=np.int64),
            image_index=np.array(rows.image_index, dtype=np.int64), targets=targets,
            image_keys=rows.image_keys,
            text=_modality_plan("text", lengths, text_encoder, cfg, 1),
            image=_modality_plan("image", np.full(len(rows.image_keys), n_img, dtype=np.int64),
                                 image_encoder, cfg, n_img)))

    layout = {"text_chunk_rows": {p.split: p.text.chunk_rows for p in plans},
              "image_chunk_rows": {p.split: p.image.chunk_rows for p in plans},
              "shard_chunks": cfg.shard_chunks, "chunk_bytes": cfg.chunk_bytes,
              "item_chunk_rows": cfg.item_chunk_rows}
    manifest = build_manifest(
        dataset={"name": reader.name, "root": cfg.root, "task": reader.task, "labels": list(reader.labels),
                 "fingerprint": dataset_fingerprint(fp_rows), "excluded_images": sorted(excluded),
                 "limit": cfg.limit, "notes": list(getattr(reader, "notes", []) or [])},
        splits={p.split: {"pairs": len(p.sample_ids), "texts": p.text.n_items, "images": p.image.n_items,
                          "text_tokens": p.text.n_tokens, "image_tokens": p.image.n_tokens} for p in plans},
        text=text_encoder.identity, image=image_encoder.identity, perturbation=cfg.perturbation(),
        layout=layout, complete=False)
    manifest["extraction"] = {"text_spec": cfg.text, "image_spec": cfg.image, "image_weights": cfg.image_weights,
                              "dataset_options": cfg.dataset_options, "batch_tokens": cfg.batch_tokens,
                              "image_batch_size": cfg.image_batch_size, "on_bad": cfg.on_bad,
                              "text_batching": TEXT_BATCHING, "nonfinite_check": NONFINITE_CHECK}
    manifest["text_lengths"] = text_lengths
    return ExtractPlan(plans, collected, token_ids_per_split, manifest, excluded, text_lengths)


def preflight_disk(cfg: ExtractConfig, plan: ExtractPlan, out: Path, done: list[bool],
                   log: Callable[[str], None]) -> None:
    """Exact uncompressed sizes (zstd only shrinks them: an upper bound) against free disk."""
    for p in plan.splits:
        for m in (p.text, p.image):
            log(f"{p.split}/{m.modality}: {m.n_items} items, {m.n_tokens} tokens, "
                f"{len(m.token_widths)} token arrays {list(m.token_widths.values())} wide, "
                f"{m.planned_bytes() / 1e6:.1f} MB uncompressed, {m.n_units} units")
    remaining = int(plan.bytes_planned * (1 - sum(done) / max(1, len(done))))
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    log(f"cache needs at most {remaining / 1e6:.1f} MB more (uncompressed upper bound); "
        f"{free / 1e6:.0f} MB free")
    if free < remaining and not cfg.force:
        raise OSError(f"not enough free disk in {out}: need up to {remaining / 1e6:.1f} MB (uncompressed "
                      f"upper bound), {free / 1e6:.1f} MB free; free space or pass --force")
