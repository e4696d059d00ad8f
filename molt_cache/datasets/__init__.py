"""Dataset readers: one factory over a small registry (`list_datasets`, `open_dataset`).

Every reader streams `Sample`s (base.py) in a deterministic order and never decodes an image;
`ImageRef.open()` does that later, in stage one's workers, through the one decoder
`decode_image` (images.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .base import BadRow, BadRowReport, DatasetError, DatasetReader, ImageRef, OnBad, Sample
from .food101 import Food101Reader
from .images import ImageDecodeError, array_to_image, decode_image
from .manifest import ManifestReader
from .mmimdb import GENRES, MmImdbHdf5Reader, MmImdbReader
from .openclipart import OpenClipartReader
from .sample import OPENCLIPART_SAMPLE_DIR, SAMPLE_DIR, open_openclipart_sample, open_sample
from .snli_ve import SnliVeReader

_READERS: dict[str, Callable[..., DatasetReader]] = {
    "snli-ve": SnliVeReader,
    "food101": Food101Reader,
    "mmimdb": MmImdbReader,
    "mmimdb-hdf5": MmImdbHdf5Reader,
    "manifest": ManifestReader,
    "openclipart": OpenClipartReader,
    "sample": open_sample,
    "openclipart-sample": open_openclipart_sample,
}
BUNDLED = ("sample", "openclipart-sample")  # readable without a root


def list_datasets() -> list[str]:
    return list(_READERS)


def open_dataset(name: str, root: str | Path | None, *, on_bad: OnBad = "error", **options: Any) -> DatasetReader:
    """Open one release. `root` may be None only for the bundled samples (`BUNDLED`).

    `options` go to the reader: snli-ve `image_dir`; food101 `val_fraction`, `seed`;
    mmimdb-hdf5 `metadata`, `pad_id`; manifest `seed`;
    openclipart `seed`, `min_items`, `exclude`, `max_pixels`.
    """
    if name not in _READERS:
        raise ValueError(f"unknown dataset {name!r}; valid: {list_datasets()}")
    if on_bad not in ("error", "skip"):
        raise ValueError(f"unknown on_bad {on_bad!r}; valid: ['error', 'skip']")
    if root is None and name not in BUNDLED:
        raise ValueError(f"dataset {name!r} needs a root folder (only {list(BUNDLED)} have a bundled default)")
    try:
        return _READERS[name](root, on_bad=on_bad, **options)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise ValueError(f"dataset {name!r}: {e}") from e
        raise


__all__ = ["BUNDLED", "BadRow", "BadRowReport", "DatasetError", "DatasetReader", "Food101Reader", "GENRES",
           "ImageDecodeError", "ImageRef", "array_to_image", "decode_image",
           "ManifestReader", "MmImdbHdf5Reader", "MmImdbReader", "OPENCLIPART_SAMPLE_DIR", "OnBad", "OpenClipartReader",
           "SAMPLE_DIR", "Sample", "SnliVeReader", "list_datasets", "open_dataset", "open_openclipart_sample",
           "open_sample"]
