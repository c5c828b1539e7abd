"""Spatial audio in the SDK: publish a track, receive the mix made for you, routing rules.

    async with connect(url, room="circle", name="Dr A", token=t) as session:
        mix = await session.audio.start(tone_track(440))   # publish a tone, get the mix back
        meter = LevelMeter(mix)                             # or play/record ``mix`` yourself
        await session.audio.mute(True)

WebRTC runs through aiortc, set up by :mod:`medverse.rtc` like the server's. ICE gathers host
candidates only on the addresses named by ``host_addresses`` (default:
``MEDVERSE_RTC_HOST_ADDRESSES``, else ``127.0.0.1``), and no STUN server is contacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame

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
    pairs,
)
from medverse.protocol.messages import Error, Message, Welcome
from medverse.rtc import (
    DEFAULT_HOST_ADDRESSES,
    EncodedInbox,
    capture_encoded,
    peer_connection,
    restrict_ice_addresses,
    set_jitter_prefetch,
)

from .feature import SessionLink
from .types import RefusedError

SAMPLE_RATE = 48000
FRAME_SAMPLES = 960
TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)


class AudioError(RefusedError):
    """The server refused an audio call: the offer, or a routing change (``code`` is the
    protocol error code)."""


@dataclass(frozen=True, slots=True)
class RoomAudioRules:
    """The room's audio routing rules as the server lets this member know them."""

    zones: dict[int, int] = field(default_factory=dict)  # member id -> zone
    broadcast: dict[int, float] = field(default_factory=dict)  # member id -> gain (1.0 = ref)
    whispers: dict[int, int] = field(default_factory=dict)  # speaker id -> target id
    self_muted: frozenset[int] = frozenset()
    ignored: frozenset[int] = frozenset()

    @classmethod
    def from_message(cls, m: AudioRules) -> RoomAudioRules:
        return cls(
            dict(pairs(m.zones)),
            {k: v / 100.0 for k, v in pairs(m.broadcast)},
            dict(pairs(m.whispers)),
            frozenset(m.self_muted),
            frozenset(m.ignored),
        )


class ToneTrack(MediaStreamTrack):
    """A sine tone (the same on both channels) in real time (20 ms frames), for bots and tests.

    ``level_dbfs`` can be changed while it plays (``None`` is silence); :meth:`click` puts a
    short full-scale burst at the start of the next frame and records when that frame left.
    """

    kind = "audio"

    def __init__(self, frequency: float = 440.0, level_dbfs: float | None = -20.0) -> None:
        super().__init__()
        self.frequency = frequency
        self.level_dbfs = level_dbfs
        self._n = 0
        self._t0: float | None = None
        self._click = False
        #: time.monotonic() when each clicked frame was handed to the encoder.
        self.click_times: list[float] = []

    def click(self) -> None:
        """Put a click (2 ms burst at 0.9 of full scale) into the next frame."""
        self._click = True

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._t0 is None:
            self._t0 = time.monotonic()
        delay = self._t0 + self._n * FRAME_SAMPLES / SAMPLE_RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.2:  # we were starved (loaded machine): do not burst to catch up
            self._t0 = time.monotonic() - self._n * FRAME_SAMPLES / SAMPLE_RATE
        t = (np.arange(FRAME_SAMPLES) + self._n * FRAME_SAMPLES) / SAMPLE_RATE
        if self.level_dbfs is None:
            x = np.zeros(FRAME_SAMPLES)
        else:
            amp = 10.0 ** (self.level_dbfs / 20.0) * math.sqrt(2.0)  # RMS of a sine is A/sqrt2
            x = amp * np.sin(2 * np.pi * self.frequency * t)
        clicked = self._click
        if clicked:
            self._click = False
            burst = 96  # 2 ms
            x[:burst] = 0.9 * np.sin(2 * np.pi * 2000.0 * np.arange(burst) / SAMPLE_RATE)
        pcm = (np.clip(x, -1.0, 32767 / 32768) * 32768).astype(np.int16)
        # Stereo with both channels equal: a mono frame would be upmixed at -3 dB on encoding.
        stereo = np.repeat(pcm, 2).reshape(1, -1)
        frame = AudioFrame.from_ndarray(stereo, format="s16", layout="stereo")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._n * FRAME_SAMPLES
        frame.time_base = TIME_BASE
        self._n += 1
        if clicked:
            self.click_times.append(time.monotonic())
        return frame


def tone_track(frequency: float = 440.0, level_dbfs: float | None = -20.0) -> ToneTrack:
    """A sine tone source to publish (see :class:`ToneTrack`)."""
    return ToneTrack(frequency, level_dbfs)


def file_track(path: str, loop: bool = False) -> MediaStreamTrack:
    """The audio of a media file (any format FFmpeg reads), played in real time."""
    from aiortc.contrib.media import MediaPlayer

    player = MediaPlayer(path, loop=loop)
    if player.audio is None:
        raise ValueError(f"{path} has no audio stream")
    return player.audio


def microphone_track(device: str = "default", fmt: str = "pulse") -> MediaStreamTrack:
    """The default microphone where one exists (PulseAudio by default; ``fmt`` may be
    ``alsa``, ``avfoundation`` or ``dshow`` with the matching ``device``)."""
    from aiortc.contrib.media import MediaPlayer

    player = MediaPlayer(device, format=fmt)
    if player.audio is None:
        raise ValueError("no microphone found")
    return player.audio


class LevelMeter:
    """Reads an audio track in the background and keeps per-frame levels and arrival times.

    Consuming the received mix matters: aiortc queues decoded frames until someone reads them.
    """

    def __init__(self, track: MediaStreamTrack, keep: int = 1500) -> None:
        self.track = track
        #: (time.monotonic() at arrival, left RMS, right RMS, peak) per frame, oldest first.
        self.frames: deque[tuple[float, float, float, float]] = deque(maxlen=keep)
        self.count = 0
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
            while True:
                frame = await self.track.recv()
                if not isinstance(frame, AudioFrame):
                    continue  # an audio track yields frames; anything else is not ours
                now = time.monotonic()
                pcm = frame.to_ndarray().astype(np.float32) / 32768.0
                ch = len(frame.layout.channels)
                x = pcm.reshape(-1, ch)
                left, right = x[:, 0], x[:, min(1, ch - 1)]
                self.frames.append(
                    (
                        now,
                        float(np.sqrt(np.mean(left * left))),
                        float(np.sqrt(np.mean(right * right))),
                        float(np.abs(x).max(initial=0.0)),
                    )
                )
                self.count += 1

    def levels(self, seconds: float = 0.3, until: float | None = None) -> tuple[float, float]:
        """Left and right level in dBFS over the frames that arrived in the last ``seconds``
        (before ``until``, default now); -120 when nothing arrived."""
        end = time.monotonic() if until is None else until
        rows = [f for f in self.frames if end - seconds <= f[0] <= end]
        if not rows:
            return (-120.0, -120.0)
        arr = np.array(rows)
        power = np.mean(np.square(arr[:, 1:3]), axis=0)
        return tuple(  # type: ignore[return-value]
            float(max(-120.0, 10 * math.log10(max(p, 1e-12)))) for p in power
        )

    def level(self, seconds: float = 0.3) -> float:
        """Both channels' level in dBFS over the last ``seconds``."""
        left, right = self.levels(seconds)
        return 10 * math.log10(max((10 ** (left / 10) + 10 ** (right / 10)) / 2, 1e-12))

    def first_peak_after(self, t: float, threshold: float = 0.3) -> float | None:
        """Arrival time of the first frame after ``t`` whose peak exceeds ``threshold``."""
        for arrival, _, _, peak in self.frames:
            if arrival > t and peak >= threshold:
                return arrival
        return None

    def stop(self) -> None:
        self._task.cancel()


class _Published(MediaStreamTrack):
    """The application's track as one peer connection sends it. aiortc's sender stops the track
    it reads when its connection ends (closed by us, or by the server when we leave a room);
    it stops this stand-in instead, and the application's track can be published again (after
    a move to another room, or a rejoin as a new member)."""

    kind = "audio"

    def __init__(self, source: MediaStreamTrack) -> None:
        super().__init__()
        self.source = source

    async def recv(self) -> Any:
        if self.readyState != "live":
            raise MediaStreamError
        return await self.source.recv()


class AudioClient:
    """A session's audio: reach it as ``session.audio``.

    :meth:`start` negotiates the WebRTC connection (publishing a track if given) and returns
    the received mix. Routing calls (:meth:`set_zone`, :meth:`broadcast`, :meth:`whisper`,
    :meth:`ignore`) send the request; the server answers with new :attr:`rules` (or a typed
    error event if the member may not). :attr:`speaking` lists who is talking, loudest first.
    """

    def __init__(self, session: SessionLink) -> None:
        self.session = session
        env = os.environ.get("MEDVERSE_RTC_HOST_ADDRESSES")
        #: Addresses ICE gathers on (set before :meth:`start`).
        self.host_addresses: str | tuple[str, ...] = env or DEFAULT_HOST_ADDRESSES
        #: Received 20 ms frames held before decoding (aiortc's default is 4). 0 decodes each
        #: packet at once and leaves smoothing to the audio output's own buffer.
        self.jitter_frames = 0
        self.rules = RoomAudioRules()
        self.speaking: tuple[int, ...] = ()
        #: Called with the new :class:`RoomAudioRules` / speaking tuple when they change.
        self.on_rules: list[Callable[[RoomAudioRules], None]] = []
        self.on_speaking: list[Callable[[tuple[int, ...]], None]] = []
        self.pc: RTCPeerConnection | None = None
        self.mix: MediaStreamTrack | None = None
        self.published: MediaStreamTrack | None = None
        #: With ``start(decode=False)``: the received encoded frames, counted, not decoded.
        self.inbox: EncodedInbox | None = None
        self._answer: asyncio.Future[AudioAnswer] | None = None
        self._restart: asyncio.Task[Any] | None = None
        self._rules_changed = asyncio.Event()
        session.add_handler(AudioAnswer, self._on_answer)
        session.add_handler(AudioRules, self._on_rules)
        session.add_handler(AudioSpeaking, self._on_speaking)
        session.add_handler(Error, self._on_error)
        session.add_connected_hook(self._on_connected)

    async def start(
        self, track: MediaStreamTrack | None = None, timeout: float = 10.0, decode: bool = True
    ) -> MediaStreamTrack:
        """Connect audio: publish ``track`` (any aiortc audio track; None to only listen) and
        return the track of the mix made for us. Raises :class:`AudioError` if refused.

        ``decode=False`` is for load generators: the mix is not decoded, its encoded frames
        are only counted in :attr:`inbox` (the returned track then yields nothing)."""
        await self.close()
        restrict_ice_addresses(self.host_addresses)
        pc = peer_connection()
        self.pc = pc
        self.published = track
        got: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()

        @pc.on("track")
        def on_track(remote: MediaStreamTrack) -> None:
            if remote.kind == "audio" and not got.done():
                got.set_result(remote)

        if track is not None:
            pc.addTransceiver(_Published(track), direction="sendrecv")
        else:
            pc.addTransceiver("audio", direction="recvonly")
        set_jitter_prefetch(pc, self.jitter_frames)
        self.inbox = None
        if not decode:
            self.inbox = EncodedInbox(depth=4)
            capture_encoded(pc, self.inbox)
        await pc.setLocalDescription(await pc.createOffer())
        self._answer = asyncio.get_running_loop().create_future()
        try:
            await self.session.send_message(AudioOffer(pc.localDescription.sdp, track is not None))
            answer = await asyncio.wait_for(self._answer, timeout)
            await pc.setRemoteDescription(RTCSessionDescription(answer.sdp, "answer"))
            self.mix = await asyncio.wait_for(got, timeout)
        except BaseException:
            await self.close()
            raise
        finally:
            self._answer = None
        return self.mix

    async def close(self) -> None:
        """Stop audio (the room connection stays). The published track is the application's
        and is not stopped: a new :meth:`start` (after a move to another room, or a rejoin as
        a new member) publishes it again."""
        pc, self.pc = self.pc, None
        self.mix = None
        if pc is not None:
            await pc.close()

    # Routing calls return once the server applied them (the mixer uses them from its next
    # frame; members get the new rules within 50 ms) and raise AudioError when refused.

    async def mute(self, muted: bool = True) -> None:
        """Self mute or unmute (the server stops mixing us; a host's mute is separate)."""
        await self.session.request(lambda r: AudioMute(muted, r), AudioError)

    async def set_zone(self, member_id: int, zone: int) -> None:
        """Host: put a member in a zone (members of a zone hear only each other); 0 clears."""
        await self.session.request(lambda r: AudioZone(member_id, zone, r), AudioError)

    async def broadcast(self, member_id: int, on: bool = True, gain: float = 1.0) -> None:
        """Host: make a member heard by everyone at ``gain`` (1.0 = reference level)."""
        percent = round(gain * 100)
        await self.session.request(lambda r: AudioBroadcast(member_id, on, percent, r), AudioError)

    async def whisper(self, target: int | None) -> None:
        """Whisper to one member (only they hear us) or stop (``None``)."""
        await self.session.request(lambda r: AudioWhisper(target, r), AudioError)

    async def ignore(self, member_id: int, ignore: bool = True) -> None:
        """Stop hearing, and being heard by, a member (or undo it)."""
        await self.session.request(lambda r: AudioIgnore(member_id, ignore, r), AudioError)

    async def wait_rules(
        self, predicate: Callable[[RoomAudioRules], bool], timeout: float = 5.0
    ) -> RoomAudioRules:
        """Wait until the rules satisfy ``predicate``; returns them."""
        deadline = time.monotonic() + timeout
        while not predicate(self.rules):
            self._rules_changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("audio rules did not change as expected")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rules_changed.wait(), left)
        return self.rules

    # ----------------------------------------------------------------- server messages

    def _on_answer(self, m: Message) -> None:
        if self._answer is not None and not self._answer.done():
            assert isinstance(m, AudioAnswer)
            self._answer.set_result(m)

    def _on_error(self, m: Message) -> None:
        # Errors carry no request id: one arriving while an offer is pending refuses it.
        if self._answer is not None and not self._answer.done():
            assert isinstance(m, Error)
            self._answer.set_exception(AudioError(m.code, m.message))

    def _on_rules(self, m: Message) -> None:
        assert isinstance(m, AudioRules)
        self.rules = RoomAudioRules.from_message(m)
        self._rules_changed.set()
        for fn in self.on_rules:
            fn(self.rules)

    def _on_speaking(self, m: Message) -> None:
        assert isinstance(m, AudioSpeaking)
        self.speaking = m.members
        for fn in self.on_speaking:
            fn(self.speaking)

    def _on_connected(self, welcome: Welcome) -> None:
        # After a reconnect as a new member the server has dropped our old peer: renegotiate.
        if self.pc is not None and not welcome.resumed and self._answer is None:
            track = self.published
            self._restart = asyncio.ensure_future(self.start(track))
