"""SNLI-VE (visual entailment): Flickr30k premise images, SNLI hypotheses, 3 classes.

Layout: `snli_ve_{train,dev,test}.jsonl` in `root`, images in `root/Flickr30K/flickr30k_images/`
or `root/flickr30k_images/` (or an explicit `image_dir`). About 530k pairs share about 30k
images, so `image_key` is the Flickr30k id: stage one encodes each image once.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from .base import DatasetError, DatasetReader, ImageRef, OnBad, Sample, SeenIds
from .textfiles import find_file, open_text, undecodable

LABELS = ["entailment", "neutral", "contradiction"]  # fixed order; gold_label "-" is a bad row
SPLIT_FILES = {"train": "snli_ve_train.jsonl", "val": "snli_ve_dev.jsonl", "test": "snli_ve_test.jsonl"}
# The current release names the image field Flickr30K_ID ("<id>"); older copies Flikr30kID ("<id>.jpg").
IMAGE_ID_FIELDS = ("Flickr30K_ID", "Flikr30kID")


class SnliVeReader(DatasetReader):
    name = "snli-ve"
    task = "single-label"
    labels = LABELS
    splits = ("train", "val", "test")

    def __init__(self, root: str | Path, *, on_bad: OnBad = "error",
                 image_dir: str | Path | None = None):
        super().__init__(root, on_bad=on_bad)
        self.notes: list[str] = []
        self.image_dir = self._find_image_dir(image_dir)
        self._found: dict[str, tuple[Path | None, str]] = {}  # image id -> (file, why not): one stat per image

    def _find_image_dir(self, image_dir: str | Path | None) -> Path:
        if image_dir is not None:
            d = Path(image_dir)
            if not d.is_dir():
                raise DatasetError(f"SNLI-VE image_dir {d} is not a folder")
            return d
        tried = [self.root / "Flickr30K" / "flickr30k_images", self.root / "flickr30k_images"]
        for d in tried:
            if d.is_dir():
                return d
        raise DatasetError(f"SNLI-VE: no Flickr30k image folder; looked for {[str(t) for t in tried]} "
                           f"(pass image_dir=... to point at it)")

    def split_file(self, split: str) -> Path:
        if split not in SPLIT_FILES:
            raise ValueError(f"unknown SNLI-VE split {split!r}; valid: {list(SPLIT_FILES)}")
        path = self.root / SPLIT_FILES[split]
        if not path.is_file():
            raise DatasetError(f"SNLI-VE split file {path} not found (expected {list(SPLIT_FILES.values())} in {self.root})")
        return path

    def samples(self, split: str) -> Iterator[Sample]:
        path = self.split_file(split)
        seen = SeenIds()
        with open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                source = f"{path}:{lineno}"
                sample = self._parse(line, split, source, lineno)
                if sample is None:
                    continue
                duplicate = seen.duplicate(sample.sample_id, source)
                if duplicate:
                    self.report.bad(source, duplicate)
                    continue
                yield sample

    def _parse(self, line: str, split: str, source: str, lineno: int) -> Sample | None:
        bad_bytes = undecodable(line)
        if bad_bytes:
            return self.report.bad(source, bad_bytes)
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return self.report.bad(source, f"malformed JSON: {e}")
        if not isinstance(row, dict):
            return self.report.bad(source, "malformed row: not a JSON object")
        image_id = next((str(row[k]) for k in IMAGE_ID_FIELDS if row.get(k) not in (None, "")), None)
        if image_id is None:
            return self.report.bad(source, f"missing image id field (one of {list(IMAGE_ID_FIELDS)})")
        image_id = image_id.removesuffix(".jpg")
        text = row.get("sentence2")
        if not isinstance(text, str) or not text.strip():
            return self.report.bad(source, "missing or empty text field 'sentence2'")
        gold = row.get("gold_label")
        if gold not in LABELS:
            return self.report.bad(source, f"gold_label {gold!r} is not one of {LABELS}")
        if image_id not in self._found:
            self._found[image_id] = find_file(self.image_dir / f"{image_id}.jpg")
        image_path, missing = self._found[image_id]
        if image_path is None:
            return self.report.bad(source, missing)
        pair_id = row.get("pairID")
        return Sample(
            sample_id=str(pair_id) if pair_id not in (None, "") else f"{split}-{lineno}",
            split=split,
            image_key=image_id,
            image=ImageRef("file", str(image_path)),
            text=text.strip(),
            target=(LABELS.index(gold),),
            source=source,
        )
