"""Audio signaling: checking a member's SDP offer and negotiating its WebRTC peer.

The only server module that uses aiortc, and only through :mod:`medverse.rtc` (which owns every
workaround). A negotiated :class:`Peer` takes its speaker's encoded Opus frames straight from
aiortc's receiver into a :class:`SpeakerInbox`, which the room's mix state (:mod:`.mixing`)
decodes every 20 ms, and sends the listener the packets the mixer pushes into its
:class:`MixTrack`. :mod:`.plugin` decides when to negotiate and keeps the peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np

from medverse.protocol.audio import AudioOffer, audio_sections, offer_direction
from medverse.protocol.errors import ErrorCode, ProtocolError
from medverse.rtc import (
    DEFAULT_HOST_ADDRESSES,
    EncodedInbox,
    MediaStreamError,
    MediaStreamTrack,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
    capture_encoded,
    configured_addresses,
    peer_connection,
    restrict_ice_addresses,
    set_jitter_prefetch,
    usable_remote_candidates,
    with_inband_fec,
)

from ..config import ServerConfig
from ..plugins import MemberView
from .codec import OpusDecoder, OpusStream, Packet, mono_of
from .spatial import RING

#: Offers a member may make per minute, and how long one negotiation may take.
OFFERS_PER_MINUTE = 10
NEGOTIATION_TIMEOUT = 10.0
#: The only codec the mixer takes and sends.
OPUS = [
    c for c in RTCRtpSender.getCapabilities("audio").codecs if c.mimeType.lower() == "audio/opus"
]
#: Frames a listener's outgoing track may hold before the oldest is dropped (encoder behind).
OUT_DEPTH = 3


class MixTrack(MediaStreamTrack):
    """The outgoing stereo track of one listener.

    It owns the listener's Opus encoder: the mixer encodes each listener's frame once and pushes
    the packets here, which aiortc sends as they are (so aiortc neither re-encodes nor computes
    a level per frame in Python). Keeps at most ``OUT_DEPTH`` packets (newest win); ``on_drop``
    is called for each one dropped.
    """

    kind = "audio"

    def __init__(
        self, bitrate: int, complexity: int = 5, on_drop: Callable[[], None] | None = None
    ) -> None:
        super().__init__()
        self._packets: deque[Packet] = deque()
        self._ready = asyncio.Event()
        self._on_drop = on_drop
        self.encoder = OpusStream(bitrate, complexity)

    def push(self, packets: list[Packet]) -> None:
        """Queue the packets of one encoded frame for aiortc's sender."""
        for packet in packets:
            if len(self._packets) >= OUT_DEPTH:
                self._packets.popleft()
                if self._on_drop is not None:
                    self._on_drop()
            self._packets.append(packet)
        self._ready.set()

    async def recv(self) -> Packet:
        """aiortc's sender waits here for the next packet."""
        while not self._packets:
            if self.readyState != "live":
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        return self._packets.popleft()

    def stop(self) -> None:
        super().stop()
        self._ready.set()


class SpeakerInbox(EncodedInbox):
    """A publisher's encoded frames straight from its receiver (see
    :func:`medverse.rtc.capture_encoded`), and its Opus decoder, which the mix state uses."""

    def __init__(self) -> None:
        super().__init__(depth=2 * RING)
        self.decoder = OpusDecoder()


class Peer:
    """One member's WebRTC connection to the server."""

    def __init__(self, pc: RTCPeerConnection, out: MixTrack, publish: bool) -> None:
        self.pc = pc
        self.out = out
        self.publish = publish
        #: The speaker's encoded frames, when it publishes (and aiortc's receiver could be
        #: tapped).
        self.inbox: SpeakerInbox | None = None
        #: Otherwise the speaker's decoded track, for :func:`read_track`.
        self.track: MediaStreamTrack | None = None
        self.reader: asyncio.Task[None] | None = None
        #: The SDP answer for the member (set by :func:`negotiate`).
        self.answer = ""

    def start_reader(self, reader: Coroutine[Any, Any, None]) -> None:
        """Run the fallback reader of :attr:`track` until the peer closes."""
        self.reader = asyncio.ensure_future(reader)

    async def close(self) -> None:
        """Stop the outgoing track and the fallback reader, and close the connection."""
        self.out.stop()
        if self.reader is not None:
            self.reader.cancel()
        with contextlib.suppress(Exception):
            await self.pc.close()


class PeerCloser:
    """Closes peers in the background (closing waits for aiortc's transports), so that the
    server can wait for the last of them when it stops."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[None]] = set()

    def close_later(self, peer: Peer) -> None:
        """Start closing ``peer`` without waiting for it."""
        task = asyncio.ensure_future(peer.close())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self) -> None:
        """Until every peer handed to :meth:`close_later` is closed."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def restrict_ice(cfg: ServerConfig) -> tuple[str, ...]:
    """Gather ICE host candidates on ``cfg.rtc_host_addresses`` only (process-wide; see
    :func:`medverse.rtc.restrict_ice_addresses`)."""
    return restrict_ice_addresses(cfg.rtc_host_addresses)


def check_offer(member: MemberView, msg: AudioOffer) -> None:
    """Refuse (raise ProtocolError) an offer the member may not make or that does not match
    what it asks for: publishing needs the grant and a visible member, the SDP one audio
    section whose direction agrees with ``publish``, and a loopback-only server (its ICE host
    addresses) a candidate on a loopback address."""
    if msg.publish:
        if member.hidden:
            raise ProtocolError(ErrorCode.FORBIDDEN, "observers only listen")
        if not member.can("publish_audio"):
            raise ProtocolError(
                ErrorCode.FORBIDDEN, f"role {member.identity.role} may not publish_audio"
            )
    if audio_sections(msg.sdp) != ["audio"]:
        raise ProtocolError(ErrorCode.BAD_FIELD, "the offer must have one audio section only")
    direction = offer_direction(msg.sdp)
    sends = direction in ("sendrecv", "sendonly")
    if sends and not msg.publish:
        if member.hidden or not member.can("publish_audio"):
            raise ProtocolError(
                ErrorCode.FORBIDDEN,
                f"role {member.identity.role} may not publish audio; offer recvonly",
            )
        raise ProtocolError(ErrorCode.BAD_FIELD, "publish is false but the offer sends")
    if msg.publish and not sends:
        raise ProtocolError(ErrorCode.BAD_FIELD, "publish is true but the offer does not send")
    if direction == "inactive":
        raise ProtocolError(ErrorCode.BAD_FIELD, "the offer is inactive")
    _, kept = usable_remote_candidates(msg.sdp)
    ours = configured_addresses() or DEFAULT_HOST_ADDRESSES
    if kept == 0 and all(ipaddress.ip_address(a).is_loopback for a in ours):
        # Every candidate is on another interface (or an mDNS name): nothing we may check.
        raise ProtocolError(
            ErrorCode.BAD_FIELD, "the offer has no ICE candidate on a loopback address"
        )


class OfferLimiter:
    """At most ``OFFERS_PER_MINUTE`` offers per member in any minute."""

    def __init__(self) -> None:
        self._offers: dict[int, deque[float]] = {}  # member id -> recent offer times

    def take(self, member_id: int) -> None:
        """Count one offer of ``member_id``, or raise ``rate_limited`` if it made too many."""
        now = time.monotonic()
        recent = self._offers.setdefault(member_id, deque())
        while recent and now - recent[0] > 60.0:
            recent.popleft()
        if len(recent) >= OFFERS_PER_MINUTE:
            raise ProtocolError(ErrorCode.RATE_LIMITED, "too many audio offers; wait a minute")
        recent.append(now)

    def forget(self, member_id: int) -> None:
        """The member left: drop its offer times."""
        self._offers.pop(member_id, None)


async def negotiate(
    offer: AudioOffer,
    cfg: ServerConfig,
    on_drop: Callable[[], None],
    on_failed: Callable[[Peer], None],
) -> Peer:
    """A new peer that answers ``offer`` (its answer is ``peer.answer``: aiortc's, asking the
    member to put in-band FEC in what it sends, which the mixer uses when a packet is lost).

    ``on_drop`` counts listener frames its track drops; ``on_failed`` is called if the
    connection fails later. Raises (with the peer closed) when aiortc cannot use the offer or
    negotiating takes longer than ``NEGOTIATION_TIMEOUT``.

    Only the offer's candidates our host addresses may check are given to aiortc (see
    :func:`medverse.rtc.usable_remote_candidates`): a browser offers every interface of its
    machine, and a loopback-only server must not send checks to any but loopback.
    """
    sdp, _ = usable_remote_candidates(offer.sdp)
    # Only a member allowed to publish who asked to is ever read: any track a client
    # manages to send otherwise is never decoded or mixed.
    pc = peer_connection()
    out = MixTrack(cfg.audio_bitrate, cfg.audio_complexity, on_drop=on_drop)
    peer = Peer(pc, out, offer.publish)

    @pc.on("connectionstatechange")
    async def on_state() -> None:
        if pc.connectionState == "failed":
            on_failed(peer)

    try:
        async with asyncio.timeout(NEGOTIATION_TIMEOUT):
            await pc.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
            # Reordered packets are handed on too: the speaker's inbox puts them back in order
            # if their successors have not been decoded yet.
            set_jitter_prefetch(pc, cfg.audio_jitter_frames, late=RING)
            for t in pc.getTransceivers():
                t.setCodecPreferences(OPUS)  # the mixer decodes and encodes Opus only
            if offer.publish:
                inbox = SpeakerInbox()
                if capture_encoded(pc, inbox):
                    peer.inbox = inbox
                else:  # an aiortc without the receiver queue we replace: read the track
                    tracks = [r.track for r in pc.getReceivers() if r.track is not None]
                    if tracks:
                        peer.track = tracks[0]
            pc.addTrack(out)
            await pc.setLocalDescription(await pc.createAnswer())
            peer.answer = with_inband_fec(pc.localDescription.sdp)
    except (Exception, asyncio.CancelledError):
        await peer.close()
        raise
    return peer


async def read_track(track: MediaStreamTrack, sink: Callable[[np.ndarray], bool]) -> None:
    """Fallback for an aiortc whose receiver we cannot tap (see ``capture_encoded``): read the
    frames aiortc decoded in its receiver thread and hand each to ``sink`` as mono float32
    samples, until the track ends or ``sink`` returns False."""
    with contextlib.suppress(MediaStreamError):
        while True:
            frame: Any = await track.recv()
            if frame.format.name != "s16":
                continue  # aiortc's Opus decoder gives s16; anything else is not ours
            if not sink(mono_of(frame)):
                return
