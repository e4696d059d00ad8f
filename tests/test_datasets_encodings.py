"""Dataset files as people save them: BOMs, bytes that are not UTF-8, duplicate ids, NFC vs NFD names."""
from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from data.make_fixtures import make_food101, make_manifest, make_mmimdb, make_snli_ve, write_jpeg
from molt_cache.datasets import DatasetError, open_dataset
from molt_cache.datasets.check import check_dataset

BOM = b"\xef\xbb\xbf"


def add_bom(path: Path) -> None:
    path.write_bytes(BOM + path.read_bytes())


def break_line(path: Path, lineno: int, needle: bytes) -> None:
    """Put a Latin-1 'à' (0xe0, not UTF-8 on its own) into line `lineno`, before `needle`."""
    lines = path.read_bytes().split(b"\n")
    assert needle in lines[lineno - 1]
    lines[lineno - 1] = lines[lineno - 1].replace(needle, b"\xe0" + needle, 1)
    path.write_bytes(b"\n".join(lines))


# --- BOM -------------------------------------------------------------------------------------
def test_food101_csv_with_excel_bom(tmp_path):
    # The failing input: "image file …/\ufeffapple_pie_0.jpg not found" for a file that exists.
    root = make_food101(tmp_path / "food")
    add_bom(root / "texts" / "train_titles.csv")
    r = open_dataset("food101", root)
    train = list(r.samples("train"))
    assert len(train) == 24 and train[0].sample_id == "pizza_0"
    assert not any("\ufeff" in s.sample_id or "\ufeff" in s.image.path for s in train)


def test_manifest_csv_with_bom_keeps_first_column(tmp_path):
    path = make_manifest(tmp_path / "m", fmt="csv")
    add_bom(path)
    r = open_dataset("manifest", path)
    train = list(r.samples("train"))
    assert [s.sample_id for s in train[:3]] == ["m00", "m01", "m02"]  # not "line2", ...
    # a duplicate id is reported again, as it is without the BOM
    text = path.read_bytes().replace(b"m03,", b"m02,")
    path.write_bytes(text)
    r = open_dataset("manifest", path, on_bad="skip")
    list(r.samples("train"))
    assert [b.reason for b in r.report.rows] == ["duplicate id 'm02'"] * 2
    # `image` first: every row used to be "missing field 'image'"
    rows = path.read_text(encoding="utf-8-sig").splitlines()
    cols = [line.split(",") for line in rows]
    order = [1, 0, 2, 3, 4]
    path.write_bytes(BOM + "\n".join(",".join(c[i] for i in order) for c in cols).encode() + b"\n")
    r = open_dataset("manifest", path, on_bad="skip")
    assert len(list(r.samples("train"))) == 10 and len(r.report.rows) == 2


def test_json_files_with_bom(tmp_path):
    root = make_food101(tmp_path / "food")
    add_bom(root / "class_idx.json")
    add_bom(root / "split.json")
    assert len(list(open_dataset("food101", root).samples("val"))) == 6
    base = make_mmimdb(tmp_path / "imdb")
    add_bom(base / "split.json")
    add_bom(base / "dataset" / "0000001.json")
    first = next(iter(open_dataset("mmimdb", base).samples("train")))
    assert first.sample_id == "0000001" and first.text.startswith("In a rainy city")


# --- bytes that are not UTF-8: a bad row naming file:line ------------------------------------------
def test_food101_non_utf8_line_is_a_bad_row(tmp_path):
    root = make_food101(tmp_path / "food")
    path = root / "texts" / "train_titles.csv"
    break_line(path, 2, b"recipe")
    with pytest.raises(DatasetError, match=rf"{path}:2: not valid UTF-8: byte 0xe0 at column \d+"):
        list(open_dataset("food101", root).samples("train"))
    r = open_dataset("food101", root, on_bad="skip")
    assert len(list(r.samples("train"))) == 23 and len(list(r.samples("val"))) == 6
    assert [b.source for b in r.report.rows] == [f"{path}:2"]  # once, though val reads this file too


def test_snli_ve_non_utf8_line_and_duplicate_pair_id(tmp_path):
    root = make_snli_ve(tmp_path / "snli")
    path = root / "snli_ve_train.jsonl"
    break_line(path, 4, b"Hypothesis")
    with pytest.raises(DatasetError, match=rf"{path}:4: not valid UTF-8: byte 0xe0"):
        list(open_dataset("snli-ve", root).samples("train"))
    lines = path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    lines.append(lines[0])  # a repeated pairID
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogateescape")
    r = open_dataset("snli-ve", root, on_bad="skip")
    assert len(list(r.samples("train"))) == 11
    assert [(b.source, b.reason.split(":")[0]) for b in r.report.rows] == [
        (f"{path}:4", "not valid UTF-8"), (f"{path}:13", "duplicate sample id '1000092795.jpg#0r1e' (first at "
                                                         f"{path}")]
    assert r.report.rows[1].reason.endswith(f"{path}:1)")
    counts, reader = check_dataset("snli-ve", str(root), on_bad="skip")
    assert counts["train"].pairs == 11 and len(reader.report.rows) == 2


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_manifest_non_utf8_line(tmp_path, fmt):
    path = make_manifest(tmp_path / "m", fmt=fmt)
    break_line(path, 3, b"caption")
    lineno = 3
    with pytest.raises(DatasetError, match=rf"{path}:{lineno}: not valid UTF-8"):
        list(open_dataset("manifest", path).samples("train"))
    r = open_dataset("manifest", path, on_bad="skip")
    n = sum(len(list(r.samples(s))) for s in r.splits)
    assert n == 17 and [b.source for b in r.report.rows] == [f"{path}:{lineno}"]


def test_mmimdb_json_not_utf8_is_a_bad_row(tmp_path):
    base = make_mmimdb(tmp_path / "imdb")
    meta = base / "dataset" / "0000002.json"
    meta.write_bytes(meta.read_bytes().replace(b"Two friends", b"Two \xe0friends"))
    with pytest.raises(DatasetError, match=r"0000002\.json\[0000002\]: .*0000002\.json:1: not valid UTF-8: byte 0xe0"):
        list(open_dataset("mmimdb", base).samples("train"))
    r = open_dataset("mmimdb", base, on_bad="skip")
    assert len(list(r.samples("train"))) == 7 and len(r.report.rows) == 1


def test_mmimdb_duplicate_id_in_split_json(tmp_path):
    base = make_mmimdb(tmp_path / "imdb")
    split = json.loads((base / "split.json").read_text())
    split["train"].append(split["train"][0])
    (base / "split.json").write_text(json.dumps(split))
    r = open_dataset("mmimdb", base, on_bad="skip")
    assert len(list(r.samples("train"))) == 8
    assert "duplicate sample id '0000001'" in r.report.rows[0].reason


# --- Unicode normalization of file names --------------------------------------------------------
def test_nfd_file_on_disk_nfc_name_in_csv(tmp_path):
    nfc = unicodedata.normalize("NFC", "crème_brûlée")
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfc != nfd
    root = tmp_path / "m"
    write_jpeg(root / "images" / f"{nfd}.jpg", 0)
    write_jpeg(root / "images" / f"{nfd}_dir" / "a.jpg", 1)
    (root / "manifest.jsonl").write_text(
        json.dumps({"id": "a", "image": f"images/{nfc}.jpg", "text": "t", "label": "x", "split": "train"}) + "\n"
        + json.dumps({"id": "b", "image": f"images/{nfc}_dir/a.jpg", "text": "t", "label": "x", "split": "train"})
        + "\n" + json.dumps({"id": "c", "image": "images/nope.jpg", "text": "t", "label": "x", "split": "train"})
        + "\n", encoding="utf-8")
    r = open_dataset("manifest", root, on_bad="skip")
    got = list(r.samples("train"))
    assert [Path(s.image.path).name for s in got] == [f"{nfd}.jpg", "a.jpg"]
    assert got[0].image.open().size == (32, 32)
    assert [b.reason for b in r.report.rows] == [f"image file {root / 'images' / 'nope.jpg'} not found"]


def test_utf16_file_is_named_as_such(tmp_path):
    root = make_food101(tmp_path / "food")
    path = root / "texts" / "train_titles.csv"
    path.write_bytes(path.read_text(encoding="utf-8").encode("utf-16"))  # Python writes the LE BOM
    with pytest.raises(DatasetError, match=r"train_titles\.csv: the file is UTF-16 LE .*re-save it as UTF-8"):
        list(open_dataset("food101", root).samples("train"))
