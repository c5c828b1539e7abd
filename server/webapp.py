"""The clinic web app: ``GET /`` and ``GET /join`` answer its page, ``GET /app/{file}`` its
bundled script and style.

The files come from ``webapp/`` beside this module: ``npm run build`` in ``web/`` writes them
there, and the wheel's build step runs it (see ``setup.py``). The page is never cached (it
names the current bundle); the bundle's files carry a content hash in their names and are
cached for a year. A join token travels in the page's URL fragment (``/join#token=...``),
which browsers never send, so it reaches neither this handler nor any log.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from aiohttp import web

log = logging.getLogger("medverse.server.webapp")

#: Where the built app lives (package data of medverse.server).
WEBAPP_DIR = Path(__file__).resolve().parent / "webapp"

# A bundle file's name: esbuild's [name]-[hash] plus an extension; nothing else is served.
# (Bounded: a name longer than the file system allows would make the lookup itself fail.)
_FILE = re.compile(r"^[A-Za-z0-9_-]{1,64}-[A-Z0-9]{8}\.(js|css)(\.map)?$")
_TYPES = {"js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8"}
_MAP_TYPE = "application/json; charset=utf-8"

#: Same-origin scripts, styles and connections only (WebSocket to this server included);
#: models are decoded from blobs and data URLs by three.js's loader.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' blob: data:; connect-src 'self' ws: wss: blob: data:; "
    "media-src 'self' blob:; worker-src 'self' blob:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
)
_COMMON = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def page_response(body: bytes, policy: str) -> web.Response:
    """A built HTML page: never cached (it names the current bundles), with its Content
    Security Policy."""
    return web.Response(
        body=body,
        content_type="text/html",
        charset="utf-8",
        headers={**_COMMON, "Cache-Control": "no-cache", "Content-Security-Policy": policy},
    )


def bundle_response(path: Path, content_type: str) -> web.FileResponse:
    """One content-hashed bundle file."""
    # The name changes with the content: a year of caching is safe.
    cache = "public, max-age=31536000, immutable"
    return web.FileResponse(
        path, headers={**_COMMON, "Cache-Control": cache, "Content-Type": content_type}
    )


class WebApp:
    """Serves the built app from ``root`` (default :data:`WEBAPP_DIR`)."""

    def __init__(self, root: Path = WEBAPP_DIR) -> None:
        self.root = root
        self._warned = False

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/", self.page)
        app.router.add_get("/join", self.page)
        app.router.add_get("/app/{file}", self.file)

    def _missing(self) -> web.Response:
        if not self._warned:
            self._warned = True
            log.warning(
                "the web app is not built (%s has no index.html): run `npm ci && npm run "
                "build` in web/, or reinstall medverse with npm on the PATH",
                self.root,
            )
        return web.Response(
            status=404,
            text="The medverse web app is not built on this server "
            "(npm ci && npm run build in web/).\n",
        )

    async def page(self, request: web.Request) -> web.StreamResponse:
        """The app's page, for ``/`` and ``/join`` alike (the app reads the fragment)."""
        index = self.root / "index.html"
        try:
            body = index.read_bytes()
        except OSError:
            return self._missing()
        return page_response(body, CONTENT_SECURITY_POLICY)

    async def file(self, request: web.Request) -> web.StreamResponse:
        """One file of the bundle by its hashed name; anything else is 404."""
        name = request.match_info["file"]
        match = _FILE.match(name)
        path = self.root / name
        try:
            found = match is not None and path.is_file()
        except OSError:
            found = False
        if not found or match is None:
            raise web.HTTPNotFound(text="no such file\n")
        kind = _MAP_TYPE if match[2] else _TYPES[match[1]]
        return bundle_response(path, kind)
