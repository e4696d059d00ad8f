"""MM-IMDB (movie posters + plots, 23 genres, multi-label): the folder release and the HDF5 one.

Folder release (`mmimdb/`):
    split.json             {"train": [ids], "dev": [ids], "test": [ids]}
    dataset/<id>.json      "plot": [str, ...] (the longest is taken), "genres": [str, ...]
    dataset/<id>.jpeg      the poster

HDF5 release (`multimodal_imdb.hdf5` + `metadata.npy`), as gmu-mmimdb's make_dataset.py writes it:
    images     (N, 3, 256, 160) int32 0..255 posters, pre-resized (uint8, float [0, 1] / [0, 255] too)
    genres     (N, 23) int32 0/1, attrs["target_names"] = json.dumps(genre names in column order)
               (a list of str or of bytes is accepted too)
    sequences  (N,) vlen int32 word ids of the plot (or (N, T) int padded with `pad_id`, 0)
    imdb_ids   (N,) S7 bytes (or str)
    file attrs "split": Fuel's split table (split, source, start, stop, ...) rows; the rows of
               source "images" give each split's half-open row range ("dev" -> val). Files with
               attrs "train", "dev" (or "val"), "test" = (start, end) are read too.
    metadata.npy: a pickled dict (np.save, Python 2) with "ix_to_word" (word id -> word, 0 =
               "_UNK_"), "word_to_ix", "vocab_size", "lookup" (float32 word vectors); read by a
               restricted unpickler (safe_pickle.py), never by np.load(allow_pickle=True).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np

from .base import DatasetError, DatasetReader, ImageRef, OnBad, Sample, SeenIds
from .splits import canonical_split
from .safe_pickle import decode_strings, load_npy_restricted
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

    metadata.npy is a pickle; it is read by a restricted unpickler (`safe_pickle`) that builds
    only plain data, so a crafted file cannot run code.
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
        self.ix_to_word = self._load_vocabulary(self.metadata_path)
        self.pad_id = pad_id
        self.chunk_rows = chunk_rows
        self.notes: list[str] = []
        with h5py.File(self.path, "r") as f:
            for name in ("images", "genres", "sequences", "imdb_ids"):
                if name not in f:
                    raise DatasetError(f"{self.path}: dataset {name!r} missing; expected images, genres, sequences, imdb_ids")
            n = f["images"].shape[0]
            if f["images"].ndim != 4 or f["images"].shape[1] != 3:
                raise DatasetError(f"{self.path}: images must be N×3×H×W, got {f['images'].shape}")
            if f["images"].dtype.kind not in "biuf":
                raise DatasetError(f"{self.path}: images has dtype {f['images'].dtype}; expected integers in "
                                   "0..255 (the release: int32) or floats in [0, 1] or [0, 255]")
            for name in ("genres", "sequences", "imdb_ids"):
                if f[name].shape[0] != n:
                    raise DatasetError(f"{self.path}: {name} has {f[name].shape[0]} rows, images {n}")
            self.labels = self._target_names(f["genres"])
            self._ranges = self._split_ranges(f, n)
        self.n_rows = n

    def _load_vocabulary(self, path: Path) -> dict[int, str]:
        meta = decode_strings(load_npy_restricted(path), str(path))
        if not isinstance(meta, dict) or not isinstance(meta.get("ix_to_word"), dict):
            raise DatasetError(f"{path}: expected a pickled dict with key 'ix_to_word' (word id -> word)")
        vocab: dict[int, str] = {}
        for k, v in meta["ix_to_word"].items():
            if isinstance(k, str) and k.strip().lstrip("-").isdigit():
                k = int(k)  # a vocabulary saved through JSON has string ids
            if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not isinstance(v, str):
                raise DatasetError(f"{path}: ix_to_word entry {k!r}: {v!r} is not (int id: str word)")
            vocab[int(k)] = v
        return vocab

    def _target_names(self, genres) -> list[str]:
        """attrs['target_names']: the release's JSON string (str or bytes), or a list of str or
        bytes; anything else is refused naming the attribute."""
        where = f"{self.path}: genres.attrs['target_names']"
        names = genres.attrs.get("target_names")
        if names is None:
            if genres.ndim != 2 or genres.shape[1] != len(GENRES):
                raise DatasetError(f"{self.path}: genres has no attrs['target_names'] and is not N×23")
            return list(GENRES)
        if isinstance(names, np.ndarray) and names.ndim == 0:
            names = names.item()
        if isinstance(names, (bytes, np.bytes_)):
            try:
                names = bytes(names).decode("utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(f"{where} is bytes that are not UTF-8") from e
        if isinstance(names, str):
            try:
                names = json.loads(names)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where} is a string but not a JSON list of genre names: {names[:60]!r}") from e
        if isinstance(names, np.ndarray) and names.ndim == 1:
            names = names.tolist()
        if not isinstance(names, list) or not all(isinstance(x, (str, bytes)) for x in names):
            raise DatasetError(f"{where} must be a JSON string, a list of str or a list of bytes; got "
                               f"{type(names).__name__} {str(names)[:60]}")
        labels = [x.decode("utf-8") if isinstance(x, bytes) else x for x in names]
        if genres.ndim != 2 or len(labels) != genres.shape[1]:
            raise DatasetError(f"{where} names {len(labels)} genres but genres has shape {genres.shape}")
        if len(set(labels)) != len(labels):
            raise DatasetError(f"{where} repeats a genre: {labels}")
        return labels

    def _split_ranges(self, f, n: int) -> dict[str, tuple[int, int]]:
        """Row ranges per split: the release's Fuel `split` attribute (a table of (split, source,
        start, stop, ...) rows; the `images` source decides), or attrs 'train', 'dev' (or 'val'),
        'test' = (start, end)."""
        ranges: dict[str, tuple[int, int]] = {}
        table = f.attrs.get("split")
        if isinstance(table, np.ndarray) and table.dtype.names and {"split", "source", "start", "stop"} <= set(table.dtype.names):
            for row in table:
                name = row["split"].decode() if isinstance(row["split"], bytes) else str(row["split"])
                source = row["source"].decode() if isinstance(row["source"], bytes) else str(row["source"])
                split = canonical_split(name)
                if split is None or source != "images":
                    continue
                if "available" in table.dtype.names and not row["available"]:
                    continue
                ranges[split] = (int(row["start"]), int(row["stop"]))
            where = "attrs['split'] (Fuel split table, source 'images')"
        else:
            for key, value in f.attrs.items():
                split = canonical_split(key)
                if split is None or split in ranges:
                    continue
                start, end = (int(v) for v in np.asarray(value).ravel()[:2])
                ranges[split] = (start, end)
            where = "attrs"
        for split, (start, end) in ranges.items():
            if not 0 <= start <= end <= n:
                raise DatasetError(f"{self.path}: {where} range of {split!r} = ({start}, {end}) outside rows 0..{n}")
        missing = [s for s in self.splits if s not in ranges]
        if missing:
            raise DatasetError(f"{self.path}: no split ranges for {missing}; expected the release's Fuel "
                               f"attrs['split'] table, or attrs 'train', 'dev' (or 'val'), 'test' = (start, end)")
        return ranges

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
        seen = SeenIds()
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
                    movie_id = (bytes(raw_id).decode("utf-8", "replace") if isinstance(raw_id, (bytes, np.bytes_))
                                else str(raw_id))
                    source = f"{self.path}[row {row}, imdb id {movie_id}]"
                    duplicate = seen.duplicate(movie_id, source)
                    if duplicate:
                        self.report.bad(source, duplicate)
                        continue
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
