"""MM-IMDB HDF5 as gmu-mmimdb's make_dataset.py writes it, its variants, and a metadata.npy that would run code."""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from data.make_fixtures import COLORS, make_mmimdb_hdf5
from molt_cache.datasets import GENRES, DatasetError, open_dataset
from molt_cache.datasets.check import check_dataset
from molt_cache.datasets.safe_pickle import UnsafePickleError, load_npy_restricted


def first_train(root: Path, **kw):
    r = open_dataset("mmimdb-hdf5", root, **kw)
    return r, next(iter(r.samples("train")))


@pytest.mark.parametrize("variant", [
    {},  # the release: int32 images, JSON target_names, S7 ids, Fuel split table, vlen sequences
    {"target_names": "json-bytes"}, {"target_names": "str"}, {"target_names": "bytes"},
    {"images_dtype": "uint8"}, {"images_dtype": "float01"}, {"images_dtype": "float255"},
    {"split_attrs": "ranges", "ids": "str"}, {"padded": True},
])
def test_release_and_variants_read_the_same(tmp_path, variant):
    root = make_mmimdb_hdf5(tmp_path / "h", **variant)
    r, first = first_train(root)
    assert r.labels == GENRES  # not 247 one-character "labels"
    assert first.sample_id == "0000001" and isinstance(first.sample_id, str)
    assert first.text == "in a rainy city , a tired detective hunts a careful killer ."
    assert "b'" not in first.text
    assert first.target == tuple(sorted(GENRES.index(g) for g in ("Crime", "Thriller", "Drama")))
    assert [len(list(r.samples(s))) for s in r.splits] == [8, 2, 2]
    px = np.asarray(r.samples("test").__next__().image.open())  # row 10
    assert px.shape == (256, 160, 3)
    assert px[0, 0].tolist() == list(COLORS[10 % len(COLORS)])  # 0..255 values kept exactly
    assert px[80, 30].tolist() == [155, 155, 155]  # the square 255 - 10·10
    if variant == {}:
        with h5py.File(root / "multimodal_imdb.hdf5") as f:  # the fixture is written as the release is
            assert f["images"].dtype == np.int32 and f["genres"].dtype == np.int32
            assert isinstance(f["genres"].attrs["target_names"], str)
            assert f["imdb_ids"].dtype == np.dtype("S7") and "split" in f.attrs


def test_refused_target_names_and_image_dtypes(tmp_path):
    root = make_mmimdb_hdf5(tmp_path / "h")
    path = root / "multimodal_imdb.hdf5"
    with h5py.File(path, "r+") as f:
        f["genres"].attrs["target_names"] = 7
    with pytest.raises(DatasetError, match=r"genres\.attrs\['target_names'\] must be a JSON string, a list of str"):
        open_dataset("mmimdb-hdf5", root)
    with h5py.File(path, "r+") as f:
        f["genres"].attrs["target_names"] = "Drama, Comedy"
    with pytest.raises(DatasetError, match=r"target_names'\] is a string but not a JSON list"):
        open_dataset("mmimdb-hdf5", root)
    with h5py.File(path, "r+") as f:
        f["genres"].attrs["target_names"] = '["Drama"]'
    with pytest.raises(DatasetError, match=r"names 1 genres but genres has shape \(12, 23\)"):
        open_dataset("mmimdb-hdf5", root)
    with h5py.File(path, "r+") as f:
        del f["genres"].attrs["target_names"]
        img = f["images"][0]
        img[0, 0, 0] = 300
        f["images"][0] = img
    r = open_dataset("mmimdb-hdf5", root)
    with pytest.raises(DatasetError, match=r"\[images\]\[0\].*int32 must lie in 0\.\.255, found \d+\.\.300"):
        next(iter(r.samples("train"))).image.open()
    with h5py.File(path, "r+") as f:
        del f["images"]
        f.create_dataset("images", data=np.zeros((12, 3, 4, 4), "S1"))
    with pytest.raises(DatasetError, match=r"images has dtype \|S1"):
        open_dataset("mmimdb-hdf5", root)


def test_python2_style_bytes_metadata_and_duplicate_ids(tmp_path):
    root = make_mmimdb_hdf5(tmp_path / "h")
    meta = load_npy_restricted(root / "metadata.npy")
    as_bytes = {b"ix_to_word": {k: v.encode() for k, v in meta["ix_to_word"].items()}, b"vocab_size": 3}
    np.save(root / "metadata.npy", as_bytes, allow_pickle=True)
    with h5py.File(root / "multimodal_imdb.hdf5", "r+") as f:
        ids = f["imdb_ids"][...]
        ids[1] = ids[0]
        f["imdb_ids"][...] = ids
    r = open_dataset("mmimdb-hdf5", root, on_bad="skip")
    train = list(r.samples("train"))
    assert train[0].text == "in a rainy city , a tired detective hunts a careful killer ."
    assert len(train) == 7 and "duplicate sample id '0000001'" in r.report.rows[0].reason


class _RunsCode:
    """Pickles as a call to os.system: what a crafted metadata.npy does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_metadata_does_not_run_code(tmp_path):
    root = make_mmimdb_hdf5(tmp_path / "h")
    marker = tmp_path / "pwned"
    np.save(root / "metadata.npy", {"ix_to_word": {0: "_UNK_"}, "x": _RunsCode(marker)}, allow_pickle=True)
    # control: the unrestricted load really would run it (so the test can fail)
    control = tmp_path / "control.npy"
    np.save(control, {"x": _RunsCode(tmp_path / "control-ran")}, allow_pickle=True)
    np.load(control, allow_pickle=True)
    assert (tmp_path / "control-ran").exists()

    with pytest.raises(UnsafePickleError, match=r"metadata\.npy: the pickle asks for posix\.system, which is not allowed"):
        open_dataset("mmimdb-hdf5", root)
    with pytest.raises(DatasetError, match="posix.system"):
        check_dataset("mmimdb-hdf5", str(root))
    assert not marker.exists()


def test_restricted_loader_reads_plain_data_and_refuses_other_classes(tmp_path):
    path = tmp_path / "m.npy"
    value = {"a": [1, 2.5, "x", b"y", (True, None)], "arr": np.arange(6, dtype=np.int16).reshape(2, 3),
             "scalar": np.float32(1.5)}
    np.save(path, value, allow_pickle=True)
    got = load_npy_restricted(path)
    assert got["a"] == value["a"] and got["scalar"] == np.float32(1.5)
    np.testing.assert_array_equal(got["arr"], value["arr"])
    np.save(path, np.arange(4.0))  # a plain array: no pickle at all
    np.testing.assert_array_equal(load_npy_restricted(path), np.arange(4.0))
    from collections import OrderedDict

    np.save(path, {"d": OrderedDict(a=1)}, allow_pickle=True)  # any class is refused by name
    with pytest.raises(UnsafePickleError, match="collections.OrderedDict"):
        load_npy_restricted(path)
    np.save(path, {"s": {1, 2}}, allow_pickle=True)  # built by opcodes, but not plain data
    with pytest.raises(DatasetError, match=r"object\[0\]\['s'\] is a set"):
        load_npy_restricted(path)
    path.write_bytes(b"not an npy")
    with pytest.raises(DatasetError, match="not an .npy file"):
        load_npy_restricted(path)
