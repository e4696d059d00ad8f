"""A generic manifest: one row per image-text pair, JSONL or CSV with a header.

Fields: `image` (path relative to the manifest file), `text`, `label` (single-label) or `labels`
(multi-label: a JSON list in JSONL, `|`-separated in CSV), optional `split` (train / val (dev) /
test) and `id`. The first readable row decides single- vs multi-label and whether splits are
given. Label vocabulary: `labels.json` beside the manifest (a list, or {label: index}; then an
unknown label is a bad row), else the sorted set of labels seen in the whole file. Without a
`split` field, images are carved into train/val/test 80/10/10 (seeded, by image, so pairs that
share an image stay together) and `notes` says so.
"""
from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from .base import DatasetError, DatasetReader, ImageRef, OnBad, Sample
from .splits import canonical_split, carve_groups
from .textfiles import find_file, open_text, read_json, undecodable

MANIFEST_NAMES = ("manifest.jsonl", "manifest.csv")
CARVE_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


class ManifestReader(DatasetReader):
    name = "manifest"

    def __init__(self, root: str | Path, *, on_bad: OnBad = "error", seed: int = 0,
                 name: str = "manifest"):
        super().__init__(root, on_bad=on_bad)
        self.name = name
        self.path = self._find_manifest(self.root)
        self.dir = self.path.parent
        self.format = "csv" if self.path.suffix.lower() == ".csv" else "jsonl"
        self.notes: list[str] = []
        self._scan(seed)

    @staticmethod
    def _find_manifest(root: Path) -> Path:
        if root.is_file():
            return root
        found = [root / n for n in MANIFEST_NAMES if (root / n).is_file()]
        if len(found) != 1:
            what = "no" if not found else "two"
            raise DatasetError(f"{what} manifest in {root}; expected exactly one of {list(MANIFEST_NAMES)} "
                               f"(or pass the manifest file itself)")
        return found[0]

    # -- rows -------------------------------------------------------------------------------
    def _rows(self) -> Iterator[tuple[int, dict[str, Any] | str]]:
        """(line number, row dict) or (line number, error text) for a malformed line."""
        with open_text(self.path, newline="") as f:
            if self.format == "jsonl":
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    bad_bytes = undecodable(line)
                    if bad_bytes:
                        yield lineno, bad_bytes
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        yield lineno, f"malformed JSON: {e}"
                        continue
                    yield lineno, row if isinstance(row, dict) else "malformed row: not a JSON object"
                return
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise DatasetError(f"{self.path}: empty CSV (a header row is required)")
            bad_header = undecodable(reader.fieldnames)
            if bad_header:
                raise DatasetError(f"{self.path}:1: header row {bad_header}")
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    yield reader.line_num, f"malformed CSV line: {e}"
                    continue
                bad_bytes = undecodable(row)
                if bad_bytes:
                    yield reader.line_num, bad_bytes
                    continue
                if None in row or None in row.values():
                    yield reader.line_num, (f"malformed CSV line: expected {len(reader.fieldnames)} "
                                            f"columns {reader.fieldnames}")
                    continue
                yield reader.line_num, row

    def _labels_of(self, row: dict[str, Any]) -> list[str] | str:
        """The row's labels, or an error text."""
        key = "labels" if self.task == "multi-label" else "label"
        value = row.get(key)
        if value is None or value == "":
            return f"missing field {key!r}"
        if self.task == "single-label":
            return [str(value).strip()] if str(value).strip() else f"empty field {key!r}"
        if self.format == "csv":
            labels = [x.strip() for x in str(value).split("|") if x.strip()]
        elif isinstance(value, list) and all(isinstance(x, (str, int)) for x in value):
            labels = [str(x).strip() for x in value if str(x).strip()]
        else:
            return f"field 'labels' must be a JSON list of labels, got {value!r}"
        return labels if labels else "empty field 'labels'"

    def _image_key(self, image: str) -> str:
        return Path(os.path.relpath(os.path.normpath(self.dir / image), self.dir)).as_posix()

    # -- the light first pass: task, vocabulary, splits, duplicate ids (no image is touched) --
    def _scan(self, seed: int) -> None:
        first = next((row for _, row in self._rows() if isinstance(row, dict)
                      and ("label" in row or "labels" in row)), None)
        if first is None:
            raise DatasetError(f"{self.path}: no readable row with a 'label' or 'labels' field")
        self.task = "multi-label" if "labels" in first else "single-label"
        self.has_split = "split" in first
        seen: set[str] = set()
        image_keys: list[str] = []
        ids: Counter[str] = Counter()
        for _, row in self._rows():
            if not isinstance(row, dict):
                continue
            labels = self._labels_of(row)
            if isinstance(labels, list):
                seen.update(labels)
            if isinstance(row.get("image"), str) and row["image"].strip():
                image_keys.append(self._image_key(row["image"].strip()))
            if row.get("id") not in (None, ""):
                ids[str(row["id"])] += 1
        self._duplicate_ids = {i for i, c in ids.items() if c > 1}
        labels_json = self.dir / "labels.json"
        if labels_json.is_file():
            data = read_json(labels_json)
            if isinstance(data, dict):
                self.labels = [k for k, _ in sorted(data.items(), key=lambda kv: int(kv[1]))]
            elif isinstance(data, list):
                self.labels = [str(x) for x in data]
            else:
                raise DatasetError(f"{labels_json}: expected a list of labels or a {{label: index}} object")
            self.closed_vocabulary = True
        else:
            self.labels = sorted(seen)
            self.closed_vocabulary = False
        if self.has_split:
            self.splits = ("train", "val", "test")
            self._carved: dict[str, str] = {}
        else:
            self.splits = tuple(CARVE_FRACTIONS)
            self._carved = carve_groups(image_keys, CARVE_FRACTIONS, seed)
            counts = Counter(self._carved.values())
            self.notes.append(f"{self.path}: no 'split' field; carved images into train/val/test 80/10/10 "
                              f"(seed {seed}, by image): {dict(sorted(counts.items()))} images")

    # -- the stream ---------------------------------------------------------------------------
    def samples(self, split: str) -> Iterator[Sample]:
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r} for {self.path}; valid: {list(self.splits)}")
        label_index = {label: i for i, label in enumerate(self.labels)}
        found: dict[str, tuple[Path | None, str]] = {}  # one stat per image, not per pair
        for lineno, row in self._rows():
            source = f"{self.path}:{lineno}"
            if isinstance(row, str):
                if split == self.splits[0]:  # a malformed line has no split: report it once
                    self.report.bad(source, row)
                continue
            image = row.get("image")
            image = image.strip() if isinstance(image, str) else ""
            # Decide the row's split first, so each bad row is reported by exactly one split.
            if self.has_split:
                row_split = canonical_split(row.get("split") or "")
                if row_split is None:
                    if split == self.splits[0]:
                        self.report.bad(source, f"split {row.get('split')!r} is not one of train, val (dev), test")
                    continue
            else:
                row_split = self._carved.get(self._image_key(image)) if image else self.splits[0]
            if row_split != split:
                continue
            if not image:
                self.report.bad(source, "missing field 'image'")
                continue
            text = row.get("text")
            if not isinstance(text, str) or not text.strip():
                self.report.bad(source, "missing or empty 'text'")
                continue
            labels = self._labels_of(row)
            if isinstance(labels, str):
                self.report.bad(source, labels)
                continue
            unknown = [x for x in labels if x not in label_index]
            if unknown:
                self.report.bad(source, f"unknown label(s) {unknown}; labels.json lists {self.labels}")
                continue
            sample_id = str(row["id"]) if row.get("id") not in (None, "") else f"line{lineno}"
            if sample_id in self._duplicate_ids:
                self.report.bad(source, f"duplicate id {sample_id!r}")
                continue
            key = self._image_key(image)
            if key not in found:
                found[key] = find_file(self.dir / key)
            path, missing = found[key]
            if path is None:
                self.report.bad(source, missing)
                continue
            yield Sample(sample_id, split, key, ImageRef("file", str(path)), text.strip(),
                         tuple(sorted({label_index[x] for x in labels})), source)
