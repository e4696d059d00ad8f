"""The one image decoder (molt_cache/datasets/images.py): one tiny file per mode, RGB pixels asserted.

Expected values follow transformers' load_image / convert_to_rgb (EXIF first, alpha on white) and
"scale by range" for high bit depth (16-bit: v·255/65535).
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from molt_cache.datasets import DatasetError, ImageRef
from molt_cache.datasets.images import ImageDecodeError, array_to_image, decode_image


def rgb(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


def test_rgba_glyph_on_transparent_ground_is_black_on_white(tmp_path):
    # The failing input: hidden RGB under alpha 0 is black; dropping alpha gave an all-black image.
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[2:6, 3:5, 3] = 255  # an opaque black glyph; everything else fully transparent black
    arr[0, 0] = (200, 0, 0, 128)  # half-transparent red: 0.5·200 + 0.5·255 on R, 0.5·255 on G, B
    path = tmp_path / "glyph.png"
    Image.fromarray(arr, "RGBA").save(path)
    out = rgb(decode_image(path, source=str(path)))
    assert (out[2:6, 3:5] == 0).all()
    assert (out[7, 7] == 255).all() and (out[0, 1] == 255).all()
    a = 128 / 255
    np.testing.assert_allclose(out[0, 0], [a * 200 + (1 - a) * 255, (1 - a) * 255, (1 - a) * 255], atol=1)
    assert (out == 255).all(axis=-1).mean() > 0.8  # mostly white, not black


def test_la_and_palette_transparency_go_on_white(tmp_path):
    la = np.zeros((4, 4, 2), np.uint8)
    la[1, 1] = (40, 255)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = rgb(decode_image(tmp_path / "la.png", source="la"))
    assert out[1, 1].tolist() == [40, 40, 40] and out[0, 0].tolist() == [255, 255, 255]

    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.putpixel((2, 1), 1)
    p.save(tmp_path / "p.png", transparency=0)  # palette index 0 (black) is transparent
    out = rgb(decode_image(tmp_path / "p.png", source="p"))
    assert out[1, 2].tolist() == [10, 200, 30] and out[3, 3].tolist() == [255, 255, 255]

    p.save(tmp_path / "p_opaque.png")  # no transparency: the palette colour stays
    assert rgb(decode_image(tmp_path / "p_opaque.png", source="p"))[3, 3].tolist() == [0, 0, 0]


def test_sixteen_bit_ramp_is_scaled_not_clipped(tmp_path):
    # The failing input: a 0–65535 grey ramp came out 98 % pure white.
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)[None].repeat(4, 0)
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    out = rgb(decode_image(path, source=str(path)))
    expect = np.rint(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expect)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    assert (out == 255).all(axis=-1).mean() < 0.01 and out[0, 128, 0] in (127, 128)


def test_int32_and_float_modes(tmp_path):
    # "I" holding 16-bit data: the 16-bit range
    i16 = np.array([[0, 32768, 65535]], np.int32)
    Image.fromarray(i16, "I").save(tmp_path / "i.tif")
    assert rgb(decode_image(tmp_path / "i.tif", source="i"))[0, :, 0].tolist() == [0, 128, 255]
    # "I" beyond 16 bits (or negative): its own range
    wide = np.array([[-1000, 0, 1000]], np.int32)
    Image.fromarray(wide, "I").save(tmp_path / "iw.tif")
    assert rgb(decode_image(tmp_path / "iw.tif", source="iw"))[0, :, 0].tolist() == [0, 128, 255]
    # "F" in [0, 1]: scaled by 255
    f01 = np.array([[0.0, 0.5, 1.0, 0.25]], np.float32)
    Image.fromarray(f01, "F").save(tmp_path / "f.tif")
    assert rgb(decode_image(tmp_path / "f.tif", source="f"))[0, :, 0].tolist() == [0, 128, 255, 64]
    # "F" outside [0, 1]: its own range
    fw = np.array([[-2.0, 0.0, 2.0]], np.float32)
    Image.fromarray(fw, "F").save(tmp_path / "fw.tif")
    assert rgb(decode_image(tmp_path / "fw.tif", source="fw"))[0, :, 0].tolist() == [0, 128, 255]
    # NaN: an error naming the file
    Image.fromarray(np.array([[0.0, np.nan]], np.float32), "F").save(tmp_path / "nan.tif")
    with pytest.raises(ImageDecodeError, match=r"nan\.tif.*NaN"):
        decode_image(tmp_path / "nan.tif", source=str(tmp_path / "nan.tif"))


def test_exif_orientation_applied_first(tmp_path):
    # 2 wide × 1 high: left red, right blue; orientation 6 = "rotate 90° clockwise to display".
    arr = np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "oriented.png"
    Image.fromarray(arr).save(path, exif=exif)
    out = rgb(decode_image(path, source="o"))
    assert out.shape == (2, 1, 3)  # now 1 wide × 2 high
    assert out[0, 0].tolist() == [255, 0, 0] and out[1, 0].tolist() == [0, 0, 255]


def test_cmyk_grey_palette_and_png_named_jpg_keep_working(tmp_path):
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putpixel((0, 0), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (255, 0, 0, 0))
    cmyk.save(tmp_path / "c.tif")
    assert rgb(decode_image(tmp_path / "c.tif", source="c"))[0].tolist() == [[255, 255, 255], [0, 255, 255]]
    Image.fromarray(np.array([[7, 200]], np.uint8), "L").save(tmp_path / "g.png")
    assert rgb(decode_image(tmp_path / "g.png", source="g"))[0].tolist() == [[7, 7, 7], [200, 200, 200]]
    Image.fromarray(np.array([[[1, 2, 3]]], np.uint8)).save(tmp_path / "png.jpg", format="PNG")
    assert rgb(ImageRef("file", str(tmp_path / "png.jpg")).open())[0, 0].tolist() == [1, 2, 3]
    # bytes in, too
    data = (tmp_path / "g.png").read_bytes()
    assert rgb(decode_image(data, source="bytes"))[0, 1].tolist() == [200, 200, 200]


def test_corrupt_file_names_the_file_and_is_a_dataset_error(tmp_path):
    path = tmp_path / "bad.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)))
    with pytest.raises(DatasetError, match=r"bad\.jpg"):
        ImageRef("file", str(path)).open()


def test_arrays_by_dtype():
    chw = np.zeros((3, 2, 2), np.int32)
    chw[0, 0, 0] = 255
    chw[2, 1, 1] = 7
    out = rgb(array_to_image(chw, source="x"))
    assert out[0, 0].tolist() == [255, 0, 0] and out[1, 1].tolist() == [0, 0, 7]
    f01 = np.full((3, 1, 1), 0.5, np.float32)
    assert rgb(array_to_image(f01, source="x"))[0, 0].tolist() == [128, 128, 128]
    f255 = np.full((3, 1, 1), 200.4, np.float64)
    assert rgb(array_to_image(f255, source="x"))[0, 0].tolist() == [200, 200, 200]
    with pytest.raises(ImageDecodeError, match=r"f\[images\]\[3\].*int32.*0\.\.255.*-1\.\.300"):
        array_to_image(np.array([[[-1, 300]]] * 3, np.int32), source="f[images][3]")
    with pytest.raises(ImageDecodeError, match=r"float64.*\[0, 1\] or \[0, 255\].*-5"):
        array_to_image(np.full((3, 1, 1), -5.0), source="x")
    with pytest.raises(ImageDecodeError, match="complex128"):
        array_to_image(np.zeros((3, 1, 1), np.complex128), source="x")


def test_transparency_entries_of_every_kind(tmp_path):
    Image.fromarray(np.array([[0, 100]], np.uint8), "L").save(tmp_path / "l.png", transparency=0)
    assert rgb(decode_image(tmp_path / "l.png", source="l"))[0].tolist() == [[255, 255, 255], [100, 100, 100]]
    Image.fromarray(np.array([[[0, 0, 0], [10, 20, 30]]], np.uint8)).save(tmp_path / "c.png", transparency=(0, 0, 0))
    assert rgb(decode_image(tmp_path / "c.png", source="c"))[0].tolist() == [[255, 255, 255], [10, 20, 30]]
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.save(tmp_path / "p.png", transparency=bytes([0, 128]))  # per-index alpha: 0 and ~half
    assert rgb(decode_image(tmp_path / "p.png", source="p"))[0].tolist() == [[255, 255, 255], [227, 127, 127]]
    p.save(tmp_path / "p.gif", transparency=0)
    assert rgb(decode_image(tmp_path / "p.gif", source="g"))[0].tolist() == [[255, 255, 255], [200, 0, 0]]
    ramp = np.array([[0, 1000, 65535]], np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png", transparency=1000)  # a 16-bit grey tRNS level
    assert rgb(decode_image(tmp_path / "g16.png", source="g16"))[0].tolist() == [[0, 0, 0], [255, 255, 255],
                                                                                  [255, 255, 255]]
