"""``medverse loadtest``: simulated headsets against a server, in their own process.

Each simulated headset is a lean WebSocket client (an asyncio protocol speaking RFC 6455 and the
medverse protocol directly, so one process can drive a thousand of them) that joins a room and
sends head and hand poses at the tick rate, following :mod:`client_sdk.motion`. Every headset
counts the state frames and bytes it receives and any tick it missed; a few "probe" headsets per
room also decode the state and measure pose-to-peer latency: the time from a sender handing a
pose to its socket to a probe receiving a state frame with that exact (quantized) pose.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medverse.protocol.catalog import SERVER_MESSAGES
from medverse.protocol.errors import ProtocolError
from medverse.protocol.messages import (
    FRAME_CONTROL,
    PROTOCOL_VERSION,
    Error,
    Hello,
    Redirect,
    Welcome,
    decode_message,
    encode_message,
    encode_pose_frames,
)
from medverse.protocol.quant import quantize_positions
from medverse.protocol.rfc6455 import (
    OP_BINARY,
    OP_PONG,
    Close,
    FrameParser,
    Message,
    Ping,
    Violation,
    frame_size,
    masked_frame,
)
from medverse.protocol.snapshot import FRAME_STATE, SnapshotDecoder, state_tick
from medverse.protocol.tokens import mint_token

from .motion import room_trajectories

_SLOTS = 3  # head and both hands
_ALL_PRESENT = (1 << _SLOTS) - 1

#: Largest message read from the server: far above any state frame or control message it sends.
_MAX_SERVER_MESSAGE = 1 << 24


def _default_trace() -> str | None:
    env = os.environ.get("MEDVERSE_TRACE")
    candidates = [env] if env else []
    here = Path(__file__).resolve().parent.parent
    candidates += [
        str(p / "shared/data/questset_head_right_60hz.csv")
        for p in (here.parent, Path.cwd().parent)
    ]
    for c in candidates:
        if c and Path(c).is_file():
            return c
    return None


def split_url(url: str) -> tuple[str, str, int, str]:
    """``ws://host:port/path`` as (host:port, host, port, path); the path defaults to /ws."""
    url = url.rstrip("/")
    if "://" not in url:
        url = "ws://" + url
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    addr, _, port = hostport.rpartition(":")
    return hostport, addr, int(port) if port else 80, "/" + (path or "ws")


def _factory(protocol: asyncio.Protocol) -> Callable[[], asyncio.Protocol]:
    """A protocol factory that returns ``protocol`` itself (one per connection)."""
    return lambda: protocol


@dataclass
class Stats:
    """What one headset saw; counters are reset when the measurement window opens."""

    frames: int = 0
    bytes: int = 0
    missed_ticks: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)


class Headset(asyncio.Protocol):
    """One simulated headset: a minimal RFC 6455 client speaking the medverse protocol."""

    def __init__(self, run: LoadRun, index: int, room: str, probe: bool) -> None:
        self.run = run
        self.index = index
        self.room = room
        self.probe = probe
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()  # the upgrade response, until it is complete
        self.upgraded = False
        #: The server's frames (the framing the server itself uses, read from the other side).
        self.frames = FrameParser(_MAX_SERVER_MESSAGE, role="client")
        self.member_id = 0
        self.joined = asyncio.get_running_loop().create_future()
        self.closed = False
        self.last_tick: int | None = None
        self.stats = Stats()
        self.decoder = SnapshotDecoder() if probe else None
        self.sent_keys: dict[bytes, float] = {}
        self._key_order: deque[bytes] = deque()
        self._key = base64.b64encode(os.urandom(16)).decode()
        # Where this headset connects (a redirect from a cluster's node changes it).
        self.host, self.addr, self.port, self.path = run.host, run.addr, run.port, run.path
        #: Redirects followed before the welcome, and seconds from connecting to the welcome.
        self.redirects = 0
        self.join_started = time.perf_counter()
        self.join_seconds: float | None = None
        self._stale_losses = 0  # connections left behind by a redirect, not yet closed

    async def connect(self) -> None:
        """Open the connection (the hello follows the upgrade)."""
        self.join_started = time.perf_counter()
        loop = asyncio.get_running_loop()
        await loop.create_connection(_factory(self), self.addr, self.port)

    async def _follow(self, url: str) -> None:
        """A node of a cluster sent us to the one that runs our room: join there."""
        self.host, self.addr, self.port, self.path = split_url(url)
        self.buf = bytearray()
        self.upgraded = False
        self.frames = FrameParser(_MAX_SERVER_MESSAGE, role="client")
        self.closed = False
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(_factory(self), self.addr, self.port)
        except OSError as exc:
            if not self.joined.done():
                self.joined.set_exception(exc)

    # ----------------------------------------------------------------- wire

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, but write like one.
        self.transport = t = transport  # type: ignore[assignment]
        host = self.host
        t.write(  # type: ignore[attr-defined]
            (
                f"GET {self.path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {self._key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if self._stale_losses:
            self._stale_losses -= 1  # the connection a redirect left
            return
        self.closed = True
        if not self.joined.done():
            self.joined.set_exception(ConnectionError("connection lost before welcome"))

    def send(self, payload: bytes, opcode: int = OP_BINARY) -> None:
        """One frame to the server (binary unless said otherwise)."""
        t = self.transport
        if t is None or self.closed:
            return
        t.write(masked_frame(opcode, payload))

    def data_received(self, data: bytes) -> None:
        if not self.upgraded:
            buf = self.buf
            buf += data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.run.fail(f"upgrade refused: {bytes(buf[:40])!r}")
                assert self.transport is not None
                self.transport.close()
                return
            data = bytes(buf[end + 4 :])  # what followed the response: the first frames
            buf.clear()
            self.upgraded = True
            token = self.run.token_for(self.room, self.index)
            hello = Hello(PROTOCOL_VERSION, self.room, f"h{self.index}", _SLOTS, None, token)
            self.send(encode_message(hello))
        for event in self.frames.feed(data):
            if self.transport is None:
                return  # redirected: what followed on this connection does not matter
            if type(event) is Message:
                if event.opcode == OP_BINARY:
                    # The server sends final, unfragmented frames (SPEC.md "Frames and control
                    # messages"), so the message's size gives the bytes it took on the wire.
                    self.on_message(event.payload, frame_size(len(event.payload)))
            elif type(event) is Ping:
                self.send(event.payload, OP_PONG)
            elif type(event) is Close or type(event) is Violation:
                if type(event) is Violation:
                    self.stats.errors += 1
                self.closed = True
                assert self.transport is not None
                self.transport.close()
                break

    # ----------------------------------------------------------------- protocol

    def on_message(self, data: bytes, wire: int) -> None:
        kind = data[0]
        st = self.stats
        if kind == FRAME_STATE:
            st.frames += 1
            st.bytes += wire
            tick = state_tick(data)
            if self.last_tick is not None and tick - self.last_tick > 1:
                st.missed_ticks += tick - self.last_tick - 1
            self.last_tick = tick
            if self.decoder is not None:
                try:
                    snap = self.decoder.decode(data)
                except ProtocolError:
                    st.errors += 1
                    return
                self.run.match_latency(self, snap, time.perf_counter())
        elif kind == FRAME_CONTROL:
            st.bytes += wire
            m = decode_message(data, SERVER_MESSAGES, max_bytes=1 << 24)
            if isinstance(m, Welcome):
                self.member_id = m.member_id
                if not self.joined.done():
                    self.join_seconds = time.perf_counter() - self.join_started
                    self.joined.set_result(m)
            elif isinstance(m, Redirect) and not self.joined.done():
                self.redirects += 1
                self._stale_losses += 1
                assert self.transport is not None
                self.transport.close()
                self.transport = None
                asyncio.get_running_loop().create_task(self._follow(m.url))
            elif isinstance(m, Error) and m.code == "room_moving" and not self.joined.done():
                # The room is between nodes of a cluster: ask again shortly where it is.
                self._stale_losses += 1
                assert self.transport is not None
                self.transport.close()
                self.transport = None
                loop = asyncio.get_running_loop()
                loop.call_later(0.25, lambda: loop.create_task(self._follow(self.run.url)))
            elif isinstance(m, Error) or isinstance(m, ProtocolError):
                st.errors += 1
                if isinstance(m, Error) and m.fatal and not self.joined.done():
                    self.joined.set_exception(ConnectionError(f"{m.code}: {m.message}"))

    def send_pose(self, frame: bytes, qkey: bytes | None) -> None:
        """Send a pose frame; ``qkey`` (the quantized positions in it) if this headset's
        poses are timed by probes."""
        self.send(frame)
        if qkey is not None:
            now = time.perf_counter()
            if qkey not in self.sent_keys:
                self._key_order.append(qkey)
                if len(self._key_order) > 90:
                    self.sent_keys.pop(self._key_order.popleft(), None)
            self.sent_keys[qkey] = now


class LoadRun:
    """A whole load test: connections, the send schedule, measurement and the report."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.url = args.url
        self.host, self.addr, self.port, self.path = split_url(args.url)
        self.rate = args.rate
        self.headsets: list[Headset] = []
        self.by_member: dict[tuple[str, int], Headset] = {}
        self.failures: list[str] = []
        self.measuring = False

    def token_for(self, room: str, index: int) -> str | None:
        """A join token for a headset (when the server wants them and we know its secret)."""
        secret = self.args.secret or os.environ.get("MEDVERSE_AUTH_SECRET")
        if not secret:
            return None
        return mint_token(secret.encode(), room=room, identity=f"headset-{index}", ttl=3600)

    def fail(self, why: str) -> None:
        self.failures.append(why)

    def match_latency(self, probe: Headset, snap: Any, now: float) -> None:
        if not self.measuring:
            return
        ids = snap.ids.tolist()
        start = snap.row_start.tolist()
        pos = snap.pos
        for mid, r0, k in zip(ids, start, snap.slots.tolist(), strict=True):
            if mid == probe.member_id or k != 3:
                continue
            sender = self.by_member.get((probe.room, mid))
            if sender is None:
                continue
            key = pos[r0 : r0 + 3].tobytes()
            sent = sender.sent_keys.pop(key, None)
            if sent is not None:
                probe.stats.latencies.append(now - sent)

    async def run(self) -> dict[str, Any]:
        a = self.args
        n = a.clients
        room_size = a.room_size or n
        rooms = math.ceil(n / room_size)
        trace = a.trace or _default_trace()
        steps = int(min(a.seconds + a.warmup + 30, 120) * self.rate)
        times = np.arange(steps) / self.rate
        t0 = time.perf_counter()
        pos, quat = room_trajectories(n, times, trace, seed=a.seed)
        poses = np.concatenate([pos, quat], axis=-1).astype(np.float32)  # (T, n, 3, 7)
        self.poses = np.ascontiguousarray(poses)
        # Keys as the server will quantize them: from the float32 values actually sent.
        self.qkeys = quantize_positions(poses[..., :3].astype(np.float64)).astype(np.int64)
        prep = time.perf_counter() - t0
        loop = asyncio.get_running_loop()
        probes_per_room = max(1, a.probes // rooms) if rooms <= a.probes else 1
        probe_rooms = set(range(min(rooms, a.probes)))
        for i in range(n):
            r = i // room_size
            room = f"{a.room}-{r}" if rooms > 1 else a.room
            probe = r in probe_rooms and (i % room_size) < probes_per_room
            h = Headset(self, i, room, probe)
            self.headsets.append(h)
        self.watched = np.zeros(n, np.bool_)
        for r in probe_rooms:
            self.watched[r * room_size : (r + 1) * room_size] = True
        # Connect in batches so the accept queue is not flooded.
        for k in range(0, n, 50):
            batch = self.headsets[k : k + 50]
            await asyncio.gather(*(h.connect() for h in batch))
            try:
                await asyncio.wait_for(asyncio.gather(*(h.joined for h in batch)), 120)
            except TimeoutError:
                late = sum(not h.joined.done() for h in batch)
                raise ConnectionError(f"{late} headset(s) not welcomed within 120 s") from None
        for h in self.headsets:
            self.by_member[(h.room, h.member_id)] = h
        sender = loop.create_task(self._send_loop())
        report: dict[str, Any] = {}
        try:
            await asyncio.sleep(a.warmup)
            for h in self.headsets:
                h.stats = Stats()
            self.measuring = True
            if a.markers:
                print("medverse-loadtest: window start", file=sys.stderr, flush=True)
            w0 = time.perf_counter()
            next_print = w0 + 1.0
            while (now := time.perf_counter()) - w0 < a.seconds:
                await asyncio.sleep(max(0.0, min(next_print, w0 + a.seconds) - now))
                if time.perf_counter() >= next_print:
                    self._progress(time.perf_counter() - w0)
                    next_print += 1.0
            window = time.perf_counter() - w0
            self.measuring = False
            if a.markers:
                print("medverse-loadtest: window end", file=sys.stderr, flush=True)
            if sender.done() and not sender.cancelled() and sender.exception() is not None:
                # Headsets would sit still while the numbers look plausible: say so.
                self.fail(f"the send loop stopped: {sender.exception()!r}")
            report = self._report(window, rooms, room_size, prep)
        finally:
            sender.cancel()
            for h in self.headsets:
                if h.transport is not None:
                    h.transport.close()
        if not a.quiet:
            sys.stderr.write("\n")
        return report

    async def _send_loop(self) -> None:
        """Every headset sends at the tick rate; phases are spread over the period. Each
        group's frames are built in one call; every headset sends once per round, so the
        round number is every headset's sequence number."""
        groups = 8
        period = 1.0 / self.rate
        loop = asyncio.get_running_loop()
        start = loop.time()
        step = 0
        poses = self.poses
        qkeys = self.qkeys
        steps = poses.shape[0]
        members = [
            (self.headsets[g::groups], self.watched[g::groups].tolist()) for g in range(groups)
        ]
        while True:
            g = step % groups
            rnd, t_idx = step // groups, (step // groups) % steps
            headsets, watched = members[g]
            frames = encode_pose_frames(rnd + 1, _ALL_PRESENT, poses[t_idx, g::groups])
            keys = qkeys[t_idx, g::groups]
            for h, frame, key, w in zip(headsets, frames, keys, watched, strict=True):
                h.send_pose(frame.tobytes(), key.tobytes() if w else None)
            step += 1
            delay = start + step * period / groups - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)

    def _progress(self, elapsed: float) -> None:
        if self.args.quiet:
            return
        hs = self.headsets
        frames = sum(h.stats.frames for h in hs)
        nbytes = sum(h.stats.bytes for h in hs)
        lat = [x for h in hs for x in h.stats.latencies]
        p50 = np.percentile(lat, 50) * 1000 if lat else float("nan")
        p99 = np.percentile(lat, 99) * 1000 if lat else float("nan")
        alive = sum(not h.closed for h in hs)
        line = (
            f"\r{elapsed:5.1f}s  headsets {alive}/{len(hs)}  "
            f"state {frames / elapsed / len(hs):5.1f}/s each  "
            f"down {nbytes / elapsed / len(hs) / 1024:7.2f} KB/s each  "
            f"latency p50 {p50:5.1f} ms p99 {p99:5.1f} ms  "
            f"missed {sum(h.stats.missed_ticks for h in hs)}  "
            f"errors {sum(h.stats.errors for h in hs)}   "
        )
        sys.stderr.write(line if sys.stderr.isatty() else line.strip() + "\n")
        sys.stderr.flush()

    def _report(self, window: float, rooms: int, room_size: int, prep: float) -> dict[str, Any]:
        hs = self.headsets
        fps = np.array([h.stats.frames / window for h in hs])
        down = np.array([h.stats.bytes / window for h in hs])
        lat = np.array([x for h in hs for x in h.stats.latencies]) * 1000
        missed = sum(h.stats.missed_ticks for h in hs)
        expected = window * self.rate
        return {
            "clients": len(hs),
            "room_size": room_size,
            "rooms": rooms,
            "rate": self.rate,
            "seconds": round(window, 3),
            "connected": sum(not h.closed for h in hs),
            "state_frames_per_client_per_s_median": round(float(np.median(fps)), 3),
            "state_frames_per_client_per_s_min": round(float(fps.min()), 3),
            "down_bytes_per_client_per_s": round(float(np.median(down)), 1),
            "latency_samples": int(lat.size),
            "latency_ms_p50": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
            "latency_ms_p99": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
            "latency_ms_max": round(float(lat.max()), 2) if lat.size else None,
            "missed_ticks": int(missed),
            "errors": int(sum(h.stats.errors for h in hs)),
            "rate_held": bool(missed == 0 and fps.min() >= 0.97 * expected / window),
            "probes": sum(h.probe for h in hs),
            "redirected": sum(h.redirects > 0 for h in hs),
            "join_ms": _join_ms(hs),
            "motion_prep_seconds": round(prep, 2),
            "failures": self.failures[:10],
        }


def _join_ms(hs: list[Headset]) -> dict[str, float | None]:
    """Join time percentiles (connect to welcome), direct and through a redirect."""
    out: dict[str, float | None] = {}
    for label, chosen in (
        ("direct", [h for h in hs if h.redirects == 0]),
        ("redirected", [h for h in hs if h.redirects > 0]),
    ):
        ms = np.array([h.join_seconds for h in chosen if h.join_seconds is not None]) * 1000
        out[f"{label}_p50"] = round(float(np.percentile(ms, 50)), 2) if ms.size else None
        out[f"{label}_p99"] = round(float(np.percentile(ms, 99)), 2) if ms.size else None
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``medverse loadtest``."""
    p.add_argument("--url", default="ws://127.0.0.1:8750", help="server URL (path defaults to /ws)")
    p.add_argument("--room", default="load", help="room name (a prefix with --room-size)")
    p.add_argument("--clients", type=int, default=10, help="simulated headsets")
    p.add_argument("--seconds", type=float, default=10.0, help="measurement window")
    p.add_argument("--room-size", type=int, default=0, help="headsets per room (0: all in one)")
    p.add_argument("--rate", type=int, default=30, help="poses per second per headset")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    p.add_argument("--probes", type=int, default=8, help="headsets that decode and time poses")
    p.add_argument("--trace", default=None, help="head trace CSV (default: shared/data)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument(
        "--secret", default=None, help="token secret to mint join tokens (env MEDVERSE_AUTH_SECRET)"
    )
    p.add_argument("--quiet", action="store_true", help="no live progress line")
    p.add_argument(
        "--markers", action="store_true", help="say on stderr when measuring starts/ends"
    )


def run(args: argparse.Namespace) -> int:
    """Run a load test; print the report as JSON (and write it to ``--json``)."""
    out: dict[str, Any] = {}

    async def main() -> None:
        out.update(await LoadRun(args).run())

    # uvloop (a dependency except on Windows) drives a thousand sockets with far less CPU.
    runner = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    runner(main())
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if out.get("connected") == out.get("clients") else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="medverse loadtest")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
