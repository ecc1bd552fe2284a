"""JSON bodies with embeddings in them, written by orjson straight from the float32 array.

FastAPI's own path (``response_model`` → pydantic-core ``dump_json``) first turns the array into a Python list
of floats and validates every one against the model; orjson reads the numpy buffer directly and writes each
float32 in its shortest round-trip form (fewer bytes than the float64 repr of the same value). The route still
declares its ``response_model``, so the OpenAPI document is unchanged; a test holds the body to that model.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse


class VectorJSONResponse(JSONResponse):
    """``application/json`` rendered by orjson; numpy arrays and scalars are written as JSON numbers."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
