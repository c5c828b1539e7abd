"""What a feature client (shared objects, audio, an application's own) gets from its session.

Feature clients are given a :class:`SessionLink` rather than the session class itself, so they
depend on a narrow interface and the session module depends on them, never the other way round.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, Protocol, TypeVar

from medverse.protocol.messages import Message, Welcome
from medverse.protocol.snapshot import Snapshot

from .types import Avatar, RefusedError


class SessionLink(Protocol):
    """The parts of a :class:`~medverse.client_sdk.session.Session` feature clients use."""

    @property
    def member_id(self) -> int:
        """Our member id in the room (0 before the first welcome)."""

    @property
    def rate(self) -> int:
        """The room's ticks per second."""

    @property
    def snapshot(self) -> Snapshot:
        """The newest decoded room state."""

    def room_time(self) -> float:
        """The room clock now, in seconds."""

    def render_time(self) -> float:
        """Room time to render remote entities at (a few ticks in the past)."""

    def sample_entity(self, entity_id: int, t: float) -> Avatar | None:
        """An entity of the tick state at room time ``t``, interpolated (None if absent)."""

    def add_handler(self, cls: type[Message], handler: Callable[[Any], None]) -> None:
        """Call ``handler`` with every server message of type ``cls`` (registering ``cls``
        with the session's decoder if it is not one of the protocol's own)."""

    def add_connected_hook(self, hook: Callable[[Welcome], None]) -> None:
        """Call ``hook`` with the welcome after every (re)connection."""

    def emit(self, event: Any) -> None:
        """Queue an event for ``session.events()``."""

    def run_task(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a task that ends with the session."""

    async def send_message(self, msg: Message) -> None:
        """Send one control message (through the connection's state machine)."""

    async def send_raw(self, frame: bytes) -> None:
        """Send one frame as is (binary inputs such as object moves)."""

    async def request(
        self, make: Callable[[int], Message], error: type[RefusedError] = RefusedError
    ) -> None:
        """Send ``make(req)`` (a message with a ``req``) and return once the server
        acknowledged it; raise ``error(code, message)`` if it refused it."""


AckT = TypeVar("AckT")


class PendingRequests(Generic[AckT]):
    """A feature client's requests that await their answer, by ``req`` (one counter per
    client, wrapping at 32 bits): the acknowledgement resolves the caller's wait, a refusal
    raises in it, and a renewed connection fails every wait (the answer will never come)."""

    def __init__(self) -> None:
        self._futures: dict[int, asyncio.Future[AckT]] = {}
        self._req = 0

    def next_req(self) -> int:
        """A fresh request id."""
        self._req = (self._req + 1) & 0xFFFFFFFF
        return self._req

    async def wait(self, req: int, send: Callable[[], Awaitable[None]], timeout: float) -> AckT:
        """Await ``send()`` (which sends the request ``req``), then its acknowledgement,
        within ``timeout`` seconds; an answer arriving during ``send()`` is not missed."""
        fut: asyncio.Future[AckT] = asyncio.get_running_loop().create_future()
        self._futures[req] = fut
        try:
            await send()
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._futures.pop(req, None)

    def acknowledged(self, req: int, ack: AckT) -> None:
        fut = self._futures.get(req)
        if fut is not None and not fut.done():
            fut.set_result(ack)

    def refused(self, req: int, error: BaseException) -> bool:
        """Raise ``error`` in the wait for ``req``; whether one was waiting for it."""
        fut = self._futures.get(req)
        if fut is None:
            return False
        if not fut.done():
            fut.set_exception(error)
        return True

    def renewed(self) -> None:
        """The connection was renewed: no pending request will be answered."""
        for fut in self._futures.values():
            if not fut.done():
                fut.set_exception(ConnectionError("connection renewed before the answer"))
