"""A lossy, jittery network in user space, for kernels without ``sch_netem``.

:class:`UdpRelay` carries one WebRTC peer's media (ICE, DTLS, SRTP: every datagram) between an
SDK peer and the server, dropping, delaying and reordering datagrams as ``tc qdisc ... netem
loss 5% delay 30ms 10ms reorder 1%`` would. Media is forced through it by rewriting the ICE
candidates of the offer and the answer (:meth:`UdpRelay.offer`, :meth:`UdpRelay.answer`), as a
NAT between the two would: each side only knows an address of the relay, so no other path
exists. :class:`JitterProxy` does the same for a TCP connection (the state path): every chunk
is delayed by 30 ms +- 10 ms, in order, as TCP delivers.

Both run on 127.0.0.1 only, inside the test's private network namespace (``tests/netns.py``).
"""

from __future__ import annotations

import asyncio
import random
import re
from dataclasses import dataclass, field

_CANDIDATE = re.compile(r"^(a=candidate:\S+ \d+ udp \d+ )(\S+) (\d+)( typ host.*)$", re.I)


@dataclass
class Impairment:
    """netem's ``loss L delay D J reorder R``: each datagram is lost with probability
    ``loss``; else sent ``delay`` +- ``jitter`` seconds later (uniform), except a ``reorder``
    share sent at once, overtaking those in flight."""

    loss: float = 0.05
    delay: float = 0.030
    jitter: float = 0.010
    reorder: float = 0.01
    seed: int = 1
    rng: random.Random = field(init=False)
    sent: int = 0
    lost: int = 0
    reordered: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def due(self) -> float | None:
        """Seconds from now to send the next datagram after, or None to drop it."""
        rng = self.rng
        if rng.random() < self.loss:
            self.lost += 1
            return None
        self.sent += 1
        if rng.random() < self.reorder:
            self.reordered += 1
            return 0.0
        return max(0.0, self.delay + rng.uniform(-self.jitter, self.jitter))


class _Side(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: object) -> None:
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.on_datagram(data, addr)  # type: ignore[operator]


class UdpRelay:
    """Relays one peer's datagrams to and from the server through two sockets, impairing both
    directions. The client's socket faces the SDK peer (the address the peer is given for the
    server), the server's socket faces the server (the address the server is given for the
    peer)."""

    def __init__(self, up: Impairment, down: Impairment) -> None:
        self.up = up  # peer to server
        self.down = down  # server to peer
        self._client_side: _Side | None = None
        self._server_side: _Side | None = None
        self.client_addr: tuple[str, int] | None = None  # the peer's real candidate
        self.server_addr: tuple[str, int] | None = None  # the server's real candidate
        self.relayed = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        _, self._client_side = await loop.create_datagram_endpoint(
            lambda: _Side(self._from_client), local_addr=("127.0.0.1", 0)
        )
        _, self._server_side = await loop.create_datagram_endpoint(
            lambda: _Side(self._from_server), local_addr=("127.0.0.1", 0)
        )

    def _port(self, side: _Side | None) -> int:
        assert side is not None and side.transport is not None
        return int(side.transport.get_extra_info("sockname")[1])

    def offer(self, sdp: str) -> str:
        """The peer's offer as the server should see it: the peer's candidate replaced by the
        relay's server-facing socket."""
        return self._rewrite(sdp, self._port(self._server_side), "client")

    def answer(self, sdp: str) -> str:
        """The server's answer as the peer should see it: the server's candidate replaced by
        the relay's peer-facing socket."""
        return self._rewrite(sdp, self._port(self._client_side), "server")

    def _rewrite(self, sdp: str, port: int, whose: str) -> str:
        out = []
        found = 0
        for line in sdp.split("\r\n"):
            m = _CANDIDATE.match(line)
            if m is not None:
                found += 1
                if found > 1:
                    continue  # one candidate is all a relay needs (and no other path exists)
                addr = (m.group(2), int(m.group(3)))
                if whose == "client":
                    self.client_addr = addr
                else:
                    self.server_addr = addr
                line = f"{m.group(1)}127.0.0.1 {port}{m.group(4)}"
            elif line.startswith("c=IN IP4 "):
                line = "c=IN IP4 127.0.0.1"
            elif line.startswith("m=audio "):
                parts = line.split(" ")
                parts[1] = str(port)
                line = " ".join(parts)
            out.append(line)
        if not found:
            raise ValueError("no host candidate in the SDP")
        return "\r\n".join(out)

    def _send_later(self, imp: Impairment, side: _Side | None, data: bytes, to: object) -> None:
        delay = imp.due()
        if delay is None or side is None or side.transport is None:
            return
        transport = side.transport
        self.relayed += 1
        if delay == 0.0:
            transport.sendto(data, to)  # type: ignore[arg-type]
        else:
            asyncio.get_running_loop().call_later(delay, transport.sendto, data, to)

    def _from_client(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.server_addr is not None and addr == self.client_addr:
            self._send_later(self.up, self._server_side, data, self.server_addr)

    def _from_server(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.client_addr is not None and addr == self.server_addr:
            self._send_later(self.down, self._client_side, data, self.client_addr)

    def close(self) -> None:
        for side in (self._client_side, self._server_side):
            if side is not None and side.transport is not None:
                side.transport.close()


class JitterProxy:
    """A TCP proxy to ``port`` on 127.0.0.1 that delays every chunk, both ways, by
    ``delay`` +- ``jitter`` seconds (uniform), keeping the byte order as TCP does: a chunk
    never overtakes the one before it."""

    def __init__(self, port: int, delay: float = 0.030, jitter: float = 0.010, seed: int = 2):
        self.port = port
        self.delay = delay
        self.jitter = jitter
        self.rng = random.Random(seed)
        self.server: asyncio.Server | None = None
        self.chunks = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                at, data = await queue.get()
                if not data:
                    break
                wait = at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                dst.write(data)
            dst.close()

        task = asyncio.ensure_future(deliver())
        last = 0.0
        try:
            while data := await src.read(65536):
                self.chunks += 1
                d = self.delay + self.rng.uniform(-self.jitter, self.jitter)
                last = max(last, loop.time() + d)  # in order: never before the chunk before
                queue.put_nowait((last, data))
        finally:
            queue.put_nowait((0.0, b""))
            await task

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
