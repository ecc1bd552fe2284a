"""The page at ``/``: plain static files from ``service/web`` (no build step), public like /health.

The page holds no data of its own: everything it shows comes from the API, with the key the person types
(kept in the tab's sessionStorage). Its Content-Security-Policy allows this origin only, so the browser
itself refuses any request that would leave the machine (fonts, scripts, styles are all local).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.errors import NotFound

router = APIRouter(include_in_schema=False)

WEB = Path(str(files("service") / "web"))
STATIC_FILES = {"app.js": "text/javascript", "api.js": "text/javascript", "style.css": "text/css"}
POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {"Content-Security-Policy": POLICY, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(WEB / "index.html", media_type="text/html", headers=HEADERS)


@router.get("/static/{name}")
async def static(name: str) -> FileResponse:
    if name not in STATIC_FILES:
        raise NotFound(f"name: no static file {name!r}")
    return FileResponse(WEB / name, media_type=STATIC_FILES[name], headers=HEADERS)
