"""OpenClipart 0.18 (public domain) as Debian packages it: drawings by real artists, their own words, a folder label.

    root/png/<category>/[<subfolder>/...]<name>.png    the drawing (RGBA / P / LA / RGB / L PNG)
    root/svg/<category>/[<subfolder>/...]<name>.svg    the same drawing as SVG, whose RDF metadata
                                                       holds the artist's text (cc:Work → dc:title,
                                                       dc:description, dc:subject/rdf:Bag/rdf:li)

`root` is /usr/share/openclipart when `openclipart-png` and `openclipart-svg` are installed, or the
folder they were `dpkg-deb -x`-ed into (its usr/share/openclipart is found). Label: the top-level
folder. docs/datasets.md has the rules and the counts they give on the 1:0.18+dfsg-19 packages.

Rules, each counted in `removed` and announced in `notes`:
* Symbolic links (the packages file 1,221 drawings under a second folder by linking to the real
  PNG) are not items: every drawing is read once, under the folder of its real file. A drawing
  listed twice would sit in two splits or carry two labels.
* Text = title, description and keywords (in that order, ". "-joined, keywords ", "-joined), minus
  every keyword that names or contains the item's category or one of its subfolders (the label
  written into the text: `leak_keywords`), minus packaging boilerplate: placeholder keywords
  (`BOILERPLATE_KEYWORDS`), titles / descriptions that are the library's name or a collection
  stamp (`BOILERPLATE_FIELDS`), and URLs and e-mail addresses inside them.
* Classes: top-level folders with at least `min_items` drawings, minus `exclude` (by default
  `unsorted` and `special`, which name no subject); drawings of other folders are left out, not bad.
* Split: seeded (by hash of seed and path, splits.carve_groups) and stratified by class, 70/10/20.
* Bad rows (under --on-bad): a PNG without its SVG, an SVG that is not well-formed XML or has no
  cc:Work metadata, an item with no text left, a PNG above `max_pixels` (read from its header; the
  default is Pillow's own limit, 89.5 Mpx: 15 drawings of the package are 105-623 Mpx, which would
  take 0.4-2.5 GB and seconds each to decode before being resized to a 224-px encoder input).

The SVG is parsed with the standard library's expat (≥ 2.4.1 refuses entity-expansion bombs;
external entities are never fetched); only the metadata is kept, nothing in it is executed.
"""
from __future__ import annotations

import os
import re
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Iterator

from PIL import Image

from .base import DatasetError, DatasetReader, ImageRef, OnBad, Sample
from .splits import carve_groups

DC = "{http://purl.org/dc/elements/1.1/}"
SPLIT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}
DEFAULT_EXCLUDE = ("unsorted", "special")

# Keywords the packaging put on drawings, not the artists: "hash" is a placeholder on ~1,800
# drawings; "unsorted" / "special" name the library's own catch-all folders.
BOILERPLATE_KEYWORDS = frozenset({"hash", "unsorted", "special"})
# Whole titles / descriptions that are the library's name or its import stamp, not the drawing
# ("Open Clip Art Library"; "Clipart by Nicu Buculei - arrow08_4", the same source-file name on up
# to 48 different drawings). An artist's own collection title ("Part of the Flat Icon Collection
# (…2004)", "Lemon SVG theme") is their text and stays, though it says more about the set than the drawing.
BOILERPLATE_FIELDS = (re.compile(r"open ?clip ?art( library| project)?\.?", re.I),
                      re.compile(r"clip ?art by .*", re.I),
                      re.compile(r"eps converted from", re.I))  # what an AIGA URL leaves behind
URL_OR_EMAIL = re.compile(r"(https?://|www\.)\S+|\S+@\S+\.\w+", re.I)


def _norm(s: str) -> str:
    return re.sub(r"[\s_\-]+", " ", s.lower()).strip()


def _folder_forms(folders: list[str]) -> list[str]:
    """The ways a keyword can name a folder: the whole name, and each word of ≥ 4 letters, each
    also without a plural "s" ("signs_and_symbols" → "signs and symbols", "sign", "symbol", …)."""
    forms: set[str] = set()
    for folder in folders:
        whole = _norm(folder)
        words = [w for w in whole.split() if len(w) >= 4]
        for f in [whole, *words]:
            forms.add(f)
            if f.endswith("s") and len(f) >= 4:
                forms.add(f[:-1])
    return sorted(f for f in forms if f)


def leaks(keyword: str, folders: list[str]) -> bool:
    """True if `keyword` names or contains one of `folders` (a form starting at a word boundary:
    "icons" leaks through "lemon_theme_icon", "animals" through "animal")."""
    k = _norm(keyword)
    return any(re.search(r"(?<![a-z0-9])" + re.escape(f), k) for f in _folder_forms(folders))


def clean_field(text: str) -> tuple[str, bool]:
    """A title or description without URLs / e-mail addresses, "" if it is boilerplate.
    Returns (text, whether anything was removed)."""
    raw = " ".join((text or "").split())
    out = " ".join(URL_OR_EMAIL.sub(" ", raw).split()).strip(" -:,;")
    if any(p.fullmatch(out) for p in BOILERPLATE_FIELDS):
        out = ""
    return out, out != raw


def read_svg_metadata(path: Path) -> tuple[str, str, list[str]]:
    """(title, description, keywords) of the SVG's cc:Work; raises ValueError if malformed or absent.

    Parsing stops at the end of the metadata block, so the drawing itself is never read in full.
    """
    title = description = None
    keywords: list[str] = []
    stack: list[str] = []
    found = False
    with open(path, "rb") as f:
        for event, el in ET.iterparse(f, events=("start", "end")):
            local = el.tag.rsplit("}", 1)[-1] if isinstance(el.tag, str) else ""
            if event == "start":
                stack.append(local)
                continue
            stack.pop()
            parent = stack[-1] if stack else ""
            if local == "Work":
                found = True
                break
            if parent == "Work" and el.tag == DC + "title":
                title = el.text or ""
            elif parent == "Work" and el.tag == DC + "description":
                description = el.text or ""
            elif local == "li" and "subject" in stack and "Work" in stack:
                keywords.append(el.text or "")
    if not found:
        raise ValueError("no RDF metadata (cc:Work) in the SVG")
    return title or "", description or "", keywords


class OpenClipartReader(DatasetReader):
    name = "openclipart"
    task = "single-label"
    splits = ("train", "val", "test")

    def __init__(self, root: str | Path, *, on_bad: OnBad = "error", seed: int = 0, min_items: int = 40,
                 exclude: tuple[str, ...] | list[str] | str = DEFAULT_EXCLUDE, max_pixels: int | None = None):
        super().__init__(root, on_bad=on_bad)
        if not (self.root / "png").is_dir() and (self.root / "usr/share/openclipart/png").is_dir():
            self.root = self.root / "usr/share/openclipart"
        for sub in ("png", "svg"):
            if not (self.root / sub).is_dir():
                raise DatasetError(f"OpenClipart: {self.root / sub} not found (expected png/ and svg/ under the root, "
                                   f"e.g. /usr/share/openclipart from the Debian packages openclipart-png, openclipart-svg)")
        if isinstance(exclude, str):
            exclude = tuple(x for x in exclude.split(",") if x)
        self.seed, self.min_items, self.exclude = seed, int(min_items), tuple(exclude)
        self.max_pixels = Image.MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
        self.notes: list[str] = []
        self.removed: Counter[str] = Counter()

        items: dict[str, list[str]] = {}  # category -> relative paths without ".png", sorted
        links = 0
        for dirpath, dirnames, filenames in os.walk(self.root / "png"):
            dirnames.sort()
            for f in sorted(filenames):
                if not f.endswith(".png"):
                    continue
                path = Path(dirpath) / f
                rel = path.relative_to(self.root / "png").with_suffix("").as_posix()
                if "/" not in rel:
                    continue  # a file beside the category folders has no label
                if path.is_symlink():
                    links += 1
                    continue
                items.setdefault(rel.split("/", 1)[0], []).append(rel)
        self.folder_counts = {c: len(v) for c, v in sorted(items.items())}
        self.labels = sorted(c for c, n in self.folder_counts.items() if n >= self.min_items and c not in self.exclude)
        if not self.labels:
            raise DatasetError(f"OpenClipart: no category folder under {self.root / 'png'} has ≥ {self.min_items} "
                               f"drawings outside {list(self.exclude)} (folders: {self.folder_counts})")
        left_out = {c: n for c, n in self.folder_counts.items() if c not in self.labels}
        self._split_of: dict[str, list[str]] = {s: [] for s in self.splits}
        for c in self.labels:
            for rel, split in carve_groups(items[c], SPLIT_FRACTIONS, seed).items():
                self._split_of[split].append(rel)
        for s in self.splits:
            self._split_of[s].sort()
        self.notes.append(
            f"OpenClipart: {sum(self.folder_counts.values())} drawings in {len(self.folder_counts)} folders "
            f"({links} symbolic links to drawings filed elsewhere not counted); {len(self.labels)} classes with "
            f"≥ {self.min_items} drawings, excluding {list(self.exclude)}; left out: {left_out}; split "
            f"train/val/test {len(self._split_of['train'])}/{len(self._split_of['val'])}/{len(self._split_of['test'])} "
            f"(70/10/20 per class, seed {seed})")

    def text_for(self, rel: str, title: str, description: str, keywords: list[str]) -> str:
        """The item's text after leak and boilerplate removal (counts go to `self.removed`)."""
        folders = rel.split("/")[:-1]
        fields = []
        for kind, value in (("title", title), ("description", description)):
            cleaned, changed = clean_field(value)
            if changed and value.strip():
                self.removed[f"boilerplate {kind}"] += 1
            if cleaned:
                fields.append(cleaned)
        kept, seen, leaked = [], set(), 0
        for k in keywords:
            k = " ".join(k.split())
            if not k:
                continue
            if _norm(k) in BOILERPLATE_KEYWORDS:
                self.removed["boilerplate keywords"] += 1
            elif leaks(k, folders):
                leaked += 1
            elif _norm(k) not in seen:
                seen.add(_norm(k))
                kept.append(k)
        self.removed["leak keywords"] += leaked
        self.removed["items with a leak keyword"] += leaked > 0
        if kept:
            fields.append(", ".join(kept))
        return ". ".join(fields)

    def samples(self, split: str) -> Iterator[Sample]:
        if split not in self.splits:
            raise ValueError(f"unknown OpenClipart split {split!r}; valid: {list(self.splits)}")
        label_index = {c: i for i, c in enumerate(self.labels)}
        before = Counter(self.removed)
        for rel in self._split_of[split]:
            png = self.root / "png" / f"{rel}.png"
            svg = self.root / "svg" / f"{rel}.svg"
            source = f"{svg}[{rel}]"
            if not svg.is_file():
                self.report.bad(source, f"SVG {svg} (the drawing's metadata) not found")
                continue
            try:
                title, description, keywords = read_svg_metadata(svg)
            except (ET.ParseError, ValueError, UnicodeDecodeError) as e:
                self.report.bad(source, f"cannot read the SVG metadata: {type(e).__name__}: {e}")
                continue
            text = self.text_for(rel, title, description, keywords)
            if not text:
                self.report.bad(source, "no text left after removing leaking keywords and boilerplate")
                continue
            try:
                with warnings.catch_warnings():  # the size is checked against max_pixels just below
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    with Image.open(png) as im:  # header only: size without decoding
                        w, h = im.size
            except Image.DecompressionBombError:  # above 2× Pillow's limit: still only the header was read
                w, h = self._header_size(png)
            except Exception as e:  # noqa: BLE001 - any unreadable PNG header is a named bad row
                self.report.bad(f"{png}[{rel}]", f"cannot read the PNG header: {type(e).__name__}: {e}")
                continue
            if w * h > self.max_pixels:
                self.report.bad(f"{png}[{rel}]", f"PNG is {w}×{h} = {w * h / 1e6:.0f} Mpx, above max_pixels = "
                                                 f"{self.max_pixels / 1e6:.1f} Mpx (see docs/datasets.md, OpenClipart)")
                continue
            cls = rel.split("/", 1)[0]
            yield Sample(sample_id=rel, split=split, image_key=rel, image=ImageRef("file", str(png)), text=text,
                         target=(label_index[cls],), source=source)
        delta = {k: v - before.get(k, 0) for k, v in self.removed.items() if v - before.get(k, 0)}
        self.notes.append(f"OpenClipart {split}: removed {delta or 'nothing'}")

    @staticmethod
    def _header_size(png: Path) -> tuple[int, int]:
        """Width and height from the PNG's IHDR chunk (bytes 16-24), for files Pillow refuses to open."""
        with open(png, "rb") as f:
            head = f.read(24)
        if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
            raise DatasetError(f"{png}: not a PNG")
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
