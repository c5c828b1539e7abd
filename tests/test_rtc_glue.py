"""medverse.rtc: the aiortc and aioice internals it relies on are still there, and its own parts.

The first tests fail with a message naming the private field, the installed version and what
would break: read it before raising the version caps in pyproject.toml. No network is used
beyond binding one UDP socket on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

import aioice
import aioice.ice
import aiortc
import pytest
from aiortc.codecs.opus import OpusEncoder
from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtcrtpreceiver import RTCRtpReceiver, decoder_worker
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.rtp import HeaderExtensions, RtpPacket

from medverse.rtc import (
    CHECKED_AGAINST,
    DEFAULT_HOST_ADDRESSES,
    EncodedInbox,
    ImmediateAudioBuffer,
    JitterFrame,
    capture_encoded,
    configured_addresses,
    parse_addresses,
    peer_connection,
    restrict_ice_addresses,
    set_jitter_prefetch,
    usable_remote_candidates,
)

JITTER_BUFFER = "_RTCRtpReceiver__jitter_buffer"
DECODER_QUEUE = "_RTCRtpReceiver__decoder_queue"


def gone(library: str, field: str, breaks: str) -> str:
    """The failure message: what is missing, in which version, and what it breaks."""
    version = aiortc.__version__ if library == "aiortc" else aioice.__version__
    return (
        f"{library} {version} no longer has {field}: {breaks} "
        f"(medverse.rtc was checked against {library} {CHECKED_AGAINST[library]}; "
        "see the list in rtc/__init__.py)"
    )


def names_used(fn: Callable[..., Any]) -> set[str]:
    """Every global and attribute name the function's code refers to (nested code included);
    private ``self.__x`` appears name-mangled, as ``_Class__x``."""
    out: set[str] = set()
    stack = [fn.__code__]
    while stack:
        code = stack.pop()
        out.update(code.co_names)
        stack.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return out


@pytest.fixture
def loopback_only() -> Iterator[None]:
    """Put the process-wide ICE addresses back to the default after the test."""
    yield
    restrict_ice_addresses(DEFAULT_HOST_ADDRESSES)


# ----------------------------------------------------------------- what aiortc and aioice keep


async def test_the_aiortc_receiver_fields_the_glue_replaces_are_there() -> None:
    pc = peer_connection()
    try:
        receiver = pc.addTransceiver("audio", direction="sendrecv").receiver
        assert isinstance(getattr(receiver, JITTER_BUFFER, None), JitterBuffer), gone(
            "aiortc",
            "RTCRtpReceiver.__jitter_buffer (a JitterBuffer)",
            "set_jitter_prefetch would change nothing, and every received audio frame would "
            "wait 80 ms in aiortc's buffer (the mixer's and the SDK's)",
        )
        assert isinstance(getattr(receiver, DECODER_QUEUE, None), queue.Queue), gone(
            "aiortc",
            "RTCRtpReceiver.__decoder_queue (a queue.Queue)",
            "capture_encoded would return False: the mixer would fall back to decoding in "
            "aiortc's thread (one event-loop task per frame), and the SDK's "
            "start(decode=False) would count nothing",
        )
    finally:
        await pc.close()
    on_packet = names_used(RTCRtpReceiver._handle_rtp_packet)
    assert JITTER_BUFFER in on_packet, gone(
        "aiortc",
        "a receiver that hands each RTP packet to RTCRtpReceiver.__jitter_buffer",
        "ImmediateAudioBuffer would never see a packet (80 ms more latency per hop)",
    )
    assert DECODER_QUEUE in on_packet, gone(
        "aiortc",
        "a receiver that puts each frame into RTCRtpReceiver.__decoder_queue",
        "EncodedInbox would stay empty: no speaker would be heard",
    )
    assert "_data" in on_packet, gone(
        "aiortc",
        "RtpPacket._data (the depayloaded payload the receiver leaves on each packet)",
        "ImmediateAudioBuffer would fail on every packet: no speaker would be heard",
    )
    assert DECODER_QUEUE in names_used(RTCRtpReceiver.receive), gone(
        "aiortc",
        "a decoder thread that reads RTCRtpReceiver.__decoder_queue",
        "the thread EncodedInbox ends at once would decode every frame again",
    )
    assert "decoder_worker" in names_used(RTCRtpReceiver.receive), gone(
        "aiortc",
        "aiortc.rtcrtpreceiver.decoder_worker as the receiver's decoder thread",
        "EncodedInbox.get may no longer end it",
    )
    assert hasattr(HeaderExtensions(), "audio_level"), gone(
        "aiortc",
        "RtpPacket.extensions.audio_level (RFC 6464)",
        "ImmediateAudioBuffer would fail on every packet",
    )


async def test_aiortc_decoder_thread_ends_at_once_on_an_encoded_inbox() -> None:
    out: asyncio.Queue[Any] = asyncio.Queue()
    inbox = EncodedInbox()
    thread = threading.Thread(
        target=decoder_worker, args=(asyncio.get_running_loop(), inbox, out, threading.Event())
    )
    thread.start()
    # The thread tells the track it ended (None) through the loop, then returns.
    assert await asyncio.wait_for(out.get(), 5.0) is None, gone(
        "aiortc",
        "a decoder_worker(loop, input_q, output_q, error) that ends when input_q.get() "
        "returns None",
        "every tapped receiver would keep a decoder thread waiting",
    )
    await asyncio.to_thread(thread.join, 5.0)
    assert not thread.is_alive()


def test_aiortc_sends_a_tracks_encoded_packets_as_they_are() -> None:
    assert callable(getattr(OpusEncoder, "pack", None)), gone(
        "aiortc",
        "OpusEncoder.pack (packetizing an av.Packet a track returns)",
        "the mixer's MixTrack and the benchmark bots send pre-encoded packets and would fail",
    )
    assert "pack" in names_used(RTCRtpSender._next_encoded_frame), gone(
        "aiortc",
        "an RTCRtpSender that packs (rather than encodes) an av.Packet from track.recv()",
        "the mixer's MixTrack would send nothing",
    )


async def test_aioice_gathers_only_the_named_addresses(loopback_only: None) -> None:
    assert "get_host_addresses" in names_used(aioice.ice.Connection.gather_candidates), gone(
        "aioice",
        "aioice.ice.get_host_addresses, looked up by Connection.gather_candidates",
        "restrict_ice_addresses would change nothing: ICE would gather on every interface",
    )
    restrict_ice_addresses("127.0.0.1")
    conn = aioice.Connection(ice_controlling=True, components=1)
    try:
        await conn.gather_candidates()
        hosts = {c.host for c in conn.local_candidates}
    finally:
        await conn.close()
    assert hosts == {"127.0.0.1"}, gone(
        "aioice",
        "a gather_candidates that calls get_host_addresses(use_ipv4=..., use_ipv6=...)",
        f"ICE gathered on {sorted(hosts)} instead of 127.0.0.1 only",
    )


def test_aioice_answers_checks_in_connection_request_received() -> None:
    assert "request_received" in names_used(aioice.ice.StunProtocol.datagram_received), gone(
        "aioice",
        "StunProtocol.datagram_received calling Connection.request_received",
        "a browser's checks from its other interfaces would be answered and checked back",
    )


class RecordingProtocol:
    """Stands in for aioice's StunProtocol: records what would be sent, sends nothing."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, tuple[str, int]]] = []
        self.local_candidate = aioice.Candidate(
            foundation="1", component=1, transport="udp", priority=1, host="127.0.0.1",
            port=9, type="host",
        )  # fmt: skip

    def send_stun(self, message: Any, addr: tuple[str, int]) -> None:
        self.sent.append((message, addr))


def binding_request(conn: aioice.Connection) -> Any:
    request = aioice.stun.Message(
        message_method=aioice.stun.Method.BINDING, message_class=aioice.stun.Class.REQUEST
    )
    request.attributes["USERNAME"] = f"{conn.local_username}:peer"
    request.attributes["PRIORITY"] = 1
    request.attributes["ICE-CONTROLLING"] = 1
    request.add_message_integrity(conn.local_password.encode())
    return request


async def test_loopback_only_ignores_checks_from_other_addresses(loopback_only: None) -> None:
    restrict_ice_addresses("127.0.0.1")
    conn = aioice.Connection(ice_controlling=False, components=1)
    try:
        proto = RecordingProtocol()
        conn.request_received(binding_request(conn), ("192.0.2.2", 50000), proto)  # type: ignore[arg-type]
        conn.request_received(binding_request(conn), ("fd00::2", 50001), proto)  # type: ignore[arg-type]
        assert proto.sent == []  # neither answered nor learned as a candidate to check
        conn.request_received(binding_request(conn), ("127.0.0.1", 50002), proto)  # type: ignore[arg-type]
        assert [addr for _, addr in proto.sent] == [("127.0.0.1", 50002)]
        # With a public address among ours, checks from anywhere are answered as usual.
        restrict_ice_addresses("127.0.0.1, 203.0.113.7")
        conn.request_received(binding_request(conn), ("192.0.2.2", 50003), proto)  # type: ignore[arg-type]
        assert [addr for _, addr in proto.sent][-1] == ("192.0.2.2", 50003)
    finally:
        await conn.close()


# ----------------------------------------------------------------- the glue's own parts


def test_parse_addresses() -> None:
    assert parse_addresses(" 127.0.0.1 ,::1") == ("127.0.0.1", "::1")
    assert parse_addresses(["::1"]) == ("::1",)
    with pytest.raises(ValueError):
        parse_addresses("localhost")
    with pytest.raises(ValueError):
        parse_addresses(" , ")


def test_restrict_ice_addresses_by_family(loopback_only: None) -> None:
    assert restrict_ice_addresses("127.0.0.1, ::1") == ("127.0.0.1", "::1")
    assert configured_addresses() == ("127.0.0.1", "::1")
    hosts = aioice.ice.get_host_addresses
    assert hosts(use_ipv4=True, use_ipv6=False) == ["127.0.0.1"]
    assert hosts(use_ipv4=False, use_ipv6=True) == ["::1"]
    assert hosts(use_ipv4=True, use_ipv6=True) == ["127.0.0.1", "::1"]


#: Candidates as Chromium offers them on a machine with an Ethernet interface (its own address
#: and IPv6 ULA), loopback, and an mDNS name; plus a malformed line.
BROWSER_CANDIDATES = [
    "a=candidate:1 1 udp 2122194687 127.0.0.1 50723 typ host generation 0 network-id 3",
    "a=candidate:2 1 udp 2122063615 192.0.2.2 52164 typ host generation 0 network-id 1",
    "a=candidate:3 1 udp 2122267903 ::1 57194 typ host generation 0 network-id 4",
    "a=candidate:4 1 udp 2122134271 fd00::2 52336 typ host generation 0 network-id 2",
    "a=candidate:5 1 tcp 1518214911 127.0.0.1 9 typ host tcptype active generation 0",
    "a=candidate:6 1 udp 2122260223 1f3c2a9e-7c1d-4b7e-9a0b-3c4d5e6f7a8b.local 58001 typ host",
    "a=candidate:7 1 udp",
]


def browser_sdp() -> str:
    head = ["v=0", "o=- 1 2 IN IP4 127.0.0.1", "s=-", "t=0 0", "m=audio 9 UDP/TLS/RTP/SAVPF 111"]
    return "\r\n".join([*head, *BROWSER_CANDIDATES, "a=rtpmap:111 opus/48000/2"]) + "\r\n"


def candidate_ids(sdp: str) -> list[str]:
    return [ln.split()[0].split(":")[1] for ln in sdp.splitlines() if ln.startswith("a=candi")]


def test_loopback_only_keeps_only_loopback_remote_candidates(loopback_only: None) -> None:
    sdp = browser_sdp()
    out, kept = usable_remote_candidates(sdp, ["127.0.0.1"])
    assert candidate_ids(out) == ["1", "3", "5"] and kept == 3
    # Everything else is untouched, line endings included.
    rest = [ln for ln in sdp.splitlines(keepends=True) if not ln.startswith("a=candidate:")]
    assert [ln for ln in out.splitlines(keepends=True) if not ln.startswith("a=cand")] == rest
    # The default is the process-wide setting.
    restrict_ice_addresses("127.0.0.1")
    assert usable_remote_candidates(sdp) == (out, 3)


def test_public_addresses_keep_every_address_but_no_mdns_name() -> None:
    out, kept = usable_remote_candidates(browser_sdp(), ["203.0.113.7"])
    assert candidate_ids(out) == ["1", "2", "3", "4", "5"] and kept == 5
    out, kept = usable_remote_candidates(browser_sdp(), ["127.0.0.1", "203.0.113.7"])
    assert kept == 5
    nothing, kept = usable_remote_candidates("v=0\r\nm=audio 9 RTP/AVP 0\r\n", ["127.0.0.1"])
    assert kept == 0 and nothing == "v=0\r\nm=audio 9 RTP/AVP 0\r\n"


def test_immediate_audio_buffer_hands_packets_on_in_order() -> None:
    buf = ImmediateAudioBuffer()

    def add(seq: int) -> bytes | None:
        p = RtpPacket(payload_type=96, sequence_number=seq, timestamp=seq * 960)
        p._data = bytes([seq & 0xFF])  # type: ignore[attr-defined]
        _, frame = buf.add(p)
        return None if frame is None else frame.data

    assert add(65534) == b"\xfe"
    assert add(65535) == b"\xff"
    assert add(0) == b"\x00"  # wraps around
    assert add(0) is None  # duplicate
    assert add(65535) is None  # late: older than one already handed on
    assert add(3) == b"\x03"  # a gap is fine (lost packets)
    assert add(30000) == b"\x30"  # a jump far ahead (a restarted stream) is taken
    p = RtpPacket(payload_type=96, sequence_number=30001, timestamp=1)
    p._data = b"x"  # type: ignore[attr-defined]
    p.extensions.audio_level = (False, 90)  # the sender's RFC 6464 level: -90 dBov
    frame = buf.add(p)[1]
    assert frame is not None and frame.audio_level == -90  # type: ignore[attr-defined]


async def test_jitter_prefetch_and_encoded_capture_take_the_receivers_place() -> None:
    pc = peer_connection()
    try:
        receiver = pc.addTransceiver("audio", direction="recvonly").receiver
        set_jitter_prefetch(pc, 0)
        assert isinstance(getattr(receiver, JITTER_BUFFER), ImmediateAudioBuffer)
        set_jitter_prefetch(pc, 2)
        held = getattr(receiver, JITTER_BUFFER)
        assert isinstance(held, JitterBuffer) and held.capacity == 16
        inbox = EncodedInbox()
        assert capture_encoded(pc, inbox)
        assert getattr(receiver, DECODER_QUEUE) is inbox
    finally:
        await pc.close()


def test_encoded_inbox_keeps_the_newest_frames() -> None:
    inbox = EncodedInbox(depth=2)
    for i in range(3):
        inbox.put((None, JitterFrame(data=bytes([i]), timestamp=i * 960)))
    inbox.put(None)  # what aiortc's receiver puts when it stops: ignored
    assert [f.data for _, f in inbox.frames] == [b"\x01", b"\x02"]
    assert inbox.received == 3 and len(inbox.arrivals) == 3
    assert inbox.get() is None


def test_immediate_audio_buffer_hands_reordered_packets_on_once_within_its_window() -> None:
    buf = ImmediateAudioBuffer(late=3)

    def add(seq: int) -> bool:
        p = RtpPacket(payload_type=96, sequence_number=seq, timestamp=seq * 960)
        p._data = bytes([seq & 0xFF])  # type: ignore[attr-defined]
        return buf.add(p)[1] is not None

    assert add(65533) and add(65535)  # 65534 is late
    assert add(1)  # wraps: 0 is late too
    assert add(65534) and add(0)  # reordered, within three of the newest: handed on
    assert not add(65534) and not add(0)  # but once only
    assert not add(65535) and not add(1)  # duplicates
    assert add(5) and not add(1)  # four behind the newest: too late


def test_encoded_inbox_puts_reordered_frames_back_in_order() -> None:
    inbox = EncodedInbox(depth=4)

    def put(k: int) -> None:
        inbox.put((None, JitterFrame(data=bytes([k]), timestamp=(k * 960) & 0xFFFFFFFF)))

    def waiting() -> list[int]:
        return [f.data[0] for _, f in inbox.frames]

    put(1)
    put(3)
    put(2)  # overtaken by 3 while both wait: back in order
    assert waiting() == [1, 2, 3]
    put(5)
    inbox.frames.clear()  # the mixer took them all
    put(4)  # 5 was already taken: too late to play in order
    assert waiting() == [] and inbox.stale == 1
    for k in (6, 7, 8, 9):
        put(k)
    put(5)  # older than every waiting frame of a full inbox: the one to go
    assert waiting() == [6, 7, 8, 9] and inbox.stale == 2
    inbox.frames.pop()
    put(10)
    put(9)  # reordered into a full inbox: in order, and the oldest goes
    assert waiting() == [7, 8, 9, 10] and inbox.received == 12
