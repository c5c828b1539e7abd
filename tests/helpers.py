"""Test helpers: raw protocol clients and pose generators."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import aiohttp

from medverse.protocol.catalog import SERVER_MESSAGES
from medverse.protocol.messages import (
    FRAME_CONTROL,
    PROTOCOL_VERSION,
    Error,
    Hello,
    Message,
    decode_message,
    encode_message,
)


class RawClient:
    """A protocol-level client for sending exactly the bytes a test wants."""

    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.http = http
        self.ws = ws

    @classmethod
    async def open(cls, url: str, **kw: Any) -> RawClient:
        http = aiohttp.ClientSession()
        ws = await http.ws_connect(url + "/ws", **kw)
        return cls(http, ws)

    async def join(self, room: str, name: str = "raw", slots: int = 3) -> Message:
        await self.ws.send_bytes(encode_message(Hello(PROTOCOL_VERSION, room, name, slots)))
        return await self.next_control()

    async def next_control(self, timeout: float = 5.0) -> Message:
        """Next control message (state frames are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            msg = await self.ws.receive(timeout=max(0.01, deadline - time.monotonic()))
            if msg.type != aiohttp.WSMsgType.BINARY:
                raise ConnectionError(f"got {msg.type} ({self.ws.close_code})")
            if msg.data[0] == FRAME_CONTROL:
                m = decode_message(msg.data, SERVER_MESSAGES, max_bytes=1 << 20)
                assert not isinstance(m, Exception), m
                return m

    async def next_error(self, timeout: float = 5.0) -> Error:
        while True:
            m = await self.next_control(timeout)
            if isinstance(m, Error):
                return m

    async def close(self) -> None:
        await self.ws.close()
        await self.http.close()


def quat_about_y(angle: float) -> tuple[float, float, float, float]:
    return (0.0, math.sin(angle / 2), 0.0, math.cos(angle / 2))


async def wait_for(cond: Any, timeout: float = 5.0, step: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(step)


class RecordingLink:
    """A member's connection for rooms built in the test process (no network): it takes
    everything and keeps the messages and errors the room sends it."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, msg: Any) -> bool:
        self.sent.append(msg)
        return True

    def write(self, frame: bytes) -> bool:
        return True

    def offer(self, frame: bytes, soft_limit: int) -> bool:
        return True

    def backlog(self) -> int:
        return 0

    def send_error(self, err: Any, fatal: bool = False) -> None:
        self.sent.append(err)

    def close(self, code: int, reason: bytes) -> None:
        pass

    def admitted(self, member: Any) -> None:
        pass
