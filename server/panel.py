"""The operators' panel: ``GET /panel`` answers its page, ``GET /panel/{file}`` its script and
style.

The page asks for an admin token (``medverse token --admin``), keeps it in the tab's session
storage only and sends it as ``Authorization: Bearer`` to the admin API; it never travels in a
URL, so it reaches no log. The figures come from ``/admin/rooms`` and ``/health``. The files
are built by ``npm run build`` in ``web/`` (``web/panel/build.mjs``) into the web app's folder
(:data:`~medverse.server.webapp.WEBAPP_DIR`), as ``panel.html`` and content-hashed bundles.
"""

from __future__ import annotations

import re
from pathlib import Path

from aiohttp import web

from .webapp import WEBAPP_DIR, bundle_response, page_response

# esbuild's names for the panel's two bundles; nothing else is served under /panel/.
_FILE = re.compile(r"^panel-(main|style)-[A-Z0-9]{8}\.(js|css)$")
_TYPES = {"js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8"}

#: Same-origin script, style and requests only; the panel loads nothing else.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
)


class OperatorPanel:
    """Serves the built panel from ``root`` (default :data:`WEBAPP_DIR`)."""

    def __init__(self, root: Path = WEBAPP_DIR) -> None:
        self.root = root

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/panel", self.page)
        app.router.add_get("/panel/{file}", self.file)

    async def page(self, request: web.Request) -> web.StreamResponse:
        """The panel's page (it holds no data: every figure is fetched with the token)."""
        try:
            body = (self.root / "panel.html").read_bytes()
        except OSError:
            return web.Response(
                status=404,
                text="The medverse operator panel is not built on this server "
                "(npm ci && npm run build in web/).\n",
            )
        return page_response(body, CONTENT_SECURITY_POLICY)

    async def file(self, request: web.Request) -> web.StreamResponse:
        """One bundle by its hashed name; anything else is 404."""
        name = request.match_info["file"]
        match = _FILE.match(name)
        path = self.root / name
        if match is None or not path.is_file():
            raise web.HTTPNotFound(text="no such file\n")
        return bundle_response(path, _TYPES[match[2]])
