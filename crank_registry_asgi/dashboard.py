"""``GET /ui``: the read-only dashboard, static files shipped in the package.

The page (``ui/index.html``), its script (``ui/app.js``) and its style sheet
(``ui/style.css``) are plain files of this package: no build step, nothing
fetched from elsewhere. The script reads the JSON API the page is served
beside (``/health``, ``/capabilities``, ``/workers``) and follows
``/watch``, with paths relative to the page, so the dashboard works as
well when the app is mounted under a prefix.

The files are read once, when the app is made. Every answer forbids what
the page does not need (``Content-Security-Policy``: scripts, styles and
requests of this origin only, no frames), and asks the browser to check
for a newer file at each load (``Cache-Control: no-cache``), so that an
upgrade of the controller is seen at the next reload.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Awaitable, Callable, Mapping

import attrs
from starlette.requests import Request
from starlette.responses import Response

__all__ = ["ASSETS", "SECURITY_HEADERS", "Asset", "Dashboard"]


@attrs.frozen
class Asset:
    """One file of the dashboard: its name in ``ui/`` and the media type it is served as."""

    file: str
    media_type: str


#: The dashboard's paths and what each serves.
ASSETS: Mapping[str, Asset] = {
    "/ui": Asset("index.html", "text/html"),
    "/ui/app.js": Asset("app.js", "text/javascript"),
    "/ui/style.css": Asset("style.css", "text/css"),
}

#: Headers of every dashboard answer.
SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class Dashboard:
    """The dashboard's files, read from the package, and an endpoint for each path."""

    def __init__(self) -> None:
        folder = importlib.resources.files(__package__) / "ui"
        self._bodies = {path: (folder / asset.file).read_bytes() for path, asset in ASSETS.items()}

    def endpoint(self, path: str) -> Callable[[Request], Awaitable[Response]]:
        """The endpoint that serves the file of ``path`` (one of :data:`ASSETS`)."""
        body = self._bodies[path]
        media_type = f"{ASSETS[path].media_type}; charset=utf-8"

        async def serve(request: Request) -> Response:
            return Response(body, media_type=media_type, headers=dict(SECURITY_HEADERS))

        serve.__doc__ = f"GET {path}: the dashboard's {ASSETS[path].file}."
        return serve
