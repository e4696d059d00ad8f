"""What grouping training batches by image (`--pairs-per-image K`) does to accuracy and to the
held-out canonical correlations, on a synthetic SNLI-VE-like cache with a learnable pair task.

The cache: each image u has a latent a_u, each pair p a text latent c_p (both N(0, I_8)); the label
is entailment-like, a function of the pair: s = a_u·c_p/√8, label 0 if s < -0.43, 2 if s > 0.43,
else 1 (about a third each). Token features are per-layer random projections of the latent plus
N(0, 0.5²) noise per token (image: 16 tokens, 4 layers + final; text: 4–10 tokens, 4 layers), 32
wide, fp16, 18 pairs per image, pairs stored image by image (as SNLI-VE lists them). For each K
and seed, `train_heads` (MoLT, d_c 32, batch 72, Adam 1e-3, fixed epochs) from the feature store;
reported: val accuracy of the best epoch, held-out mean top-k canonical correlation per layer
(`held_out_correlations` over the val split), distinct images per training batch, seconds.

Run: python -m benchmarks grouping [--epochs N] [--seeds 0,1] [--no-doc]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from benchmarks.bench_loader import _array, _ident
from benchmarks.report import replace_section
from molt_cache.cache.reader import open_cache
from molt_cache.cache.store import FeatureStore, Placement
from molt_cache.config import HeadsConfig, TrainConfig
from molt_cache.train import train_heads

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
SECTION = "## Grouping batches by image: accuracy and held-out CCA"
LATENT, WIDTH, LAYERS, IMAGE_TOKENS, PPI = 8, 32, 4, 16, 18
THRESHOLD = 0.43  # |s| cut giving about a third of pairs per class


def write_task_cache(path: Path, images: dict[str, int], seed: int = 0, shuffled: bool = False) -> None:
    """shuffled: pairs stored in random order (else image by image, as SNLI-VE lists them)."""
    rng = np.random.default_rng(seed)
    proj = {m: [rng.standard_normal((LATENT, WIDTH)) / np.sqrt(LATENT) for _ in range(LAYERS + 1)]
            for m in ("text", "image")}
    root = zarr.open_group(str(path), mode="w-")
    counts = {}
    for split, n_images in images.items():
        g = root.create_group(split)
        pairs = n_images * PPI
        a = rng.standard_normal((n_images, LATENT))
        c = rng.standard_normal((pairs, LATENT))
        image_index = np.arange(pairs) // PPI
        if shuffled:
            image_index = rng.permutation(image_index)
        s = (a[image_index] * c).sum(1) / np.sqrt(LATENT)
        target = np.where(s < -THRESHOLD, 0, np.where(s > THRESHOLD, 2, 1)).astype(np.int64)
        _array(g, "pairs/text_index", np.arange(pairs, dtype=np.int64))
        _array(g, "pairs/image_index", image_index.astype(np.int64))
        _array(g, "pairs/target", target)
        sid = g.create_array("pairs/sample_id", shape=(pairs,), dtype=str, chunks=(pairs,))
        sid[:] = np.array([f"{split}{i}" for i in range(pairs)], dtype=object)
        t_len = rng.integers(4, 11, pairs)
        for modality, latent, lengths, final_is_last in (
                ("text", c, t_len, True), ("image", a, np.full(n_images, IMAGE_TOKENS), False)):
            off = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            owner = np.repeat(np.arange(len(lengths)), lengths)
            _array(g, f"{modality}/offsets", off)
            names = [f"layer_{k}" for k in range(LAYERS)] + ([] if final_is_last else ["final"])
            for k, name in enumerate(names):
                tokens = latent[owner] @ proj[modality][k] + 0.5 * rng.standard_normal((len(owner), WIDTH))
                _array(g, f"{modality}/{name}", tokens.astype(np.float16))
            _array(g, f"{modality}/pooled", (latent @ proj[modality][-1]).astype(np.float16))
        keys = g.create_array("image/image_key", shape=(n_images,), dtype=str, chunks=(n_images,))
        keys[:] = np.array([f"{split}-img{k}" for k in range(n_images)], dtype=object)
        counts[split] = {"pairs": pairs, "texts": pairs, "images": n_images,
                         "text_tokens": int(t_len.sum()), "image_tokens": n_images * IMAGE_TOKENS}
    manifest = {
        "format_version": 1, "molt_cache_version": "0.1.0",
        "dataset": {"name": "grouping-task", "root": "", "task": "single-label",
                    "labels": ["contradiction", "neutral", "entailment"], "fingerprint": "grouping"},
        "splits": counts,
        "text": _ident("text", [WIDTH] * LAYERS, WIDTH, WIDTH, True),
        "image": _ident("image", [WIDTH] * LAYERS, WIDTH, WIDTH, False),
        "perturbation": {"level": "none", "noise": 0.0, "noise_on": "both", "empty": None, "seed": 0},
        "complete": True,
    }
    manifest["image"]["pooled_width"] = WIDTH
    root.attrs["molt_cache"] = manifest
    (path / "manifest.json").write_text(json.dumps(manifest))


def distinct_images_per_batch(cache: Path, batch_size: int, k: int) -> float:
    store = FeatureStore([open_cache(cache).split("train")], Placement("device", "device"), "cpu")
    sizes = [b.image_layers[0].shape[0] for b in store.batches(batch_size=batch_size, shuffle=True,
                                                             seed=0, epoch=0, pairs_per_image=k)]
    return float(np.mean(sizes))


# (order label, pairs stored shuffled?, --pairs-per-image, epochs multiplier). The last row gives
# K=18 the epochs that image-once buys at the paper's widths for the same compute (~4x, docs/benchmarks.md).
VARIANTS = (("block order, pairs stored shuffled", True, 0, 1), ("block order, pairs stored by image", False, 0, 1),
            ("grouped K=6", False, 6, 1), ("grouped K=18", False, 18, 1),
            ("grouped K=18, 4× the epochs", False, 18, 4))


def run(epochs: int = 12, seeds: tuple[int, ...] = (0, 1), batch_size: int = 72,
        variants: tuple[int, ...] | None = None) -> list[dict]:
    """variants: indices into VARIANTS (None = all)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-grouping-") as tmp:
        caches = {flag: Path(tmp) / f"cache-{flag}" for flag in (True, False)}
        for flag, path in caches.items():
            write_task_cache(path, {"train": 100, "val": 20}, shuffled=flag)
        for v, (label, flag, k, mult) in enumerate(VARIANTS):
            if variants is not None and v not in variants:
                continue
            cache = caches[flag]
            distinct = distinct_images_per_batch(cache, batch_size, k)
            for seed in seeds:
                cfg = TrainConfig(cache=[str(cache)], run_dir=str(Path(tmp) / f"k{k}-{flag}-s{seed}"),
                                  epochs=epochs * mult, batch_size=batch_size, lr=1e-3, seed=seed,
                                  device="cpu", amp="off", patience=epochs * mult, pairs_per_image=k)
                t0 = time.perf_counter()
                result = train_heads(cfg, HeadsConfig(d_common=32, layers=LAYERS, fbp_stride=4))
                seconds = time.perf_counter() - t0
                metrics = json.loads((result.run_dir / "metrics.json").read_text())
                cca = metrics["val_canonical_correlations"]
                rows.append({"order": label, "k": k, "seed": seed, "epochs": epochs * mult, "distinct_images": distinct,
                             "val_accuracy": result.val["accuracy"], "best_epoch": result.best_epoch,
                             "cca_per_layer": cca.get("per_layer"), "cca_top_k": cca.get("top_k"),
                             "seconds": seconds})
                print(rows[-1], flush=True)
    return rows


def section(rows: list[dict], epochs: int) -> str:
    lines = [SECTION, "",
             f"`python -m benchmarks grouping`: synthetic SNLI-VE-like cache (100 train / 20 val images, "
             f"{PPI} pairs each, an entailment-like label from the image and text latents; "
             "benchmarks/bench_grouping.py), MoLT heads d_c 32, batch 72, Adam 1e-3, "
             f"{epochs} epochs unless the row says otherwise, CPU. *held-out CCA*: mean of the top-16 canonical correlations of the "
             "val split's pooled common states, per layer, then averaged over layers.", "",
             "| training order | --pairs-per-image | distinct images / batch | seed | val accuracy | held-out CCA | best epoch | s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"{r['order']} | {r['k']}"
        cca = "n/a" if r["cca_per_layer"] is None else f"{np.mean(r['cca_per_layer']):.3f}"
        lines.append(f"| {name} | {r['distinct_images']:.1f} | {r['seed']} | "
                     f"{100 * r['val_accuracy']:.2f} | {cca} | {r['best_epoch']} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks grouping", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--json", default=None)
    ap.add_argument("--variants", default=None, help="comma-separated indices into VARIANTS (default: all)")
    ap.add_argument("--out", default=str(DOC))
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args(argv)
    variants = None if a.variants is None else tuple(int(v) for v in a.variants.split(","))
    rows = run(a.epochs, tuple(int(s) for s in a.seeds.split(",")), variants=variants)
    text = section(rows, a.epochs)
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    if not a.no_doc:
        replace_section(SECTION, text, Path(a.out))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
