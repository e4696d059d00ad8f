"""`Classifier` / `molt predict` on the bundled sample with tiny random encoders: predicting the
raw inputs of the test split gives the logits the heads give on the cache (both modalities, each
absent, each strategy), bad rows follow --on-bad, and a run of other encoders is refused."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from molt_cache.cache.loader import make_loader
from molt_cache.cache.reader import open_cache
from molt_cache.config import HeadsConfig, TrainConfig
from molt_cache.datasets.base import DatasetError
from molt_cache.extract import ExtractConfig, extract
from molt_cache import Classifier
from molt_cache.predict import RunMismatchError, read_inputs
from molt_cache.perturb import missing
from molt_cache.train import predict as heads_logits
from molt_cache.train import train_heads

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    cache = root / "cache"
    extract(ExtractConfig(dataset="sample", text="tiny:llama", image="tiny:vit", out_dir=str(cache),
                          device="cpu", num_workers=0))
    train_heads(TrainConfig(cache=[str(cache)], run_dir=str(root / "run"), epochs=2, batch_size=32, device="cpu"),
                HeadsConfig(d_common=32))
    clf = Classifier.from_run(root / "run", device="cpu")
    rows = {r["id"]: r for r in map(json.loads, (SAMPLE / "manifest.jsonl").read_text().splitlines())}
    split = open_cache(cache).split("test")
    ids = [str(s) for s in split.group["pairs/sample_id"][:]]
    return {"root": root, "cache": cache, "run": root / "run", "clf": clf, "split": split, "ids": ids,
            "images": [str(SAMPLE / rows[i]["image"]) for i in ids], "texts": [rows[i]["text"] for i in ids]}


def cache_logits(clf, split, drop: str | None, strategy: str) -> np.ndarray:
    perturb = (lambda b: missing(b, drop, "zero")) if drop else None
    loader = make_loader([split], batch_size=64, shuffle=False, seed=0, epoch=0, in_memory=False,
                         num_workers=0, perturb=perturb)
    logits, _ = heads_logits(clf.heads, loader, torch.device("cpu"),
                             missing_strategy=strategy if drop else "zero")
    return logits


@pytest.mark.parametrize("drop, strategy", [(None, "zero"), ("text", "zero"), ("image", "zero"),
                                            ("text", "translate"), ("image", "translate")])
def test_raw_inputs_give_the_cache_logits(trained, drop, strategy):
    clf = trained["clf"]
    clf.strategy = strategy
    try:
        res = clf.predict(images=None if drop == "image" else trained["images"],
                          texts=None if drop == "text" else trained["texts"], ids=trained["ids"])
    finally:
        clf.strategy = "zero"
    assert [p.id for p in res.predictions] == trained["ids"] and not res.bad_rows
    got = np.stack([p.logits for p in res.predictions])
    want = cache_logits(clf, trained["split"], drop, strategy)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    present = {"text": drop != "text", "image": drop != "image"}
    assert all(p.present == present for p in res.predictions)


def test_empty_strategy_gives_the_logits_of_an_empty_text_extraction(trained, tmp_path):
    empty_cache = tmp_path / "empty-text"
    extract(ExtractConfig(dataset="sample", splits=["test"], text="tiny:llama", image="tiny:vit", empty="text",
                          out_dir=str(empty_cache), device="cpu", num_workers=0))
    clf = trained["clf"]
    clf.strategy = "empty"
    try:
        res = clf.predict(images=trained["images"], texts=[None] * len(trained["images"]), ids=trained["ids"])
    finally:
        clf.strategy = "zero"
    got = np.stack([p.logits for p in res.predictions])
    want = cache_logits(clf, open_cache(empty_cache).split("test"), None, "zero")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_mixed_rows_equal_rows_predicted_alone(trained):
    """Per-row absence: a batch mixing complete, text-only and image-only rows gives each row the
    logits it gets in a batch of its own kind."""
    clf = trained["clf"]
    imgs, txts = trained["images"][:6], trained["texts"][:6]
    mixed = clf.predict(images=[imgs[0], None, imgs[2], imgs[3], None, imgs[5]],
                        texts=[txts[0], txts[1], "", txts[3], txts[4], None])
    full = clf.predict(images=imgs, texts=txts)
    text_only = clf.predict(texts=txts)
    image_only = clf.predict(images=imgs)
    want = [full, text_only, image_only, full, text_only, image_only]
    for i, (p, ref) in enumerate(zip(mixed.predictions, want)):
        np.testing.assert_allclose(p.logits, ref.predictions[i].logits, rtol=0, atol=1e-5)
    assert [p.present for p in mixed.predictions[:3]] == [
        {"text": True, "image": True}, {"text": True, "image": False}, {"text": False, "image": True}]


def test_probabilities_top_k_and_single_label_prediction(trained):
    clf = trained["clf"]
    res = clf.predict(images=trained["images"][:3], texts=trained["texts"][:3], top_k=2)
    for p in res.predictions:
        z = p.logits.astype(np.float64)
        probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        order = np.argsort(-probs)
        assert p.labels == [clf.labels[k] for k in order[:2]]
        np.testing.assert_allclose(p.probabilities, probs[order[:2]], rtol=1e-12)
        assert p.predicted == [clf.labels[order[0]]] and p.threshold is None


def test_multi_label_runs_use_sigmoid_and_the_threshold(trained):
    clf = trained["clf"]
    clf.multi_label, clf.threshold = True, 0.3
    try:
        res = clf.predict(images=trained["images"][:4], texts=trained["texts"][:4], top_k=4)
    finally:
        clf.multi_label, clf.threshold = False, 0.5
    for p in res.predictions:
        probs = 1 / (1 + np.exp(-p.logits.astype(np.float64)))
        assert sorted(p.predicted) == sorted(clf.labels[k] for k in np.flatnonzero(probs > 0.3))
        assert p.probabilities == sorted(p.probabilities, reverse=True) and p.threshold == 0.3
        np.testing.assert_allclose(sorted(p.probabilities), sorted(probs), rtol=1e-12)


def test_a_row_with_neither_modality_is_a_bad_row(trained):
    clf = trained["clf"]
    with pytest.raises(DatasetError, match=r"row 1 \(id 1\): neither an image nor a text.*--on-bad skip"):
        clf.predict(images=[trained["images"][0], None], texts=[trained["texts"][0], "  "])
    res = clf.predict(images=[trained["images"][0], None, "/no/such.jpg"], texts=[trained["texts"][0], None, "x"],
                      on_bad="skip")
    assert [p.id for p in res.predictions] == ["0"]
    assert [r.reason for r in res.bad_rows][0] == "neither an image nor a text"
    assert "/no/such.jpg" in res.bad_rows[1].reason


def test_a_run_of_other_encoders_is_refused_naming_the_difference(trained, tmp_path):
    from molt_cache.encoders import create_text_encoder

    other_layers = create_text_encoder("tiny:llama", device="cpu", dtype="float32", layers=2)
    with pytest.raises(RunMismatchError, match=r"text\.layer_indices: run trained on \[.*\], encoder loaded now"):
        Classifier.from_run(trained["run"], device="cpu", text_encoder=other_layers,
                            image_encoder=trained["clf"].image_encoder)
    run = tmp_path / "edited"
    shutil.copytree(trained["run"], run)
    config = json.loads((run / "config.json").read_text())
    config["cache"]["image"]["weights_sha256"] = "0" * 64
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunMismatchError, match=r"image\.weights_sha256: run trained on '0000"):
        Classifier.from_run(run, device="cpu", text_encoder=trained["clf"].text_encoder,
                            image_encoder=trained["clf"].image_encoder)


def test_read_inputs_jsonl_and_csv(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"id": "x", "image": "img.jpg", "text": "hi"}\n'
                                      '{"text": "only text"}\n\nnot json\n')
    with pytest.raises(DatasetError, match=r"a\.jsonl:4: malformed JSON"):
        read_inputs(tmp_path / "a.jsonl")
    rows, bad = read_inputs(tmp_path / "a.jsonl", on_bad="skip")
    assert [(r.id, r.image, r.text) for r in rows] == [("x", str(tmp_path / "img.jpg"), "hi"), ("2", None, "only text")]
    assert bad[0].source.endswith("a.jsonl:4")
    (tmp_path / "b.csv").write_text("id,image,text\n1,,a dog\n2,img.jpg,\n")
    rows, _ = read_inputs(tmp_path / "b.csv")
    assert [(r.has_text, r.has_image) for r in rows] == [(True, False), (False, True)]


def test_cli_predict_file_to_jsonl_table_and_json(trained, tmp_path):
    inp = tmp_path / "in.jsonl"
    lines = [{"id": "both", "image": trained["images"][0], "text": trained["texts"][0]},
             {"id": "text-only", "text": trained["texts"][1]},
             {"id": "image-only", "image": trained["images"][2], "text": ""},
             {"id": "neither", "text": ""}]
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "preds.jsonl"
    base = ["predict", "--run", str(trained["run"]), "--device", "cpu", "--top-k", "2"]
    r = runner.invoke(app, [*base, "--input", str(inp), "--out", str(out)])
    assert r.exit_code == 2 and "in.jsonl:4 (id neither): neither an image nor a text" in r.output
    assert not out.exists()
    r = runner.invoke(app, [*base, "--input", str(inp), "--out", str(out), "--on-bad", "skip"])
    assert r.exit_code == 0, r.output
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["id"] for g in got] == ["both", "text-only", "image-only"]
    assert got[1]["present"] == {"text": True, "image": False} and len(got[0]["top_k"]) == 2
    assert json.loads((tmp_path / "preds.bad_rows.json").read_text())[0]["reason"] == "neither an image nor a text"
    clf = trained["clf"]
    want = clf.predict(images=[trained["images"][0]], texts=[trained["texts"][0]], top_k=2).predictions[0]
    assert got[0]["predicted"] == want.predicted
    assert [t["label"] for t in got[0]["top_k"]] == want.labels
    assert "both" in r.output and "T+I" in r.output and "1 bad rows skipped" in r.output
    r = runner.invoke(app, [*base, "--input", str(inp), "--out", str(out), "--on-bad", "skip"])
    assert r.exit_code == 2 and "exists" in r.output  # never overwritten silently
    r = runner.invoke(app, [*base, "--text", trained["texts"][0], "--json"])
    assert r.exit_code == 0, r.output
    line = [x for x in r.stdout.splitlines() if x.startswith("{")]
    assert json.loads(line[-1])["present"] == {"text": True, "image": False}
