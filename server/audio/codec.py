"""Opus in and out of the mixer: one mono decoder per speaker, one stereo encoder per listener.

The only server module that uses PyAV. A speaker's encoded frames are decoded here into int16
samples that go into the room's ring buffers (:mod:`.mixing`); each listener's mixed stereo frame
is encoded here once, and its packets go to the listener's outgoing WebRTC track
(:class:`.signaling.MixTrack`), which aiortc sends as they are.
"""

from __future__ import annotations

import fractions

import av
import numpy as np
from av import AudioFrame
from av.packet import Packet

from .spatial import FRAME_SAMPLES, SAMPLE_RATE

__all__ = ["TIME_BASE", "DecodeError", "OpusDecoder", "OpusStream", "Packet", "mono_of"]

TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
#: What decoding a malformed packet raises (the mixer counts it and skips the packet).
DecodeError = av.FFmpegError
_NO_SAMPLES = np.zeros(0, np.int16)


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


class OpusDecoder:
    """One speaker's Opus decoder, mono: libopus downmixes a stereo stream itself, which is
    cheaper than decoding both channels."""

    def __init__(self) -> None:
        codec = av.CodecContext.create("libopus", "r")
        codec.layout = "mono"
        codec.sample_rate = SAMPLE_RATE
        codec.format = "s16"
        self.codec = codec

    def decode(self, data: bytes) -> np.ndarray:
        """The int16 samples of one encoded frame (normally FRAME_SAMPLES of them); raises
        :data:`DecodeError` on a malformed packet."""
        frames = self.codec.decode(av.Packet(data))
        # Mono s16: read the plane itself (to_ndarray would stack the planes first).
        if len(frames) == 1:
            f = frames[0]
            return np.frombuffer(f.planes[0], np.int16, f.samples)
        if not frames:
            return _NO_SAMPLES
        return np.concatenate([np.frombuffer(f.planes[0], np.int16, f.samples) for f in frames])


def mono_of(frame: AudioFrame) -> np.ndarray:
    """A decoded s16 frame as mono float32 samples (full scale 1.0)."""
    channels = len(frame.layout.channels)
    pcm = frame.to_ndarray().reshape(-1)
    if channels == 1:
        return pcm * np.float32(1 / 32768)
    pcm = pcm.reshape(-1, channels)
    return pcm.sum(axis=1, dtype=np.float32) * np.float32(1 / (32768 * channels))
