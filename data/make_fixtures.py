"""Tiny, deterministic copies of each official dataset layout, plus deliberately bad variants.

    python -m data.make_fixtures OUT_DIR

`make_fixtures(out_dir)` returns {fixture name: root to pass to open_dataset}. Everything is
built from fixed lists (no randomness), with real 32×32 JPEGs, in well under a second.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

COLORS = [(200, 30, 30), (30, 30, 200), (30, 160, 30), (220, 200, 40), (120, 40, 160), (40, 180, 180)]


def write_jpeg(path: Path, index: int, size: tuple[int, int] = (32, 32)) -> None:
    """A small real JPEG: a colored square on a gray ground; `index` makes it distinct."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    arr = np.full((h, w, 3), 128, np.uint8)
    c = COLORS[index % len(COLORS)]
    off = index % 8
    arr[off: off + h // 2, off: off + w // 2] = c
    Image.fromarray(arr).save(path, format="JPEG", quality=90)


def write_corrupt_jpeg(path: Path) -> None:
    """A JPEG header followed by garbage: exists on disk, fails only when decoded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 4)


def write_jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("".join(line + "\n" for line in lines))


# --- SNLI-VE ---------------------------------------------------------------------------------
SNLI_LABELS = ["entailment", "neutral", "contradiction"]
SNLI_IMAGES = {"train": ["1000092795", "10002456", "1000268201", "1000344755"],
               "dev": ["1000366164", "1000523639"], "test": ["1000919630", "10010052"]}


def _snli_rows(split: str, old: bool) -> list[dict]:
    rows = []
    for i, image_id in enumerate(SNLI_IMAGES[split]):
        for j, label in enumerate(SNLI_LABELS):  # three hypotheses per image, like the release
            row = {"sentence1": f"Premise about image {image_id}.",
                   "sentence2": f"Hypothesis {j} about picture {i} in {split}.",
                   "gold_label": label, "pairID": f"{image_id}.jpg#{i}r1{label[0]}"}
            if old:
                row["Flikr30kID"] = f"{image_id}.jpg"
            else:
                row["Flickr30K_ID"] = image_id
            rows.append(row)
    return rows


def make_snli_ve(root: Path, *, old: bool = False, bad: bool = False) -> Path:
    image_dir = root / "flickr30k_images" if old else root / "Flickr30K" / "flickr30k_images"
    for n, image_id in enumerate(i for ids in SNLI_IMAGES.values() for i in ids):
        write_jpeg(image_dir / f"{image_id}.jpg", n)
    for split in SNLI_IMAGES:
        rows: list = _snli_rows(split, old)
        if bad and split == "train":
            # lines 13..: one of each kind of bad row, then a good row whose image bytes are corrupt
            rows += [
                {"Flickr30K_ID": "1000092795", "sentence2": "No consensus.", "gold_label": "-", "pairID": "bad-gold"},
                {"Flickr30K_ID": "999", "sentence2": "Image is missing.", "gold_label": "neutral", "pairID": "bad-image"},
                {"Flickr30K_ID": "1000092795", "sentence2": "   ", "gold_label": "neutral", "pairID": "bad-text"},
                '{"Flickr30K_ID": "1000092795", "sentence2": "broken',
                {"sentence2": "No image id.", "gold_label": "neutral", "pairID": "bad-field"},
                {"Flickr30K_ID": "corrupt", "sentence2": "Bytes are garbage.", "gold_label": "entailment",
                 "pairID": "corrupt-jpeg"},
            ]
        write_jsonl(root / f"snli_ve_{split}.jsonl", rows)
    if bad:
        write_corrupt_jpeg(image_dir / "corrupt.jpg")
    return root


# --- UPMC-Food101 ----------------------------------------------------------------------------
FOOD_CLASSES = ["pizza", "apple_pie", "sushi"]  # class_idx.json order: deliberately not sorted
FOOD_TRAIN_PER_CLASS = 10
FOOD_TEST_PER_CLASS = 3


def make_food101(root: Path, *, with_split_files: bool = True, bad: bool = False) -> Path:
    n = 0
    names: dict[str, list[str]] = {"train": [], "test": []}
    for csv_split, per_class in (("train", FOOD_TRAIN_PER_CLASS), ("test", FOOD_TEST_PER_CLASS)):
        rows = []
        for cls in FOOD_CLASSES:
            for k in range(per_class):
                idx = k if csv_split == "train" else 100 + k
                file_name = f"{cls}_{idx}.jpg"
                write_jpeg(root / "images" / csv_split / cls / file_name, n)
                n += 1
                rows.append([file_name, f"Best {cls.replace('_', ' ')} recipe number {idx}, easy and quick", cls])
                names[csv_split].append(file_name)
        if bad and csv_split == "train":  # lines 31..34
            write_jpeg(root / "images" / "train" / "pizza" / "pizza_90.jpg", 0)
            rows += [["pizza_90.jpg", "Pizza with an unknown class", "taco"],
                     ["pizza_90.jpg", "  ", "pizza"],
                     ["pizza_91.jpg", "Pizza whose image is missing", "pizza"],
                     ["pizza_92.jpg", "two columns only"]]
        path = root / "texts" / f"{csv_split}_titles.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(rows)
    if with_split_files:
        (root / "class_idx.json").write_text(json.dumps({c: i for i, c in enumerate(FOOD_CLASSES)}))
        train = [x for x in names["train"] if not x.endswith(("_8.jpg", "_9.jpg"))]
        val = [x for x in names["train"] if x.endswith(("_8.jpg", "_9.jpg"))]
        (root / "split.json").write_text(json.dumps({"train": train, "val": val, "test": names["test"]}))
    return root


# --- MM-IMDB ---------------------------------------------------------------------------------
# (id, plots, genres): several plots per movie (the reader takes the longest), some genres
# outside the benchmark's 23 ("Reality-TV", "News") that must be ignored and counted.
MMIMDB_MOVIES = [
    ("0000001", ["A detective hunts a killer.", "In a rainy city, a tired detective hunts a careful killer."],
     ["Crime", "Thriller", "Drama"]),
    ("0000002", ["Two friends start a band and find love."], ["Comedy", "Music", "Romance"]),
    ("0000003", ["Astronauts find a signal.", "A crew of astronauts finds a signal on a frozen moon.", "Space."],
     ["Sci-Fi", "Adventure"]),
    ("0000004", ["A family spends a summer on a farm."], ["Family", "Reality-TV"]),
    ("0000005", ["Cowboys defend a small town."], ["Western", "Action"]),
    ("0000006", ["A ghost haunts an old house by the sea."], ["Horror", "Mystery", "News"]),
    ("0000007", ["The life of a famous painter."], ["Biography", "History", "Drama"]),
    ("0000008", ["Soldiers cross a river at night."], ["War", "Action", "Drama"]),
    ("0000009", ["A short animated story about a fox."], ["Animation", "Short", "Family"]),
    ("0000010", ["A boxer trains for one last fight."], ["Sport", "Drama"]),
    ("0000011", ["A singer and a dancer put on a show."], ["Musical", "Romance"]),
    ("0000012", ["A reporter investigates a crooked mayor."], ["Film-Noir", "Crime", "Mystery"]),
]
MMIMDB_SPLIT = {"train": [m[0] for m in MMIMDB_MOVIES[:8]], "dev": [m[0] for m in MMIMDB_MOVIES[8:10]],
                "test": [m[0] for m in MMIMDB_MOVIES[10:]]}


def make_mmimdb(root: Path, *, bad: bool = False) -> Path:
    base = root / "mmimdb"
    split = {k: list(v) for k, v in MMIMDB_SPLIT.items()}
    for n, (movie_id, plots, genres) in enumerate(MMIMDB_MOVIES):
        (base / "dataset").mkdir(parents=True, exist_ok=True)
        (base / "dataset" / f"{movie_id}.json").write_text(json.dumps({"plot": plots, "genres": genres, "imdb_id": movie_id}))
        write_jpeg(base / "dataset" / f"{movie_id}.jpeg", n)
    if bad:  # appended to train, in this order
        extra = {"1000001": ({"plot": ["No image for this one."], "genres": ["Drama"]}, False),
                 "1000002": ({"plot": ["Only genres outside the 23."], "genres": ["Reality-TV"]}, True),
                 "1000003": ({"plot": ["  "], "genres": ["Drama"]}, True),
                 "1000005": ({"plot": ["No genres field."]}, True)}
        for movie_id, (meta, has_image) in extra.items():
            (base / "dataset" / f"{movie_id}.json").write_text(json.dumps(meta))
            if has_image:
                write_jpeg(base / "dataset" / f"{movie_id}.jpeg", 1)
        (base / "dataset" / "1000004.json").write_text('{"plot": ["broken')  # malformed JSON
        write_jpeg(base / "dataset" / "1000004.jpeg", 2)
        split["train"] += ["1000001", "1000002", "1000003", "1000004", "1000005", "1000006"]  # 1000006: no file
    (base / "split.json").write_text(json.dumps(split))
    return base


def _hdf5_plot_words(plot: str) -> list[str]:
    """The HDF5 release's plots are lowercased and word-tokenized."""
    import re

    return re.findall(r"[a-z0-9\-]+|[.,!?]", plot.lower())


def fuel_split_table(ranges: dict[str, tuple[int, int]], sources: list[str]):
    """The `split` file attribute Fuel's `H5PYDataset.create_split_array` writes (gmu-mmimdb's
    make_dataset.py stores its splits so): one row per (split, source)."""
    import h5py

    dtype = np.dtype([("split", "S5"), ("source", "S12"), ("start", np.int64), ("stop", np.int64),
                      ("indices", h5py.special_dtype(ref=h5py.Reference)), ("available", np.bool_),
                      ("comment", "S1")])
    table = np.empty(len(ranges) * len(sources), dtype=dtype)
    for i, (split, source) in enumerate((sp, so) for sp in ranges for so in sorted(sources)):
        table[i] = (split.encode(), source.encode(), ranges[split][0], ranges[split][1], h5py.Reference(),
                    True, b".")
    return table


def make_mmimdb_hdf5(root: Path, *, padded: bool = False, images_dtype: str = "int32",
                     target_names: str = "json", split_attrs: str = "fuel", ids: str = "S7") -> Path:
    """The HDF5 release as gmu-mmimdb's make_dataset.py writes it (defaults): int32 images, int32
    genres whose attrs['target_names'] is a JSON string, vlen int32 sequences, S7 ids, Fuel's
    split table, and a pickled metadata.npy dict with '_UNK_' = 0 and a float32 'lookup'.

    Variants: `padded` (N×T sequences, 0-padded), `images_dtype` in {"int32", "uint8", "float01",
    "float255"}, `target_names` in {"json", "json-bytes", "str", "bytes"}, `split_attrs` in
    {"fuel", "ranges"} (attrs train/dev/test = (start, end)), `ids` in {"S7", "str"}.
    """
    import h5py

    from molt_cache.datasets.mmimdb import GENRES

    root.mkdir(parents=True, exist_ok=True)
    plots = [_hdf5_plot_words(max(p, key=len)) for _, p, _ in MMIMDB_MOVIES]
    vocab = ["_UNK_"] + sorted({w for words in plots for w in words})  # the release: 0 = _UNK_
    word_to_ix = {w: i for i, w in enumerate(vocab)}
    ix_to_word = dict(enumerate(vocab))
    lookup = np.linspace(-1, 1, len(vocab) * 4, dtype=np.float32).reshape(len(vocab), 4)
    np.save(root / "metadata.npy", {"ix_to_word": ix_to_word, "word_to_ix": word_to_ix,
                                    "vocab_size": len(vocab), "lookup": lookup}, allow_pickle=True)
    n = len(MMIMDB_MOVIES)
    images = np.zeros((n, 3, 256, 160), np.int32)
    for k in range(n):
        images[k] = np.asarray(COLORS[k % len(COLORS)], np.int32)[:, None, None]
        images[k, :, k * 8: k * 8 + 40, 20:60] = 255 - k * 10
    stored_images = {"int32": images, "uint8": images.astype(np.uint8),
                     "float01": images.astype(np.float32) / 255, "float255": images.astype(np.float32)}[images_dtype]
    genres = np.zeros((n, len(GENRES)), np.int32)
    for k, (_, _, gs) in enumerate(MMIMDB_MOVIES):
        for g in gs:
            if g in GENRES:
                genres[k, GENRES.index(g)] = 1
    seqs = [np.array([word_to_ix[w] for w in words], np.int32) for words in plots]
    ranges = {"train": (0, 8), "dev": (8, 10), "test": (10, n)}
    with h5py.File(root / "multimodal_imdb.hdf5", "w") as f:
        f.create_dataset("images", data=stored_images)
        g = f.create_dataset("genres", data=genres)
        g.attrs["target_names"] = {
            "json": json.dumps(GENRES), "json-bytes": np.bytes_(json.dumps(GENRES).encode()),
            "str": np.array(GENRES, dtype=h5py.string_dtype()),
            "bytes": np.array([x.encode() for x in GENRES], dtype="S12")}[target_names]
        if padded:
            width = max(len(s) for s in seqs) + 3
            f.create_dataset("sequences", data=np.stack([np.pad(s, (0, width - len(s))) for s in seqs]))
        else:
            d = f.create_dataset("sequences", (n,), dtype=h5py.vlen_dtype(np.int32))
            for k, s in enumerate(seqs):
                d[k] = s
        id_dtype = "S7" if ids == "S7" else h5py.string_dtype()
        f.create_dataset("imdb_ids", data=np.array([m[0] for m in MMIMDB_MOVIES], dtype=id_dtype))
        if split_attrs == "fuel":
            f.attrs["split"] = fuel_split_table(ranges, ["genres", "images", "imdb_ids", "sequences"])
        else:
            for key, value in ranges.items():
                f.attrs[key] = value
    return root


# --- generic manifest --------------------------------------------------------------------------
MANIFEST_LABELS = ["bird", "boat", "car"]


def _manifest_rows() -> list[dict]:
    """18 pairs over 9 images (two pairs per image), splits by image."""
    rows = []
    for k in range(18):
        image_no = k // 2
        split = "train" if image_no < 6 else ("val" if image_no < 8 else "test")
        rows.append({"id": f"m{k:02d}", "image": f"images/img_{image_no}.jpg",
                     "text": f"caption {k} of image {image_no}", "label": MANIFEST_LABELS[k % 3], "split": split})
    return rows


def make_manifest(root: Path, *, fmt: str = "jsonl", multi: bool = False, with_split: bool = True,
                  labels_json: bool = False, bad: bool = False) -> Path:
    rows = _manifest_rows()
    for image_no in range(9):
        write_jpeg(root / "images" / f"img_{image_no}.jpg", image_no)
    if multi:
        for k, r in enumerate(rows):
            r["labels"] = [MANIFEST_LABELS[k % 3]] + ([MANIFEST_LABELS[(k + 1) % 3]] if k % 2 else [])
            del r["label"]
    if not with_split:
        for r in rows:
            del r["split"]
    bad_rows: list = []
    if bad:  # lines 19..25
        write_corrupt_jpeg(root / "images" / "corrupt.jpg")
        bad_rows = [{"id": "b-missing-image", "image": "images/nope.jpg", "text": "x", "label": "car", "split": "train"},
                    {"id": "b-empty-text", "image": "images/img_0.jpg", "text": " \t", "label": "car", "split": "train"},
                    {"id": "b-unknown-label", "image": "images/img_0.jpg", "text": "x", "label": "tank", "split": "train"},
                    '{"id": "b-malformed", "image": ',
                    {"id": "b-missing-field", "image": "images/img_0.jpg", "label": "car", "split": "train"},
                    {"id": "b-no-label", "image": "images/img_0.jpg", "text": "x", "split": "train"},
                    {"id": "corrupt", "image": "images/corrupt.jpg", "text": "bytes are garbage", "label": "car",
                     "split": "train"}]
    root.mkdir(parents=True, exist_ok=True)
    if labels_json or bad:
        (root / "labels.json").write_text(json.dumps(MANIFEST_LABELS))
    if fmt == "jsonl":
        write_jsonl(root / "manifest.jsonl", rows + bad_rows)
        return root / "manifest.jsonl"
    fields = ["id", "image", "text", "labels" if multi else "label"] + (["split"] if with_split else [])
    with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for r in rows:
            w.writerow(["|".join(r[c]) if c == "labels" else r[c] for c in fields])
        if bad:
            w.writerow(["b-short", "images/img_0.jpg"])  # malformed: too few columns
    return root / "manifest.csv"


# --- OpenClipart (Debian openclipart-png + openclipart-svg layout) ---------------------------
def write_png(path: Path, index: int, mode: str, size: tuple[int, int] = (24, 16)) -> None:
    """A small real PNG in `mode` (RGBA, LA, P with a transparent index, RGB, L): a coloured
    square on a transparent (or grey) ground, so decoders must handle the drawing's alpha."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    arr = np.zeros((h, w, 4), np.uint8)  # transparent black: dropping alpha would show black
    c = COLORS[index % len(COLORS)]
    arr[2: h - 2, 2 + index % 4: w // 2 + index % 4] = (*c, 255)
    img = Image.fromarray(arr, "RGBA")
    if mode == "P":
        img = img.convert("RGB").quantize(8)
        img.info["transparency"] = 0 if img.getpixel((0, 0)) == 0 else img.getpixel((0, 0))
        img.save(path, format="PNG", transparency=img.info["transparency"])
        return
    (img if mode == "RGBA" else img.convert(mode)).save(path, format="PNG")


def svg_with_metadata(title: str, description: str, keywords: list[str], *, publisher: str = "Open Clip Art Library",
                      doctype: str = "") -> str:
    """An SVG whose RDF metadata is laid out as in the package (cc:Work with dc:title,
    dc:description, dc:subject/rdf:Bag/rdf:li; the publisher's cc:Agent has a dc:title too)."""
    lis = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
    return (f'<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n{doctype}'
            '<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/" '
            'xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" '
            'width="24" height="16"><metadata><rdf:RDF><cc:Work rdf:about="">'
            f"<dc:title>{title}</dc:title><dc:description>{description}</dc:description>"
            f"<dc:subject><rdf:Bag>{lis}</rdf:Bag></dc:subject>"
            f"<dc:publisher><cc:Agent><dc:title>{publisher}</dc:title></cc:Agent></dc:publisher>"
            '<cc:license rdf:resource="http://web.resource.org/cc/PublicDomain"/></cc:Work></rdf:RDF></metadata>'
            '<rect x="2" y="2" width="10" height="12" fill="#c81e1e"/></svg>\n')


# (relative path without extension, PNG mode, title, description, keywords); label = first folder.
OPENCLIPART_ITEMS = [
    ("animals/mammals/cat_01", "RGBA", "Cat", "A sleeping cat", ["cat", "mammal", "Animals", "pet"]),
    ("animals/birds/parrot_01", "P", "Parrot", "", ["parrot", "hash", "", "green"]),
    ("animals/dog_01", "LA", "Clipart by Nicu Buculei - dog1", "drawn by me http://example.org/dog", ["dog"]),
    ("animals/fish_01", "RGB", "Fish", "", ["fish", "water", "animal"]),
    ("animals/horse_01", "L", "Horse", "A brown horse", []),
    ("animals/cow_01", "RGBA", "Cow", "", ["cow", "farm"]),
    ("food/fruit/pear_01", "RGBA", "Pear", "ripe pear", ["pear", "fruits", "food"]),
    ("food/apple_01", "P", "Apple", "", ["apple", "red"]),
    ("food/bread_01", "LA", "Bread", "a loaf", ["bread", "bakery"]),
    ("food/cheese_01", "RGB", "Cheese", "", ["cheese", "foodstuff"]),
    ("food/soup_01", "L", "Soup", "hot soup", ["soup"]),
    ("food/cake_01", "RGBA", "Birthday cake", "", ["cake", "party"]),
    ("special/a_01", "RGBA", "Thing A", "", ["a"]),
    ("special/b_01", "RGBA", "Thing B", "", ["b"]),
    ("special/c_01", "RGBA", "Thing C", "", ["c"]),
    ("logos/x_01", "RGBA", "Logo X", "", ["x"]),
]
BILLION_LAUGHS = ('<!DOCTYPE svg [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
                  '<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">'
                  '<!ENTITY e "&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;"><!ENTITY f "&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;">'
                  '<!ENTITY g "&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;"><!ENTITY h "&g;&g;&g;&g;&g;&g;&g;&g;&g;&g;">]>\n')


def make_openclipart(root: Path, *, bad: bool = False) -> Path:
    """The package's layout: png/<category>/[<sub>/]<name>.png beside svg/…/<name>.svg.

    Classes with ≥ 3 items (pass min_items=3): animals, food (6 each); special (3, excluded by
    default) and logos (1) are left out. food/fruit/cat_link.png is a symbolic link to a drawing
    filed under animals, as the package has. `bad` adds: a PNG without SVG, a malformed SVG, an
    item whose text is all leak / boilerplate, and an SVG with an entity-expansion bomb.
    """
    for k, (rel, mode, title, desc, keywords) in enumerate(OPENCLIPART_ITEMS):
        write_png(root / "png" / f"{rel}.png", k, mode)
        svg = root / "svg" / f"{rel}.svg"
        svg.parent.mkdir(parents=True, exist_ok=True)
        svg.write_text(svg_with_metadata(title, desc, keywords), encoding="utf-8")
    link = root / "png" / "food" / "fruit" / "cat_link.png"
    if not link.is_symlink():
        link.symlink_to(Path("..") / ".." / "animals" / "mammals" / "cat_01.png")
    if bad:
        write_png(root / "png" / "animals" / "ghost_01.png", 7, "RGBA")  # no SVG beside it
        write_png(root / "png" / "food" / "broken_01.png", 8, "RGBA")
        (root / "svg" / "food" / "broken_01.svg").write_text("<svg><metadata><rdf:RDF>", encoding="utf-8")
        write_png(root / "png" / "food" / "leaky_01.png", 9, "RGBA")
        (root / "svg" / "food" / "leaky_01.svg").write_text(
            svg_with_metadata("Open Clip Art Library", "", ["food", "hash", "foods"]), encoding="utf-8")
        write_png(root / "png" / "food" / "laughs_01.png", 10, "RGBA")
        (root / "svg" / "food" / "laughs_01.svg").write_text(
            svg_with_metadata("&h;", "", ["bomb"], doctype=BILLION_LAUGHS), encoding="utf-8")
    return root


def make_fixtures(out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    return {
        "snli-ve": make_snli_ve(out / "snli_ve"),
        "snli-ve-old": make_snli_ve(out / "snli_ve_old", old=True),
        "snli-ve-bad": make_snli_ve(out / "snli_ve_bad", bad=True),
        "food101": make_food101(out / "food101"),
        "food101-nosplit": make_food101(out / "food101_nosplit", with_split_files=False),
        "food101-bad": make_food101(out / "food101_bad", with_split_files=False, bad=True),
        "mmimdb": make_mmimdb(out / "mmimdb_release"),
        "mmimdb-bad": make_mmimdb(out / "mmimdb_bad", bad=True),
        "mmimdb-hdf5": make_mmimdb_hdf5(out / "mmimdb_hdf5"),
        "mmimdb-hdf5-padded": make_mmimdb_hdf5(out / "mmimdb_hdf5_padded", padded=True, images_dtype="uint8",
                                               target_names="str", split_attrs="ranges", ids="str"),
        "manifest-jsonl": make_manifest(out / "manifest_jsonl"),
        "manifest-csv-multi": make_manifest(out / "manifest_csv", fmt="csv", multi=True, with_split=False),
        "manifest-jsonl-multi": make_manifest(out / "manifest_jsonl_multi", multi=True, labels_json=True),
        "manifest-bad": make_manifest(out / "manifest_bad", bad=True),
        "manifest-csv-bad": make_manifest(out / "manifest_csv_bad", fmt="csv", bad=True),
        "openclipart": make_openclipart(out / "openclipart"),
        "openclipart-bad": make_openclipart(out / "openclipart_bad", bad=True),
    }


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m data.make_fixtures OUT_DIR")
    for name, path in make_fixtures(sys.argv[1]).items():
        print(f"{name:22s} {path}")
