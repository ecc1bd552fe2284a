"""Safe decoding of uploaded images.

The format is sniffed from the magic bytes first, so a zip or a PDF is refused (415) without handing it to
any Pillow plugin, and only the plugin matching the signature is allowed to parse the bytes. Size limits
are checked on the header (``Image.open`` is lazy) before any pixel is decoded.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings

from PIL import Image, ImageOps

from service.errors import BadImage, PayloadTooLarge, UnsupportedMediaType

logger = logging.getLogger("centerid.service")

# (signature test, Pillow format name). PGM/PPM/PBM are Pillow's "PPM" plugin; multi-picture JPEG is "MPO".
SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"WEBP", 8, "WEBP"),
    *((f"P{n}".encode(), 0, "PPM") for n in range(1, 7)),
)
PILLOW_FORMATS = {"JPEG": ("JPEG", "MPO"), "PNG": ("PNG",), "BMP": ("BMP",), "TIFF": ("TIFF",), "GIF": ("GIF",),
                  "WEBP": ("WEBP",), "PPM": ("PPM",)}  # fmt: skip
SUPPORTED = "JPEG, PNG, BMP, PGM/PPM, TIFF, WebP, GIF"
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError, KeyError)


def configure_pillow(max_pixels: int) -> None:
    """Make Pillow's own bomb check agree with ours and turn its warning into an error (process-wide)."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def sniff_format(data: bytes) -> str | None:
    for magic, offset, name in SIGNATURES:
        if data[offset : offset + len(magic)] == magic and (name != "WEBP" or data[:4] == b"RIFF"):
            return name
    return None


def decode_image(data: bytes, field: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode one upload into a fully loaded, EXIF-upright Pillow image (first frame of animations).

    Raises PayloadTooLarge (413), UnsupportedMediaType (415) or BadImage (400); messages name ``field``.
    """
    if not data:
        raise BadImage(f"{field}: the file is empty")
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"{field}: {len(data)} bytes exceeds the limit of {max_bytes} bytes per file")
    kind = sniff_format(data)
    if kind is None:
        raise UnsupportedMediaType(f"{field}: not a supported image format ({SUPPORTED})")
    try:
        image = Image.open(io.BytesIO(data), formats=PILLOW_FORMATS[kind])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLarge(f"{field}: image has more than {max_pixels} pixels") from None
    except DECODE_ERRORS as error:
        raise BadImage(f"{field}: cannot read the {kind} header ({_reason(error)})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLarge(f"{field}: {width}x{height} image exceeds the limit of {max_pixels} pixels")
    if width < 1 or height < 1:
        raise BadImage(f"{field}: image has no pixels ({width}x{height})")
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLarge(f"{field}: image has more than {max_pixels} pixels") from None
    except (*DECODE_ERRORS, MemoryError) as error:
        raise BadImage(f"{field}: cannot decode the {kind} image ({_reason(error)})") from None
    return _upright(image, field)


def _upright(image: Image.Image, field: str) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block is ignored rather than failing the upload."""
    try:
        return ImageOps.exif_transpose(image)
    except DECODE_ERRORS as error:
        logger.info("%s: ignoring unreadable EXIF orientation (%s)", field, _reason(error))
        return image


def _reason(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:200]
