"""/docs (Swagger UI), /redoc and /openapi.json: served from local assets, and guarded like the API.

The assets come from the ``fastapi-offline`` package (Swagger UI's bundle and CSS, ReDoc's standalone
script), pinned in pyproject.toml, so the pages render on a closed network. With API keys configured the
three routes need a key, unless ``CENTERID_DOCS_PUBLIC=true``. A browser cannot send a header when it
navigates, so the pages also accept a cookie: ``POST /docs/login`` (the form the pages show when the key is
missing) checks the key and sets it as an HttpOnly, SameSite=Strict session cookie that only these routes
read (the API routes never accept it, so it cannot be used for cross-site requests). A key is never taken
from the query string, where access logs and browser history would keep it. Swagger UI is then
pre-authorised with that key, so "Try it out" sends it as ``X-API-Key``.
"""

from __future__ import annotations

import html
import json
import secrets
from importlib.resources import files
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from service.errors import NotFound, Unauthorized
from service.routes.common import get_settings, presented_key, require_key
from service.settings import Settings

router = APIRouter(include_in_schema=False)

COOKIE = "centerid_docs_key"
ASSETS = Path(str(files("fastapi_offline") / "static"))
ASSET_FILES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
PAGES = {"/docs": "Swagger UI", "/redoc": "ReDoc"}
NO_STORE = {"Cache-Control": "no-store"}


def page_headers(nonce: str) -> dict[str, str]:
    """The browser itself keeps the docs on this machine: ReDoc's sidebar shows a logo from a CDN
    unconditionally; this policy blocks it (and anything else off-origin) before a request is made."""
    policy = (
        "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; font-src 'self' data:; "
        f"script-src 'self' 'nonce-{nonce}'; worker-src 'self' blob:; connect-src 'self'; object-src 'none'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
    return {**NO_STORE, "Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff"}


def docs_key(
    request: Request,
    settings: Annotated[Settings, Depends(get_settings)],
    header_key: Annotated[str | None, Depends(presented_key)],
) -> tuple[bool, str | None]:
    """(allowed, the key presented): a header key, else the docs cookie, judged exactly as the API's read
    routes judge it (``require_key``); always allowed when public or when no API keys are configured."""
    if settings.docs_public or not settings.api_key_list:
        return True, None
    key = header_key or request.cookies.get(COOKIE) or None
    return _accepted(settings, key), key


def _accepted(settings: Settings, key: str | None) -> bool:
    try:
        require_key(settings, key)
    except Unauthorized:
        return False
    return True


DocsAccess = Annotated[tuple[bool, str | None], Depends(docs_key)]


@router.get("/openapi.json")
async def openapi(request: Request, access: DocsAccess) -> JSONResponse:
    allowed, _ = access
    if not allowed:
        raise Unauthorized("the API schema needs a key: send 'X-API-Key: <key>', or log in at /docs")
    return JSONResponse(request.app.openapi(), headers=NO_STORE)


@router.get("/docs")
async def swagger(request: Request, access: DocsAccess) -> HTMLResponse:
    allowed, key = access
    if not allowed:
        return login_page(request, "/docs", "invalid key" if key else None)
    nonce = secrets.token_urlsafe(16)
    return HTMLResponse(swagger_page(_root(request), key, nonce), headers=page_headers(nonce))


@router.get("/redoc")
async def redoc(request: Request, access: DocsAccess) -> HTMLResponse:
    allowed, key = access
    if not allowed:
        return login_page(request, "/redoc", "invalid key" if key else None)
    return HTMLResponse(redoc_page(_root(request)), headers=page_headers(secrets.token_urlsafe(16)))


@router.post("/docs/login")
async def login(
    request: Request,
    settings: Annotated[Settings, Depends(get_settings)],
    key: Annotated[str, Form()] = "",
    next_page: Annotated[str, Form(alias="next")] = "/docs",
) -> Response:
    """Check the key typed into the form, then go back to the page with the key as a session cookie."""
    target = next_page if next_page in PAGES else "/docs"
    if settings.api_key_list and not _accepted(settings, key.strip() or None):
        return login_page(request, target, "unknown API key" if key.strip() else "enter an API key")
    response = RedirectResponse(_root(request) + target, status_code=303)
    response.set_cookie(COOKIE, key.strip(), httponly=True, samesite="strict", path="/")
    return response


@router.post("/docs/logout")
async def logout(request: Request) -> Response:
    response = RedirectResponse(_root(request) + "/docs", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/docs/assets/{name}")
async def asset(name: str) -> FileResponse:
    if name not in ASSET_FILES:
        raise NotFound(f"name: no docs asset {name!r}")
    return FileResponse(ASSETS / name, media_type=ASSET_FILES[name], headers={"Cache-Control": "max-age=86400"})


def _root(request: Request) -> str:
    return str(request.scope.get("root_path") or "").rstrip("/")


def _script_json(value: object) -> str:
    """JSON that is safe inside a <script> element (no '</script>' can close it early)."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def swagger_page(root: str, key: str | None, nonce: str) -> str:
    config = {
        "url": f"{root}/openapi.json",
        "dom_id": "#swagger-ui",
        "layout": "BaseLayout",
        "deepLinking": True,
        "showExtensions": True,
        "validatorUrl": None,  # the online validator badge would call a public server
        "tryItOutEnabled": False,
        "persistAuthorization": False,
    }
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>centerid API — Swagger UI</title>
<link rel="icon" href="{root}/docs/assets/favicon.png"><link rel="stylesheet" href="{root}/docs/assets/swagger-ui.css">
</head><body><div id="swagger-ui"></div>
<script src="{root}/docs/assets/swagger-ui-bundle.js"></script>
<script nonce="{nonce}">
const config = {_script_json(config)};
const key = {_script_json(key)};
window.ui = SwaggerUIBundle({{
  ...config,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
  onComplete: () => {{ if (key) window.ui.preauthorizeApiKey("APIKeyHeader", key); }},
}});
</script></body></html>"""


def redoc_page(root: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>centerid API — ReDoc</title>
<link rel="icon" href="{root}/docs/assets/favicon.png"></head>
<body><redoc spec-url="{root}/openapi.json"></redoc>
<script src="{root}/docs/assets/redoc.standalone.js"></script></body></html>"""


def login_page(request: Request, target: str, problem: str | None) -> HTMLResponse:
    """401 with a form: the key goes in a POST body, never in a URL."""
    root = _root(request)
    message = f'<p role="alert" class="error">{html.escape(problem)}</p>' if problem else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>centerid API docs — key needed</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="{root}/static/style.css"></head>
<body><main class="narrow"><h1>API docs: key needed</h1>
<p>This service has API keys configured; the {PAGES[target]} page and the schema need one.
The key is kept in a cookie for this browser session and read only by the docs pages.</p>{message}
<form method="post" action="{root}/docs/login">
<label for="key">API key</label> <input id="key" name="key" type="password" autocomplete="off" required autofocus>
<input type="hidden" name="next" value="{html.escape(target)}"> <button type="submit">Open the docs</button>
</form><p><a href="{root}/">Back to the service page</a></p></main></body></html>"""
    headers = {**page_headers(secrets.token_urlsafe(16)), "WWW-Authenticate": "Bearer"}
    return HTMLResponse(page, status_code=401, headers=headers)
