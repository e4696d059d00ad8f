"""`molt datasets check`: stream a release once, count what stage one would see, report bad rows."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from molt_cache.datasets import open_dataset


@dataclass
class SplitCounts:
    pairs: int = 0
    texts: int = 0
    images: int = 0
    labels: dict[str, int] = field(default_factory=dict)
    text_words: list[int] = field(default_factory=list)  # words (whitespace-split) per pair's text


def check_dataset(name: str, root: str | None, *, on_bad: str = "error", report_path: str | None = None,
                  decode_images: bool = False, **options) -> tuple[dict[str, SplitCounts], object]:
    """Counts per split (pairs, unique texts, unique images, label frequencies). With
    `decode_images`, every unique image is decoded too (slow; finds corrupt JPEGs up front)."""
    reader = open_dataset(name, root, on_bad=on_bad, **options)
    counts: dict[str, SplitCounts] = {}
    for split in reader.splits:
        c = SplitCounts()
        texts, images = set(), {}
        for s in reader.samples(split):
            c.pairs += 1
            texts.add(s.text)
            c.text_words.append(len(s.text.split()))
            images.setdefault(s.image_key, (s.image, s.sample_id))
            for t in s.target:
                c.labels[reader.labels[t]] = c.labels.get(reader.labels[t], 0) + 1
        if decode_images:
            from molt_cache.datasets.base import DatasetError

            for key, (ref, sample_id) in images.items():
                try:
                    ref.open()
                except DatasetError as e:
                    reader.report.bad(f"{sample_id} (image {key})", str(e))
        c.texts, c.images = len(texts), len(images)
        counts[split] = c
    if report_path and reader.report.rows:
        reader.report.write(Path(report_path))
    return counts, reader


def text_length_quantiles(counts: dict[str, SplitCounts], qs=(0.05, 0.25, 0.5, 0.75, 0.95)) -> dict[float, float]:
    """Quantiles of words per text over every split's pairs (numpy's default linear interpolation)."""
    import numpy as np

    words = [w for c in counts.values() for w in c.text_words]
    if not words:
        return {}
    return {q: float(v) for q, v in zip(qs, np.quantile(np.asarray(words, dtype=np.float64), qs))}


def parse_options(items: list[str] | None) -> dict:
    """`--option KEY=VALUE` pairs → reader options; VALUE as int, then float, else the string."""
    out: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option expects KEY=VALUE, got {item!r}")
        for cast in (int, float):
            try:
                out[key.strip().replace("-", "_")] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key.strip().replace("-", "_")] = value
    return out
