"""`extract()`: plan → run units → finish, for one rank. Reports through callbacks only; the CLI
(cli/extract.py, cli/progress.py) renders them."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from molt_cache.cache.layout import CREATED_MARKER, PROGRESS_DIR, unit_record_path
from molt_cache.cache.manifest import CacheMismatchError, compare_manifests, read_manifest_attrs
from molt_cache.cache.lock import job_id, writer_lock
from molt_cache.cache.repair import repair_damage
from molt_cache.cache.writer import BackgroundWriter, create_cache
from molt_cache.datasets.base import DatasetReader
from molt_cache.encoders.base import ImageEncoder, TextEncoder
from molt_cache.encoders.text_limits import truncation_lines
from molt_cache.extract.config import ExtractConfig, ExtractResult
from molt_cache.extract.finish import _dir_bytes, _wait_for, finish_cache, summary_line
from molt_cache.extract.plan import (_check_out_dir, _open_reader, _resolve_device, _resolve_rank,
                                     open_encoders, plan_extraction, preflight_disk, read_rows)
from molt_cache.extract.units import _fail_on_bad_images, _run_image_units, _run_text_units, _Run
from molt_cache.finite import NonFiniteFeatureError


def _quiet(*_args) -> None:
    return None


def extract(cfg: ExtractConfig, **kwargs: Any) -> ExtractResult:
    """Extract (or resume, or reuse, or repair) the cache `cfg.out_dir`, holding its writer lock
    (molt_cache/cache/lock.py: one job per folder; a second job is refused naming the first).
    Keyword arguments: those of `_extract_locked`."""
    cfg.validate()
    world = _resolve_rank(cfg)[1]
    options = {k: getattr(cfg, k) for k in ("dataset", "text", "image", "noise", "noise_on", "empty", "seed", "limit")}
    with writer_lock(cfg.out_dir, job=job_id(world), options=options):
        return _extract_locked(cfg, **kwargs)


def _extract_locked(cfg: ExtractConfig, *, progress: Callable[[int, int], None] | None = None,
                    on_log: Callable[[str], None] | None = None,
                    on_phase: Callable[[str, int], None] | None = None,
                    on_items: Callable[[str, int], None] | None = None,
                    reader: DatasetReader | None = None, text_encoder: TextEncoder | None = None,
                    image_encoder: ImageEncoder | None = None,
                    unit_hook: Callable[[str, str, int], None] | None = None) -> ExtractResult:
    """Extract (or resume, or reuse) the cache `cfg.out_dir`.

    Callbacks (all optional; the library prints nothing itself):
      progress(units_done, units_total) after each unit this rank encodes;
      on_log(line) for each plan / disk / summary line (plain text);
      on_phase(modality, items) when this rank starts encoding a modality ("image" first, then
        "text"), with the number of items it will encode;
      on_items(modality, n) after each batch, n items finished (each item counted once).
    reader / text_encoder / image_encoder replace the ones `cfg` names (tests, benchmarks).
    unit_hook(split, modality, unit) runs after each unit is queued (tests simulate crashes).
    """
    log = on_log or _quiet
    cfg.validate()
    t0 = time.perf_counter()
    rank, world, local = _resolve_rank(cfg)
    device = _resolve_device(cfg, local, world)
    dtype = cfg.dtype if cfg.dtype != "auto" else ("float16" if device.startswith("cuda") else "float32")
    out = Path(cfg.out_dir)

    # ---- plan: rows, encoders, tokens, exact shapes, manifest
    if reader is None:
        reader = _open_reader(cfg)
    collected, fp_rows, excluded = read_rows(cfg, reader, out)
    if reader.report.rows:
        log(f"{reader.report.summary()} (first: {reader.report.rows[0].source}: {reader.report.rows[0].reason})")
    for note in getattr(reader, "notes", []) or []:
        log(f"note: {note}")
    text_encoder, image_encoder = open_encoders(cfg, device, dtype, text_encoder, image_encoder)
    plan = plan_extraction(cfg, reader, collected, fp_rows, excluded, text_encoder, image_encoder)
    plans, manifest = plan.splits, plan.manifest
    for line in truncation_lines(plan.text_lengths):
        log(f"truncated: {line}")

    state = _check_out_dir(out, manifest, log)
    if state != "new" and repair_damage(out, plans, manifest, cfg.layout(), rank, world, log):
        state = "resume"  # records that no longer match their files were dropped: redo those units
    result = ExtractResult(out_dir=out, complete=False, reused=False, bytes_planned=plan.bytes_planned,
                           text_lengths=plan.text_lengths)
    if state == "complete":
        log(f"cache complete, reusing {out}")
        result.complete = result.reused = True
        result.bytes_on_disk = _dir_bytes(out)
        return result

    all_units = [(p, m, u) for p in plans for m in (p.image, p.text) for u in range(m.n_units)]
    done = [unit_record_path(out, p.split, m.modality, u).exists() for p, m, u in all_units]
    preflight_disk(cfg, plan, out, done, log)

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
    run = _Run(cfg, out, text_encoder, image_encoder, result,
               tick=lambda: progress(result.units_done, total) if progress else None,
               advance=on_items or _quiet)
    writer = BackgroundWriter(out)
    bad: list[dict] = []
    try:
        t_image = time.perf_counter()
        if on_phase:
            on_phase("image", item_totals["image"])
        for p, rows in zip(plans, plan.rows):
            units = [u for q, m, u in mine if q is p and m is p.image]
            _run_image_units(run, p.split, p.image, rows, units, writer, unit_hook, bad)
        result.image_seconds = time.perf_counter() - t_image
        if bad:
            writer.close()
            _fail_on_bad_images(out, bad, world)
        t_text = time.perf_counter()
        if on_phase:
            on_phase("text", item_totals["text"])
        for p, ids in zip(plans, plan.token_ids):
            units = [u for q, m, u in mine if q is p and m is p.text]
            _run_text_units(run, p.split, p.text, ids, units, writer, unit_hook)
        result.text_seconds = time.perf_counter() - t_text
    except NonFiniteFeatureError as e:
        raise e.name_sample(plans)  # split set by the unit; the sample id from the split plan
    finally:
        writer.close()  # flush finished units even when a later one failed: they are valid
    result.bytes_written = writer.bytes_written
    result.padding_fraction = result.padding_tokens / max(1, result.text_tokens)

    # ---- finish: rank 0, once every rank's units are recorded
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank == 0:
        result.complete = finish_cache(out, plans, manifest, cfg.rank_wait_s)
        if not result.complete:
            log("rank 0: units of other ranks are not all recorded yet; rerun rank 0 to finish")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()

    result.seconds = time.perf_counter() - t0
    result.bytes_on_disk = _dir_bytes(out)
    log(summary_line(rank, result))
    return result
