"""What projecting only the real text tokens (molt_cache/heads/molt.py: `real_token_rows`,
`packed_linear`) saves in a training step next to projecting the padded batch, in one run, side by
side: the same heads, batches and Adam, steps alternating between the two. Writes `## Text
projections on real tokens only` in docs/benchmarks.md.

Texts are padded to the batch's longest; real text lengths are skewed, so most of a padded batch
is padding. Two shapes:
  openclipart  the shipped encoders on OpenClipart (docs/results.md): text 4 layers × 576 (final =
               last layer), image 4 stages [80, 112, 192, 320] + final 1280 × 49 tokens; text lengths
               log-normal with OpenClipart's train median (11 tokens) and 90th percentile (27),
               capped at 276 (its longest); d_c 64, batch 64.
  snli         SNLI-VE-like short hypotheses at the scale benchmark's cpu widths (paper / 2): text
               4 × 2048, lengths log-normal, median 14, 90th percentile 22, capped at 60; image
               4 + final × 512 × 257 tokens; d_c 256, batch 32 (smaller than the paper's: CPU time).

    python -m benchmarks packing [--steps 12] [--rounds 3] [--threads 1] [--shape openclipart,snli] [--no-doc]
"""
from __future__ import annotations

import argparse
import copy
import math
import platform
import time

import torch

from benchmarks.report import replace_section
from molt_cache.batch import FeatureBatch
from molt_cache.config import HeadsConfig, TrainConfig
from molt_cache.heads import molt as molt_layer
from molt_cache.heads.model import FeatureDims, build_heads
from molt_cache.train import training_step

CPU = torch.device("cpu")
DEFAULT_PACK_BELOW = molt_layer.PACK_BELOW  # the library's threshold: the packed side runs as shipped
CLASSES = 14
SHAPES = {
    "openclipart": dict(text_widths=[576] * 4, image_widths=[80, 112, 192, 320], image_final=1280,
                        image_tokens=49, median=11, p90=27, longest=276, d_common=64, batch=64),
    "snli": dict(text_widths=[2048] * 4, image_widths=[512] * 4, image_final=512,
                 image_tokens=257, median=14, p90=22, longest=60, d_common=256, batch=32),
}


def text_lengths(n: int, median: float, p90: float, longest: int, g: torch.Generator) -> torch.Tensor:
    sigma = (math.log(p90) - math.log(median)) / 1.2815515655446004  # z of the 90th percentile
    z = torch.randn(n, generator=g, dtype=torch.float64)
    return (median * torch.exp(sigma * z)).round().clamp(1, longest).long()


def make_batches(shape: dict, n: int, seed: int = 0) -> list[FeatureBatch]:
    g = torch.Generator().manual_seed(seed)
    b, ti = shape["batch"], shape["image_tokens"]
    out = []
    for k in range(n):
        lengths = text_lengths(b, shape["median"], shape["p90"], shape["longest"], g)
        tt = int(lengths.max())
        text_mask = torch.arange(tt)[None] < lengths[:, None]
        text = [torch.randn(b, tt, w, generator=g) * text_mask[..., None] for w in shape["text_widths"]]
        image = [torch.randn(b, ti, w, generator=g) for w in shape["image_widths"]]
        out.append(FeatureBatch(
            text_layers=text, text_final=text[-1], text_pooled=torch.randn(b, 8, generator=g), text_mask=text_mask,
            image_layers=image, image_final=torch.randn(b, ti, shape["image_final"], generator=g),
            image_pooled=torch.randn(b, 8, generator=g), image_mask=torch.ones(b, ti, dtype=torch.bool),
            targets=torch.randint(0, CLASSES, (b,), generator=g), index=torch.arange(k * b, (k + 1) * b),
            text_present=torch.ones(b, dtype=torch.bool), image_present=torch.ones(b, dtype=torch.bool)))
    return out


def run(pack: bool, heads0, heads_cfg, batches, steps: int) -> tuple[float, float, torch.Tensor]:
    """Seconds for `steps` training steps (forward, backward, Adam), the last loss, and the
    first batch's eval logits afterwards."""
    molt_layer.PACK_BELOW = DEFAULT_PACK_BELOW if pack else -1.0  # -1: never pack
    heads = copy.deepcopy(heads0)
    opt = torch.optim.Adam(heads.parameters(), lr=1e-3)
    cfg = TrainConfig()
    t = time.perf_counter()
    for step in range(steps):
        loss, _ = training_step(heads, batches[step % len(batches)], cfg, heads_cfg, None, None, CPU)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t
    heads.eval()
    with torch.no_grad():
        logits = heads(batches[0]).logits
    return seconds, float(loss.detach()), logits


def bench(shape_name: str, steps: int, rounds: int) -> list[dict]:
    shape = SHAPES[shape_name]
    batches = make_batches(shape, 4)
    real = float(sum(int(b.text_mask.sum()) for b in batches) / sum(b.text_mask.numel() for b in batches))
    dims = FeatureDims(text_layer_widths=shape["text_widths"], image_layer_widths=shape["image_widths"],
                       text_final_width=shape["text_widths"][-1], image_final_width=shape["image_final"])
    rows = []
    for model in ("molt", "baseline"):
        torch.manual_seed(0)
        heads_cfg = HeadsConfig(model=model, d_common=shape["d_common"], num_classes=CLASSES, dropout=0.0)
        heads0 = build_heads(heads_cfg, dims)
        best = {True: math.inf, False: math.inf}
        out = {}
        for _ in range(rounds):  # alternate, so both see the same load
            for pack in (False, True):
                s, loss, logits = run(pack, heads0, heads_cfg, batches, steps)
                best[pack] = min(best[pack], s)
                out[pack] = (loss, logits)
        molt_layer.PACK_BELOW = DEFAULT_PACK_BELOW
        rows.append(dict(shape=shape_name, model=model, real_share=real, steps=steps,
                         padded_steps_s=steps / best[False], packed_steps_s=steps / best[True],
                         ratio=best[False] / best[True],
                         dlogits=float((out[True][1] - out[False][1]).abs().max()),
                         loss_padded=out[False][0], loss_packed=out[True][0]))
    return rows


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks packing")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shape", default="openclipart,snli")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.shape.split(","):
        rows += bench(name, args.steps, args.rounds)
    head = ("| shape | heads | real share of padded text tokens | steps/s padded | steps/s real tokens only "
            "| speed-up | max abs Δ logits after training | last loss padded / packed |\n|---|---|---|---|---|---|---|---|\n")
    table = head + "".join(
        f"| {r['shape']} | {r['model']} | {r['real_share']:.2f} | {r['padded_steps_s']:.2f} | "
        f"{r['packed_steps_s']:.2f} | {r['ratio']:.2f}× | {r['dlogits']:.1e} | "
        f"{r['loss_padded']:.5f} / {r['loss_packed']:.5f} |\n" for r in rows)
    print(table)
    if args.no_doc:
        return
    import os
    load = os.getloadavg()[0]
    body = (f"`python -m benchmarks packing --steps {args.steps} --rounds {args.rounds} --threads {args.threads}` "
            f"(benchmarks/bench_text_packing.py): training steps (forward, backward, Adam) on in-memory batches, "
            f"best of {args.rounds} rounds, the two paths alternating; {platform.machine()}, {args.threads} torch "
            f"thread(s), fp32, CPU, load average {load:.1f}. *padded*: every text projection (MoLT's W_t per "
            "layer, the fusion's text keys and values) over the batch padded to its longest text; *real tokens "
            "only*: the same products on the real rows (`real_token_rows`, `packed_linear`), the default on a "
            "CPU whenever at most 80 % of the padded tokens are real. Shapes in the module's docstring.\n\n"
            + table)
    replace_section("## Text projections on real tokens only", body)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
