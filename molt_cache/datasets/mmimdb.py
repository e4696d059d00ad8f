"""MM-IMDB (movie posters + plots, 23 genres, multi-label): the folder release and the HDF5 one.

Folder release (`mmimdb/`):
    split.json             {"train": [ids], "dev": [ids], "test": [ids]}
    dataset/<id>.json      "plot": [str, ...] (the longest is taken), "genres": [str, ...]
    dataset/<id>.jpeg      the poster

HDF5 release (`multimodal_imdb.hdf5` + `metadata.npy`), this project's convention:
    images     (N, 3, 256, 160) uint8     posters, pre-resized by the release
    genres     (N, 23) 0/1, attrs["target_names"] = the genre names in column order
    sequences  (N,) vlen int  or  (N, T) int padded with `pad_id` (0)  word ids of the plot
    imdb_ids   (N,) str
    file attrs "train", "dev" (or "val"), "test": (start, end) half-open row ranges
    metadata.npy: a pickled dict (np.save) whose "ix_to_word" maps word id -> word
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np

from .base import DatasetError, DatasetReader, ImageRef, OnBad, Sample, SeenIds
from .splits import canonical_split
from .textfiles import read_json

# The benchmark's 23 genres (Arevalo et al. 2017); other genres in the metadata are ignored.
GENRES = ["Drama", "Comedy", "Romance", "Thriller", "Crime", "Action", "Adventure", "Horror",
          "Documentary", "Mystery", "Sci-Fi", "Fantasy", "Family", "Biography", "War", "History",
          "Music", "Animation", "Musical", "Western", "Sport", "Short", "Film-Noir"]


class MmImdbReader(DatasetReader):
    """The folder release. `root` is the `mmimdb/` folder or its parent."""

    name = "mmimdb"
    task = "multi-label"
    labels = GENRES
    splits = ("train", "val", "test")

    def __init__(self, root: str | Path, *, on_bad: OnBad = "error"):
        super().__init__(root, on_bad=on_bad)
        if not (self.root / "split.json").is_file() and (self.root / "mmimdb" / "split.json").is_file():
            self.root = self.root / "mmimdb"
        self.notes: list[str] = []
        # Genres outside the 23, counted over every sample read: how the benchmark defines the task.
        self.ignored_genres: Counter[str] = Counter()
        split_path = self.root / "split.json"
        if not split_path.is_file():
            raise DatasetError(f"MM-IMDB: {split_path} not found (expected mmimdb/split.json and mmimdb/dataset/)")
        data = read_json(split_path)
        self._ids: dict[str, list[str]] = {}
        for key, ids in data.items():
            split = canonical_split(key)
            if split is None:
                raise DatasetError(f"{split_path}: unknown split {key!r}; valid: train, dev (or val), test")
            self._ids[split] = [str(i) for i in ids]
        missing = [s for s in self.splits if s not in self._ids]
        if missing:
            raise DatasetError(f"{split_path}: missing splits {missing}")

    def samples(self, split: str) -> Iterator[Sample]:
        if split not in self.splits:
            raise ValueError(f"unknown MM-IMDB split {split!r}; valid: {list(self.splits)}")
        index = {g: i for i, g in enumerate(GENRES)}
        ignored_here: Counter[str] = Counter()
        seen = SeenIds()
        for movie_id in self._ids[split]:
            meta_path = self.root / "dataset" / f"{movie_id}.json"
            source = f"{meta_path}[{movie_id}]"
            duplicate = seen.duplicate(movie_id, f"{self.root / 'split.json'}")
            if duplicate:
                self.report.bad(source, f"{duplicate}: listed twice in split.json")
                continue
            if not meta_path.is_file():
                self.report.bad(source, f"metadata file {meta_path} not found")
                continue
            try:
                meta = read_json(meta_path)
            except DatasetError as e:  # names file:line and the byte or JSON error
                self.report.bad(source, str(e))
                continue
            plot = meta.get("plot") if isinstance(meta, dict) else None
            plots = [plot] if isinstance(plot, str) else [p for p in (plot or []) if isinstance(p, str)]
            text = max(plots, key=lambda p: len(p.strip()), default="").strip()  # longest; first on ties
            if not text:
                self.report.bad(source, "missing or empty 'plot'")
                continue
            genres = meta.get("genres")
            if not isinstance(genres, list):
                self.report.bad(source, "missing field 'genres' (a list)")
                continue
            known = sorted({index[g] for g in genres if g in index})
            unknown = [g for g in genres if g not in index]
            ignored_here.update(unknown)
            if not known:
                self.report.bad(source, f"none of the 23 benchmark genres in {genres}")
                continue
            image_path = self.root / "dataset" / f"{movie_id}.jpeg"
            if not image_path.is_file():
                self.report.bad(source, f"image file {image_path} not found")
                continue
            yield Sample(movie_id, split, movie_id, ImageRef("file", str(image_path)), text,
                         tuple(known), source)
        self.ignored_genres.update(ignored_here)
        if ignored_here:
            self.notes.append(f"MM-IMDB {split}: ignored {sum(ignored_here.values())} genre labels outside "
                              f"the 23: {dict(sorted(ignored_here.items()))}")


class MmImdbHdf5Reader(DatasetReader):
    """The HDF5 release. `root` is `multimodal_imdb.hdf5` or the folder holding it (and metadata.npy).

    metadata.npy is a pickle: loading it can run code, so only read a file you trust.
    """

    name = "mmimdb-hdf5"
    task = "multi-label"
    splits = ("train", "val", "test")
    FILE = "multimodal_imdb.hdf5"

    def __init__(self, root: str | Path, *, on_bad: OnBad = "error",
                 metadata: str | Path | None = None, pad_id: int = 0, chunk_rows: int = 1024):
        super().__init__(root, on_bad=on_bad)
        import h5py

        self.path = self.root if self.root.is_file() else self.root / self.FILE
        if not self.path.is_file():
            raise DatasetError(f"MM-IMDB HDF5: {self.path} not found")
        self.metadata_path = Path(metadata) if metadata is not None else self.path.parent / "metadata.npy"
        if not self.metadata_path.is_file():
            raise DatasetError(f"MM-IMDB HDF5: vocabulary {self.metadata_path} not found (pass metadata=...)")
        meta = np.load(self.metadata_path, allow_pickle=True)  # trusted file only (see docs)
        meta = meta.item() if isinstance(meta, np.ndarray) and meta.dtype == object and meta.ndim == 0 else meta
        if not isinstance(meta, dict) or "ix_to_word" not in meta:
            raise DatasetError(f"{self.metadata_path}: expected a pickled dict with key 'ix_to_word'")
        self.ix_to_word = {int(k): str(v) for k, v in meta["ix_to_word"].items()}
        self.pad_id = pad_id
        self.chunk_rows = chunk_rows
        self.notes: list[str] = []
        with h5py.File(self.path, "r") as f:
            for name in ("images", "genres", "sequences", "imdb_ids"):
                if name not in f:
                    raise DatasetError(f"{self.path}: dataset {name!r} missing; expected images, genres, sequences, imdb_ids")
            n = f["images"].shape[0]
            if f["images"].ndim != 4 or f["images"].shape[1] != 3:
                raise DatasetError(f"{self.path}: images must be N×3×H×W uint8, got {f['images'].shape}")
            for name in ("genres", "sequences", "imdb_ids"):
                if f[name].shape[0] != n:
                    raise DatasetError(f"{self.path}: {name} has {f[name].shape[0]} rows, images {n}")
            names = f["genres"].attrs.get("target_names")
            if names is None:
                if f["genres"].shape[1] != len(GENRES):
                    raise DatasetError(f"{self.path}: genres has no attrs['target_names'] and is not N×23")
                self.labels = list(GENRES)
            else:
                self.labels = [x.decode() if isinstance(x, bytes) else str(x) for x in names]
            self._ranges: dict[str, tuple[int, int]] = {}
            for key, value in f.attrs.items():
                split = canonical_split(key)
                if split is None or split in self._ranges:
                    continue
                start, end = (int(v) for v in np.asarray(value).ravel()[:2])
                if not 0 <= start <= end <= n:
                    raise DatasetError(f"{self.path}: attrs[{key!r}] = ({start}, {end}) outside rows 0..{n}")
                self._ranges[split] = (start, end)
            missing = [s for s in self.splits if s not in self._ranges]
            if missing:
                raise DatasetError(f"{self.path}: file attrs lack split ranges for {missing}; expected attrs "
                                   f"'train', 'dev' (or 'val'), 'test' = (start, end) row ranges")
        self.n_rows = n

    def _words(self, ids: np.ndarray, source: str, padded: bool) -> str | None:
        ids = np.asarray(ids).ravel()
        if padded:  # (N, T) layout: pad_id fills the tail of short plots
            ids = ids[ids != self.pad_id]
        unknown = sorted({int(i) for i in ids if int(i) not in self.ix_to_word})
        if unknown:
            self.report.bad(source, f"word ids {unknown[:5]} not in metadata ix_to_word")
            return None
        return " ".join(self.ix_to_word[int(i)] for i in ids)

    def samples(self, split: str) -> Iterator[Sample]:
        import h5py

        if split not in self.splits:
            raise ValueError(f"unknown MM-IMDB split {split!r}; valid: {list(self.splits)}")
        start, end = self._ranges[split]
        with h5py.File(self.path, "r") as f:
            padded = f["sequences"].ndim == 2  # (N, T) padded ints; else vlen (N,)
            for lo in range(start, end, self.chunk_rows):  # read rows in chunks, never the images
                hi = min(lo + self.chunk_rows, end)
                genres = np.asarray(f["genres"][lo:hi])
                sequences = f["sequences"][lo:hi]
                ids = f["imdb_ids"][lo:hi]
                for j in range(hi - lo):
                    row = lo + j
                    raw_id = ids[j]
                    movie_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                    source = f"{self.path}[row {row}, imdb id {movie_id}]"
                    text = self._words(sequences[j], source, padded)
                    if text is None:
                        continue
                    if not text.strip():
                        self.report.bad(source, "empty plot (no words in 'sequences')")
                        continue
                    target = tuple(int(k) for k in np.flatnonzero(genres[j]))
                    if not target:
                        self.report.bad(source, "no genre set in 'genres'")
                        continue
                    yield Sample(movie_id, split, movie_id, ImageRef("hdf5", str(self.path), row),
                                 text, target, source)
