"""Per-message cost of reading client WebSocket frames: ``python -m benchmarks.wsparse``.

Feeds masked pose frames, as a headset sends them (a 92-byte pose message: 8-byte header and
three slots of 7 float32, in a 98-byte frame), to ``data_received`` of a connection attached to
a fake transport, with a handler that only counts messages, and reports nanoseconds per message:

* ``old``: ``WebSocketConnection`` as it was before the framing was split out (the parser inside
  the asyncio protocol, copied verbatim below from ``server/wsproto.py`` at commit 85ee627);
* ``new``: ``server.transport.WebSocketConnection`` over ``protocol.rfc6455.FrameParser``;
* ``parser``: ``FrameParser.feed`` alone, for reference.

Cases: one frame per read, ten frames per read, and one frame split over two reads (the
buffering path). Each run parses ``--messages`` messages; runs of the implementations are
interleaved so that drift of a shared machine hits them alike; the table gives the median and the
minimum over ``--runs`` runs. Results: a table on stdout and ``benchmarks/results/wsparse.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

from medverse.protocol.messages import encode_pose
from medverse.protocol.rfc6455 import FrameParser
from medverse.server.transport import WebSocketConnection

from .harness import progress, save_results

# ------------------------------------------------------------------ the implementation before


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


class _OldHandler(Protocol):
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


class OldWebSocketConnection(asyncio.Protocol):
    """``WebSocketConnection`` from ``server/wsproto.py`` at 85ee627, verbatim.

    Frame parser and writer for one upgraded connection.

    Takes over the transport from aiohttp with :meth:`attach`; when the connection ends it tells
    the handler, then aiohttp's own protocol, so aiohttp's bookkeeping stays right.
    """

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self.transport: asyncio.Transport | None = None
        self.handler: _OldHandler | None = None
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

    def attach(self, transport: asyncio.Transport, handler: _OldHandler) -> None:
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


# ------------------------------------------------------------------ harness


class _Transport:
    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_protocol(self) -> None:
        return None

    def set_protocol(self, protocol: object) -> None:
        pass


class _Counter:
    def __init__(self) -> None:
        self.n = 0

    def on_message(self, opcode: int, payload: bytes) -> None:
        self.n += 1

    def on_close(self) -> None:
        pass


def pose_frame() -> bytes:
    """A masked client frame carrying a three-slot pose message (92 bytes)."""
    payload = encode_pose(
        1234,
        [
            ((0.01, 1.62, -0.03), (0.0, 0.259, 0.0, 0.966)),
            ((-0.21, 1.18, -0.32), (0.1, 0.2, 0.3, 0.927)),
            ((0.22, 1.21, -0.29), (-0.1, 0.2, -0.3, 0.927)),
        ],
    )
    assert len(payload) == 92
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x82, 0x80 | len(payload)) + mask + body


def reads_for(case: str, frame: bytes) -> tuple[list[bytes], int]:
    """The reads of one repetition of ``case`` and the messages they carry."""
    if case == "1 per read":
        return [frame], 1
    if case == "10 per read":
        return [frame * 10], 10
    if case == "1 in 2 reads":
        return [frame[:40], frame[40:]], 1
    raise ValueError(case)


def make_reader(impl: str) -> tuple[Callable[[bytes], Any], _Counter]:
    counter = _Counter()
    if impl == "parser":
        return FrameParser(1 << 14).feed, counter
    conn: OldWebSocketConnection | WebSocketConnection
    conn = OldWebSocketConnection(1 << 14) if impl == "old" else WebSocketConnection(1 << 14)
    conn.attach(_Transport(), counter)  # type: ignore[arg-type]
    return conn.data_received, counter


def time_one(impl: str, case: str, frame: bytes, messages: int) -> float:
    """Nanoseconds per message over one run of ``messages`` messages."""
    reads, per = reads_for(case, frame)
    reps = messages // per
    read, counter = make_reader(impl)
    t0 = time.perf_counter()
    for _ in range(reps):
        for data in reads:
            read(data)
    elapsed = time.perf_counter() - t0
    if impl != "parser":
        assert counter.n == reps * per
    return elapsed / (reps * per) * 1e9


IMPLS = ("old", "new", "parser")
CASES = ("1 per read", "10 per read", "1 in 2 reads")


async def measure(runs: int, messages: int) -> list[dict[str, Any]]:
    frame = pose_frame()
    samples: dict[tuple[str, str], list[float]] = {(i, c): [] for i in IMPLS for c in CASES}
    for impl in IMPLS:  # warm up
        for case in CASES:
            time_one(impl, case, frame, 2000)
    for run in range(runs):
        progress(f"run {run + 1} of {runs}: {len(CASES)} cases x {len(IMPLS)} implementations")
        for case in CASES:
            for impl in IMPLS:
                samples[impl, case].append(time_one(impl, case, frame, messages))
    rows = []
    for case in CASES:
        old = statistics.median(samples["old", case])
        for impl in IMPLS:
            s = samples[impl, case]
            rows.append(
                {
                    "case": case,
                    "impl": impl,
                    "ns_per_message_median": round(statistics.median(s), 1),
                    "ns_per_message_min": round(min(s), 1),
                    "vs_old_median": round(statistics.median(s) / old, 3),
                    "runs_ns": [round(x, 1) for x in s],
                }
            )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.wsparse", description=__doc__)
    p.add_argument("--runs", type=int, default=9)
    p.add_argument("--messages", type=int, default=200_000, help="messages per run")
    args = p.parse_args()
    try:
        import uvloop  # the server's loop: its time() is what data_received calls

        loop_name = "uvloop"
        rows = uvloop.run(measure(args.runs, args.messages))
    except ImportError:
        loop_name = "asyncio"
        rows = asyncio.run(measure(args.runs, args.messages))
    header = f"{'case':<13} {'impl':<7} {'median ns/msg':>13} {'min ns/msg':>10} {'vs old':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['case']:<13} {r['impl']:<7} {r['ns_per_message_median']:>13.0f} "
            f"{r['ns_per_message_min']:>10.0f} {r['vs_old_median']:>7.2f}"
        )
    doc = {
        "benchmark": "wsparse",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "loop": loop_name,
        "payload_bytes": 92,
        "frame_bytes": len(pose_frame()),
        "runs": args.runs,
        "messages_per_run": args.messages,
        "method": (
            "data_received (or FrameParser.feed) on pre-built reads, fake transport, handler "
            "counting messages; implementations interleaved run by run; ns per message"
        ),
        "rows": rows,
    }
    save_results("wsparse", doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
