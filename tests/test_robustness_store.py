"""`molt robustness` evaluates through the feature store (molt_cache/robustness/evaluate.py): the
same metrics as the streaming loader for the clean, missing (all pairs, a rate, translate) and
noise conditions, the placement printed once per split, `--store` checked."""
from __future__ import annotations

import numpy as np
import pytest
from _cache_fixture import TinySpec, write_tiny_cache

from molt_cache.config import HeadsConfig, TrainConfig
import molt_cache.robustness.evaluate as rob
from molt_cache.metrics import compute_metrics
from molt_cache.robustness.evaluate import RobustnessConfig, run_robustness
from molt_cache.train import predict, train_heads


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("rob")
    write_tiny_cache(root / "c", TinySpec(splits={"train": 40, "val": 12, "test": 29}, pairs_per_image=3))
    cfg = TrainConfig(cache=[str(root / "c")], run_dir=str(root / "run"), epochs=2, batch_size=8, device="cpu",
                      amp="off")
    train_heads(cfg, HeadsConfig(model="molt", d_common=8, layers=2, fbp_stride=2))
    return root


@pytest.mark.parametrize("strategy,missing_rate", [("zero", 0.0), ("zero", 0.5), ("translate", 0.0)])
def test_store_gives_the_streaming_metrics(trained, strategy, missing_rate, monkeypatch):
    results, logs, logits = {}, {}, {}

    def evaluate_keeping_logits(heads, loader, device, multi_label, **kw):
        out, targets = predict(heads, loader, device, **kw)
        logits[store].append(out)
        return compute_metrics(out, targets, multi_label)

    monkeypatch.setattr(rob, "evaluate", evaluate_keeping_logits)
    for store in ("stream", "device", "host"):
        lines, logits[store] = [], []
        cfg = RobustnessConfig(runs=[str(trained / "run")], noise=[0.1, 0.3], noise_on="both",
                               missing=["text", "image"], strategy=strategy, missing_rate=missing_rate, seed=3,
                               batch_size=7, device="cpu", store=store, report_dir=str(trained / f"rep-{store}"))
        results[store] = run_robustness(cfg, log=lines.append)
        logs[store] = lines
    assert "streaming from disk" in logs["stream"][0] and "feature store: device" in logs["device"][0]
    assert "feature store: host" in logs["host"][0]
    assert sum("feature store" in line for line in logs["device"]) == 1  # the split is loaded once
    names = [r["condition"] for r in results["stream"]]
    assert names[0] == "clean" and any("absent" in n for n in names) and any("noise" in n for n in names)
    if missing_rate:
        assert any("half text half image" in n for n in names)
    clean = logits["stream"][0]
    assert all(not np.array_equal(clean, x) for x in logits["stream"][1:])  # every condition changes the logits
    for store in ("device", "host"):
        assert [r["condition"] for r in results[store]] == names
        for a, b in zip(logits["stream"], logits[store]):  # image-once vs per pair: float rounding only
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
        for a, b in zip(results["stream"], results[store]):
            metrics = [k for k in a if k in ("accuracy", "f1_micro", "f1_macro")]
            assert metrics
            for k in metrics:
                assert b[k] == pytest.approx(a[k], abs=1e-9), (store, a["condition"], k)


def test_store_option_is_checked(trained):
    with pytest.raises(ValueError, match=r"unknown --store 'gpu'"):
        run_robustness(RobustnessConfig(runs=[str(trained / "run")], store="gpu"), log=lambda s: None)
    with pytest.raises(ValueError, match="contradicts --store stream"):
        run_robustness(RobustnessConfig(runs=[str(trained / "run")], store="stream", in_memory=True),
                       log=lambda s: None)
