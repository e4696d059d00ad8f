"""The two bundled samples, read as manifests.

* `openclipart-sample` (`data/openclipart_sample/`), what `molt demo` runs on: 554 real drawings
  and their artists' words from OpenClipart 0.18 (public domain), 14 classes, made by
  `python -m data.make_openclipart_sample ROOT` from the Debian packages; provenance in its README.
* `sample` (`data/sample/`), synthetic colour × animal pairs for tests, made by
  `python -m data.make_sample`; its design and the accuracies a perfect reader could reach from
  the image alone, the text alone and both are in data/sample/README.md.
"""
from __future__ import annotations

from pathlib import Path

from .base import DatasetError, OnBad
from .manifest import ManifestReader

# The sample ships in the repository (data/ is not an installed package): find it from here.
SAMPLE_DIR = Path(__file__).resolve().parents[2] / "data" / "sample"
OPENCLIPART_SAMPLE_DIR = Path(__file__).resolve().parents[2] / "data" / "openclipart_sample"


def open_sample(root: str | Path | None = None, *, on_bad: OnBad = "error") -> ManifestReader:
    folder = Path(root) if root is not None else SAMPLE_DIR
    if not (folder / "manifest.jsonl").is_file():
        raise DatasetError(f"bundled sample not found at {folder / 'manifest.jsonl'}; run "
                           f"`python -m data.make_sample` from a repository checkout, or pass its folder")
    return ManifestReader(folder / "manifest.jsonl", on_bad=on_bad, name="sample")


def perfect_reader_ceilings(split: str, root: str | Path | None = None) -> dict[str, float]:
    """Accuracy a perfect reader reaches on `split` from the image alone, the text alone and both
    (fractions), counted from the generating factors each manifest row records: the image shows
    the color and shape, the text the animal and, when `text_names_color`, the color. For each
    modality, pairs are grouped by what it shows and the reader answers each group's most
    frequent label. (data/sample/README.md derives the same numbers analytically.)"""
    import json
    from collections import Counter, defaultdict

    folder = Path(root) if root is not None else SAMPLE_DIR
    rows = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("split") == split]
    if not rows:
        raise DatasetError(f"no {split!r} rows in {folder / 'manifest.jsonl'}")

    def ceiling(sees) -> float:
        groups: dict[tuple, Counter] = defaultdict(Counter)
        for r in rows:
            groups[sees(r["attributes"])][r["label"]] += 1
        return sum(max(c.values()) for c in groups.values()) / len(rows)

    return {"image alone": ceiling(lambda a: (a["color"], a["shape"])),
            "text alone": ceiling(lambda a: (a["animal"], a["color"] if a["text_names_color"] else None)),
            "both": ceiling(lambda a: (a["color"], a["shape"], a["animal"]))}


def open_openclipart_sample(root: str | Path | None = None, *, on_bad: OnBad = "error") -> ManifestReader:
    folder = Path(root) if root is not None else OPENCLIPART_SAMPLE_DIR
    if not (folder / "manifest.jsonl").is_file():
        raise DatasetError(f"bundled OpenClipart sample not found at {folder / 'manifest.jsonl'}; run "
                           f"`python -m data.make_openclipart_sample /usr/share/openclipart` from a repository "
                           f"checkout (docs/reproduce.md: getting the packages), or pass its folder")
    return ManifestReader(folder / "manifest.jsonl", on_bad=on_bad, name="openclipart-sample")
