"""WebRTC settings shared by the server and the SDK (configuration only, no I/O here).

aioice gathers host candidates on every interface of the machine except loopback
(``aioice.ice.get_host_addresses``), and aiortc adds a public STUN server unless
``iceServers`` is given. medverse names the addresses explicitly instead: the development and
test default is ``127.0.0.1`` only, and a production server names its public address(es).
"""

from __future__ import annotations

import ipaddress
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

import aioice.ice

#: The development default: WebRTC media stays on loopback.
DEFAULT_HOST_ADDRESSES = ("127.0.0.1",)
_configured: tuple[str, ...] | None = None


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
    global _configured
    addresses = parse_addresses(spec)
    _configured = addresses

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [
            a
            for a in addresses
            if (use_ipv4 and ipaddress.ip_address(a).version == 4)
            or (use_ipv6 and ipaddress.ip_address(a).version == 6)
        ]

    aioice.ice.get_host_addresses = host_addresses
    return addresses


def configured_addresses() -> tuple[str, ...] | None:
    """The addresses set by :func:`restrict_ice_addresses`, if it was called."""
    return _configured


class ImmediateAudioBuffer:
    """A jitter "buffer" for audio that hands each RTP packet on as soon as it arrives.

    aiortc's buffer releases a frame only when a packet of the next frame has arrived (and its
    audio buffer waits for four), which adds 20 ms (80 ms) per hop. An Opus packet is a whole
    frame, so it can be decoded at once; duplicates and packets older than the last one handed
    on are dropped. Smoothing jitter is then left to whoever plays the audio: the server's
    mixer keeps up to three frames per speaker, a client's audio output keeps its own buffer.
    """

    def __init__(self) -> None:
        self._last: int | None = None

    def add(self, packet: Any) -> tuple[bool, Any]:
        from aiortc.jitterbuffer import JitterFrame

        seq = packet.sequence_number
        if self._last is not None:
            ahead = (seq - self._last) & 0xFFFF
            if ahead == 0 or (ahead >= 0x8000 and 0x10000 - ahead < 512):
                return False, None  # a duplicate, or late: an older frame than one handed on
        self._last = seq
        frame = JitterFrame(data=packet._data, timestamp=packet.timestamp)
        # The sender's own level for this packet (RFC 6464, -dBov), when it sends one: a
        # mixer can leave a silent speaker's packet undecoded.
        level = packet.extensions.audio_level
        frame.audio_level = None if level is None else -int(level[1])  # type: ignore[attr-defined]
        return False, frame


def set_jitter_prefetch(pc: Any, frames: int) -> None:
    """Hold received audio for ``frames`` 20 ms frames before decoding (aiortc holds 4);
    0 hands every packet on at once (:class:`ImmediateAudioBuffer`).

    Each frame held adds 20 ms of mouth-to-ear latency; on a LAN or loopback none is needed.
    """
    from aiortc.jitterbuffer import JitterBuffer

    for transceiver in pc.getTransceivers():
        if transceiver.kind == "audio":
            buffer = (
                ImmediateAudioBuffer()
                if frames <= 0
                else JitterBuffer(capacity=16, prefetch=frames)
            )
            transceiver.receiver._RTCRtpReceiver__jitter_buffer = buffer


class EncodedInbox:
    """Takes the place of an aiortc audio receiver's decoder queue: encoded frames leave the
    jitter buffer into ``frames`` instead of a decoder thread.

    aiortc hands every received frame to a decoder thread, which sends each decoded frame back
    to the event loop as a new task. A mixer that decodes every speaker once per 20 ms tick
    anyway saves all of that by taking the encoded frames directly (see :func:`capture_encoded`).
    """

    def __init__(self, depth: int = 8) -> None:
        #: (codec parameters, aiortc JitterFrame) in arrival order; the oldest go first when
        #: more than ``depth`` wait.
        self.frames: deque[tuple[Any, Any]] = deque(maxlen=depth)
        self.received = 0
        self.arrivals: deque[float] = deque(maxlen=4096)

    def put(self, item: tuple[Any, Any] | None) -> None:
        if item is not None:
            self.frames.append(item)
            self.received += 1
            self.arrivals.append(time.monotonic())

    def get(self) -> None:
        return None  # ends aiortc's decoder thread at once: nothing is decoded there


def capture_encoded(pc: Any, inbox: EncodedInbox) -> bool:
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
