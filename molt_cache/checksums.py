"""File checksums shared by the cache layer (completion records) and the encoders (weights
identity). A neutral module: the cache must not import the encoders, nor the encoders the cache."""
from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in `chunk_bytes` blocks (memory stays flat)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()
