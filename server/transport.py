"""The asyncio side of an upgraded WebSocket connection: bytes to :class:`FrameParser`, events to
the session, pongs and the close handshake back to the peer.

aiohttp performs the opening handshake (``WebSocketResponse.prepare``); then the connection's
transport is handed to :class:`WebSocketConnection`, which feeds every read to the sans-I/O
parser in ``protocol/rfc6455.py`` and calls the session directly, with no task, queue or future
per message (see that module for why).
"""

from __future__ import annotations

import asyncio
from typing import Final, Protocol

from medverse.protocol.rfc6455 import (
    Close,
    Event,
    FrameParser,
    Message,
    Ping,
    Violation,
    close_frame,
)

#: Seconds to wait for the peer's close frame after sending ours.
CLOSE_WAIT: Final = 2.0


class MessageHandler(Protocol):
    """What a connection reports to."""

    def on_message(self, opcode: int, payload: bytes) -> None:
        """One complete message (text or binary) from the peer."""
        ...

    def on_close(self) -> None:
        """The TCP connection is gone."""
        ...


class WebSocketConnection(asyncio.Protocol):
    """One upgraded connection: frames in through a :class:`FrameParser`, frames out.

    Takes over the transport from aiohttp with :meth:`attach`; when the connection ends it tells
    the handler, then aiohttp's own protocol, so aiohttp's bookkeeping stays right.
    """

    def __init__(self, max_message: int) -> None:
        loop = asyncio.get_running_loop()
        self.parser = FrameParser(max_message)
        self.transport: asyncio.Transport | None = None
        self.handler: MessageHandler | None = None
        #: Resolved when the TCP connection is lost.
        self.closed: asyncio.Future[None] = loop.create_future()
        self._closing = False  # our close frame is sent: read on, discarding, until the peer's
        self._shut_down = False  # the transport is closing
        self._close_timer: asyncio.TimerHandle | None = None
        self._previous: asyncio.BaseProtocol | None = None
        #: Loop time of the last bytes received (for the heartbeat).
        self.last_rx = loop.time()
        # Bound once: data_received runs for every read of every headset.
        self._time = loop.time
        self._feed = self.parser.feed

    def attach(self, transport: asyncio.Transport, handler: MessageHandler) -> None:
        """Take ``transport`` over from its current protocol and report to ``handler``."""
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
        self.last_rx = self._time()
        if self._shut_down:
            return
        for event in self._feed(data):
            # A handler may close or abort the connection from on_message: every event is
            # checked against the state it left, as if the frames were read one by one.
            if type(event) is Message and not self._closing:
                handler = self.handler
                if handler is not None:
                    handler.on_message(event.opcode, event.payload)
            else:
                self._event(event)

    def _event(self, event: Event) -> None:
        if self._shut_down:
            return
        if self._closing:
            # We sent our close frame: wait for the peer's, discarding the rest (reading on
            # instead of closing at once keeps the kernel from answering with a reset that
            # would destroy our close frame before the peer reads it).
            if type(event) is Close:
                self._shut()
        elif type(event) is Ping:
            self._write(event.pong)
        elif type(event) is Close:
            self._write(event.reply)
            self._shut()
        elif type(event) is Violation:
            self.fail(event.code, event.reason)
        # A Pong needs nothing: any bytes received already count for the heartbeat (last_rx).

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
        self.parser.discard()
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
