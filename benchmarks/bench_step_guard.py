"""What train-heads' device-side non-finite guard (molt_cache/finite.StepGuard) costs next to the
per-step check it replaced, in one run, side by side: the same heads, batches and Adam, steps
alternating between the two loops. Writes `## Non-finite guard in the training step` in
docs/benchmarks.md.

  before  issue 11's loop: `check_step(loss)` (reads the loss back), backward, `check_step(params)`
          (reads the gradients' verdict back), `optimizer.step()`: two host syncs per step on a GPU.
  after   backward, `StepGuard.step` (loss and gradient flags on the device, the Adam update
          masked with torch.where), one readback every LOG_EVERY steps; as in train.py the batch's
          features are scanned only if the step failed (the loader makes that batch again). The
          table also gives what a per-step feature scan on the device would add (the guard's mode
          without `rebuild`).

On the CPU a "sync" costs nothing, so this measures the guard's added device work (the copies of
parameters and Adam moments, the feature scan); what it saves on a GPU (a host round trip per
step) needs the GPU run.

    python -m benchmarks guard [--steps 40] [--rounds 3] [--batch 32] [--threads 1] [--no-doc]
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import time

import torch

from benchmarks.report import replace_section
from molt_cache.batch import FeatureBatch
from molt_cache.config import HeadsConfig, TrainConfig
from molt_cache.finite import StepGuard, check_step, nonfinite_pair_mask
from molt_cache.heads.model import FeatureDims, build_heads
from molt_cache.train import LOG_EVERY, training_step

CPU = torch.device("cpu")
# Small widths that finish in about a minute on two shared cores (not the paper's).
TEXT_WIDTH, IMAGE_WIDTH, TEXT_TOKENS, IMAGE_TOKENS, LAYERS, CLASSES = 256, 192, 15, 50, 4, 3


def make_batches(n: int, batch: int, seed: int = 0) -> list[FeatureBatch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        text = [torch.randn(batch, TEXT_TOKENS, TEXT_WIDTH, generator=g) for _ in range(LAYERS)]
        image = [torch.randn(batch, IMAGE_TOKENS, IMAGE_WIDTH, generator=g) for _ in range(LAYERS)]
        out.append(FeatureBatch(
            text_layers=text, text_final=text[-1], text_pooled=torch.randn(batch, TEXT_WIDTH, generator=g),
            text_mask=torch.ones(batch, TEXT_TOKENS, dtype=torch.bool), image_layers=image,
            image_final=torch.randn(batch, IMAGE_TOKENS, IMAGE_WIDTH, generator=g),
            image_pooled=torch.randn(batch, IMAGE_WIDTH, generator=g),
            image_mask=torch.ones(batch, IMAGE_TOKENS, dtype=torch.bool),
            targets=torch.randint(0, CLASSES, (batch,), generator=g), index=torch.arange(k * batch, (k + 1) * batch),
            text_present=torch.ones(batch, dtype=torch.bool), image_present=torch.ones(batch, dtype=torch.bool)))
    return out


def run(mode: str, heads0, heads_cfg, batches, steps: int) -> tuple[float, float, float]:
    """Seconds for `steps` training steps in `mode`, of which seconds in the part that differs
    (the checks and the optimizer step), and the last loss (read at the end)."""
    heads = copy.deepcopy(heads0)
    params = list(heads.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    guard = StepGuard(opt, params, check_grads=True, device=CPU)
    cfg = TrainConfig()
    where = dict(epoch=0, best_epoch=-1, run_dir="bench")
    differing = 0.0
    t = time.perf_counter()
    for step in range(1, steps + 1):
        batch = batches[(step - 1) % len(batches)]
        loss, _ = training_step(heads, batch, cfg, heads_cfg, None, None, CPU)
        if mode == "before":
            t0 = time.perf_counter()
            check_step(loss=loss, step=step, batch=batch, **where)
            differing += time.perf_counter() - t0
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t0 = time.perf_counter()
            check_step(params=params, step=step, batch=batch, **where)
            opt.step()
            differing += time.perf_counter() - t0
        else:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t0 = time.perf_counter()
            # as train.py: the batch is made again only if this step fails (`batch_at`), no scan per step
            guard.step(scaler, loss, batch, step, rebuild=lambda k=(step - 1) % len(batches): batches[k])
            if step % LOG_EVERY == 1:
                guard.readback(loss=loss, **where)
            differing += time.perf_counter() - t0
    t0 = time.perf_counter()
    guard.readback(**where)
    differing += time.perf_counter() - t0
    return time.perf_counter() - t, differing, float(loss.detach())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks guard")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--d-common", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = make_batches(8, args.batch)
    dims = FeatureDims(text_layer_widths=[TEXT_WIDTH] * LAYERS, image_layer_widths=[IMAGE_WIDTH] * LAYERS,
                       text_final_width=TEXT_WIDTH, image_final_width=IMAGE_WIDTH)
    rows = []
    for model in ("molt", "baseline"):
        heads_cfg = HeadsConfig(model=model, d_common=args.d_common, layers=LAYERS, fbp_stride=4,
                                num_classes=CLASSES)
        heads0 = build_heads(heads_cfg, dims)
        n_params = sum(p.numel() for p in heads0.parameters())
        times = {"before": [], "after": []}
        parts = {"before": [], "after": []}
        losses = {}
        run("after", heads0, heads_cfg, batches, 3)  # warm-up
        for _ in range(args.rounds):
            for mode in ("before", "after"):
                seconds, differing, losses[mode] = run(mode, heads0, heads_cfg, batches, args.steps)
                times[mode].append(seconds)
                parts[mode].append(differing)
        scan = min(_time(lambda: nonfinite_pair_mask(batches[0])) for _ in range(5))
        before, after = min(times["before"]), min(times["after"])
        rows.append({"model": model, "params": n_params, "before": args.steps / before, "after": args.steps / after,
                     "part_before_ms": 1e3 * min(parts["before"]) / args.steps,
                     "part_after_ms": 1e3 * min(parts["after"]) / args.steps,
                     "scan_ms": 1e3 * scan, "step_ms_after": 1e3 * after / args.steps,
                     "same_loss": losses["before"] == losses["after"]})
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = ["## Non-finite guard in the training step", "",
             f"`python -m benchmarks guard --steps {args.steps} --rounds {args.rounds} --batch {args.batch} "
             f"--threads {args.threads}` "
             f"(benchmarks/bench_step_guard.py): {args.steps} training steps per round, best of {args.rounds} "
             f"rounds, loops alternating; random features, text {LAYERS} × {TEXT_WIDTH} × {TEXT_TOKENS} tokens, "
             f"image {LAYERS} + final × {IMAGE_WIDTH} × {IMAGE_TOKENS} tokens, batch {args.batch}, d_c "
             f"{args.d_common}, fp32, Adam; {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} torch threads, load average {load:.1f}.", "",
             "*before*: issue 11's per-step `check_step` of the loss and of the gradients (two host reads per "
             "step); *after*: `StepGuard` as train.py uses it (flags on the device, Adam update masked with "
             f"`torch.where`, one read every {LOG_EVERY} steps, a failed step's batch made again to name its bad "
             "pairs). On the CPU a read costs nothing: the ratio is the guard's added work; the host round trips "
             "it removes matter on a GPU (not measured here). *Scan*: what checking every batch's features on "
             "the device each step would add instead (not used).", "",
             "*Checks + Adam*: the part of a step that differs (before: both `check_step` and `opt.step()`; "
             "after: `StepGuard.step` and its readbacks), ms per step.", "",
             "| heads | parameters | steps/s before | steps/s after | after / before | checks + Adam before | "
             "checks + Adam after | scan per step (not used) | same last loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params']:,} | {r['before']:.2f} | {r['after']:.2f} | "
                     f"{r['after'] / r['before']:.3f} | {r['part_before_ms']:.2f} ms | {r['part_after_ms']:.2f} ms | "
                     f"{r['scan_ms']:.2f} ms ({100 * r['scan_ms'] / r['step_ms_after']:.1f} %) "
                     f"| {'yes' if r['same_loss'] else 'NO'} |")
    body = "\n".join(lines) + "\n"
    print(body)
    if not args.no_doc:
        replace_section("## Non-finite guard in the training step", body)


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
