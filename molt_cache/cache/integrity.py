"""Can the bytes of a cache be trusted? (docs/cache-format.md, "Integrity", format version 2)

Three layers, cheapest first:
- presence: every chunk file the layout says must exist is there (`missing_chunk_files`); zarr
  itself would read an absent file as the fill value, i.e. as silent zeros.
- checksums: every inner chunk and every shard index carries a crc32c (zarr's `Crc32cCodec`),
  checked by zarr on every read; `read_checked` turns zarr's anonymous "checksum do not match"
  into a `CacheCorruptError` naming the array, the chunk, its rows and the file, and the repair.
- content hashes: each completion record lists the sha256 of the files its work wrote
  (`sha256_file`); `find_damage` compares them, which is how `molt extract` rerun finds exactly
  the units to re-do, and a copied or swapped-in file that is itself well-formed is caught too.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import google_crc32c
import numpy as np
import zarr

from molt_cache.cache.layout import CREATED_MARKER, POOLED_RECORD, PROGRESS_DIR
from molt_cache.cache.errors import CacheCorruptError
from molt_cache.checksums import sha256_file

MAX_UINT64 = np.uint64(2**64 - 1)  # a shard index entry with this offset: chunk absent


def repair_hint(cache: Path | str) -> str:
    return (f"to repair, rerun the same `molt extract ... --out-dir {cache}` command: it re-does "
            "exactly the damaged work units and leaves the rest (`molt cache verify "
            f"{cache}` lists every fault)")


# -- where chunks live ---------------------------------------------------------------------------


def array_store_root(arr: zarr.Array) -> Path:
    return Path(str(arr.store.root))


def chunk_grid(arr: zarr.Array) -> tuple[int, ...]:
    """Rows (and columns) of one stored *file*: the shard when sharded, else the chunk."""
    return tuple(arr.metadata.chunk_grid.chunk_shape)


def chunk_file_coords(arr: zarr.Array) -> Iterator[tuple[int, ...]]:
    grid = chunk_grid(arr)
    counts = [max(1, -(-s // c)) for s, c in zip(arr.shape, grid)]
    for idx in np.ndindex(*counts):
        yield tuple(int(i) for i in idx)


def chunk_file(arr: zarr.Array, coords: tuple[int, ...]) -> Path:
    return array_store_root(arr) / arr.path / arr.metadata.chunk_key_encoding.encode_chunk_key(coords)


def missing_chunk_files(arr: zarr.Array) -> list[Path]:
    """Chunk (shard) files of `arr` that the layout requires and that are absent."""
    return [p for p in (chunk_file(arr, c) for c in chunk_file_coords(arr)) if not p.is_file()]


def _sharding(arr: zarr.Array):
    codec = arr.metadata.codecs[0]
    return codec if type(codec).__name__ == "ShardingCodec" else None


def has_checksums(arr: zarr.Array) -> bool:
    """crc32c on every inner chunk (and, sharded, on the index)."""
    shard = _sharding(arr)
    codecs = shard.codecs if shard is not None else arr.metadata.codecs
    names = [type(c).__name__ for c in codecs]
    index_ok = shard is None or "Crc32cCodec" in [type(c).__name__ for c in shard.index_codecs]
    return "Crc32cCodec" in names and index_ok


# -- reads that name what failed ----------------------------------------------------------------


def _inner_rows(arr: zarr.Array) -> int:
    return int(arr.chunks[0])


def _locate(arr: zarr.Array, lo: int, hi: int, cause: BaseException) -> CacheCorruptError:
    """Re-read [lo, hi) one inner chunk at a time to find the one that fails (error path only)."""
    cache = array_store_root(arr)
    rows = _inner_rows(arr)
    outer = chunk_grid(arr)[0]
    for c in range(lo // rows, max(lo, hi - 1) // rows + 1):
        a, b = c * rows, min((c + 1) * rows, arr.shape[0])
        try:
            arr[a:b]
        except Exception as e:  # noqa: BLE001 - re-raised with its name below
            return corrupt_error(arr, c, a, b, chunk_file(arr, (a // outer,) + (0,) * (arr.ndim - 1)), e)
    return CacheCorruptError(f"{cache}: array {arr.path} rows {lo}:{hi} failed to read "
                             f"({type(cause).__name__}: {cause}); {repair_hint(cache)}")


def corrupt_error(arr: zarr.Array, chunk: int, a: int, b: int, file: Path,
                  cause: BaseException) -> CacheCorruptError:
    cache = array_store_root(arr)
    what = "is missing" if not file.is_file() else f"is damaged ({type(cause).__name__}: {cause})"
    return CacheCorruptError(f"{cache}: array {arr.path}, chunk {chunk} (rows {a}:{b}) in file "
                             f"{file} {what}; {repair_hint(cache)}")


def read_checked(arr: zarr.Array, lo: int | None = None, hi: int | None = None) -> np.ndarray:
    """arr[lo:hi] (rows), every chunk checked against its crc32c by zarr; a failure becomes a
    CacheCorruptError naming the array, the inner chunk, its rows and file, and the repair."""
    lo = 0 if lo is None else lo
    hi = arr.shape[0] if hi is None else hi
    try:
        return np.asarray(arr[lo:hi])
    except Exception as e:  # noqa: BLE001 - zarr raises ValueError/RuntimeError/...; named below
        raise _locate(arr, lo, hi, e) from None


# -- content hashes -----------------------------------------------------------------------------


def hash_files(root: Path, rel_paths: Iterable[str]) -> dict[str, str]:
    return {rel: sha256_file(Path(root) / rel) for rel in rel_paths}


def array_files(arr: zarr.Array, *, with_metadata: bool = True) -> list[str]:
    """Relative paths (from the cache root) of an array's zarr.json and all its chunk files."""
    root = array_store_root(arr)
    files = [str(chunk_file(arr, c).relative_to(root)) for c in chunk_file_coords(arr)]
    return ([f"{arr.path}/zarr.json"] if with_metadata else []) + files


def shard_files_for_rows(arr: zarr.Array, a: int, b: int) -> list[str]:
    """Relative paths of the shard files holding rows [a, b) (a work unit's shard)."""
    outer = chunk_grid(arr)[0]
    root = array_store_root(arr)
    return [str(chunk_file(arr, (s,) + (0,) * (arr.ndim - 1)).relative_to(root))
            for s in range(a // outer, max(a, b - 1) // outer + 1)]


def write_json_record(path: Path, files: dict[str, str]) -> None:
    """Atomic: a record is complete or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"sha256": files}, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def read_json_record(path: Path) -> dict[str, str] | None:
    """The {file: sha256} of a record; None when absent or unreadable (= not done)."""
    try:
        data = json.loads(Path(path).read_text())
        return dict(data["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_unit_record_files(path: Path) -> dict[str, str] | None:
    try:
        with np.load(path, allow_pickle=False) as rec:
            return dict(zip(rec["files"].tolist(), rec["sha256"].tolist()))
    except (OSError, ValueError, KeyError, EOFError):
        return None


def stale_files(root: Path, files: dict[str, str]) -> list[str]:
    """Files of a record that are missing or whose content hash differs. Hashed on a thread per
    core: hashlib releases the GIL on large blocks, and a rerun hashes the whole cache."""
    def stale(item: tuple[str, str]) -> bool:
        p = Path(root) / item[0]
        return not p.is_file() or sha256_file(p) != item[1]

    items = list(files.items())
    if len(items) < 4:
        return [rel for rel, want in items if stale((rel, want))]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return [rel for (rel, _), bad in zip(items, pool.map(stale, items)) if bad]


@dataclass
class Damage:
    """What a rerun of `molt extract` must re-do, found by comparing records with files."""

    created: list[str] = field(default_factory=list)  # arrays written at creation whose files differ
    units: list[tuple[Path, list[str]]] = field(default_factory=list)  # (unit record, its bad files)
    pooled: list[str] = field(default_factory=list)  # bad files of the pooled arrays

    def __bool__(self) -> bool:
        return bool(self.created or self.units or self.pooled)

    def describe(self) -> list[str]:
        lines = [f"array {a}: damaged or missing files; rewritten" for a in self.created]
        lines += [f"unit {rec.parent.parent.name}/{rec.parent.name}/{rec.name.split('.')[0]}: "
                  f"{', '.join(files[:3])}{' ...' if len(files) > 3 else ''}; re-done" for rec, files in self.units]
        lines += [f"pooled: {', '.join(self.pooled[:3])}; re-assembled"] if self.pooled else []
        return lines


def find_damage(root: Path) -> Damage:
    """Compare every completion record with the files on disk (read-only)."""
    root = Path(root)
    progress = root / PROGRESS_DIR
    damage = Damage()
    created = read_json_record(progress / CREATED_MARKER)
    if created is not None:
        bad = stale_files(root, created)
        damage.created = sorted({rel.split("/zarr.json")[0].split("/c/")[0] for rel in bad})
    for rec in sorted(progress.glob("*/*/unit-*.done.npz")):
        files = read_unit_record_files(rec)
        bad = list(files) if files is None else stale_files(root, files)
        if files is None or bad:
            damage.units.append((rec, bad or ["(unreadable record)"]))
    pooled = read_json_record(progress / POOLED_RECORD)
    if pooled is not None:
        damage.pooled = stale_files(root, pooled)
    return damage


# -- full verification --------------------------------------------------------------------------


@dataclass
class ArrayReport:
    name: str
    files: int = 0
    bytes: int = 0
    faults: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.faults


@dataclass
class VerifyReport:
    path: Path
    arrays: list[ArrayReport] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)  # cache-level (manifest, records)

    @property
    def ok(self) -> bool:
        return not self.faults and all(a.ok for a in self.arrays)

    @property
    def files(self) -> int:
        return sum(a.files for a in self.arrays)

    @property
    def bytes(self) -> int:
        return sum(a.bytes for a in self.arrays)

    def all_faults(self) -> list[str]:
        return self.faults + [f for a in self.arrays for f in a.faults]


def _walk_arrays(group: zarr.Group, prefix: str = "") -> Iterator[tuple[str, zarr.Array]]:
    with warnings.catch_warnings():  # manifest.json and _progress/ are ours, not zarr's
        warnings.simplefilter("ignore")
        members = sorted(group.members(), key=lambda kv: kv[0])
    for name, member in members:
        path = f"{prefix}{name}"
        if isinstance(member, zarr.Array):
            yield path, member
        else:
            yield from _walk_arrays(member, path + "/")


def _check_shard_index(arr: zarr.Array, data: bytes, file: Path, first_row: int) -> str | None:
    """The index at the shard's end: crc32c valid, every inner chunk that holds rows of the array
    present (the last shard's chunks wholly past the end are never written), inside the file."""
    shard = _sharding(arr)
    per_dim = [o // i for o, i in zip(chunk_grid(arr), shard.chunk_shape)]
    per_shard = int(np.prod(per_dim))
    size = 16 * per_shard + 4
    if len(data) < size:
        return f"{file}: {len(data)} bytes, shorter than its shard index ({size} bytes): truncated"
    index, crc = data[-size:-4], data[-4:]
    if np.uint32(google_crc32c.value(index)).tobytes() != crc:
        return f"{file}: shard index fails its crc32c (damaged or truncated file)"
    entries = np.frombuffer(index, dtype="<u8").reshape(per_shard, 2)
    inner = int(shard.chunk_shape[0])
    row_of_entry = first_row + inner * (np.arange(per_shard) // int(np.prod(per_dim[1:])))  # C order
    absent = np.flatnonzero((entries[:, 0] == MAX_UINT64) & (row_of_entry < arr.shape[0]))
    if len(absent):
        return (f"{file}: shard index lists inner chunks {absent[:5].tolist()} as absent; "
                "format 2 writes every chunk (zarr would read them as the fill value)")
    present = entries[:, 0] != MAX_UINT64
    if present.any() and int((entries[present, 0] + entries[present, 1]).max()) > len(data) - size:
        return f"{file}: shard index points past the end of the file (truncated)"
    return None


def expected_hashes(root: Path) -> dict[str, str]:
    """file -> sha256 from every completion record (creation, units, pooled)."""
    progress = Path(root) / PROGRESS_DIR
    out: dict[str, str] = {}
    for rec in (progress / CREATED_MARKER, progress / POOLED_RECORD):
        out.update(read_json_record(rec) or {})
    for rec in progress.glob("*/*/unit-*.done.npz"):
        out.update(read_unit_record_files(rec) or {})
    return out


def verify_cache(path: str | Path, *, on_total=None, on_progress=None) -> VerifyReport:
    """Read every chunk of every array, check every checksum, the presence of every file and the
    content hashes in the completion records. Reports through callbacks: on_total(bytes) once,
    on_progress(array, bytes) after each file. Never raises for a fault in the data: each fault is
    a line of the report, naming the array, chunk and file."""
    path = Path(path)
    report = VerifyReport(path)
    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception as e:  # noqa: BLE001 - reported
        report.faults.append(f"{path}: not a readable zarr group ({type(e).__name__}: {e})")
        return report
    manifest = root.attrs.get("molt_cache")
    from molt_cache.cache.manifest import ManifestError, load_manifest_file
    try:
        on_disk = load_manifest_file(path)
    except ManifestError as e:
        report.faults.append(str(e))
        on_disk = None
    if manifest is None:
        report.faults.append(f"{path}/zarr.json: no molt_cache manifest in the root attributes")
    elif on_disk is None and not report.faults:
        report.faults.append(f"{path}/manifest.json is missing: the extraction is unfinished")
    elif on_disk is not None and on_disk != manifest:
        report.faults.append(f"{path}/manifest.json differs from the root group's attrs['molt_cache']")
    hashes = expected_hashes(path)
    arrays = list(_walk_arrays(root))
    if manifest is not None:
        from molt_cache.cache.reader import expected_arrays
        names = {n for n, _ in arrays}
        for name in expected_arrays(manifest):
            if name not in names:
                report.faults.append(f"array {name}: missing (its zarr.json is absent)")
    if on_total:
        on_total(sum(p.stat().st_size for _, a in arrays for c in chunk_file_coords(a)
                     if (p := chunk_file(a, c)).is_file()))
    for name, arr in arrays:
        rep = ArrayReport(name)
        report.arrays.append(rep)
        if not has_checksums(arr):
            rep.faults.append(f"array {name}: its codecs carry no crc32c (format 1 cache?); "
                              "corruption in it cannot be detected")
        sharded = _sharding(arr) is not None
        outer = chunk_grid(arr)[0]
        for coords in chunk_file_coords(arr):
            file = chunk_file(arr, coords)
            rel = str(file.relative_to(path))
            a, b = coords[0] * outer, min((coords[0] + 1) * outer, arr.shape[0])
            if not file.is_file():
                rep.faults.append(f"array {name}: chunk file {file} (rows {a}:{b}) is missing; "
                                  "zarr would read it as zeros")
                continue
            data = file.read_bytes()
            rep.files += 1
            rep.bytes += len(data)
            fault = _check_shard_index(arr, data, file, a) if sharded else None
            if fault is None:
                try:
                    read_checked(arr, a, b)
                except CacheCorruptError as e:
                    fault = str(e).split("; to repair")[0]
            if fault is None and rel in hashes and hashlib.sha256(data).hexdigest() != hashes[rel]:
                fault = (f"{file}: checksums pass but its sha256 differs from its completion "
                         "record (a file from another cache or run?)")
            if fault is not None:
                rep.faults.append(f"array {name}: {fault}")
            if on_progress:
                on_progress(name, len(data))
    return report


def cache_info(path: str | Path) -> dict[str, Any]:
    """Splits, counts, encoders, bytes and format version of a cache (from its manifest)."""
    from molt_cache.cache.manifest import load_manifest_file
    path = Path(path)
    m = load_manifest_file(path)
    if m is None:
        from molt_cache.cache.manifest import read_manifest_attrs
        m = read_manifest_attrs(path)
        if m is None:
            from molt_cache.cache.errors import CacheError
            raise CacheError(f"{path} holds no molt-cache manifest (manifest.json or zarr.json attrs)")
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return {"path": str(path), "format_version": m.get("format_version"), "complete": m.get("complete"),
            "dataset": m.get("dataset", {}).get("name"), "task": m.get("dataset", {}).get("task"),
            "labels": len(m.get("dataset", {}).get("labels", [])), "splits": m.get("splits", {}),
            "text": m.get("text", {}), "image": m.get("image", {}),
            "perturbation": m.get("perturbation", {}), "bytes": size}
