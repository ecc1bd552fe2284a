"""What the gallery accepts: labels, metadata and ids are checked *before* anything is committed.

The rule is "nothing is stored that cannot be answered": a stored label must travel in a URL path and
read as one identity, stored metadata must serialise back to strict JSON (no NaN, no lone surrogate, no
nesting that blows a recursion limit), and ids must fit SQLite's signed 64-bit integers.

Errors carry an HTTP status and code (``service.errors`` maps them), so a gallery error is never a 500:
bad input is a 422 naming the field, a gallery of another model is 503 ``not_ready``, and a store that
cannot answer (corrupt rows) is 503 ``store_unavailable``.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

MAX_LABEL_CHARS = 200
MAX_METADATA_BYTES = 16_384  # the stored JSON, UTF-8
MAX_METADATA_DEPTH = 16  # nested objects/arrays; {"a": 1} is depth 1
MAX_ROW_ID = 2**63 - 1  # SQLite INTEGER: larger ids, offsets or limits overflow
# control, format (bidi overrides, zero-width characters), surrogates, line and paragraph separators
REFUSED_CATEGORIES = {"Cc": "a control", "Cf": "a format", "Cs": "a surrogate", "Zl": "a line", "Zp": "a paragraph"}


class GalleryError(RuntimeError):
    """The gallery cannot do what was asked. The base class means the store cannot answer (503)."""

    status = 503
    code = "store_unavailable"


class GalleryInputError(GalleryError):
    """A bad argument; ``field`` names it, and the message starts with it."""

    status = 422
    code = "invalid_parameter"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class GalleryStale(GalleryError):
    """Entries of another model are waiting for :meth:`Gallery.reembed`."""

    status = 503
    code = "not_ready"


def _refuse_unencodable(text: str, field: str, place: str = "") -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        problem = f"is not valid Unicode text (lone surrogate at position {error.start}){place}"
        raise GalleryInputError(field, problem) from None


def validate_label(label: object) -> str:
    """The stored form of a label (NFC), or ``GalleryInputError``.

    Labels travel in URL paths and name one identity: no '/', no dot-only names, no characters that
    render invisibly or reorder text, and canonically equivalent spellings (NFC/NFD) are one label.
    """
    if not isinstance(label, str):
        raise GalleryInputError("label", "must be a string")
    _refuse_unencodable(label, "label")
    label = unicodedata.normalize("NFC", label)
    if not label.strip():
        raise GalleryInputError("label", "must be a non-empty string")
    if label != label.strip():
        raise GalleryInputError("label", "must not start or end with whitespace")
    if len(label) > MAX_LABEL_CHARS:
        raise GalleryInputError("label", f"is longer than {MAX_LABEL_CHARS} characters")
    if "/" in label:
        raise GalleryInputError("label", "must not contain '/'")
    if not label.strip("."):
        raise GalleryInputError("label", "must not consist of dots only")
    for char in label:
        kind = REFUSED_CATEGORIES.get(unicodedata.category(char))
        if kind is not None:
            raise GalleryInputError("label", f"must not contain {kind} character (U+{ord(char):04X})")
    return label


def lookup_labels(label: object) -> tuple[str, ...]:
    """The stored spellings a lookup by ``label`` matches: itself and its NFC form (older galleries may
    hold labels stored before normalisation; those stay reachable and deletable)."""
    if not isinstance(label, str):
        raise GalleryInputError("label", "must be a string")
    _refuse_unencodable(label, "label")
    return tuple(dict.fromkeys((label, unicodedata.normalize("NFC", label))))


def parse_metadata(text: str | None) -> dict[str, Any]:
    """The JSON object sent as the ``metadata`` form field (empty or absent: ``{}``), fully validated."""
    if text is None or not text.strip():
        return {}
    if len(text) > MAX_METADATA_BYTES:
        raise GalleryInputError("metadata", f"longer than {MAX_METADATA_BYTES} characters")

    def refuse_constant(name: str) -> None:
        raise GalleryInputError("metadata", f"{name} is not a JSON number (strict JSON has no NaN or Infinity)")

    try:
        value = json.loads(text, parse_constant=refuse_constant)
    except RecursionError:
        raise GalleryInputError("metadata", f"nested deeper than {MAX_METADATA_DEPTH} levels") from None
    except ValueError as error:
        raise GalleryInputError("metadata", f"not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise GalleryInputError("metadata", "must be a JSON object")
    metadata_json(value)
    return value


def metadata_json(value: object, field: str = "metadata") -> str:
    """The canonical stored JSON of one metadata object, after every check that its answer can be sent."""
    if not isinstance(value, Mapping):
        raise GalleryInputError(field, "must be a JSON object")
    _check_tree(value, field)
    text = json.dumps(value, sort_keys=True, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    if len(text.encode("utf-8")) > MAX_METADATA_BYTES:
        raise GalleryInputError(field, f"is larger than {MAX_METADATA_BYTES} bytes as JSON")
    return text


def _check_tree(root: Mapping[str, Any], field: str) -> None:
    """Iterative walk (a recursive one is what deep input attacks): depth, key types, finite numbers, text."""
    pending: list[tuple[object, str, int]] = [(root, "", 1)]
    while pending:
        value, where, depth = pending.pop()
        place = f" at {where}" if where else ""
        if isinstance(value, Mapping | list | tuple):
            if depth > MAX_METADATA_DEPTH:
                raise GalleryInputError(field, f"nested deeper than {MAX_METADATA_DEPTH} levels{place}")
            if isinstance(value, Mapping):
                for key, item in value.items():
                    if not isinstance(key, str):
                        raise GalleryInputError(field, f"object keys must be strings{place}")
                    _refuse_unencodable(key, field, f" in a key{place}")
                    name = key if len(key) <= 40 else key[:37] + "..."  # messages stay short
                    pending.append((item, f"{where}.{name}" if where else name, depth + 1))
            else:
                pending.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str):
            _refuse_unencodable(value, field, place)
        elif isinstance(value, float) and not math.isfinite(value):
            raise GalleryInputError(field, f"{value} is not a JSON number{place}")
        elif value is not None and not isinstance(value, bool | int | float):
            raise GalleryInputError(field, f"{type(value).__name__} is not a JSON value{place}")


def metadata_list(metadata: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None, count: int) -> list[str]:
    """One stored JSON text per entry: ``metadata`` is one object for all ``count`` entries or one each."""
    if metadata is None or isinstance(metadata, Mapping):
        return [metadata_json(metadata or {})] * count
    items = list(metadata)
    if len(items) != count:
        raise GalleryInputError("metadata", f"must be one JSON object or {count} of them, got {len(items)}")
    return [metadata_json(item, f"metadata[{i}]") for i, item in enumerate(items)]


def check_row_number(value: object, field: str, minimum: int = 0) -> int:
    """An id, offset or limit that SQLite can bind (signed 64 bits)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise GalleryInputError(field, "must be an integer")
    if not minimum <= value <= MAX_ROW_ID:
        raise GalleryInputError(field, f"must be between {minimum} and {MAX_ROW_ID}")
    return value
