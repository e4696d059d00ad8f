"""What `molt extract` rerun does to a damaged cache before resuming (docs/cache-format.md,
"Integrity"): every completion record is compared with the sha256 of its files; a record that no
longer vouches for its bytes is removed, so exactly its unit is encoded again; arrays written at
creation and the pooled arrays are rewritten from the plan and the records. Everything written is
a deterministic function of the data, so the repaired cache is byte-identical to an undamaged one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from molt_cache.cache.integrity import find_damage
from molt_cache.cache.layout import (MANIFEST_FILE, POOLED_RECORD, PROGRESS_DIR, LayoutOptions,
                                     unit_record_path)
from molt_cache.cache.writer import SplitPlan, create_cache


def unit_owners(plans: list[SplitPlan], world: int) -> dict[Path, int]:
    """Unit record path -> the rank that owns the unit (extract's order: splits, images, texts)."""
    units = [(p, m, u) for p in plans for m in (p.image, p.text) for u in range(m.n_units)]
    return {unit_record_path(Path("."), p.split, m.modality, u): i % world
            for i, (p, m, u) in enumerate(units)}


def repair_damage(out: Path, plans: list[SplitPlan], manifest: dict, opts: LayoutOptions,
                  rank: int, world: int, log: Callable[[str], None]) -> bool:
    """Check every record of the started or complete cache `out`; reset what is damaged.
    Every rank reads the same records and files, so every rank finds the same damage; each rank
    removes the records of its own units, rank 0 rewrites the created and pooled arrays.
    Returns True when something was damaged (the cache is then a partial one to resume)."""
    out = Path(out)
    damage = find_damage(out)
    if not damage:
        return False
    log(f"{out}: damage found, repairing:\n  " + "\n  ".join(damage.describe()))
    if rank == 0:
        (out / MANIFEST_FILE).unlink(missing_ok=True)  # not complete until the repair is done
        if damage.created:
            create_cache(out, plans, manifest, opts, only=set(damage.created))
            damage.units += [u for u in find_damage(out).units if u not in damage.units]
        if damage.pooled:
            (out / PROGRESS_DIR / POOLED_RECORD).unlink(missing_ok=True)
            _remove(out, damage.pooled)
    owners = unit_owners(plans, world)
    for rec, files in damage.units:
        if owners.get(rec.relative_to(out), rank) == rank:
            rec.unlink(missing_ok=True)
            _remove(out, files)
    return True


def _remove(out: Path, files: list[str]) -> None:
    """Damaged files go before they are rewritten: zarr reads an existing shard before writing a
    partial one (the last shard of an array), and would trip over the damage it is replacing."""
    for rel in files:
        if not rel.startswith("("):  # "(unreadable record)"
            (out / rel).unlink(missing_ok=True)
