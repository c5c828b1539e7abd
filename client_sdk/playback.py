"""Playing the received mix on a desktop's audio output (``pip install 'medverse[playback]'``).

    mix = await session.audio.start(microphone_track())
    player = AudioPlayer(mix)  # the default output device, through sounddevice (PortAudio)
    ...
    player.stop()

The mix arrives as 20 ms stereo frames at 48 kHz; :class:`AudioPlayer` reads them from the
track as they come (which aiortc needs anyway: it queues decoded frames until someone reads
them) into a small buffer that the output device's callback drains. The buffer absorbs
network jitter (playback starts once ``prebuffer`` seconds are there, and again after an
underrun) and never holds more than ``max_buffer`` seconds, dropping the oldest sound rather
than letting the delay grow.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame, AudioResampler

SAMPLE_RATE = 48000
CHANNELS = 2
_BYTES_PER_FRAME = 2 * CHANNELS  # int16 stereo


class OutputStream(Protocol):
    """What :class:`AudioPlayer` needs of an output stream (``sounddevice.RawOutputStream``)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def close(self) -> None: ...


class PlaybackUnavailable(RuntimeError):
    """This machine cannot play audio through sounddevice: the package is not installed, or
    the PortAudio library it loads is missing. The message says what to install."""


#: Makes the output stream: ``factory(callback, blocksize, device, latency)``; the callback
#: has sounddevice's signature ``(outdata, frames, time, status)``.
StreamFactory = Callable[[Callable[..., None], int, Any, Any], OutputStream]


def sounddevice_stream(
    callback: Callable[..., None], blocksize: int, device: Any, latency: Any
) -> OutputStream:
    """A ``sounddevice.RawOutputStream`` (48 kHz, stereo, int16) on ``device``; raises
    :class:`PlaybackUnavailable` when sounddevice or PortAudio is missing."""
    try:
        import sounddevice
    except (ImportError, OSError) as exc:  # OSError: the PortAudio library is missing
        raise PlaybackUnavailable(
            "playing audio needs sounddevice and the PortAudio library: "
            "pip install 'medverse[playback]' (and, on Linux, libportaudio2)"
        ) from exc
    stream: OutputStream = sounddevice.RawOutputStream(
        samplerate=SAMPLE_RATE,
        channels=CHANNELS,
        dtype="int16",
        blocksize=blocksize,
        device=device,
        latency=latency,
        callback=callback,
    )
    return stream


class _Buffer:
    """Interleaved int16 stereo bytes between the reading task and the device's thread."""

    def __init__(self, prebuffer: int, limit: int) -> None:
        self._data = bytearray()
        self._lock = threading.Lock()
        self._prebuffer = prebuffer
        self._limit = limit
        self._playing = False
        self.underruns = 0
        self.dropped = 0  # bytes dropped to keep the delay bounded

    def push(self, pcm: bytes) -> None:
        with self._lock:
            self._data += pcm
            over = len(self._data) - self._limit
            if over > 0:
                over += -over % _BYTES_PER_FRAME
                del self._data[:over]
                self.dropped += over

    def pull(self, n: int) -> bytes:
        """``n`` bytes for the device: sound if there is enough, else silence."""
        with self._lock:
            if not self._playing and len(self._data) >= self._prebuffer:
                self._playing = True
            if not self._playing:
                return bytes(n)
            out = bytes(self._data[:n])
            del self._data[:n]
            if len(out) < n:  # ran dry: silence, and wait for the prebuffer again
                self._playing = False
                self.underruns += 1
                out += bytes(n - len(out))
            return out

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)


class AudioPlayer:
    """Plays an audio track (the mix ``session.audio.start()`` returns) on an output device.

    ``device`` and ``latency`` are sounddevice's (None: the default device, ``"low"``
    latency); ``stream_factory`` makes the output stream (default: :func:`sounddevice_stream`;
    tests and other audio libraries pass their own). Raises :class:`PlaybackUnavailable` (a
    RuntimeError) when sounddevice or PortAudio is missing.
    """

    def __init__(
        self,
        track: MediaStreamTrack,
        *,
        device: Any = None,
        latency: Any = "low",
        blocksize: int = 960,
        prebuffer: float = 0.04,
        max_buffer: float = 0.2,
        stream_factory: StreamFactory | None = None,
    ) -> None:
        self.track = track
        self.frames = 0  # frames read from the track
        self._buffer = _Buffer(
            int(prebuffer * SAMPLE_RATE) * _BYTES_PER_FRAME,
            int(max_buffer * SAMPLE_RATE) * _BYTES_PER_FRAME,
        )
        self._resampler: AudioResampler | None = None
        factory = stream_factory or sounddevice_stream
        self._stream = factory(self._callback, blocksize, device, latency)
        self._stream.start()
        self._task = asyncio.ensure_future(self._run())

    @property
    def underruns(self) -> int:
        """Times the device found the buffer empty (the network or the mixer fell behind)."""
        return self._buffer.underruns

    @property
    def buffered(self) -> float:
        """Seconds of sound waiting for the device."""
        return len(self._buffer) / _BYTES_PER_FRAME / SAMPLE_RATE

    def _callback(self, outdata: Any, frames: int, time: Any, status: Any) -> None:
        # Runs on the audio device's thread: take what is buffered, never block.
        outdata[:] = self._buffer.pull(frames * _BYTES_PER_FRAME)

    def feed(self, frame: AudioFrame) -> None:
        """Queue one received frame for the device (converted to 48 kHz int16 stereo)."""
        if (
            frame.format.name != "s16"
            or frame.sample_rate != SAMPLE_RATE
            or len(frame.layout.channels) != CHANNELS
        ):
            if self._resampler is None:
                self._resampler = AudioResampler("s16", "stereo", SAMPLE_RATE)
            for out in self._resampler.resample(frame):
                self._buffer.push(_interleaved(out))
        else:
            self._buffer.push(_interleaved(frame))
        self.frames += 1

    async def _run(self) -> None:
        with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
            while True:
                frame = await self.track.recv()
                if isinstance(frame, AudioFrame):
                    self.feed(frame)

    def stop(self) -> None:
        """Stop reading the track and close the output stream."""
        self._task.cancel()
        with contextlib.suppress(Exception):
            self._stream.stop()
        with contextlib.suppress(Exception):
            self._stream.close()


def _interleaved(frame: AudioFrame) -> bytes:
    """A packed s16 stereo frame's samples, interleaved left/right."""
    pcm = frame.to_ndarray()  # packed: one row of L R L R ...
    return np.ascontiguousarray(pcm, dtype=np.int16).tobytes()


__all__ = [
    "AudioPlayer",
    "OutputStream",
    "PlaybackUnavailable",
    "StreamFactory",
    "sounddevice_stream",
]
