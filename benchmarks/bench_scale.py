"""Stage two at the paper's scale: today's loaders vs the feature store, and one
training epoch with per-pair vs image-once compute, on a synthetic SNLI-VE-shaped cache.

In one run, side by side:
  loaders  today's streaming and in-memory `make_loader` (float32 per pair on the host, each
           shared image copied once per pair) vs the feature store placed on the device, in host
           RAM and mixed (text in host RAM, images on the device): pairs/s delivered to the device,
           and bytes per pair that cross (or would cross, on a CPU) from host to device.
  epoch    one training epoch of MoLT heads from the device store with batches grouped by image
           (`--pairs-per-image`), per-pair compute (`batch.per_pair()`) vs image-once, their steps
           alternating on the same batches (heads seeded alike, each its own Adam); FLOPs per
           pair counted by torch's FlopCounterMode (forward + backward), max |Δ logits| of the
           first batch from identically seeded heads.
  memory   peak memory of each placement, each in a fresh process (RSS growth; on CUDA also
           peak device memory), on the cache and on one twice its size (streaming stays flat).

Presets (`--preset`):
  tiny    seconds on a CPU (test of the benchmark itself)
  cpu     the paper's shapes with every width / 2 (text 4 × 2048, image 5 × 512 × 257 tokens),
          d_c 512 (the paper's balance of image-side to per-pair work, at 1/4 of the FLOPs):
          minutes on 2 CPU cores
  paper   SNLI-VE with the paper's encoders: text LLaMA-7B 4 layers × 4096, ~15 tokens; image
          CLIP ViT-L/14 4 layers + final × 1024 × 257 tokens; 18 pairs per image; fp16; d_c 1024
          (for a GPU)

Run: python -m benchmarks scale [--device cpu|cuda] [--preset cpu|paper|tiny] [--json PATH]
     [--pairs N] [--no-doc] [--no-memory]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from benchmarks.bench_loader import write_bench_cache
from benchmarks.report import replace_section
from molt_cache.cache.loader import make_loader
from molt_cache.cache.reader import open_cache
from molt_cache.cache.store import FeatureStore, Placement
from molt_cache.config import HeadsConfig, TrainConfig
from molt_cache.heads.model import FeatureDims, build_heads
from molt_cache.train import heads_config_for, seed_everything, training_step

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


@dataclass
class Preset:
    pairs: int  # pairs in the synthetic cache
    pairs_per_image: int
    text_layers: int
    text_width: int
    text_tokens: int  # mean; lengths uniform in [t/2, 3t/2]
    image_width: int
    image_tokens: int
    d_common: int
    batch_size: int
    loader_batches: int  # batches timed per loader (today's loaders are slow at paper widths)
    train_pairs: int  # pairs in the timed training epoch


PRESETS = {
    "tiny": Preset(pairs=360, pairs_per_image=18, text_layers=4, text_width=64, text_tokens=15,
                   image_width=32, image_tokens=17, d_common=32, batch_size=72, loader_batches=5,
                   train_pairs=360),
    "cpu": Preset(pairs=1800, pairs_per_image=18, text_layers=4, text_width=2048, text_tokens=15,
                  image_width=512, image_tokens=257, d_common=512, batch_size=72, loader_batches=25,
                  train_pairs=360),
    "paper": Preset(pairs=2304, pairs_per_image=18, text_layers=4, text_width=4096, text_tokens=15,
                    image_width=1024, image_tokens=257, d_common=1024, batch_size=72,
                    loader_batches=16, train_pairs=2304),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _float32_bytes(batch) -> int:
    """float32 bytes of a per-pair batch as today's loaders hand it over (what .to(cuda) copies)."""
    seen, total = set(), 0
    for t in [*batch.text_layers, batch.text_final, batch.text_pooled, batch.text_mask,
              *batch.image_layers, batch.image_final, batch.image_pooled, batch.image_mask,
              batch.targets, batch.index]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.nbytes
    return total


def _time_loader(batches, device: torch.device, limit: int, count_bytes: bool) -> dict:
    t0 = time.perf_counter()
    pairs = moved = 0
    for k, batch in enumerate(batches):
        if k >= limit:
            break
        if count_bytes:
            moved += _float32_bytes(batch)
        batch = batch.to(device, non_blocking=True)
        pairs += batch.size
    _sync(device)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "pairs": pairs, "pairs_per_s": pairs / seconds, "bytes": moved}


def loaders(split, device: torch.device, p: Preset) -> dict:
    """pairs/s delivered to `device` and host->device bytes per pair, per loader."""
    # as train-heads runs today's loaders: page-locked batches only when they go to a GPU
    kw = dict(batch_size=p.batch_size, shuffle=True, seed=0, epoch=0, num_workers=0,
              pin_memory=device.type == "cuda")
    out = {}
    grouped = f"grouped K={p.pairs_per_image}"
    # i.i.d. order (the default): nearly every pair brings its own image; grouped by image (the
    # order of the training epoch below, `--pairs-per-image`): a batch holds B/K images
    for order, ppi in (("i.i.d.", 0), (grouped, p.pairs_per_image)):
        for name, in_memory in (("today streaming", False), ("today in memory", True)):
            name = name if not ppi else f"{name}, {grouped}"
            t0 = time.perf_counter()
            loader = make_loader([split], in_memory=in_memory, pairs_per_image=ppi, **kw)
            next(iter(make_loader([split], in_memory=in_memory, pairs_per_image=ppi, **kw)))  # load, untimed
            load = time.perf_counter() - t0
            r = min((_time_loader(make_loader([split], in_memory=in_memory, pairs_per_image=ppi, **kw)
                                  if rep else loader, device, p.loader_batches, count_bytes=True)
                     for rep in range(2)), key=lambda x: x["seconds"])  # best of two, as for the store
            out[name] = {**r, "load_s": load, "bytes_per_pair": r["bytes"] / r["pairs"], "order": order}
    for name, placement, ppi in (("store device", Placement("device", "device"), 0),
                                 (f"store device, {grouped}", Placement("device", "device"), p.pairs_per_image),
                                 ("store host", Placement("host", "host"), 0),
                                 ("store mixed (text host, image device)", Placement("host", "device"), 0)):
        t0 = time.perf_counter()
        store = FeatureStore([split], placement, device)
        _sync(device)
        load = time.perf_counter() - t0
        epoch_kw = dict(batch_size=p.batch_size, shuffle=True, seed=0, pairs_per_image=ppi)
        list(zip(range(1), store.batches(epoch=1, **epoch_kw)))
        before = store.bytes_to_device
        # the store is fast: time a whole epoch, best of two (the cores are shared)
        r = min((_time_loader(store.batches(epoch=0, **epoch_kw), device, 1 << 30, count_bytes=False)
                 for _ in range(2)), key=lambda x: x["seconds"])
        moved = (store.bytes_to_device - before) // 2
        out[name] = {**r, "bytes": moved, "load_s": load, "bytes_per_pair": moved / r["pairs"],
                     "stored_bytes": store.nbytes(), "order": grouped if ppi else "i.i.d."}
        if placement.text == "device":
            # on a GPU the host's whole share of a device-placed batch is preparing its indices
            order = store.batches(epoch=0, **epoch_kw).global_ids
            t0 = time.perf_counter()
            for k in range(0, len(order), p.batch_size):
                store.host_indices(order[k:k + p.batch_size])
            seconds = time.perf_counter() - t0
            out[f"{name}, host share only"] = {
                "seconds": seconds, "pairs": len(order), "pairs_per_s": len(order) / seconds,
                "bytes": 0, "load_s": 0.0, "bytes_per_pair": out[name]["bytes_per_pair"],
                "order": out[name]["order"]}
        del store
    return out


def _flops_per_pair(step, batch) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(batch)
    return counter.get_total_flops() / batch.size


class _Step:
    def __init__(self, heads_cfg: HeadsConfig, dims: FeatureDims, device: torch.device,
                 amp: torch.dtype | None, per_pair: bool):
        seed_everything(0)
        self.heads = build_heads(heads_cfg, dims).to(device).train()
        self.opt = torch.optim.Adam(self.heads.parameters(), lr=4e-4)
        self.cfg = TrainConfig(device=str(device), amp="off")
        self.heads_cfg, self.device, self.amp, self.per_pair = heads_cfg, device, amp, per_pair

    def __call__(self, batch):
        if self.per_pair:
            batch = batch.per_pair()
        loss, _ = training_step(self.heads, batch, self.cfg, self.heads_cfg, None, self.amp, self.device)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss

    @torch.no_grad()
    def logits(self, batch):
        self.heads.eval()
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            out = self.heads(batch.per_pair() if self.per_pair else batch).logits.float()
        self.heads.train()
        return out


def training_epoch(split, reader, device: torch.device, p: Preset, amp: torch.dtype | None) -> dict:
    heads_cfg = heads_config_for(reader, HeadsConfig(d_common=p.d_common, layers=p.text_layers))
    dims = FeatureDims.from_manifest(reader.manifest)
    store = FeatureStore([split], Placement("device", "device"), device)
    steps = max(1, p.train_pairs // p.batch_size)

    def epoch_batches():
        return store.batches(batch_size=p.batch_size, shuffle=True, seed=0, epoch=0,
                             pairs_per_image=p.pairs_per_image)

    first = next(iter(epoch_batches()))
    out = {"steps": steps, "batch_size": p.batch_size, "pairs_per_image": p.pairs_per_image,
           "distinct_images_first_batch": int(first.image_layers[0].shape[0])}
    logits, steppers, flops = {}, {}, {}
    for name, per_pair in (("per-pair", True), ("image-once", False)):
        logits[name] = _Step(heads_cfg, dims, device, amp, per_pair).logits(first)
        warm = _Step(heads_cfg, dims, device, amp, per_pair)
        warm(first)  # untimed: allocator, kernels
        flops[name] = _flops_per_pair(warm, first)
        steppers[name] = _Step(heads_cfg, dims, device, amp, per_pair)
    # The two paths take their steps alternately on the same batches, so load from other jobs on
    # shared cores falls on both alike.
    seconds = dict.fromkeys(steppers, 0.0)
    pairs, loss = 0, {}
    for k, batch in enumerate(epoch_batches()):
        if k >= steps:
            break
        for name, step in steppers.items():
            _sync(device)
            t0 = time.perf_counter()
            loss[name] = step(batch)
            _sync(device)
            seconds[name] += time.perf_counter() - t0
        pairs += batch.size
    for name in steppers:
        out[name] = {"seconds": seconds[name], "pairs": pairs, "pairs_per_s": pairs / seconds[name],
                     "flops_per_pair": flops[name], "last_loss": float(loss[name].detach())}
    out["max_abs_logit_diff"] = float((logits["per-pair"] - logits["image-once"]).abs().max())
    out["speedup"] = out["per-pair"]["seconds"] / out["image-once"]["seconds"]
    return out


# -- peak memory, one fresh process per placement ---------------------------------------------------

def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS, so imports'
    transient peaks are not charged to the epoch."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_child(cache: str, placement: str, device: str, batch_size: int) -> dict:
    """Runs in a fresh process: one shuffled epoch from `placement`; RSS growth over the
    process's own baseline (after imports), and peak device memory on CUDA."""
    torch.set_num_threads(1)
    dev = torch.device(device)
    split = open_cache(cache).split("train")
    _reset_peak_rss()
    base = _status_bytes("VmRSS")
    if placement == "stream":
        batches = make_loader([split], batch_size=batch_size, shuffle=True, seed=0, epoch=0,
                              in_memory=False, num_workers=0, pin_memory=False)
    else:
        text, image = {"device": ("device", "device"), "host": ("host", "host"),
                       "mixed": ("host", "device")}[placement]
        batches = FeatureStore([split], Placement(text, image), dev).batches(
            batch_size=batch_size, shuffle=True, seed=0, epoch=0)
    for batch in batches:
        batch.to(dev)
    _sync(dev)
    peak = _status_bytes("VmHWM")
    return {"rss_growth": peak - base,
            "device_peak": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0}


def peak_memory(caches: dict[str, tuple[Path, int]], device: torch.device, batch_size: int) -> dict:
    out = {}
    placements = ["stream", "device", "host"] + (["mixed"] if device.type == "cuda" else [])
    for label, (cache, stored) in caches.items():
        for placement in placements:
            cmd = [sys.executable, "-m", "benchmarks.bench_scale", "--_peak", placement, "--_cache",
                   str(cache), "--device", str(device), "--_batch", str(batch_size)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
            out[f"{label} {placement}"] = {**json.loads(res.stdout.strip().splitlines()[-1]),
                                           "stored_bytes": stored, "placement": placement,
                                           "cache": label}
    return out


# -- the run --------------------------------------------------------------------------------------

def run(preset: str = "cpu", device: str = "cpu", pairs: int | None = None, memory: bool = True,
        amp: str = "auto", threads: int = 1) -> dict:
    torch.set_num_threads(threads)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    p = PRESETS[preset]
    if pairs is not None:
        p = replace(p, pairs=pairs, train_pairs=min(p.train_pairs, pairs))
    amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16,
                 "auto": torch.bfloat16 if dev.type == "cuda" else None}[amp]
    result = {"preset": preset, "device": str(dev), "shapes": asdict(p), "d_c": p.d_common,
              "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
              "torch": torch.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
              "threads": threads}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        path = Path(tmp) / "cache"
        t0 = time.perf_counter()
        cache_kw = dict(pairs_per_image=p.pairs_per_image, text_tokens=p.text_tokens,
                        text_width=p.text_width, image_tokens=p.image_tokens,
                        image_width=p.image_width, layers=p.text_layers)
        stored = write_bench_cache(path, p.pairs, **cache_kw)
        result["write_cache_s"] = time.perf_counter() - t0
        result["stored_bytes"] = stored
        reader = open_cache(path)
        split = reader.split("train")
        result["text_stored_bytes_per_pair"] = (
            (p.text_layers * split.text.offsets[-1] * p.text_width * 2 + split.num_pairs * p.text_width * 2)
            / split.num_pairs)
        result["loaders"] = loaders(split, dev, p)
        result["epoch"] = training_epoch(split, reader, dev, p, amp_dtype)
        if memory:
            # the preset's cache and one twice its size: past the streaming loader's LRU
            # capacities both, so streaming should stay flat while the store grows with the data
            double = Path(tmp) / "double"
            double_stored = write_bench_cache(double, 2 * p.pairs, **cache_kw)
            result["memory"] = peak_memory({"1×": (path, stored), "2×": (double, double_stored)},
                                           dev, p.batch_size)
    result["loader_speedup_vs_best_today"] = _speedups(result["loaders"])
    return result


def _best(loaders: dict, prefix: str, order: str) -> float:
    return max(v["pairs_per_s"] for k, v in loaders.items()
               if k.startswith(prefix) and v.get("order", "i.i.d.") == order and "host share" not in k)


def _speedups(loaders: dict) -> dict:
    """Best store pairs/s over today's best: per order (store and today's loaders in the same
    order), and the grouped store over today's default (i.i.d.) loaders."""
    orders = sorted({v.get("order", "i.i.d.") for v in loaders.values()})
    out = {order: _best(loaders, "store", order) / _best(loaders, "today", order) for order in orders}
    for order in orders:
        if order != "i.i.d.":
            out[f"{order} store vs i.i.d. today"] = _best(loaders, "store", order) / _best(loaders, "today", "i.i.d.")
    return out


def _mib(x: float) -> str:
    return f"{x / 2**20:.2f}"


def section(r: dict) -> str:
    p = r["shapes"]
    e = r["epoch"]
    title = f"## Stage two at scale: preset {r['preset']} on {r['device']}"
    lines = [title, "",
             f"`python -m benchmarks scale --preset {r['preset']} --device {r['device']}` on "
             f"{r['machine']} (shared), {r['gpu'] or 'no GPU'}, torch {r['torch']}, "
             f"{r['threads']} torch thread(s), amp {r['amp']}. Synthetic cache "
             f"({r['write_cache_s']:.0f} s to write): {p['pairs']} pairs, {p['pairs_per_image']} pairs "
             f"per image; text {p['text_layers']} layers × {p['text_width']} (final = last layer), "
             f"~{p['text_tokens']} tokens; image {p['text_layers']} layers + final × {p['image_width']}, "
             f"{p['image_tokens']} tokens; fp16, {_mib(r['stored_bytes'])} MiB stored; batch "
             f"{p['batch_size']}, d_c {r['d_c']}.", "",
             "Loaders (shuffled order, best of two passes; today's loaders timed over their first "
             f"{p['loader_batches']} batches, the store over a whole epoch; *bytes/pair* = what "
             "crosses host → device per pair, counted on the CPU too; text stored bytes/pair = "
             f"{r['text_stored_bytes_per_pair'] / 1e6:.3f} MB):", "",
             "| loader | order | load s | pairs/s | bytes/pair (MiB) | × today's best, same order |",
             "|---|---|---|---|---|---|"]
    for name, v in r["loaders"].items():
        order = v.get("order", "i.i.d.")
        today = _best(r["loaders"], "today", order)
        lines.append(f"| {name} | {order} | {v['load_s']:.2f} | {v['pairs_per_s']:.0f} | "
                     f"{_mib(v['bytes_per_pair'])} | {v['pairs_per_s'] / today:.1f}× |")
    lines += ["", f"One training epoch from the device store, batches grouped by image ({e['pairs_per_image']} "
              f"pairs per image, {e['distinct_images_first_batch']} distinct images in a batch of "
              f"{e['batch_size']}), {e['steps']} steps, MoLT heads (4 layers, d_c {r['d_c']}), Adam:", "",
              "| heads compute | epoch s | pairs/s | GFLOP/pair (fwd + bwd) | last loss |",
              "|---|---|---|---|---|"]
    for name in ("per-pair", "image-once"):
        v = e[name]
        lines.append(f"| {name} | {v['seconds']:.2f} | {v['pairs_per_s']:.0f} | "
                     f"{v['flops_per_pair'] / 1e9:.3f} | {v['last_loss']:.5f} |")
    lines += ["", f"Image-once is {e['speedup']:.1f}× faster; max |Δ logits| of the first batch "
              f"(same seeded heads) {e['max_abs_logit_diff']:.2e}."]
    lines += ["", reading(r)]
    if "memory" in r:
        lines += ["", "Peak memory of one epoch per placement, each in a fresh process (RSS growth "
                  "over the process after imports" + ("; peak CUDA memory" if r["device"].startswith("cuda") else "")
                  + "), on the cache above (1×) and one twice its size (2×):", "",
                  "| cache | placement | stored MiB | peak RSS growth MiB | peak device MiB |",
                  "|---|---|---|---|---|"]
        for v in r["memory"].values():
            lines.append(f"| {v['cache']} | {v['placement']} | {_mib(v['stored_bytes'])} | "
                         f"{_mib(v['rss_growth'])} | {_mib(v['device_peak'])} |")
    return "\n".join(lines) + "\n"


def reading(r: dict) -> str:
    """The run against the issue's goals, in numbers."""
    L, e = r["loaders"], r["epoch"]
    today = _best(L, "today", "i.i.d.")
    mixed = L["store mixed (text host, image device)"]["bytes_per_pair"]
    flops = e["per-pair"]["flops_per_pair"] / e["image-once"]["flops_per_pair"]
    sp = r["loader_speedup_vs_best_today"]
    grouped = [k for k in sp if k != "i.i.d." and "vs" not in k][0]
    return (
        f"Against the goals: the best store placement delivers {sp['i.i.d.']:.1f}× today's best "
        f"pairs/s in the default i.i.d. order, {sp[grouped]:.1f}× in the {grouped} order (each "
        f"against today's loaders in the same order) and {sp[grouped + ' store vs i.i.d. today']:.1f}× "
        f"grouped against today's default order (goal 20×); "
        f"bytes per pair crossing host → device: {L['store device']['bytes_per_pair']:.0f} B "
        f"(indices) with everything on the device, {mixed / 1e6:.3f} MB mixed vs the text's "
        f"{r['text_stored_bytes_per_pair'] / 1e6:.3f} MB stored (goal ≤), "
        f"{L['today in memory']['bytes_per_pair'] / 2**20:.2f} MiB today; image-once epoch "
        f"{e['speedup']:.1f}× faster than per-pair (goal 4×) for {flops:.1f}× fewer FLOPs, "
        f"|Δ logits| {e['max_abs_logit_diff']:.1e}. The host's whole share of a device-placed "
        f"batch (indices only) runs at {L['store device, host share only']['pairs_per_s']:.0f} pairs/s "
        f"({L['store device, host share only']['pairs_per_s'] / today:.0f}× today's loaders), "
        "which is what a GPU would wait for; on a CPU the store's gathers and the float32 widening "
        "run on the same cores as everything else.")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks scale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="shapes and sizes (Presets above)")
    ap.add_argument("--json", default=None, help="write every number to this JSON file")
    ap.add_argument("--pairs", type=int, default=None, help="pairs in the synthetic cache (default: the preset's)")
    ap.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                    help="autocast of the training epoch (auto: bf16 on CUDA, off on CPU)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-placement peak memory runs")
    ap.add_argument("--out", default=str(DOC),
                    help="the Markdown file whose section this benchmark replaces (default: docs/benchmarks.md)")
    ap.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    ap.add_argument("--_peak", help=argparse.SUPPRESS)
    ap.add_argument("--_cache", help=argparse.SUPPRESS)
    ap.add_argument("--_batch", type=int, default=72, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._peak:
        print(json.dumps(_peak_child(a._cache, a._peak, a.device, a._batch)))
        return
    r = run(a.preset, a.device, a.pairs, memory=not a.no_memory, amp=a.amp, threads=a.threads)
    text = section(r)
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2) + "\n")
        print(f"wrote {a.json}")
    if not a.no_doc:
        replace_section(text.splitlines()[0], text, Path(a.out))
        print(f"updated {a.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
