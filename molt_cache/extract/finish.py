"""Finishing: rank 0 assembles the pooled arrays from the unit records once every rank's units are
recorded, and writes manifest.json last (its presence means complete); the one-line summary."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from molt_cache.cache.layout import MANIFEST_ATTR, MANIFEST_FILE, unit_record_path
from molt_cache.cache.manifest import write_manifest_file
from molt_cache.cache.writer import SplitPlan, write_pooled, write_pooled_record
from molt_cache.extract.config import ExtractResult


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


def finish_cache(out: Path, plans: list[SplitPlan], manifest: dict, rank_wait_s: float | None) -> bool:
    """Rank 0: pooled arrays, the complete manifest in the group attributes, then manifest.json.
    False when other ranks' units are not all recorded within `rank_wait_s`."""
    if not _wait_for(lambda: _all_units_done(out, plans), "other ranks", rank_wait_s):
        return False
    for p in plans:
        write_pooled(out, p)
    write_pooled_record(out, plans)
    final = dict(manifest, complete=True)
    import zarr
    zarr.open_group(out, mode="r+").attrs.put({MANIFEST_ATTR: final})
    write_manifest_file(out, final)  # last: its presence means complete
    return True


def summary_line(rank: int, result: ExtractResult) -> str:
    return (f"rank {rank}: {result.units_done} units encoded, {result.units_skipped} already done; "
            f"{result.text_tokens} text tokens ({result.tokens_per_s:.0f}/s), {result.images} images "
            f"({result.images_per_s:.1f}/s), padding {result.padding_fraction:.1%} of real tokens, "
            f"{result.bytes_written / 1e6:.1f} MB written (uncompressed), {result.bytes_on_disk / 1e6:.1f} MB "
            f"on disk" + (f"; {MANIFEST_FILE} written" if result.complete else ""))
