"""Typed service errors and the handlers that turn every failure into ``{"error": {"code", "message"}}``.

Bad input never surfaces as a 500: validation errors keep the envelope and name the field, and the
catch-all (:class:`CatchAllMiddleware`, plus a last-resort handler) answers a generic message with
``Connection: close`` (the details go to the log, never to the client).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.gallery_input import GalleryError

logger = logging.getLogger("centerid.service")


class ServiceError(Exception):
    """An error with an HTTP status and a stable machine-readable code."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers


class BadImage(ServiceError):
    status, code = 400, "bad_image"


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class PayloadTooLarge(ServiceError):
    status, code = 413, "too_large"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class InvalidParameter(ServiceError):
    status, code = 422, "invalid_parameter"


class NoFace(ServiceError):
    """An upload to an aligning bundle in which the detector found no face (the message names the field)."""

    status, code = 422, "no_face"


class NotReady(ServiceError):
    status, code = 503, "not_ready"


class Overloaded(ServiceError):
    """Too busy to take this request now (memory budget, full inference queue, or its deadline passed):
    503 with ``Retry-After``, so that a client backs off instead of hammering."""

    status, code = 503, "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, int(retry_after_s)))})


HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_parameter",
    503: "not_ready",
}


def envelope(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(envelope(code, message), status_code=status, headers=headers)


def describe_validation(errors: list[Any]) -> str:
    """``[{'loc': ('body', 'k'), 'msg': ...}]`` → ``"k: Input should be ..."`` (the field first)."""
    parts = []
    for error in errors:
        location = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path", "header", "form")]
        field = ".".join(location) or "request"
        parts.append(f"{field}: {error.get('msg', 'invalid value')}")
    return "; ".join(parts) or "invalid request"


async def _service_error(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ServiceError)
    return error_response(error.status, error.code, error.message, error.headers)


async def _validation_error(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    return error_response(422, "invalid_parameter", describe_validation(list(error.errors())))


async def _http_error(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    code = HTTP_CODES.get(error.status_code, "error")
    message = error.detail if isinstance(error.detail, str) else code.replace("_", " ")
    return error_response(error.status_code, code, message, getattr(error, "headers", None))


async def _gallery_error(_: Request, error: Exception) -> JSONResponse:
    """Gallery errors carry their status: 422 for bad input (the message names the field), else 503."""
    assert isinstance(error, GalleryError)
    return error_response(error.status, error.code, str(error))


CLOSE = {"Connection": "close"}
INTERNAL = envelope("internal_error", "internal server error")


async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "internal server error", CLOSE)


class CatchAllMiddleware:
    """Answer any exception the routes let through with the 500 envelope and ``Connection: close``, and
    swallow it, so that it never reaches uvicorn.

    Starlette's own catch-all handler re-raises after answering; uvicorn then drops the connection
    without having said so (no ``Connection: close``), and a keep-alive client's next request on it
    fails. Here the client is told, and uvicorn closes the connection cleanly after the response.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:  # the status line is out: only closing the connection can signal the failure
                raise
            response = JSONResponse(INTERNAL, status_code=500, headers=CLOSE)
            await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(GalleryError, _gallery_error)
    app.add_exception_handler(Exception, _unexpected_error)
