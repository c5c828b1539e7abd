"""The operators' HTTP API under ``/admin``: rooms, ending a session, bans, the audit log's
head, and in a cluster its nodes and draining one.

Every request needs an admin token (``medverse token --admin``) in ``Authorization: Bearer``;
anything else is refused with a typed error and recorded. The API fails closed: on a server
running without authentication it refuses every request, since nobody could prove who they are.
In a cluster any server answers for the whole cluster: rooms and members of every node, a room
ended wherever it runs, a ban recorded and enforced on every node.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from medverse.protocol.errors import ErrorCode, ProtocolError
from medverse.protocol.messages import MAX_BAN_SECONDS, ROOM_NAME_RE

from .audit import AuditLog, AuditRecorder, PostgresAuditLog
from .httpauth import HttpAuth, http_error
from .registry import RoomRegistry

if TYPE_CHECKING:
    from .cluster import Cluster  # redis is imported only in a cluster

_SUBJECT_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,128}$")


class AdminHost(Protocol):
    """What the admin API needs of the server it runs in (:class:`~.app.Server`): named here
    so this module does not depend on the one that builds the application."""

    @property
    def cluster(self) -> Cluster | None:
        """This server's place in a cluster; None when it runs alone."""

    @property
    def shared_store(self) -> bool:
        """Whether the servers of the cluster share one durable store."""

    @property
    def audit(self) -> AuditRecorder:
        """Where security-relevant events are recorded."""

    async def ban(
        self,
        room_name: str,
        subject: str,
        reason: str,
        actor: str,
        until: float | None,
        record: bool = True,
    ) -> bool:
        """Ban ``subject`` from ``room_name`` on this node; False: no moderation here."""


class AdminAPI:
    """Routes of the admin API over this process's rooms."""

    def __init__(
        self,
        auth: HttpAuth,
        rooms: RoomRegistry,
        audit_log: Callable[[], AuditLog | PostgresAuditLog | None],
        server: AdminHost | None = None,
    ) -> None:
        self._auth = auth
        self._rooms = rooms
        self._audit_log = audit_log
        self._server = server

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/admin/rooms", self.rooms)
        app.router.add_post("/admin/rooms/{room}/end", self.end)
        app.router.add_post("/admin/bans", self.ban)
        app.router.add_get("/admin/nodes", self.nodes)
        app.router.add_post("/admin/nodes/{node}/drain", self.drain)
        app.router.add_get("/admin/audit/head", self.audit_head)
        app.router.add_get("/admin/audit/proof/{entry}", self.audit_proof)

    def _cluster(self) -> Cluster | None:
        return self._server.cluster if self._server is not None else None

    async def rooms(self, request: web.Request) -> web.Response:
        """Every live room: its type, entry mode, lobby size and members (id, name, role,
        state); in a cluster, every node's rooms, each with its ``node`` and ``url`` (other
        nodes' as they last reported them, at most a heartbeat ago)."""
        self._auth.admin(request)
        cluster = self._cluster()
        if cluster is None:
            return web.json_response({"rooms": [room.describe() for room in self._rooms]})
        from .cluster import read_rooms

        own = [r.describe() | {"node": cluster.node_id, "url": cluster.url} for r in self._rooms]
        others = [r for r in await read_rooms(cluster.redis) if r.get("node") != cluster.node_id]
        return web.json_response({"rooms": own + others})

    async def _body(self, request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            body = json.loads(await request.content.read(4096) or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise http_error(ProtocolError(ErrorCode.MALFORMED, "body is not JSON")) from None
        if not isinstance(body, dict):
            raise http_error(ProtocolError(ErrorCode.MALFORMED, "body is not a JSON object"))
        return body

    async def end(self, request: web.Request) -> web.Response:
        """End a room's session for everyone (``{"reason": "..."}`` optional), on whichever
        node of the cluster runs it."""
        actor = self._auth.admin(request)
        name = request.match_info["room"]
        body = await self._body(request)
        reason = "an administrator ended the session"
        given = body.get("reason")
        if isinstance(given, str) and 0 < len(given) <= 256:
            reason = given
        room = self._rooms.get(name)
        if room is not None:
            room.end(actor, reason)
            return web.json_response({"ended": name})
        cluster = self._cluster()
        owner = await cluster.owner(name) if cluster is not None else None
        if cluster is None or owner is None:
            raise http_error(ProtocolError(ErrorCode.NOT_FOUND, "no such live room"))
        await cluster.publish({"op": "end", "room": name, "actor": actor, "reason": reason})
        return web.json_response({"ended": name, "node": owner[0]})

    async def ban(self, request: web.Request) -> web.Response:
        """Ban an identity from a room: ``{"room", "identity", "reason"?, "duration"?}``
        (seconds; without it, until a host lifts it). Recorded and enforced at once on every
        node of the cluster: its members in the room are removed wherever it runs."""
        actor = self._auth.admin(request)
        body = await self._body(request)
        room, subject = body.get("room"), body.get("identity")
        reason, duration = body.get("reason", ""), body.get("duration")
        if not isinstance(room, str) or not ROOM_NAME_RE.match(room):
            raise http_error(ProtocolError(ErrorCode.BAD_FIELD, "room: a room name"), 400)
        if not isinstance(subject, str) or not _SUBJECT_RE.match(subject):
            raise http_error(ProtocolError(ErrorCode.BAD_FIELD, "identity: a token subject"), 400)
        if not isinstance(reason, str) or len(reason) > 256:
            raise http_error(ProtocolError(ErrorCode.BAD_FIELD, "reason: text ≤ 256"), 400)
        if duration is not None and (
            isinstance(duration, bool)
            or not isinstance(duration, int)
            or not 1 <= duration <= MAX_BAN_SECONDS
        ):
            raise http_error(
                ProtocolError(ErrorCode.OUT_OF_RANGE, f"duration: 1-{MAX_BAN_SECONDS} s"), 400
            )
        until = time.time() + duration if duration is not None else None
        server = self._server
        cluster = self._cluster()
        recorded = False
        if server is not None and (cluster is None or server.shared_store):
            # Alone, or with a store the nodes share: recorded once, here; the other nodes
            # (told below) remove the identity's members at once where the room runs.
            if not await server.ban(room, subject, reason, actor, until):
                raise http_error(ProtocolError(ErrorCode.NOT_FOUND, "no moderation here"))
            recorded = True
        if cluster is None:
            return web.json_response({"banned": subject, "room": room, "nodes": 1})
        cmd: dict[str, Any] = {"op": "ban", "room": room, "identity": subject, "reason": reason}
        cmd |= {"actor": actor, "until": until, "recorded": recorded}
        nodes = await cluster.publish(cmd)
        return web.json_response({"banned": subject, "room": room, "nodes": nodes})

    async def nodes(self, request: web.Request) -> web.Response:
        """The nodes of the cluster with their URL, capacity and load (404 on a server that
        runs alone)."""
        self._auth.admin(request)
        cluster = self._cluster()
        if cluster is None:
            raise http_error(ProtocolError(ErrorCode.NOT_FOUND, "this server runs alone"))
        from .cluster import read_nodes

        return web.json_response({"nodes": await read_nodes(cluster.redis)})

    async def drain(self, request: web.Request) -> web.Response:
        """Drain a node (its id or URL): it takes no new rooms, moves its rooms to other
        nodes (their members follow a redirect and resume) and exits once empty."""
        actor = self._auth.admin(request)
        cluster = self._cluster()
        if cluster is None:
            raise http_error(ProtocolError(ErrorCode.NOT_FOUND, "this server runs alone"))
        node = request.match_info["node"]
        from .cluster import read_nodes

        nodes = await read_nodes(cluster.redis)
        known = {n["node"] for n in nodes} | {n.get("url", "") for n in nodes}
        if node not in known:
            raise http_error(ProtocolError(ErrorCode.NOT_FOUND, "no such live node"))
        if self._server is not None:
            self._server.audit("drain_requested", actor=actor, subject=node)
        await cluster.publish({"op": "drain", "node": node, "actor": actor})
        return web.json_response({"draining": node})

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
