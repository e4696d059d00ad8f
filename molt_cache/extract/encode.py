"""The one encoding path: images and texts → per-item, per-layer token states in the cache's
storage dtype. `molt extract` writes these states to the cache; `molt predict` (and
`Classifier.predict`) hands the same states to the heads, so the two cannot drift.

Texts: `text_batches` groups token-id lists into equal-length batches (no padding token ever
enters a batch), `encode_items` runs one batch. Images: `load_image` decodes (a path, a PIL image,
an ImageRef, or None for the blank image), the encoder's own `transform` makes pixels,
`encode_items` runs one stacked batch.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from molt_cache.cache.writer import to_storage
from molt_cache.datasets.base import ImageRef
from molt_cache.datasets.images import decode_image
from molt_cache.finite import check_batch

BLANK_IMAGE_KEY = "<blank>"
BLANK_IMAGE_SIZE = 224
BLANK_IMAGE_RGB = (128, 128, 128)  # mid-gray: close to zero after CLIP/ImageNet normalization

# MKL's sgemm (torch's CPU BLAS) takes another kernel below 4 rows, so a text of 1-3 tokens run
# alone (the reference "model on this text alone") rounds differently from the same text in a batch;
# such texts are encoded alone. From 4 tokens on, a row's bits do not depend on the batch size.
ALONE_BELOW_TOKENS = 4
TEXT_BATCHING = "equal-length batches, no padding; texts under 4 tokens and straddling texts alone"


@dataclass
class ItemStates:
    """One item's stored states, in the storage dtype (numpy; bfloat16 as uint16 bit patterns).

    tokens: one (n_tokens, D) array per stored token array, in cache order: the L_s selected
            layers oldest first, then the final states unless `final_is_last_layer`
            (docs/cache-format.md, token_array_names).
    pooled: (P,) the model's pooled embedding.
    """

    tokens: list[np.ndarray]
    pooled: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.tokens[0].shape[0])


@dataclass
class EncodedBatch:
    """One batch's states per item, and how many token positions the model computed (B × T,
    padding included) for the padding statistics."""

    items: list[ItemStates]
    computed_tokens: int

    @property
    def real_tokens(self) -> int:
        return sum(s.num_tokens for s in self.items)


def load_image(image: ImageRef | Image.Image | str | Path | None) -> Image.Image:
    """An RGB PIL image from an ImageRef, a file path, a PIL image, or None (the mid-gray blank
    image that stands in for an absent image under the "empty" strategy). Unreadable files raise
    DatasetError naming the file. Everything goes through datasets.images.decode_image (EXIF,
    alpha on white, high bit depth by range)."""
    if image is None:
        return Image.new("RGB", (BLANK_IMAGE_SIZE, BLANK_IMAGE_SIZE), BLANK_IMAGE_RGB)
    if isinstance(image, Image.Image):
        return decode_image(image, source=f"<PIL image {image.mode} {image.size[0]}x{image.size[1]}>")
    if isinstance(image, (str, Path)):
        image = ImageRef("file", str(image))
    return image.open()


def item_generator(seed: int, split: str, modality: str, item: int) -> torch.Generator:
    """Input-level noise depends on (seed, split, modality, item) only, never on batching nor on
    the device.

    Always a CPU generator, whatever the encoder's device: the noise helper draws on the generator's
    device and moves the draw to the input's, so a CUDA run stores the same noise as a CPU run
    (a CUDA generator is another RNG, Philox, and would give other numbers for the same seed)."""
    key = hashlib.sha256(f"{seed}/{split}/{modality}/{item}".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(key[:8], "little") & ((1 << 63) - 1))
    return g


def text_batches(items: np.ndarray, inner: np.ndarray, lengths: np.ndarray, budget: int,
                 single: bool) -> list[list[int]]:
    """Fully-contained items sorted by length (stable) and batched only with items of the *same*
    length, at most max(1, budget // length) per batch; straddling items (in `items` but not in
    `inner`), items shorter than ALONE_BELOW_TOKENS and (`single`) every item alone. No batch holds
    a padding token, so every stored row is bit-identical (CPU, fp32) to the model run on that text
    alone: padding changes the attention's reduction length and with it the rounding. Depends only
    on its arguments, so any rerun repeats it exactly."""
    inner_set = set(inner.tolist())
    batches: list[list[int]] = [[int(k)] for k in items if k not in inner_set]
    order = sorted(inner.tolist(), key=lambda k: (int(lengths[k]), k))
    cur: list[int] = []
    for k in order:
        length = int(lengths[k])
        if cur and (single or length != int(lengths[cur[0]]) or length < ALONE_BELOW_TOKENS
                    or length * (len(cur) + 1) > budget):
            batches.append(cur)
            cur = []
        cur.append(int(k))
    if cur:
        batches.append(cur)
    return batches


def encode_items(enc, inputs: list[list[int]] | torch.Tensor, *, modality: str, dtype: str,
                 expected_widths: dict[str, int] | None = None, input_noise: float = 0.0,
                 generator: torch.Generator | None = None, items: list[int] | None = None) -> EncodedBatch:
    """Run the frozen encoder `enc` on one batch and split its output into per-item states.

    inputs: token-id lists (text encoders) or pixels (B, 3, H, W) made by `enc.transform`
    (image encoders), already on `enc.device` in `enc.dtype`.
    dtype: the storage dtype ("float32" | "float16" | "bfloat16") the states are rounded to,
    exactly as the cache stores them.
    expected_widths: name → width of each stored token array (the cache's), checked when given.
    items: the batch's item ids, only to name an item in errors (default: batch positions).
    Returns one ItemStates per batch item, holding only its real tokens (mask True).
    Raises RuntimeError when the encoder's outputs disagree with its identity or with each other,
    and finite.NonFiniteFeatureError when a stored value would be inf/NaN (never cached).
    """
    with torch.inference_mode():
        out = enc.encode(inputs, input_noise=input_noise, generator=generator)
    name = enc.identity.name
    tensors = list(out.layers) + ([] if enc.identity.final_is_last_layer else [out.final])
    widths = (expected_widths if expected_widths is not None
              else {f"token array {k}": t.shape[-1] for k, t in enumerate(tensors)})
    if len(tensors) != len(widths):
        raise RuntimeError(f"{modality} encoder {name} returned {len(tensors)} token arrays; the cache "
                           f"expects {list(widths)}")
    mask = out.mask.to("cpu").bool()
    check_batch(modality, list(items) if items is not None else list(range(mask.shape[0])), mask,
                dict(zip(widths, tensors)), out.pooled, dtype)
    arrays = [to_storage(t, dtype) for t in tensors]
    pool = to_storage(out.pooled, dtype)
    for (array_name, width), arr in zip(widths.items(), arrays):
        if arr.shape[1] != mask.shape[1]:  # one offsets array per modality: all arrays share tokens
            raise RuntimeError(f"{modality} encoder {name}: {array_name} has {arr.shape[1]} tokens "
                               f"per item but the mask has {mask.shape[1]}; every stored array of an item "
                               "must share one token count (docs/cache-format.md)")
        if arr.shape[-1] != width:
            raise RuntimeError(f"{modality} encoder {name}: {array_name} has width "
                               f"{arr.shape[-1]}, its identity says {width}")
    items = []
    for i in range(mask.shape[0]):
        m = mask[i].numpy()
        items.append(ItemStates(tokens=[arr[i][m] for arr in arrays], pooled=pool[i]))
    return EncodedBatch(items, int(mask.numel()))
