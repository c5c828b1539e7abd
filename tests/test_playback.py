"""Playing the received mix (client_sdk/playback.py): frames from the track reach the output
stream's callback as 48 kHz int16 stereo; a real device is used only where one exists."""

from __future__ import annotations

import asyncio
import importlib.abc
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
from av import AudioFrame

from medverse.client_sdk import AudioPlayer, PlaybackUnavailable, connect, tone_track
from medverse.client_sdk.playback import sounddevice_stream

from .conftest import ServerProcess, run_server
from .helpers import wait_for


class FakeStream:
    """An output stream without a device: the test plays the device's part."""

    def __init__(self, callback: Callable[..., None], blocksize: int) -> None:
        self.callback = callback
        self.blocksize = blocksize
        self.started = self.closed = False

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def pull(self, frames: int) -> np.ndarray:
        """What the device would play next: ``frames`` stereo samples."""
        out = bytearray(frames * 4)
        self.callback(memoryview(out), frames, None, None)
        return np.frombuffer(bytes(out), np.int16).reshape(-1, 2)


def fake() -> tuple[list[FakeStream], Callable[..., FakeStream]]:
    made: list[FakeStream] = []

    def factory(callback: Callable[..., None], blocksize: int, device: Any, latency: Any) -> Any:
        made.append(FakeStream(callback, blocksize))
        return made[-1]

    return made, factory


def dbfs(x: np.ndarray) -> float:
    rms = math.sqrt(float(np.mean((x.astype(np.float64) / 32768.0) ** 2)))
    return 20 * math.log10(max(rms, 1e-9))


async def test_frames_of_a_track_reach_the_output_stream() -> None:
    made, factory = fake()
    tone = tone_track(440, -20)
    player = AudioPlayer(tone, stream_factory=factory, prebuffer=0.04)
    stream = made[0]
    assert stream.started
    assert not stream.pull(960).any()  # nothing buffered yet: silence, not noise
    await wait_for(lambda: player.frames >= 5, timeout=3)
    played = stream.pull(4 * 960)
    assert played.shape == (3840, 2)
    assert abs(dbfs(played[:, 0]) + 20) < 1.5 and abs(dbfs(played[:, 1]) + 20) < 1.5
    player.stop()
    tone.stop()
    assert stream.closed


async def test_other_formats_are_converted_and_the_delay_stays_bounded() -> None:
    made, factory = fake()
    silent = tone_track(440, None)
    player = AudioPlayer(silent, stream_factory=factory, max_buffer=0.1)
    player.stop()  # fed by hand below
    mono = AudioFrame.from_ndarray(
        (np.sin(np.arange(320) / 5.0) * 8000).astype(np.int16).reshape(1, -1),
        format="s16",
        layout="mono",
    )
    mono.sample_rate = 16000
    for _ in range(20):  # 20 x 20 ms, more than the 100 ms the buffer keeps
        player.feed(mono)
    assert player.buffered <= 0.1 + 1e-9
    played = made[0].pull(960)
    assert played.any() and np.array_equal(played[:, 0], played[:, 1])
    made[0].pull(48000)  # far more than buffered: an underrun, filled with silence
    assert player.underruns == 1


@pytest.fixture(scope="module")
def server() -> Any:
    with run_server(rtc_host_addresses="127.0.0.1") as s:
        yield s


async def test_the_received_mix_is_played(server: ServerProcess) -> None:
    made, factory = fake()
    async with (
        connect(server.url, "playback", "speaker") as speaker,
        connect(server.url, "playback", "listener") as listener,
    ):
        tone = tone_track(330, -20)
        await speaker.audio.start(tone)
        mix = await listener.audio.start(None)
        player = AudioPlayer(mix, stream_factory=factory)
        loud = -120.0
        for _ in range(100):
            await asyncio.sleep(0.05)
            block = made[0].pull(960)
            loud = max(loud, dbfs(block))
            if loud > -40:
                break
        assert loud > -40, loud
        player.stop()
        tone.stop()


def _has_output_device() -> bool:
    try:
        import sounddevice

        return any(d["max_output_channels"] > 0 for d in sounddevice.query_devices())
    except Exception:
        return False


@pytest.mark.skipif(not _has_output_device(), reason="no sounddevice or no audio output device")
async def test_a_real_output_device_plays() -> None:  # pragma: no cover - needs hardware
    tone = tone_track(440, -30)
    player = AudioPlayer(tone, stream_factory=sounddevice_stream)
    await asyncio.sleep(0.3)
    assert player.frames > 5
    player.stop()
    tone.stop()


class _NoPortAudio(importlib.abc.MetaPathFinder):
    """Imports sounddevice as it fails where the PortAudio library is missing (OSError)."""

    def find_spec(self, name: str, path: Sequence[str] | None, target: Any = None) -> None:
        if name == "sounddevice":
            raise OSError("PortAudio library not found")


@pytest.mark.parametrize("missing", ["package", "portaudio"])
async def test_without_sounddevice_playback_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    """The default output stream, on a machine without sounddevice (or without the PortAudio
    library it loads), raises PlaybackUnavailable naming what to install; nothing is left
    reading the track."""
    if missing == "package":
        monkeypatch.setitem(sys.modules, "sounddevice", None)  # import raises ImportError
        cause: type[BaseException] = ImportError
    else:
        monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
        monkeypatch.setattr(sys, "meta_path", [_NoPortAudio(), *sys.meta_path])
        cause = OSError
    with pytest.raises(PlaybackUnavailable) as err:
        sounddevice_stream(lambda *a: None, 960, None, "low")
    assert isinstance(err.value, RuntimeError) and isinstance(err.value.__cause__, cause)
    assert "pip install 'medverse[playback]'" in str(err.value)
    assert "libportaudio2" in str(err.value)
    tone = tone_track(440, -30)
    tasks = len(asyncio.all_tasks())
    with pytest.raises(PlaybackUnavailable):
        AudioPlayer(tone)  # the default stream factory
    assert len(asyncio.all_tasks()) == tasks
    tone.stop()
