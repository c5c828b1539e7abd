"""RFC 6455 server side, after aiohttp's handshake: frames in, callbacks out.

aiohttp performs the opening handshake (``WebSocketResponse.prepare``); then the connection's
transport is handed to :class:`WebSocketConnection`, which parses frames as bytes arrive and
calls the session directly. Profiles of 1,000 headsets showed aiohttp's per-message path (a
queue, a future and a task wake-up for every pose) costing about 20 us per message, more than
the whole tick; this parser costs a few microseconds and needs no task per connection.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Protocol

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

#: Seconds to wait for the peer's close frame after sending ours.
CLOSE_WAIT = 2.0

CLOSE_PROTOCOL_ERROR = 1002
CLOSE_TOO_BIG = 1009


class MessageHandler(Protocol):
    """What a connection reports to."""

    def on_message(self, opcode: int, payload: bytes) -> None: ...

    def on_close(self) -> None: ...


def unmask(payload: bytes | bytearray | memoryview, mask: bytes) -> bytes:
    """XOR a client payload with its 4-byte mask (as one big integer: fast for small frames)."""
    n = len(payload)
    if n == 0:
        return b""
    key = (mask * ((n + 3) // 4))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def control_frame(opcode: int, payload: bytes = b"") -> bytes:
    """An unmasked control frame (payload at most 125 bytes)."""
    return bytes((0x80 | opcode, len(payload))) + payload


def close_frame(code: int, reason: bytes = b"") -> bytes:
    return control_frame(OP_CLOSE, struct.pack("!H", code) + reason[:123])


class WebSocketConnection(asyncio.Protocol):
    """Frame parser and writer for one upgraded connection.

    Takes over the transport from aiohttp with :meth:`attach`; when the connection ends it tells
    the handler, then aiohttp's own protocol, so aiohttp's bookkeeping stays right.
    """

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self.transport: asyncio.Transport | None = None
        self.handler: MessageHandler | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buf = bytearray()
        self._frag_op = 0
        self._frag: list[bytes] = []
        self._frag_size = 0
        self._closing = False  # our close frame is sent
        self._shut_down = False  # the transport is closing
        self._close_timer: asyncio.TimerHandle | None = None
        self._previous: asyncio.BaseProtocol | None = None
        #: Loop time of the last bytes received (for the heartbeat).
        self.last_rx = asyncio.get_running_loop().time()

    def attach(self, transport: asyncio.Transport, handler: MessageHandler) -> None:
        self.transport = transport
        self.handler = handler
        self._previous = transport.get_protocol()
        transport.set_protocol(self)

    # ----------------------------------------------------------------- asyncio.Protocol

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = self._shut_down = True
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        if self.handler is not None:
            self.handler.on_close()
        if not self.closed.done():
            self.closed.set_result(None)
        if self._previous is not None:
            self._previous.connection_lost(exc)

    def pause_writing(self) -> None:
        """Writers check the transport's buffer themselves (latest wins); nothing to do."""

    def resume_writing(self) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        self.last_rx = self.closed.get_loop().time()
        buf = self._buf
        buf += data
        pos = 0
        end = len(buf)
        while end - pos >= 6 and not self._shut_down:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            hdr = 2
            if length == 126:
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                hdr = 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hdr = 10
            if not b1 & 0x80:
                self.fail(CLOSE_PROTOCOL_ERROR, b"client frames must be masked")
                return
            if b0 & 0x70:
                self.fail(CLOSE_PROTOCOL_ERROR, b"no extensions were negotiated")
                return
            if length > self.max_message:
                self.fail(CLOSE_TOO_BIG, b"message too big")
                return
            start = pos + hdr + 4
            if end < start + length:
                break
            payload = unmask(buf[start : start + length], bytes(buf[start - 4 : start]))
            pos = start + length
            self._frame(b0 & 0x80, b0 & 0x0F, payload)
        del buf[:pos]

    # ----------------------------------------------------------------- frames

    def _frame(self, fin: int, opcode: int, payload: bytes) -> None:
        if self._closing:
            # We sent our close frame: wait for the peer's, discarding the rest (reading on
            # instead of closing at once keeps the kernel from answering with a reset that
            # would destroy our close frame before the peer reads it).
            if opcode == OP_CLOSE:
                self._shut()
            return
        if opcode >= OP_CLOSE:
            if not fin or len(payload) > 125:
                self.fail(CLOSE_PROTOCOL_ERROR, b"bad control frame")
            elif opcode == OP_CLOSE:
                code = payload[:2] if len(payload) >= 2 else struct.pack("!H", 1000)
                self._write(control_frame(OP_CLOSE, code))
                self._shut()
            elif opcode == OP_PING:
                self._write(control_frame(OP_PONG, payload))
            elif opcode != OP_PONG:
                self.fail(CLOSE_PROTOCOL_ERROR, b"unknown opcode")
            return
        if opcode == OP_CONTINUATION:
            if not self._frag_op:
                self.fail(CLOSE_PROTOCOL_ERROR, b"continuation without a message")
                return
            self._frag.append(payload)
            self._frag_size += len(payload)
            if self._frag_size > self.max_message:
                self.fail(CLOSE_TOO_BIG, b"message too big")
                return
            if fin:
                op, parts = self._frag_op, self._frag
                self._frag_op, self._frag, self._frag_size = 0, [], 0
                self._deliver(op, b"".join(parts))
            return
        if opcode not in (OP_TEXT, OP_BINARY):
            self.fail(CLOSE_PROTOCOL_ERROR, b"unknown opcode")
            return
        if self._frag_op:
            self.fail(CLOSE_PROTOCOL_ERROR, b"new message inside a fragmented one")
            return
        if fin:
            self._deliver(opcode, payload)
        else:
            self._frag_op, self._frag, self._frag_size = opcode, [payload], len(payload)

    def _deliver(self, opcode: int, payload: bytes) -> None:
        if self.handler is not None:
            self.handler.on_message(opcode, payload)

    # ----------------------------------------------------------------- output

    def _write(self, frame: bytes) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(frame)

    def _shut(self) -> None:
        self._closing = True
        self._shut_down = True
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        if self.transport is not None:
            self.transport.close()

    def close(self, code: int = 1000, reason: bytes = b"") -> None:
        """Send a close frame, then close the TCP connection when the peer answers with its
        own (RFC 6455 section 7.1.1) or after ``CLOSE_WAIT`` seconds."""
        if self._closing:
            return
        self._write(close_frame(code, reason))
        self._closing = True
        loop = self.closed.get_loop()
        self._close_timer = loop.call_later(CLOSE_WAIT, self._shut)

    def fail(self, code: int, reason: bytes) -> None:
        """Protocol violation: close with ``code`` at once (RFC 6455 section 7.1.7)."""
        self.close(code, reason)

    def abort(self) -> None:
        """Drop the connection without flushing (a peer that stopped reading)."""
        self._closing = self._shut_down = True
        if self.transport is not None:
            self.transport.abort()
