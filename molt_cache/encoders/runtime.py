"""Device / dtype resolution, freezing and file checksums shared by every encoder."""
from __future__ import annotations

import hashlib

import torch

from molt_cache.checksums import sha256_file  # noqa: F401 - re-exported for existing callers

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          # the storage names (EncoderIdentity.dtype, the cache manifest) are accepted too
          "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def resolve_device(device: str | torch.device) -> torch.device:
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' = fp16 on CUDA (method.md: the encoders run once in half precision), fp32 elsewhere
    (CPU half-precision kernels are slow and some are missing). 'bf16' | 'fp16' | 'fp32' (or
    'bfloat16' | 'float16' | 'float32') explicit."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: ['auto', {', '.join(map(repr, DTYPES))}]")
    return DTYPES[dtype]


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Frozen for good: eval mode (dropout / patch dropout off) and no parameter wants a grad."""
    model.eval()
    model.requires_grad_(False)
    return model


def sha256_state_dict(module: torch.nn.Module) -> str:
    """Checksum of a module's tensors (names, shapes, fp32 bytes) in state-dict order: identifies
    randomly initialized tiny models bit for bit."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().to("cpu")
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update((t.float() if t.is_floating_point() else t).contiguous().numpy().tobytes())
    return digest.hexdigest()
