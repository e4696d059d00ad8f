"""The bundled real sample (data/openclipart_sample): what its README promises, and that its
script is deterministic (run on the tiny OpenClipart fixture)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from PIL import Image

from data.make_fixtures import make_openclipart
from data.make_openclipart_sample import make_openclipart_sample
from molt_cache.datasets import OPENCLIPART_SAMPLE_DIR, open_dataset


def test_bundled_sample_counts_sizes_and_images():
    reader = open_dataset("openclipart-sample", None)
    data = {s: list(reader.samples(s)) for s in reader.splits}
    assert reader.labels == json.loads((OPENCLIPART_SAMPLE_DIR / "labels.json").read_text())
    assert len(reader.labels) == 14 and "unsorted" not in reader.labels and "special" not in reader.labels
    assert {s: len(v) for s, v in data.items()} == {"train": 387, "val": 56, "test": 111}
    per_class = Counter(reader.labels[x.target[0]] for v in data.values() for x in v)
    assert per_class["education"] == 34 and all(n == 40 for c, n in per_class.items() if c != "education")
    total = sum(p.stat().st_size for p in OPENCLIPART_SAMPLE_DIR.rglob("*") if p.is_file())
    assert total <= 6 * 2**20
    for x in (x for v in data.values() for x in v):
        with Image.open(x.image.path) as im:
            assert im.format == "PNG" and im.mode == "RGB" and max(im.size) <= 128
        assert x.text.strip()
    ids = [x.sample_id for v in data.values() for x in v]
    assert len(ids) == len(set(ids))


def test_sample_script_is_deterministic(tmp_path):
    root = make_openclipart(tmp_path / "pkg")
    a = make_openclipart_sample(root, tmp_path / "a", min_items=3)
    b = make_openclipart_sample(root, tmp_path / "b", min_items=3)
    assert a["counts"] == {"train": {"animals": 4, "food": 4}, "val": {"animals": 1, "food": 1},
                           "test": {"animals": 1, "food": 1}}
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 12 + 2  # images, manifest, labels
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    img = Image.open(tmp_path / "a" / "images" / "animals__mammals__cat_01.png")
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)  # transparency on white
    rows = [json.loads(line) for line in (tmp_path / "a" / "manifest.jsonl").read_text().splitlines()]
    assert rows[0].keys() == {"id", "image", "text", "label", "split", "source"}
    assert Path(rows[0]["source"]).suffix == ".png"
