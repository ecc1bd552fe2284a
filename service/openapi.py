"""The OpenAPI schema as the service really behaves, so that /docs and /redoc do not mislead.

FastAPI's generated schema is close but wrong in ways a person trying the API notices: uploads are
``contentMediaType`` strings (Swagger UI shows a text box, not a file picker, for a list of files), optional
form fields get sample values that change the answer (``threshold=-1`` names every stranger, ``label=string``
turns a pair /verify into a 422), every error shows the same example, and the 422 FastAPI adds for path
parameters documents ``{"detail": ...}`` while the service answers ``{"error": {"code", "message"}}``.
``truthful_openapi`` rewrites the generated schema once, whatever routes exist, instead of each route
working around the generator.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

ERROR_REF = "#/components/schemas/ErrorResponse"
FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")

# One example per (status, code) the service can answer; a status not listed gets a generic one.
ERROR_EXAMPLES: dict[int, dict[str, str]] = {
    400: {"bad_image": "image: cannot decode the image (not a JPEG, PNG, BMP, PGM/PPM, TIFF, WebP or GIF file)"},
    401: {"unauthorized": "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"},
    403: {"forbidden": "this key may not modify the gallery: an admin key is required"},
    404: {"not_found": "label: no enrolled identity 'alice'"},
    413: {"too_large": "image: 12582912 bytes exceeds the limit of 10485760 bytes"},
    415: {"unsupported_media_type": "image: unsupported image type (a PDF file)"},
    422: {"invalid_parameter": "k: Input should be less than or equal to 100"},
    503: {
        "not_ready": "the service is not ready: warming up the model",
        "overloaded": "the service is overloaded: retry after the time in Retry-After",
    },
}


def _is_upload(schema: dict[str, Any]) -> bool:
    return schema.get("type") == "string" and (
        schema.get("contentMediaType") == "application/octet-stream" or schema.get("format") == "binary"
    )


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """``anyOf: [X, {"type": "null"}]`` → X, keeping title/description: optional means "not sent" in a form."""
    options = schema.get("anyOf")
    if not isinstance(options, list):
        return schema
    kept = [option for option in options if option.get("type") != "null"]
    if len(kept) != 1 or len(kept) == len(options):
        return schema
    rest = {key: value for key, value in schema.items() if key != "anyOf"}
    return {**kept[0], **rest}


def _form_property(schema: dict[str, Any], required: bool) -> dict[str, Any]:
    """A multipart field as Swagger UI should render it: a file picker for uploads, and nothing pre-filled
    in an optional field (an empty field is not sent, so the service's own default applies)."""
    schema = _without_null(schema)
    if _is_upload(schema):
        return {**_binary(schema)}
    if schema.get("type") == "array" and isinstance(schema.get("items"), dict) and _is_upload(schema["items"]):
        return {**schema, "items": _binary(schema["items"])}
    if not required and "default" not in schema:
        schema = {**schema, "examples": [""]}
    return schema


def _binary(schema: dict[str, Any]) -> dict[str, Any]:
    kept = {key: value for key, value in schema.items() if key != "contentMediaType"}
    return {**kept, "type": "string", "format": "binary"}


def _fix_form_bodies(schemas: dict[str, Any]) -> None:
    for name, body in schemas.items():
        if not name.startswith("Body_") or not isinstance(body.get("properties"), dict):
            continue
        required = set(body.get("required", ()))
        body["properties"] = {
            field: _form_property(schema, field in required) for field, schema in body["properties"].items()
        }


def _error_content(status: int) -> dict[str, Any]:
    examples = ERROR_EXAMPLES.get(status) or {"error": "what went wrong, naming the field"}
    return {
        "application/json": {
            "schema": {"$ref": ERROR_REF},
            "examples": {
                code: {"summary": code, "value": {"error": {"code": code, "message": message}}}
                for code, message in examples.items()
            },
        }
    }


def _fix_error_responses(paths: dict[str, Any]) -> None:
    """Every 4xx/5xx of every operation: the envelope, with examples of that status (not one for all)."""
    for operations in paths.values():
        for operation in operations.values():
            for status, response in operation.get("responses", {}).items():
                if str(status)[:1] in ("4", "5") and str(status).isdigit():
                    response["content"] = _error_content(int(status))
                    if response.get("description") in (None, "", "Validation Error"):
                        response["description"] = "invalid parameter (the message names it)"


def truthful(schema: dict[str, Any]) -> dict[str, Any]:
    """A corrected copy of a FastAPI-generated OpenAPI document (see the module docstring)."""
    schema = copy.deepcopy(schema)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    _fix_form_bodies(components)
    _fix_error_responses(schema.get("paths", {}))
    for name in FASTAPI_VALIDATION_SCHEMAS:
        components.pop(name, None)
    return schema


def install_truthful_openapi(app: FastAPI) -> None:
    """``app.openapi()`` answers the corrected schema (generated once, then cached like FastAPI's own)."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = truthful(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
