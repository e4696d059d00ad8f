"""Dataset readers on tiny copies of each official layout (data/make_fixtures.py)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from data.make_fixtures import FOOD_CLASSES, MMIMDB_MOVIES, make_fixtures
from molt_cache.datasets import (GENRES, DatasetError, ImageRef, Sample, list_datasets, open_dataset)


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> dict[str, Path]:
    return make_fixtures(tmp_path_factory.mktemp("datasets"))


def read_all(reader) -> dict[str, list[Sample]]:
    return {s: list(reader.samples(s)) for s in reader.splits}


# --- registry -------------------------------------------------------------------------------
def test_registry_names_and_unknown_name():
    assert list_datasets() == ["snli-ve", "food101", "mmimdb", "mmimdb-hdf5", "manifest", "openclipart", "sample",
                               "openclipart-sample"]
    with pytest.raises(ValueError, match="valid: .*snli-ve.*manifest"):
        open_dataset("coco", "/nowhere")


def test_unknown_option_is_named(fx):
    with pytest.raises(ValueError, match="image_dirr"):
        open_dataset("snli-ve", fx["snli-ve"], image_dirr="x")


# --- SNLI-VE ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["snli-ve", "snli-ve-old"])
def test_snli_ve_both_id_fields_and_shared_images(fx, name):
    r = open_dataset("snli-ve", fx[name])
    data = read_all(r)
    assert r.task == "single-label" and r.labels == ["entailment", "neutral", "contradiction"]
    assert {s: len(v) for s, v in data.items()} == {"train": 12, "val": 6, "test": 6}
    train = data["train"]
    keys = Counter(s.image_key for s in train)
    assert keys == {"1000092795": 3, "10002456": 3, "1000268201": 3, "1000344755": 3}  # no ".jpg"
    first = train[0]
    assert first.sample_id == "1000092795.jpg#0r1e" and first.target == (0,)
    assert Path(first.image.path).name == "1000092795.jpg" and Path(first.image.path).is_file()
    assert [s.target[0] for s in train[:3]] == [0, 1, 2]
    assert first.source.endswith("snli_ve_train.jsonl:1")
    assert all(s.split == "val" for s in data["val"])


def test_snli_ve_explicit_image_dir_and_missing_dir(fx, tmp_path):
    r = open_dataset("snli-ve", fx["snli-ve"], image_dir=fx["snli-ve"] / "Flickr30K" / "flickr30k_images")
    assert len(list(r.samples("test"))) == 6
    (tmp_path / "snli_ve_train.jsonl").write_text("")
    with pytest.raises(DatasetError, match="flickr30k_images"):
        open_dataset("snli-ve", tmp_path)


def test_snli_ve_bad_rows(fx):
    path = fx["snli-ve-bad"] / "snli_ve_train.jsonl"
    with pytest.raises(DatasetError, match=rf"{path}:13: gold_label '-'"):
        list(open_dataset("snli-ve", fx["snli-ve-bad"]).samples("train"))
    r = open_dataset("snli-ve", fx["snli-ve-bad"], on_bad="skip")
    train = list(r.samples("train"))
    assert len(train) == 13  # 12 good + the corrupt-bytes row (existence only is checked)
    assert [b.source for b in r.report.rows] == [f"{path}:{n}" for n in (13, 14, 15, 16, 17)]
    reasons = " | ".join(b.reason for b in r.report.rows)
    for needle in ("gold_label", "999.jpg not found", "sentence2", "malformed JSON", "image id field"):
        assert needle in reasons
    assert r.report.summary() == "5 bad rows skipped"
    corrupt = train[-1]
    with pytest.raises(DatasetError, match="corrupt.jpg"):
        corrupt.image.open()
    assert train[0].image.open().size == (32, 32)


# --- UPMC-Food101 -----------------------------------------------------------------------------
def test_food101_class_idx_order_and_split_json(fx):
    r = open_dataset("food101", fx["food101"])
    assert r.labels == FOOD_CLASSES  # class_idx.json order wins over sorted
    data = read_all(r)
    assert {s: len(v) for s, v in data.items()} == {"train": 24, "val": 6, "test": 9}
    assert not r.notes
    val_names = {s.sample_id for s in data["val"]}
    assert val_names == {f"{c}_{k}" for c in FOOD_CLASSES for k in (8, 9)}
    s = data["test"][0]
    assert s.image_key == "test/pizza/pizza_100.jpg" and s.target == (0,) and s.text.startswith("Best pizza")
    assert len({x.image_key for v in data.values() for x in v}) == 39


def test_food101_carved_val_is_stratified_and_deterministic(fx):
    r1, r2 = open_dataset("food101", fx["food101-nosplit"]), open_dataset("food101", fx["food101-nosplit"])
    assert r1.labels == sorted(FOOD_CLASSES)
    v1 = [s.sample_id for s in r1.samples("val")]
    assert v1 == [s.sample_id for s in r2.samples("val")]
    assert Counter(s.target for s in r1.samples("val")) == {(0,): 1, (1,): 1, (2,): 1}  # 10% of 10 per class
    train = [s.sample_id for s in r1.samples("train")]
    assert len(train) == 27 and not set(train) & set(v1)
    assert any("carved val" in n and "seed 0" in n for n in r1.notes)
    other_seed = open_dataset("food101", fx["food101-nosplit"], seed=1, val_fraction=0.3)
    assert len(list(other_seed.samples("val"))) == 9


def test_food101_bad_rows(fx):
    path = fx["food101-bad"] / "texts" / "train_titles.csv"
    with pytest.raises(DatasetError, match=rf"{path}:31: unknown class 'taco'"):
        list(open_dataset("food101", fx["food101-bad"]).samples("train"))
    r = open_dataset("food101", fx["food101-bad"], on_bad="skip")
    data = read_all(r)
    assert sum(map(len, data.values())) == 39
    assert [b.source for b in r.report.rows] == [f"{path}:{n}" for n in (31, 32, 33, 34)]
    assert ["unknown class" in r.report.rows[0].reason, "empty text" in r.report.rows[1].reason,
            "not found" in r.report.rows[2].reason, "malformed CSV" in r.report.rows[3].reason] == [True] * 4


# --- MM-IMDB folder -----------------------------------------------------------------------
def test_mmimdb_folder_longest_plot_multilabel_and_ignored_genres(fx):
    r = open_dataset("mmimdb", fx["mmimdb"].parent)  # the parent of mmimdb/ works too
    assert r.task == "multi-label" and r.labels == GENRES and len(GENRES) == 23
    data = read_all(r)
    assert {s: len(v) for s, v in data.items()} == {"train": 8, "val": 2, "test": 2}
    first = data["train"][0]
    assert first.text == "In a rainy city, a tired detective hunts a careful killer."
    assert first.target == tuple(sorted(GENRES.index(g) for g in ("Crime", "Thriller", "Drama")))
    assert data["train"][2].text == "A crew of astronauts finds a signal on a frozen moon."
    family = data["train"][3]
    assert family.target == (GENRES.index("Family"),)  # Reality-TV ignored...
    assert r.ignored_genres == {"Reality-TV": 1, "News": 1}  # ...but counted and reported
    assert any("Reality-TV" in n for n in r.notes)
    assert first.image.path.endswith("0000001.jpeg") and first.image_key == "0000001"


def test_mmimdb_folder_bad_rows(fx):
    with pytest.raises(DatasetError, match=r"1000001\.json\[1000001\].*1000001\.jpeg not found"):
        list(open_dataset("mmimdb", fx["mmimdb-bad"]).samples("train"))
    r = open_dataset("mmimdb", fx["mmimdb-bad"], on_bad="skip")
    assert len(list(r.samples("train"))) == 8
    got = {Path(b.source.split("[")[0]).stem: b.reason for b in r.report.rows}
    assert set(got) == {"1000001", "1000002", "1000003", "1000004", "1000005", "1000006"}
    assert "none of the 23" in got["1000002"] and "plot" in got["1000003"]
    assert "malformed JSON" in got["1000004"] and "genres" in got["1000005"] and "not found" in got["1000006"]


# --- MM-IMDB HDF5 -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mmimdb-hdf5", "mmimdb-hdf5-padded"])
def test_mmimdb_hdf5_text_rebuilt_and_ranges(fx, name):
    r = open_dataset("mmimdb-hdf5", fx[name])
    assert r.task == "multi-label" and r.labels == GENRES
    data = read_all(r)
    assert [s.sample_id for s in data["train"]] == [m[0] for m in MMIMDB_MOVIES[:8]]
    assert [s.sample_id for s in data["val"]] == ["0000009", "0000010"]
    assert [s.image.index for s in data["test"]] == [10, 11]
    first = data["train"][0]
    assert first.text == "in a rainy city , a tired detective hunts a careful killer ."  # no padding words
    assert first.target == tuple(sorted(GENRES.index(g) for g in ("Crime", "Thriller", "Drama")))
    assert first.image.kind == "hdf5" and first.image_key == "0000001"
    img = data["test"][1].image.open()
    assert img.size == (160, 256)  # W×H of a 3×256×160 poster


def test_mmimdb_hdf5_needs_vocabulary(fx, tmp_path):
    import shutil

    shutil.copy(fx["mmimdb-hdf5"] / "multimodal_imdb.hdf5", tmp_path)
    with pytest.raises(DatasetError, match="metadata.npy"):
        open_dataset("mmimdb-hdf5", tmp_path)
    r = open_dataset("mmimdb-hdf5", tmp_path / "multimodal_imdb.hdf5", metadata=fx["mmimdb-hdf5"] / "metadata.npy")
    assert len(list(r.samples("train"))) == 8


# --- generic manifest -------------------------------------------------------------------------
def test_manifest_jsonl_single_label(fx):
    r = open_dataset("manifest", fx["manifest-jsonl"])
    data = read_all(r)
    assert r.task == "single-label" and r.labels == ["bird", "boat", "car"]
    assert {s: len(v) for s, v in data.items()} == {"train": 12, "val": 4, "test": 2}
    s = data["train"][1]
    assert (s.sample_id, s.image_key, s.target) == ("m01", "images/img_0.jpg", (1,))
    assert s.image.path == str(fx["manifest-jsonl"].parent / "images" / "img_0.jpg")
    # the folder works as root too
    assert len(list(open_dataset("manifest", fx["manifest-jsonl"].parent).samples("test"))) == 2


def test_manifest_csv_multilabel_carved_splits(fx):
    r = open_dataset("manifest", fx["manifest-csv-multi"])
    data = read_all(r)
    assert r.task == "multi-label" and r.labels == ["bird", "boat", "car"]
    by_id = {s.sample_id: s for v in data.values() for s in v}
    assert by_id["m01"].target == (1, 2) and by_id["m00"].target == (0,)
    assert sum(map(len, data.values())) == 18
    split_of_image = {}
    for split, samples in data.items():
        for s in samples:
            assert split_of_image.setdefault(s.image_key, split) == split  # an image never straddles splits
    assert Counter(split_of_image.values()) == {"train": 7, "val": 1, "test": 1}
    assert any("carved" in n for n in r.notes)
    again = open_dataset("manifest", fx["manifest-csv-multi"])
    assert [s.sample_id for s in again.samples("val")] == [s.sample_id for s in data["val"]]


def test_manifest_jsonl_multilabel_with_labels_json(fx):
    r = open_dataset("manifest", fx["manifest-jsonl-multi"])
    assert r.closed_vocabulary and r.labels == ["bird", "boat", "car"]
    assert next(r.samples("train")).target == (0,)


def test_manifest_bad_rows(fx):
    path = fx["manifest-bad"]
    with pytest.raises(DatasetError, match=rf"{path}:19: image file .*nope.jpg not found"):
        list(open_dataset("manifest", path).samples("train"))
    r = open_dataset("manifest", path, on_bad="skip")
    data = read_all(r)
    assert len(data["train"]) == 13
    assert [b.source for b in r.report.rows] == [f"{path}:{n}" for n in range(19, 25)]
    kinds = [b.reason for b in r.report.rows]
    for k, needle in zip(kinds, ["not found", "text", "unknown label", "malformed JSON", "text", "'label'"]):
        assert needle in k
    report_file = path.parent / "bad_rows.json"
    r.report.write(report_file)
    assert len(json.loads(report_file.read_text())) == 6
    with pytest.raises(DatasetError, match="corrupt.jpg"):
        data["train"][-1].image.open()


def test_manifest_csv_malformed_line(fx):
    path = fx["manifest-csv-bad"]
    with pytest.raises(DatasetError, match=rf"{path}:20: malformed CSV"):
        for split in ("train", "val", "test"):
            list(open_dataset("manifest", path).samples(split))


# --- streaming: no image is decoded while iterating ----------------------------------------
def test_readers_never_decode_images(fx, monkeypatch):
    import PIL.Image

    def refuse(*a, **k):
        raise AssertionError("a reader decoded an image while iterating")

    monkeypatch.setattr(PIL.Image, "open", refuse)
    monkeypatch.setattr(ImageRef, "open", refuse)
    for kind, name in [("snli-ve", "snli-ve"), ("food101", "food101"), ("mmimdb", "mmimdb"),
                       ("mmimdb-hdf5", "mmimdb-hdf5"), ("manifest", "manifest-jsonl")]:
        data = read_all(open_dataset(kind, fx[name]))
        assert sum(map(len, data.values())) > 0
    assert sum(map(len, read_all(open_dataset("sample", None)).values())) == 600
