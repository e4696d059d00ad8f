"""The bundled real sample (`data/openclipart_sample/`): a stratified subset of OpenClipart 0.18.

    python -m data.make_openclipart_sample ROOT [--out data/openclipart_sample]

ROOT is /usr/share/openclipart (Debian packages openclipart-png + openclipart-svg installed) or the
folder they were `dpkg-deb -x`-ed into. The subset is read through the OpenClipart reader (its
classes, leak / boilerplate removal and seeded 70/10/20 split, docs/datasets.md), then per class
the first `PER_SPLIT[split]` items of each split (all of them where a class has fewer) by hash of (seed, path) are kept, so the sample's
splits are subsets of the full dataset's. Each image goes through the project's decoder (alpha
onto white) and is downscaled to at most `MAX_SIDE` px (Lanczos), saved as an optimized PNG.
Deterministic: the same packages give the same bytes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from PIL import Image

from molt_cache.datasets.images import decode_image
from molt_cache.datasets.openclipart import OpenClipartReader

PER_SPLIT = {"train": 28, "val": 4, "test": 8}  # 40 per class, the split's 70/10/20
MAX_SIDE = 128
SEED = 0
OUT = Path(__file__).resolve().parent / "openclipart_sample"


def _rank(key: str) -> str:
    return hashlib.sha256(f"{SEED}\0{key}".encode()).hexdigest()


def make_openclipart_sample(root: str | Path, out: str | Path = OUT, **reader_options) -> dict:
    """Write manifest.jsonl, labels.json and images/ under `out`; return counts per split and class.
    `reader_options` go to the OpenClipart reader (tests pass min_items for a tiny fixture)."""
    out = Path(out)
    reader = OpenClipartReader(root, on_bad="skip", **reader_options)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows, counts = [], {}
    for split in reader.splits:
        by_class: dict[int, list] = {}
        for s in reader.samples(split):
            by_class.setdefault(s.target[0], []).append(s)
        for c in sorted(by_class):
            # a class with fewer items (education: 23 train) gives all it has
            chosen = sorted(by_class[c], key=lambda s: _rank(s.sample_id))[: PER_SPLIT[split]]
            for s in sorted(chosen, key=lambda s: s.sample_id):
                name = s.sample_id.replace("/", "__") + ".png"
                img = decode_image(s.image.path, source=s.image.path)
                img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
                img.save(out / "images" / name, format="PNG", optimize=True)
                rows.append({"id": s.sample_id, "image": f"images/{name}", "text": s.text,
                             "label": reader.labels[c], "split": split, "source": f"png/{s.sample_id}.png"})
                counts.setdefault(split, {}).setdefault(reader.labels[c], 0)
                counts[split][reader.labels[c]] += 1
    (out / "labels.json").write_text(json.dumps(reader.labels) + "\n")
    with open(out / "manifest.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return {"counts": counts, "notes": reader.notes, "bad_rows": len(reader.report.rows)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    result = make_openclipart_sample(args.root, args.out)
    print(json.dumps(result, indent=1, ensure_ascii=False))
