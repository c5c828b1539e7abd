"""Opus in and out of the mixer: one mono decoder per speaker, one stereo encoder per listener.

The only server module that touches an Opus codec. A speaker's encoded frames are decoded here
into int16 samples that go into the room's ring buffers (:mod:`.mixing`); each listener's mixed
stereo frame is encoded here once (PyAV), and its packets go to the listener's outgoing WebRTC
track (:class:`.signaling.MixTrack`), which aiortc sends as they are.

Speakers are decoded with libopus itself (through ctypes), not through PyAV: FFmpeg's libopus
decoder always passes a packet's bytes and ``decode_fec=0``, and an empty packet means "end of
stream" to it, so neither packet loss concealment (``opus_decode`` with no data) nor in-band
forward error correction (``decode_fec=1``) can be reached through it. The library is the one
PyAV's wheel ships (already loaded by PyAV), else the system's ``libopus``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fractions
import glob
import os

import av
import numpy as np
from av import AudioFrame
from av.packet import Packet

from .spatial import FRAME_SAMPLES, SAMPLE_RATE

__all__ = [
    "MAX_DECODE_SAMPLES",
    "TIME_BASE",
    "DecodeError",
    "OpusDecoder",
    "OpusStream",
    "Packet",
    "libopus",
    "mono_of",
]

TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
#: The longest Opus packet: 120 ms at 48 kHz.
MAX_DECODE_SAMPLES = 5760
#: Concealed or recovered audio comes in multiples of 2.5 ms (what libopus accepts).
_PLC_STEP = 120


class DecodeError(ValueError):
    """A malformed Opus packet (the mixer counts it and skips the packet)."""


def _find_libopus() -> str:
    """The path of the libopus to load: PyAV's own copy (its wheels bundle one beside
    libavcodec, in ``av.libs``), else the system's."""
    site = os.path.dirname(os.path.dirname(os.path.abspath(av.__file__)))
    bundled = sorted(glob.glob(os.path.join(site, "av.libs", "libopus*.so*")))
    if bundled:
        return bundled[0]
    name = ctypes.util.find_library("opus")
    if name is None:
        raise ImportError("libopus not found: install PyAV from its wheel, or libopus0")
    return name


def _load_libopus() -> ctypes.CDLL:
    lib = ctypes.CDLL(_find_libopus())
    lib.opus_decoder_create.restype = ctypes.c_void_p
    lib.opus_decoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    lib.opus_decoder_destroy.restype = None
    lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
    lib.opus_decode.restype = ctypes.c_int
    lib.opus_decode.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_int32,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int,
    ]
    lib.opus_packet_get_nb_samples.restype = ctypes.c_int
    lib.opus_packet_get_nb_samples.argtypes = [ctypes.c_char_p, ctypes.c_int32, ctypes.c_int32]
    lib.opus_get_version_string.restype = ctypes.c_char_p
    if hasattr(lib, "opus_packet_has_lbrr"):  # libopus >= 1.5
        lib.opus_packet_has_lbrr.restype = ctypes.c_int
        lib.opus_packet_has_lbrr.argtypes = [ctypes.c_char_p, ctypes.c_int32]
    return lib


#: libopus, loaded once.
libopus = _load_libopus()


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
    cheaper than decoding both channels.

    Besides decoding packets it conceals lost ones (:meth:`conceal`: libopus extrapolates the
    voice from its state, fading out over a long loss) and recovers the frame before a packet
    from that packet's in-band FEC, when its sender put one in (:meth:`recover`). Decoder state
    carries from call to call, so every packet and every loss of one stream go through the same
    decoder, in order.
    """

    def __init__(self) -> None:
        err = ctypes.c_int(0)
        state = libopus.opus_decoder_create(SAMPLE_RATE, 1, ctypes.byref(err))
        if not state or err.value != 0:
            raise MemoryError(f"opus_decoder_create failed ({err.value})")
        self._state: int | None = state
        self._out = np.zeros(MAX_DECODE_SAMPLES, np.int16)
        self._out_ptr = self._out.ctypes.data

    def __del__(self) -> None:
        state, self._state = getattr(self, "_state", None), None
        if state:
            libopus.opus_decoder_destroy(state)

    def _run(self, data: bytes | None, size: int, samples: int, fec: int) -> np.ndarray:
        n = libopus.opus_decode(self._state, data, size, self._out_ptr, samples, fec)
        if n < 0:
            raise DecodeError(f"opus_decode: error {n}")
        return self._out[:n].copy()

    def decode(self, data: bytes) -> np.ndarray:
        """The int16 samples of one encoded frame (normally FRAME_SAMPLES of them); raises
        :class:`DecodeError` on a malformed packet."""
        if not data:
            raise DecodeError("empty packet")
        return self._run(data, len(data), MAX_DECODE_SAMPLES, 0)

    def conceal(self, samples: int = FRAME_SAMPLES) -> np.ndarray:
        """``samples`` (rounded down to 2.5 ms) of audio standing in for a lost or late packet:
        libopus's packet loss concealment, from the decoder's state."""
        samples = min(samples - samples % _PLC_STEP, MAX_DECODE_SAMPLES)
        if samples <= 0:
            return np.zeros(0, np.int16)
        return self._run(None, 0, samples, 0)

    def recover(self, data: bytes, samples: int = FRAME_SAMPLES) -> np.ndarray:
        """``samples`` (rounded down to 2.5 ms) of audio that was lost just before the packet
        ``data``, which has not been decoded yet (decode it next): the frame right before it
        comes from its in-band FEC if it carries one, anything earlier (and everything, when it
        carries none) is concealed."""
        samples = min(samples - samples % _PLC_STEP, MAX_DECODE_SAMPLES)
        if samples <= 0:
            return np.zeros(0, np.int16)
        if not data:
            raise DecodeError("empty packet")
        return self._run(data, len(data), samples, 1)

    @staticmethod
    def has_fec(data: bytes) -> bool:
        """Whether the packet carries in-band FEC (LBRR) data for the frame before it (False
        where libopus is older than 1.5 and cannot tell)."""
        fn = getattr(libopus, "opus_packet_has_lbrr", None)
        return bool(data) and fn is not None and fn(data, len(data)) > 0

    @staticmethod
    def samples_of(data: bytes) -> int:
        """Samples at 48 kHz the packet decodes to (raises :class:`DecodeError` if malformed)."""
        n = libopus.opus_packet_get_nb_samples(data, len(data), SAMPLE_RATE) if data else -1
        if n < 0:
            raise DecodeError(f"opus_packet_get_nb_samples: error {n}")
        return int(n)


def mono_of(frame: AudioFrame) -> np.ndarray:
    """A decoded s16 frame as mono float32 samples (full scale 1.0)."""
    channels = len(frame.layout.channels)
    pcm = frame.to_ndarray().reshape(-1)
    if channels == 1:
        return pcm * np.float32(1 / 32768)
    pcm = pcm.reshape(-1, channels)
    return pcm.sum(axis=1, dtype=np.float32) * np.float32(1 / (32768 * channels))
