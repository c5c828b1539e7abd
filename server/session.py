"""One WebSocket connection: handshake, input, control messages, and writes with bounded memory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import TYPE_CHECKING

from aiohttp import web

from medverse.protocol.errors import ErrorCode, ProtocolError
from medverse.protocol.messages import (
    CLIENT_MESSAGES,
    FRAME_CONTROL,
    FRAME_POSE,
    PROTOCOL_VERSION,
    ChangeRole,
    Consent,
    ConsentRequired,
    Error,
    Hello,
    Leave,
    Message,
    Moderate,
    Pause,
    Ping,
    Pong,
    RequestUnmute,
    Waiting,
    Welcome,
    check_pose_frame,
    decode_message,
    encode_message,
    pose_sequence,
)

from . import moderation
from .auth import Identity, anonymous
from .transport import WebSocketConnection
from .websocket import OP_BINARY, OP_PING, binary_frame, control_frame

if TYPE_CHECKING:
    from .room import Member, Room
    from .world import World

log = logging.getLogger("medverse.session")

#: Close codes (RFC 6455 and the 4000-4999 private range).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL = 1002
CLOSE_POLICY = 1008
CLOSE_HANDSHAKE_TIMEOUT = 4000
CLOSE_TOO_SLOW = 4001
CLOSE_REPLACED = 4002
CLOSE_TOO_MANY_CONNECTIONS = 4003
CLOSE_RATE_LIMIT = 4008
CLOSE_CONSENT = 4011


class Session:
    """Server side of one connection, driven by :class:`WebSocketConnection` callbacks.

    Never lets an exception escape into the room: a bug while handling one message is logged and
    answered with an ``internal`` error.
    """

    def __init__(self, world: World, conn: WebSocketConnection, peer: str | None) -> None:
        self.world = world
        self.conn = conn
        self.transport = conn.transport
        self.peer = peer
        self.member: Member | None = None
        self.waiting: Identity | None = None  # in the lobby, as this identity
        self.consent_pending: Identity | None = None  # asked to consent, as this identity
        self._lobby: tuple[Room, int] | None = None
        self._slots = 3
        self._closed = False
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._heartbeat_timer: asyncio.TimerHandle | None = None
        self._last_rx = 0.0
        cfg = world.config
        # Token bucket for error replies: a flood of bad frames gets a few answers, not a queue.
        self._err_tokens = cfg.error_reply_rate
        self._err_stamp = time.monotonic()
        self._msg_tokens = cfg.message_burst
        self._byte_tokens = cfg.byte_burst
        self._rate_stamp = self._err_stamp
        self._violations = 0.0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._last_rx = loop.time()
        self._handshake_timer = loop.call_later(
            self.world.config.handshake_timeout, self._handshake_timeout
        )
        if self.world.config.heartbeat > 0:
            self._heartbeat_timer = loop.call_later(self.world.config.heartbeat, self._heartbeat)

    # ----------------------------------------------------------------- output

    def transport_backlog(self) -> int:
        t = self.transport
        if t is None or t.is_closing():
            return 0
        return t.get_write_buffer_size()

    def write(self, frame: bytes) -> bool:
        """Write one prebuilt WebSocket frame; disconnect a member that stopped reading."""
        t = self.transport
        if t is None or t.is_closing() or self._closed:
            return False
        if t.get_write_buffer_size() > self.world.config.send_hard_limit:
            self.world.metrics.slow_disconnects.inc()
            self.world.record("closed_not_reading", peer=self.peer)
            log.info("closing %s: %d bytes unsent", self.peer, t.get_write_buffer_size())
            self._closed = True
            self.conn.abort()  # the peer is not reading; a close frame would only queue
            return False
        t.write(frame)
        self.world.sent_bytes += len(frame)
        return True

    def send(self, msg: Message) -> bool:
        return self.write(binary_frame(encode_message(msg)))

    def send_error(self, err: ProtocolError, fatal: bool = False) -> None:
        self.world.metrics.protocol_errors.labels(err.code.value).inc()
        now = time.monotonic()
        rate = self.world.config.error_reply_rate
        self._err_tokens = min(rate, self._err_tokens + (now - self._err_stamp) * rate)
        self._err_stamp = now
        if self._err_tokens < 1 and not fatal:
            return
        self._err_tokens -= 1
        self.send(Error.of(err, fatal))

    def close(self, code: int, reason: bytes) -> None:
        self._closed = True
        self.conn.close(code, reason)

    def detach(self, reason: str) -> None:
        """Another connection took over this member; close this one."""
        self.member = None
        self.close(CLOSE_REPLACED, reason.encode()[:120])

    # ----------------------------------------------------------------- timers

    def _handshake_timeout(self) -> None:
        self._handshake_timer = None
        if self.member is None and not self._closed:
            self.send_error(ProtocolError(ErrorCode.HANDSHAKE_TIMEOUT, "no hello in time"), True)
            self.close(CLOSE_HANDSHAKE_TIMEOUT, b"handshake timeout")

    def _heartbeat(self) -> None:
        """Ping the peer; close a connection that has been silent for two intervals."""
        loop = asyncio.get_running_loop()
        interval = self.world.config.heartbeat
        if self._closed:
            return
        if loop.time() - self.conn.last_rx > 2 * interval:
            log.info("closing %s: silent for %.0f s", self.peer, loop.time() - self.conn.last_rx)
            self.close(CLOSE_GOING_AWAY, b"heartbeat timeout")
            return
        self.write(control_frame(OP_PING))
        self._heartbeat_timer = loop.call_later(interval, self._heartbeat)

    # ----------------------------------------------------------------- input

    def on_message(self, opcode: int, data: bytes) -> None:
        """One complete WebSocket message from the peer."""
        self.world.received_bytes += len(data)
        if self._closed:
            return
        try:
            if opcode != OP_BINARY:
                err = ProtocolError(ErrorCode.MALFORMED, "binary frames only")
                if self.member is None:
                    self._refuse(err, CLOSE_PROTOCOL, b"binary frames only")
                else:
                    self.send_error(err)
            elif not self._allow(len(data)):
                return
            elif self.consent_pending is not None:
                self._on_consent_pending(data)
            elif self.member is None and self.waiting is None:
                self._on_hello(data)
            elif self.member is None:
                self._on_waiting(data)
            else:
                self._on_binary(data)
        except Exception:  # a bug handling one message must not take the server down
            log.exception("session %s: error handling a message", self.peer)
            self.send_error(ProtocolError(ErrorCode.INTERNAL, "internal error"))

    def _refuse(self, err: ProtocolError, code: int, reason: bytes) -> None:
        self.send_error(err, True)
        self.close(code, reason)

    def _on_hello(self, data: bytes) -> None:
        hello = decode_message(data, CLIENT_MESSAGES)
        if isinstance(hello, ProtocolError):
            self._refuse(hello, CLOSE_PROTOCOL, b"bad handshake")
            return
        if not isinstance(hello, Hello):
            err = ProtocolError(ErrorCode.HANDSHAKE_REQUIRED, "the first message must be hello")
            self._refuse(err, CLOSE_PROTOCOL, b"bad handshake")
            return
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        if not self._handshake(hello):
            self.close(CLOSE_POLICY, b"join refused")

    def _handshake(self, hello: Hello) -> bool:
        world = self.world
        if hello.version != PROTOCOL_VERSION:
            self.send_error(
                ProtocolError(
                    ErrorCode.UNSUPPORTED_VERSION,
                    f"server speaks protocol {PROTOCOL_VERSION}, client {hello.version}",
                ),
                True,
            )
            return False
        try:
            identity = self._identify(hello)
        except ProtocolError as err:
            world.metrics.auth_refusals.labels(err.code.value).inc()
            world.record("join_refused", room=hello.room, peer=self.peer, code=err.code.value)
            log.info("%s refused for room %s: %s", self.peer, hello.room, err)
            self.send_error(err, True)
            return False
        member = None
        resumed = False
        if hello.resume is not None:
            member = world.find_resumable(hello.resume, hello.room)
            # With tokens, only the same subject may take a member over; without, the resume
            # token alone is the proof.
            if member is None or (
                world.verifier is not None and member.identity.subject != identity.subject
            ):
                member = None
                self.send_error(ProtocolError(ErrorCode.BAD_RESUME, "cannot resume; joining anew"))
            else:
                world.resume(member, self)
                resumed = True
        self._slots = hello.slots
        if member is not None:
            self.member = member
            self.send_welcome(resumed)
            world.notify("member_resumed", member)
            return True
        return self._enter(identity, consented=False)

    def _enter(self, identity: Identity, consented: bool) -> bool:
        """Entry checks, then consent, then the lobby or the room itself."""
        world = self.world
        room = world.rooms.get(identity.room)
        refusal = moderation.entry_refusal(room, identity)
        if refusal is not None:
            world.record(
                "join_refused", room=identity.room, actor=identity.subject, code=refusal.code.value
            )
            self.send_error(refusal, True)
            return False
        policy = world.policy
        if not consented and policy.needs_consent(identity.room):
            assert policy.consent_text is not None
            self.consent_pending = identity
            self.send(ConsentRequired(policy.consent_version, policy.consent_text))
            return True
        if room is not None and moderation.must_wait(room, identity):
            lobby_id = room.new_lobby_id()
            room.lobby[lobby_id] = self
            self.waiting = identity
            self._lobby = (room, lobby_id)
            self.send(Waiting(room.name, lobby_id))
            moderation.lobby_changed(room)
            return True
        try:
            self.complete_join(identity)
        except ProtocolError as err:
            self.send_error(err, True)
            return False
        return True

    def _on_consent_pending(self, data: bytes) -> None:
        """Before consent nothing of the room flows; only consent, ping and leave count."""
        msg = decode_message(data, CLIENT_MESSAGES) if data[:1] == bytes((FRAME_CONTROL,)) else None
        identity = self.consent_pending
        assert identity is not None
        if isinstance(msg, Consent):
            version = self.world.policy.consent_version
            self.consent_pending = None
            if msg.accept and msg.version == version:
                self.world.record(
                    "consent", room=identity.room, actor=identity.subject, version=version
                )
                if not self._enter(identity, consented=True):
                    self.close(CLOSE_POLICY, b"join refused")
                return
            self.world.record(
                "consent_declined", room=identity.room, actor=identity.subject, version=msg.version
            )
            why = "consent declined" if msg.accept is False else "consent to an old version"
            self._refuse(ProtocolError(ErrorCode.CONSENT_REQUIRED, why), CLOSE_CONSENT, b"consent")
        elif isinstance(msg, Ping):
            self.send(Pong(msg.id, msg.client_time, 0.0))
        elif isinstance(msg, Leave):
            self.close(CLOSE_NORMAL, b"left")
        else:
            self.send_error(ProtocolError(ErrorCode.CONSENT_REQUIRED, "answer the consent first"))

    def complete_join(self, identity: Identity) -> None:
        """Become a member (directly, or when a host admits us from the lobby)."""
        self.waiting = None
        self._lobby = None
        self.member = self.world.join(identity, self._slots, self)
        self.send_welcome(False)
        self.world.notify("member_joined", self.member)

    def send_welcome(self, resumed: bool) -> None:
        member = self.member
        assert member is not None
        world = self.world
        room = member.room
        self.send(
            Welcome(
                version=PROTOCOL_VERSION,
                member_id=member.id,
                room=room.name,
                rate=world.config.tick_rate,
                tick=room.room_tick(world.tick_no),
                resume=member.resume_token,
                resumed=resumed,
                members=tuple(room.others(member)),
            )
        )
        log.debug(
            "%s %s room %s as %d",
            self.peer,
            "resumed" if resumed else "joined",
            room.name,
            member.id,
        )

    def _identify(self, hello: Hello) -> Identity:
        """Who is joining: from the verified token, or anonymous on a server without auth."""
        verifier = self.world.verifier
        if verifier is None:
            return anonymous(hello.name, hello.room, f"anonymous:{self.peer}:{id(self):x}")
        if not hello.token:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "a join token is required")
        return verifier.verify(hello.token, hello.room)

    def _allow(self, size: int) -> bool:
        """Token buckets for messages and bytes; too many refusals close the connection."""
        cfg = self.world.config
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
        self.world.metrics.protocol_errors.labels(ErrorCode.RATE_LIMITED.value).inc()
        if self._violations > cfg.max_violations:
            log.info("closing %s: sustained flooding", self.peer)
            self.world.record(
                "closed_flooding",
                room=self.member.room.name if self.member else None,
                actor=self.member.identity.subject if self.member else None,
                peer=self.peer,
            )
            self.send_error(ProtocolError(ErrorCode.RATE_LIMITED, "flooding; closing"), True)
            self.close(CLOSE_RATE_LIMIT, b"rate limit")
        else:
            self.send_error(ProtocolError(ErrorCode.RATE_LIMITED, "message or byte rate exceeded"))
        return False

    def _on_waiting(self, data: bytes) -> None:
        """In the lobby: nothing of the room, only ping and leave."""
        msg = decode_message(data, CLIENT_MESSAGES) if data[:1] == bytes((FRAME_CONTROL,)) else None
        if isinstance(msg, Ping):
            self.send(Pong(msg.id, msg.client_time, 0.0))
        elif isinstance(msg, Leave):
            self.close(CLOSE_NORMAL, b"left")
        else:
            self.send_error(ProtocolError(ErrorCode.FORBIDDEN, "waiting in the lobby"))

    def _on_binary(self, data: bytes) -> None:
        world = self.world
        member = self.member
        if member is None or not data:
            return
        kind = data[0]
        if kind == FRAME_POSE:
            if member.paused:
                return  # stepped out: nothing of this member reaches the room
            if member.hidden:
                self.send_error(ProtocolError(ErrorCode.FORBIDDEN, "observers send no poses"))
                return
            err = check_pose_frame(data, member.slots)
            if err is not None:
                self.send_error(err)
                return
            seq = pose_sequence(data)
            if seq <= member.last_seq:
                return  # stale: an older pose than one already applied
            member.last_seq = seq
            world.submit_pose(member, data)
        elif kind == FRAME_CONTROL:
            msg = decode_message(data, CLIENT_MESSAGES)
            if isinstance(msg, ProtocolError):
                self.send_error(msg)
            elif isinstance(msg, Ping):
                self.send(Pong(msg.id, msg.client_time, world.room_time(member.room)))
            elif isinstance(msg, Leave):
                world.leave(member, "left")
                self.member = None
                self.close(CLOSE_NORMAL, b"left")
            elif isinstance(msg, Hello):
                self.send_error(ProtocolError(ErrorCode.ALREADY_JOINED, "already joined"))
            elif isinstance(msg, Consent):
                if not msg.accept:  # withdrawing consent means leaving the room
                    world.record(
                        "consent_withdrawn",
                        room=member.room.name,
                        actor=member.identity.subject,
                        version=msg.version,
                    )
                    world.leave(member, "consent withdrawn")
                    self.member = None
                    self.close(CLOSE_CONSENT, b"consent withdrawn")
            elif isinstance(msg, Moderate | ChangeRole | Pause | RequestUnmute):
                try:
                    if isinstance(msg, Moderate):
                        moderation.handle(self, msg)
                    elif isinstance(msg, ChangeRole):
                        moderation.change_role(self, msg)
                    elif isinstance(msg, Pause):
                        moderation.set_paused(self, msg.paused)
                    else:
                        moderation.request_unmute(self)
                except ProtocolError as err:
                    self.send_error(err)
            elif (handler := world.handlers.get(type(msg))) is not None:
                try:
                    handler(self, member, msg)
                except ProtocolError as err:
                    self.send_error(err)
            else:
                self.send_error(
                    ProtocolError(ErrorCode.UNKNOWN_TYPE, f"{msg.TYPE} is not for servers")
                )
        elif (binary := world.binary_handlers.get(kind)) is not None:
            try:
                binary(self, member, data)
            except ProtocolError as err:
                self.send_error(err)
        else:
            self.send_error(ProtocolError(ErrorCode.MALFORMED, f"unknown frame kind 0x{kind:02x}"))

    def on_close(self) -> None:
        """The connection ended (either side)."""
        self._closed = True
        if self._lobby is not None:
            room, lobby_id = self._lobby
            self._lobby = None
            if room.lobby.pop(lobby_id, None) is not None:
                moderation.lobby_changed(room)
        for timer in (self._handshake_timer, self._heartbeat_timer):
            if timer is not None:
                timer.cancel()
        member = self.member
        self.member = None
        if member is not None and member.session is self:
            self.world.disconnected(member)


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    """``GET /ws``: aiohttp does the opening handshake, then our parser takes the transport."""
    from .app import WORLD_KEY

    world = request.app[WORLD_KEY]
    cfg = world.config
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
    conn = WebSocketConnection(cfg.max_frame_bytes)
    session = Session(world, conn, request.remote)
    conn.attach(transport, session)  # type: ignore[arg-type]
    session.transport = transport  # type: ignore[assignment]
    addr = request.remote or "?"
    per_addr = world.connections_by_address
    if 0 < cfg.max_connections_per_address <= per_addr.get(addr, 0):
        world.record("connection_refused", peer=addr, reason="too many connections")
        session.send_error(
            ProtocolError(ErrorCode.TOO_MANY_CONNECTIONS, "too many connections from your address"),
            True,
        )
        session.close(CLOSE_TOO_MANY_CONNECTIONS, b"too many connections")
        return ws
    per_addr[addr] = per_addr.get(addr, 0) + 1
    session.start()
    world.metrics.connections.inc()
    try:
        await conn.closed
    finally:
        world.metrics.connections.dec()
        left = per_addr.get(addr, 1) - 1
        if left > 0:
            per_addr[addr] = left
        else:
            per_addr.pop(addr, None)
    return ws
