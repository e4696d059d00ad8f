"""The one image decoder: bytes, a file or an array → an RGB `PIL.Image`, as users' libraries do it.

Every reader and stage one go through `decode_image` (via `ImageRef.open`), so a poster, a
Flickr30k JPEG and an HDF5 row are all turned into pixels the same way. The rules follow
`transformers.image_utils.load_image` and `transformers.image_transforms.convert_to_rgb`:

1. EXIF orientation is applied first (`ImageOps.exif_transpose`), before anything looks at pixels.
2. Transparency (an alpha band: RGBA, LA, PA, ...; or a palette / grey / RGB image with a
   `transparency` entry) is composited onto white, never dropped: dropping alpha shows the hidden
   RGB under transparent pixels, which is often black.
3. High bit depth is scaled to 8 bits by its range, never clipped (Pillow's own `convert` clips
   every value above 255 to white):
   - `I;16` / `I;16L` / `I;16B` / `I;16N` (16-bit grey): the 16-bit range, v · 255 / 65535.
   - `I` (32-bit signed): the 16-bit range when every value lies in 0..65535 (how 16-bit PNG and
     TIFF data reach this mode), else the image's own [min, max].
   - `F` (32-bit float): [0, 1] when every value lies there (the float image convention of
     scikit-image / torchvision), else the image's own [min, max]. NaN or inf is an error.
   A constant image outside 0..255 becomes mid-grey rather than dividing by zero.
4. Everything else (L, P, CMYK, YCbCr, 1, RGB) is `convert("RGB")`, as transformers does.

Arrays (the MM-IMDB HDF5 release stores posters as C×H×W or H×W×C numbers) go through
`array_to_image`: integer dtypes must lie in 0..255 (cast), float dtypes in [0, 1] (scaled by
255) or [0, 255]; anything else is refused naming the dtype and range.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .base import DatasetError

WHITE = (255, 255, 255)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageDecodeError(DatasetError):
    """An image that cannot be turned into RGB pixels; the message names the source."""


def decode_image(data_or_path: bytes | str | os.PathLike | Image.Image, *, source: str) -> Image.Image:
    """Decode one image to an RGB `PIL.Image` (H×W, 3 × uint8), following the rules above.

    `data_or_path`: the encoded bytes, a file path, or an already opened PIL image.
    `source`: what to name in errors (a path, `file[images][row]`, a sample id).
    Raises `ImageDecodeError` naming `source` for unreadable, truncated or non-finite images.
    """
    try:
        if isinstance(data_or_path, Image.Image):
            img = data_or_path
        else:
            if isinstance(data_or_path, (bytes, bytearray, memoryview)):
                data = bytes(data_or_path)
            else:
                data = Path(data_or_path).read_bytes()
            img = Image.open(io.BytesIO(data))
            img.load()  # force the full decode so truncated / corrupt files fail here
        img = ImageOps.exif_transpose(img)  # returns a copy; the orientation tag is consumed
        return _to_rgb(img, source)
    except ImageDecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - any decode failure becomes one named error
        raise ImageDecodeError(f"cannot read image {source}: {type(e).__name__}: {e}") from e


def _to_rgb(img: Image.Image, source: str) -> Image.Image:
    if img.mode in SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        return _high_depth_to_rgb(img, source)
    has_alpha = "A" in img.getbands() or "a" in img.getbands() or img.info.get("transparency") is not None
    if has_alpha:
        rgba = img.convert("RGBA")
        ground = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(ground, rgba).convert("RGB")
    return img.convert("RGB")


def _high_depth_to_rgb(img: Image.Image, source: str) -> Image.Image:
    """16/32-bit grey → 8-bit grey by range (module docstring, rule 3), then RGB."""
    arr = np.asarray(img)
    if img.mode in SIXTEEN_BIT_MODES:
        arr = arr.astype(np.float64)
        lo, hi = 0.0, 65535.0
    else:
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            raise ImageDecodeError(f"cannot read image {source}: mode {img.mode} holds NaN or inf pixels")
        vmin, vmax = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if img.mode == "I" and vmin >= 0 and vmax <= 65535:
            lo, hi = 0.0, 65535.0
        elif img.mode == "F" and vmin >= 0 and vmax <= 1:
            lo, hi = 0.0, 1.0
        else:
            lo, hi = vmin, vmax
    if hi > lo:
        grey = np.rint((arr - lo) * (255.0 / (hi - lo)))
    else:  # a constant image outside every nominal range: no contrast to keep
        grey = np.full(arr.shape, 128.0)
    grey = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), mode="L")
    if "transparency" in img.info:  # a tRNS grey level on a 16-bit PNG: that level is transparent
        alpha = Image.fromarray(np.where(np.asarray(img) == img.info["transparency"], 0, 255).astype(np.uint8))
        rgba = Image.merge("RGBA", (grey, grey, grey, alpha))
        ground = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(ground, rgba).convert("RGB")
    return grey.convert("RGB")


def array_to_image(arr: np.ndarray, *, source: str, channels_first: bool = True) -> Image.Image:
    """A numeric image array → RGB `PIL.Image`.

    `arr`: (3, H, W) if `channels_first`, else (H, W, 3); (H, W) grey also accepted.
    Integer dtypes (any width, signed or not) must hold values in 0..255 and are cast;
    float dtypes in [0, 1] are scaled by 255, in [0, 255] rounded. Any other dtype, a value
    outside those ranges, or NaN/inf raises `ImageDecodeError` naming `source`, the dtype and the
    range found.
    """
    arr = np.asarray(arr)
    if arr.ndim == 3 and channels_first:
        arr = arr.transpose(1, 2, 0)
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3))):
        raise ImageDecodeError(f"cannot read image {source}: expected a 3×H×W (or H×W) array, got shape "
                               f"{tuple(np.asarray(arr).shape)}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    kind = arr.dtype.kind
    if kind == "b":
        arr = arr.astype(np.uint8) * 255
    elif kind in "iu":
        vmin, vmax = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if vmin < 0 or vmax > 255:
            raise ImageDecodeError(f"cannot read image {source}: integer pixels of dtype {arr.dtype} must lie "
                                   f"in 0..255, found {vmin}..{vmax}")
        arr = arr.astype(np.uint8)
    elif kind == "f":
        if not np.isfinite(arr).all():
            raise ImageDecodeError(f"cannot read image {source}: float pixels ({arr.dtype}) hold NaN or inf")
        vmin, vmax = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if vmin >= 0 and vmax <= 1:
            arr = np.rint(arr.astype(np.float64) * 255)
        elif vmin >= 0 and vmax <= 255:
            arr = np.rint(arr.astype(np.float64))
        else:
            raise ImageDecodeError(f"cannot read image {source}: float pixels of dtype {arr.dtype} must lie in "
                                   f"[0, 1] or [0, 255], found [{vmin:g}, {vmax:g}]")
        arr = arr.astype(np.uint8)
    else:
        raise ImageDecodeError(f"cannot read image {source}: pixel dtype {arr.dtype} is not an image type "
                               f"(valid: integers in 0..255, floats in [0, 1] or [0, 255])")
    img = Image.fromarray(np.ascontiguousarray(arr))
    return img.convert("RGB")
