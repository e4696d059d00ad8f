"""UPMC-Food101 in the layout multimodal papers use (image + scraped web-page title).

    root/images/{train,test}/<class>/<class>_<n>.jpg
    root/texts/{train,test}_titles.csv   no header: image file name, text, class
    root/class_idx.json                  optional: {class: index} or [class, ...]; its order wins
    root/split.json                      optional: {"train": [...], "val": [...], "test": [...]}

Without split.json, val is carved from train: seeded (seed 0), stratified by class, 10%,
and `notes` says so.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator

from .base import DatasetError, DatasetReader, ImageRef, OnBad, Sample, SeenIds
from .splits import canonical_split, carve_stratified, group_by
from .textfiles import find_file, open_text, read_json, undecodable

CSV_SPLITS = ("train", "test")  # the release's own two CSV files; val lives inside train


class Food101Reader(DatasetReader):
    name = "food101"
    task = "single-label"
    splits = ("train", "val", "test")

    def __init__(self, root: str | Path, *, on_bad: OnBad = "error",
                 val_fraction: float = 0.1, seed: int = 0):
        super().__init__(root, on_bad=on_bad)
        self.notes: list[str] = []
        for s in CSV_SPLITS:
            if not self.csv_path(s).is_file():
                raise DatasetError(f"UPMC-Food101: {self.csv_path(s)} not found "
                                   f"(expected texts/train_titles.csv and texts/test_titles.csv under {self.root})")
        self.labels = self._load_labels()
        self._membership = self._load_membership(val_fraction, seed)  # split -> (csv split, file names)

    def csv_path(self, csv_split: str) -> Path:
        return self.root / "texts" / f"{csv_split}_titles.csv"

    def _load_labels(self) -> list[str]:
        path = self.root / "class_idx.json"
        if path.is_file():
            data = read_json(path)
            if isinstance(data, dict):  # {class: index}: the index decides the order
                labels = [c for c, _ in sorted(data.items(), key=lambda kv: int(kv[1]))]
            elif isinstance(data, list):
                labels = [str(c) for c in data]
            else:
                raise DatasetError(f"{path}: expected a {{class: index}} object or a list of classes")
            if len(set(labels)) != len(labels):
                raise DatasetError(f"{path}: duplicate classes or indices")
            return labels
        classes = {d.name for s in CSV_SPLITS if (self.root / "images" / s).is_dir()
                   for d in (self.root / "images" / s).iterdir() if d.is_dir()}
        if not classes:
            raise DatasetError(f"UPMC-Food101: no class_idx.json and no class folders under {self.root / 'images'}")
        return sorted(classes)

    def _rows(self, csv_split: str) -> Iterator[tuple[int, list[str]]]:
        with open_text(self.csv_path(csv_split), newline="") as f:
            reader = csv.reader(f)
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:  # e.g. an unterminated quote
                    yield reader.line_num, [f"\0malformed CSV line: csv error: {e}"]
                    continue
                bad_bytes = undecodable(row)
                if bad_bytes:
                    yield reader.line_num, [f"\0{bad_bytes}"]
                elif row:
                    yield reader.line_num, row

    def _load_membership(self, val_fraction: float, seed: int) -> dict[str, tuple[str, set[str] | None]]:
        path = self.root / "split.json"
        if path.is_file():
            data = read_json(path)
            membership: dict[str, tuple[str, set[str] | None]] = {}
            for key, names in data.items():
                split = canonical_split(key)
                if split is None:
                    raise DatasetError(f"{path}: unknown split {key!r}; valid: train, val (or dev), test")
                membership[split] = ("test" if split == "test" else "train", {Path(n).name for n in names})
            missing = [s for s in self.splits if s not in membership]
            if missing:
                raise DatasetError(f"{path}: missing splits {missing}")
            return membership
        # No split file: carve val from train, stratified by the class column (a light text-only pass;
        # malformed rows are skipped here and reported when the split is read).
        keys = group_by((row[2], row[0]) for _, row in self._rows("train") if len(row) == 3)
        val = carve_stratified(keys, val_fraction, seed)
        self.notes.append(f"UPMC-Food101: no split.json in {self.root}; carved val = {len(val)} train images "
                          f"({val_fraction:.0%} per class, seed {seed}), train keeps the rest")
        return {"train": ("train", None), "val": ("train", val), "test": ("test", None)}

    def _in_split(self, split: str, file_name: str) -> bool:
        csv_split, names = self._membership[split]
        if names is not None:
            return file_name in names
        if split == "train":  # carved layout: train = train CSV minus carved val
            return file_name not in self._membership["val"][1]
        return True

    def samples(self, split: str) -> Iterator[Sample]:
        if split not in self.splits:
            raise ValueError(f"unknown UPMC-Food101 split {split!r}; valid: {list(self.splits)}")
        csv_split = self._membership[split][0]
        path = self.csv_path(csv_split)
        label_index = {c: i for i, c in enumerate(self.labels)}
        seen = SeenIds()
        for lineno, row in self._rows(csv_split):
            source = f"{path}:{lineno}"
            if len(row) != 3:
                if len(row) == 1 and row[0].startswith("\0"):
                    if split == csv_split:  # val reads the train CSV too: report once
                        self.report.bad(source, row[0][1:])
                elif self._in_split(split, Path(row[0]).name):
                    self.report.bad(source, f"malformed CSV line: expected 3 columns "
                                            f"(image file name, text, class), got {len(row)}")
                continue
            file_name, text, cls = row
            if not self._in_split(split, Path(file_name).name):
                continue
            if not text.strip():
                self.report.bad(source, "empty text")
                continue
            if cls not in label_index:
                self.report.bad(source, f"unknown class {cls!r} (not among the {len(self.labels)} classes)")
                continue
            image_path, missing = find_file(self.root / "images" / csv_split / cls / file_name)
            if image_path is None:
                self.report.bad(source, missing)
                continue
            duplicate = seen.duplicate(Path(file_name).stem, source)
            if duplicate:
                self.report.bad(source, duplicate)
                continue
            yield Sample(
                sample_id=Path(file_name).stem,
                split=split,
                image_key=f"{csv_split}/{cls}/{file_name}",
                image=ImageRef("file", str(image_path)),
                text=text.strip(),
                target=(label_index[cls],),
                source=source,
            )
