"""The one record every dataset reader yields, and how readers report bad rows.

Every reader (SNLI-VE, UPMC-Food101, MM-IMDB folder/HDF5, generic manifest, bundled sample)
streams `Sample`s; stage one (`molt extract`) only ever sees this interface.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

from PIL import Image

Task = Literal["single-label", "multi-label"]
OnBad = Literal["error", "skip"]


class DatasetError(ValueError):
    """A bad row or a bad file; the message always names the file and the line or sample id."""


@dataclass(frozen=True)
class ImageRef:
    """How to open one image. Picklable, so DataLoader workers can decode images.

    kind "file": `path` is an image file. kind "hdf5": `path` is an .hdf5 file, `index` the row of
    its `images` dataset (N×3×H×W uint8).
    """

    kind: Literal["file", "hdf5"]
    path: str
    index: int | None = None

    def open(self) -> Image.Image:
        """Decode to an RGB PIL image (`datasets.images.decode_image`: EXIF orientation, alpha on
        white, high bit depth scaled by range); raise DatasetError naming the file on any failure."""
        from .images import array_to_image, decode_image

        if self.kind == "file":
            return decode_image(self.path, source=self.path)
        if self.kind == "hdf5":
            where = f"{self.path}[images][{self.index}]"
            try:
                import h5py

                with h5py.File(self.path, "r") as f:
                    arr = f["images"][self.index]  # (3, H, W), any numeric dtype of the release
            except Exception as e:  # noqa: BLE001 - any read failure becomes a named error
                raise DatasetError(f"cannot read image {where}: {type(e).__name__}: {e}") from e
            return array_to_image(arr, source=where, channels_first=True)
        raise DatasetError(f"unknown image kind {self.kind!r} for {self.path}")


@dataclass(frozen=True)
class Sample:
    """One image-text pair.

    `image_key` is stable and shared by every pair that uses the same image (SNLI-VE: ~530k
    pairs over ~30k Flickr30k images) so stage one encodes each image once.
    `target` holds label indices into the reader's `labels`: exactly one for single-label tasks,
    zero or more for multi-label tasks.
    """

    sample_id: str
    split: str
    image_key: str
    image: ImageRef
    text: str
    target: tuple[int, ...]
    source: str = ""  # "file:line" or "file[id]" where this row came from, for error messages


@dataclass
class BadRow:
    source: str  # file:line or sample id
    reason: str


@dataclass
class BadRowReport:
    """Collects skipped rows under `--on-bad skip`; under "error" the first bad row raises."""

    on_bad: OnBad = "error"
    rows: list[BadRow] = field(default_factory=list)

    def bad(self, source: str, reason: str) -> None:
        if self.on_bad == "error":
            raise DatasetError(f"{source}: {reason} (pass --on-bad skip to skip and report such rows)")
        self.rows.append(BadRow(source, reason))

    def write(self, path: Path) -> None:
        import json

        path.write_text(json.dumps([r.__dict__ for r in self.rows], indent=1))

    def summary(self) -> str:
        return f"{len(self.rows)} bad rows skipped" if self.rows else "no bad rows"


class SeenIds:
    """Sample ids seen so far in one split: a repeated id is a bad row naming where it first was
    (the cache and the metrics key pairs by id, so a duplicate must never pass silently)."""

    def __init__(self) -> None:
        self.first: dict[str, str] = {}

    def duplicate(self, sample_id: str, source: str) -> str | None:
        """None the first time; afterwards the bad-row reason."""
        if sample_id in self.first:
            return f"duplicate sample id {sample_id!r} (first at {self.first[sample_id]})"
        self.first[sample_id] = source
        return None


class DatasetReader(ABC):
    """A streaming reader over one official release. Never loads all images."""

    name: str
    task: Task
    labels: list[str]  # label vocabulary; Sample.target indexes into it
    splits: tuple[str, ...]  # e.g. ("train", "val", "test")

    def __init__(self, root: str | Path, *, on_bad: OnBad = "error"):
        self.root = Path(root)
        self.report = BadRowReport(on_bad)

    @abstractmethod
    def samples(self, split: str) -> Iterator[Sample]:
        """Yield the split's samples in a deterministic order."""
