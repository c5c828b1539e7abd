"""HTTP serving of content-addressed files: strong ETags, ``If-None-Match``, one ``Range``.

Models (:mod:`.assets`) and rendered series images (:mod:`.imaging`) are named by what they are
made from, so their ETag never changes and a client may keep them for a year. A client that has
one asks with ``If-None-Match`` (answered 304); a headset resuming a large download asks for one
open range (answered 206, or 416 when it is outside the file). A multi-range request is answered
whole (allowed by RFC 9110), as is a ``Range`` whose ``If-Range`` names another version.
"""

from __future__ import annotations

import re

from aiohttp import web

__all__ = ["byte_range", "immutable_headers", "not_modified", "parse_range"]


def immutable_headers(etag: str, content_type: str) -> dict[str, str]:
    """The headers of every answer about a content-addressed file (304, 206, 416 and 200)."""
    return {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Content-Type": content_type,
        "Cache-Control": "private, max-age=31536000, immutable",
    }


def not_modified(request: web.Request, etag: str) -> bool:
    """Whether the request's ``If-None-Match`` names ``etag`` (or ``*``): the client's copy is
    good and the answer is 304."""
    inm = request.headers.get("If-None-Match")
    return inm is not None and (inm.strip() == "*" or etag in [t.strip() for t in inm.split(",")])


def byte_range(
    request: web.Request, etag: str, size: int, headers: dict[str, str]
) -> tuple[int, int, int]:
    """The bytes to send of a ``size``-byte file, as (first, last, status): the whole file
    (200) unless the request asks for one satisfiable range (206, with ``Content-Range`` added
    to ``headers``). A range outside the file raises 416 with ``Content-Range: bytes */size``."""
    start, end, status = 0, size - 1, 200
    rng = request.headers.get("Range")
    if_range = request.headers.get("If-Range")
    if rng is not None and "," not in rng and (if_range is None or if_range.strip() == etag):
        parsed = parse_range(rng, size)
        if parsed is None:
            headers["Content-Range"] = f"bytes */{size}"
            raise web.HTTPRequestRangeNotSatisfiable(headers=headers)
        start, end = parsed
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return start, end, status


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One ``bytes=a-b`` / ``a-`` / ``-n`` range within ``size`` (None: not satisfiable)."""
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if m is None or size == 0:
        return None
    a, b = m.group(1), m.group(2)
    if a == "" and b == "":
        return None
    if a == "":
        n = int(b)
        if n == 0:
            return None
        return max(0, size - n), size - 1
    start = int(a)
    end = int(b) if b else size - 1
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)
