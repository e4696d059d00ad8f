"""Running work units: one unit = one shard of a modality's flat token arrays.

A unit encodes every item that overlaps its token rows (items straddling a shard boundary alone, as
a batch of one, so both neighbouring units compute identical bytes), writes its whole shard and
then an atomic completion record. Images run first (a bad image fails early), then texts. Every
batch goes through `encode.encode_items`, the path `molt predict` shares.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from molt_cache.cache.layout import BAD_IMAGES_FILE
from molt_cache.cache.writer import STORAGE_DTYPES, BackgroundWriter, ModalityPlan, UnitResult
from molt_cache.datasets.base import DatasetError, ImageRef
from molt_cache.encoders.base import ImageEncoder, TextEncoder
from molt_cache.extract.config import ExtractConfig, ExtractResult
from molt_cache.extract.encode import ItemStates, encode_items, item_generator, load_image, text_batches
from molt_cache.extract.plan import _Rows
from molt_cache.finite import NonFiniteFeatureError


def _item_generator(enc, cfg: ExtractConfig, split: str, modality: str, item: int) -> torch.Generator:
    """The input-level noise generator of one item (encode.item_generator; `enc` is unused: the
    generator is on the CPU whatever the encoder's device)."""
    return item_generator(cfg.seed, split, modality, item)


_text_batches = text_batches  # the name tests and benchmarks know


def _fill(plan: ModalityPlan, unit: int, batch: list[int], states: list[ItemStates], enc,
          buffers: dict[str, np.ndarray], pooled: dict[int, np.ndarray], owned: set[int]) -> None:
    """Copy the real tokens of each batch item that fall in the unit's rows into the buffers."""
    a, b = plan.unit_rows(unit)
    for k, item in zip(batch, states):
        s, e = int(plan.offsets[k]), int(plan.offsets[k + 1])
        if item.num_tokens != e - s:
            raise RuntimeError(f"{plan.modality} encoder {enc.identity.name} returned {item.num_tokens} real "
                               f"tokens for item {k}; the planned length is {e - s}")
        lo, hi = max(s, a), min(e, b)
        for name, arr in zip(buffers, item.tokens):
            buffers[name][lo - a:hi - a] = arr[lo - s:hi - s]
        if k in owned:
            pooled[k] = item.pooled


def _unit_result(split: str, plan: ModalityPlan, unit: int, enc, run_batches,
                 advance: Callable[[str, int], None]) -> UnitResult:
    """run_batches(overlap, owned) yields (batch item ids, EncodedBatch)."""
    a, b = plan.unit_rows(unit)
    overlap, owned = plan.unit_items(unit)
    buffers = {n: np.zeros((b - a, w), dtype=STORAGE_DTYPES[plan.dtype]) for n, w in plan.token_widths.items()}
    pooled: dict[int, np.ndarray] = {}
    real = padded = 0
    owned_set = set(owned.tolist())
    try:
        for batch, encoded in run_batches(overlap, owned):
            _fill(plan, unit, batch, encoded.items, enc, buffers, pooled, owned_set)
            real, padded = real + encoded.real_tokens, padded + encoded.computed_tokens
            advance(plan.modality, sum(1 for k in batch if k in owned_set))  # each item counted once
    except NonFiniteFeatureError as e:  # the unit is never written nor recorded; extract names the sample
        e.split = split
        raise
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
            return i, self.transform(load_image(ref)), None  # ref None: the blank image
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


def _run_text_units(run: _Run, split: str, plan: ModalityPlan, token_ids: list[list[int]],
                    units: list[int], writer: BackgroundWriter, hook) -> None:
    cfg, enc = run.cfg, run.text_enc
    lengths = np.diff(plan.offsets)
    noisy = cfg.noise > 0 and cfg.noise_on in ("text", "both")
    for unit in units:
        def run_batches(overlap, owned):
            a, b = plan.unit_rows(unit)
            inner = overlap[(plan.offsets[overlap] >= a) & (plan.offsets[overlap + 1] <= b)]
            for batch in text_batches(overlap, inner, lengths, cfg.batch_tokens, single=noisy):
                gen = _item_generator(enc, cfg, split, "text", batch[0]) if noisy else None
                yield batch, encode_items(enc, [token_ids[k] for k in batch], modality="text", dtype=plan.dtype,
                                          expected_widths=plan.token_widths, items=batch,
                                          input_noise=cfg.noise if noisy else 0.0, generator=gen)

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
                yield batch, encode_items(enc, px, modality="image", dtype=plan.dtype,
                                          expected_widths=plan.token_widths, items=batch,
                                          input_noise=cfg.noise if noisy else 0.0, generator=gen)

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
