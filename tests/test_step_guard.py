"""The training step's non-finite guard without a host sync per step (molt_cache/finite.StepGuard,
issue 13 item 3): a finite step is plain Adam bit for bit, a non-finite one changes nothing on the
device, the host reads the device only at the readbacks (counted), and the error names the step."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from _cache_fixture import TinySpec, write_tiny_cache

import molt_cache
from molt_cache.cache.reader import open_cache
from molt_cache.cache.store import FeatureStore, Placement
from molt_cache.config import HeadsConfig, TrainConfig
from molt_cache.finite import NonFiniteError, StepGuard
from molt_cache.train import LOG_EVERY, train_heads

CPU = torch.device("cpu")
NO_SCALER = torch.amp.GradScaler("cpu", enabled=False)


class _Batch:
    """What StepGuard keeps of a batch: its pair ids and features (one finite feature here)."""

    def __init__(self, index):
        self.index = torch.tensor(index)
        f = torch.zeros(len(index), 2, 3)
        self.text_layers, self.text_final, self.text_pooled = [f], f, torch.zeros(len(index), 4)
        self.image_layers, self.image_final, self.image_pooled = [f], f, torch.zeros(len(index), 4)
        self.image_rows = None


def _model_and_adam(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    return model, torch.optim.Adam(model.parameters(), lr=0.05)


def _state(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    moments = [v.clone() for p in model.parameters() for k, v in opt.state.get(p, {}).items() if k != "step"]
    return params, moments


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1])) and len(a[1]) == len(b[1])


def test_finite_steps_are_plain_adam_bit_for_bit_and_a_nan_step_changes_nothing():
    plain, plain_opt = _model_and_adam()
    guarded, guarded_opt = _model_and_adam()
    guard = StepGuard(guarded_opt, list(guarded.parameters()), check_grads=True, device=CPU)
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))

    def loss_of(model, poison=False):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        return loss * float("nan") if poison else loss

    # a NaN first step (Adam's moments do not exist yet): nothing changes, moments stay zero
    before = _state(guarded, guarded_opt)
    loss = loss_of(guarded, poison=True)
    guarded_opt.zero_grad()
    loss.backward()
    guard.step(NO_SCALER, loss, _Batch([0, 1]), 1)
    assert _same(before, ([p.detach() for p in guarded.parameters()], []))
    assert all(not v.any() for p in guarded.parameters() for k, v in guarded_opt.state[p].items() if k != "step")
    with pytest.raises(NonFiniteError, match=r"non-finite loss \(nan\) at epoch 3, step 1; batch of 2 pairs \[0, 1\]; "
                                             r"the cached features of this batch are finite"):
        guard.readback(epoch=3, best_epoch=-1, run_dir="r")
    guarded, guarded_opt = _model_and_adam()
    guard = StepGuard(guarded_opt, list(guarded.parameters()), check_grads=True, device=CPU)
    for step in range(1, 8):
        for model, opt in ((plain, plain_opt), (guarded, guarded_opt)):
            loss = loss_of(model)
            opt.zero_grad()
            loss.backward()
            if opt is plain_opt:
                opt.step()
            else:
                guard.step(NO_SCALER, loss, _Batch([step]), step)
        assert _same(_state(plain, plain_opt), _state(guarded, guarded_opt)), step
    assert guard.readback(epoch=0, best_epoch=-1, run_dir="r", loss=loss) == pytest.approx(float(loss.detach()))
    # a NaN gradient in a later step: parameters and both moments exactly as before it
    before = _state(guarded, guarded_opt)
    loss = loss_of(guarded)
    guarded_opt.zero_grad()
    loss.backward()
    next(guarded.parameters()).grad[0, 0] = float("inf")
    guard.step(NO_SCALER, loss, _Batch([7, 3]), 8)
    assert _same(before, _state(guarded, guarded_opt))
    with pytest.raises(NonFiniteError, match=r"non-finite gradient \(1 of 4 parameter tensors\) at epoch 2, step 8; "
                                             r"batch of 2 pairs \[7, 3\].*best checkpoint so far \(epoch 1\) is left in r"):
        guard.readback(epoch=2, best_epoch=1, run_dir="r")


@pytest.mark.parametrize("features", ["scanned each step", "rebuilt on failure", "rebuilt wrongly"])
def test_readback_names_the_first_bad_step_and_its_pairs_with_nonfinite_features(tmp_path, features):
    write_tiny_cache(tmp_path / "c", TinySpec(splits={"train": 12}, pairs_per_image=4))
    g = zarr.open_group(str(tmp_path / "c"), mode="r+")
    row = int(g["train/image/offsets"][1])
    values = np.asarray(g["train/image/final"][row])
    values[0] = np.nan
    g["train/image/final"][row] = values  # a stored row of image 1 = pairs 4..7
    store = FeatureStore([open_cache(tmp_path / "c").split("train")], Placement("device", "device"), CPU)
    loader = store.batches(batch_size=4, shuffle=False, seed=0, epoch=0)
    model, opt = _model_and_adam()
    guard = StepGuard(opt, list(model.parameters()), check_grads=True, device=CPU)
    for k, batch in enumerate(loader):
        step = k + 1
        loss = model(torch.ones(2, 5)).sum() * (float("nan") if step >= 2 else 1.0)
        opt.zero_grad()
        loss.backward()
        rebuild = {"scanned each step": None, "rebuilt on failure": lambda k=k: loader.batch_at(k),
                   "rebuilt wrongly": lambda k=k: loader.batch_at(k + 1 if k < 2 else 0)}[features]
        guard.step(NO_SCALER, loss, batch, step, rebuild=rebuild)
    cause = (r"the cached features of this batch were not re-checked" if features == "rebuilt wrongly" else
             r"pairs with non-finite cached features: \[4, 5, 6, 7\] in image/final; ")
    with pytest.raises(NonFiniteError, match=r"non-finite loss \(nan\) at epoch 0, step 2; batch of 4 pairs \[4, 5, 6, 7\]; "
                                             + cause):
        guard.readback(epoch=0, best_epoch=-1, run_dir="r")


READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__format__")
PACKAGE = Path(molt_cache.__file__).parent


def _count_reads(monkeypatch) -> list[str]:
    """Patch every Tensor method that hands a value to the host; record callers inside molt_cache
    outside the cache layer (the loaders' index work is host-side by design: numpy, pinned buffers)."""
    calls: list[str] = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, __original=original, __name=name, **k):
            caller = sys._getframe(1).f_code
            path = Path(caller.co_filename)
            if path.is_relative_to(PACKAGE) and not path.is_relative_to(PACKAGE / "cache"):
                calls.append(f"{path.name}:{caller.co_name}:{__name}")
            return __original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize("model", ["baseline", "molt"])
def test_train_heads_reads_the_device_only_at_readbacks(tmp_path, monkeypatch, model):
    """The host reads tensors a fixed number of times per epoch and per evaluation, whatever the
    number of steps or of evaluation batches: none in the step itself."""
    write_tiny_cache(tmp_path / "c", TinySpec(splits={"train": 80, "val": 24}))
    counts = {}
    calls = _count_reads(monkeypatch)
    for batch_size in (2, 8):  # 40 vs 10 steps per epoch, 12 vs 3 evaluation batches
        calls.clear()
        cfg = TrainConfig(cache=[str(tmp_path / "c")], run_dir=str(tmp_path / f"r{batch_size}"), epochs=2,
                          batch_size=batch_size, device="cpu", amp="off", patience=5)
        train_heads(cfg, HeadsConfig(model=model, d_common=8, layers=2, fbp_stride=2))
        counts[batch_size] = list(calls)
    step_code = ("training_step", "step", "_masked_step", "forward", "interact")
    assert not [c for c in counts[2] if c.split(":")[1] in step_code]
    readbacks = [c for c in counts[2] if "readback" in c]
    # steps 1, 21 and 40 of each epoch (LOG_EVERY = 20); the per-epoch extra readback finds nothing pending
    assert LOG_EVERY == 20 and len(readbacks) == 2 * 3
    assert len(counts[2]) - len(counts[8]) == len(readbacks) - 2 * 2, (counts[2], counts[8])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (GPU check)")
def test_guarded_steps_on_cuda_never_synchronize(tmp_path):
    """On a GPU: the store's batches, the forward, backward and guarded step of the baseline heads
    run under torch's sync debug mode "error" (amp off: an fp16 GradScaler reads its flag back, and
    MoLT's eigh checks its result on the host); then one readback gives the CPU run's loss."""
    from molt_cache.heads.model import FeatureDims, build_heads
    from molt_cache.train import heads_config_for, training_step

    write_tiny_cache(tmp_path / "c", TinySpec(splits={"train": 40}))
    reader = open_cache(tmp_path / "c")
    cfg = TrainConfig(cache=[str(tmp_path / "c")], batch_size=8, amp="off")
    losses = {}
    for dev in (torch.device("cpu"), torch.device("cuda")):
        heads_cfg = heads_config_for(reader, HeadsConfig(model="baseline", d_common=8, layers=2))
        torch.manual_seed(0)
        heads = build_heads(heads_cfg, FeatureDims.from_manifest(reader.manifest)).to(dev)
        opt = torch.optim.Adam(heads.parameters(), lr=1e-3)
        guard = StepGuard(opt, list(heads.parameters()), check_grads=True, device=dev)
        loader = FeatureStore([reader.split("train")], Placement("device", "device"), dev).batches(
            batch_size=8, shuffle=True, seed=0, epoch=0)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            for step, batch in enumerate(loader, 1):
                loss, _ = training_step(heads, batch, cfg, heads_cfg, None, None, dev)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                guard.step(NO_SCALER, loss, batch, step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        losses[dev.type] = guard.readback(epoch=0, best_epoch=-1, run_dir="r", loss=loss)
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-4)
