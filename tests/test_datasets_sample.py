"""The bundled sample (data/sample): reproducible, and its perfect-reader accuracies hold.

The accuracies are checked by brute force: attributes are read back from the content itself
(pixels of the image, words of the text), then the best label for every observable value is
counted, and the totals must equal the analytic numbers in data/make_sample.py / README.md.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from data.make_sample import perfect_reader_accuracy, make_sample
from molt_cache.datasets import SAMPLE_DIR, open_dataset


def image_attributes(path: str) -> tuple[str, str]:
    """(color, shape) read from the pixels: the saturated shape's hue and how much of its box it fills."""
    arr = np.asarray(Image.open(path).convert("RGB")).astype(int)
    r, b = arr[..., 0], arr[..., 2]
    red, blue = (r > 140) & (b < 110), (b > 140) & (r < 110)
    color = "red" if red.sum() > blue.sum() else "blue"
    mask = red if color == "red" else blue
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return color, ("square" if fill > 0.9 else "circle")  # a disc fills pi/4 of its box


def text_attributes(text: str) -> tuple[str, str | None]:
    words = set(text.split())
    animal = "cat" if words & {"cat", "kitten"} else "dog"
    assert (words & {"cat", "kitten"}) or (words & {"dog", "puppy"}), text
    color = next((c for c in ("red", "blue") if c in words), None)
    return animal, color


def perfect_reader(labels: list[str], views: list) -> Fraction:
    """Best accuracy of any function of the view: per distinct view, its most common label."""
    groups: dict = defaultdict(Counter)
    for view, label in zip(views, labels):
        groups[view][label] += 1
    return Fraction(sum(max(c.values()) for c in groups.values()), len(labels))


@pytest.fixture(scope="module")
def sample():
    reader = open_dataset("sample", None)
    return reader, {s: list(reader.samples(s)) for s in reader.splits}


def test_sample_reads_through_the_registry(sample):
    reader, data = sample
    assert reader.name == "sample" and reader.task == "single-label"
    assert reader.labels == ["blue_cat", "blue_dog", "red_cat", "red_dog"]
    assert {s: len(v) for s, v in data.items()} == {"train": 408, "val": 96, "test": 96}
    split_of = {}
    for split, samples in data.items():
        for s in samples:
            assert split_of.setdefault(s.image_key, split) == split  # no image in two splits
    assert len(split_of) == 200
    assert set(Counter(s.image_key for v in data.values() for s in v).values()) == {3}
    size = sum(p.stat().st_size for p in SAMPLE_DIR.rglob("*") if p.is_file())
    assert size < 1.5e6


def test_perfect_reader_accuracies_by_brute_force(sample):
    reader, data = sample
    rows = {json.loads(line)["id"]: json.loads(line) for line in (SAMPLE_DIR / "manifest.jsonl").open()}
    for split, samples in [*data.items(), ("all", [s for v in data.values() for s in v])]:
        labels = [reader.labels[s.target[0]] for s in samples]
        images = [image_attributes(s.image.path) for s in samples]
        texts = [text_attributes(s.text) for s in samples]
        for s, img, txt in zip(samples, images, texts):  # content agrees with the recorded factors
            a = rows[s.sample_id]["attributes"]
            assert img == (a["color"], a["shape"]), s.image.path
            assert txt == (a["animal"], a["color"] if a["text_names_color"] else None), s.text
        got = {"image": perfect_reader(labels, images), "text": perfect_reader(labels, texts),
               "both": perfect_reader(labels, [(i[0], t[0]) for i, t in zip(images, texts)]),
               "chance": Fraction(max(Counter(labels).values()), len(labels))}
        want = perfect_reader_accuracy(None if split == "all" else split)
        for view in got:
            assert float(got[view]) == pytest.approx(want[view], abs=1e-12), (split, view)
        assert got["both"] > got["text"] > got["image"] > got["chance"]
    assert perfect_reader_accuracy()["text"] == pytest.approx(0.65)


def test_regenerating_reproduces_the_committed_sample(tmp_path):
    out = make_sample(tmp_path / "sample")
    assert (out / "manifest.jsonl").read_bytes() == (SAMPLE_DIR / "manifest.jsonl").read_bytes()
    assert (out / "README.md").read_text() == (SAMPLE_DIR / "README.md").read_text()
    committed = sorted(p.name for p in (SAMPLE_DIR / "images").iterdir())
    assert committed == sorted(p.name for p in (out / "images").iterdir())
    for name in committed[::20]:  # JPEG bytes may differ across PIL versions: compare pixels
        a = np.asarray(Image.open(out / "images" / name), dtype=float)
        b = np.asarray(Image.open(SAMPLE_DIR / "images" / name), dtype=float)
        assert np.abs(a - b).mean() < 2.0, name


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_perfect_reader_ceilings_counted_from_the_rows_match_the_analytic_design(split):
    from data.make_sample import perfect_reader_accuracy
    from molt_cache.datasets.sample import perfect_reader_ceilings

    counted = perfect_reader_ceilings(split)
    analytic = perfect_reader_accuracy(split)
    assert counted == pytest.approx({"image alone": analytic["image"], "text alone": analytic["text"],
                                     "both": analytic["both"]}, abs=1e-12)
