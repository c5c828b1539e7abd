"""A flood of requests over a connection's message rate: every request the server drops is
refused by its ``req`` (``rate_limited``), so the SDK's calls fail at once instead of waiting
out their timeout; dropped messages without a valid ``req`` get the plain error; the flooder
stays connected and other members carry on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import msgpack
import pytest

from medverse.client_sdk import RefusedError, connect
from medverse.client_sdk.objects import ObjectError
from medverse.protocol.catalog import CLIENT_MESSAGES
from medverse.protocol.errors import ErrorCode, ProtocolError
from medverse.protocol.messages import (
    Error,
    Moderate,
    RequestRefused,
    RequestUnmute,
    encode_message,
    encode_pose,
    request_refusal,
)
from medverse.protocol.objects import Grab, ObjectRefused

from .conftest import ServerProcess, run_server
from .helpers import RawClient

#: A slow limit, so a flood is easy to make and bounded: 10 messages a second, burst 20.
RATE, BURST = 10.0, 20.0
#: Requests each flood sends at once: most of them over the limit.
FLOOD = 120
#: How long an unanswered request would wait in these tests: far beyond what an answer takes.
PATIENCE = 60.0


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProcess]:
    # Error replies are not what is measured here: let every one through.
    with run_server(
        message_rate=RATE, message_burst=BURST, max_violations=1000, error_reply_rate=1000
    ) as s:
        yield s


def test_a_dropped_request_is_answered_by_its_req() -> None:
    """What the server answers for a dropped frame: its family's refusal naming the req, or
    nothing (a plain error) when there is no valid req to name."""
    err = ProtocolError(ErrorCode.RATE_LIMITED, "slow down")
    reg = CLIENT_MESSAGES
    assert request_refusal(encode_message(RequestUnmute(7)), reg, err, 4096) == RequestRefused(
        7, "rate_limited", "slow down"
    )
    refused = request_refusal(encode_message(Grab(9, 3)), reg, err, 4096)
    assert isinstance(refused, ObjectRefused)
    assert (refused.req, refused.code, refused.message) == (9, "rate_limited", "slow down")

    def frame(data: object) -> bytes:
        return b"\x01" + msgpack.packb(data)

    no_answer = [
        encode_message(RequestUnmute()),  # no req
        encode_message(Moderate("lock")),
        frame({"t": "request_unmute", "req": -1}),  # out of range
        frame({"t": "request_unmute", "req": 2**32}),
        frame({"t": "request_unmute", "req": "7"}),  # not an int
        frame({"t": "request_unmute", "req": True}),
        frame({"t": "ping", "id": 1, "client_time": 0.0, "req": 1}),  # not a request type
        frame({"t": "teleport", "req": 1}),  # unknown type
        frame([1, 2, 3]),  # not a map
        b"\x01\xc1",  # bad msgpack
        b"\x01",
        encode_pose(1, [None, None, None]),  # not a control frame
        frame({"t": "request_unmute", "req": 1, "pad": "x" * 5000}),  # over max_bytes
    ]
    for data in no_answer:
        assert request_refusal(data, reg, err, 4096) is None, data[:40]
    # A request that names its req but does not decode otherwise is still answered by it.
    bad = frame({"t": "moderate", "action": "zap", "req": 5})
    assert request_refusal(bad, reg, err, 4096) == RequestRefused(5, "rate_limited", "slow down")


async def test_a_flood_of_requests_is_answered_at_once(srv: ServerProcess) -> None:
    """Every request of a flood gets its answer: applied (ack) or refused ``rate_limited`` by
    its req, long before the SDK's timeout; the flooder and the others carry on."""
    async with (
        connect(srv.url, "flood", name="flooder", ping_interval=0, connect_timeout=PATIENCE) as s,
        connect(srv.url, "flood", name="calm", ping_interval=0) as calm,
    ):
        await asyncio.sleep(BURST / RATE)  # a full bucket after the joins
        t0 = time.monotonic()
        core = [s.request(lambda r: RequestUnmute(r)) for _ in range(FLOOD)]
        objects = [
            s.objects.request(lambda r: Grab(r, 4242), timeout=PATIENCE) for _ in range(FLOOD // 4)
        ]
        results = await asyncio.gather(*core, *objects, return_exceptions=True)
        elapsed = time.monotonic() - t0
        timeouts = [r for r in results if isinstance(r, TimeoutError)]
        assert not timeouts, f"{len(timeouts)} requests got no answer"
        limited = [r for r in results if isinstance(r, RefusedError) and r.code == "rate_limited"]
        # Most of the flood was over the limit (a burst of 20 and 10 a second let the rest in).
        assert len(limited) >= len(results) // 2, len(limited)
        obj_limited = [r for r in limited if isinstance(r, ObjectError)]
        assert obj_limited, "object requests are refused by their req too (obj_refused)"
        others = [
            r
            for r in results
            if r is not None and not isinstance(r, RefusedError) and not hasattr(r, "req")
        ]
        assert not others, others[:3]
        # Answered at once: well under the time an unanswered request would wait.
        assert elapsed < PATIENCE / 4, elapsed
        # Nobody was disconnected, and both members still talk to the server.
        await asyncio.sleep(BURST / RATE)
        assert await s.ping(timeout=10) >= 0
        assert await calm.ping(timeout=10) >= 0
        assert s.closed_reason is None and calm.closed_reason is None


async def test_dropped_messages_without_req_get_the_plain_error(srv: ServerProcess) -> None:
    """Over the limit, a request with an out-of-range or no req, a pose frame and bad bytes
    are answered with the plain ``error rate_limited`` (as few as the error replies' own rate
    allows); a valid req among them is answered by name."""
    raw = await RawClient.open(srv.url)
    try:
        await raw.join("flood-raw")
        drop = [b"\x01" + msgpack.packb({"t": "request_unmute", "req": -1})] * int(BURST + 5)
        drop += [encode_message(RequestUnmute()), encode_pose(1, [None, None, None]), b"\x01\xc1"]
        drop.append(encode_message(RequestUnmute(77)))
        for data in drop:
            await raw.ws.send_bytes(data)
        errors: list[str] = []
        named: RequestRefused | None = None
        deadline = time.monotonic() + 20
        while named is None and time.monotonic() < deadline:
            m = await raw.next_control(timeout=20)
            if isinstance(m, Error):
                errors.append(m.code)
            elif isinstance(m, RequestRefused):
                named = m
        assert named is not None and (named.req, named.code) == (77, "rate_limited")
        assert "rate_limited" in errors
    finally:
        await raw.close()
