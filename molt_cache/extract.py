"""Stage one: dataset reader → frozen encoders → sharded Zarr cache. Resumable and rank-aware.

setup: read every split's rows (ids and texts, never images), dedup texts and images, tokenize,
       fix exact array shapes, check free disk, compare with any cache already in `out_dir`.
run:   work units = one shard of a modality's flat token arrays. A unit encodes every item that
       overlaps its token rows (items straddling a shard boundary alone, as a batch of one, so
       both neighbouring units compute identical bytes), writes its whole shard and then an atomic
       completion record. A rerun skips recorded units; units split across ranks are disjoint.
finish: rank 0 assembles the pooled arrays from the records and writes manifest.json last.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

from molt_cache.cache.layout import (BAD_IMAGES_FILE, CREATED_MARKER, MANIFEST_FILE, PROGRESS_DIR,
                                     LayoutOptions, shard_rows, token_array_names,
                                     token_chunk_rows, unit_record_path)
from molt_cache.cache.manifest import (CacheMismatchError, ManifestError, build_manifest, compare_manifests,
                                       dataset_fingerprint, read_manifest_attrs,
                                       read_manifest_file, write_manifest_file)
from molt_cache.cache.lock import job_id, writer_lock
from molt_cache.cache.repair import repair_damage
from molt_cache.cache.writer import (STORAGE_DTYPES, BackgroundWriter, ModalityPlan, SplitPlan,
                                     UnitResult, create_cache, to_storage, write_pooled,
                                     write_pooled_record)
from molt_cache.datasets.base import DatasetError, DatasetReader, ImageRef
from molt_cache.encoders.base import EncoderOutput, ImageEncoder, TextEncoder
from molt_cache.validate import COUNT, NON_NEGATIVE, NON_NEGATIVE_INT, Range, check_numbers

console = Console(stderr=True)

BLANK_IMAGE_KEY = "<blank>"
BLANK_IMAGE_SIZE = 224
BLANK_IMAGE_RGB = (128, 128, 128)  # mid-gray: close to zero after CLIP/ImageNet normalization


@dataclass
class ExtractConfig:
    """`molt extract`: one cache per (dataset, encoder pair, perturbation)."""

    dataset: str = "sample"  # a name from molt_cache.datasets.list_datasets()
    root: str | None = None  # dataset folder (None only for "sample")
    dataset_options: dict[str, Any] = field(default_factory=dict)  # passed to open_dataset
    splits: list[str] | None = None  # None = every split the reader has
    limit: int | None = None  # keep the first N usable pairs of each split (reader order, before dedup)
    text: str = "tiny:llama"  # text encoder spec (molt_cache.encoders.create_text_encoder)
    image: str = "tiny:vit"  # image encoder spec
    image_weights: str | None = None  # optional weights file for the image tower
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
        limit=manifest["dataset"].get("limit"))
    return dataclasses.replace(cfg, **overrides)


# ----------------------------------------------------------------------------------- setup


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
    "sample": "manifest.jsonl and its images (data/sample/)",
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


def _check_out_dir(out: Path, wanted: dict) -> str:
    """'new' | 'resume' | 'complete'; refuses any other content, listing differing fields."""
    try:
        done = read_manifest_file(out)
    except ManifestError as e:  # the arrays and records decide; the finish rewrites manifest.json
        console.print(f"[yellow]{e}; resuming, it is rewritten at the end[/]")
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


# ------------------------------------------------------------------------------------- run


def _item_generator(enc, cfg: ExtractConfig, split: str, modality: str, item: int) -> torch.Generator:
    """Noise depends on (seed, split, modality, item) only, never on batching nor on the device.

    Always a CPU generator, whatever `enc.device`: the noise helper draws on the generator's
    device and moves the draw to the input's, so a CUDA run stores the same noise as a CPU run
    (a CUDA generator is another RNG, Philox, and would give other numbers for the same seed)."""
    key = hashlib.sha256(f"{cfg.seed}/{split}/{modality}/{item}".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(key[:8], "little") & ((1 << 63) - 1))
    return g


# MKL's sgemm (torch's CPU BLAS) takes another kernel below 4 rows, so a text of 1-3 tokens run
# alone (the reference "model on this text alone") rounds differently from the same text in a batch;
# such texts are encoded alone. From 4 tokens on, a row's bits do not depend on the batch size.
ALONE_BELOW_TOKENS = 4
TEXT_BATCHING = "equal-length batches, no padding; texts under 4 tokens and straddling texts alone"


def _text_batches(items: np.ndarray, inner: np.ndarray, lengths: np.ndarray, budget: int,
                  single: bool) -> list[list[int]]:
    """Fully-contained items sorted by length (stable) and batched only with items of the *same*
    length, at most max(1, budget // length) per batch; straddling items, items shorter than
    ALONE_BELOW_TOKENS and (`single`) every item alone. No batch holds a padding token, so every
    stored row is bit-identical (CPU, fp32) to the model run on that text alone: padding changes
    the attention's reduction length and with it the rounding. Depends only on the unit, so any
    rerun repeats it exactly."""
    inner_set = set(inner.tolist())
    batches: list[list[int]] = [[int(k)] for k in items if k not in inner_set]
    order = sorted(inner.tolist(), key=lambda k: (int(lengths[k]), k))
    cur: list[int] = []
    for k in order:
        length = int(lengths[k])
        if cur and (single or length != int(lengths[cur[0]]) or length < ALONE_BELOW_TOKENS
                    or length * (len(cur) + 1) > budget):
            batches.append(cur)
            cur = []
        cur.append(int(k))
    if cur:
        batches.append(cur)
    return batches


def _fill(plan: ModalityPlan, unit: int, batch: list[int], out: EncoderOutput, enc,
          buffers: dict[str, np.ndarray], pooled: dict[int, np.ndarray], owned: set[int]) -> tuple[int, int]:
    """Copy the real tokens of each batch item that fall in the unit's rows into the buffers."""
    a, b = plan.unit_rows(unit)
    tensors = list(out.layers) + ([] if enc.identity.final_is_last_layer else [out.final])
    if len(tensors) != len(buffers):
        raise RuntimeError(f"{plan.modality} encoder {enc.identity.name} returned {len(tensors)} token "
                           f"arrays; the cache expects {list(buffers)}")
    mask = out.mask.to("cpu").bool()
    arrays = [to_storage(t, plan.dtype) for t in tensors]
    pool = to_storage(out.pooled, plan.dtype)
    for name, arr in zip(buffers, arrays):
        if arr.shape[1] != mask.shape[1]:  # one offsets array per modality: all arrays share tokens
            raise RuntimeError(f"{plan.modality} encoder {enc.identity.name}: {name} has {arr.shape[1]} tokens "
                               f"per item but the mask has {mask.shape[1]}; every stored array of an item "
                               "must share one token count (docs/cache-format.md)")
        if arr.shape[-1] != buffers[name].shape[1]:
            raise RuntimeError(f"{plan.modality} encoder {enc.identity.name}: {name} has width "
                               f"{arr.shape[-1]}, its identity says {buffers[name].shape[1]}")
    for i, k in enumerate(batch):
        s, e = int(plan.offsets[k]), int(plan.offsets[k + 1])
        m = mask[i].numpy()
        if int(m.sum()) != e - s:
            raise RuntimeError(f"{plan.modality} encoder {enc.identity.name} returned {int(m.sum())} real "
                               f"tokens for item {k}; the planned length is {e - s}")
        lo, hi = max(s, a), min(e, b)
        for name, arr in zip(buffers, arrays):
            buffers[name][lo - a:hi - a] = arr[i][m][lo - s:hi - s]
        if k in owned:
            pooled[k] = pool[i]
    return int(mask.sum()), int(mask.numel())


def _unit_result(split: str, plan: ModalityPlan, unit: int, enc, run_batches,
                 advance: Callable[[str, int], None]) -> UnitResult:
    a, b = plan.unit_rows(unit)
    overlap, owned = plan.unit_items(unit)
    buffers = {n: np.zeros((b - a, w), dtype=STORAGE_DTYPES[plan.dtype]) for n, w in plan.token_widths.items()}
    pooled: dict[int, np.ndarray] = {}
    real = padded = 0
    owned_set = set(owned.tolist())
    for batch, out in run_batches(overlap, owned):
        r, p = _fill(plan, unit, batch, out, enc, buffers, pooled, owned_set)
        real, padded = real + r, padded + p
        advance(plan.modality, sum(1 for k in batch if k in owned_set))  # each item counted once
    pooled_rows = (np.stack([pooled[int(k)] for k in owned]) if len(owned)
                   else np.zeros((0, plan.pooled_width), dtype=STORAGE_DTYPES[plan.dtype]))
    return UnitResult(split=split, modality=plan.modality, unit=unit, rows=(a, b), token_arrays=buffers,
                      first_item=int(owned[0]) if len(owned) else int(overlap[0]), pooled=pooled_rows,
                      real_tokens=real, padded_tokens=padded)


class _ImageJobs(torch.utils.data.Dataset):
    """(unit, item) jobs decoded and transformed in DataLoader workers; errors come back as text
    so the main process applies the on_bad policy."""

    def __init__(self, jobs: list[tuple[int, int]], refs: list[ImageRef | None], transform):
        self.jobs, self.refs, self.transform = jobs, refs, transform

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int):
        ref = self.refs[self.jobs[i][1]]
        try:
            img = (Image.new("RGB", (BLANK_IMAGE_SIZE, BLANK_IMAGE_SIZE), BLANK_IMAGE_RGB)
                   if ref is None else ref.open())
            return i, self.transform(img), None
        except DatasetError as e:
            return i, None, str(e)


def _as_list(batch):
    return batch


@dataclass
class _Run:
    cfg: ExtractConfig
    out: Path
    text_enc: TextEncoder
    image_enc: ImageEncoder
    stats: ExtractResult
    tick: Callable[[], None]  # after each unit
    advance: Callable[[str, int], None]  # (modality, items finished) after each batch


class _ItemRate(ProgressColumn):
    """Items per second of one task (rich's own speed columns speak bytes)."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed and task.elapsed:  # rich needs two updates for a speed; one batch is enough here
            speed = task.completed / task.elapsed
        unit = task.fields.get("unit", "items")
        return Text(f"{speed:,.1f} {unit}/s" if speed else f"? {unit}/s", style="progress.data.speed")


class _ModalityBars:
    """One rich bar per modality: items done of this rank's items, rate, time remaining."""

    def __init__(self, rank: int, world: int, totals: dict[str, int]):
        who = f" (rank {rank}/{world})" if world > 1 else ""
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 _ItemRate(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                 console=console, transient=False)
        unit = {"image": "images", "text": "texts"}
        self.tasks = {m: self.progress.add_task(f"{unit[m]}{who}", total=totals[m], unit=unit[m], start=False)
                      for m in ("image", "text")}  # images run first; each clock starts with its phase

    def start(self) -> None:
        self.progress.start()

    def begin(self, modality: str) -> None:
        self.progress.start_task(self.tasks[modality])

    def advance(self, modality: str, n: int) -> None:
        self.progress.advance(self.tasks[modality], n)

    def stop(self) -> None:
        self.progress.stop()


def _run_text_units(run: _Run, split: str, plan: ModalityPlan, token_ids: list[list[int]],
                    units: list[int], writer: BackgroundWriter, hook) -> None:
    cfg, enc = run.cfg, run.text_enc
    lengths = np.diff(plan.offsets)
    noisy = cfg.noise > 0 and cfg.noise_on in ("text", "both")
    for unit in units:
        def run_batches(overlap, owned):
            a, b = plan.unit_rows(unit)
            inner = overlap[(plan.offsets[overlap] >= a) & (plan.offsets[overlap + 1] <= b)]
            for batch in _text_batches(overlap, inner, lengths, cfg.batch_tokens, single=noisy):
                gen = _item_generator(enc, cfg, split, "text", batch[0]) if noisy else None
                with torch.inference_mode():
                    out = enc.encode([token_ids[k] for k in batch], input_noise=cfg.noise if noisy else 0.0,
                                     generator=gen)
                yield batch, out

        r = _unit_result(split, plan, unit, enc, run_batches, run.advance)
        run.stats.text_tokens += r.real_tokens
        run.stats.padding_tokens += r.padded_tokens - r.real_tokens
        writer.put(r)
        run.stats.units_done += 1
        run.tick()
        if hook:
            hook(split, "text", unit)


def _run_image_units(run: _Run, split: str, plan: ModalityPlan, rows: _Rows, units: list[int],
                     writer: BackgroundWriter, hook, bad: list[dict]) -> None:
    cfg, enc = run.cfg, run.image_enc
    noisy = cfg.noise > 0 and cfg.noise_on in ("image", "both")
    jobs = [(u, int(k)) for u in units for k in plan.unit_items(u)[0]]
    loader = torch.utils.data.DataLoader(_ImageJobs(jobs, rows.image_refs, enc.transform),
                                         batch_size=cfg.image_batch_size, num_workers=cfg.num_workers,
                                         collate_fn=_as_list, shuffle=False)
    pending: dict[int, torch.Tensor] = {}
    current = jobs[0][0] if jobs else None

    def finish(unit: int) -> None:
        a, b = plan.unit_rows(unit)

        def run_batches(overlap, owned):
            inner = [int(k) for k in overlap if plan.offsets[k] >= a and plan.offsets[k + 1] <= b]
            size = 1 if noisy else cfg.image_batch_size
            batches = [[int(k)] for k in overlap if int(k) not in set(inner)]
            batches += [inner[i:i + size] for i in range(0, len(inner), size)]
            for batch in batches:
                px = torch.stack([pending[k] for k in batch]).to(enc.device, enc.dtype)
                gen = _item_generator(enc, cfg, split, "image", batch[0]) if noisy else None
                with torch.inference_mode():
                    out = enc.encode(px, input_noise=cfg.noise if noisy else 0.0, generator=gen)
                yield batch, out

        r = _unit_result(split, plan, unit, enc, run_batches, run.advance)
        run.stats.images += len(plan.unit_items(unit)[1])
        writer.put(r)
        run.stats.units_done += 1
        run.tick()
        if hook:
            hook(split, "image", unit)

    for chunk in loader:
        for i, pixels, err in chunk:
            unit, k = jobs[i]
            if err is not None:
                if cfg.on_bad == "error":
                    raise DatasetError(f"{err} (image {rows.image_keys[k]}, first used by sample "
                                       f"{rows.image_first_sample[k]}; pass --on-bad skip to exclude it)")
                bad.append({"split": split, "image_key": rows.image_keys[k],
                            "sample_id": rows.image_first_sample[k], "error": err})
            if bad:
                continue  # scan-only from the first bad image: find all of them in this run
            if unit != current:
                finish(current)
                pending = {}  # a straddling item is a job of both units, decoded again
                current = unit
            pending[k] = pixels
    if current is not None and not bad:
        finish(current)


def _fail_on_bad_images(out: Path, bad: list[dict], world: int) -> None:
    """Arrays were sized with these images: record them, drop this run's partial data (world
    size 1), and ask for a rerun, which excludes them and changes the dataset fingerprint."""
    path = out / BAD_IMAGES_FILE
    known = json.loads(path.read_text()) if path.exists() else []
    seen = {r["image_key"] for r in known}
    known += [r for r in bad if r["image_key"] not in seen]
    path.write_text(json.dumps(known, indent=1) + "\n")
    listing = "\n  ".join(f"{r['image_key']} (sample {r['sample_id']}): {r['error']}" for r in bad[:20])
    more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
    if world == 1:
        for p in out.iterdir():
            if p.name != BAD_IMAGES_FILE:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        action = "removed this partial cache (its arrays were sized with those images)"
    else:
        action = "delete this partial cache folder except that file once every rank has stopped"
    raise DatasetError(f"{len({r['image_key'] for r in bad})} images failed to decode:\n  {listing}{more}\nrecorded in {path}; "
                       f"{action}; rerun the same command to extract without them")


def _wait_for(cond: Callable[[], bool], what: str, timeout: float | None) -> bool:
    start = time.monotonic()
    while not cond():
        if timeout is not None and time.monotonic() - start >= timeout:
            return False
        time.sleep(1.0)
    return True


def _all_units_done(out: Path, plans: list[SplitPlan]) -> bool:
    return all(unit_record_path(out, p.split, m.modality, u).exists()
               for p in plans for m in (p.text, p.image) for u in range(m.n_units))


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def extract(cfg: ExtractConfig, **kwargs: Any) -> ExtractResult:
    """Extract (or resume, or reuse, or repair) the cache `cfg.out_dir`, holding its writer lock
    (molt_cache/cache/lock.py: one job per folder; a second job is refused naming the first)."""
    cfg.validate()
    world = _resolve_rank(cfg)[1]
    options = {k: getattr(cfg, k) for k in ("dataset", "text", "image", "noise", "noise_on", "empty", "seed", "limit")}
    with writer_lock(cfg.out_dir, job=job_id(world), options=options):
        return _extract_locked(cfg, **kwargs)


def _extract_locked(cfg: ExtractConfig, *, progress: Callable[[int, int], None] | None = None,
                    reader: DatasetReader | None = None, text_encoder: TextEncoder | None = None,
                    image_encoder: ImageEncoder | None = None,
                    unit_hook: Callable[[str, str, int], None] | None = None) -> ExtractResult:
    """Extract (or resume, or reuse) the cache `cfg.out_dir`.

    progress(units_done, units_total) is called after each unit; without it, rich progress bars
    per modality (images, then texts) count items with their rate and time remaining.
    reader / text_encoder / image_encoder replace the ones `cfg` names (tests, benchmarks).
    unit_hook(split, modality, unit) runs after each unit is queued (tests simulate crashes).
    """
    cfg.validate()
    t0 = time.perf_counter()
    rank, world, local = _resolve_rank(cfg)
    device = _resolve_device(cfg, local, world)
    dtype = cfg.dtype if cfg.dtype != "auto" else ("float16" if device.startswith("cuda") else "float32")
    out = Path(cfg.out_dir)

    # ---- setup: rows, encoders, tokens, exact shapes, manifest
    if reader is None:
        reader = _open_reader(cfg)
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
    if reader.report.rows:
        console.print(f"[yellow]{reader.report.summary()}[/] (first: {reader.report.rows[0].source}: "
                      f"{reader.report.rows[0].reason})")

    if text_encoder is None or image_encoder is None:
        from molt_cache.encoders import create_image_encoder, create_text_encoder
        text_encoder = text_encoder or create_text_encoder(cfg.text, device=device, dtype=dtype, layers=cfg.layers)
        image_encoder = image_encoder or create_image_encoder(cfg.image, device=device, dtype=dtype,
                                                              layers=cfg.layers, weights=cfg.image_weights)
    for enc in (text_encoder, image_encoder):
        if enc.identity.dtype not in STORAGE_DTYPES:
            raise ValueError(f"encoder {enc.identity.name} has dtype {enc.identity.dtype!r}; "
                             f"valid: {list(STORAGE_DTYPES)}")
        if len(enc.identity.layer_widths) != cfg.layers:
            raise ValueError(f"encoder {enc.identity.name} keeps {len(enc.identity.layer_widths)} layers; "
                             f"this run asks for {cfg.layers}")

    plans: list[SplitPlan] = []
    token_ids_per_split: list[list[list[int]]] = []
    for rows in collected:
        ids = text_encoder.tokenize(rows.texts)
        empty_ids = [rows.texts[k] for k, t in enumerate(ids) if len(t) == 0]
        if empty_ids:
            raise ValueError(f"text encoder {text_encoder.identity.name} gives no tokens for "
                             f"{empty_ids[0]!r}; it must add at least one special token")
        token_ids_per_split.append(ids)
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
                 "limit": cfg.limit},
        splits={p.split: {"pairs": len(p.sample_ids), "texts": p.text.n_items, "images": p.image.n_items,
                          "text_tokens": p.text.n_tokens, "image_tokens": p.image.n_tokens} for p in plans},
        text=text_encoder.identity, image=image_encoder.identity, perturbation=cfg.perturbation(),
        layout=layout, complete=False)
    manifest["extraction"] = {"text_spec": cfg.text, "image_spec": cfg.image, "image_weights": cfg.image_weights,
                              "dataset_options": cfg.dataset_options, "batch_tokens": cfg.batch_tokens,
                              "image_batch_size": cfg.image_batch_size, "on_bad": cfg.on_bad,
                              "text_batching": TEXT_BATCHING}

    state = _check_out_dir(out, manifest)
    if state != "new" and repair_damage(out, plans, manifest, cfg.layout(), rank, world, console.print):
        state = "resume"  # records that no longer match their files were dropped: redo those units
    result = ExtractResult(out_dir=out, complete=False, reused=False,
                           bytes_planned=sum(p.planned_bytes() for p in plans))
    if state == "complete":
        console.print(f"cache complete, reusing {out}")
        result.complete = result.reused = True
        result.bytes_on_disk = _dir_bytes(out)
        return result

    # ---- disk: exact uncompressed sizes (zstd only shrinks them: an upper bound)
    all_units = [(p, m, u) for p in plans for m in (p.image, p.text) for u in range(m.n_units)]
    done = [unit_record_path(out, p.split, m.modality, u).exists() for p, m, u in all_units]
    for p in plans:
        for m in (p.text, p.image):
            console.print(f"{p.split}/{m.modality}: {m.n_items} items, {m.n_tokens} tokens, "
                          f"{len(m.token_widths)} token arrays {list(m.token_widths.values())} wide, "
                          f"{m.planned_bytes() / 1e6:.1f} MB uncompressed, {m.n_units} units")
    remaining = int(result.bytes_planned * (1 - sum(done) / max(1, len(done))))
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    console.print(f"cache needs at most {remaining / 1e6:.1f} MB more (uncompressed upper bound); "
                  f"{free / 1e6:.0f} MB free")
    if free < remaining and not cfg.force:
        raise OSError(f"not enough free disk in {out}: need up to {remaining / 1e6:.1f} MB (uncompressed "
                      f"upper bound), {free / 1e6:.1f} MB free; free space or pass --force")

    # ---- create (rank 0) or wait for rank 0
    created = out / PROGRESS_DIR / CREATED_MARKER
    if rank == 0:
        if not created.exists():
            create_cache(out, plans, manifest, cfg.layout())
        if reader.report.rows:
            reader.report.write(out / "bad_rows.json")
    elif not _wait_for(lambda: created.exists(), "rank 0 to create the arrays", cfg.rank_wait_s):
        raise TimeoutError(f"rank {rank}: rank 0 did not create the arrays in {out} within {cfg.rank_wait_s}s")
    elif compare_manifests(read_manifest_attrs(out) or {}, manifest):
        raise CacheMismatchError(f"rank {rank}: rank 0 created a cache with another manifest:\n  "
                                 + "\n  ".join(compare_manifests(read_manifest_attrs(out) or {}, manifest)))

    # ---- run this rank's units: images first (a bad image fails early), then texts
    mine = [(p, m, u) for i, ((p, m, u), d) in enumerate(zip(all_units, done)) if i % world == rank and not d]
    result.units_skipped = sum(1 for i, d in enumerate(done) if i % world == rank and d)
    total = len(mine)
    item_totals = {"image": 0, "text": 0}
    for p, m, u in mine:
        item_totals[m.modality] += len(m.unit_items(u)[1])
    bar = _ModalityBars(rank, world, item_totals) if progress is None else None
    run = _Run(cfg, out, text_encoder, image_encoder, result,
               tick=lambda: progress(result.units_done, total) if progress else None,
               advance=bar.advance if bar else lambda modality, n: None)
    writer = BackgroundWriter(out)
    bad: list[dict] = []
    try:
        if bar is not None:
            bar.start()
        t_image = time.perf_counter()
        if bar is not None:
            bar.begin("image")
        for p, rows, ids in zip(plans, collected, token_ids_per_split):
            units = [u for q, m, u in mine if q is p and m is p.image]
            _run_image_units(run, p.split, p.image, rows, units, writer, unit_hook, bad)
        result.image_seconds = time.perf_counter() - t_image
        if bad:
            writer.close()
            _fail_on_bad_images(out, bad, world)
        t_text = time.perf_counter()
        if bar is not None:
            bar.begin("text")
        for p, rows, ids in zip(plans, collected, token_ids_per_split):
            units = [u for q, m, u in mine if q is p and m is p.text]
            _run_text_units(run, p.split, p.text, ids, units, writer, unit_hook)
        result.text_seconds = time.perf_counter() - t_text
    finally:
        if bar is not None:
            bar.stop()
        writer.close()  # flush finished units even when a later one failed: they are valid
    result.bytes_written = writer.bytes_written
    result.padding_fraction = result.padding_tokens / max(1, result.text_tokens)

    # ---- finish: rank 0, once every rank's units are recorded
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank == 0:
        if _wait_for(lambda: _all_units_done(out, plans), "other ranks", cfg.rank_wait_s):
            for p in plans:
                write_pooled(out, p)
            write_pooled_record(out, plans)
            final = dict(manifest, complete=True)
            import zarr
            from molt_cache.cache.layout import MANIFEST_ATTR
            zarr.open_group(out, mode="r+").attrs.put({MANIFEST_ATTR: final})
            write_manifest_file(out, final)  # last: its presence means complete
            result.complete = True
        else:
            console.print("rank 0: units of other ranks are not all recorded yet; rerun rank 0 to finish")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()

    result.seconds = time.perf_counter() - t0
    result.bytes_on_disk = _dir_bytes(out)
    console.print(f"rank {rank}: {result.units_done} units encoded, {result.units_skipped} already done; "
                  f"{result.text_tokens} text tokens ({result.tokens_per_s:.0f}/s), {result.images} images "
                  f"({result.images_per_s:.1f}/s), padding {result.padding_fraction:.1%} of real tokens, "
                  f"{result.bytes_written / 1e6:.1f} MB written (uncompressed), {result.bytes_on_disk / 1e6:.1f} MB "
                  f"on disk" + (f"; {MANIFEST_FILE} written" if result.complete else ""))
    return result
