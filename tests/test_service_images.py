"""service.images: every supported format decodes to the same pixels; limits and bad files are refused typed."""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import encode, orl_file, png_header_only
from PIL import Image

from service.errors import BadImage, PayloadTooLarge, UnsupportedMediaType
from service.images import configure_pillow, decode_image, reason
from training.bundle import load_bundle
from training.preprocess import to_mode

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


# -- robustness: every mode, BigTIFF, clean messages --------------------------------------------------------
ALL_MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I",
             "I;16", "I;16B", "I;16L", "I;16N", "F"]  # fmt: skip
ACCEPTED_FORMATS = ["JPEG", "PNG", "BMP", "TIFF", "GIF", "WEBP", "PPM"]


def saved_in_every_mode() -> dict[str, bytes]:
    """A face in every Pillow mode, saved in every accepted format Pillow can write that mode to."""
    samples = {}
    for mode in ALL_MODES:
        image = face().convert("RGB").convert(mode) if mode not in ("La", "RGBa", "I;16B", "I;16L", "I;16N") else None
        if image is None:
            image = Image.new(mode, face().size)
        for fmt in ACCEPTED_FORMATS:
            buffer = io.BytesIO()
            try:
                image.save(buffer, format=fmt)
            except (OSError, ValueError, KeyError):
                continue  # Pillow cannot write this mode in this format: nobody can upload it either
            samples[f"{mode}.{fmt.lower()}"] = buffer.getvalue()
    return samples


def test_every_savable_mode_decodes_and_preprocesses(bundle_dir: Path) -> None:
    preprocess = load_bundle(bundle_dir).preprocess
    samples = saved_in_every_mode()
    assert {"LAB.tiff", "CMYK.tiff", "YCbCr.tiff", "I;16.png", "F.tiff", "1.png", "PA.tiff"} <= set(samples)
    for name, data in samples.items():
        tensor = preprocess(decode_image(data, name, **LIMITS, preprocess=preprocess))
        assert tensor.shape == (preprocess.spec.channels, preprocess.spec.height, preprocess.spec.width), name
        assert torch.isfinite(tensor).all(), name


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("target", ["L", "RGB"])
def test_to_mode_handles_every_pillow_mode(mode: str, target: str) -> None:
    converted = to_mode(Image.new(mode, (9, 7)), target)
    assert converted.mode == target and converted.size == (9, 7)


def test_lab_converts_through_its_colorimetric_rgb() -> None:
    lab = face().convert("RGB").convert("LAB")
    expected = np.asarray(lab.convert("RGB").convert("L"))
    np.testing.assert_array_equal(np.asarray(to_mode(lab, "L")), expected)
    assert np.abs(expected.astype(int) - np.asarray(face(), dtype=int)).mean() < 2  # and it is the face


def test_little_endian_bigtiff_is_accepted_and_big_endian_is_refused_by_name() -> None:
    buffer = io.BytesIO()
    face().save(buffer, format="TIFF", big_tiff=True)
    data = buffer.getvalue()
    assert data[:4] == b"II+\x00" and struct.unpack("<HHQ", data[4:16]) == (8, 0, 16)  # a real BigTIFF header
    np.testing.assert_array_equal(np.asarray(decode(data)), np.asarray(face()))
    with pytest.raises(UnsupportedMediaType, match="image: big-endian BigTIFF is not supported"):
        decode(b"MM\x00+" + data[4:])  # Pillow 13 cannot read these: refused by name, not "not an image"


def test_error_messages_carry_no_python_reprs() -> None:
    for data in (b"BM" + b"\x00" * 60, b"II*\x00" + b"\xff" * 40, b"GIF89a" + b"\x01" * 20):
        with pytest.raises(BadImage) as caught:
            decode(data, "image")
        message = caught.value.message
        assert message.startswith("image: ") and "0x" not in message and "object at" not in message, message
    assert reason(OSError("cannot identify image file <_io.BytesIO object at 0x7f3a2c>")) == (
        "cannot identify image file"
    )
    assert reason(ValueError("")) == "ValueError"
