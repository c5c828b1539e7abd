"""One WebSocket connection on the server: the protocol state machine, limits, and its room.

The session drives :class:`medverse.protocol.connection.Connection` (which decides what each
state accepts), keeps the connection's limits (message and byte token buckets, error replies,
the handshake timeout, the heartbeat), and talks to its room through the registry and the
room's few methods. The room talks back only through this session's :class:`~.room.Link`
methods (``send``, ``write``, ``offer``, ``backlog``, ``send_error``, ``close``,
``admitted``). An exception while handling one message is logged and answered with an
``internal`` error; it never reaches the room or the server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from medverse.protocol.clinic import Access, Moved, MoveDeclined
from medverse.protocol.connection import (
    Connection,
    FrameReceived,
    Ignored,
    LocalProtocolError,
    MessageReceived,
    PoseReceived,
    Refused,
    Role,
    State,
)
from medverse.protocol.errors import ErrorCode, ProtocolError
from medverse.protocol.messages import (
    ROOM_NAME_RE,
    Ack,
    Consent,
    ConsentRequired,
    Error,
    Hello,
    Leave,
    Message,
    Pause,
    Ping,
    Pong,
    Redirect,
    RequestError,
    RequestRefused,
    Waiting,
    request_refusal,
)
from medverse.protocol.rfc6455 import OP_BINARY, OP_PING, binary_frame, control_frame

from .auth import Identity, TokenVerifier, anonymous
from .config import ServerConfig
from .limits import ConnectionBudget
from .metrics import Metrics, Traffic
from .plugins import Wait
from .policy import RoomPolicy
from .registry import RoomRegistry
from .room import Member, Room
from .roomaccess import Arrival, RoomAccess, is_transfer_grant
from .transport import WebSocketConnection

if TYPE_CHECKING:
    from .cluster import Cluster

log = logging.getLogger("medverse.session")

#: Close codes (RFC 6455 and the 4000-4999 private range).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL = 1002
CLOSE_POLICY = 1008
CLOSE_HANDSHAKE_TIMEOUT = 4000
CLOSE_TOO_SLOW = 4001
CLOSE_TOO_MANY_CONNECTIONS = 4003
CLOSE_RATE_LIMIT = 4008
CLOSE_CONSENT = 4011

#: Seconds an acknowledgement waits at most for its audit entries to be committed.
AUDIT_ACK_WAIT = 5.0


@dataclass(frozen=True)
class SessionServices:
    """What every session of a server uses."""

    config: ServerConfig
    rooms: RoomRegistry
    #: Checks join tokens; None on a server running without authentication.
    verifier: TokenVerifier | None
    policy: RoomPolicy
    #: ``audit(kind, room=..., actor=..., subject=..., **fields)``; never raises.
    audit: Callable[..., None]
    metrics: Metrics
    traffic: Traffic
    #: The control messages clients may send and those the server sends (the core's and
    #: the plugins').
    client_messages: Mapping[str, type[Message]]
    server_messages: Mapping[str, type[Message]]
    #: Connections per address, and those not identified yet.
    budget: ConnectionBudget
    #: This server's place in a cluster (None: it runs alone).
    cluster: Cluster | None = None
    #: Signs the room access credential a moved member gets in ``moved`` (None: no
    #: authentication, nothing to present).
    room_access: RoomAccess | None = None


@dataclass(frozen=True, slots=True)
class _Origin:
    """Where a member moved by someone came from, while it enters the room it was moved to:
    where it goes back if it declines that room's consent, and whom to tell."""

    room: str  # the room it left
    member_id: int  # its id there
    name: str  # its name there
    target: str  # the room it was moved to
    by: str  # the mover's name
    actor: str  # the mover's identity


#: ``move_declined``'s reason when the member declined the consent of the room it was moved to.
CONSENT_DECLINED = "consent_declined"


class Session:
    """Server side of one connection, driven by :class:`WebSocketConnection` callbacks."""

    def __init__(
        self, services: SessionServices, ws: WebSocketConnection, peer: str | None
    ) -> None:
        self._s = services
        self._ws = ws
        self.peer = peer
        cfg = services.config
        self.conn = Connection(
            Role.SERVER,
            client_messages=services.client_messages,
            server_messages=services.server_messages,
        )
        self.member: Member | None = None
        self._room: Room | None = None  # the member's room (set with ``member``)
        self._consent: Identity | None = None  # asked to consent, as this identity
        self._admit = False  # the entry under way skips the lobby (a host moved us in)
        self._origin: _Origin | None = None  # moved: where from, until the entry is decided
        self._arrival: Arrival | None = None  # a transfer grant redeemed by our hello
        #: Who the token says this is, before any room's policy (what a move starts from).
        self._base: Identity | None = None
        self._lobby: tuple[Room, int] | None = None  # waiting in this room's lobby
        self._closed = False
        #: Acknowledgements waiting for their audit entries to be committed.
        self._pending_acks: set[asyncio.Task[None]] = set()
        #: A valid hello named who this is (the connection left the unidentified budget).
        self.identified = False
        self._routing: asyncio.Task[None] | None = None  # asking the cluster where the room is
        #: A move of our member to a room another server runs, asking that server first.
        self._moving: asyncio.Task[None] | None = None
        #: Sends our moved member a fresh room access credential before the last expires.
        self._access_timer: asyncio.TimerHandle | None = None
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._heartbeat_timer: asyncio.TimerHandle | None = None
        self._next_ping = 0.0  # loop time of the next heartbeat ping
        # Token bucket for error replies: a flood of bad frames gets a few answers, not a queue.
        self._err_tokens = cfg.error_reply_rate
        self._err_stamp = time.monotonic()
        self._msg_tokens = cfg.message_burst
        self._byte_tokens = cfg.byte_burst
        self._rate_stamp = self._err_stamp
        self._violations = 0.0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self._s.config
        self._handshake_timer = loop.call_later(cfg.handshake_timeout, self._handshake_timeout)
        if cfg.heartbeat > 0:
            self._next_ping = loop.time() + cfg.heartbeat
            self._heartbeat_timer = loop.call_later(cfg.heartbeat, self._heartbeat)

    # ----------------------------------------------------------------- Link (for the room)

    def write(self, frame: bytes) -> bool:
        """Write one prebuilt WebSocket frame; disconnect a member that stopped reading."""
        t = self._ws.transport
        if t is None or t.is_closing() or self._closed:
            return False
        if t.get_write_buffer_size() > self._s.config.send_hard_limit:
            self._s.metrics.slow_disconnects.inc()
            self._s.audit("closed_not_reading", peer=self.peer)
            log.info("closing %s: %d bytes unsent", self.peer, t.get_write_buffer_size())
            self._closed = True
            self._ws.abort()  # the peer is not reading; a close frame would only queue
            return False
        t.write(frame)
        self._s.traffic.sent_bytes += len(frame)
        return True

    def offer(self, frame: bytes, soft_limit: int) -> bool:
        """Write ``frame`` unless more than ``soft_limit`` bytes wait (the room counts it)."""
        t = self._ws.transport
        if t is None or t.is_closing() or t.get_write_buffer_size() > soft_limit:
            return False
        t.write(frame)
        return True

    def backlog(self) -> int:
        t = self._ws.transport
        if t is None or t.is_closing():
            return 0
        return t.get_write_buffer_size()

    def send(self, msg: Message) -> bool:
        """Send a control message through the state machine (which applies its transition)."""
        if self._closed:
            return False
        try:
            data = self.conn.send(msg)
        except LocalProtocolError as exc:
            log.warning("not sent to %s: %s", self.peer, exc)
            return False
        return self.write(binary_frame(data))

    def send_error(self, err: ProtocolError, fatal: bool = False) -> None:
        self._s.metrics.protocol_errors.labels(err.code.value).inc()
        now = time.monotonic()
        rate = self._s.config.error_reply_rate
        self._err_tokens = min(rate, self._err_tokens + (now - self._err_stamp) * rate)
        self._err_stamp = now
        if self._err_tokens < 1 and not fatal:
            return
        self._err_tokens -= 1
        self.send(Error.of(err, fatal))

    def close(self, code: int, reason: bytes) -> None:
        self._closed = True
        self._ws.close(code, reason)

    def admitted(self, member: Member) -> None:
        """A host let us in from the lobby (the room sent our welcome)."""
        assert self._lobby is not None
        self._origin = None
        self._room = self._lobby[0]
        self._lobby = None
        self.member = member

    def move(
        self,
        room: str,
        by: str,
        actor: str,
        reason: str,
        admit: bool,
        notice: Message | None = None,
    ) -> Awaitable[None] | None:
        """Move our member to ``room`` (see :meth:`Link.move`): every check first, so a
        refusal leaves it where it is; then it leaves its room, is told ``moved`` and enters
        the other room as after a hello (consent, lobby unless ``admit``, welcome). In a
        cluster, for a room this server does not hold, an awaitable: see
        :meth:`_move_across`."""
        s = self._s
        member, old = self.member, self._room
        base = self._base
        if member is None or old is None or base is None or self._closed:
            raise ProtocolError(ErrorCode.NOT_FOUND, "that member's connection is down")
        if not ROOM_NAME_RE.fullmatch(room):
            raise ProtocolError(ErrorCode.BAD_FIELD, "not a room name")
        if room == old.name:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"the member is already in {room}")
        if not s.policy.known(room):
            raise ProtocolError(ErrorCode.NOT_FOUND, f"this clinic has no room {room}")
        if s.cluster is not None and not s.cluster.holds(room):
            # The room may live on another server (or nowhere yet): placing it here could
            # run it twice. The cluster's directory says where it goes, and that server
            # whether it takes the member, before the member leaves.
            if s.cluster.grants is None:
                raise ProtocolError(ErrorCode.NOT_FOUND, "this server has not joined its cluster")
            task = asyncio.get_running_loop().create_task(
                self._move_across(room, by, actor, reason, admit, notice)
            )
            self._moving = task
            return task
        self._move_here(room, by, actor, reason, admit, notice)
        return None

    def _move_here(
        self, room: str, by: str, actor: str, reason: str, admit: bool, notice: Message | None
    ) -> None:
        """A move to a room this server runs (or places): its entry checks, then the move."""
        s = self._s
        base = self._base
        assert base is not None
        identity = s.policy.identity_in(replace(base, room=room), room)
        answer = s.rooms.entry(identity)  # places the room: its plugins decide
        if isinstance(answer, ProtocolError):
            raise answer
        target = s.rooms.get(room)
        if target is not None and target.member_count >= s.config.max_members_per_room:
            raise ProtocolError(ErrorCode.ROOM_FULL, f"room {room} is full")
        member, old = self.member, self._room
        assert member is not None and old is not None
        origin = _Origin(old.name, member.id, member.name, room, by[:64], actor)
        self._leave_for(room, identity, by, actor, reason, notice)
        self._origin = origin
        self._enter(identity, consented=False, admit=admit)

    def _leave_for(
        self,
        room: str,
        identity: Identity,
        by: str,
        actor: str,
        reason: str,
        notice: Message | None,
        **audit: object,
    ) -> None:
        """Our member leaves its room for ``room`` (here or on another server): audited, the
        room left, ``notice`` then ``moved`` (with an access credential for ``room``) sent."""
        s = self._s
        member, old = self.member, self._room
        assert member is not None and old is not None
        s.audit(
            "transferred",
            room=old.name,
            actor=actor,
            subject=identity.subject,
            member=member.id,
            to=room,
            reason=reason,
            **audit,
        )
        log.info("member %d of room %s moved to %s by %s", member.id, old.name, room, actor)
        old.leave(member, "moved")
        self.member = self._room = None
        if notice is not None:
            self.send(notice)
        self._send_moved(room, identity, by, reason)

    def _send_moved(self, room: str, identity: Identity, by: str, reason: str) -> None:
        """``moved`` to ``room``, with an access credential for it unless it is the room our
        join token names."""
        s = self._s
        access = None
        base = self._base
        if s.room_access is not None and identity.token_id and base is not None:
            if room != base.room:
                access = s.room_access.issue(room, identity.subject, identity.token_id)
                self._keep_access(room, identity, now=False)
            else:
                # Back in the room its join token names: the token serves there (and a
                # credential would not be refreshed after a resume, which the token needs not).
                self._keep_access(room, identity, now=False, stop=True)
        self.send(Moved(room, by[:64], reason[:256], access))

    async def _move_across(
        self, room: str, by: str, actor: str, reason: str, admit: bool, notice: Message | None
    ) -> None:
        """Move our member to ``room``, which this server of the cluster does not hold now.
        The cluster's directory says where ``room`` lives (one round trip; it places the room
        if nobody runs it). Here: a move as any other. Elsewhere: that server is asked
        whether the member may enter now (bans, locks, an ended session, room full) and
        only if it says yes does the member leave its room, get ``moved`` and ``redirect``
        with a transfer grant (that server checks the room's rules again on arrival). A
        refusal, that server gone (``room_moving``) or silent (``transfer_timeout``) raises
        the typed error and leaves the member where it is."""
        s = self._s
        cluster = s.cluster
        member, old, base = self.member, self._room, self._base
        assert cluster is not None and cluster.grants is not None
        assert member is not None and old is not None and base is not None
        try:
            route = await cluster.route(room)
        except Exception as exc:  # Redis unreachable: the mover tries again later
            log.warning("room %s: the cluster directory did not answer: %s", room, exc)
            raise ProtocolError(
                ErrorCode.ROOM_MOVING, "the cluster's directory did not answer; try again"
            ) from None
        self._check_still(member, old)
        if route.local:
            self._move_here(room, by, actor, reason, admit, notice)
            return
        if route.url is None or route.node is None:
            raise ProtocolError(
                ErrorCode.ROOM_MOVING, f"room {room} is moving between servers; try again"
            )
        target = replace(base, room=room)
        grant = cluster.grants.issue(target, room, admit, actor, old.name, reason, base.room)
        await cluster.ask_admission(route.node, room, grant)
        self._check_still(member, old)
        self._leave_for(room, base, by, actor, reason, notice, remote=True)
        self.send(Redirect(route.url, "transfer", grant))
        self.close(CLOSE_NORMAL, b"redirect")

    def _check_still(self, member: Member, room: Room) -> None:
        """Raise ``not_found`` unless ``member`` of ``room`` is still ours, connected (it may
        have left, been moved or removed while another server was asked)."""
        if self._closed or self.member is not member or self._room is not room:
            raise ProtocolError(ErrorCode.NOT_FOUND, "the member left its room meanwhile")

    # ----------------------------------------------------------------- access credentials

    def _keep_access(self, room: str, identity: Identity, now: bool, stop: bool = False) -> None:
        """Keep our member's room access credential for ``room`` fresh while the member is
        bound for or in ``room``: one now if ``now`` (a resumed connection), then a fresh
        one in an ``access`` message each time half of a credential's life has passed
        (whatever ``moved`` or ``access`` sent last stays valid meanwhile). ``stop``: no more
        refreshes (the member needs no credential now)."""
        if self._access_timer is not None:
            self._access_timer.cancel()
            self._access_timer = None
        issuer = self._s.room_access
        if stop or issuer is None or not identity.token_id:
            return
        if now and not self._send_access(room, identity):
            return
        self._access_timer = asyncio.get_running_loop().call_later(
            issuer.ttl / 2, self._refresh_access, room, identity
        )

    def _send_access(self, room: str, identity: Identity) -> bool:
        issuer = self._s.room_access
        assert issuer is not None
        return self.send(
            Access(room, issuer.issue(room, identity.subject, identity.token_id or ""))
        )

    def _refresh_access(self, room: str, identity: Identity) -> None:
        self._access_timer = None
        issuer = self._s.room_access
        if self._closed or issuer is None:
            return
        loop = asyncio.get_running_loop()
        if self._room is not None and self._room.name == room and self.conn.accepts(Access):
            if self._send_access(room, identity):
                self._access_timer = loop.call_later(
                    issuer.ttl / 2, self._refresh_access, room, identity
                )
            return
        entering = (self._lobby is not None and self._lobby[0].name == room) or (
            self._room is None and self.member is None and self.conn.moving
        )
        if entering or (self._consent is not None and self._consent.room == room):
            # Still on its way in (consent, lobby): the credential it has holds until then.
            self._access_timer = loop.call_later(
                min(5.0, issuer.ttl / 8), self._refresh_access, room, identity
            )

    # ----------------------------------------------------------------- timers

    def _handshake_timeout(self) -> None:
        self._handshake_timer = None
        if self.conn.state is State.HELLO and not self._closed:
            self.send_error(ProtocolError(ErrorCode.HANDSHAKE_TIMEOUT, "no hello in time"), True)
            self.close(CLOSE_HANDSHAKE_TIMEOUT, b"handshake timeout")

    def _heartbeat(self) -> None:
        """Ping the peer every ``heartbeat`` seconds; drop a connection that sent nothing for
        ``silence_timeout`` seconds (checked at that moment, not at the next ping)."""
        self._heartbeat_timer = None
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        cfg = self._s.config
        now = loop.time()
        silent = now - self._ws.last_rx
        if silent >= cfg.silence_timeout:
            # A dead peer answers no close frame: abort at once, so the room drops the member
            # (its leases, its mix) now rather than after the close handshake's wait.
            log.info("closing %s: silent for %.1f s", self.peer, silent)
            self._s.metrics.silent_disconnects.inc()
            self._s.audit("closed_silent", peer=self.peer, seconds=round(silent, 1))
            self._closed = True
            self._ws.abort()
            return
        if now >= self._next_ping:
            self.write(control_frame(OP_PING))
            self._next_ping = now + cfg.heartbeat
        wake = min(self._next_ping, self._ws.last_rx + cfg.silence_timeout)
        self._heartbeat_timer = loop.call_at(max(wake, now + 0.05), self._heartbeat)

    # ----------------------------------------------------------------- input

    def on_message(self, opcode: int, data: bytes) -> None:
        """One complete WebSocket message from the peer."""
        self._s.traffic.received_bytes += len(data)
        if self._closed:
            return
        try:
            if opcode != OP_BINARY:
                self._dispatch(self.conn.receive(data, text=True))
            elif self._allow(data):
                self._dispatch(self.conn.receive(data))
        except Exception:  # a bug handling one message must not take the server down
            log.exception("session %s: error handling a message", self.peer)
            self.send_error(ProtocolError(ErrorCode.INTERNAL, "internal error"))

    def _dispatch(self, event: object) -> None:
        member, room = self.member, self._room
        if type(event) is PoseReceived:
            assert member is not None and room is not None
            try:
                room.submit_pose(member, event.frame)
            except ProtocolError as err:
                self.send_error(err)
        elif type(event) is MessageReceived:
            self._on_control(event.message)
        elif type(event) is FrameReceived:
            assert member is not None and room is not None
            try:
                room.handle_frame(member, event.frame)
            except ProtocolError as err:
                self.send_error(err)
        elif type(event) is Refused:
            err = event.error
            if event.fatal:
                code = CLOSE_POLICY if err.code is ErrorCode.UNSUPPORTED_VERSION else CLOSE_PROTOCOL
                self._refuse(err, code, b"bad handshake" if code == CLOSE_PROTOCOL else b"refused")
            elif isinstance(err, RequestError) and self.conn.accepts(err.answer):
                # A request that did not decode but names its req: refused by name, so the
                # client's call fails at once instead of waiting for an answer.
                self._s.metrics.protocol_errors.labels(err.code.value).inc()
                self.send(err.answer)
            else:
                self.send_error(err)
        else:
            assert type(event) is Ignored, event

    def _on_control(self, msg: Message) -> None:
        member, room = self.member, self._room
        if isinstance(msg, Hello):
            self._on_hello(msg)
        elif isinstance(msg, Ping):
            self.send(Pong(msg.id, msg.client_time, room.time() if room is not None else 0.0))
        elif isinstance(msg, Leave):
            if member is not None and room is not None:
                room.leave(member, "left")
            self.close(CLOSE_NORMAL, b"left")
        elif isinstance(msg, Consent):
            if self._consent is not None:
                self._on_consent(msg)
            elif member is not None and not msg.accept:
                self._withdraw_consent(member, msg)
        elif member is None or room is None:
            raise AssertionError(f"{msg.TYPE} accepted before joining")
        else:
            # Requests that carry a req get exactly one answer: ack once applied, or refused
            # naming it; without req (older clients) a refusal is a plain error.
            req: int | None = getattr(msg, "req", None) if msg.ACKED else None
            mark = self._s.audit.mark() if req is not None else None
            try:
                if isinstance(msg, Pause):
                    room.set_paused(member, msg.paused)
                    later = None
                else:
                    later = room.handle(member, msg)
            except ProtocolError as err:
                self._refused(req, err)
                return
            if later is not None:
                # The plugin answers once something slow (a database write) is done.
                later.add_done_callback(lambda t: self._answer(req, t, mark))
            elif req is not None:
                self._ack(req, mark)

    def _ack(self, req: int, mark: int | None) -> None:
        """Acknowledge a request that was applied. When the audit log commits after appending
        (the cluster's PostgreSQL log) and the request was audited, the ack waits for that
        commit (group commit: milliseconds), so an acknowledged action is in the log even if
        this server dies the moment after; a database out of reach delays it by at most
        :data:`AUDIT_ACK_WAIT` seconds (its entries go in once the database is back)."""
        if mark is not None and self._s.audit.mark() != mark:
            task = asyncio.get_running_loop().create_task(self._ack_when_audited(req))
            self._pending_acks.add(task)
            task.add_done_callback(self._pending_acks.discard)
        elif not self._closed:
            self.send(Ack(req))

    async def _ack_when_audited(self, req: int) -> None:
        mark = self._s.audit.mark()
        if mark is not None:
            await self._s.audit.written(mark, AUDIT_ACK_WAIT)
        if not self._closed:
            self.send(Ack(req))

    def _refused(self, req: int | None, err: ProtocolError) -> None:
        if req is None:
            self.send_error(err)
        else:
            self._s.metrics.protocol_errors.labels(err.code.value).inc()
            self.send(RequestRefused(req, err.code.value, err.message[:1024]))

    def _answer(self, req: int | None, task: asyncio.Task[None], mark: int | None) -> None:
        """The answer to a request a plugin handled in a task, once the task has ended."""
        if self._closed:
            return
        if task.cancelled():  # the room closed under it
            self._refused(req, ProtocolError(ErrorCode.SESSION_ENDED, "the room has closed"))
        elif isinstance(err := task.exception(), ProtocolError):
            self._refused(req, err)
        elif err is not None:
            self._refused(req, ProtocolError(ErrorCode.INTERNAL, "the request failed"))
        elif req is not None:
            self._ack(req, mark)

    def _refuse(self, err: ProtocolError, code: int, reason: bytes) -> None:
        self.send_error(err, True)
        self.close(code, reason)

    # ----------------------------------------------------------------- joining

    def _on_hello(self, hello: Hello) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        s = self._s
        try:
            identity = self._identify(hello)
        except ProtocolError as err:
            if self._moved_resume(hello, err):
                return
            s.metrics.auth_refusals.labels(err.code.value).inc()
            s.audit("join_refused", room=hello.room, peer=self.peer, code=err.code.value)
            log.info("%s refused for room %s: %s", self.peer, hello.room, err)
            self._refuse(err, CLOSE_POLICY, b"join refused")
            return
        self._accepted(identity)
        cluster = s.cluster
        if cluster is not None and (self._arrival is not None or not cluster.holds(hello.room)):
            # Where does the room live? One round trip to the cluster's directory (and a
            # transfer grant's single use is claimed there first); the hello is answered
            # when it is back (a redirect, or the join here).
            self._routing = asyncio.get_running_loop().create_task(self._route(hello, identity))
            return
        self._join(hello, identity)

    async def _route(self, hello: Hello, identity: Identity) -> None:
        cluster = self._s.cluster
        assert cluster is not None
        local, url = cluster.holds(hello.room), None
        if not local:
            try:
                route = await cluster.route(hello.room)
                local, url = route.local, route.url
            except Exception as exc:  # Redis unreachable: the client tries again later
                log.warning("room %s: the cluster directory did not answer: %s", hello.room, exc)
        if self._closed:
            return
        arrival = self._arrival
        if arrival is not None and (local or url is not None):
            # A transfer grant joins once in the whole cluster: spent where it joins, and
            # checked before a redirect (a used one goes no further).
            if not await self._redeem(arrival, hello, spend=local):
                return
        try:
            if local:
                self._join(hello, identity)
            elif url is not None:
                self.send(Redirect(url, "owner"))
                self.close(CLOSE_NORMAL, b"redirect")
            else:
                self._refuse(
                    ProtocolError(
                        ErrorCode.ROOM_MOVING,
                        "the room is moving to another server; join again in a moment",
                    ),
                    CLOSE_GOING_AWAY,
                    b"room moving",
                )
        except Exception:
            log.exception("session %s: error joining room %s", self.peer, hello.room)
            self._refuse(ProtocolError(ErrorCode.INTERNAL, "internal error"), 1011, b"internal")

    async def _redeem(self, arrival: Arrival, hello: Hello, spend: bool) -> bool:
        """Claim a transfer grant's single use across the cluster (``spend``), or only check
        that nobody has (before a redirect); False (refused, closing) if it was used before,
        on any server, or Redis did not answer."""
        cluster = self._s.cluster
        assert cluster is not None
        try:
            if spend:
                first = await cluster.redeem_grant(arrival.jti, arrival.expires)
            else:
                first = not await cluster.grant_used(arrival.jti)
        except Exception as exc:  # Redis unreachable: the grant is not spent; try again
            log.warning("room %s: the cluster directory did not answer: %s", hello.room, exc)
            err = ProtocolError(
                ErrorCode.ROOM_MOVING, "the cluster's directory did not answer; join again"
            )
            if not self._closed:
                self._refuse(err, CLOSE_GOING_AWAY, b"room moving")
            return False
        if self._closed:
            return False
        if not first:
            self._s.metrics.auth_refusals.labels(ErrorCode.UNAUTHORIZED.value).inc()
            self._s.audit(
                "join_refused",
                room=hello.room,
                peer=self.peer,
                code=ErrorCode.UNAUTHORIZED.value,
                reason="transfer grant already used",
            )
            err = ProtocolError(ErrorCode.UNAUTHORIZED, "transfer grant already used")
            self._refuse(err, CLOSE_POLICY, b"join refused")
            return False
        return True

    def _join(self, hello: Hello, identity: Identity) -> None:
        """The hello, answered on the server that runs its room."""
        s = self._s
        arrival, self._arrival = self._arrival, None
        if arrival is not None:
            # Moved here from another server: a new member of this room (its resume token,
            # if it sent one, is its old room's), under this room's rules.
            s.audit(
                "transfer_arrived",
                room=hello.room,
                actor=arrival.actor,
                subject=identity.subject,
                origin=arrival.origin,
                reason=arrival.reason,
            )
            self._enter(identity, consented=False, admit=arrival.admit)
            if arrival.home != hello.room:
                # Its credential for this room came with its moved, from the server it left.
                self._keep_access(hello.room, identity, now=False)
            return
        room = s.rooms.get(hello.room)
        moved: int | None = None
        if hello.resume is not None:
            slots = hello.slots
            member = room.resumable(hello.resume, slots) if room is not None else None
            # With tokens, only the same subject may take a member over; without, the resume
            # token alone is the proof.
            if member is not None and (
                s.verifier is None or member.identity.subject == identity.subject
            ):
                assert room is not None
                self.member, self._room = member, room
                room.reattach(member, self)
                return
            moved = self._moved_member(hello, identity)
            if moved is None:
                self.send_error(ProtocolError(ErrorCode.BAD_RESUME, "cannot resume; joining anew"))
        self._enter(identity, consented=False, member_id=moved)

    def _moved_member(self, hello: Hello, identity: Identity) -> int | None:
        """The member id a resume token from another server of the cluster names, if it is
        valid for this room and identity and nobody here has that id (the room moved here)."""
        cluster = self._s.cluster
        tokens = cluster.tokens if cluster is not None else None
        if tokens is None or hello.resume is None:
            return None
        checked = tokens.check(hello.resume, hello.room, identity.subject)
        if checked is None or checked[1] != hello.slots:
            return None
        room = self._s.rooms.get(hello.room)
        if room is not None and room.has_member(checked[0]):
            return None
        return checked[0]

    def _accepted(self, identity: Identity) -> None:
        self.identified = True
        self._s.budget.identified(self.peer or "?")
        self._base = identity

    def _moved_resume(self, hello: Hello, err: ProtocolError) -> bool:
        """A member moved to another room resumes there with the token of the room it first
        entered (its resume token proves the rest). If that member is gone it enters the
        token's own room anew. False: not such a case (``err`` stands)."""
        s = self._s
        if (
            s.verifier is None
            or hello.resume is None
            or not hello.token
            or err.code is not ErrorCode.UNAUTHORIZED
        ):
            return False
        try:
            identity = s.verifier.verify_any_room(hello.token)
        except ProtocolError:
            return False
        self._accepted(identity)
        room = s.rooms.get(hello.room)
        member = room.resumable(hello.resume, hello.slots) if room is not None else None
        if member is not None and room is not None and member.identity.subject == identity.subject:
            self.member, self._room = member, room
            room.reattach(member, self)
            # Its credential for this room may have aged while it was away: a fresh one.
            self._keep_access(room.name, identity, now=True)
            return True
        self.send_error(ProtocolError(ErrorCode.BAD_RESUME, "cannot resume; joining anew"))
        self._enter(identity, consented=False)
        return True

    def _identify(self, hello: Hello) -> Identity:
        """Who is joining: from the verified token (or the transfer grant of a member another
        server of the cluster moved here), or anonymous on a server without auth."""
        cluster = self._s.cluster
        grants = cluster.grants if cluster is not None else None
        if grants is not None and hello.token and is_transfer_grant(hello.token):
            self._arrival = grants.verify(hello.token, hello.room)
            return self._arrival.identity
        verifier = self._s.verifier
        if verifier is None:
            return anonymous(hello.name, hello.room, f"anonymous:{self.peer}:{id(self):x}")
        if not hello.token:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "a join token is required")
        return verifier.verify(hello.token, hello.room)

    def _enter(
        self,
        identity: Identity,
        consented: bool,
        admit: bool = False,
        member_id: int | None = None,
    ) -> None:
        """Entry checks, then consent, then the lobby (unless a host moved us in: ``admit``)
        or the room itself. A member whose room moved here from another server of the cluster
        (``member_id``) consented and was admitted there: only the entry checks (bans, an
        ended session) apply again."""
        s = self._s
        loading = s.rooms.entry_pending(identity.room)
        if loading is not None:
            # The room is reading what decides who may enter (a moved room's removals):
            # the entry checks run once it has.
            given = identity
            loading.add_done_callback(
                lambda _: None if self._closed else self._enter(given, consented, admit, member_id)
            )
            return
        identity = s.policy.identity_in(identity, identity.room)
        if not consented:
            self._admit = admit
        answer = s.rooms.entry(identity)
        if isinstance(answer, ProtocolError):
            s.audit(
                "join_refused", room=identity.room, actor=identity.subject, code=answer.code.value
            )
            self._refuse(answer, CLOSE_POLICY, b"join refused")
            return
        if member_id is not None:
            consented, answer, self._admit = True, None, True
        consent = s.policy.consent(identity.room)
        if not consented and consent is not None:
            self._consent = identity
            self.send(ConsentRequired(*consent))
            return
        slots = self.conn.slots or 1
        if isinstance(answer, Wait) and not self._admit:
            room = s.rooms.place(identity.room)
            lobby_id = room.wait(identity, slots, self)
            self._lobby = (room, lobby_id)
            self.send(Waiting(room.name, lobby_id))
            room.lobby_changed()  # the hosts learn of us once we can be admitted
            return
        try:
            self._room = s.rooms.place(identity.room)
            self.member = s.rooms.join(identity, slots, self, member_id)
            self._origin = None
        except ProtocolError as err:
            self._refuse(err, CLOSE_POLICY, b"join refused")

    def _on_consent(self, msg: Consent) -> None:
        """The answer to ``consent_required``: enter, or be refused. A member moved here that
        declines goes back to the room it came from if that room takes it back (its mover is
        told either way); otherwise, and at a first join, the connection closes."""
        identity = self._consent
        assert identity is not None
        self._consent = None
        consent = self._s.policy.consent(identity.room)
        version = consent[0] if consent is not None else ""
        if msg.accept and msg.version == version:
            self._s.audit("consent", room=identity.room, actor=identity.subject, version=version)
            self._enter(identity, consented=True, admit=self._admit)
            return
        origin, self._origin = self._origin, None
        back = None
        if origin is not None and msg.accept is False:
            back = self._back_identity(origin)
        self._s.audit(
            "consent_declined",
            room=identity.room,
            actor=identity.subject,
            version=msg.version,
            **({"back": origin.room} if origin is not None and back is not None else {}),
        )
        if origin is not None and back is not None:
            self._send_moved(origin.room, back, origin.by, CONSENT_DECLINED)
            self._admit = True  # it was in that room: neither its consent nor its lobby again
            self._enter(back, consented=True, admit=True)
            self._tell_mover(origin, back=origin.room)
            return
        if origin is not None:
            self._tell_mover(origin, back=None)
        why = "consent declined" if msg.accept is False else "consent to an old version"
        self._refuse(ProtocolError(ErrorCode.CONSENT_REQUIRED, why), CLOSE_CONSENT, b"consent")

    def _back_identity(self, origin: _Origin) -> Identity | None:
        """Our identity in the room a move took us from, if that room still runs here and
        would take us back now (not locked to us, not banned, not full); else None."""
        s = self._s
        base = self._base
        if base is None or self._closed:
            return None
        room = s.rooms.get(origin.room)
        if room is None or (s.cluster is not None and not s.cluster.holds(origin.room)):
            return None
        identity = s.policy.identity_in(replace(base, room=origin.room), origin.room)
        if s.rooms.entry_pending(origin.room) is not None:
            return None
        if isinstance(s.rooms.entry(identity), ProtocolError):
            return None
        if room.member_count >= s.config.max_members_per_room:
            return None
        return identity

    def _tell_mover(self, origin: _Origin, back: str | None) -> None:
        """Tell whoever moved us (in the room we left or the one we declined) that we did
        not enter, and where we are now."""
        msg = MoveDeclined(
            origin.member_id, origin.name, origin.room, origin.target, CONSENT_DECLINED, back
        )
        for name in dict.fromkeys((origin.room, origin.target)):
            room = self._s.rooms.get(name)
            if room is not None:
                room.send_subject(origin.actor, msg)

    def _withdraw_consent(self, member: Member, msg: Consent) -> None:
        """Withdrawing consent means leaving the room."""
        room = self._room
        assert room is not None
        self._s.audit(
            "consent_withdrawn",
            room=room.name,
            actor=member.identity.subject,
            version=msg.version,
        )
        room.leave(member, "consent withdrawn")
        self.close(CLOSE_CONSENT, b"consent withdrawn")

    def _allow(self, data: bytes) -> bool:
        """Token buckets for messages and bytes; too many refusals close the connection. A
        request dropped here is refused by its ``req`` (so the client's call fails at once)."""
        size = len(data)
        cfg = self._s.config
        now = time.monotonic()
        elapsed = now - self._rate_stamp
        self._rate_stamp = now
        self._msg_tokens = min(cfg.message_burst, self._msg_tokens + elapsed * cfg.message_rate)
        self._byte_tokens = min(cfg.byte_burst, self._byte_tokens + elapsed * cfg.byte_rate)
        self._violations = max(0.0, self._violations - elapsed * cfg.max_violations / 10.0)
        if self._msg_tokens >= 1.0 and self._byte_tokens >= size:
            self._msg_tokens -= 1.0
            self._byte_tokens -= size
            return True
        self._violations += 1.0
        self._s.metrics.protocol_errors.labels(ErrorCode.RATE_LIMITED.value).inc()
        if self._violations > cfg.max_violations:
            log.info("closing %s: sustained flooding", self.peer)
            member = self.member
            self._s.audit(
                "closed_flooding",
                room=self._room.name if self._room is not None else None,
                actor=member.identity.subject if member else None,
                peer=self.peer,
            )
            self._refuse(
                ProtocolError(ErrorCode.RATE_LIMITED, "flooding; closing"),
                CLOSE_RATE_LIMIT,
                b"rate limit",
            )
        else:
            err = ProtocolError(ErrorCode.RATE_LIMITED, "message or byte rate exceeded")
            answer = request_refusal(
                data, self.conn.client_messages, err, self.conn.max_control_bytes
            )
            if answer is not None and self.conn.accepts(answer):
                # Every dropped request gets its answer (not subject to the error replies'
                # rate): the flood is bounded by the close above, and each answer is small.
                self.send(answer)
            else:
                self.send_error(err)
        return False

    # ----------------------------------------------------------------- end

    def on_close(self) -> None:
        """The connection ended (either side)."""
        self._closed = True
        self.conn.closed()
        if self._lobby is not None:
            room, lobby_id = self._lobby
            self._lobby = None
            room.leave_lobby(lobby_id)
        for timer in (self._handshake_timer, self._heartbeat_timer, self._access_timer):
            if timer is not None:
                timer.cancel()
        self._access_timer = None
        member, room = self.member, self._room
        self.member = self._room = None
        if member is not None and room is not None:
            room.disconnected(member, self)


def admission(s: SessionServices, grant: str, room: str) -> ProtocolError | None:
    """Whether the member that transfer grant ``grant`` names may enter ``room`` on this
    server now (another server of the cluster moves it here and asks first): None, or the
    typed refusal its arrival would get (the same checks as a move on one server; the
    arrival is checked again, as any join)."""
    cluster = s.cluster
    if cluster is None or cluster.grants is None:
        return ProtocolError(ErrorCode.NOT_FOUND, "this server has not joined its cluster")
    if not cluster.holds(room):
        return ProtocolError(ErrorCode.ROOM_MOVING, f"room {room} is moving between servers")
    try:
        arrival = cluster.grants.verify(grant, room)
    except ProtocolError as err:
        return err
    if not s.policy.known(room):
        return ProtocolError(ErrorCode.NOT_FOUND, f"this clinic has no room {room}")
    identity = s.policy.identity_in(arrival.identity, room)
    answer = s.rooms.entry(identity)
    if isinstance(answer, ProtocolError):
        return answer
    target = s.rooms.get(room)
    if target is not None and target.member_count >= s.config.max_members_per_room:
        return ProtocolError(ErrorCode.ROOM_FULL, f"room {room} is full")
    return None
