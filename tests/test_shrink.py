"""The early shrink: the service decodes big uploads small (JPEG draft, box reduce right after load) and the
result is the shared Preprocessor's own output — exactly for normal-size images and for the PNG path, within
a measured tolerance of the plain (unshrunk) resize for big ones (mean < 0.75, max ≤ 4 grey levels on noisy
faces), and of the full-size decode for JPEG (mean < 0.3, max ≤ 2)."""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
from conftest import encode, orl_image
from PIL import Image, ImageOps

from service.images import ORIENTATIONS, load_for_model, load_upload, open_upload, working_bytes_per_pixel
from training.preprocess import RESAMPLING, SHRINK_GAP, InputSpec, Preprocessor, shrink, shrink_factor, to_mode

SPECS = [InputSpec(1, 28, 24), InputSpec(3, 112, 96)]
BIG = 1 << 34


@functools.cache
def _noisy_pixels(scale: int) -> np.ndarray:
    face = orl_image(5, 2).convert("RGB")
    upscaled = face.resize((face.width * scale, face.height * scale), Image.Resampling.BICUBIC)
    noise = np.random.default_rng(scale).normal(0, 6, (upscaled.height, upscaled.width, 3)).astype(np.float32)
    return np.clip(np.asarray(upscaled, dtype=np.float32) + noise, 0, 255).astype(np.uint8)


def noisy_face(scale: int, mode: str = "RGB") -> Image.Image:
    """An ORL face upscaled ``scale`` times with sensor-like noise: detail at every scale, as in a photo."""
    pixels = _noisy_pixels(scale)
    if mode == "RGBA":
        alpha = np.full(pixels.shape[:2], 255, np.uint8)
        alpha[: alpha.shape[0] // 3] = 128
        return Image.fromarray(np.dstack([pixels, alpha]))
    if mode == "I;16":
        return Image.fromarray(np.asarray(Image.fromarray(pixels).convert("L")).astype(np.uint16) * 257)
    return Image.fromarray(pixels).convert(mode)


def plain_resize(image: Image.Image, preprocess: Preprocessor) -> np.ndarray:
    """The preprocessing as it was before the shrink step: convert, then one fair resize."""
    return np.asarray(to_mode(image, preprocess.spec.mode).resize(preprocess.size, RESAMPLING["bilinear"]), int)


def test_shrink_factor_is_the_largest_that_leaves_room() -> None:
    for width, height, target in [(92, 112, (24, 28)), (6300, 6300, (96, 112)), (650, 61538, (96, 112))]:
        factors = shrink_factor((width, height), target)
        room = SHRINK_GAP * max(target)
        for side, factor in zip((width, height), factors, strict=True):
            assert factor == 1 or (factor >= 2 and -(-side // factor) >= room and -(-side // (factor + 1)) < room)
            assert factor >= 2 or side // room < 2
        assert shrink_factor((height, width), target) == factors[::-1]  # rotation swaps the factors
    assert shrink_factor((92, 112), (24, 28)) == (1, 1)  # an ORL face is left alone
    assert shrink_factor((6300, 6300), (96, 112)) == (14, 14)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_normal_size_images_are_untouched(spec: InputSpec) -> None:
    preprocess = Preprocessor(spec)
    limit = 2 * SHRINK_GAP * max(preprocess.size)  # "normal size": every side under twice the room
    scales = [scale for scale in range(1, 10) if 112 * scale < limit]
    assert scales
    for scale in scales:
        image = noisy_face(scale)
        assert shrink(image, preprocess.size) is image
        np.testing.assert_array_equal(np.asarray(preprocess.resize(image), int), plain_resize(image, preprocess))


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16"])
def test_big_images_stay_within_tolerance_of_the_unshrunk_resize(spec: InputSpec, mode: str) -> None:
    preprocess = Preprocessor(spec)
    for scale in (4, 10, 30):
        image = noisy_face(scale, mode)
        difference = np.abs(np.asarray(preprocess.resize(image), int) - plain_resize(image, preprocess))
        assert difference.mean() < 0.75 and difference.max() <= 4, (scale, difference.mean(), difference.max())
        shrunk = shrink(image, preprocess.size)
        assert shrunk.width * shrunk.height <= image.width * image.height
        assert shrink(shrunk, preprocess.size) is shrunk  # shrinking twice is shrinking once


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_service_png_decode_is_exactly_the_shared_preprocessing(spec: InputSpec) -> None:
    preprocess = Preprocessor(spec)
    for scale in (1, 10, 30):
        data = encode(noisy_face(scale), "PNG", compress_level=1)
        served = load_for_model(open_upload(data, "image", BIG, BIG, preprocess), preprocess)
        with Image.open(io.BytesIO(data)) as full:
            full.load()
            np.testing.assert_array_equal(np.asarray(served), np.asarray(preprocess.resize(full)))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_service_jpeg_draft_is_within_tolerance_of_the_full_decode(spec: InputSpec) -> None:
    preprocess = Preprocessor(spec)
    for scale in (2, 10, 30):
        data = encode(noisy_face(scale), "JPEG", quality=92)
        pending = open_upload(data, "image", BIG, BIG, preprocess)
        with Image.open(io.BytesIO(data)) as full:
            full.load()
            reference = np.asarray(preprocess.resize(full), int)
            drafted = pending.cost < full.width * full.height * 4
            draftable = min(side // preprocess.draft_size()[0] for side in full.size) >= 2
        served = np.asarray(load_for_model(pending, preprocess), int)
        difference = np.abs(served - reference)
        assert difference.mean() < 0.3 and difference.max() <= 2, (scale, difference.mean(), difference.max())
        assert drafted == draftable  # big JPEGs are decoded at a reduced scale, and charged for that
    assert draftable  # the largest one was


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_after_the_shrink_matches_upright_then_preprocess(orientation: int) -> None:
    preprocess = Preprocessor(SPECS[0])
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = noisy_face(10, "L")
    served = load_for_model(
        open_upload(encode(stored, "PNG", exif=exif, compress_level=1), "image", BIG, BIG, preprocess), preprocess
    )
    with Image.open(io.BytesIO(encode(stored, "PNG", exif=exif, compress_level=1))) as full:
        upright = ImageOps.exif_transpose(full)
    difference = np.abs(np.asarray(served, int) - np.asarray(preprocess.resize(upright), int))
    assert difference.mean() < 0.3 and difference.max() <= 2


def test_a_pending_upload_hands_its_pixels_over_once() -> None:
    preprocess = Preprocessor(SPECS[1])
    pending = open_upload(encode(noisy_face(30, "RGBA"), "PNG", compress_level=1), "files[3]", BIG, BIG, preprocess)
    assert pending.cost == 2760 * 3360 * 8  # RGBA: 4 bytes decoded + 4 for the premultiplied copy reduce makes
    small = load_for_model(pending, preprocess)
    assert small.size == preprocess.size
    second = open_upload(encode(noisy_face(30, "RGBA"), "PNG", compress_level=1), "image", BIG, BIG, preprocess)
    factors = shrink_factor((2760, 3360), preprocess.size)
    early = load_upload(second, preprocess)  # what the decoder hands on: already box-reduced, still RGBA
    assert early.size == tuple(-(-side // f) for side, f in zip((2760, 3360), factors, strict=True))
    assert early.mode == "RGBA" and factors == (6, 7)
    with pytest.raises(RuntimeError, match="files\\[3\\]: this upload was already decoded"):
        pending.take()  # nothing keeps the full-size image alive once it has been shrunk


def test_working_bytes_per_pixel_counts_the_copies() -> None:
    assert working_bytes_per_pixel("L") == 1 and working_bytes_per_pixel("RGB") == 4
    assert working_bytes_per_pixel("P") == 1 + 4 + 4  # palette → RGBA → premultiplied RGBa
    assert working_bytes_per_pixel("I;16") == 2 + 4  # → I
    assert working_bytes_per_pixel("1") == 1 + 1  # → L
    assert working_bytes_per_pixel("RGB", "WEBP") == 8  # libwebp's buffer
