"""service.images: every supported format decodes to the same pixels; limits and bad files are refused typed."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from conftest import encode, orl_file, png_header_only
from PIL import Image

from service.errors import BadImage, PayloadTooLarge, UnsupportedMediaType
from service.images import configure_pillow, decode_image

LIMITS = {"max_bytes": 10 << 20, "max_pixels": 40_000_000}


@pytest.fixture(autouse=True)
def _pillow_limits() -> None:
    configure_pillow(LIMITS["max_pixels"])


def face() -> Image.Image:
    with Image.open(orl_file(3, 1)) as image:
        return image.copy()


def decode(data: bytes, field: str = "image") -> Image.Image:
    return decode_image(data, field, **LIMITS)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "PPM", "TIFF", "GIF"])
def test_lossless_formats_give_the_original_pixels(fmt: str) -> None:
    original = face()
    decoded = decode(encode(original, fmt))
    np.testing.assert_array_equal(np.asarray(decoded.convert("L")), np.asarray(original))


def test_pgm_upload_is_the_orl_file_itself() -> None:
    decoded = decode(orl_file(3, 1).read_bytes())
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(face()))


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_lossy_formats_are_close_to_the_original(fmt: str) -> None:
    original = np.asarray(face(), dtype=np.float64)
    decoded = np.asarray(decode(encode(face(), fmt, quality=95)).convert("L"), dtype=np.float64)
    assert decoded.shape == original.shape
    assert np.abs(decoded - original).mean() < 4


def test_gif_first_frame_is_used() -> None:
    first, second = face(), Image.new("L", face().size, 255)
    data = io.BytesIO()
    first.save(data, format="GIF", save_all=True, append_images=[second])
    np.testing.assert_array_equal(np.asarray(decode(data.getvalue()).convert("L")), np.asarray(first))


def test_exif_orientation_is_applied() -> None:
    upright = face()
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # a camera that stored it sideways
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display" undoes ROTATE_90 (counter-clockwise)
    decoded = decode(encode(stored, "PNG", exif=exif))
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(upright))
    assert decode(encode(stored, "PNG")).size == stored.size  # without the tag nothing is rotated


def test_empty_and_unsupported_files() -> None:
    with pytest.raises(BadImage, match="files\\[2\\]: the file is empty"):
        decode(b"", "files[2]")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.txt", "hello")
    for data in (b"just some text\n", archive.getvalue(), b"%PDF-1.4\n%...", b"RIFF\x00\x00\x00\x00WAVEfmt "):
        with pytest.raises(UnsupportedMediaType, match="image_a: not a supported image format"):
            decode(data, "image_a")


def test_truncated_and_corrupt_files_name_the_field() -> None:
    jpeg = encode(face(), "JPEG")
    with pytest.raises(BadImage, match="image_b: cannot decode the JPEG image"):
        decode(jpeg[: len(jpeg) // 2], "image_b")
    with pytest.raises(BadImage, match="image: cannot read the PNG header"):
        decode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)


def test_pixel_bomb_is_refused_from_the_header() -> None:
    with pytest.raises(PayloadTooLarge, match="pixels"):
        decode(png_header_only(100_000, 100_000))
    with pytest.raises(PayloadTooLarge, match="pixels"):  # between the limit and Pillow's 2× bomb error
        decode_image(png_header_only(5000, 5000), "image", max_bytes=1 << 20, max_pixels=20_000_000)


def test_byte_limit() -> None:
    data = encode(face(), "PNG")
    with pytest.raises(PayloadTooLarge, match="bytes"):
        decode_image(data, "image", max_bytes=len(data) - 1, max_pixels=LIMITS["max_pixels"])
    assert decode_image(data, "image", max_bytes=len(data), max_pixels=LIMITS["max_pixels"]).size == face().size


def test_exotic_modes_decode() -> None:
    gray = np.asarray(face())
    sixteen = Image.fromarray(gray.astype(np.uint16) * 257)
    assert sixteen.mode == "I;16"
    rgba = face().convert("RGBA")
    samples = {
        "cmyk": encode(face().convert("CMYK"), "JPEG"),
        "16-bit": encode(sixteen, "PNG"),
        "palette": encode(face().convert("P"), "PNG"),
        "alpha": encode(rgba, "PNG"),
        "gray+alpha": encode(face().convert("LA"), "PNG"),
    }
    for name, data in samples.items():
        image = decode(data)
        assert image.size == face().size, name
