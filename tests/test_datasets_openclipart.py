"""The OpenClipart reader on a tiny copy of the Debian packages' layout (data/make_fixtures.py)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from data.make_fixtures import OPENCLIPART_ITEMS, make_openclipart
from molt_cache.datasets import DatasetError, open_dataset
from molt_cache.datasets.openclipart import clean_field, leaks


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("openclipart")
    return {"good": make_openclipart(base / "good"), "bad": make_openclipart(base / "bad", bad=True)}


def read_all(reader) -> dict:
    return {s: list(reader.samples(s)) for s in reader.splits}


def test_classes_split_and_links(roots):
    r = open_dataset("openclipart", roots["good"], min_items=3)
    data = read_all(r)
    assert r.labels == ["animals", "food"] and r.task == "single-label"
    ids = {s: [x.sample_id for x in v] for s, v in data.items()}
    # 6 per class: 70/10/20 cut at round(4.2)=4 and round(4.8)=5 → 4/1/1 per class
    assert {s: len(v) for s, v in ids.items()} == {"train": 8, "val": 2, "test": 2}
    every = [i for v in ids.values() for i in v]
    assert len(every) == len(set(every)) == 12  # no drawing in two splits
    assert "food/fruit/cat_link" not in every  # the symbolic link is not a second item
    expected = {rel for rel, *_ in OPENCLIPART_ITEMS if rel.split("/")[0] in ("animals", "food")}
    assert set(every) == expected
    for split, samples in data.items():
        for x in samples:
            assert r.labels[x.target[0]] == x.sample_id.split("/")[0] and x.split == split
            assert Path(x.image.path).is_file() and x.image_key == x.sample_id
            assert x.source.endswith(f"{x.sample_id}.svg[{x.sample_id}]")
    note = r.notes[0]
    assert "1 symbolic links" in note and "'logos': 1" in note and "'special': 3" in note
    assert "train/val/test 8/2/2" in note and "seed 0" in note


def test_split_is_seeded_and_stratified(roots):
    a = {s: [x.sample_id for x in v] for s, v in read_all(open_dataset("openclipart", roots["good"], min_items=3)).items()}
    b = {s: [x.sample_id for x in v] for s, v in read_all(open_dataset("openclipart", roots["good"], min_items=3)).items()}
    assert a == b  # same seed, same split
    others = [{s: [x.sample_id for x in v] for s, v in read_all(
        open_dataset("openclipart", roots["good"], min_items=3, seed=seed)).items()} for seed in (1, 2, 3)]
    assert any(o["test"] != a["test"] for o in others)  # the seed moves items between splits
    for o in others:  # stratified: every seed keeps one test item per class
        assert sorted(i.split("/")[0] for i in o["test"]) == ["animals", "food"]


def test_text_leaks_and_boilerplate_removed(roots):
    r = open_dataset("openclipart", roots["good"], min_items=3)
    texts = {x.sample_id: x.text for v in read_all(r).values() for x in v}
    # "mammal" names the subfolder mammals, "Animals" the category: both go; the publisher's
    # dc:title ("Open Clip Art Library", a cc:Agent) is never taken for the drawing's title
    assert texts["animals/mammals/cat_01"] == "Cat. A sleeping cat. cat, pet"
    assert texts["animals/birds/parrot_01"] == "Parrot. parrot, green"  # "hash" and "" dropped
    assert texts["animals/dog_01"] == "drawn by me. dog"  # import-stamp title and URL dropped
    assert texts["animals/fish_01"] == "Fish. fish, water"  # "animal" names "animals"
    assert texts["food/fruit/pear_01"] == "Pear. ripe pear. pear"  # "fruits" and "food" leak
    assert texts["food/cheese_01"] == "Cheese. cheese"  # "foodstuff" contains "food"
    assert texts["animals/horse_01"] == "Horse. A brown horse"
    assert r.removed == {"leak keywords": 6, "items with a leak keyword": 4, "boilerplate keywords": 1,
                         "boilerplate title": 1, "boilerplate description": 1}
    assert any("removed {" in n and "leak keywords" in n for n in r.notes[1:])


@pytest.mark.parametrize("keyword, folders, leaked", [
    ("lemon_theme_icon", ["computer", "icons", "lemon-theme"], True),
    ("sign", ["signs_and_symbols"], True),
    ("Signs and Symbols", ["signs_and_symbols"], True),
    ("animal", ["animals"], True),
    ("starfish", ["shapes", "stars"], True),  # "contains": a form at a word start counts
    ("mustard", ["shapes", "stars"], False),  # inside a word does not
    ("cat", ["animals", "mammals"], False),
    ("sand", ["signs_and_symbols"], False),  # "and" (< 4 letters) is no form of the folder
])
def test_leak_rule(keyword, folders, leaked):
    assert leaks(keyword, folders) is leaked


def test_clean_field():
    assert clean_field("Open Clip Art Library") == ("", True)
    assert clean_field("Clipart by Nicu Buculei - arrow08_4") == ("", True)
    assert clean_field("see www.x.org or me@x.org  now") == ("see or now", True)
    assert clean_field("Part of the Flat Icon Collection") == ("Part of the Flat Icon Collection", False)


def test_options_exclude_and_min_items(roots):
    r = open_dataset("openclipart", roots["good"], min_items=3, exclude="")
    assert r.labels == ["animals", "food", "special"]
    r = open_dataset("openclipart", roots["good"], min_items=1, exclude=["special", "food"])
    assert r.labels == ["animals", "logos"]
    with pytest.raises(DatasetError, match="≥ 40 drawings"):  # the default rule: no fixture folder has 40
        open_dataset("openclipart", roots["good"])
    with pytest.raises(ValueError, match="min_itemz"):
        open_dataset("openclipart", roots["good"], min_itemz=3)


def test_root_may_be_the_extraction_folder(tmp_path):
    make_openclipart(tmp_path / "usr" / "share" / "openclipart")
    assert open_dataset("openclipart", tmp_path, min_items=3).labels == ["animals", "food"]
    with pytest.raises(DatasetError, match="png/ and svg/"):
        open_dataset("openclipart", tmp_path / "usr")


def test_bad_rows_error_and_skip(roots):
    r = open_dataset("openclipart", roots["bad"], min_items=3)
    with pytest.raises(DatasetError, match=r"ghost_01\.svg.*not found.*--on-bad skip"):
        read_all(r)
    r = open_dataset("openclipart", roots["bad"], min_items=3, on_bad="skip")
    data = read_all(r)
    reasons = {Path(b.source.split("[")[0]).stem: b.reason for b in r.report.rows}
    assert set(reasons) == {"ghost_01", "broken_01", "leaky_01", "laughs_01"}
    assert "not found" in reasons["ghost_01"]
    assert "ParseError" in reasons["broken_01"]
    assert "no text left" in reasons["leaky_01"]
    assert "amplification" in reasons["laughs_01"]  # expat refuses the entity bomb; nothing expanded
    assert sum(len(v) for v in data.values()) == 12  # the good items all still come through


def test_pixel_bound_is_a_bad_row(roots):
    r = open_dataset("openclipart", roots["good"], min_items=3, on_bad="skip", max_pixels=24 * 16 - 1)
    assert sum(len(v) for v in read_all(r).values()) == 0
    assert len(r.report.rows) == 12 and all("24×16" in b.reason and "max_pixels" in b.reason for b in r.report.rows)


@pytest.mark.parametrize("rel", ["animals/mammals/cat_01", "animals/birds/parrot_01", "animals/dog_01"])
def test_transparent_png_opens_on_white(roots, rel):
    r = open_dataset("openclipart", roots["good"], min_items=3)
    item = next(x for v in read_all(r).values() for x in v if x.sample_id == rel)
    img = item.image.open()
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.shape == (16, 24, 3)
    assert (arr[0, 0] == 255).all()  # transparent ground → white, not the black stored under it


def test_datasets_check_cli(roots, tmp_path):
    result = CliRunner().invoke(app, ["datasets", "check", "--dataset", "openclipart", "--root", str(roots["bad"]),
                                      "--option", "min_items=3", "--on-bad", "skip",
                                      "--bad-report", str(tmp_path / "bad.json")])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert re.search(r"│\s*train\s*│\s*8\s*│", result.output)
    assert re.search(r"animals\s*│\s*4\s*│\s*1\s*│\s*1", result.output)
    assert "text length (words), quantiles over all pairs:" in out and "q50=" in out
    assert re.search(r"removed from the texts:.*leak keywords 8\b", out)  # 6 + "food", "foods" of leaky_01
    assert "4 bad rows skipped" in out and len(json.loads((tmp_path / "bad.json").read_text())) == 4
    bad = CliRunner().invoke(app, ["datasets", "check", "--dataset", "openclipart", "--root", str(roots["good"]),
                                   "--option", "min_items"])
    assert bad.exit_code == 2 and "KEY=VALUE" in bad.output


def test_extract_cli_on_the_fixture_records_options(roots, tmp_path):
    """Stage one reads the layout end to end (tiny encoders); the reader's options and split counts
    land in the manifest, so the cache says which classes and split it holds."""
    out = tmp_path / "cache"
    result = CliRunner().invoke(app, ["extract", "--dataset", "openclipart", "--root", str(roots["good"]),
                                      "--option", "min_items=3", "--option", "seed=0", "--text", "tiny:llama",
                                      "--image", "tiny:vit", "--device", "cpu", "--num-workers", "0",
                                      "--out-dir", str(out)])
    assert result.exit_code == 0, result.output[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extraction"]["dataset_options"] == {"min_items": 3, "seed": 0}
    assert manifest["dataset"]["labels"] == ["animals", "food"]
    assert {s: manifest["splits"][s]["pairs"] for s in ("train", "val", "test")} == {"train": 8, "val": 2, "test": 2}
