"""The aiohttp application: ``/ws`` for rooms, the asset and admin HTTP APIs, ``/health`` and
``/metrics``.

``create_app(config, plugins=..., room_types=...)`` returns a plain
:class:`aiohttp.web.Application`, so medverse can run on its own (``medverse serve``) or be
mounted in another aiohttp app with ``add_subapp``. The data flows one way::

    socket -> session (protocol state machine, limits) -> room (plugins) -> entity table
           -> tick loop (one encode of every room) -> fan-out to the members' connections
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from aiohttp import web

from medverse.protocol.clinic import Access as AccessMsg
from medverse.protocol.clinic import Moved
from medverse.protocol.errors import ErrorCode, ProtocolError
from medverse.protocol.messages import (
    CORE_CLIENT_MESSAGES,
    CORE_SERVER_MESSAGES,
    message_registry,
)

from .admin import AdminAPI
from .assets import AssetService, AssetStore
from .audio import SpatialAudio
from .audit import AuditRecorder
from .auth import SECRET_FILE, Identity, TokenVerifier, load_or_create_secret
from .bans import PostgresBanStore
from .clinic import ClinicService
from .clinicdef import Clinic, load_clinic
from .clock import FixedRateClock
from .config import ServerConfig
from .entities import EntityTable
from .httpauth import HttpAuth
from .imaging import ImageService, ImageStore
from .integrity import AssetScrub, Integrity
from .limits import ConnectionBudget
from .mediastore import PostgresAssetIndex, PostgresSeriesIndex
from .metrics import Metrics, Traffic
from .moderation import Moderation, ModerationService
from .objects import SharedObjects
from .panel import OperatorPanel
from .pg import Database
from .plugins import (
    RoomPlugin,
    RoomType,
    ServerContext,
    ServerPlugin,
    as_server_plugin,
    plugin_class,
)
from .policy import RoomPolicy
from .registry import RoomRegistry
from .room import RoomServices
from .roomaccess import Access, RoomAccess, derive_key
from .session import (
    CLOSE_GOING_AWAY,
    CLOSE_TOO_MANY_CONNECTIONS,
    Session,
    SessionServices,
    admission,
)
from .standing import PostgresStandingStore
from .store import PostgresObjectStore
from .tick import TickLoop
from .transport import WebSocketConnection
from .viewer import SharedImages
from .webapp import WebApp

if TYPE_CHECKING:
    from .cluster import Cluster, Load

log = logging.getLogger("medverse")


def default_plugins() -> list[ServerPlugin | type[RoomPlugin]]:
    """The plugins every room runs unless told otherwise: moderation, spatial audio, shared
    objects, the clinic's transfers and image viewers (fresh instances: each app gets its own)."""
    return [ModerationService(), SpatialAudio(), SharedObjects(), ClinicService(), SharedImages()]


def make_verifier(cfg: ServerConfig) -> TokenVerifier | None:
    """The join-token verifier the settings ask for (None only with ``no_auth``)."""
    if cfg.no_auth:
        log.warning("authentication is OFF: anyone who can reach this server can join any room")
        return None
    if cfg.auth_public_key:
        return TokenVerifier(public_key_pem=Path(cfg.auth_public_key).read_bytes())
    if cfg.auth_secret:
        return TokenVerifier(secret=cfg.auth_secret.encode())
    secret, created = load_or_create_secret(cfg.data_dir)
    if created:
        log.info("created a token secret in %s", Path(cfg.data_dir) / SECRET_FILE)
    return TokenVerifier(secret=secret)


class Server:
    """One medverse server process: its parts, wired together once."""

    def __init__(
        self,
        config: ServerConfig,
        plugins: Sequence[ServerPlugin | type[RoomPlugin]],
        room_types: Sequence[RoomType] = (),
    ) -> None:
        self.config = config
        #: Tasks started for cluster commands (kept so they are not collected mid-way).
        self._background: set[asyncio.Task[Any]] = set()
        self.metrics = Metrics()
        self.traffic = Traffic()
        self.audit = AuditRecorder()
        #: The clinic definition (``--clinic``): room types, their policies, the waiting room.
        self.clinic: Clinic | None = load_clinic(config.clinic) if config.clinic else None
        self.verifier = make_verifier(config)
        #: Signs the credentials a moved member uses for its new room's HTTP APIs.
        self.room_access: RoomAccess | None = None
        if self.verifier is not None:
            secret = self.verifier.shared_secret
            self.room_access = RoomAccess(
                derive_key(secret) if secret is not None else None, config.room_access_ttl
            )
        self.policy = RoomPolicy(config, self.clinic)
        self.plugins = [as_server_plugin(p) for p in plugins]
        names = [p.name for p in self.plugins]
        if len(set(names)) != len(names):
            raise ValueError(f"two plugins have one name: {names}")
        if self.clinic is not None:
            # The clinic's room types first: a room its file names follows the file.
            room_types = [*clinic_room_types(self.clinic, names), *room_types]
        classes = [plugin_class(p) for p in self.plugins]
        #: What clients may send and what the server sends: the core's messages and every
        #: plugin's.
        self.client_messages = message_registry(
            CORE_CLIENT_MESSAGES, *(c.messages for c in classes)
        )
        self.server_messages = message_registry(
            # ``moved`` and ``access`` are the core's (any plugin may move a member), declared
            # with the clinic.
            CORE_SERVER_MESSAGES,
            (Moved, AccessMsg),
            *((m for m in c.server_messages if m not in (Moved, AccessMsg)) for c in classes),
        )
        self.clock = FixedRateClock(1.0 / config.tick_rate)
        self.table = EntityTable()
        #: This server's place in a cluster (``redis_url``); None when it runs alone.
        self.cluster: Cluster | None = None
        if config.redis_url:
            from .cluster import Cluster  # redis is needed only in a cluster

            self.cluster = Cluster(config)
        #: Called once this server, draining, has handed every room to other servers (set
        #: through :meth:`when_drained`).
        self._on_drained: Callable[[], None] = lambda: None
        self.rooms = RoomRegistry(
            RoomServices(
                config,
                self.table,
                self.clock,
                self.traffic,
                self.audit,
                self._resume_token if self.cluster is not None else None,
            ),
            self.plugins,
            room_types,
            pseudonymous=self.policy.pseudonymous,
            settings=self.policy.settings,
            first_member_id=self._first_member_id if self.cluster is not None else None,
            on_closed=self.cluster.closed if self.cluster is not None else None,
        )
        self.tick = TickLoop(self.clock, self.table, self.rooms, self.metrics, self.traffic)
        self.assets: AssetStore | None = None
        self.images: ImageStore | None = None
        #: Connections per address and those not yet identified (no valid hello).
        self.budget = ConnectionBudget(
            config.max_connections_per_address,
            config.max_unidentified_per_address,
            config.max_unidentified_connections,
        )
        self.integrity = Integrity(self.metrics.registry, self.audit)
        self.scrub: AssetScrub | None = None
        #: PostgreSQL, when ``database_url`` is set (else SQLite files in the data directory).
        self.database: Database | None = None
        self._sessions: set[Session] = set()
        self.sessions = SessionServices(
            config,
            self.rooms,
            self.verifier,
            self.policy,
            self.audit,
            self.metrics,
            self.traffic,
            self.client_messages,
            self.server_messages,
            self.budget,
            self.cluster,
            room_access=self.room_access,
        )
        self.metrics.rooms.set_function(lambda: len(self.rooms))
        self.metrics.members.set_function(self.rooms.member_count)
        self.metrics.unidentified.set_function(lambda: self.budget.unidentified)
        self.http_auth = HttpAuth(
            self.verifier,
            self.audit,
            lambda code: self.metrics.auth_refusals.labels(code).inc(),
            self._http_identity,
            self.room_access,
            self._access_holder,
        )

    # ----------------------------------------------------------------- cluster

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once this server, draining, has handed every room to other
        servers (the process then exits)."""
        self._on_drained = callback

    def _resume_token(self, room: str, member_id: int, identity: Identity, slots: int) -> str:
        assert self.cluster is not None and self.cluster.tokens is not None
        return self.cluster.tokens.issue(room, member_id, identity.subject, slots)

    def _first_member_id(self, room: str) -> int:
        """New members of a room get ids from here: each lease generation its own block of
        65,536, so members resuming from the room's previous server keep theirs."""
        assert self.cluster is not None
        gen = self.cluster.generation(room)
        return 1 + ((gen - 1) % 32767) * 65536 if gen > 0 else 1

    def _load(self) -> Load:
        from .cluster import Load

        work = self.tick.work[-90:]
        p99 = float(np.percentile(np.array(work), 99)) * 1000.0 if work else 0.0
        return Load(self.rooms.member_count(), len(self.rooms), p99, 0.0)

    def cluster_command(self, cmd: dict[str, Any]) -> None:
        """An operator's command from any node of the cluster: ``end`` a room this node runs,
        or ``ban`` an identity from a room (recorded here, and its members removed if the
        room runs here)."""
        op = cmd.get("op")
        name = cmd.get("room")
        actor = cmd.get("actor")
        if not isinstance(name, str) or not isinstance(actor, str):
            return
        reason = cmd.get("reason") if isinstance(cmd.get("reason"), str) else ""
        room = self.rooms.get(name)
        if op == "end":
            if room is not None and not room.ended:
                room.end(actor, reason or "an administrator ended the session")
        elif op == "ban":
            subject = cmd.get("identity")
            until = cmd.get("until")
            if not isinstance(subject, str) or not (until is None or isinstance(until, float)):
                return
            # With each node's own store, each records the ban. With a store they share, one
            # node records it (the sender, or the node the command names) and the others
            # only remove the identity's members where the room runs.
            recorder = cmd.get("recorder")
            me = self.cluster.node_id if self.cluster is not None else None
            record = not cmd.get("recorded") and (
                not self.shared_store or recorder is None or recorder == me
            )
            task = asyncio.get_running_loop().create_task(
                self.ban(name, subject, reason or "", actor, until, record=record)
            )
            self._background.add(task)
            task.add_done_callback(self._background_done)

    @property
    def shared_store(self) -> bool:
        """Whether the servers of the cluster share one durable store (bans, objects,
        audit): PostgreSQL through ``database_url``."""
        return bool(getattr(self.config, "database_url", ""))

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a cluster command failed: %s", task.exception())

    async def ban(
        self,
        room_name: str,
        subject: str,
        reason: str,
        actor: str,
        until: float | None,
        record: bool = True,
    ) -> bool:
        """Ban ``subject`` from ``room_name`` on this node: recorded in its store (unless
        ``record`` is False: another node recorded it in the store they share), and every
        device of the identity removed if the room runs here. False: no moderation here.
        The ban is stored in a thread: the event loop never waits for the database."""
        room = self.rooms.get(room_name)
        moderation = room.plugin(Moderation) if room is not None else None
        if moderation is not None:
            await moderation.ban_identity(subject, reason, actor, until, record)
            return True
        if not record:
            return True
        for plugin in self.plugins:
            if isinstance(plugin, ModerationService):
                ban = await asyncio.to_thread(
                    plugin.store.add, room_name, subject, subject, reason, actor, until
                )
                self.audit(
                    "banned",
                    room=room_name,
                    actor=actor,
                    subject=subject,
                    ban=ban.id,
                    until=int(until) if until is not None else None,
                    reason=reason,
                )
                return True
        return False

    def session_ended(self, room: str) -> bool:
        """Whether a host ended ``room``'s session and the room has not closed since."""
        live = self.rooms.get(room)
        return live is not None and live.ended

    def _access_holder(self, access: Access) -> Identity:
        """The identity of the member of ``access.room`` a room access credential names, as
        it is now; ``unauthorized`` once no member there holds that subject and join token
        (moved on, removed, left: the credential is revoked with the membership)."""
        room = self.rooms.get(access.room)
        if room is not None:
            for view in room.views.values():
                who = view.identity
                if who.subject == access.subject and who.token_id == access.token_id:
                    return who
        raise ProtocolError(ErrorCode.UNAUTHORIZED, "that member is no longer in this room")

    async def _http_identity(self, identity: Identity) -> Identity:
        """``identity`` (from a valid token) as its room's session sees it now: refused if a
        host removed that token or banned the identity, else with the role and grants a host
        gave it, so HTTP decides from the same grants as the room connection."""
        room = self.rooms.get(identity.room)
        moderation = room.plugin(Moderation) if room is not None else None
        if moderation is not None:
            if moderation.reading:
                # Its removals and standing are not known yet: the same answer as a join gets
                # while a room is not ready, which clients retry.
                raise ProtocolError(ErrorCode.ROOM_MOVING, "the room is opening; try again")
            refusal = moderation.refusal(identity)
            if refusal is not None:
                raise refusal
            return moderation.effective(identity)
        for plugin in self.plugins:  # not open here: the durable bans, and the removals of
            if isinstance(plugin, ModerationService):  # the session if it runs elsewhere
                refusal = await plugin.stored_refusal(identity.room, identity, self.config)
                if refusal is not None:
                    raise refusal
        return identity

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        cfg = self.config
        if cfg.database_url:
            # Connecting may take a moment; the loop runs nothing else yet, but keeps its
            # hands off the database in any case (see medverse.server.pg).
            database = Database(cfg.database_url)
            await asyncio.to_thread(database.start)
            self.database = database
            bans = await asyncio.to_thread(PostgresBanStore, database)
            for plugin in self.plugins:
                if isinstance(plugin, SharedObjects):
                    plugin.use_store(PostgresObjectStore(database))
                elif isinstance(plugin, ModerationService):
                    plugin.use_store(bans)
                    plugin.use_standing_store(PostgresStandingStore(database))
        auth = "off" if cfg.no_auth else "tokens"
        # In a cluster each node's log names the node that writes it (a room's entries are
        # written by the node that ran it then).
        node = {"node": self.cluster.node_id} if self.cluster is not None else {}
        if self.database is not None:
            # Registering the signing key is a round trip: off the loop, like the connect.
            await asyncio.to_thread(
                self.audit.open,
                cfg.data_dir,
                cfg.audit_retention_days,
                database=self.database,
                auth=auth,
                **node,
            )
        else:
            self.audit.open(cfg.data_dir, cfg.audit_retention_days, auth=auth, **node)
        # Model and series files in the blob directory (shared by a cluster's servers); what
        # rooms list, and the image viewers, where the other durable state is.
        blobs = cfg.blob_dir or None
        if self.database is not None and cfg.redis_url and blobs is None:
            log.warning(
                "model and image files are kept in this server's data directory: give the "
                "servers of the cluster one --blob-dir on a shared volume, or a room that moves "
                "finds its models and series listed but not their files"
            )
        if self.database is not None:
            self.assets = AssetStore(
                cfg.data_dir, blob_dir=blobs, index=PostgresAssetIndex(self.database)
            )
            self.images = ImageStore(
                cfg.data_dir, blob_dir=blobs, index=PostgresSeriesIndex(self.database)
            )
        else:
            self.assets = AssetStore(cfg.data_dir, blob_dir=blobs)
            self.images = ImageStore(cfg.data_dir, blob_dir=blobs)
        context = ServerContext(
            cfg,
            self.metrics.registry,
            self.audit,
            lambda code: self.metrics.protocol_errors.labels(code).inc(),
            self.assets,
            self.clinic,
            self.images,
        )
        for plugin in self.plugins:
            await plugin.start(context)
        # Stored data against what was acknowledged: objects now (before anyone can join),
        # model files in the background.
        for plugin in self.plugins:
            if isinstance(plugin, SharedObjects):
                await self.integrity.check_objects(
                    plugin.store,
                    self.audit.source,
                    plugin.hold_back,
                    cfg.serve_incomplete_objects,
                    recheck=self.database is not None,
                )
        self.scrub = AssetScrub(self.assets, self.integrity, cfg.asset_scrub_interval)
        self.scrub.start()
        if self.cluster is not None:
            from .cluster import ClusterHooks

            await self.cluster.start(
                ClusterHooks(
                    load=self._load,
                    describe=lambda: [room.describe() for room in self.rooms],
                    drop_room=self.rooms.drop,
                    command=self.cluster_command,
                    rooms=lambda: [room.name for room in self.rooms],
                    drained=lambda: self._on_drained(),
                    persist_room=self.rooms.persist,
                    admission=lambda grant, room: admission(self.sessions, grant, room),
                ),
                bind_subject=self.verifier is not None,
            )
            shared = self.cluster.access_key
            if self.room_access is not None and self.verifier is not None and shared is not None:
                if self.verifier.shared_secret is None:
                    # Tokens checked with a public key: sign room access credentials with
                    # the cluster's shared secret, so every node accepts every node's.
                    self.room_access.rekey(shared)
        self.tick.start()

    def close_sessions(self) -> None:
        """Close every connection: the server is going away (members may resume elsewhere)."""
        for session in list(self._sessions):
            session.close(CLOSE_GOING_AWAY, b"server shutting down")

    async def stop(self) -> None:
        await self.tick.stop()
        self.rooms.close_all()  # rooms close (plugins' on_close) before their plugins stop
        if self.cluster is not None:
            # After the rooms stored what they keep: other servers may take them now.
            await self.cluster.stop()
        for plugin in reversed(self.plugins):
            await plugin.stop()
        if self.scrub is not None:
            await self.scrub.stop()
            self.scrub = None
        if self.assets is not None:
            self.assets.close()
            self.assets = None
        if self.images is not None:
            self.images.close()
            self.images = None
        if self.database is not None:
            await asyncio.to_thread(self.audit.close)  # commits what is queued: a round trip
        else:
            self.audit.close()
        if self.database is not None:
            await asyncio.to_thread(self.database.close)
            self.database = None

    # ----------------------------------------------------------------- HTTP

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        """``GET /ws``: aiohttp does the opening handshake, then our parser takes the
        transport and a :class:`Session` runs the connection."""
        cfg = self.config
        ws = web.WebSocketResponse(
            compress=False, max_msg_size=cfg.max_frame_bytes, autoping=False, heartbeat=None
        )
        await ws.prepare(request)
        transport = request.transport
        if transport is None or transport.is_closing():
            return ws
        sock = transport.get_extra_info("socket")
        if sock is not None and cfg.socket_send_buffer > 0:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, cfg.socket_send_buffer)
        if sock is not None and cfg.silence_timeout > 0:
            set_keepalive(sock, cfg.silence_timeout)
        conn = WebSocketConnection(cfg.max_frame_bytes)
        session = Session(self.sessions, conn, request.remote)
        conn.attach(transport, session)  # type: ignore[arg-type]
        addr = request.remote or "?"
        refusal = self.budget.admit(addr)
        if refusal is not None:
            # Refused before anything of the connection is read.
            self.metrics.connections_refused.labels(refusal).inc()
            self.audit("connection_refused", peer=addr, reason=refusal)
            log.warning("refused a connection from %s: %s", addr, refusal)
            session.send_error(ProtocolError(ErrorCode.TOO_MANY_CONNECTIONS, refusal), True)
            session.close(CLOSE_TOO_MANY_CONNECTIONS, b"too many connections")
            # Wait for the close handshake: returning now would let aiohttp write a close
            # frame of its own onto the transport our parser owns.
            await conn.closed
            return ws
        session.start()
        self.metrics.connections.inc()
        self._sessions.add(session)
        try:
            await conn.closed
        finally:
            self._sessions.discard(session)
            self.metrics.connections.dec()
            self.budget.closed(addr, session.identified)
        return ws

    async def health(self, request: web.Request) -> web.Response:
        """Liveness and a summary; ``?ticks=N`` adds work-time percentiles of the last N
        ticks."""
        body: dict[str, object] = {
            "status": "ok",
            "rooms": len(self.rooms),
            "members": self.rooms.member_count(),
            "tick": self.clock.tick,
            "tick_rate": self.config.tick_rate,
            "tick_overruns": self.clock.skipped,
            "connections": len(self._sessions),
            "tasks": len(asyncio.all_tasks()),
        }
        try:
            n = int(request.query.get("ticks", "0"))
        except ValueError:
            raise web.HTTPBadRequest(text="ticks must be an integer") from None
        if n > 0 and self.tick.work:
            work = np.array(self.tick.work[-n:]) * 1000.0
            body["tick_work_ms"] = {
                "ticks": int(work.size),
                "p50": round(float(np.percentile(work, 50)), 3),
                "p99": round(float(np.percentile(work, 99)), 3),
                "max": round(float(work.max()), 3),
            }
        body.update(self.metrics.totals())
        if self.assets is not None:
            # A database round trip in a cluster: never on the event loop.
            files, size = await asyncio.to_thread(self.assets.totals)
            body["assets"] = {"files": files, "bytes": size}
        for plugin in self.plugins:
            body.update(plugin.health())
        if self.cluster is not None:
            body.update(self.cluster.health())
        body.update(self.integrity.health())
        if not self.integrity.ok:
            body["status"] = "degraded"
        return web.Response(text=json.dumps(body), content_type="application/json")

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.render(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )


def clinic_room_types(clinic: Clinic, plugin_names: Sequence[str]) -> list[RoomType]:
    """The room types of a clinic file, as the registry takes them (a type that names no
    plugins runs every plugin of the server)."""
    types = []
    for t in clinic.types:
        chosen = list(t.plugins) if t.plugins is not None else list(plugin_names)
        unknown = [n for n in chosen if n not in plugin_names]
        if unknown:
            raise ValueError(
                f"clinic file: types.{t.type}.plugins: unknown plugin {unknown[0]!r} "
                f"(this server has {', '.join(plugin_names)})"
            )
        types.append(RoomType(t.type, chosen, rooms=t.pattern.pattern))
    return types


SERVER_KEY = web.AppKey("medverse.server", Server)
IMAGES_KEY = web.AppKey("medverse.images", ImageService)


def create_app(
    config: ServerConfig | None = None,
    plugins: Sequence[ServerPlugin | type[RoomPlugin]] | None = None,
    room_types: Sequence[RoomType] = (),
) -> web.Application:
    """The medverse application with ``config`` (embedded defaults if None).

    ``plugins`` are the room plugins the server offers (default: :func:`default_plugins`);
    ``room_types`` choose which of them a room runs by its name (rooms no type matches run
    them all). See :mod:`medverse.server.plugins`.
    """
    cfg = config or ServerConfig()
    server = Server(cfg, default_plugins() if plugins is None else plugins, room_types)
    app = web.Application()
    app[SERVER_KEY] = server
    app.router.add_get("/ws", server.websocket)
    app.router.add_get("/health", server.health)
    app.router.add_get("/metrics", server.prometheus)
    assets = AssetService(
        server.http_auth,
        server.audit,
        cfg.max_asset_bytes,
        cfg.max_assets_per_room,
        pseudonymous=server.policy.pseudonymous,
        ended=server.session_ended,
        report=server.integrity.asset_checked,
    )
    assets.routes(app)
    images = ImageService(
        server.http_auth,
        server.audit,
        cfg.max_series_bytes,
        cfg.max_series_per_room,
        identifiable=server.policy.identifiable_images,
        pseudonymous=server.policy.pseudonymous,
        ended=server.session_ended,
    )
    images.routes(app)
    app[IMAGES_KEY] = images
    AdminAPI(server.http_auth, server.rooms, lambda: server.audit.log, server).routes(app)
    WebApp().routes(app)  # the clinic app at / and /join
    OperatorPanel().routes(app)  # the operators' panel at /panel

    async def on_startup(app: web.Application) -> None:
        await server.start()
        assets.use_store(server.assets)
        images.use_store(server.images)

    async def on_shutdown(app: web.Application) -> None:
        server.close_sessions()

    async def on_cleanup(app: web.Application) -> None:
        await server.stop()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


def set_keepalive(sock: socket.socket, within: float) -> None:
    """TCP keepalive that gives up on a silent peer within about ``within`` seconds: the
    kernel probes an idle connection (one second apart) and resets it when three go
    unanswered. The heartbeat notices a dead member first while we send it state; this also
    covers a connection with nothing in flight. Data in flight stops keepalive probes, so
    ``TCP_USER_TIMEOUT`` bounds how long sent bytes may stay unacknowledged too (twice the
    limit: a slow but live link is not cut). Options the platform lacks are skipped."""
    probes = 3
    idle = max(1, int(within) - probes)
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (
        ("TCP_KEEPIDLE", idle),
        ("TCP_KEEPINTVL", 1),
        ("TCP_KEEPCNT", probes),
        ("TCP_USER_TIMEOUT", int(2000 * within)),
    ):
        opt = getattr(socket, name, None)
        if opt is not None:
            options.append((socket.IPPROTO_TCP, opt, value))
    for level, opt, value in options:
        with contextlib.suppress(OSError):
            sock.setsockopt(level, opt, value)
