"""GPU readiness check: one command that proves the CUDA paths and measures stage one and
stage two at the paper's shapes, sized for a single 8-minute call on one H200.

    python -m benchmarks gpu                       # on a GPU: every step at paper shapes (≤ 8 min)
    python -m benchmarks gpu --quick               # a ~3-minute rerun: fewer tokens / images / pairs
    python -m benchmarks gpu --device cpu --tiny   # the same steps at toy sizes on a CPU (tested)
    bash benchmarks/gpu_check.sh [options]         # the same, after installing carried wheels

Steps, in this order (each timed; a step that fails or is skipped for want of time is recorded
with its error, the others still run, and the exit code is 1):
  env         torch, CUDA, GPU and package versions
  peak        dense bf16 and fp16 matmul rate measured here (random data, median of timed
              repeats): the ceiling the TFLOP/s below are fractions of
  cuda_tests  tests/test_cuda.py and the feature store's CUDA test (CUDA_TESTS) in a fresh pytest:
              on a GPU every test must pass, none skip
  text        a LLaMA-7B-shaped model (32 layers × 4096, random weights built on the device) in
              bf16 then fp16: real tokens/s, TFLOP/s and fraction of peak over SNLI-VE-shaped
              length buckets at extraction's batching (equal lengths, ≤ batch_tokens per batch)
  image       open_clip ViT-L-14 (random weights), fp16: images/s, TFLOP/s, fraction of peak
  online      both encoders run per pair, as online training does (texts padded to the batch's
              longest, every pair's image): pairs/s
  extract     molt extract end to end (fp16, default layout) on a synthetic dataset with
              SNLI-VE's sharing (18 pairs per image) and text lengths: tokens/s, images/s,
              padding computed, batch sizes, TFLOP/s inside the encoders, bytes written
  ranks       `molt extract --devices 0,0` (torchrun, two ranks on one GPU) vs one rank, fp32
              (must be byte-identical) and fp16 (within a stated tolerance)
  stage_two   the stage-two scale benchmark, `python -m benchmarks scale --preset paper --no-memory`,
              on this device: training-epoch pairs/s at d_c 1024 (per-pair and image-once), beside
              `online`: the cache's speed-up per epoch and after how many epochs extraction pays
              for itself (the per-placement peak-memory runs of that benchmark are left out: they
              alone could take minutes; run them in a call of their own)

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode (matmuls and attention, forward
only) on one item of each distinct shape, so a rate is FLOPs done / seconds measured.
Writes gpu-check.json (every number) and gpu-check.md (the table) under $OUT when set, else
./gpu-check/ (or --out), and prints the table last.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]

# Every module the check (and the code it runs) imports. On the device image zarr, numcodecs,
# open_clip and gguf are not installed: they come as wheels (benchmarks/fetch_device_wheels.sh).
REQUIRED_MODULES = ["torch", "numpy", "zarr", "numcodecs", "open_clip", "gguf", "transformers", "tokenizers",
                    "timm", "typer", "rich", "safetensors", "h5py", "PIL", "pytest", "scipy", "ftfy", "donfig",
                    "google_crc32c", "torch.distributed.run", "molt_cache", "cli.main"]


def check_imports(modules: list[str] = REQUIRED_MODULES) -> None:
    """Import each module; SystemExit naming every one that fails, and how to bring it."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any import failure is a missing piece, reported by name
            missing.append(f"{name} ({type(e).__name__}: {e})")
    if missing:
        raise SystemExit("gpu check: cannot import " + "; ".join(missing) + ". Bring the missing packages as "
                         "wheels: `bash benchmarks/fetch_device_wheels.sh` here, then carry .whl and run "
                         "`bash benchmarks/gpu_check.sh` (docs/benchmarks.md, GPU check)")


# ----------------------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    """Everything that scales the run. `full` and `quick` are the paper's shapes on a GPU;
    `tiny` runs every step with toy models on a CPU."""

    name: str
    peak_n: int  # square matmul side for the peak rate
    peak_repeats: int
    text_config: dict  # LlamaConfig fields of the LLaMA-7B-shaped model
    text_dtypes: tuple[str, ...]
    text_count: int  # synthetic texts timed per dtype (forward step)
    text_tokens: tuple[int, int]  # token lengths incl. BOS, uniform in [lo, hi] (SNLI-VE hypotheses)
    batch_tokens: int  # extraction's text batch budget (ExtractConfig.batch_tokens)
    image_model: str  # open_clip model name, random weights ("tiny:vit" = the project's tiny tower)
    image_count: int  # images timed (forward step)
    image_batch: int  # ExtractConfig.image_batch_size
    online_batches: int  # batches of `online_batch` pairs timed in the online step
    online_batch: int
    extract_images: int  # distinct images of the synthetic dataset (× pairs_per_image pairs)
    pairs_per_image: int  # SNLI-VE: 565,286 pairs over 31,783 Flickr30k images ≈ 17.8
    text_repeat: float  # share of pairs whose hypothesis repeats an earlier one (assumed, not measured)
    num_workers: int  # image decode workers in extract
    extract_shard_chunks: tuple[int, ...]  # extract layouts to run besides the default (chunks per shard)
    scale_args: tuple[str, ...]  # `python -m benchmarks scale` arguments (besides --device/--json)
    rank_dtypes: tuple[str, ...]
    timeouts: dict  # seconds per subprocess step


LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6)
TOY_LLAMA = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=1000, max_position_embeddings=256, rms_norm_eps=1e-6)

SIZES = {
    "full": Sizes("full", peak_n=8192, peak_repeats=20, text_config=LLAMA_7B, text_dtypes=("bfloat16", "float16"),
                  text_count=16384, text_tokens=(8, 22), batch_tokens=16384, image_model="ViT-L-14",
                  image_count=2048, image_batch=64, online_batches=12, online_batch=64, extract_images=128,
                  pairs_per_image=18, text_repeat=0.05, num_workers=8,
                  extract_shard_chunks=(128,), scale_args=("--preset", "paper", "--no-memory"),
                  rank_dtypes=("float32", "float16"), timeouts={"cuda_tests": 150, "stage_two": 240, "ranks": 120}),
    "quick": Sizes("quick", peak_n=8192, peak_repeats=10, text_config=LLAMA_7B, text_dtypes=("bfloat16", "float16"),
                   text_count=4096, text_tokens=(8, 22), batch_tokens=16384, image_model="ViT-L-14",
                   image_count=512, image_batch=64, online_batches=4, online_batch=64, extract_images=32,
                   pairs_per_image=18, text_repeat=0.05, num_workers=8,
                   extract_shard_chunks=(), scale_args=("--preset", "paper", "--no-memory", "--pairs", "1152"),
                   rank_dtypes=("float32",),
                   timeouts={"cuda_tests": 150, "stage_two": 150, "ranks": 90}),
    "tiny": Sizes("tiny", peak_n=256, peak_repeats=5, text_config=TOY_LLAMA, text_dtypes=("bfloat16", "float32"),
                  text_count=48, text_tokens=(8, 22), batch_tokens=1024, image_model="tiny:vit",
                  image_count=16, image_batch=16, online_batches=2, online_batch=8, extract_images=4,
                  pairs_per_image=18, text_repeat=0.05, num_workers=0,
                  extract_shard_chunks=(1,), scale_args=("--preset", "tiny", "--no-memory"), rank_dtypes=("float32",),
                  timeouts={"cuda_tests": 120, "stage_two": 120, "ranks": 120}),
}
SNLI_VE_TRAIN_PAIRS = 529_527  # the paper's SNLI-VE train split, for per-epoch projections


# --------------------------------------------------------------------------------------- helpers


def _torch():
    import torch

    return torch


def _sync(device) -> None:
    torch = _torch()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call, as torch's FlopCounterMode counts them (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def synthetic_lengths(n: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed).integers(lo, hi + 1, size=n).tolist()


def word_level_tokenizer(vocab_size: int):
    """Texts are space-separated words w4 … w{vocab-1}: a text of k words is exactly k + 1 tokens
    (a BOS is prepended), so the synthetic lengths are exact."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(special)}
    vocab.update({f"w{i}": i for i in range(len(special), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def synthetic_texts(lengths: list[int], vocab_size: int, seed: int = 0) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    return [" ".join(f"w{w}" for w in rng.integers(4, vocab_size, size=n - 1)) for n in lengths]


def build_text_encoder(config: dict, dtype: str, device: str, seed: int = 0):
    """A LLaMA-shaped LlamaModel with random weights made directly on `device` in `dtype` (a 7B
    model is never built on the host), wrapped as the project's HFTextEncoder."""
    torch = _torch()
    from transformers import LlamaConfig, LlamaModel

    from molt_cache.encoders.runtime import DTYPES
    from molt_cache.encoders.text_hf import HFTextEncoder

    tokenizer = word_level_tokenizer(config["vocab_size"])
    cfg = LlamaConfig(pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **config)
    dt = DTYPES[dtype]
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    try:
        torch.set_default_dtype(dt)
        with torch.device(device):
            model = LlamaModel(cfg)
    finally:
        torch.set_default_dtype(previous)
    return HFTextEncoder(model, tokenizer, kind="random", name="llama-shaped", weights_sha256=f"random:{seed}",
                         device=torch.device(device), dtype=dt, layers=4, max_length=config["max_position_embeddings"])


def build_image_encoder(name: str, dtype: str, device: str, seed: int = 0):
    """open_clip `name` with random weights (built on `device`), or the project's `tiny:vit`."""
    torch = _torch()
    from molt_cache.encoders import create_image_encoder
    from molt_cache.encoders.image_openclip import OpenClipImageEncoder
    from molt_cache.encoders.runtime import DTYPES

    if name.startswith("tiny:"):
        return create_image_encoder(name, device=device, dtype=dtype, layers=4)
    import open_clip

    torch.manual_seed(seed)
    with torch.device(device):
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    return OpenClipImageEncoder(model.visual, preprocess, kind="random", name=name, weights_sha256=f"random:{seed}",
                                device=torch.device(device), dtype=DTYPES[dtype], layers=4)


class CountingEncoder:
    """Wraps an encoder for `extract`: counts calls, items, tokens computed (padding included) and
    the time spent inside `encode` (synchronized), so extraction's own batching is measured."""

    def __init__(self, enc, device):
        self._enc, self._device = enc, device
        self.calls = self.items = self.computed = 0
        self.seconds = 0.0
        self.shapes: dict[tuple, int] = {}

    def __getattr__(self, name):
        return getattr(self._enc, name)

    def encode(self, x, **kw):
        _sync(self._device)
        t0 = time.perf_counter()
        out = self._enc.encode(x, **kw)
        _sync(self._device)
        self.seconds += time.perf_counter() - t0
        shape = tuple(out.mask.shape)
        self.calls += 1
        self.items += shape[0]
        self.computed += shape[0] * shape[1]
        self.shapes[shape] = self.shapes.get(shape, 0) + 1
        return out


# ----------------------------------------------------------------------------------------- steps


def step_env(ctx: dict) -> dict:
    torch = _torch()
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "machine": platform.machine(),
           "cpus": os.cpu_count(), "device": ctx["device"], "sizes": ctx["sizes"].name}
    for mod in ("transformers", "open_clip", "zarr", "numcodecs", "timm", "numpy"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception as e:  # noqa: BLE001
            out[mod] = f"not importable: {e}"
    if ctx["device"].startswith("cuda"):
        p = torch.cuda.get_device_properties(ctx["device"])
        out.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count,
                   capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda,
                   matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return out


def step_peak(ctx: dict) -> dict:
    """Dense matmul rate on random data: the same ceiling that KINDS.md measured (≈ 790 TFLOP/s bf16)."""
    torch = _torch()
    s, dev = ctx["sizes"], ctx["device"]
    out = {"n": s.peak_n}
    for name, dt in (("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)):
        g = torch.Generator(device=dev).manual_seed(0)
        sets = [(torch.randn(s.peak_n, s.peak_n, device=dev, dtype=dt, generator=g),
                 torch.randn(s.peak_n, s.peak_n, device=dev, dtype=dt, generator=g)) for _ in range(2)]
        for a, b in sets * 2:
            a @ b  # warm-up: handles, kernel choice
        times = [_timed(lambda a=a, b=b: a @ b, dev) for i in range(s.peak_repeats) for a, b in [sets[i % 2]]]
        med = statistics.median(times)
        out[name] = {"tflops": 2 * s.peak_n ** 3 / med / 1e12, "median_ms": med * 1e3, "repeats": len(times)}
        del sets
    # The ceiling: bf16 on a GPU (the dtype of the paper-scale rates); on a CPU, whose half-precision
    # matmuls are often slower than float32, the fastest of the three.
    on_gpu = torch.device(dev).type == "cuda"
    out["ceiling"] = "bfloat16" if on_gpu else max(("bfloat16", "float16", "float32"), key=lambda k: out[k]["tflops"])
    ctx["peak_tflops"] = out[out["ceiling"]]["tflops"]
    return out


# Every test of tests/test_cuda.py is marked `cuda`; the device feature store's CUDA test is issue
# 13's own (device and mixed placements equal the CPU store, no host syncs while batching).
CUDA_TESTS = ["tests/test_cuda.py", "tests/test_store.py::test_store_on_cuda_matches_cpu_without_host_syncs"]


def step_cuda_tests(ctx: dict) -> dict:
    """The `cuda`-marked tests in a fresh process. On a GPU none may fail or skip; on a CPU they
    all skip (reported, not a failure)."""
    junit = ctx["work"] / "cuda-tests.xml"
    # A missing test file must not stop the others from running (pytest runs nothing when a named
    # file is absent): run what exists, then fail the step naming what was missing.
    missing = [t for t in CUDA_TESTS if not (REPO / t.split("::")[0]).exists()]
    present = [t for t in CUDA_TESTS if t not in missing]
    cmd = [sys.executable, "-m", "pytest", *present, "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=ctx["sizes"].timeouts["cuda_tests"])
    import xml.etree.ElementTree as ET

    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed, skipped = [], []
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            counts["tests"] += 1
            for kind in ("failure", "error", "skipped"):
                el = case.find(kind)
                if el is not None:
                    counts[{"failure": "failures", "error": "errors", "skipped": "skipped"}[kind]] += 1
                    (skipped if kind == "skipped" else failed).append(
                        f"{case.get('name')}: {(el.get('message') or '')[:200]}")
    out = {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
           "returncode": res.returncode, "seconds": time.perf_counter() - t0, "failed": failed, "skipped_tests": skipped,
           "log_tail": (res.stdout + res.stderr)[-3000:]}
    on_gpu = ctx["device"].startswith("cuda")
    if missing:
        raise StepError(f"CUDA tests not found (not merged yet?): {missing}; the others: {counts}", out)
    if counts["tests"] == 0 or (res.returncode not in (0, 5) if not on_gpu else res.returncode != 0):
        raise StepError(f"pytest -m cuda exited {res.returncode}: {counts}; {failed[:3]}", out)
    if on_gpu and (counts["skipped"] or failed):
        raise StepError(f"on a GPU every cuda test must run and pass: {counts}; {(failed + skipped)[:3]}", out)
    return out


def _text_forward(enc, ids: list[list[int]], budget: int, device, flops_per_len: dict[int, int]) -> dict:
    """Extraction's text batching without the cache: equal-length batches of ≤ `budget` tokens.
    `flops_per_len` (one text of each length, counted once: FLOPs do not depend on the dtype)
    is filled on first use."""
    by_len: dict[int, list[list[int]]] = {}
    for t in ids:
        by_len.setdefault(len(t), []).append(t)
    batches = [group[i:i + max(1, budget // n)] for n, group in sorted(by_len.items())
               for i in range(0, len(group), max(1, budget // n))]
    for n in by_len:
        if n not in flops_per_len:
            flops_per_len[n] = count_flops(lambda n=n: enc.encode([by_len[n][0]]))
    flops = sum(flops_per_len[len(t)] for t in ids)
    enc.encode(batches[0])  # warm-up
    finite = []

    def run():
        for b in batches:
            out = enc.encode(b)
            finite.append(out.final[:1].isfinite().all())
    seconds = _timed(run, device)
    tokens = sum(len(t) for t in ids)
    return {"texts": len(ids), "tokens": tokens, "batches": len(batches), "mean_batch_tokens": tokens / len(batches),
            "seconds": seconds, "tokens_per_s": tokens / seconds, "tflops": flops / seconds / 1e12,
            "flops_per_token": flops / tokens, "finite": bool(all(bool(f) for f in finite))}


def _rewrap(enc, dtype: str):
    """The encoder's model converted to `dtype` in place, wrapped anew so that its identity
    (recorded in a cache's manifest) names the dtype it now runs in."""
    from molt_cache.encoders.runtime import DTYPES
    from molt_cache.encoders.text_hf import HFTextEncoder

    ident = enc.identity
    model = enc.model.to(DTYPES[dtype])
    return HFTextEncoder(model, enc.tokenizer, kind=ident.kind, name=ident.name, weights_sha256=ident.weights_sha256,
                         device=enc.device, dtype=DTYPES[dtype], layers=len(ident.layer_widths),
                         max_length=enc.max_length)


def step_text(ctx: dict) -> dict:
    torch = _torch()
    s, dev = ctx["sizes"], ctx["device"]
    lengths = synthetic_lengths(s.text_count, *s.text_tokens)
    texts = synthetic_texts(lengths, s.text_config["vocab_size"])
    out: dict[str, Any] = {"config": s.text_config, "length_range": list(s.text_tokens),
                           "batch_tokens": s.batch_tokens}
    t0 = time.perf_counter()
    enc = build_text_encoder(s.text_config, s.text_dtypes[0], dev)
    _sync(dev)
    out["build_s"] = time.perf_counter() - t0
    out["parameters"] = sum(p.numel() for p in enc.model.parameters())
    ids = enc.tokenize(texts)
    if [len(t) for t in ids] != lengths:
        raise StepError("the word-level tokenizer did not give the synthetic lengths", out)
    flops_per_len: dict[int, int] = {}
    for i, dtype in enumerate(s.text_dtypes):
        if i:  # the same weights converted in place (one model's memory at a time), re-wrapped
            enc = _rewrap(enc, dtype)
        r = _text_forward(enc, ids, s.batch_tokens, dev, flops_per_len)
        if ctx.get("peak_tflops"):
            r["fraction_of_peak"] = r["tflops"] / ctx["peak_tflops"]
            r["goal_60_percent_met"] = r["fraction_of_peak"] >= 0.6  # issue 14's goal for the text model
        out[dtype] = r
        if not r["finite"]:
            raise StepError(f"{dtype}: non-finite states from the random-weight model", out)
    ctx["text_encoder"] = enc  # kept, in the last dtype, for the online and extract steps
    ctx["text_lengths"] = lengths
    if dev.startswith("cuda"):
        out["max_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    return out


def step_image(ctx: dict) -> dict:
    torch = _torch()
    s, dev = ctx["sizes"], ctx["device"]
    dtype = ctx["extract_dtype"]
    t0 = time.perf_counter()
    enc = build_image_encoder(s.image_model, dtype, dev)
    _sync(dev)
    out: dict[str, Any] = {"model": s.image_model, "dtype": dtype, "build_s": time.perf_counter() - t0,
                           "parameters": sum(p.numel() for p in enc.visual.parameters()),
                           "tokens_per_image": enc.num_tokens}
    size = enc.identity.extra["image_size"]
    g = torch.Generator(device=dev).manual_seed(0)
    px = torch.randn(s.image_batch, 3, *size, device=dev, dtype=enc.dtype, generator=g)
    flops_per_image = count_flops(lambda: enc.encode(px[:1]))
    enc.encode(px)  # warm-up
    n = max(1, s.image_count // s.image_batch)
    outs = []
    seconds = _timed(lambda: outs.extend(enc.encode(px).final[:1].isfinite().all() for _ in range(n)), dev)
    images = n * s.image_batch
    out.update(batch=s.image_batch, images=images, seconds=seconds, images_per_s=images / seconds,
               flops_per_image=flops_per_image, tflops=flops_per_image * images / seconds / 1e12,
               finite=bool(all(bool(o) for o in outs)))
    if ctx.get("peak_tflops"):
        out["fraction_of_peak"] = out["tflops"] / ctx["peak_tflops"]
    if not out["finite"]:
        raise StepError("non-finite states from the random-weight image tower", out)
    ctx["image_encoder"] = enc
    return out


def step_online(ctx: dict) -> dict:
    """Pairs/s of the frozen encoders run online: each batch's texts padded to its longest and
    every pair's image encoded (no dedup), as the paper trains."""
    torch = _torch()
    s, dev = ctx["sizes"], ctx["device"]
    tenc, ienc = _need(ctx, "text_encoder", "text"), _need(ctx, "image_encoder", "image")
    lengths = synthetic_lengths(s.online_batches * s.online_batch, *s.text_tokens, seed=7)
    ids = tenc.tokenize(synthetic_texts(lengths, s.text_config["vocab_size"], seed=7))
    size = ienc.identity.extra["image_size"]
    px = torch.randn(s.online_batch, 3, *size, device=dev, dtype=ienc.dtype, generator=torch.Generator(device=dev).manual_seed(1))
    batches = [ids[i:i + s.online_batch] for i in range(0, len(ids), s.online_batch)]
    tenc.encode(batches[0]), ienc.encode(px)  # warm-up

    def run():
        for b in batches:
            tenc.encode(b)
            ienc.encode(px)
    seconds = _timed(run, dev)
    pairs = len(ids)
    padded = sum(len(b) * max(len(t) for t in b) for b in batches)
    real = sum(lengths)
    out = {"pairs": pairs, "batch": s.online_batch, "seconds": seconds, "pairs_per_s": pairs / seconds,
           "text_padding_fraction": (padded - real) / real, "dtype": ctx["extract_dtype"]}
    ctx["online_pairs_per_s"] = out["pairs_per_s"]
    return out


def write_synthetic_dataset(root: Path, s: Sizes, vocab_size: int) -> dict:
    """A `manifest` dataset shaped like SNLI-VE: `extract_images` distinct 500×375 JPEGs (Flickr30k's
    usual size; smooth random content, so decoding costs what a photo costs), `pairs_per_image`
    hypotheses each, a `text_repeat` share of them repeating an earlier hypothesis, three labels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(3)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(s.extract_images):
        small = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(root / "images" / f"{i}.jpg", quality=90)
    n = s.extract_images * s.pairs_per_image
    texts = synthetic_texts(synthetic_lengths(n, *s.text_tokens, seed=11), vocab_size, seed=11)
    labels = ["entailment", "neutral", "contradiction"]
    used: list[str] = []
    with open(root / "manifest.jsonl", "w") as f:
        for k in range(n):
            text = used[int(rng.integers(0, k))] if k and rng.random() < s.text_repeat else texts[k]
            used.append(text)
            f.write(json.dumps({"id": f"p{k}", "image": f"images/{k // s.pairs_per_image}.jpg", "text": text,
                                "label": labels[int(rng.integers(0, 3))], "split": "train"}) + "\n")
    return {"pairs": n, "images": s.extract_images, "pairs_per_image": s.pairs_per_image,
            "text_repeat": s.text_repeat}


def _extract_once(ctx: dict, data: Path, info: dict, flops_per_len: dict, flops_per_image: int,
                  shard_chunks: int) -> dict:
    from molt_cache.extract import ExtractConfig, extract

    s, dev = ctx["sizes"], ctx["device"]
    ct, ci = CountingEncoder(ctx["text_encoder"], dev), CountingEncoder(ctx["image_encoder"], dev)
    cache = ctx["work"] / f"extract-cache-{shard_chunks}"
    cfg = ExtractConfig(dataset="manifest", root=str(data), splits=["train"], text="random:llama-shaped",
                        image=f"random:{s.image_model}", dtype=ctx["extract_dtype"], device=dev, out_dir=str(cache),
                        batch_tokens=s.batch_tokens, image_batch_size=s.image_batch, num_workers=s.num_workers,
                        shard_chunks=shard_chunks)
    t0 = time.perf_counter()
    res = extract(cfg, progress=lambda d, t: None, text_encoder=ct, image_encoder=ci)
    seconds = time.perf_counter() - t0
    shutil.rmtree(cache, ignore_errors=True)
    if not res.complete:
        raise StepError(f"extract (shard_chunks {shard_chunks}) did not complete", {})
    # computed text FLOPs: every batch is (b texts × n tokens); at fixed n FLOPs scale with b
    text_flops = sum(flops_per_len[n] * b * c for (b, n), c in ct.shapes.items())
    out = {"shard_chunks": shard_chunks, "seconds": seconds, "pairs_per_s_extract": info["pairs"] / seconds,
           "text_tokens": res.text_tokens, "text_seconds": res.text_seconds, "tokens_per_s": res.tokens_per_s,
           "padding_fraction": res.padding_fraction, "images": res.images, "image_seconds": res.image_seconds,
           "images_per_s": res.images_per_s, "bytes_written": res.bytes_written, "bytes_on_disk": res.bytes_on_disk,
           "text_calls": ct.calls, "text_mean_batch_tokens": ct.computed / max(1, ct.calls),
           "text_encode_seconds": ct.seconds, "text_encode_tflops": text_flops / ct.seconds / 1e12 if ct.seconds else 0.0,
           "image_calls": ci.calls, "image_mean_batch": ci.items / max(1, ci.calls), "image_encode_seconds": ci.seconds,
           "image_encode_tflops": flops_per_image * ci.items / ci.seconds / 1e12 if ci.seconds else 0.0}
    if ctx.get("peak_tflops"):
        out["text_encode_fraction_of_peak"] = out["text_encode_tflops"] / ctx["peak_tflops"]
        out["image_encode_fraction_of_peak"] = out["image_encode_tflops"] / ctx["peak_tflops"]
    return out


def step_extract(ctx: dict) -> dict:
    """molt extract end to end with the default layout (16 chunks per shard = per work unit; a
    text unit holds ~2k tokens at 4096 wide, which caps extraction's text batches), then with
    each of `extract_shard_chunks` chunks per shard, to show what that cap costs."""
    s, dev = ctx["sizes"], ctx["device"]
    tenc, ienc = _need(ctx, "text_encoder", "text"), _need(ctx, "image_encoder", "image")
    data = ctx["work"] / "snli-ve-like"
    info = write_synthetic_dataset(data, s, s.text_config["vocab_size"])
    # FLOPs per text length and per image, counted once (the same counts as steps text / image)
    flops_per_len = {n: count_flops(lambda n=n: tenc.encode([[1] * n]))
                     for n in range(s.text_tokens[0], s.text_tokens[1] + 1)}
    flops_per_image = count_flops(lambda: ienc.encode(
        _torch().zeros(1, 3, *ienc.identity.extra["image_size"], device=dev, dtype=ienc.dtype).normal_()))
    from molt_cache.extract import ExtractConfig

    default_chunks = ExtractConfig().shard_chunks
    out: dict[str, Any] = {**info, "dtype": ctx["extract_dtype"]}
    out.update(_extract_once(ctx, data, info, flops_per_len, flops_per_image, default_chunks))
    ctx["extract_s_per_pair"] = out["seconds"] / info["pairs"]
    out["variants"] = {str(k): _extract_once(ctx, data, info, flops_per_len, flops_per_image, k)
                       for k in s.extract_shard_chunks if k != default_chunks}
    return out


def step_stage_two(ctx: dict) -> dict:
    """Issue 13's benchmark through its agreed interface, then the comparison with `online`."""
    s, dev = ctx["sizes"], ctx["device"]
    path = ctx["work"] / "scale.json"
    cmd = [sys.executable, "-m", "benchmarks", "scale", "--device", dev, *s.scale_args, "--json", str(path), "--no-doc"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=s.timeouts["stage_two"])
    if res.returncode != 0 or not path.exists():
        raise StepError(f"`{' '.join(cmd[1:])}` exited {res.returncode}: {(res.stderr or res.stdout)[-1500:]}", {})
    scale = json.loads(path.read_text())
    out: dict[str, Any] = {"command": " ".join(cmd[2:]), "seconds": time.perf_counter() - t0, "scale": scale}
    epoch = scale.get("epoch", {})
    online = ctx.get("online_pairs_per_s")
    for name in ("per-pair", "image-once"):
        if name not in epoch:
            raise StepError(f"scale JSON has no epoch[{name!r}] (keys: {sorted(epoch)})", out)
        pps = epoch[name]["pairs_per_s"]
        row = {"pairs_per_s": pps, "flops_per_pair": epoch[name].get("flops_per_pair"),
               "snli_ve_epoch_s": SNLI_VE_TRAIN_PAIRS / pps}
        if online:
            row["speedup_vs_online"] = pps / online
            saved = 1 / online - 1 / pps  # seconds per pair saved by each epoch from the cache
            row["break_even_epochs"] = ctx["extract_s_per_pair"] / saved if saved > 0 and "extract_s_per_pair" in ctx else None
        out[name] = row
    if online:
        out["online_pairs_per_s"] = online
        out["online_snli_ve_epoch_s"] = SNLI_VE_TRAIN_PAIRS / online
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "_progress" not in p.relative_to(root).parts}


def compare_caches(a: Path, b: Path) -> dict:
    """Byte equality of every file but resume records, and the largest difference between the
    float arrays relative to the largest value (bf16 stored as uint16 bits is widened first)."""
    import numpy as np

    from molt_cache.cache.reader import open_cache

    fa, fb = _files(a), _files(b)
    out = {"files": len(fa), "same_file_set": set(fa) == set(fb),
           "differing_files": sorted(k for k in fa if k in fb and fa[k] != fb[k])[:10]}
    out["identical"] = out["same_file_set"] and not out["differing_files"]
    ra, rb = open_cache(a), open_cache(b)
    worst = 0.0
    for split in ra.splits:
        sa, sb = ra.split(split), rb.split(split)
        for i in range(sa.num_pairs):
            pa, pb = sa.pair(i), sb.pair(i)
            for x, y in zip([*pa.text_layers, *pa.image_layers, pa.image_final, pa.text_pooled, pa.image_pooled],
                            [*pb.text_layers, *pb.image_layers, pb.image_final, pb.text_pooled, pb.image_pooled]):
                scale = max(float(np.abs(x).max()), 1e-30)
                worst = max(worst, float(np.abs(x - y).max()) / scale)
    out["max_rel_diff"] = worst
    return out


RANK_TOLERANCE = {"float32": 0.0, "float16": 2e-3, "bfloat16": 1.6e-2}  # relative to the array's max |x|


def launch_devices(device: str) -> str:
    """`--devices` for two ranks on one device: "0,0" on GPU 0, "cpu,cpu" on the CPU."""
    import torch

    d = torch.device(device)
    return "cpu,cpu" if d.type == "cpu" else f"{d.index or 0},{d.index or 0}"


def step_ranks(ctx: dict) -> dict:
    """`molt extract --devices 0,0` (torchrun, two ranks sharing one GPU) vs one rank in this
    process, tiny encoders on the bundled sample's test split."""
    from molt_cache.extract import ExtractConfig, extract

    s, dev = ctx["sizes"], ctx["device"]
    out: dict[str, Any] = {"devices": launch_devices(dev)}
    problems = []
    for dtype in s.rank_dtypes:
        common = dict(dataset="sample", splits=["test"], text="tiny:llama", image="tiny:vit", dtype=dtype,
                      num_workers=0)
        one = ctx["work"] / f"rank1-{dtype}"
        two = ctx["work"] / f"rank2-{dtype}"
        t0 = time.perf_counter()
        extract(ExtractConfig(device=dev, out_dir=str(one), **common), progress=lambda d, t: None)
        one_s = time.perf_counter() - t0
        cmd = [sys.executable, "-m", "cli.main", "extract", "--devices", out["devices"], "--dataset", "sample",
               "--split", "test", "--text", "tiny:llama", "--image", "tiny:vit", "--dtype", dtype,
               "--num-workers", "0", "--out-dir", str(two)]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=s.timeouts["ranks"],
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        two_s = time.perf_counter() - t0
        log = res.stdout + res.stderr
        r: dict[str, Any] = {"one_rank_s": one_s, "two_ranks_s": two_s, "returncode": res.returncode,
                             "both_ranks_worked": all(re.search(rf"rank {k}: [1-9]\d* units encoded", log) for k in (0, 1))}
        if res.returncode != 0:
            r["log_tail"] = log[-2000:]
            problems.append(f"{dtype}: torchrun exited {res.returncode}")
        else:
            r.update(compare_caches(one, two))
            r["tolerance"] = RANK_TOLERANCE[dtype]
            if not r["both_ranks_worked"]:
                problems.append(f"{dtype}: the log does not show both ranks encoding")
            if dtype == "float32" and not r["identical"]:
                problems.append(f"float32: two ranks differ from one ({r['differing_files'][:3]}, "
                                f"max rel diff {r['max_rel_diff']:.2e})")
            if r["max_rel_diff"] > RANK_TOLERANCE[dtype]:
                problems.append(f"{dtype}: max rel diff {r['max_rel_diff']:.2e} > {RANK_TOLERANCE[dtype]}")
        out[dtype] = r
    if problems:
        raise StepError("; ".join(problems), out)
    return out


# ----------------------------------------------------------------------------------------- the run


class StepError(RuntimeError):
    """A step failed after measuring something: the partial numbers are kept."""

    def __init__(self, message: str, partial: dict):
        super().__init__(message)
        self.partial = partial


def _need(ctx: dict, key: str, step: str):
    if key not in ctx:
        raise StepError(f"needs step {step!r}, which did not complete", {})
    return ctx[key]


STEPS: list[tuple[str, Callable[[dict], dict]]] = [
    ("env", step_env), ("peak", step_peak), ("cuda_tests", step_cuda_tests), ("text", step_text),
    ("image", step_image), ("online", step_online), ("extract", step_extract), ("ranks", step_ranks),
    ("stage_two", step_stage_two)]  # last: its length depends most on another benchmark


SUBPROCESS_STEPS = ("stage_two", "ranks")


def run(device: str, sizes: Sizes, out_dir: Path, budget_s: float, steps: list[str] | None = None,
        threads: int | None = None) -> dict:
    torch = _torch()
    if threads:
        torch.set_num_threads(threads)
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available here; use --device cpu --tiny")
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="molt-gpu-check-"))
    ctx: dict[str, Any] = {"device": device, "sizes": sizes, "work": work,
                           "extract_dtype": "float16" if device.startswith("cuda") else "float32"}
    result: dict[str, Any] = {"device": device, "sizes": asdict(sizes), "budget_s": budget_s,
                              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "steps": {}}
    try:
        for name, fn in STEPS:
            if steps and name not in steps:
                continue
            elapsed = time.perf_counter() - t_start
            if elapsed > budget_s:
                result["steps"][name] = {"status": "failed", "error": f"not run: {elapsed:.0f} s of the "
                                         f"{budget_s:.0f} s budget spent (rerun with --steps {name})", "seconds": 0.0}
                print(f"[gpu check] {name}: NOT RUN (budget spent)", flush=True)
                continue
            print(f"[gpu check] {name} ...", flush=True)
            if name in SUBPROCESS_STEPS:
                _free_models(ctx)  # the 7B model's memory goes back before other processes need the GPU
            t0 = time.perf_counter()
            try:
                rec = {"status": "ok", **fn(ctx)}
            except StepError as e:
                rec = {"status": "failed", "error": str(e), **e.partial}
            except Exception as e:  # noqa: BLE001 - any failure of a step is recorded, the run goes on
                rec = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
            rec["seconds_step"] = time.perf_counter() - t0
            result["steps"][name] = rec
            print(f"[gpu check] {name}: {rec['status']} in {rec['seconds_step']:.1f} s"
                  + (f": {rec['error']}" if rec["status"] != "ok" else ""), flush=True)
            _write(result, out_dir)  # after every step: a run killed at its limit still leaves its numbers
    finally:
        _free_models(ctx)
        shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = time.perf_counter() - t_start
    result["ok"] = all(r["status"] == "ok" for r in result["steps"].values())
    _write(result, out_dir)
    return result


def _free_models(ctx: dict) -> None:
    torch = _torch()
    for key in ("text_encoder", "image_encoder"):
        ctx.pop(key, None)
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------- report


def _tf(x: float) -> str:
    """TFLOP/s to 3 significant digits (a CPU's toy run is ~1e-3, an H200's hundreds)."""
    return f"{x:.3g}"


def _f(x, spec: str = ".1f", suffix: str = "") -> str:
    return "—" if x is None else f"{x:{spec}}{suffix}"


def table(r: dict) -> str:
    """The markdown report: one row per measured quantity, the step's status beside it."""
    st = r["steps"]
    env = st.get("env", {})
    gpu = env.get("gpu") or f"CPU ({env.get('machine')}, {env.get('cpus')} cores)"
    lines = [f"GPU check on {gpu}, torch {env.get('torch')}, CUDA {env.get('cuda', '—')}, sizes `{r['sizes']['name']}`, "
             f"started {r['started']}, {r.get('seconds', 0):.0f} s in all.", "",
             "| step | measure | value |", "|---|---|---|"]

    def row(step: str, measure: str, value: str) -> None:
        lines.append(f"| {step} | {measure} | {value} |")

    for name, _ in STEPS:
        s = st.get(name)
        if s is None:
            continue
        label = f"{name} ({s['status']}, {s.get('seconds_step', 0):.0f} s)"
        if s["status"] != "ok":
            row(label, "error", str(s.get("error", ""))[:300].replace("|", "/").replace("\n", " "))
        if name == "env" and "torch" in s:
            row(label, "torch / transformers / open_clip / zarr",
                " / ".join(str(s.get(k)) for k in ("torch", "transformers", "open_clip", "zarr")))
        elif name == "peak" and "bfloat16" in s:
            row(label, f"dense matmul {s['n']}³, bf16 / fp16 / fp32 (ceiling: {s['ceiling']})",
                f"{_tf(s['bfloat16']['tflops'])} / {_tf(s['float16']['tflops'])} / {_tf(s['float32']['tflops'])} TFLOP/s")
        elif name == "cuda_tests" and "tests" in s:
            row(label, "passed / failed+errors / skipped", f"{s['passed']} / {s['failures'] + s['errors']} / {s['skipped']}")
        elif name == "text":
            for dt in r["sizes"]["text_dtypes"]:
                if dt in s:
                    v = s[dt]
                    row(label, f"{dt}: real tokens/s, TFLOP/s (of peak; goal ≥ 60 %), mean batch tokens",
                        f"{v['tokens_per_s']:,.0f}, {_tf(v['tflops'])} ({_f(v.get('fraction_of_peak'), '.0%')}), {v['mean_batch_tokens']:.0f}")
        elif name == "image" and "images_per_s" in s:
            row(label, f"{s['model']} {s['dtype']}, batch {s['batch']}: images/s, TFLOP/s (of peak)",
                f"{s['images_per_s']:,.1f}, {_tf(s['tflops'])} ({_f(s.get('fraction_of_peak'), '.0%')})")
        elif name == "online" and "pairs_per_s" in s:
            row(label, f"encoders per pair, batch {s['batch']}: pairs/s (text padding)",
                f"{s['pairs_per_s']:,.1f} ({s['text_padding_fraction']:.0%})")
        elif name == "extract" and "tokens_per_s" in s:
            row(label, f"{s['pairs']} pairs / {s['images']} images, {s['dtype']}, shard_chunks {s['shard_chunks']}: "
                "wall s, pairs/s", f"{s['seconds']:.1f}, {s['pairs_per_s_extract']:,.1f}")
            row(label, "text phase: real tokens/s, padding, mean batch tokens, encoder TFLOP/s (of peak)",
                f"{s['tokens_per_s']:,.0f}, {s['padding_fraction']:.1%}, {s['text_mean_batch_tokens']:.0f}, "
                f"{_tf(s['text_encode_tflops'])} ({_f(s.get('text_encode_fraction_of_peak'), '.0%')})")
            row(label, "image phase: images/s, mean batch, encoder TFLOP/s (of peak)",
                f"{s['images_per_s']:,.1f}, {s['image_mean_batch']:.1f}, {_tf(s['image_encode_tflops'])} "
                f"({_f(s.get('image_encode_fraction_of_peak'), '.0%')})")
            row(label, "bytes written (uncompressed) / on disk", f"{s['bytes_written'] / 2**20:,.0f} / {s['bytes_on_disk'] / 2**20:,.0f} MiB")
            for k, v in s.get("variants", {}).items():
                row(label, f"shard_chunks {k} (default {s['shard_chunks']}): wall s; text tokens/s, mean batch tokens, "
                    "encoder TFLOP/s; images/s",
                    f"{v['seconds']:.1f}; {v['tokens_per_s']:,.0f}, {v['text_mean_batch_tokens']:.0f}, "
                    f"{_tf(v['text_encode_tflops'])}; {v['images_per_s']:,.1f}")
        elif name == "stage_two" and "scale" in s:
            for k in ("per-pair", "image-once"):
                if k in s:
                    v = s[k]
                    row(label, f"epoch {k}: pairs/s, GFLOP/pair, SNLI-VE epoch s",
                        f"{v['pairs_per_s']:,.0f}, {_f((v['flops_per_pair'] or 0) / 1e9, '.3g')}, {v['snli_ve_epoch_s']:,.0f}")
                    if "speedup_vs_online" in v:
                        row(label, f"epoch {k}: × online, break-even epochs",
                            f"{v['speedup_vs_online']:.1f}×, {_f(v['break_even_epochs'], '.2f')}")
            loaders = s["scale"].get("loaders", {})
            for k, v in loaders.items():
                mib = v.get("bytes_per_pair")
                row(label, f"loader {k}: pairs/s, host→device MiB/pair",
                    f"{v.get('pairs_per_s', 0):,.0f}, {_f(None if mib is None else mib / 2**20, '.3f')}")
        elif name == "ranks":
            for dt in r["sizes"]["rank_dtypes"]:
                if dt in s and "max_rel_diff" in s[dt]:
                    v = s[dt]
                    row(label, f"{dt}: `--devices {s['devices']}` vs one rank: identical, max rel diff (tolerance)",
                        f"{v['identical']}, {v['max_rel_diff']:.2e} ({v['tolerance']:g})")
    return "\n".join(lines) + "\n"


def _write(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu-check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out_dir / "gpu-check.md").write_text(table(result))


def default_out_dir() -> Path:
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("gpu-check")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (default cuda)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="a ~3-minute rerun on a GPU: fewer tokens, images, pairs")
    group.add_argument("--tiny", action="store_true", help="toy sizes: every step in about a minute on a CPU")
    ap.add_argument("--out", default=None, help="results folder (default: $OUT if set, else ./gpu-check)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="steps not started by then are recorded as failed (default 450 s full, 170 s quick, 300 s tiny)")
    ap.add_argument("--steps", default=None, help=f"comma-separated subset of {[n for n, _ in STEPS]}")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 with --tiny, else torch's)")
    ap.add_argument("--check-imports", action="store_true", help="only try every import the check needs")
    a = ap.parse_args(argv)
    if a.check_imports:
        check_imports()
        print(f"gpu check: all {len(REQUIRED_MODULES)} modules import")
        return
    sizes = SIZES["tiny" if a.tiny else "quick" if a.quick else "full"]
    steps = a.steps.split(",") if a.steps else None
    unknown = sorted(set(steps or []) - {n for n, _ in STEPS})
    if unknown:
        raise SystemExit(f"unknown steps {unknown}; valid: {[n for n, _ in STEPS]}")
    budget = a.budget_s if a.budget_s is not None else {"full": 450, "quick": 170, "tiny": 300}[sizes.name]
    out_dir = Path(a.out) if a.out else default_out_dir()
    threads = a.threads or (1 if a.tiny else None)  # toy models on a shared CPU: more threads only contend
    result = run(a.device, sizes, out_dir, budget, steps, threads)
    print(table(result))
    print(f"wrote {out_dir / 'gpu-check.json'} and {out_dir / 'gpu-check.md'}")
    if not result["ok"]:
        failed = [n for n, s in result["steps"].items() if s["status"] != "ok"]
        raise SystemExit(f"gpu check: FAILED steps {failed} (errors in the table and the JSON)")


if __name__ == "__main__":
    main(sys.argv[1:])
