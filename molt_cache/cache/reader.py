"""Stage two's view of a feature cache (docs/cache-format.md, format version 2).

`open_cache` validates everything a later read could trip over — a foreign folder, an unknown
format version, an unfinished extraction, a truncated array — so that training fails before any
work, naming the file and the fix. `CacheSplit.pair(i)` is plain random access for inspection
and tests; training goes through `loader.make_loader`, which reads whole chunks instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from molt_cache.cache.errors import CacheCorruptError, CacheError
from molt_cache.cache.integrity import has_checksums, missing_chunk_files, read_checked, repair_hint
from molt_cache.cache.layout import FORMAT_VERSION
from molt_cache.cache.manifest import ManifestError, load_manifest_file

SUPPORTED_FORMAT_VERSIONS = (FORMAT_VERSION,)
MODALITIES = ("text", "image")
TASKS = ("single-label", "multi-label")
# Which manifest fields must agree for two caches to be mixed in one training run.
_ENCODER_FIELDS = ("kind", "name", "weights_sha256", "layer_indices", "layer_widths",
                   "final_width", "pooled_width", "dtype", "final_is_last_layer")


__all__ = ["CacheError", "CacheCorruptError", "CacheReader", "CacheSplit", "open_cache"]


def to_float32(values: np.ndarray, stored_dtype: str) -> np.ndarray:
    """Stored features -> float32. numpy/zarr have no bfloat16, so a bfloat16 cache holds the raw
    16 bits as uint16; those are the high half of a float32, which makes the widening exact."""
    if stored_dtype == "bfloat16" and values.dtype == np.uint16:
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32, copy=False)


@dataclass
class ModalityArrays:
    """One modality of one split: the zarr arrays and the names of the per-token ones."""

    offsets: zarr.Array  # (N + 1,) int64
    layers: list[zarr.Array]  # L_s × (N_tokens, D_l), oldest first
    final: zarr.Array  # (N_tokens, D); layer_{L-1} itself when final_is_last_layer
    pooled: zarr.Array  # (N, P)
    stored_dtype: str  # the manifest's dtype ("float16" | "bfloat16" | "float32")

    @property
    def token_arrays(self) -> list[zarr.Array]:
        """Arrays indexed by token row; `final` is not repeated when it is the last layer."""
        return self.layers if self.final is self.layers[-1] else [*self.layers, self.final]


@dataclass
class PairFeatures:
    """One pair as numpy arrays in the stored dtype widened to float32 (tokens are real only)."""

    text_layers: list[np.ndarray]  # L_s × (Tt, D_t,l)
    text_final: np.ndarray  # (Tt, D_t)
    text_pooled: np.ndarray  # (P_t,)
    image_layers: list[np.ndarray]  # L_s × (Ti, D_i,l)
    image_final: np.ndarray  # (Ti, D_i)
    image_pooled: np.ndarray  # (P_i,)
    target: np.ndarray  # () int64 single-label | (C,) uint8 multi-label
    index: int  # pair index within its split


class CacheSplit:
    """One split of one cache: pair tables plus the text and image feature arrays."""

    def __init__(self, reader: "CacheReader", name: str, group: zarr.Group):
        self.reader = reader
        self.name = name
        self.group = group
        counts = reader.manifest["splits"][name]
        self.num_pairs = int(counts["pairs"])
        self.task: str = reader.manifest["dataset"]["task"]
        self.labels: list[str] = list(reader.manifest["dataset"]["labels"])
        self.text_index: zarr.Array = group["pairs/text_index"]
        self.image_index: zarr.Array = group["pairs/image_index"]
        self.target: zarr.Array = group["pairs/target"]
        self.text = self._modality("text")
        self.image = self._modality("image")

    @property
    def multi_label(self) -> bool:
        return self.task == "multi-label"

    def _modality(self, modality: str) -> ModalityArrays:
        ident = self.reader.manifest[modality]
        g = self.group[modality]
        layers = [g[f"layer_{k}"] for k in range(len(ident["layer_indices"]))]
        final = layers[-1] if ident["final_is_last_layer"] else g["final"]
        return ModalityArrays(g["offsets"], layers, final, g["pooled"], ident["dtype"])

    def __len__(self) -> int:
        return self.num_pairs

    def __repr__(self) -> str:
        return f"CacheSplit({str(self.reader.path)!r}, {self.name!r}, pairs={self.num_pairs})"

    def pair(self, i: int) -> PairFeatures:
        if not 0 <= i < self.num_pairs:
            raise IndexError(f"pair {i} out of range for split {self.name!r} of "
                             f"{self.reader.path} ({self.num_pairs} pairs)")
        t = int(read_checked(self.text_index, i, i + 1)[0])
        m = int(read_checked(self.image_index, i, i + 1)[0])
        text_layers, text_final, text_pooled = self._read(self.text, t)
        image_layers, image_final, image_pooled = self._read(self.image, m)
        return PairFeatures(text_layers, text_final, text_pooled, image_layers, image_final,
                            image_pooled, read_checked(self.target, i, i + 1)[0], i)

    @staticmethod
    def _read(arrays: ModalityArrays, row: int):
        lo, hi = (int(v) for v in read_checked(arrays.offsets, row, row + 2))
        widen = lambda a: to_float32(np.asarray(a), arrays.stored_dtype)  # noqa: E731
        layers = [widen(read_checked(a, lo, hi)) for a in arrays.layers]
        final = layers[-1] if arrays.final is arrays.layers[-1] else widen(read_checked(arrays.final, lo, hi))
        return layers, final, widen(read_checked(arrays.pooled, row, row + 1)[0])


class CacheReader:
    """A validated, complete cache folder. Build with `open_cache`."""

    def __init__(self, path: Path, root: zarr.Group, manifest: dict[str, Any]):
        self.path = path
        self.root = root
        self.manifest = manifest
        self._splits: dict[str, CacheSplit] = {}

    @property
    def split_names(self) -> list[str]:
        return list(self.manifest["splits"])

    splits = split_names  # the names train.py uses: `if "val" in reader.splits`

    @property
    def task(self) -> str:
        return self.manifest["dataset"]["task"]

    @property
    def labels(self) -> list[str]:
        return list(self.manifest["dataset"]["labels"])

    def split(self, name: str) -> CacheSplit:
        if name not in self.manifest["splits"]:
            raise CacheError(f"{self.path} has no split {name!r}; splits present: "
                             f"{self.split_names}")
        if name not in self._splits:
            self._splits[name] = CacheSplit(self, name, self.root[name])
        return self._splits[name]

    def __repr__(self) -> str:
        return f"CacheReader({str(self.path)!r}, splits={self.split_names})"


def open_cache(path: str | Path) -> CacheReader:
    """Open and validate a cache folder written by `molt extract`."""
    path = Path(path)
    if not path.exists():
        raise CacheError(f"cache folder {path} does not exist")
    if not path.is_dir():
        raise CacheError(f"cache path {path} is not a folder")
    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception as e:  # zarr raises several types for "not a group here"
        raise CacheError(f"{path} is not a molt-cache cache: no zarr group there ({e})") from e
    manifest = root.attrs.get("molt_cache")
    unfinished = (f"extraction into {path} is unfinished; resume it by re-running the same "
                  f"`molt extract ... --out-dir {path}` command (finished work in {path / '_progress'}"
                  f" is kept and skipped)")
    if manifest is None:
        if (path / "_progress").exists():
            raise CacheError(unfinished)
        raise CacheError(f"{path} is a zarr group but not a molt-cache cache: "
                         "attrs['molt_cache'] (the manifest) is missing")
    version = manifest.get("format_version")
    if version == 1:
        raise CacheError(f"{path} is a format 1 cache: it has no checksums and may hold chunks that "
                         "read as silent zeros; re-extract it with this molt-cache (`molt extract` "
                         "into a new --out-dir) to get format 2")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise CacheError(f"{path} has cache format_version {version!r}; this molt-cache reads "
                         f"format versions {list(SUPPORTED_FORMAT_VERSIONS)}")
    if not manifest.get("complete", False) or not (path / "manifest.json").is_file():
        raise CacheError(unfinished)
    try:
        on_disk = load_manifest_file(path)
    except ManifestError as e:
        raise CacheError(f"{e}; {repair_hint(path)}") from None
    if on_disk != manifest:
        raise CacheError(f"{path / 'manifest.json'} differs from the group's attrs['molt_cache'];"
                         " the cache was modified after extraction — re-extract it")
    _check_manifest(path, manifest)
    for split in manifest["splits"]:
        _check_split(path, root, manifest, split)
    return CacheReader(path, root, manifest)


def _check_manifest(path: Path, m: dict) -> None:
    for key in ("dataset", "splits", "text", "image"):
        if key not in m:
            raise CacheError(f"{path}: manifest has no {key!r} entry")
    task = m["dataset"].get("task")
    if task not in TASKS:
        raise CacheError(f"{path}: manifest dataset.task {task!r}; valid: {list(TASKS)}")
    for modality in MODALITIES:
        ident = m[modality]
        missing = [f for f in _ENCODER_FIELDS if f not in ident]
        if missing:
            raise CacheError(f"{path}: manifest {modality} encoder lacks fields {missing}")
        if len(ident["layer_widths"]) != len(ident["layer_indices"]):
            raise CacheError(f"{path}: manifest {modality}.layer_widths has "
                             f"{len(ident['layer_widths'])} entries for "
                             f"{len(ident['layer_indices'])} layer_indices")


def expected_arrays(m: dict) -> dict[str, tuple[int, ...]]:
    """Every array the manifest says a cache holds ("train/text/layer_0", ...) and its shape."""
    out: dict[str, tuple[int, ...]] = {}
    for split in m["splits"]:
        out.update({f"{split}/{k}": v for k, v in _split_arrays(m, split).items()})
    return out


def _split_arrays(m: dict, split: str) -> dict[str, tuple[int, ...]]:
    counts = m["splits"][split]
    n_labels = len(m["dataset"]["labels"])
    expected: dict[str, tuple[int, ...]] = {
        "pairs/text_index": (counts["pairs"],),
        "pairs/image_index": (counts["pairs"],),
        "pairs/target": ((counts["pairs"],) if m["dataset"]["task"] == "single-label"
                         else (counts["pairs"], n_labels)),
        "pairs/sample_id": (counts["pairs"],),
        "image/image_key": (counts["images"],),
    }
    for modality, n_rows, n_tokens in (("text", counts["texts"], counts["text_tokens"]),
                                       ("image", counts["images"], counts["image_tokens"])):
        ident = m[modality]
        expected[f"{modality}/offsets"] = (n_rows + 1,)
        for k, width in enumerate(ident["layer_widths"]):
            expected[f"{modality}/layer_{k}"] = (n_tokens, width)
        if not ident["final_is_last_layer"]:
            expected[f"{modality}/final"] = (n_tokens, ident["final_width"])
        expected[f"{modality}/pooled"] = (n_rows, ident["pooled_width"])
    return expected


def _check_split(path: Path, root: zarr.Group, m: dict, split: str) -> None:
    """Shapes from the manifest; every chunk file present (cheap: a stat per file; an absent
    file would read as zeros); crc32c in every array's codecs; offsets span the tokens."""
    counts = m["splits"][split]
    for name, shape in _split_arrays(m, split).items():
        full = f"{split}/{name}"
        try:
            arr = root[full]
        except KeyError:
            raise CacheError(f"{path}: array {full} is missing (truncated or foreign cache; "
                             "re-extract)") from None
        if tuple(arr.shape) != tuple(int(s) for s in shape):
            raise CacheError(f"{path}: array {full} has shape {tuple(arr.shape)}, the manifest "
                             f"counts say {tuple(shape)} (truncated cache; re-extract)")
        if not has_checksums(arr):
            raise CacheError(f"{path}: array {full} carries no crc32c checksums, which format "
                             f"{FORMAT_VERSION} requires; re-extract the cache")
        missing = missing_chunk_files(arr)
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise CacheCorruptError(f"{path}: array {full} lacks chunk file {missing[0]}{more} "
                                    f"(it would read as zeros); {repair_hint(path)}")
    for modality, n_tokens in (("text", counts["text_tokens"]), ("image", counts["image_tokens"])):
        offsets = root[f"{split}/{modality}/offsets"]
        first = int(read_checked(offsets, 0, 1)[0])
        last = int(read_checked(offsets, offsets.shape[0] - 1, offsets.shape[0])[0])
        if first != 0 or last != n_tokens:
            raise CacheError(f"{path}: array {split}/{modality}/offsets runs {first}..{last}, "
                             f"expected 0..{n_tokens} (truncated cache; re-extract)")


def check_compatible(readers: list[CacheReader]) -> None:
    """Caches mixed in one run (`--cache A --cache B`) must agree on everything that shapes or
    means the features; raises naming each differing field with both values."""
    if not readers:
        raise CacheError("check_compatible needs at least one cache")
    first = readers[0]
    for other in readers[1:]:
        diffs = []
        for modality in MODALITIES:
            for f in _ENCODER_FIELDS:
                a, b = first.manifest[modality].get(f), other.manifest[modality].get(f)
                if a != b:
                    diffs.append(f"{modality}.{f}: {a!r} vs {b!r}")
        for f in ("task", "labels"):
            a, b = first.manifest["dataset"].get(f), other.manifest["dataset"].get(f)
            if a != b:
                diffs.append(f"dataset.{f}: {a!r} vs {b!r}")
        if diffs:
            raise CacheError(f"caches {first.path} and {other.path} cannot be mixed; they "
                             "differ in " + "; ".join(diffs))
