"""Spatial audio: WebRTC peers per member, a mix made for each listener, routing rules.

Each member negotiates one aiortc peer connection over its room connection
(:class:`protocol.audio.AudioOffer` -> :class:`protocol.audio.AudioAnswer`). A publisher's
Opus packets are taken from aiortc's RTP receiver as they arrive (no decoder thread; see
:func:`medverse.rtc.capture_encoded`). Every 20 ms the mixer decodes one frame per speaker into
its slot of the room's ring buffer (mono float), builds the listeners x speakers x 2 gain
tensor from head poses and routing rules (:mod:`server.mixer`), mixes all listeners with one
matrix product (one per interaural delay step) and encodes each listener's stereo frame once;
aiortc sends those packets as they are.

Rules the server enforces in the gain matrix, whatever a client does: a host's server mute, a
paused member (heard by nobody, hears nothing), self mute, zones, broadcast speakers, whispers
and ignores. Observers (hidden members) can only listen.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import logging
import time
from collections import deque
from typing import Any

import av
import numpy as np
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame
from av.packet import Packet
from prometheus_client import Counter, Gauge, Histogram

from medverse.protocol.audio import (
    AudioAnswer,
    AudioBroadcast,
    AudioIgnore,
    AudioMute,
    AudioOffer,
    AudioRules,
    AudioSpeaking,
    AudioWhisper,
    AudioZone,
    audio_sections,
    offer_direction,
)
from medverse.protocol.errors import ErrorCode, ProtocolError
from medverse.protocol.messages import Message
from medverse.protocol.quant import dequantize_positions, dequantize_rotations
from medverse.protocol.snapshot import FLAG_SPEAKING
from medverse.rtc import (
    EncodedInbox,
    capture_encoded,
    restrict_ice_addresses,
    set_jitter_prefetch,
)

from .clock import FixedRateClock
from .config import ServerConfig
from .mixer import (
    FRAME_SAMPLES,
    MAX_ITD,
    RING,
    SAMPLE_RATE,
    Spatial,
    dbfs,
    interaural_delays,
    keep_loudest,
    mix,
    mix_delayed,
    route_mask,
    spatial_gains,
)
from .plugins import MemberView, RoomContext, RoomPlugin, ServerContext, ServerPlugin

log = logging.getLogger("medverse.audio")

FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE
TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
#: Offers a member may make per minute, and how long one negotiation may take.
OFFERS_PER_MINUTE = 10
NEGOTIATION_TIMEOUT = 10.0
#: The only codec the mixer takes and sends.
OPUS = [
    c for c in RTCRtpSender.getCapabilities("audio").codecs if c.mimeType.lower() == "audio/opus"
]
#: Listener frames encoded, and speaker frames decoded, between two yields to the event loop
#: (about 0.15 and 0.05 ms each).
ENCODE_CHUNK = 4
DECODE_CHUNK = 8
#: Frames a listener's outgoing track may hold before the oldest is dropped (encoder behind).
OUT_DEPTH = 3
#: Seconds the speaking flag holds after the voice falls below the lower threshold.
SPEAKING_HANGOVER = 0.3
#: Frames over which a speaker's smallest backlog is watched (see RoomAudio.mix_frame).
TRIM_WINDOW = 50
#: How long the mixer stays degraded after it last fell behind, in frames.
DEGRADE_FRAMES = 50


class MixTrack(MediaStreamTrack):
    """The outgoing stereo track of one listener.

    It owns the listener's Opus encoder: the mixer encodes each listener's frame once and pushes
    the packets here, which aiortc sends as they are (so aiortc neither re-encodes nor computes
    a level per frame in Python). Keeps at most ``OUT_DEPTH`` packets (newest win).
    """

    kind = "audio"

    def __init__(self, bitrate: int, complexity: int = 5, on_drop: Any = None) -> None:
        super().__init__()
        self._packets: deque[Packet] = deque()
        self._ready = asyncio.Event()
        self._on_drop = on_drop
        self.encoder = OpusStream(bitrate, complexity)

    def push(self, packets: list[Packet]) -> None:
        for packet in packets:
            if len(self._packets) >= OUT_DEPTH:
                self._packets.popleft()
                if self._on_drop is not None:
                    self._on_drop()
            self._packets.append(packet)
        self._ready.set()

    async def recv(self) -> Packet:
        while not self._packets:
            if self.readyState != "live":
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        return self._packets.popleft()

    def stop(self) -> None:
        super().stop()
        self._ready.set()


class OpusStream:
    """One listener's Opus encoder (48 kHz stereo, 20 ms frames)."""

    def __init__(self, bitrate: int, complexity: int = 5) -> None:
        codec = av.CodecContext.create("libopus", "w")
        codec.bit_rate = bitrate
        codec.format = "s16"
        codec.layout = "stereo"
        codec.sample_rate = SAMPLE_RATE
        codec.time_base = TIME_BASE
        # "lowdelay" is Opus's CELT mode alone: 2.5 ms of look-ahead instead of 6.5, and with
        # complexity 5 about half the encoding time of aiortc's voip/10 for a mix of voices.
        codec.options = {"application": "lowdelay", "compression_level": str(complexity)}
        self.codec = codec
        self.pts = 0

    def encode(self, pcm: np.ndarray) -> list[Packet]:
        """Encode one interleaved int16 stereo frame (FRAME_SAMPLES x 2)."""
        frame = AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self.pts
        frame.time_base = TIME_BASE
        self.pts += FRAME_SAMPLES
        return self.codec.encode(frame)  # packets carry the codec's 1/48000 time base


class Peer:
    """One member's WebRTC connection to the server."""

    def __init__(self, pc: RTCPeerConnection, out: MixTrack, publish: bool) -> None:
        self.pc = pc
        self.out = out
        self.publish = publish
        self.reader: asyncio.Task[None] | None = None
        self.inbox: SpeakerInbox | None = None

    async def close(self) -> None:
        self.out.stop()
        if self.reader is not None:
            self.reader.cancel()
        with contextlib.suppress(Exception):
            await self.pc.close()


class SpeakerInbox(EncodedInbox):
    """A publisher's encoded frames straight from its receiver, and its Opus decoder (mono:
    libopus downmixes a stereo stream itself, cheaper than decoding both channels)."""

    def __init__(self) -> None:
        super().__init__(depth=2 * RING)
        codec = av.CodecContext.create("libopus", "r")
        codec.layout = "mono"
        codec.sample_rate = SAMPLE_RATE
        codec.format = "s16"
        self.decoder = codec

    def decode(self, data: bytes) -> list[AudioFrame]:
        return self.decoder.decode(av.Packet(data))  # type: ignore[return-value]


def mono_of(frame: AudioFrame) -> np.ndarray:
    """A decoded s16 frame as mono float32 samples (full scale 1.0)."""
    channels = len(frame.layout.channels)
    pcm = frame.to_ndarray().reshape(-1)
    if channels == 1:
        return pcm * np.float32(1 / 32768)
    pcm = pcm.reshape(-1, channels)
    return pcm.sum(axis=1, dtype=np.float32) * np.float32(1 / (32768 * channels))


class RoomAudio(RoomPlugin):
    """A room's audio: one slot per member in numpy arrays, its peers and routing rules.

    The server-wide :class:`SpatialAudio` runs the mixer clock and calls :meth:`mix_frame`
    every 20 ms; this plugin handles the room's signaling and rule messages.
    """

    name = "audio"
    messages = (AudioOffer, AudioMute, AudioZone, AudioBroadcast, AudioWhisper, AudioIgnore)
    server_messages = (AudioAnswer, AudioRules, AudioSpeaking)

    def __init__(self, ctx: RoomContext, service: SpatialAudio) -> None:
        super().__init__(ctx)
        self.feature = service
        self.slot_of: dict[int, int] = {}  # member id -> slot
        self.members: dict[int, MemberView] = {}  # member id -> member
        self.peers: dict[int, Peer] = {}
        self._free: list[int] = []
        self._alloc(8)
        self.rules_dirty = False
        self.speaking_ids: tuple[int, ...] = ()
        self.version = 0  # bumped by every membership or rule change
        #: The rules each member was last sent (so unchanged rules are not sent again).
        self.sent_rules: dict[int, AudioRules] = {}
        self._frames_in_window = 0
        self._gains: tuple[tuple[int, int], np.ndarray, np.ndarray] | None = None
        self._negotiating: dict[int, asyncio.Task[None]] = {}  # member id -> task
        self._offers: dict[int, deque[float]] = {}  # member id -> recent offer times
        self._rules_timer: asyncio.TimerHandle | None = None

    # ----------------------------------------------------------------- slots

    def _alloc(self, cap: int) -> None:
        old = getattr(self, "cap", 0)
        self.cap = cap

        def grow(name: str, shape: tuple[int, ...], dtype: Any, fill: Any = 0) -> None:
            a = np.full(shape, fill, dtype)
            if old:
                prev = getattr(self, name)
                a[tuple(slice(0, s) for s in prev.shape)] = prev
            setattr(self, name, a)

        grow("used", (cap,), np.bool_)
        grow("member_id", (cap,), np.int64)
        grow("row", (cap,), np.int64, -1)
        grow("speaker", (cap,), np.bool_)  # a publishing track is attached
        grow("listener", (cap,), np.bool_)  # an outgoing mix track exists
        grow("server_muted", (cap,), np.bool_)
        grow("self_muted", (cap,), np.bool_)
        grow("paused", (cap,), np.bool_)
        grow("zone", (cap,), np.int32)
        grow("broadcast", (cap,), np.float32)
        grow("whisper", (cap,), np.int64, -1)  # target slot
        grow("ignore", (cap, cap), np.bool_)  # [a, b]: a ignores b
        grow("ring", (cap, RING, FRAME_SAMPLES), np.float32)
        grow("wpos", (cap,), np.int64)
        grow("rpos", (cap,), np.int64)
        grow("min_backlog", (cap,), np.int64, RING)
        grow("tail", (cap, MAX_ITD), np.float32)
        grow("speaking", (cap,), np.bool_)
        grow("speak_until", (cap,), np.float64)
        grow("level", (cap,), np.float64, -120.0)
        self._free.extend(range(cap - 1, old - 1, -1))
        self._carry: dict[int, np.ndarray] = getattr(self, "_carry", {})
        #: Publishing slots whose encoded frames we take from aiortc's receiver directly.
        self.inboxes: dict[int, SpeakerInbox] = getattr(self, "inboxes", {})

    def add(self, member: MemberView) -> int:
        if member.id in self.slot_of:
            return self.slot_of[member.id]
        if not self._free:
            self._alloc(self.cap * 2)
        s = self._free.pop()
        self.slot_of[member.id] = s
        self.members[member.id] = member
        self.used[s] = True
        self.member_id[s] = member.id
        self.row[s] = member.row
        self.server_muted[s] = member.muted
        self.paused[s] = member.paused
        for name in ("speaker", "listener", "self_muted", "speaking"):
            getattr(self, name)[s] = False
        self.zone[s] = 0
        self.broadcast[s] = 0.0
        self.whisper[s] = -1
        self.ignore[s, :] = False
        self.ignore[:, s] = False
        self.wpos[s] = self.rpos[s] = 0
        self.level[s] = -120.0
        self.rules_dirty = True
        self.version += 1
        return s

    def remove(self, member: MemberView) -> None:
        s = self.slot_of.pop(member.id, None)
        self.members.pop(member.id, None)
        self.sent_rules.pop(member.id, None)
        if s is None:
            return
        self.used[s] = False
        self.speaker[s] = self.listener[s] = False
        self.whisper[self.whisper == s] = -1
        self.ignore[s, :] = False
        self.ignore[:, s] = False
        self._carry.pop(s, None)
        self.inboxes.pop(s, None)
        self._free.append(s)
        self.rules_dirty = True
        self.version += 1

    def write(self, s: int, mono: np.ndarray) -> None:
        """Store a speaker's decoded mono samples; whole 20 ms frames go into its ring."""
        carry = self._carry.pop(s, None)
        if carry is not None:
            mono = np.concatenate((carry, mono))
        n = mono.size // FRAME_SAMPLES
        for i in range(n):  # one iteration per 20 ms frame of audio, normally exactly one
            self.ring[s, self.wpos[s] % RING] = mono[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES]
            self.wpos[s] += 1
        if mono.size > n * FRAME_SAMPLES:
            self._carry[s] = mono[n * FRAME_SAMPLES :]

    # ----------------------------------------------------------------- the mix

    def decode_pending(self, slots: list[int] | None = None) -> None:
        """Decode what each publishing speaker (of ``slots``, default all) sent since the last
        frame (one decode per speaker and frame; more only after network jitter) into its
        ring."""
        f = self.feature
        quiet = f.config.audio_silence_dbfs - 10.0  # senders' level estimates are rough
        for s in list(self.inboxes) if slots is None else slots:
            box = self.inboxes.get(s)
            if box is None:
                continue
            frames = box.frames
            while len(frames) > RING:  # far behind: keep latency bounded
                frames.popleft()
                f.dropped_in += 1
            while frames:  # only Opus is negotiated (see OPUS)
                _codec, encoded = frames.popleft()
                level = getattr(encoded, "audio_level", None)
                if level is not None and level < quiet and s not in self._carry:
                    # The sender says this frame is silence: no need to decode it (a client
                    # that lies about it only silences itself).
                    self.ring[s, self.wpos[s] % RING] = 0.0
                    self.wpos[s] += 1
                    f.silent_skipped += 1
                    continue
                try:
                    decoded = box.decode(encoded.data)
                except av.FFmpegError:
                    f.decode_errors += 1
                    continue
                for frame in decoded:  # mono s16: read the plane itself (to_ndarray stacks)
                    pcm = np.frombuffer(frame.planes[0], np.int16, frame.samples)
                    if frame.samples == FRAME_SAMPLES and s not in self._carry:
                        k = self.wpos[s] % RING
                        np.multiply(pcm, np.float32(1 / 32768), out=self.ring[s, k])
                        self.wpos[s] += 1
                    else:
                        self.write(s, pcm * np.float32(1 / 32768))

    def mix_frame(self, now: float, decode: bool = True) -> list[tuple[MixTrack, np.ndarray]]:
        """Mix one 20 ms frame for every listener of the room (decoding the speakers first
        unless the caller did); returns (track, frame) pairs to encode."""
        f = self.feature
        cfg = f.config
        if decode and self.inboxes:
            self.decode_pending()
        spk = np.flatnonzero(self.speaker & (self.wpos > self.rpos))
        backlog = self.wpos[spk] - self.rpos[spk]
        late = backlog > RING - 1
        if late.any():  # keep latency bounded: skip to the newest complete frame
            f.dropped_in += int((backlog[late] - 1).sum())
            self.rpos[spk[late]] = self.wpos[spk[late]] - 1
            backlog[late] = 1
        # A speaker whose backlog never fell below two frames for a whole second (after a
        # burst: a stalled sender catching up) loses one frame, so latency comes back down.
        low = np.zeros(self.cap, np.int64)
        low[spk] = backlog
        np.minimum(self.min_backlog, low, out=self.min_backlog)
        self._frames_in_window += 1
        if self._frames_in_window >= TRIM_WINDOW:
            trim = np.flatnonzero(self.min_backlog >= 2)
            if trim.size:
                self.rpos[trim] += 1
                f.trimmed += int(trim.size)
            self.min_backlog[:] = RING
            self._frames_in_window = 0
            spk = np.flatnonzero(self.speaker & (self.wpos > self.rpos))
        frames = self.ring[spk, self.rpos[spk] % RING]  # (S, N)
        self.rpos[spk] += 1
        history = None
        if cfg.audio_interaural_delay:  # each speaker's last samples, for the far ear's delay
            history = np.concatenate((self.tail[spk], frames), axis=1)  # (S, MAX_ITD + N)
            self.tail[:] = 0.0
            self.tail[spk] = frames[:, -MAX_ITD:]
        level = dbfs(np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1)))
        allowed = ~(self.server_muted | self.self_muted | self.paused)
        self.level[:] = -120.0
        self.level[spk] = np.where(allowed[spk], level, -120.0)
        self._update_speaking(now)
        live = allowed[spk] & (level > cfg.audio_silence_dbfs)
        spk, frames, level = spk[live], frames[live], level[live]
        if history is not None:
            history = history[live]
        lis = np.flatnonzero(self.listener)
        if lis.size == 0:
            return []
        if spk.size == 0:
            out = np.zeros((lis.size, FRAME_SAMPLES, 2), np.int16)
        else:
            gains, delays = self.gains(lis, spk)
            cap = f.speaker_cap()
            if cap > 0 and spk.size > cap:
                loud = gains.max(axis=2) * (10.0 ** (level / 20.0))[None, :]
                gains *= keep_loudest(loud, cap)[:, :, None]
                f.degraded += 1
            if history is not None:
                out = mix_delayed(gains.astype(np.float32), delays, history)
            else:
                out = mix(gains.astype(np.float32), frames)
        f.mixed += 1
        jobs = []
        for i, s in enumerate(lis.tolist()):  # one frame per listener: bytes out
            peer = self.peers.get(int(self.member_id[s]))
            if peer is not None:
                jobs.append((peer.out, out[i]))
        return jobs

    def gains(self, lis: np.ndarray, spk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Gains (L, S, 2) under head poses and every routing rule (a paused listener hears
        nothing), and each ear's delay in samples."""
        g_all, d_all = self.all_gains()
        pick = np.ix_(lis, spk)
        g = g_all[pick]
        g *= ~self.paused[lis][:, None, None]
        return g, d_all[pick]

    def all_gains(self) -> tuple[np.ndarray, np.ndarray]:
        """Gains and ear delays (cap, cap, 2) between every pair of slots. Poses change once
        per world tick and rules rarely, while frames come at 50 Hz: recomputed only when
        either changed."""
        key = (self.ctx.tick, self.version)
        if self._gains is not None and self._gains[0] == key:
            return self._gains[1], self._gains[2]
        slots = np.arange(self.cap)
        rows = self.row
        has_row = (rows >= 0) & self.used
        present = np.zeros(self.cap, np.bool_)
        pos = np.zeros((self.cap, 3))
        quat = np.zeros((self.cap, 4))
        quat[:, 3] = 1.0
        if has_row.any():
            p, mm, ri, rc = self.ctx.entities.poses(rows[has_row])
            present[has_row] = p
            pos[has_row] = dequantize_positions(mm)
            quat[has_row] = dequantize_rotations(ri, rc)
        g = spatial_gains(present, pos, quat, present, pos, f_spatial(self.feature.config))
        heard, fixed = route_mask(
            slots, slots, self.zone, self.broadcast, self.whisper, self.ignore
        )
        # Broadcast and whisper: a fixed level, centred (sqrt(1/2) per ear, like a source ahead).
        level = np.where(self.whisper >= 0, 1.0, self.broadcast) * np.sqrt(0.5)
        g = np.where(fixed[:, :, None], level[None, :, None], g)
        g *= heard[:, :, None]
        if self.feature.config.audio_interaural_delay:
            delays = interaural_delays(present, pos, quat, present, pos)
            delays *= ~fixed[:, :, None]
        else:
            delays = np.zeros(g.shape, np.int64)
        self._gains = (key, g, delays)
        return g, delays

    def _update_speaking(self, now: float) -> None:
        cfg = self.feature.config
        on = self.level > cfg.audio_speaking_dbfs
        hold = self.level > cfg.audio_speaking_dbfs - 10.0
        self.speak_until[on | (self.speaking & hold)] = now + SPEAKING_HANGOVER
        speaking = self.used & (on | (self.speaking & (now < self.speak_until)))
        changed = np.flatnonzero(speaking != self.speaking)
        if changed.size == 0:
            return
        self.speaking = speaking
        entities = self.ctx.entities
        for s in changed.tolist():  # only members whose flag flips
            row = int(self.row[s])
            if row >= 0:
                flags = entities.flags(row)
                on_flag = flags | FLAG_SPEAKING if speaking[s] else flags & ~FLAG_SPEAKING
                entities.set_flags(row, on_flag)
        now_speaking = np.flatnonzero(speaking)
        order = now_speaking[np.argsort(-self.level[now_speaking], kind="stable")]
        ids = tuple(
            int(self.member_id[s]) for s in order.tolist() if not self.members_hidden(int(s))
        )
        if ids != self.speaking_ids:
            self.speaking_ids = ids
            self.ctx.broadcast(AudioSpeaking(ids))

    def members_hidden(self, s: int) -> bool:
        m = self.members.get(int(self.member_id[s]))
        return m is None or m.hidden

    # ----------------------------------------------------------------- rules

    def _shared_rules(self) -> tuple[list[int], list[int], list[int], list[tuple[int, int]]]:
        """The parts of the rules every member sees alike (zones, broadcast, self-muted), and
        every whisper as (speaker id, target id)."""
        used = np.flatnonzero(self.used).tolist()
        visible = [s for s in used if not self.members_hidden(s)]
        ids = self.member_id
        zones = [x for s in visible if self.zone[s] for x in (int(ids[s]), int(self.zone[s]))]
        bc = [
            x
            for s in visible
            if self.broadcast[s] > 0
            for x in (int(ids[s]), round(float(self.broadcast[s]) * 100))
        ]
        muted = [int(ids[s]) for s in visible if self.self_muted[s]]
        whispers = [
            (int(ids[s]), int(ids[int(self.whisper[s])])) for s in used if self.whisper[s] >= 0
        ]
        return zones, bc, muted, whispers

    def rules_for(
        self,
        member: MemberView,
        shared: tuple[list[int], list[int], list[int], list[tuple[int, int]]] | None = None,
    ) -> AudioRules:
        """The rules as ``member`` may know them: whispers only its own unless it hosts."""
        zones, bc, muted, all_whispers = shared if shared is not None else self._shared_rules()
        host = member.identity.can("moderate")
        whispers = [x for pair in all_whispers if host or member.id in pair for x in pair]
        me = self.slot_of.get(member.id)
        ids = self.member_id
        ignored = [] if me is None else [int(ids[t]) for t in np.flatnonzero(self.ignore[me])]
        rules = AudioRules(tuple(zones), tuple(bc), tuple(whispers), tuple(muted), tuple(ignored))
        self.sent_rules[member.id] = rules
        return rules

    def send_rules(self) -> None:
        """Send every member its rules if they changed since it last got them (a join or a
        leave that touches no rule sends nothing to the others)."""
        self.rules_dirty = False
        shared = self._shared_rules()
        for m in self.ctx.members.values():
            if not m.connected or m.paused:
                continue
            before = self.sent_rules.get(m.id)
            rules = self.rules_for(m, shared)
            if rules != before:
                self.ctx.send(m, rules)

    # ----------------------------------------------------------------- lifecycle

    def on_create(self) -> None:
        self.feature.rooms[self.ctx.name] = self

    def on_close(self) -> None:
        if self.feature.rooms.get(self.ctx.name) is self:
            del self.feature.rooms[self.ctx.name]
        for t in list(self._negotiating.values()):
            t.cancel()
        for p in self.peers.values():
            self.feature.m_peers.dec()
            self.feature.close_later(p)
        self.peers.clear()

    def on_join(self, member: MemberView) -> None:
        self.add(member)
        self._schedule_rules()

    def on_resume(self, member: MemberView) -> None:
        self.add(member)
        self.ctx.send(member, self.rules_for(member))

    def on_leave(self, member: MemberView, reason: str) -> None:
        task = self._negotiating.pop(member.id, None)
        if task is not None:
            task.cancel()
        self._offers.pop(member.id, None)
        peer = self.peers.pop(member.id, None)
        if peer is not None:
            self.feature.close_later(peer)
            self.feature.m_peers.dec()
        self.remove(member)
        self._schedule_rules()

    def on_pause(self, member: MemberView, paused: bool) -> None:
        s = self.slot_of.get(member.id)
        if s is not None:
            self.paused[s] = paused
        if not paused:
            self.ctx.send(member, self.rules_for(member))

    def on_member_changed(self, member: MemberView, what: str) -> None:
        s = self.slot_of.get(member.id)
        if s is None:
            return
        if what == "muted":
            self.server_muted[s] = member.muted  # the next 20 ms frame already leaves them out
        elif what == "grants" and not member.can("publish_audio"):
            # Whatever the client keeps sending is no longer read or mixed; it may still listen.
            self.speaker[s] = False
            self.inboxes.pop(s, None)

    # ----------------------------------------------------------------- messages

    def on_message(self, member: MemberView, msg: Message) -> None:
        if isinstance(msg, AudioOffer):
            self._on_offer(member, msg)
        elif isinstance(msg, AudioMute):
            self.self_muted[self._target(member.id)] = msg.muted
            self._schedule_rules()
        elif isinstance(msg, AudioZone):
            self._host(member)
            self.zone[self._target(msg.member_id)] = msg.zone
            self._audit(member, "audio_zone", msg.member_id, zone=msg.zone)
            self._schedule_rules()
        elif isinstance(msg, AudioBroadcast):
            self._host(member)
            gain = (100 if msg.gain is None else msg.gain) / 100.0
            self.broadcast[self._target(msg.member_id)] = gain if msg.on else 0.0
            self._audit(member, "audio_broadcast", msg.member_id, on=msg.on, gain=round(gain * 100))
            self._schedule_rules()
        elif isinstance(msg, AudioWhisper):
            if not member.can("publish_audio"):
                raise ProtocolError(
                    ErrorCode.FORBIDDEN, f"role {member.identity.role} may not publish_audio"
                )
            me = self._target(member.id)
            if msg.target is None:
                self.whisper[me] = -1
            else:
                if msg.target == member.id:
                    raise ProtocolError(ErrorCode.BAD_FIELD, "cannot whisper to yourself")
                self.whisper[me] = self._target(msg.target)
            self._schedule_rules()
        elif isinstance(msg, AudioIgnore):
            if msg.member_id == member.id:
                raise ProtocolError(ErrorCode.BAD_FIELD, "cannot ignore yourself")
            self.ignore[self._target(member.id), self._target(msg.member_id)] = msg.ignore
            self._schedule_rules()

    @staticmethod
    def _host(member: MemberView) -> None:
        if not member.can("moderate"):
            raise ProtocolError(
                ErrorCode.FORBIDDEN, f"role {member.identity.role} may not moderate"
            )

    def _target(self, member_id: int) -> int:
        s = self.slot_of.get(member_id)
        if s is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, "no such member")
        return s

    def _audit(self, host: MemberView, kind: str, target_id: int, **fields: object) -> None:
        """Hosts' routing changes go to the audit log (who changed what for whom, no audio)."""
        target = self.ctx.members.get(target_id)
        self.ctx.audit(
            kind,
            actor=host.identity.subject,
            subject=target.identity.subject if target is not None else str(target_id),
            **fields,
        )

    def _schedule_rules(self) -> None:
        """Coalesce rule changes: members get the new rules at most every 50 ms (the mixer
        applies them from the next frame)."""
        self.rules_dirty = True
        self.version += 1
        if self._rules_timer is None:
            self._rules_timer = self.ctx.call_later(0.05, self._flush_rules)

    def _flush_rules(self) -> None:
        self._rules_timer = None
        if self.rules_dirty:
            self.send_rules()

    # ----------------------------------------------------------------- signaling

    def _on_offer(self, member: MemberView, msg: AudioOffer) -> None:
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
        key = member.id
        if key in self._negotiating:
            raise ProtocolError(ErrorCode.RATE_LIMITED, "a negotiation is already under way")
        now = time.monotonic()
        recent = self._offers.setdefault(key, deque())
        while recent and now - recent[0] > 60.0:
            recent.popleft()
        if len(recent) >= OFFERS_PER_MINUTE:
            raise ProtocolError(ErrorCode.RATE_LIMITED, "too many audio offers; wait a minute")
        recent.append(now)
        task = self.ctx.spawn(self._negotiate(member, msg))
        self._negotiating[key] = task
        task.add_done_callback(lambda _t: self._negotiating.pop(key, None))

    async def _negotiate(self, member: MemberView, offer: AudioOffer) -> None:
        feature = self.feature
        cfg = self.ctx.config
        old = self.peers.pop(member.id, None)
        s = self.slot_of.get(member.id)
        if s is None:
            s = self.add(member)
        if old is not None:
            feature.m_peers.dec()
            self.speaker[s] = self.listener[s] = False
            self.inboxes.pop(s, None)
            await old.close()
        # Only a member allowed to publish who asked to is ever read: any track a client
        # manages to send otherwise is never decoded or mixed.
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        out = MixTrack(cfg.audio_bitrate, cfg.audio_complexity, on_drop=feature.count_drop)
        peer = Peer(pc, out, offer.publish)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState == "failed" and self.peers.get(member.id) is peer:
                log.info("audio peer of member %d failed", member.id)
                self._drop_peer(member, peer)

        try:
            async with asyncio.timeout(NEGOTIATION_TIMEOUT):
                await pc.setRemoteDescription(RTCSessionDescription(offer.sdp, "offer"))
                set_jitter_prefetch(pc, cfg.audio_jitter_frames)
                for t in pc.getTransceivers():
                    t.setCodecPreferences(OPUS)  # the mixer decodes and encodes Opus only
                if offer.publish:
                    inbox = SpeakerInbox()
                    if capture_encoded(pc, inbox):
                        peer.inbox = inbox
                    else:  # an aiortc without the receiver queue we replace: read the track
                        tracks = [r.track for r in pc.getReceivers() if r.track is not None]
                        if tracks:
                            peer.reader = asyncio.ensure_future(self._read(member, tracks[0]))
                pc.addTrack(out)
                await pc.setLocalDescription(await pc.createAnswer())
        except (Exception, asyncio.CancelledError) as exc:
            await peer.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.info("audio offer of member %d refused: %r", member.id, exc)
            self.ctx.error(
                member, ProtocolError(ErrorCode.BAD_FIELD, "the audio offer could not be used")
            )
            return
        if (
            self.members.get(member.id) is not member
            or feature.rooms.get(self.ctx.name) is not self
        ):
            await peer.close()  # left while we negotiated
            return
        self.peers[member.id] = peer
        feature.m_peers.inc()
        self.listener[s] = True
        if peer.inbox is not None:
            self.inboxes[s] = peer.inbox
            self.speaker[s] = True
        self.ctx.send(member, AudioAnswer(pc.localDescription.sdp, offer.publish))

    def _drop_peer(self, member: MemberView, peer: Peer) -> None:
        self.peers.pop(member.id, None)
        self.feature.m_peers.dec()
        s = self.slot_of.get(member.id)
        if s is not None:
            self.speaker[s] = self.listener[s] = False
            self.inboxes.pop(s, None)
        self.feature.close_later(peer)

    async def _read(self, member: MemberView, track: MediaStreamTrack) -> None:
        """Fallback for an aiortc whose receiver we cannot tap (see ``capture_encoded``): read
        the frames aiortc decoded in its receiver thread and keep them as mono."""
        s = self.slot_of.get(member.id)
        if s is None:
            return
        self.speaker[s] = True
        try:
            while True:
                frame = await track.recv()
                if frame.format.name != "s16":
                    continue  # aiortc's Opus decoder gives s16; anything else is not ours
                if self.slot_of.get(member.id) != s:
                    return
                self.write(s, mono_of(frame))
        except MediaStreamError:
            pass
        finally:
            if self.slot_of.get(member.id) == s:
                self.speaker[s] = False

    async def shutdown(self) -> None:
        """Cancel negotiations and close every peer now (the server is stopping)."""
        for t in list(self._negotiating.values()):
            t.cancel()
        for p in list(self.peers.values()):
            await p.close()
        self.peers.clear()


def f_spatial(cfg: ServerConfig) -> Spatial:
    return Spatial(cfg.audio_ref_distance, cfg.audio_rolloff, cfg.audio_max_distance)


class SpatialAudio(ServerPlugin):
    """Spatial audio for every room: one mixer clock, the metrics, and a :class:`RoomAudio`
    per room (see the module docstring)."""

    room_plugin = RoomAudio

    def __init__(self) -> None:
        self.config = ServerConfig()
        self.rooms: dict[str, RoomAudio] = {}
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Future[None]] = set()
        self.mixed = 0
        self.late = 0
        self.dropped_in = 0
        self.dropped_out = 0
        self.degraded = 0
        self.decode_errors = 0
        self.trimmed = 0
        self.silent_skipped = 0  # speaker frames left undecoded: their sender marked them silent
        self._degrade_left = 0
        self.mix_times: deque[float] = deque(maxlen=3000)  # decode + mix, per frame
        self.encode_times: deque[float] = deque(maxlen=3000)  # all listeners, per frame
        #: Per frame, the longest the mixer held the event loop without yielding.
        self.slice_times: deque[float] = deque(maxlen=3000)
        self._slice = 0.0
        self._reported = dict.fromkeys(
            ("mixed", "late", "dropped_in", "trimmed", "dropped_out", "degraded"), 0
        )

    def create(self, ctx: RoomContext) -> RoomPlugin:
        return RoomAudio(ctx, self)

    # ----------------------------------------------------------------- lifecycle

    async def start(self, server: ServerContext) -> None:
        self.config = server.config
        r = server.registry
        self.m_mix = Histogram(
            "medverse_audio_mix_seconds",
            "Time to mix one 20 ms frame for every listener of every room",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05),
            registry=r,
        )
        self.m_frames = Counter(
            "medverse_audio_frames_total",
            "Audio frames: mixed, late (mixer behind), dropped_in (speaker frames skipped: more "
            "than three waiting), trimmed (a speaker's standing extra frame dropped to bring "
            "latency down), dropped_out (listener frames not encoded in time), degraded (mixed "
            "with each listener's loudest speakers only)",
            ["kind"],
            registry=r,
        )
        self.m_peers = Gauge("medverse_audio_peers", "WebRTC audio peers", registry=r)
        self.m_cap = Gauge(
            "medverse_audio_speaker_cap",
            "Speakers mixed per listener now (0: all; set when the mixer degrades)",
            registry=r,
        )
        restrict_ice_addresses(self.config.rtc_host_addresses)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="medverse-mixer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for ra in list(self.rooms.values()):
            await ra.shutdown()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def close_later(self, peer: Peer) -> None:
        """Close a peer in the background (closing waits for aiortc's transports)."""
        task = asyncio.ensure_future(peer.close())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def count_drop(self) -> None:
        self.dropped_out += 1

    # ----------------------------------------------------------------- the mixer clock

    def speaker_cap(self) -> int:
        """Speakers mixed per listener now: the configured cap, or the degraded one."""
        cfg = self.config
        if self._degrade_left > 0:
            return cfg.audio_degraded_speakers
        return cfg.audio_max_speakers

    async def _run(self) -> None:
        """Mix every 20 ms on the fixed-rate clock; a frame whose time has passed is skipped."""
        budget = self.config.audio_mix_budget_ms / 1000.0
        clock = FixedRateClock(FRAME_SECONDS)
        while True:
            n, skip = await clock.next()
            due = clock.due(n)
            if skip:
                self.late += skip
                self._degrade_left = DEGRADE_FRAMES
            self._slice = 0.0
            work = 0.0
            jobs: list[tuple[MixTrack, np.ndarray]] = []
            for ra in list(self.rooms.values()):
                if not ra.peers:
                    continue
                try:
                    # Decode a few speakers at a time, yielding in between: the tick loop
                    # never waits for more than one chunk (or the mix itself).
                    slots = list(ra.inboxes)
                    for i in range(0, len(slots), DECODE_CHUNK):
                        work += self._timed(ra.decode_pending, slots[i : i + DECODE_CHUNK])
                        await asyncio.sleep(0)
                    t0 = time.perf_counter()
                    jobs += ra.mix_frame(time.monotonic(), decode=False)
                    work += self._took(t0)
                except Exception:
                    log.exception("audio mix failed in room %s", ra.ctx.name)
            if work > budget:
                self._degrade_left = DEGRADE_FRAMES
            elif self._degrade_left > 0:
                self._degrade_left -= 1
            if jobs:
                self.mix_times.append(work)
                self.m_mix.observe(work)
                await self._encode(jobs, due + 2 * FRAME_SECONDS)
                self.slice_times.append(self._slice)
            if n % 50 == 0:
                self._flush_metrics()

    def _took(self, t0: float) -> float:
        """Seconds since ``t0``; keeps the longest stretch the mixer held the loop this frame."""
        spent = time.perf_counter() - t0
        self._slice = max(self._slice, spent)
        return spent

    def _timed(self, fn: Any, *args: Any) -> float:
        t0 = time.perf_counter()
        fn(*args)
        return self._took(t0)

    async def _encode(self, jobs: list[tuple[MixTrack, np.ndarray]], deadline: float) -> None:
        """Encode this frame for every listener, a few at a time, yielding to the event loop
        between chunks so that no tick waits for more than one chunk. Listeners not reached by
        ``deadline`` (a whole frame late: the tracks hold a few, so being late by less costs
        nothing) lose this frame, counted as dropped."""
        loop = asyncio.get_running_loop()
        spent = 0.0
        for i in range(0, len(jobs), ENCODE_CHUNK):
            if loop.time() > deadline:
                self.dropped_out += len(jobs) - i
                self._degrade_left = DEGRADE_FRAMES
                break
            t0 = time.perf_counter()
            for track, pcm in jobs[i : i + ENCODE_CHUNK]:
                if track.readyState == "live":
                    track.push(track.encoder.encode(pcm))
            spent += self._took(t0)
            await asyncio.sleep(0)
        self.encode_times.append(spent)

    def _flush_metrics(self) -> None:
        for kind in self._reported:
            v = getattr(self, kind)
            if v > self._reported[kind]:
                self.m_frames.labels(kind).inc(v - self._reported[kind])
                self._reported[kind] = v
        self.m_cap.set(self.speaker_cap())

    def health(self) -> dict[str, object]:
        """Summary for ``/health``: peers, mix time percentiles, late/dropped/degraded frames."""
        body: dict[str, object] = {
            "peers": sum(len(ra.peers) for ra in self.rooms.values()),
            "frames_mixed": self.mixed,
            "late": self.late,
            "dropped_in": self.dropped_in,
            "trimmed": self.trimmed,
            "silent_undecoded": self.silent_skipped,
            "dropped_out": self.dropped_out,
            "degraded": self.degraded,
            "speaker_cap": self.speaker_cap(),
        }
        for name, values in (
            ("mix_ms", self.mix_times),
            ("encode_ms", self.encode_times),
            ("loop_hold_ms", self.slice_times),
        ):
            times = np.array(values) * 1000.0
            if times.size:
                body[name] = {
                    "frames": int(times.size),
                    "p50": round(float(np.percentile(times, 50)), 3),
                    "p99": round(float(np.percentile(times, 99)), 3),
                    "max": round(float(times.max()), 3),
                }
        return {"audio": body}
