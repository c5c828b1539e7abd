"""The operators' HTTP API under ``/admin``: rooms, ending a session, the audit log's head.

Every request needs an admin token (``medverse token --admin``) in ``Authorization: Bearer``;
anything else is refused with a typed error and recorded. The API fails closed: on a server
running without authentication it refuses every request, since nobody could prove who they are.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from aiohttp import web

from medverse.protocol.errors import ErrorCode, ProtocolError

from . import moderation
from .assets import http_error
from .audit import prove

if TYPE_CHECKING:
    from .world import World


class AdminAPI:
    """Routes of the admin API for one world."""

    def __init__(self, world: World) -> None:
        self.world = world

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/admin/rooms", self.rooms)
        app.router.add_post("/admin/rooms/{room}/end", self.end)
        app.router.add_get("/admin/audit/head", self.audit_head)
        app.router.add_get("/admin/audit/proof/{entry}", self.audit_proof)

    def _admin(self, request: web.Request) -> str:
        """The operator's subject, or a typed refusal (recorded in the audit log)."""
        world = self.world
        verifier = world.verifier
        try:
            if verifier is None:
                raise ProtocolError(
                    ErrorCode.FORBIDDEN, "the admin API is off on a server without authentication"
                )
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise ProtocolError(ErrorCode.UNAUTHORIZED, "an admin bearer token is needed")
            return verifier.verify_admin(token.strip())
        except ProtocolError as err:
            world.metrics.auth_refusals.labels(err.code.value).inc()
            world.record(
                "http_refused", peer=request.remote, path=request.path, code=err.code.value
            )
            raise http_error(err) from None

    async def rooms(self, request: web.Request) -> web.Response:
        """Every live room: entry mode, lobby size and members (id, name, role, state)."""
        self._admin(request)
        out = []
        for room in self.world.rooms.values():
            out.append(
                {
                    "room": room.name,
                    "entry": room.entry,
                    "ended": room.ended,
                    "lobby": len(room.lobby),
                    "members": [
                        {
                            "id": m.id,
                            "name": m.name,
                            "role": m.identity.role,
                            "connected": m.session is not None,
                            "paused": m.paused,
                            "muted": m.muted,
                        }
                        for m in room.members.values()
                    ],
                }
            )
        return web.json_response({"rooms": out})

    async def end(self, request: web.Request) -> web.Response:
        """End a room's session for everyone (``{"reason": "..."}`` optional)."""
        actor = self._admin(request)
        name = request.match_info["room"]
        room = self.world.rooms.get(name)
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
        moderation.end_session(room, actor, reason)
        return web.json_response({"ended": name})

    async def audit_head(self, request: web.Request) -> web.Response:
        """The newest signed tree head of the audit log and the key that verifies it."""
        self._admin(request)
        audit = self.world.audit
        head = audit.signed_head() if audit is not None else None
        if head is None:
            raise http_error(ProtocolError(ErrorCode.NOT_FOUND, "the audit log is empty"))
        return web.json_response(head)

    async def audit_proof(self, request: web.Request) -> web.Response:
        """An inclusion proof of entry N against the newest signed tree head."""
        self._admin(request)
        audit = self.world.audit
        if audit is None:
            raise http_error(ProtocolError(ErrorCode.NOT_FOUND, "the audit log is not open"))
        try:
            n = int(request.match_info["entry"])
            audit.sign()
            return web.json_response(prove(audit.data_dir, n))
        except ValueError as exc:
            raise http_error(ProtocolError(ErrorCode.NOT_FOUND, str(exc)[:200])) from None
