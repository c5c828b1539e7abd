"""RFC 6455 WebSocket framing, sans-I/O: the peer's bytes in, typed events out, for either side.

:class:`FrameParser` turns the bytes the peer sends on an upgraded connection into events: a
complete :class:`Message` (reassembled from its fragments), a :class:`Ping` (with the server's
pong to send back), a :class:`Pong`, a :class:`Close` (the peer's code and reason) or a
:class:`Violation` (the close code, 1002 or 1009, and reason to fail the connection with). Its
``role`` is the side it reads for: a ``"server"`` parser reads a client's frames, which must be
masked; a ``"client"`` parser reads a server's, which must not be. The builders
:func:`binary_frame`, :func:`control_frame` and :func:`close_frame` make a server's (unmasked)
frames, :func:`masked_frame` a client's. Nothing here reads, writes, sleeps or knows about
asyncio: the caller moves the bytes (``server/transport.py`` for the room server,
``client_sdk/loadtest.py`` for the load generator's headsets), so every rule can be tested with
plain byte strings.

Why medverse has its own: aiohttp performs the opening handshake, but its per-message path (a
queue, a future and a task wake-up for every pose) measured about 20 us per message in profiles
of 1,000 headsets, more than the whole tick. Parsing frames straight from the transport's bytes
costs about 1.5 us per pose frame and needs no task per connection
(``python -m benchmarks.wsparse``).

What it checks: client frames must be masked and server frames must not be; RSV bits must be
clear; opcodes must be known; control frames must be final and at most 125 bytes (they may
arrive between the fragments of a message); continuations need a message to continue and a new
message may not start inside one; a message may not exceed ``max_message`` bytes. Every check
is made on the frame header, before any of the payload is buffered, so a header claiming 2 GB
costs nothing. The parser keeps at most one frame's worth of unparsed bytes (plus the fragments
of the message being reassembled, at most ``max_message``). Once a close frame is sent
(:meth:`FrameParser.discard`, or a violation), frames are skipped unread until the peer's close,
as RFC 6455 section 7.1.1 asks.

What it does not do: no extensions (permessage-deflate is never negotiated, so RSV bits are
refused), no opening handshake (aiohttp does it for the server; the load generator writes its
own request), no UTF-8 check of text messages or of close reasons, no check of close status
codes (the peer's code is reported and echoed as sent), and no check that a length uses its
shortest encoding.
"""

from __future__ import annotations

import random
import struct
from typing import Final, Literal, NamedTuple

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

CLOSE_NORMAL: Final = 1000
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_TOO_BIG: Final = 1009

#: Largest payload of a control frame (RFC 6455 section 5.5).
MAX_CONTROL_PAYLOAD: Final = 125

_FIN: Final = 0x80
_MASKED: Final = 0x80
_RSV: Final = 0x70
_OP_BINARY_FIN: Final = _FIN | OP_BINARY
_OP_TEXT_FIN: Final = _FIN | OP_TEXT


# ----------------------------------------------------------------------------------- frames out


def binary_frame(payload: bytes) -> bytes:
    """One final, unmasked, uncompressed binary frame (RFC 6455 section 5.2).

    Server frames are unmasked, so one tick's state frame is the same bytes for every member:
    built once, written to every transport.
    """
    n = len(payload)
    if n < 126:
        return bytes((_OP_BINARY_FIN, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", _OP_BINARY_FIN, 126, n) + payload
    return struct.pack("!BBQ", _OP_BINARY_FIN, 127, n) + payload


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """One final frame from a client, masked with a fresh key (RFC 6455 section 5.3: every
    client frame is masked).

    The key comes from :mod:`random`, not :mod:`secrets`: masking guards intermediaries against
    frames a browser script crafts, and a program speaking WebSocket directly has nobody to
    guard against; a syscall per frame would cost more than the rest of the frame.
    """
    n = len(payload)
    mask = random.getrandbits(32).to_bytes(4, "little")
    if n < 126:
        head = bytes((_FIN | opcode, _MASKED | n))
    elif n < 65536:
        head = struct.pack("!BBH", _FIN | opcode, _MASKED | 126, n)
    else:
        head = struct.pack("!BBQ", _FIN | opcode, _MASKED | 127, n)
    return head + mask + unmask(payload, mask)


def frame_size(n: int, masked: bool = False) -> int:
    """Bytes on the wire of one frame carrying ``n`` payload bytes (with a masking key when
    ``masked``)."""
    return (2 if n < 126 else 4 if n < 65536 else 10) + (4 if masked else 0) + n


def control_frame(opcode: int, payload: bytes = b"") -> bytes:
    """An unmasked control frame; ``payload`` must be at most 125 bytes."""
    return bytes((_FIN | opcode, len(payload))) + payload


def close_frame(code: int, reason: bytes = b"") -> bytes:
    """A close frame with a status code and a reason cut to fit a control frame."""
    return control_frame(OP_CLOSE, struct.pack("!H", code) + reason[: MAX_CONTROL_PAYLOAD - 2])


def unmask(payload: bytes | bytearray | memoryview, mask: bytes | bytearray) -> bytes:
    """XOR a payload with a 4-byte masking key (which masks and unmasks alike).

    As one big integer: a few C calls whatever the length, far cheaper than a Python loop for
    pose-sized frames and linear for large ones.
    """
    n = len(payload)
    if n == 0:
        return b""
    key = (mask * ((n + 3) >> 2))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


# ------------------------------------------------------------------------------------ events in


class Message(NamedTuple):
    """A complete data message; ``opcode`` is that of its first frame (text or binary)."""

    opcode: int
    payload: bytes


class Ping(NamedTuple):
    """A ping from the peer; send :attr:`pong` back (a client sends
    ``masked_frame(OP_PONG, payload)``)."""

    payload: bytes

    @property
    def pong(self) -> bytes:
        """The server's pong frame answering this ping (same payload, RFC 6455 section
        5.5.3)."""
        return control_frame(OP_PONG, self.payload)


class Pong(NamedTuple):
    """A pong from the peer (solicited or not)."""

    payload: bytes


class Close(NamedTuple):
    """The peer's close frame: ``code`` is None when it carried no status code."""

    code: int | None
    reason: bytes

    @property
    def reply(self) -> bytes:
        """The server's close frame answering it: the peer's code echoed, or 1000 if it sent
        none."""
        return close_frame(CLOSE_NORMAL if self.code is None else self.code)


class Violation(NamedTuple):
    """The peer broke the protocol: fail the connection with ``code`` and ``reason``."""

    code: int
    reason: bytes

    @property
    def frame(self) -> bytes:
        """The server's close frame to send (RFC 6455 section 7.1.7)."""
        return close_frame(self.code, self.reason)


Event = Message | Ping | Pong | Close | Violation

#: The side a :class:`FrameParser` reads for: a server reads masked client frames, a client
#: reads unmasked server frames.
Role = Literal["server", "client"]

# Builds a Message without the Python-level ``__new__`` NamedTuple generates: this is the one
# allocation per pose besides the payload, on the hottest path of the server.
_tuple_new = tuple.__new__

# FrameParser modes.
_NORMAL: Final = 0
_DISCARDING: Final = 1
_FINISHED: Final = 2

_NOT_MASKED = Violation(CLOSE_PROTOCOL_ERROR, b"client frames must be masked")
_MASKED_BY_SERVER = Violation(CLOSE_PROTOCOL_ERROR, b"server frames must not be masked")
_RSV_SET = Violation(CLOSE_PROTOCOL_ERROR, b"no extensions were negotiated")
_TOO_BIG = Violation(CLOSE_TOO_BIG, b"message too big")
_BAD_CONTROL = Violation(CLOSE_PROTOCOL_ERROR, b"bad control frame")
_UNKNOWN_OPCODE = Violation(CLOSE_PROTOCOL_ERROR, b"unknown opcode")
_LONE_CONTINUATION = Violation(CLOSE_PROTOCOL_ERROR, b"continuation without a message")
_NESTED_MESSAGE = Violation(CLOSE_PROTOCOL_ERROR, b"new message inside a fragmented one")


class FrameParser:
    """Parses the frames the peer sends; one parser per connection.

    It reads in one of three modes. *Normal*: every frame is checked and reported. *Discarding*
    (RFC 6455 section 7.1.1: after sending a close frame, read on and discard until the peer's
    close), entered when the caller calls :meth:`discard` or after a violation in a frame whose
    length is trustworthy: only the peer's :class:`Close` is reported (any close frame counts),
    other frames are skipped without their payload being held, and only masking, RSV bits and
    the size limit are still checked. *Finished*, after a :class:`Close` or a violation that
    leaves the stream unreadable (a frame masked wrongly for ``role``, RSV bits, a frame over
    the size limit): everything is ignored.
    """

    __slots__ = (
        "_buf",
        "_frag",
        "_frag_op",
        "_frag_size",
        "_mask_bit",
        "_mode",
        "_shape",
        "_skip",
        "_wrong_mask",
        "max_message",
        "role",
    )

    def __init__(self, max_message: int, role: Role = "server") -> None:
        #: Largest message accepted, in bytes, whether in one frame or in fragments.
        self.max_message = max_message
        #: The side this parser reads for (``"server"``: the peer is a client).
        self.role: Role = role
        server = role == "server"
        # The mask bit every frame must carry and the violation otherwise; with it in one
        # tuple (one load per feed), the header's size before a 7-bit length's payload: two
        # bytes and, from a client, the masking key.
        self._mask_bit = _MASKED if server else 0
        self._shape = (self._mask_bit, 6 if server else 2)
        self._wrong_mask = _NOT_MASKED if server else _MASKED_BY_SERVER
        self._buf = bytearray()  # the start of a frame whose end has not arrived
        self._mode = _NORMAL
        self._skip = 0  # payload bytes of a discarded frame still to come
        self._frag_op = 0  # opcode of the fragmented message being reassembled, 0: none
        self._frag: list[bytes] = []
        self._frag_size = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet parsed: at most one frame's worth."""
        return len(self._buf)

    @property
    def discarding(self) -> bool:
        """True while only the peer's close frame is looked for."""
        return self._mode == _DISCARDING

    @property
    def finished(self) -> bool:
        """True after a :class:`Close`, or a violation that leaves the stream unreadable."""
        return self._mode == _FINISHED

    def discard(self) -> None:
        """Our close frame is sent: from now on report only the peer's :class:`Close`."""
        if self._mode == _NORMAL:
            self._mode = _DISCARDING
            self._frag, self._frag_op, self._frag_size = [], 0, 0

    def feed(self, data: bytes) -> list[Event]:
        """Parse ``data`` (any slice of the stream) and return the events it completes."""
        if self._mode:
            return self._feed_discarding(data) if self._mode == _DISCARDING else []
        events: list[Event] = []
        buf = self._buf
        # Most reads hold whole frames: parse them straight from ``data`` and buffer only a
        # trailing partial frame, instead of copying every read into the buffer.
        view: bytes | bytearray
        if buf:
            buf += data
            view = buf
        else:
            view = data
        pos = 0
        end = len(view)
        limit = self.max_message
        mask_bit, hdr = self._shape
        frag_op = self._frag_op  # a local: read for every frame, changed only by _frame()
        while end - pos >= 2:
            b0 = view[pos]
            b1 = view[pos + 1]
            length = b1 & 0x7F
            if length < 126:
                start = pos + hdr
            elif length == 126:
                if end - pos < 4:
                    break
                length = (view[pos + 2] << 8) | view[pos + 3]
                start = pos + hdr + 2
            else:
                if end - pos < 10:
                    break
                length = int.from_bytes(view[pos + 2 : pos + 10], "big")
                start = pos + hdr + 8
            # The common frame (a final text or binary frame, masked as the role wants, small
            # enough, outside a fragmented message) is decided in one test and handled inline;
            # every other frame is checked here, on its header, before its payload is waited
            # for.
            if (
                (b0 == _OP_BINARY_FIN or b0 == _OP_TEXT_FIN)
                and b1 & 0x80 == mask_bit  # a literal: cheaper than a global here
                and length <= limit
                and not frag_op
            ):
                stop = start + length
                if stop > end:
                    break
                if not mask_bit:
                    payload = bytes(view[start:stop])
                elif length:
                    key = view[start - 4 : start] * ((length + 3) >> 2)
                    payload = (
                        int.from_bytes(view[start:stop], "little")
                        ^ int.from_bytes(key[:length], "little")
                    ).to_bytes(length, "little")
                else:
                    payload = b""
                pos = stop
                events.append(_tuple_new(Message, (b0 & 0x0F, payload)))
                continue
            violation = self._check_header(b0, b1, length)
            if violation is not None:
                self._finish()
                events.append(violation)
                return events
            violation = self._check_frame(b0, length)
            if violation is not None:
                # The frame's length can be trusted: skip it, payload unread, and look for
                # the peer's close in what follows.
                events.append(violation)
                stop = start + length
                rest = view[stop:]
                buf.clear()
                self.discard()
                self._skip = max(0, stop - end)
                events += self._feed_discarding(rest)
                return events
            stop = start + length
            if stop > end:
                break
            pos = stop
            event = self._frame(b0, self._payload(view, start, stop))
            frag_op = self._frag_op
            if event is not None:
                events.append(event)
                if self._mode:  # the peer's close: nothing after it counts
                    return events
        if view is buf:
            del buf[:pos]
        elif pos < end:
            buf += data[pos:] if pos else data
        return events

    def _feed_discarding(self, data: bytes | bytearray) -> list[Event]:
        """:meth:`feed` while discarding: skip frames until the peer's close."""
        pos = 0
        if self._skip:  # the buffer is empty: the skipped payload ends the last read
            pos = min(self._skip, len(data))
            self._skip -= pos
        buf = self._buf
        view: bytes | bytearray
        if buf:
            buf += data[pos:]
            view, pos = buf, 0
        else:
            view = data
        end = len(view)
        while end - pos >= 2:
            header = _parse_header(view, pos, end, self._shape[1])
            if header is None:
                break
            b0, b1, length, start = header
            if self._check_header(b0, b1, length) is not None:
                self._finish()  # the caller has sent its close already: nothing to report
                return []
            stop = start + length
            if b0 & 0x0F == OP_CLOSE:
                if stop > end:
                    break
                close = _close_event(self._payload(view, start, stop))
                self._finish()  # clears the buffer ``view`` may be
                return [close]
            if stop > end:
                self._skip = stop - end
                pos = end
                break
            pos = stop
        if view is buf:
            del buf[:pos]
        elif pos < end:
            buf += view[pos:]
        return []

    def _payload(self, view: bytes | bytearray, start: int, stop: int) -> bytes:
        """The payload of the frame at ``view[start:stop]``, unmasked if the role masks."""
        if self._mask_bit:
            return unmask(view[start:stop], view[start - 4 : start])
        return bytes(view[start:stop])

    def _check_header(self, b0: int, b1: int, length: int) -> Violation | None:
        """A violation after which the stream cannot be read on, if any."""
        if b1 & _MASKED != self._mask_bit:
            return self._wrong_mask
        if b0 & _RSV:
            return _RSV_SET
        if length > self.max_message:
            return _TOO_BIG
        return None

    def _check_frame(self, b0: int, length: int) -> Violation | None:
        """A violation in a frame the stream can be read past (its length is sound), if any."""
        opcode = b0 & 0x0F
        if opcode >= OP_CLOSE:
            if not b0 & _FIN or length > MAX_CONTROL_PAYLOAD:
                return _BAD_CONTROL
            return _UNKNOWN_OPCODE if opcode > OP_PONG else None
        if opcode == OP_CONTINUATION:
            if not self._frag_op:
                return _LONE_CONTINUATION
            # The whole message counts, so a message sent in many small fragments is refused
            # as soon as a header would take it over the limit.
            return _TOO_BIG if self._frag_size + length > self.max_message else None
        if opcode > OP_BINARY:
            return _UNKNOWN_OPCODE
        if self._frag_op:
            return _NESTED_MESSAGE
        return None

    def _frame(self, b0: int, payload: bytes) -> Event | None:
        """The event of one complete frame that passed the checks, if it completes one."""
        opcode = b0 & 0x0F
        if opcode == OP_PING:
            return Ping(payload)
        if opcode == OP_PONG:
            return Pong(payload)
        if opcode == OP_CLOSE:
            self._finish()
            return _close_event(payload)
        if opcode != OP_CONTINUATION:  # a text or binary frame starting a fragmented message
            if b0 & _FIN:
                return Message(opcode, payload)
            self._frag_op, self._frag, self._frag_size = opcode, [payload], len(payload)
            return None
        self._frag.append(payload)
        self._frag_size += len(payload)
        if not b0 & _FIN:
            return None
        message = Message(self._frag_op, b"".join(self._frag))
        self._frag_op, self._frag, self._frag_size = 0, [], 0
        return message

    def _finish(self) -> None:
        self._mode = _FINISHED
        self._buf.clear()
        self._skip = 0
        self._frag, self._frag_op, self._frag_size = [], 0, 0


def _parse_header(
    view: bytes | bytearray, pos: int, end: int, hdr: int
) -> tuple[int, int, int, int] | None:
    """``(b0, b1, payload length, payload start)`` of the frame at ``pos``, None if incomplete;
    ``hdr`` is the header's size with a 7-bit length (6 with a masking key, else 2).

    :meth:`FrameParser.feed` does the same inline: a call per frame costs too much there.
    """
    b1 = view[pos + 1]
    length = b1 & 0x7F
    if length < 126:
        return view[pos], b1, length, pos + hdr
    if length == 126:
        if end - pos < 4:
            return None
        return view[pos], b1, (view[pos + 2] << 8) | view[pos + 3], pos + hdr + 2
    if end - pos < 10:
        return None
    return view[pos], b1, int.from_bytes(view[pos + 2 : pos + 10], "big"), pos + hdr + 8


def _close_event(payload: bytes) -> Close:
    if len(payload) < 2:
        return Close(None, b"")
    return Close(int.from_bytes(payload[:2], "big"), payload[2:])
