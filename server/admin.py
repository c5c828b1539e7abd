"""The operators' HTTP API under ``/admin``: rooms, ending a session, the audit log's head.

Every request needs an admin token (``medverse token --admin``) in ``Authorization: Bearer``;
anything else is refused with a typed error and recorded. The API fails closed: on a server
running without authentication it refuses every request, since nobody could prove who they are.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from aiohttp import web

from medverse.protocol.errors import ErrorCode, ProtocolError

from .audit import AuditLog, PostgresAuditLog
from .httpauth import HttpAuth, http_error
from .registry import RoomRegistry


class AdminAPI:
    """Routes of the admin API over this process's rooms."""

    def __init__(
        self,
        auth: HttpAuth,
        rooms: RoomRegistry,
        audit_log: Callable[[], AuditLog | PostgresAuditLog | None],
    ) -> None:
        self._auth = auth
        self._rooms = rooms
        self._audit_log = audit_log

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/admin/rooms", self.rooms)
        app.router.add_post("/admin/rooms/{room}/end", self.end)
        app.router.add_get("/admin/audit/head", self.audit_head)
        app.router.add_get("/admin/audit/proof/{entry}", self.audit_proof)

    async def rooms(self, request: web.Request) -> web.Response:
        """Every live room: its type, entry mode, lobby size and members (id, name, role,
        state)."""
        self._auth.admin(request)
        return web.json_response({"rooms": [room.describe() for room in self._rooms]})

    async def end(self, request: web.Request) -> web.Response:
        """End a room's session for everyone (``{"reason": "..."}`` optional)."""
        actor = self._auth.admin(request)
        name = request.match_info["room"]
        room = self._rooms.get(name)
        if room is None:
            raise http_error(ProtocolError(ErrorCode.NOT_FOUND, "no such live room"))
        reason = "an administrator ended the session"
        if request.can_read_body:
            try:
                body = json.loads(await request.content.read(4096) or b"{}")
            except (ValueError, UnicodeDecodeError):
                raise http_error(ProtocolError(ErrorCode.MALFORMED, "body is not JSON")) from None
            given = body.get("reason") if isinstance(body, dict) else None
            if isinstance(given, str) and 0 < len(given) <= 256:
                reason = given
        room.end(actor, reason)
        return web.json_response({"ended": name})

    async def audit_head(self, request: web.Request) -> web.Response:
        """The newest signed tree head of the audit log and the key that verifies it."""
        self._auth.admin(request)
        audit = self._audit_log()
        head = await audit.signed_head_async() if audit is not None else None
        if head is None:
            raise http_error(ProtocolError(ErrorCode.NOT_FOUND, "the audit log is empty"))
        return web.json_response(head)

    async def audit_proof(self, request: web.Request) -> web.Response:
        """An inclusion proof of entry N against the newest signed tree head."""
        self._auth.admin(request)
        audit = self._audit_log()
        if audit is None:
            raise http_error(ProtocolError(ErrorCode.NOT_FOUND, "the audit log is not open"))
        raw = request.match_info["entry"]
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
            raise http_error(
                ProtocolError(ErrorCode.BAD_FIELD, "the entry is a positive whole number"), 400
            )
        try:
            return web.json_response(await audit.proof_async(int(raw)))
        except ValueError as exc:  # no signed head yet, or no such entry in it
            raise http_error(ProtocolError(ErrorCode.NOT_FOUND, str(exc)[:200])) from None
