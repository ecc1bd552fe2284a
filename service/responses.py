"""JSON bodies of the hot routes (/embed, /identify, /verify), written by orjson from plain dicts and arrays.

FastAPI's own path (``response_model``) validates the returned object against the model again and dumps it:
about 34 µs for an /identify or /verify answer, where building the plain dict and writing it with orjson
takes under 5 µs (``python -m bench.hot_path_steps``). For /embed, orjson also reads the float32 array's
buffer directly and writes each float32 in its shortest round-trip form (fewer bytes than the float64 repr of
the same value) instead of a list of 512 Python floats. The routes still declare their ``response_model``, so
the OpenAPI document is unchanged; tests/test_hot_path.py holds each body to its model, key for key and value
for value. /detect stays on FastAPI's path: its ~50 µs body is noise beside the detector's 40+ ms.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse


class VectorJSONResponse(JSONResponse):
    """``application/json`` rendered by orjson; numpy arrays and scalars are written as JSON numbers."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def basis_out(basis: dict[str, Any]) -> dict[str, Any]:
    """A ``threshold_basis`` as :class:`service.schemas.ThresholdBasis` dumps it: its declared fields first
    (``kind``, ``target``; both required, so a basis without them fails here as the model would), then the
    extra keys in their own order."""
    return {"kind": basis["kind"], "target": basis["target"], **basis}
