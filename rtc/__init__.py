"""medverse's glue to aiortc and aioice: every workaround that reaches into their internals.

The server (:mod:`medverse.server.audio`) and the SDK (:mod:`medverse.client_sdk.audio`) both
build their WebRTC peers with this module; neither touches a private aiortc or aioice name
itself, and the wire protocol (:mod:`medverse.protocol`) never imports either library. Received
Opus frames leave here for the server's mixer (:class:`EncodedInbox`) or for an SDK track.

Checked against aiortc 1.16.0 and aioice 0.13.0 (:data:`CHECKED_AGAINST`; pyproject.toml caps
both below their next minor version). ``tests/test_rtc_glue.py`` fails, naming the field and
what breaks, as soon as an upgrade removes or retypes anything listed here.

1. **ICE host addresses** (:func:`restrict_ice_addresses`): replaces the module function
   ``aioice.ice.get_host_addresses(use_ipv4, use_ipv6)``, which ``aioice.Connection.
   gather_candidates`` looks up at call time. aioice gathers host candidates on every interface
   except loopback; medverse names them (``127.0.0.1`` in development and tests, the public
   address(es) in production). Process-wide, as aioice has no per-connection setting.
   The other side's candidates are filtered to match (:func:`usable_remote_candidates`): a
   browser offers every interface of its machine, and aioice would send connectivity checks to
   each; with loopback-only host addresses only its loopback candidates are kept, and mDNS
   names (``*.local``, which aioice would resolve by multicast) are never kept. A browser also
   sends checks from its other interfaces' addresses to our loopback candidate, and aioice
   answers any check and then checks back at its source (a peer-reflexive candidate): so with
   loopback-only host addresses, the wrapped ``aioice.ice.Connection.request_received``
   ignores checks whose source is not a loopback address (process-wide, like the addresses).
2. **No STUN server** (:func:`peer_connection`): ``RTCConfiguration(iceServers=[])``. Public
   API, but aiortc's default configuration asks ``stun.l.google.com`` for a reflexive candidate.
3. **Audio handed on at once** (:func:`set_jitter_prefetch`, :class:`ImmediateAudioBuffer`):
   replaces the private ``RTCRtpReceiver.__jitter_buffer`` (an ``aiortc.jitterbuffer.
   JitterBuffer`` with prefetch 4 for audio), reads the depayloaded payload aiortc's receiver
   leaves in the private ``RtpPacket._data``, and builds ``aiortc.jitterbuffer.JitterFrame``.
   aiortc's buffer holds four 20 ms frames (80 ms) before anything is decoded. The server's
   also hands on packets the network reordered, which its :class:`EncodedInbox` puts back in
   order while their successors still wait.
4. **Encoded frames instead of aiortc's decoder thread** (:func:`capture_encoded`,
   :class:`EncodedInbox`): replaces the private ``RTCRtpReceiver.__decoder_queue``, a
   ``queue.Queue`` into which the receiver puts ``(codec, frame)`` and from which the thread
   running ``aiortc.rtcrtpreceiver.decoder_worker`` gets, ending on ``None``. The server's mixer
   decodes every speaker once per 20 ms frame itself; aiortc's thread would decode each frame
   again and schedule one event-loop task per decoded frame. The SDK's load generators only
   count the encoded frames of their mix.

5. **Asking for in-band FEC** (:func:`with_inband_fec`): aiortc writes no ``a=fmtp`` line for
   Opus in its SDP, so a browser that answers or is answered by it sends no in-band forward
   error correction. Text only: the answer that leaves medverse gets ``useinbandfec=1`` (RFC
   7587: "the receiver can decode FEC"), which browsers' WebRTC read as "put FEC in what you
   send"; aiortc itself ignores fmtp parameters, so nothing changes on the server's side.

Relied on, public but easy to miss: a track's ``recv()`` may return an ``av.Packet`` instead of
a frame, and aiortc's sender then packetizes it as it is (``encoder.pack``) rather than encoding
it. The server's mixer sends each listener's mix that way (it encodes once per listener itself).

The few public aiortc classes the server needs are re-exported here, so that on the server
aiortc is imported in this one place.
"""

from __future__ import annotations

import ipaddress
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

import aioice.ice
from aiortc import (
    MediaStreamError,
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.jitterbuffer import JitterBuffer, JitterFrame

__all__ = [
    "CHECKED_AGAINST",
    "DEFAULT_HOST_ADDRESSES",
    "EncodedInbox",
    "ImmediateAudioBuffer",
    "JitterFrame",
    "MediaStreamError",
    "MediaStreamTrack",
    "RTCPeerConnection",
    "RTCRtpSender",
    "RTCSessionDescription",
    "capture_encoded",
    "configured_addresses",
    "parse_addresses",
    "peer_connection",
    "restrict_ice_addresses",
    "set_jitter_prefetch",
    "usable_remote_candidates",
    "with_inband_fec",
]

#: The versions every workaround above was read against and tested with.
CHECKED_AGAINST = {"aiortc": "1.16.0", "aioice": "0.13.0"}

#: The development default: WebRTC media stays on loopback.
DEFAULT_HOST_ADDRESSES = ("127.0.0.1",)
_configured: tuple[str, ...] | None = None


# ----------------------------------------------------------------- 1. ICE host addresses


def parse_addresses(spec: str | Iterable[str]) -> tuple[str, ...]:
    """``"127.0.0.1, 203.0.113.7"`` (or a list) to a tuple of validated IP addresses."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = tuple(str(ipaddress.ip_address(a.strip())) for a in items if a.strip())
    if not out:
        raise ValueError("name at least one ICE host address")
    return out


def restrict_ice_addresses(spec: str | Iterable[str]) -> tuple[str, ...]:
    """Make ICE gather host candidates on exactly these addresses (process-wide: aioice looks
    its host addresses up through one module function). Returns the addresses."""
    global _configured, _loopback_only
    addresses = parse_addresses(spec)
    _configured = addresses
    _loopback_only = all(_is_loopback(a) for a in addresses)
    if aioice.ice.Connection.request_received is not _request_received:
        aioice.ice.Connection.request_received = _request_received  # type: ignore[method-assign]

    # aioice calls it with these keyword names: keep them.
    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [
            a
            for a in addresses
            if (use_ipv4 and ipaddress.ip_address(a).version == 4)
            or (use_ipv6 and ipaddress.ip_address(a).version == 6)
        ]

    aioice.ice.get_host_addresses = host_addresses
    return addresses


_loopback_only = False
_aioice_request_received = aioice.ice.Connection.request_received


def _request_received(self: Any, message: Any, addr: tuple[str, int], protocol: Any) -> None:
    """aioice's handler of an incoming connectivity check, which answers it to ``addr`` and
    then checks ``addr`` itself; with loopback-only host addresses a check from any other
    address is ignored, so that nothing is ever sent there."""
    if _loopback_only and not _is_loopback(addr[0]):
        return
    _aioice_request_received(self, message, addr, protocol)


def configured_addresses() -> tuple[str, ...] | None:
    """The addresses set by :func:`restrict_ice_addresses`, if it was called."""
    return _configured


def _candidate_address(line: str) -> str | None:
    """The connection address of an ``a=candidate:`` line (its fifth field), if it has one."""
    fields = line.split()
    return fields[4] if len(fields) >= 8 else None


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # a host name: an mDNS ``*.local`` name or anything else


def usable_remote_candidates(sdp: str, local: Iterable[str] | None = None) -> tuple[str, int]:
    """The remote ``sdp`` with the ICE candidates our host addresses should never check removed,
    and how many candidates it keeps.

    ``local`` are our ICE host addresses (default: :func:`configured_addresses`, else
    :data:`DEFAULT_HOST_ADDRESSES`). When they are all loopback addresses, only the remote
    candidates on loopback addresses are kept: a browser on the same machine also offers its
    other interfaces, and checking those would send traffic to addresses other than loopback.
    Candidates given by host name (mDNS ``*.local`` names, which aioice resolves by multicast
    on the local network) are removed in every case; the peer still reaches us from them as a
    peer-reflexive candidate, since our own candidates are plain addresses.
    """
    ours = tuple(local) if local is not None else (_configured or DEFAULT_HOST_ADDRESSES)
    loopback_only = all(_is_loopback(a) for a in ours)
    out: list[str] = []
    kept = 0
    for line in sdp.splitlines(keepends=True):
        if line.startswith("a=candidate:"):
            address = _candidate_address(line)
            if address is None:
                continue
            try:
                ipaddress.ip_address(address)
            except ValueError:
                continue  # a host name
            if loopback_only and not _is_loopback(address):
                continue
            kept += 1
        out.append(line)
    return "".join(out), kept


# ----------------------------------------------------------------- 2. no STUN server


def peer_connection() -> RTCPeerConnection:
    """A new peer connection that asks no STUN server (host candidates only, see
    :func:`restrict_ice_addresses`)."""
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


# ----------------------------------------------------------------- 3. audio handed on at once


class ImmediateAudioBuffer:
    """A jitter "buffer" for audio that hands each RTP packet on as soon as it arrives.

    aiortc's buffer releases a frame only when a packet of the next frame has arrived (and its
    audio buffer waits for four), which adds 20 ms (80 ms) per hop. An Opus packet is a whole
    frame, so it can be decoded at once; duplicates are dropped, and so are packets older than
    the newest one handed on, except (once each) those at most ``late`` sequence numbers older:
    a consumer that orders frames itself (the server's :class:`EncodedInbox`) can still use a
    packet the network reordered. Smoothing jitter is then left to whoever plays the audio: the
    server's mixer keeps up to three frames per speaker, a client's audio output keeps its own
    buffer.
    """

    def __init__(self, late: int = 0) -> None:
        self._last: int | None = None
        self.late = min(late, 63)
        self._recent = 0  # bit i: packet self._last - i was handed on (i < 64)

    def add(self, packet: Any) -> tuple[bool, JitterFrame | None]:
        """Take one RTP packet (the receiver has depayloaded it into ``packet._data``);
        returns (send a picture loss indication: never for audio, the frame or None)."""
        seq = packet.sequence_number
        if self._last is not None:
            ahead = (seq - self._last) & 0xFFFF
            if ahead == 0:
                return False, None  # a duplicate
            behind = 0x10000 - ahead
            if ahead >= 0x8000 and behind < 512:  # older than the newest handed on
                if behind > self.late or (self._recent >> behind) & 1:
                    return False, None  # too late, or handed on already
                self._recent |= 1 << behind
                return False, self._frame(packet)
            self._recent = ((self._recent << ahead) | 1) & _BITS64 if ahead < 64 else 1
        else:
            self._recent = 1
        self._last = seq
        return False, self._frame(packet)

    @staticmethod
    def _frame(packet: Any) -> JitterFrame:
        frame = JitterFrame(data=packet._data, timestamp=packet.timestamp)
        # The sender's own level for this packet (RFC 6464, -dBov), when it sends one: a
        # mixer can leave a silent speaker's packet undecoded.
        level = packet.extensions.audio_level
        frame.audio_level = None if level is None else -int(level[1])  # type: ignore[attr-defined]
        return frame


_BITS64 = (1 << 64) - 1
_TS_HALF = 0x80000000  # RTP timestamps are 32 bits: "older" is within half the range back


def _older(ts: int, than: int) -> bool:
    """Whether RTP timestamp ``ts`` comes before ``than`` (wrapping at 32 bits)."""
    return 0 < ((than - ts) & 0xFFFFFFFF) < _TS_HALF


def set_jitter_prefetch(pc: RTCPeerConnection, frames: int, late: int = 0) -> None:
    """Hold received audio for ``frames`` 20 ms frames before decoding (aiortc holds 4);
    0 hands every packet on at once (:class:`ImmediateAudioBuffer`), and also up to ``late``
    reordered packets behind the newest (for a consumer that orders frames itself).

    Each frame held adds 20 ms of mouth-to-ear latency; on a LAN or loopback none is needed.
    Call it once the audio transceiver exists and before media flows.
    """
    for transceiver in pc.getTransceivers():
        if transceiver.kind == "audio":
            buffer = (
                ImmediateAudioBuffer(late)
                if frames <= 0
                else JitterBuffer(capacity=16, prefetch=frames)
            )
            receiver = transceiver.receiver
            receiver._RTCRtpReceiver__jitter_buffer = buffer  # type: ignore[attr-defined]


# ----------------------------------------------------------------- 4. encoded frames, no thread


class EncodedInbox:
    """Takes the place of an aiortc audio receiver's decoder queue: encoded frames leave the
    jitter buffer into ``frames`` instead of a decoder thread.

    aiortc hands every received frame to a decoder thread, which sends each decoded frame back
    to the event loop as a new task. A mixer that decodes every speaker once per 20 ms tick
    anyway saves all of that by taking the encoded frames directly (see :func:`capture_encoded`).
    """

    def __init__(self, depth: int = 8) -> None:
        #: (codec parameters, :class:`JitterFrame`) in RTP timestamp order; the oldest go
        #: first when more than ``depth`` wait.
        self.frames: deque[tuple[Any, JitterFrame]] = deque(maxlen=depth)
        self.received = 0
        #: Reordered frames that came after a newer one had been taken: dropped.
        self.stale = 0
        self.arrivals: deque[float] = deque(maxlen=4096)
        self._newest: int | None = None

    def put(self, item: tuple[Any, JitterFrame] | None) -> None:
        """Called by aiortc's receiver for each frame (and with None when it stops). A frame
        the network reordered (older than the newest put) goes before the newer frames still
        waiting, or is dropped if they have all been taken already."""
        if item is None:
            return
        self.received += 1
        self.arrivals.append(time.monotonic())
        ts = item[1].timestamp
        if self._newest is not None and _older(ts, self._newest):
            frames = self.frames
            for i, (_, waiting) in enumerate(frames):
                if _older(ts, waiting.timestamp):
                    if len(frames) == frames.maxlen:  # full: the oldest goes, as always
                        if i == 0:
                            break  # which is this one
                        frames.popleft()
                        i -= 1
                    frames.insert(i, item)
                    return
            self.stale += 1
            return
        self._newest = ts
        self.frames.append(item)

    def get(self) -> None:
        """Called once by aiortc's decoder thread: None ends it at once, nothing is decoded
        there."""
        return None


def capture_encoded(pc: RTCPeerConnection, inbox: EncodedInbox) -> bool:
    """Route the encoded frames of ``pc``'s audio receiver into ``inbox``. Call it once the
    audio transceiver exists and before the connection is up. Returns False if this
    aiortc does not have the receiver attribute we replace (then frames arrive on the track as
    usual)."""
    done = False
    for transceiver in pc.getTransceivers():
        receiver = transceiver.receiver
        if transceiver.kind == "audio":
            if not hasattr(receiver, "_RTCRtpReceiver__decoder_queue"):
                return False
            receiver._RTCRtpReceiver__decoder_queue = inbox
            done = True
    return done


# ----------------------------------------------------------------- 5. asking for in-band FEC


def with_inband_fec(sdp: str) -> str:
    """``sdp`` with ``useinbandfec=1`` in the format parameters of every Opus payload type (a
    new ``a=fmtp`` line where it has none, or added to the one it has)."""
    lines = sdp.split("\r\n")
    opus = {
        line.split()[0].split(":", 1)[1]
        for line in lines
        if line.startswith("a=rtpmap:") and " opus/" in line.lower() and len(line.split()) > 1
    }
    if not opus:
        return sdp
    has_fmtp = set()
    out: list[str] = []
    for line in lines:
        if line.startswith("a=fmtp:"):
            pt, _, params = line[len("a=fmtp:") :].partition(" ")
            if pt in opus:
                has_fmtp.add(pt)
                kept = [
                    p
                    for p in params.split(";")
                    if p.strip() and not p.strip().lower().startswith("useinbandfec=")
                ]
                line = f"a=fmtp:{pt} " + ";".join([*kept, "useinbandfec=1"])
        out.append(line)
    result: list[str] = []
    for line in out:
        result.append(line)
        if line.startswith("a=rtpmap:"):
            pt = line.split()[0].split(":", 1)[1]
            if pt in opus and pt not in has_fmtp:
                result.append(f"a=fmtp:{pt} minptime=10;useinbandfec=1")
    return "\r\n".join(result)
