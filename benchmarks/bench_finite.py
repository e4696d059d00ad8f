"""What stage one's non-finite check (molt_cache/finite.py `check_batch`) costs next to the encoding
it guards, in one run: the shipped encoders' `encode` of a batch vs `check_batch` of its outputs
(real tokens, cast to the storage dtype). Writes `## Non-finite check` in docs/benchmarks.md.

    python -m benchmarks finite [--repeats 5] [--batch 32]
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from benchmarks.report import replace_section
from molt_cache.encoders import create_image_encoder, create_text_encoder
from molt_cache.finite import check_batch


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(enc, inputs, modality: str, n: int, repeats: int) -> dict:
    with torch.inference_mode():
        out = enc.encode(inputs)
        arrays = {f"layer_{i}": t for i, t in enumerate(out.layers)}
        if not out.final_is_last_layer:
            arrays["final"] = out.final
        t_enc = best_of(lambda: enc.encode(inputs), repeats)
        t_chk = best_of(lambda: check_batch(modality, list(range(n)), out.mask.cpu(), arrays, out.pooled,
                                            enc.identity.dtype), repeats)
    return {"encode_ms": 1e3 * t_enc, "check_ms": 1e3 * t_chk, "ratio": t_chk / t_enc,
            "values": sum(int(t.numel()) for t in arrays.values()) + int(out.pooled.numel())}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks finite")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    text = create_text_encoder("shipped:smollm2", layers=4)
    image = create_image_encoder("shipped:efficientnet-lite0", layers=4)
    ids = text.tokenize(["a photo of a dog playing in the park with a red ball and some friends"] * args.batch)
    from PIL import Image

    px = torch.stack([image.transform(Image.new("RGB", (256, 256), (40 * k % 255, 90, 160)))
                      for k in range(args.batch)])
    rows = {"text (SmolLM2-135M)": measure(text, ids, "text", args.batch, args.repeats),
            "image (EfficientNet-Lite0)": measure(image, px, "image", args.batch, args.repeats)}
    lines = ["## Non-finite check", "",
             f"`python -m benchmarks finite --batch {args.batch} --repeats {args.repeats}`: one batch of "
             f"{args.batch}, best of {args.repeats}; {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} torch threads, fp32, CPU. `check_batch` reads every stored value "
             "of the batch once (real tokens, cast to the storage dtype) before the unit is written.", "",
             "| encoder | values checked | encode (ms) | check (ms) | check / encode |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['values']:,} | {r['encode_ms']:.1f} | {r['check_ms']:.2f} | "
                     f"{100 * r['ratio']:.2f} % |")
    body = "\n".join(lines) + "\n"
    print(body)
    if not args.no_write:
        replace_section("## Non-finite check", body)


if __name__ == "__main__":
    main()
