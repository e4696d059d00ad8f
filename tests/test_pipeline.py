"""The three stages through the real `molt` entry point, on the bundled sample with tiny random
encoders: extract → train-heads (MoLT, baseline) → robustness → sweep."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()
TRAIN_ARGS = ["--d-common", "32", "--epochs", "3", "--batch-size", "32", "--device", "cpu", "--seed", "0"]


def molt(*args: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"molt {' '.join(map(str, args))} failed:\n{result.output}\n{result.exception!r}"
    return result.output


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    molt("extract", "--dataset", "sample", "--text", "tiny:llama", "--image", "tiny:vit", "--device", "cpu",
         "--num-workers", "0", "--out-dir", root / "cache")
    molt("train-heads", "--cache", root / "cache", "--run-dir", root / "molt", *TRAIN_ARGS)
    molt("train-heads", "--cache", root / "cache", "--run-dir", root / "baseline", "--model", "baseline", *TRAIN_ARGS)
    return root


def test_extract_rerun_reuses_the_cache(work):
    out = molt("extract", "--dataset", "sample", "--text", "tiny:llama", "--image", "tiny:vit", "--device", "cpu",
               "--num-workers", "0", "--out-dir", work / "cache")
    assert "reused" in out


def test_train_writes_a_complete_run_folder(work):
    run = work / "molt"
    for name in ("config.json", "heads.safetensors", "metrics.json", "log.jsonl"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and log[-1]["train_loss"] < log[0]["train_loss"]  # it learns
    assert "train_cca" in log[0]
    baseline_log = (work / "baseline" / "log.jsonl").read_text()
    assert "train_cca" not in baseline_log  # the baseline has no CCA


def test_same_seed_same_metrics_and_bytes(work, tmp_path):
    molt("train-heads", "--cache", work / "cache", "--run-dir", tmp_path / "again", *TRAIN_ARGS)
    a = json.loads((work / "molt" / "metrics.json").read_text())
    b = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert a["val"] == b["val"] and a["test"] == b["test"] and a["best_epoch"] == b["best_epoch"]
    assert (work / "molt" / "heads.safetensors").read_bytes() == (tmp_path / "again" / "heads.safetensors").read_bytes()


def test_checkpoint_reloads_to_identical_predictions(work):
    from molt_cache.cache.loader import make_loader
    from molt_cache.cache.reader import open_cache
    from molt_cache.train import load_run, predict

    heads, heads_cfg, train_cfg, _ = load_run(work / "molt")
    split = open_cache(train_cfg.cache[0]).split("test")
    loader = make_loader([split], batch_size=64, shuffle=False, seed=0, epoch=0, in_memory=False, num_workers=0)
    logits, targets = predict(heads, loader, torch.device("cpu"))
    acc = float((logits.argmax(1) == targets).mean())
    saved = json.loads((work / "molt" / "metrics.json").read_text())["test"]["accuracy"]
    assert acc == pytest.approx(saved, abs=0)
    logits2, _ = predict(load_run(work / "molt")[0], loader, torch.device("cpu"))
    np.testing.assert_array_equal(logits, logits2)


def test_existing_run_folder_is_refused(work):
    result = runner.invoke(app, ["train-heads", "--cache", str(work / "cache"), "--run-dir", str(work / "molt"),
                                 *TRAIN_ARGS])
    assert result.exit_code == 2 and "already holds a run" in result.output


def test_layers_mismatch_is_refused_before_work(work, tmp_path):
    result = runner.invoke(app, ["train-heads", "--cache", str(work / "cache"), "--run-dir", str(tmp_path / "x"),
                                 "--layers", "3", *TRAIN_ARGS])
    assert result.exit_code == 2 and "--layers 4" in result.output


def test_train_heads_never_imports_an_encoder(work, tmp_path):
    code = (
        "import sys, json\n"
        "from molt_cache.config import TrainConfig, HeadsConfig\n"
        "from molt_cache.train import train_heads\n"
        f"train_heads(TrainConfig(cache=[{str(work / 'cache')!r}], run_dir={str(tmp_path / 'r')!r}, epochs=1,"
        " batch_size=32, device='cpu'), HeadsConfig(d_common=32))\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('transformers', 'open_clip', 'timm') or m.startswith('molt_cache.encoders'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_robustness_table_noise_zero_equals_clean_and_missing_hurts(work, tmp_path):
    out = molt("robustness", "--run", work / "molt", "--run", work / "baseline", "--noise", "0,0.05",
               "--missing", "text,image", "--device", "cpu", "--report-dir", tmp_path / "rep")
    assert "report folder" in out
    rows = json.loads((tmp_path / "rep" / "results.json").read_text())
    for model in ("molt", "baseline"):
        mine = {r["condition"]: r for r in rows if r["model"] == model}
        assert set(mine) == {"clean", "text absent (feature, zero)", "image absent (feature, zero)",
                             "noise 5% on both (feature)"}  # noise 0 adds no row: it is the clean row
    assert (tmp_path / "rep" / "results.csv").read_text().startswith("model,")
    assert (tmp_path / "rep" / "noise_accuracy.png").stat().st_size > 1000
    # the same command twice gives identical numbers
    molt("robustness", "--run", work / "molt", "--run", work / "baseline", "--noise", "0,0.05",
         "--missing", "text,image", "--device", "cpu", "--report-dir", tmp_path / "rep2")
    assert json.loads((tmp_path / "rep2" / "results.json").read_text()) == rows


def test_feature_noise_zero_is_exactly_clean(work):
    from molt_cache.robustness.evaluate import Condition, RobustnessConfig, run_robustness

    rows = run_robustness(RobustnessConfig(runs=[str(work / "molt")], noise=[0.0], missing=[], device="cpu"),
                          log=lambda s: None)
    assert len(rows) == 1 and rows[0]["condition"] == "clean"
    from molt_cache.cache.loader import make_loader
    from molt_cache.cache.reader import open_cache
    from molt_cache.perturb import make_perturb
    from molt_cache.train import load_run, predict

    heads, _, train_cfg, _ = load_run(work / "molt")
    split = open_cache(train_cfg.cache[0]).split("test")
    clean = predict(heads, make_loader([split], batch_size=50, shuffle=False, seed=0, epoch=0, in_memory=False,
                                       num_workers=0), torch.device("cpu"))[0]
    noise0 = make_perturb(noise=0.0, noise_on="both", missing_table=None, strategy="zero", seed=0)
    if noise0 is not None:
        zero = predict(heads, make_loader([split], batch_size=50, shuffle=False, seed=0, epoch=0, in_memory=False,
                                          num_workers=0, perturb=noise0), torch.device("cpu"))[0]
        np.testing.assert_array_equal(clean, zero)
    assert Condition("clean", "clean").noise == 0.0


def test_input_level_reuses_its_perturbed_cache(work, tmp_path):
    args = ["robustness", "--run", work / "molt", "--noise", "0.05", "--missing", "none", "--level", "input",
            "--noise-on", "image", "--device", "cpu", "--report-dir", tmp_path / "rep"]
    first = molt(*args)
    assert "extracting input-level cache" in first
    second = molt(*args, "--overwrite")  # a report is there now: replacing it is asked for
    assert "reusing input-level cache" in second and "extracting input-level cache" not in second
    a = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert len(a) == 2 and a[1]["level"] == "input"


def test_an_existing_report_is_not_overwritten_without_asking(work, tmp_path):
    rep = tmp_path / "rep"
    args = ["robustness", "--run", str(work / "molt"), "--noise", "0.05", "--missing", "none", "--level", "feature",
            "--device", "cpu", "--report-dir", str(rep)]
    assert runner.invoke(app, args).exit_code == 0
    before = (rep / "results.json").read_bytes()
    again = runner.invoke(app, [*args[:4], "0.2", *args[5:]])  # another noise level into the same folder
    assert again.exit_code == 2, again.output
    assert "already holds a robustness report" in again.output and "--overwrite" in again.output
    assert "noise 20%" not in again.output  # refused before evaluating anything
    assert (rep / "results.json").read_bytes() == before
    replaced = runner.invoke(app, [*args[:4], "0.2", *args[5:], "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert [r["noise"] for r in json.loads((rep / "results.json").read_text())] == [0.0, 0.2]


def test_run_is_refused_on_a_cache_from_other_encoders(work, tmp_path):
    cache = tmp_path / "other"
    molt("extract", "--dataset", "sample", "--text", "tiny:llama", "--image", "tiny:vit", "--device", "cpu",
         "--num-workers", "0", "--layers", "2", "--out-dir", cache, "--split", "test")
    result = runner.invoke(app, ["robustness", "--run", str(work / "molt"), "--cache", str(cache), "--missing", "none",
                                 "--noise", "0", "--device", "cpu", "--report-dir", str(tmp_path / "rep")])
    assert result.exit_code == 2 and "layer_indices" in result.output


def test_sweep_table_and_resume(work, tmp_path):
    args = ["sweep", "--cache", work / "cache", "--variants", "molt,ablate:cca,reg:bridge", "--seeds", "0,1",
            "--out-dir", tmp_path / "sw", "--epochs", "1", "--d-common", "32", "--batch-size", "32",
            "--missing", "text", "--device", "cpu"]
    out = molt(*args)
    summary = json.loads((tmp_path / "sw" / "summary.json").read_text())
    assert {(s["variant"], s["condition"]) for s in summary} == {
        (v, c) for v in ("molt", "ablate:cca", "reg:bridge") for c in ("clean", "text absent (feature, zero)")}
    assert all(s["seeds"] == 2 for s in summary)
    assert "±" in out
    # the plan and a time estimate before / at the first epoch; a line per epoch of every run
    assert "sweep: 6 runs (3 variants × 2 seeds), 0 trained earlier; 6 to train × up to 1 epochs" in out
    assert "sweep: first epoch took" in out and "min of training" in out
    assert all(f"{v} seed {s} epoch 1/1" in out for v in ("molt", "ablate:cca", "reg:bridge") for s in (0, 1))
    again = molt(*args)
    assert again.count("done earlier, reusing") == 6
    assert json.loads((tmp_path / "sw" / "summary.json").read_text()) == summary


def test_unknown_variant_fails_before_any_training(work, tmp_path):
    result = runner.invoke(app, ["sweep", "--cache", str(work / "cache"), "--variants", "molt,ablate:nope",
                                 "--out-dir", str(tmp_path / "sw")])
    assert result.exit_code == 2 and "unknown ablation" in result.output
    assert not (tmp_path / "sw" / "molt").exists()


def test_training_perturbations_in_memory_and_mixed_caches(work, tmp_path):
    """--missing-rate / --train-noise change what the heads see; --in-memory and two caches run."""
    molt("train-heads", "--cache", work / "cache", "--cache", work / "cache", "--run-dir", tmp_path / "mixed",
         "--in-memory", "--missing-rate", "0.7", "--missing-type", "both", "--train-noise", "0.05", *TRAIN_ARGS)
    mixed = [json.loads(x) for x in (tmp_path / "mixed" / "log.jsonl").read_text().splitlines()]
    clean = [json.loads(x) for x in (work / "molt" / "log.jsonl").read_text().splitlines()]
    assert mixed[0]["train_task"] != clean[0]["train_task"]
    saved = json.loads((tmp_path / "mixed" / "config.json").read_text())["train"]
    assert saved["missing_rate"] == 0.7 and saved["cache"] == [str(work / "cache")] * 2


def test_mixing_caches_from_other_encoders_is_refused(work, tmp_path):
    other = tmp_path / "other"
    molt("extract", "--dataset", "sample", "--text", "tiny:llama", "--image", "tiny:vit", "--device", "cpu",
         "--num-workers", "0", "--layers", "2", "--out-dir", other)
    result = runner.invoke(app, ["train-heads", "--cache", str(work / "cache"), "--cache", str(other),
                                 "--run-dir", str(tmp_path / "r"), *TRAIN_ARGS])
    assert result.exit_code == 2 and "layer_indices" in result.output and not (tmp_path / "r").exists()


def test_ablation_flags_reach_the_heads(work, tmp_path):
    molt("train-heads", "--cache", work / "cache", "--run-dir", tmp_path / "abl", "--ablate", "cca,M", *TRAIN_ARGS)
    log = [json.loads(x) for x in (tmp_path / "abl" / "log.jsonl").read_text().splitlines()]
    assert "train_cca" not in log[0]
    from safetensors.torch import load_file

    full = load_file(str(work / "molt" / "heads.safetensors"))
    ablated = load_file(str(tmp_path / "abl" / "heads.safetensors"))
    assert set(full) - set(ablated) == {k for k in full if "layer_weights" in k} != set()


def test_robustness_missing_rate_protocol(work, tmp_path):
    """--missing-rate 0.5 --missing-type both: per-modality rows at that rate plus the mixed row."""
    molt("robustness", "--run", work / "molt", "--noise", "0", "--missing", "text,image", "--missing-rate", "0.5",
         "--missing-type", "both", "--device", "cpu", "--report-dir", tmp_path / "rep")
    rows = {r["condition"]: r for r in json.loads((tmp_path / "rep" / "results.json").read_text())}
    assert set(rows) == {"clean", "text absent 50% (feature, zero)", "image absent 50% (feature, zero)",
                         "missing 50%, half text half image (feature, zero)"}
    full = run_rows(work, missing=["text"])  # the whole split text-absent
    assert rows["text absent 50% (feature, zero)"]["accuracy"] != full["text absent (feature, zero)"]["accuracy"]
    bad = runner.invoke(app, ["robustness", "--run", str(work / "molt"), "--missing-rate", "1.5",
                              "--report-dir", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--missing-rate must be in [0, 1]" in bad.output


def run_rows(work, **overrides) -> dict:
    from molt_cache.robustness.evaluate import RobustnessConfig, run_robustness

    cfg = RobustnessConfig(runs=[str(work / "molt")], noise=[], device="cpu", **overrides)
    return {r["condition"]: r for r in run_robustness(cfg, log=lambda s: None)}


def test_multi_label_mmimdb_fixture_end_to_end(tmp_path):
    """MM-IMDB (23 genres, multi-label): BCE training and F1 micro/macro, through the CLI."""
    from data.make_fixtures import make_fixtures

    root = make_fixtures(tmp_path / "fx")["mmimdb"]
    molt("extract", "--dataset", "mmimdb", "--root", root, "--text", "tiny:llama", "--image", "tiny:vit",
         "--device", "cpu", "--num-workers", "0", "--out-dir", tmp_path / "cache")
    molt("train-heads", "--cache", tmp_path / "cache", "--run-dir", tmp_path / "run", "--d-common", "32",
         "--epochs", "2", "--batch-size", "8", "--device", "cpu")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["test"]) == {"f1_micro", "f1_macro"}
    assert all(0.0 <= v <= 1.0 for v in metrics["test"].values())
    out = molt("robustness", "--run", tmp_path / "run", "--noise", "0.1", "--missing", "text", "--device", "cpu",
               "--report-dir", tmp_path / "rep")
    assert "f1_macro" in out


def test_training_noise_is_redrawn_each_epoch_missing_table_is_not(work):
    from molt_cache.cache.loader import make_loader
    from molt_cache.cache.reader import open_cache
    from molt_cache.config import TrainConfig
    from molt_cache.perturb import MissingTable
    from molt_cache.train import training_perturb

    split = open_cache(work / "cache").split("train")
    batch = next(iter(make_loader([split], batch_size=16, shuffle=False, seed=0, epoch=0, in_memory=False,
                                  num_workers=0)))
    cfg = TrainConfig(train_noise=0.1, train_noise_on="image", seed=0)
    table = MissingTable.sample(split.num_pairs, 0.5, "text", seed=0)
    e0, e0_again, e1 = (training_perturb(cfg, table, e)(batch) for e in (0, 0, 1))
    assert torch.equal(e0.image_final, e0_again.image_final)  # reproducible
    assert not torch.equal(e0.image_final, e1.image_final)  # fresh noise each epoch
    assert torch.equal(e0.text_present, e1.text_present) and not e0.text_present.all()  # same missing pairs


def test_unimodal_references_and_ceilings(work, tmp_path):
    """text-only / image-only heads train from the cache; robustness prints each fused model's
    modality-absent score beside the reference that reads only the remaining modality."""
    for model in ("text-only", "image-only"):
        molt("train-heads", "--cache", work / "cache", "--run-dir", tmp_path / model, "--model", model, *TRAIN_ARGS)
    out = molt("robustness", "--run", work / "molt", "--run", tmp_path / "text-only", "--run", tmp_path / "image-only",
               "--noise", "0", "--missing", "text,image", "--device", "cpu", "--report-dir", tmp_path / "rep")
    assert "unimodal ceiling" in " ".join(out.split())
    rows = json.loads((tmp_path / "rep" / "results.json").read_text())
    acc = {(r["model"], r["condition"]): r["accuracy"] for r in rows}
    # a reference never reads the other modality: removing it changes nothing
    assert acc[("text-only", "image absent (feature, zero)")] == acc[("text-only", "clean")]
    assert acc[("image-only", "text absent (feature, zero)")] == acc[("image-only", "clean")]
    ceilings = json.loads((tmp_path / "rep" / "ceilings.json").read_text())
    assert {(c["model"], c["reference"]) for c in ceilings} == {("molt", "image-only"), ("molt", "text-only")}
    for c in ceilings:
        assert c["ceiling"] == acc[(c["reference"], "clean")]
        assert c["gap"] == pytest.approx(acc[("molt", c["condition"])] - c["ceiling"])


def test_paired_differences_against_numpy():
    import numpy as np

    from molt_cache.sweep import paired_differences

    rng = np.random.default_rng(0)
    acc = {(v, c, s): float(rng.random()) for v in ("molt", "baseline") for c in ("clean", "x") for s in (0, 1, 2)}
    acc[("molt", "x", 2)] = acc[("baseline", "x", 2)]  # one tie
    rows = [{"variant": v, "condition": c, "seed": s, "accuracy": a} for (v, c, s), a in acc.items()]
    rows.append({"variant": "molt", "condition": "clean", "seed": 7, "accuracy": 0.5})  # no partner: ignored
    out = {p["condition"]: p for p in paired_differences(rows)}
    for c in ("clean", "x"):
        d = np.array([acc[("molt", c, s)] - acc[("baseline", c, s)] for s in (0, 1, 2)], dtype=np.float64)
        assert out[c]["seeds"] == [0, 1, 2]
        assert out[c]["diff_mean"] == pytest.approx(d.mean()) and out[c]["diff_std"] == pytest.approx(d.std(ddof=1))
        assert (out[c]["diff_min"], out[c]["diff_max"]) == (pytest.approx(d.min()), pytest.approx(d.max()))
        assert out[c]["wins"] + out[c]["ties"] + out[c]["losses"] == 3
    assert out["x"]["ties"] == 1


def test_sweep_prints_and_writes_paired_molt_vs_baseline(work, tmp_path):
    out = molt("sweep", "--cache", work / "cache", "--variants", "molt,baseline", "--seeds", "0,1",
               "--out-dir", tmp_path / "sw", "--epochs", "1", "--d-common", "32", "--batch-size", "32",
               "--missing", "text", "--device", "cpu", "--missing-rate", "0.5")
    assert "paired by seed" in " ".join(out.split())
    paired = json.loads((tmp_path / "sw" / "paired_molt_vs_baseline.json").read_text())
    rows = json.loads((tmp_path / "sw" / "runs.json").read_text())
    acc = {(r["variant"], r["condition"], r["seed"]): r["accuracy"] for r in rows}
    for p in paired:
        d = [acc[("molt", p["condition"], s)] - acc[("baseline", p["condition"], s)] for s in (0, 1)]
        assert p["seeds"] == [0, 1] and p["diff_mean"] == pytest.approx(sum(d) / 2)
    config = json.loads((tmp_path / "sw" / "molt" / "seed0" / "config.json").read_text())
    assert config["train"]["missing_rate"] == 0.5 and config["train"]["missing_type"] == "both"


def test_in_memory_robustness_equals_streamed(work, tmp_path):
    """The in-memory path (each split loaded once per run) gives the streamed path's numbers."""
    from molt_cache.robustness.evaluate import RobustnessConfig, run_robustness

    kw = dict(runs=[str(work / "molt"), str(work / "baseline")], noise=[0.05], missing=["text"], seed=3,
              device="cpu", report_dir=str(tmp_path))
    streamed = run_robustness(RobustnessConfig(**kw), log=lambda s: None)
    in_memory = run_robustness(RobustnessConfig(in_memory=True, **kw), log=lambda s: None)
    assert in_memory == streamed and len(streamed) == 6
