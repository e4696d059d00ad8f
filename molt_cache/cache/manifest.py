"""The cache manifest: what made every array (docs/cache-format.md, 'Manifest').

A cache is reused or resumed only when its manifest matches the one a run would write; anything
else is refused with the exact differing fields, so two runs never mix in one folder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import molt_cache
from molt_cache.cache.errors import CacheError
from molt_cache.cache.layout import FORMAT_VERSION, MANIFEST_ATTR, MANIFEST_FILE

if TYPE_CHECKING:  # stage two reads manifests and must not import the encoders package
    from molt_cache.encoders.base import EncoderIdentity

# Fields that do not change a single stored byte, so they never block a resume.
# Specs are how the user named things; the encoder identities (weights checksums) and the dataset
# fingerprint are what decide the bytes.
IGNORED_FIELDS = ("complete", "molt_cache_version", "dataset.root", "dataset.notes", "extraction.text_spec",
                  "extraction.image_spec", "extraction.image_weights", "extraction.dataset_options")


class CacheMismatchError(ValueError):
    """The output folder holds a different cache; the message lists the differing fields."""


def dataset_fingerprint(rows: Iterable[tuple[str, str, str, str, tuple[int, ...]]]) -> str:
    """sha256 over the ordered (split, sample_id, image_key, text, target) rows, one JSON line each."""
    h = hashlib.sha256()
    for split, sample_id, image_key, text, target in rows:
        h.update(json.dumps([split, sample_id, image_key, text, list(target)],
                            ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def build_manifest(*, dataset: dict[str, Any], splits: dict[str, dict[str, int]],
                   text: EncoderIdentity, image: EncoderIdentity, perturbation: dict[str, Any],
                   layout: dict[str, Any], complete: bool = False) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "molt_cache_version": molt_cache.__version__,
        "dataset": dataset,
        "splits": splits,
        "text": dataclasses.asdict(text),
        "image": dataclasses.asdict(image),
        "perturbation": perturbation,
        "layout": layout,
        "complete": complete,
    }


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: d}


def compare_manifests(existing: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Dotted field names whose values differ (e.g. 'text.weights_sha256'), one line each with
    both values; [] when the two caches would hold the same bytes."""
    a = _flatten(json.loads(json.dumps(existing)))
    b = _flatten(json.loads(json.dumps(wanted)))
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in IGNORED_FIELDS or key.startswith("extraction.dataset_options."):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{key}: cache has {a.get(key, '<absent>')!r}, this run wants "
                         f"{b.get(key, '<absent>')!r}")
    return diffs


class ManifestError(CacheError):
    """manifest.json (or the root zarr.json) is not valid JSON / not a manifest; names the file."""


def _load_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or a one-line ManifestError naming the file, line and problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text (byte {e.start}); the file is damaged") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                            "the file is damaged") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def load_manifest_file(root: Path) -> dict[str, Any] | None:
    """manifest.json of a cache folder; None when absent; ManifestError naming it when malformed."""
    path = Path(root) / MANIFEST_FILE
    if not path.exists():
        return None
    data = _load_json_object(path)
    missing = [k for k in ("format_version", "dataset", "splits", "text", "image") if k not in data]
    if missing:
        raise ManifestError(f"{path}: not a molt-cache manifest, it lacks {missing}")
    return data


read_manifest_file = load_manifest_file


def read_manifest_attrs(root: Path) -> dict[str, Any] | None:
    """The manifest in the root group's attrs (present from the start of a run), or None."""
    path = Path(root) / "zarr.json"
    if not path.exists():
        return None
    meta = _load_json_object(path)
    return meta.get("attributes", {}).get(MANIFEST_ATTR)


def write_manifest_file(root: Path, manifest: dict[str, Any]) -> None:
    """Atomic: a reader sees no manifest.json or the whole one."""
    path = Path(root) / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def validate_manifest(m: dict[str, Any]) -> None:
    """Refuse a manifest this code cannot read, naming the problem."""
    missing = [k for k in ("format_version", "dataset", "splits", "text", "image", "perturbation")
               if k not in m]
    if missing:
        raise CacheMismatchError(f"cache manifest lacks fields {missing}")
    if m["format_version"] != FORMAT_VERSION:
        raise CacheMismatchError(f"cache format_version {m['format_version']} is not supported; "
                                 f"this molt-cache reads version {FORMAT_VERSION}")
