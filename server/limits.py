"""Connection budgets: how many connections one address, and everyone together, may hold open,
and how many of them may be unidentified (no valid ``hello`` yet).

An unidentified connection costs little (the frame parser keeps at most one frame header's worth
of bytes for it and the handshake timeout closes it), but a flood of them from one address, or
from many, must not crowd out the members: the budget refuses the next one before anything of it
is read, with a typed error, a log line and a count in ``medverse_connections_refused_total``.

Before a connection is a WebSocket it is an HTTP request: :class:`RequestHeadGuard` gives every
new TCP connection a deadline for its first request head and bounds how many may be waiting for
one, so clients that send their request a byte at a time cannot hold the server's sockets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import cast

log = logging.getLogger("medverse.limits")


class ConnectionBudget:
    """Counts open and unidentified connections, per address and in total."""

    def __init__(self, per_address: int, unidentified_per_address: int, unidentified: int) -> None:
        #: 0 means unlimited, for each of the three.
        self.per_address = per_address
        self.unidentified_per_address = unidentified_per_address
        self.unidentified_total = unidentified
        self._open: Counter[str] = Counter()
        self._unidentified: Counter[str] = Counter()
        self._unidentified_sum = 0

    def admit(self, address: str) -> str | None:
        """Count a new connection from ``address`` as open and unidentified, or say why it is
        refused (nothing is counted then)."""
        if 0 < self.per_address <= self._open[address]:
            return "too many connections from this address"
        if 0 < self.unidentified_per_address <= self._unidentified[address]:
            return "too many connections from this address that have not joined"
        if 0 < self.unidentified_total <= self._unidentified_sum:
            return "too many connections that have not joined"
        self._open[address] += 1
        self._unidentified[address] += 1
        self._unidentified_sum += 1
        return None

    def identified(self, address: str) -> None:
        """The connection sent a valid ``hello``: it no longer counts as unidentified."""
        self._drop(self._unidentified, address)
        self._unidentified_sum -= 1

    def closed(self, address: str, identified: bool) -> None:
        """The connection ended."""
        self._drop(self._open, address)
        if not identified:
            self._drop(self._unidentified, address)
            self._unidentified_sum -= 1

    @staticmethod
    def _drop(counts: Counter[str], address: str) -> None:
        counts[address] -= 1
        if counts[address] <= 0:
            del counts[address]

    @property
    def unidentified(self) -> int:
        """Connections open now that have not joined."""
        return self._unidentified_sum


class RequestHeadGuard:
    """A deadline and a budget for the first HTTP request head of every TCP connection.

    aiohttp waits as long as a client likes for a request line and headers (its keep-alive
    timer, where it has one from the connection's start, runs for about an hour by default):
    a client sending one byte a second holds a connection, a socket and a file descriptor for
    as long as it keeps going, and a few hundred such clients ("slow loris") exhaust the
    server's descriptors. The guard wraps the protocol factory of the listening socket (see
    :meth:`factory`): a connection whose first request head (up to its blank line) is not
    complete ``timeout`` seconds after it opened is aborted, and at most
    ``per_address`` / ``total`` connections (0: unlimited) may be waiting for their first head
    at once; further ones are answered 503 and closed before anything of them is read. Each
    cut is counted through ``refused(reason)`` (the server's
    ``medverse_connections_refused_total``) and logged, at most :attr:`log_per_minute` lines a
    minute. Once a head is complete, aiohttp's own limits apply (line and header sizes, its
    keep-alive timer between requests).
    """

    TIMED_OUT = "no complete request in time"
    TOO_MANY = "too many connections from this address that have not sent a request"
    TOO_MANY_TOTAL = "too many connections that have not sent a request"

    def __init__(
        self,
        timeout: float,
        per_address: int,
        total: int,
        refused: Callable[[str], None] | None = None,
        log_per_minute: int = 30,
    ) -> None:
        self.timeout = timeout
        self.budget = ConnectionBudget(0, per_address, total)
        self._refused = refused
        self.log_per_minute = log_per_minute
        self._window = 0.0
        self._logged = 0
        self._unlogged = 0

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server`` that guards the protocols ``inner``
        (aiohttp's ``AppRunner.server``) makes."""
        return lambda: _HeadGuardedProtocol(self, inner)

    @property
    def waiting(self) -> int:
        """Connections open now whose first request head is not complete."""
        return self.budget.unidentified

    def cut(self, peer: str, reason: str, detail: str) -> None:
        """Count and log one connection cut (or refused) for ``reason``."""
        if self._refused is not None:
            self._refused(reason)
        now = time.monotonic()
        if now - self._window >= 60.0:
            if self._unlogged:
                log.info("%d more slow or surplus HTTP connections cut", self._unlogged)
            self._window, self._logged, self._unlogged = now, 0, 0
        if self._logged >= self.log_per_minute:
            self._unlogged += 1
            return
        self._logged += 1
        log.info("cut an HTTP connection from %s: %s (%s)", peer, reason, detail)


_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class _HeadGuardedProtocol(asyncio.Protocol):
    """Stands between the transport and aiohttp's request handler until the connection ends
    or is upgraded (the WebSocket parser then takes the transport with ``set_protocol``),
    forwarding every call; it only watches the bytes of the first request head."""

    def __init__(self, guard: RequestHeadGuard, inner: Callable[[], asyncio.Protocol]) -> None:
        self._guard = guard
        self._make_inner = inner
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._peer = "?"
        self._waiting = False  # counted in the guard's budget until the head is complete
        self._deadline: asyncio.TimerHandle | None = None
        self._tail = b""  # the head's last 3 bytes, to find a blank line split across reads
        self._seen = 0
        self._opened = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        guard = self._guard
        refusal = guard.budget.admit(self._peer)
        if refusal is not None:
            reason = RequestHeadGuard.TOO_MANY if "address" in refusal else guard.TOO_MANY_TOTAL
            guard.cut(self._peer, reason, f"{guard.waiting} waiting")
            transport.write(_BUSY)
            transport.close()
            return
        self._waiting = True
        loop = asyncio.get_running_loop()
        self._opened = loop.time()
        if guard.timeout > 0:
            self._deadline = loop.call_later(guard.timeout, self._too_slow)
        self._inner = self._make_inner()
        self._inner.connection_made(transport)

    def _head_done(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._waiting:  # out of the guard's budget: it only counts connections waiting
            self._waiting = False
            self._guard.budget.closed(self._peer, identified=False)

    def _too_slow(self) -> None:
        self._deadline = None
        if not self._waiting or self._transport is None:
            return
        waited = asyncio.get_running_loop().time() - self._opened
        self._guard.cut(
            self._peer, RequestHeadGuard.TIMED_OUT, f"{self._seen} bytes in {waited:.1f} s"
        )
        self._transport.abort()  # nothing to say to it: no request to answer

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if self._waiting:
            self._seen += len(data)
            if b"\r\n\r\n" in self._tail + data[:4] or b"\r\n\r\n" in data:
                self._head_done()
            else:
                self._tail = (self._tail + data)[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._waiting:
            self._waiting = False
            self._guard.budget.closed(self._peer, identified=False)
        if self._inner is not None:
            self._inner.connection_lost(exc)
