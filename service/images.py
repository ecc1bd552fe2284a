"""Safe decoding of uploaded images, in two steps so that memory can be budgeted before it is spent.

The format is sniffed from the magic bytes first, so a zip or a PDF is refused (415) without handing it to
any Pillow plugin, and only the plugin matching the signature is allowed to parse the bytes.
:func:`open_upload` reads the header only (``Image.open`` is lazy): size limits are checked and the
decode's memory cost (:attr:`PendingImage.cost`) is known before any pixel is decoded, so a caller can
charge it to a budget. :func:`load_upload` then decodes; given the model's :class:`Preprocessor` it lets a
JPEG decoder scale down (``draft``) and shrinks the image right after loading with the shared
preprocessing's own :meth:`Preprocessor.shrink`, so a request never holds more than one full-size image.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import warnings

from PIL import Image

from service.errors import BadImage, PayloadTooLarge, UnsupportedMediaType
from training.preprocess import UNREDUCIBLE, Preprocessor

logger = logging.getLogger("centerid.service")

# (signature, offset, Pillow format name). PGM/PPM/PBM/PFM are Pillow's "PPM" plugin; multi-picture JPEG is
# "MPO"; little-endian BigTIFF (version 43 instead of 42) is read by Pillow's TIFF plugin, big-endian
# BigTIFF is not (Pillow 13 tests the version byte at the little-endian position), so it is refused by name.
SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"II+\x00", 0, "TIFF"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"WEBP", 8, "WEBP"),
    *((f"P{n}".encode(), 0, "PPM") for n in range(1, 7)),
    (b"Pf", 0, "PPM"),  # PFM (float) greyscale and colour, also Pillow's PPM plugin
    (b"PF", 0, "PPM"),
)
PILLOW_FORMATS = {"JPEG": ("JPEG", "MPO"), "PNG": ("PNG",), "BMP": ("BMP",), "TIFF": ("TIFF",), "GIF": ("GIF",),
                  "WEBP": ("WEBP",), "PPM": ("PPM",)}  # fmt: skip
SUPPORTED = "JPEG, PNG, BMP, PGM/PPM/PFM, TIFF (classic, and little-endian BigTIFF), WebP, GIF"
BIG_ENDIAN_BIGTIFF = b"MM\x00+"
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError, KeyError)
# Pillow stores these modes in 1 or 2 bytes per pixel, every other mode (RGB included) in 4.
NARROW_MODES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
FORMAT_COPIES = {"WEBP": 4}  # libwebp decodes into its own buffer, which Pillow then copies
# EXIF orientation → the transpose that makes the image upright (as ImageOps.exif_transpose does).
ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_OBJECT_REPR = re.compile(r"\s*<[^<>]*\bat 0x[0-9a-fA-F]+>")


def configure_pillow(max_pixels: int) -> None:
    """Make Pillow's own bomb check agree with ours and turn its warning into an error (process-wide)."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def sniff_format(data: bytes) -> str | None:
    for magic, offset, name in SIGNATURES:
        if data[offset : offset + len(magic)] == magic and (name != "WEBP" or data[:4] == b"RIFF"):
            return name
    return None


def working_bytes_per_pixel(mode: str, kind: str = "") -> int:
    """Bytes per pixel that decoding and shrinking a ``mode`` image hold at once: the decoded image, the
    full-size conversion a mode ``reduce`` cannot average needs, and the premultiplied copy Pillow's
    ``reduce`` makes of LA/RGBA images."""
    total = NARROW_MODES.get(mode, 4) + FORMAT_COPIES.get(kind, 0)
    if mode in UNREDUCIBLE:
        mode = UNREDUCIBLE[mode]
        total += NARROW_MODES.get(mode, 4)
    if mode in ("LA", "RGBA"):
        total += 4
    return total


class PendingImage:
    """An upload whose header has been read and checked; nothing decoded yet.

    ``cost`` is what its decode may hold, from the header: width × height × working bytes per pixel (after
    any JPEG draft scaling). The lazy image is handed over once (:meth:`take`), so that no one keeps the
    full-size pixels alive once they have been shrunk.
    """

    def __init__(self, field: str, kind: str, image: Image.Image, size: tuple[int, int] | None = None) -> None:
        self.field = field
        self.kind = kind
        self.size = size or image.size  # the header's (width, height), before any JPEG draft scaling
        width, height = image.size
        self.cost = width * height * working_bytes_per_pixel(image.mode, kind)
        self._image: Image.Image | None = image

    def take(self) -> Image.Image:
        image, self._image = self._image, None
        if image is None:
            raise RuntimeError(f"{self.field}: this upload was already decoded")
        return image


def open_upload(
    data: bytes, field: str, max_bytes: int, max_pixels: int, preprocess: Preprocessor | None = None
) -> PendingImage:
    """Sniff, open and check one upload's header; with ``preprocess``, a JPEG is set to decode no larger
    than the model needs. Raises PayloadTooLarge (413), UnsupportedMediaType (415) or BadImage (400)."""
    if not data:
        raise BadImage(f"{field}: the file is empty")
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"{field}: {len(data)} bytes exceeds the limit of {max_bytes} bytes per file")
    kind = sniff_format(data)
    if kind is None and data.startswith(BIG_ENDIAN_BIGTIFF):
        raise UnsupportedMediaType(f"{field}: big-endian BigTIFF is not supported (supported: {SUPPORTED})")
    if kind is None:
        raise UnsupportedMediaType(f"{field}: not a supported image format ({SUPPORTED})")
    try:
        image = Image.open(io.BytesIO(data), formats=PILLOW_FORMATS[kind])
        width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLarge(f"{field}: image has more than {max_pixels} pixels") from None
    except DECODE_ERRORS as error:
        raise BadImage(f"{field}: cannot read the {kind} header ({reason(error)})") from None
    if width * height > max_pixels:
        raise PayloadTooLarge(f"{field}: {width}x{height} image exceeds the limit of {max_pixels} pixels")
    if width < 1 or height < 1:
        raise BadImage(f"{field}: image has no pixels ({width}x{height})")
    if preprocess is not None and image.format in ("JPEG", "MPO"):
        try:
            image.draft(image.mode, preprocess.draft_size())
        except DECODE_ERRORS as error:
            raise BadImage(f"{field}: cannot read the {kind} header ({reason(error)})") from None
    return PendingImage(field, kind, image, (width, height))


def load_upload(pending: PendingImage, preprocess: Preprocessor | None = None) -> Image.Image:
    """Decode a checked upload into an EXIF-upright Pillow image (first frame of animations); with
    ``preprocess``, shrunk by :meth:`Preprocessor.shrink` before it is turned upright."""
    field, kind, image = pending.field, pending.kind, pending.take()
    try:
        image.load()
        orientation = _orientation(image, field)  # read from the loaded file: PNG may keep EXIF after IDAT
        if preprocess is not None:
            image = preprocess.shrink(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLarge(f"{field}: image has more than {Image.MAX_IMAGE_PIXELS} pixels") from None
    except (*DECODE_ERRORS, MemoryError) as error:
        raise BadImage(f"{field}: cannot decode the {kind} image ({reason(error)})") from None
    if orientation in ORIENTATIONS:
        image = image.transpose(ORIENTATIONS[orientation])
    return image


def load_for_model(pending: PendingImage, preprocess: Preprocessor) -> Image.Image:
    """Decode an upload straight to the network's input: the bundle's ``preprocess.resize`` (mode and
    size) applied to :func:`load_upload`'s early-shrunk image. Only that small image outlives the call."""
    image = load_upload(pending, preprocess)
    try:
        return preprocess.resize(image)
    except (*DECODE_ERRORS, MemoryError) as error:
        raise BadImage(f"{pending.field}: cannot convert the {image.mode} image ({reason(error)})") from None


def decode_image(
    data: bytes, field: str, max_bytes: int, max_pixels: int, preprocess: Preprocessor | None = None
) -> Image.Image:
    """:func:`open_upload` then :func:`load_upload`: one upload decoded, limits checked, messages naming
    ``field``."""
    return load_upload(open_upload(data, field, max_bytes, max_pixels, preprocess), preprocess)


def _orientation(image: Image.Image, field: str) -> int:
    """The EXIF orientation tag (1 = upright); a broken EXIF block is ignored rather than failing the upload."""
    try:
        return int(image.getexif().get(0x0112, 1))
    except (*DECODE_ERRORS, ArithmeticError) as error:
        logger.info("%s: ignoring unreadable EXIF orientation (%s)", field, reason(error))
        return 1


def reason(error: BaseException) -> str:
    """A decoder's complaint, fit for a client: first line, no ``<object at 0x…>`` reprs, at most 200 chars."""
    text = str(error).splitlines()[0] if str(error).strip() else ""
    text = " ".join(_OBJECT_REPR.sub("", text).split())
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text[:200] or type(error).__name__
