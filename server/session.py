"""One WebSocket connection: handshake, input, control messages, and writes with bounded memory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import TYPE_CHECKING

from aiohttp import WSMsgType, web

from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import (
    CLIENT_MESSAGES,
    FRAME_CONTROL,
    FRAME_POSE,
    PROTOCOL_VERSION,
    Error,
    Hello,
    Leave,
    Message,
    Ping,
    Pong,
    Welcome,
    check_pose_frame,
    decode_message,
    encode_message,
    pose_sequence,
)

from .wsframe import binary_frame

if TYPE_CHECKING:
    from .room import Member
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


class Session:
    """Server side of one connection. Never lets an exception escape into the room."""

    def __init__(self, world: World, ws: web.WebSocketResponse, request: web.Request) -> None:
        self.world = world
        self.ws = ws
        self.transport = request.transport
        self.peer = request.remote
        self.member: Member | None = None
        self._closed = False
        self._close_task: asyncio.Future[bool] | None = None
        cfg = world.config
        # Token bucket for error replies: a flood of bad frames gets a few answers, not a queue.
        self._err_tokens = cfg.error_reply_rate
        self._err_stamp = time.monotonic()

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
            log.info("closing %s: %d bytes unsent", self.peer, t.get_write_buffer_size())
            self._closed = True
            t.abort()  # the peer is not reading; a close frame would only queue behind the rest
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

    def detach(self, reason: str) -> None:
        """Another connection took over this member; close this one."""
        self.member = None
        self._closed = True
        self._close_task = asyncio.ensure_future(
            self.ws.close(code=CLOSE_REPLACED, message=reason.encode()[:120])
        )

    # ----------------------------------------------------------------- input

    async def run(self) -> None:
        """Handshake, then read until the connection ends."""
        ws = self.ws
        world = self.world
        try:
            msg = await asyncio.wait_for(ws.receive(), world.config.handshake_timeout)
        except TimeoutError:
            self.send_error(ProtocolError(ErrorCode.HANDSHAKE_TIMEOUT, "no hello in time"), True)
            await ws.close(code=CLOSE_HANDSHAKE_TIMEOUT, message=b"handshake timeout")
            return
        if msg.type != WSMsgType.BINARY:
            if msg.type in (WSMsgType.TEXT,):
                self.send_error(ProtocolError(ErrorCode.MALFORMED, "binary frames only"), True)
                await ws.close(code=CLOSE_PROTOCOL, message=b"binary frames only")
            return
        world.received_bytes += len(msg.data)
        hello = decode_message(msg.data, CLIENT_MESSAGES)
        if isinstance(hello, ProtocolError) or not isinstance(hello, Hello):
            err = (
                hello
                if isinstance(hello, ProtocolError)
                else ProtocolError(ErrorCode.HANDSHAKE_REQUIRED, "the first message must be hello")
            )
            self.send_error(err, True)
            await ws.close(code=CLOSE_PROTOCOL, message=b"bad handshake")
            return
        if not self._handshake(hello):
            await ws.close(code=CLOSE_POLICY, message=b"join refused")
            return
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    self._on_binary(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    self.send_error(ProtocolError(ErrorCode.MALFORMED, "binary frames only"))
                if self._closed:
                    break
        finally:
            self._on_close()

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
        member = None
        resumed = False
        if hello.resume is not None:
            member = world.find_resumable(hello.resume, hello.room)
            if member is None:
                self.send_error(ProtocolError(ErrorCode.BAD_RESUME, "cannot resume; joining anew"))
            else:
                world.resume(member, self)
                resumed = True
        if member is None:
            try:
                member = world.join(hello.room, hello.name, hello.slots, self)
            except ProtocolError as err:
                self.send_error(err, True)
                return False
        self.member = member
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
        return True

    def _on_binary(self, data: bytes) -> None:
        world = self.world
        world.received_bytes += len(data)
        member = self.member
        if member is None or not data:
            return
        kind = data[0]
        if kind == FRAME_POSE:
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
                self._closed = True  # the read loop stops and the handler closes normally
            elif isinstance(msg, Hello):
                self.send_error(ProtocolError(ErrorCode.ALREADY_JOINED, "already joined"))
            else:
                self.send_error(
                    ProtocolError(ErrorCode.UNKNOWN_TYPE, f"{msg.TYPE} is not for servers")
                )
        else:
            self.send_error(ProtocolError(ErrorCode.MALFORMED, f"unknown frame kind 0x{kind:02x}"))

    def _on_close(self) -> None:
        member = self.member
        self.member = None
        if member is not None and member.session is self:
            self.world.disconnected(member)


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    """``GET /ws``: upgrade and run a session."""
    from .app import WORLD_KEY

    world = request.app[WORLD_KEY]
    cfg = world.config
    ws = web.WebSocketResponse(
        compress=False,
        max_msg_size=cfg.max_frame_bytes,
        heartbeat=cfg.heartbeat or None,
        autoping=True,
    )
    await ws.prepare(request)
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None and cfg.socket_send_buffer > 0:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, cfg.socket_send_buffer)
    world.metrics.connections.inc()
    session = Session(world, ws, request)
    try:
        await session.run()
    except Exception:
        log.exception("session %s failed", request.remote)
    finally:
        world.metrics.connections.dec()
        if not ws.closed:
            await ws.close()
    return ws
