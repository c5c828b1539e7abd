"""The mixer's arithmetic and the audio messages, without a server."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import av
import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medverse.protocol.audio import (
    AudioOffer,
    AudioRules,
    AudioSpeaking,
    audio_sections,
    offer_direction,
)
from medverse.protocol.catalog import CLIENT_MESSAGES, SERVER_MESSAGES
from medverse.protocol.errors import ProtocolError
from medverse.protocol.messages import (
    decode_message,
    encode_message,
)
from medverse.rtc import JitterFrame
from medverse.server.audio import MixCounters, MixTrack, Peer, RoomAudio, SpatialAudio
from medverse.server.audio.signaling import SpeakerInbox
from medverse.server.audio.spatial import (
    ITD_STEP,
    MAX_ITD,
    Spatial,
    dbfs,
    interaural_delays,
    keep_loudest,
    mix,
    mix_delayed,
    route_mask,
    spatial_gains,
)

from .helpers import RecordingLink

IDENTITY = np.array([[0.0, 0.0, 0.0, 1.0]])


def yaw(angle: float) -> np.ndarray:
    return np.array([[0.0, math.sin(angle / 2), 0.0, math.cos(angle / 2)]])


def gains_at(src: tuple[float, float, float], quat: np.ndarray = IDENTITY) -> np.ndarray:
    return spatial_gains(
        np.array([True]),
        np.zeros((1, 3)),
        quat,
        np.array([True]),
        np.array([src], dtype=np.float64),
        Spatial(1.0, 1.0, 20.0),
    )[0, 0]


def test_equal_power_panning_follows_the_head() -> None:
    left = gains_at((-2.0, 0.0, 0.0))
    assert left[0] == pytest.approx(0.5) and left[1] == pytest.approx(0.0, abs=1e-9)
    ahead = gains_at((0.0, 0.0, -1.0))
    assert ahead[0] == pytest.approx(ahead[1]) and np.sum(ahead**2) == pytest.approx(1.0)
    # Turned 90 degrees to the left, the source on the left is straight ahead.
    turned = gains_at((-2.0, 0.0, 0.0), yaw(math.pi / 2))
    assert turned[0] == pytest.approx(turned[1])
    # Equal power everywhere on a circle.
    for a in np.linspace(0, 2 * math.pi, 13):
        g = gains_at((3 * math.sin(a), 0.0, -3 * math.cos(a)))
        assert np.sum(g**2) == pytest.approx((1 / 3) ** 2)


def test_distance_model_and_cutoff() -> None:
    d = np.array([0.2, 1.0, 2.0, 4.0, 19.9, 20.1])
    src = np.stack([np.zeros_like(d), np.zeros_like(d), -d], axis=1)
    g = spatial_gains(
        np.array([True]), np.zeros((1, 3)), IDENTITY, np.ones(d.size, bool), src, Spatial()
    )[0]
    mono = np.sqrt(np.sum(g**2, axis=1))
    assert mono[:2] == pytest.approx([1.0, 1.0])
    assert mono[2:5] == pytest.approx(1.0 / np.array([2.0, 4.0, 19.9]))
    assert mono[5] == 0.0
    # Untracked heads are heard centred at the reference level.
    g2 = spatial_gains(
        np.array([False]), np.zeros((1, 3)), IDENTITY, np.array([True]), src[5:], Spatial()
    )
    assert g2[0, 0] == pytest.approx([math.sqrt(0.5)] * 2)


def test_routing_rules() -> None:
    n = 5
    zone = np.array([0, 0, 1, 1, 0], np.int32)
    broadcast = np.zeros(n, np.float32)
    whisper = np.full(n, -1, np.int64)
    ignore = np.zeros((n, n), bool)
    slots = np.arange(n)
    heard, fixed = route_mask(slots, slots, zone, broadcast, whisper, ignore)
    assert not heard.diagonal().any()  # nobody hears themselves
    assert heard[0, 1] and heard[2, 3] and not heard[0, 2] and not heard[2, 0]
    assert not fixed.any()
    broadcast[4] = 1.0
    whisper[1] = 3
    ignore[0, 4] = True
    heard, fixed = route_mask(slots, slots, zone, broadcast, whisper, ignore)
    assert heard[:, 4].tolist() == [False, True, True, True, False]  # 0 ignores 4
    assert heard[4, 0] is np.False_  # ... and so 4 does not hear 0 either
    assert heard[:, 1].tolist() == [False, False, False, True, False]  # whisper to 3 only
    assert fixed[:, 4].all() and fixed[:, 1].all()


def test_keep_loudest_and_mix() -> None:
    loud = np.array([[0.1, 0.5, 0.3, 0.5], [1.0, 0.0, 0.0, 0.2]])
    keep = keep_loudest(loud, 2)
    assert keep.sum(axis=1).tolist() == [2, 2]
    assert keep[0, 1] and keep[1, 0] and keep[1, 3]
    assert keep_loudest(loud, 0).all()
    frames = np.stack([np.full(960, 0.5, np.float32), np.full(960, -0.25, np.float32)])
    gains = np.array([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 2.0], [0.0, 0.0]]], np.float32)
    out = mix(gains, frames)
    assert out.shape == (2, 960, 2) and out.dtype == np.int16
    assert out[0, 0].tolist() == [16384, -8192]
    assert out[1, 0].tolist() == [32767, 32767]  # clipped, not wrapped
    assert dbfs([1.0, 0.1, 0.0]).tolist() == pytest.approx([0.0, -20.0, -120.0])


def test_sdp_helpers_and_messages() -> None:
    sdp = "v=0\r\nm=audio 9 X 96\r\na=recvonly\r\n"
    assert audio_sections(sdp) == ["audio"]
    assert offer_direction(sdp) == "recvonly"
    assert offer_direction("v=0\r\nm=audio 9 X 96\r\n") == "sendrecv"
    for msg, registry in (
        (AudioOffer(sdp, False), CLIENT_MESSAGES),
        (AudioRules((1, 2), (3, 50), (1, 3), (2,), ()), SERVER_MESSAGES),
        (AudioSpeaking((3, 1)), SERVER_MESSAGES),
    ):
        assert decode_message(encode_message(msg), registry, max_bytes=1 << 20) == msg
    bad = encode_message(AudioSpeaking((1,))).replace(b"\x91\x01", b"\x91\xc3")  # [true]
    assert isinstance(decode_message(bad, SERVER_MESSAGES), ProtocolError)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(st.integers(-(2**63), 2**64 - 1), st.booleans(), st.text(), st.none()),
        max_size=40,
    )
)
def test_int_lists_are_validated(values: list) -> None:
    frame = b"\x01" + msgpack.packb({"t": "audio_speaking", "members": values})
    out = decode_message(frame, SERVER_MESSAGES)
    ok = all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32 for v in values)
    assert isinstance(out, AudioSpeaking) == ok


def _room_audio(n: int, **settings: Any) -> tuple[RoomAudio, MixCounters, list[bytes]]:
    """A room's audio with ``n`` publishing members in a 2 m circle, its frame counters, and
    Opus packets of a -30 dBFS tone (no network: frames go straight into the speakers'
    inboxes). ``settings`` go to the server's configuration."""
    from medverse.server.auth import anonymous
    from medverse.server.clock import FixedRateClock
    from medverse.server.config import ServerConfig
    from medverse.server.entities import EntityTable
    from medverse.server.metrics import Traffic
    from medverse.server.room import Room, RoomServices

    cfg = ServerConfig(no_auth=True, **settings)
    service = SpatialAudio()
    table = EntityTable()
    services = RoomServices(cfg, table, FixedRateClock(1 / 30), Traffic(), lambda *a, **k: None)
    room = Room("r", 1, services, [service])
    ra = room.plugins[0]
    assert isinstance(ra, RoomAudio)
    codec = av.CodecContext.create("libopus", "w")
    codec.bit_rate = 32000
    codec.format = "s16"
    codec.layout = "stereo"
    codec.sample_rate = 48000
    t = np.arange(960 * 12) / 48000
    tone = (0.0316 * math.sqrt(2) * np.sin(2 * np.pi * 300 * t) * 32767).astype(np.int16)
    packets: list[bytes] = []
    for i in range(12):
        f = av.AudioFrame.from_ndarray(
            np.repeat(tone[i * 960 : (i + 1) * 960], 2).reshape(1, -1),
            format="s16",
            layout="stereo",
        )
        f.sample_rate = 48000
        f.pts = i * 960
        packets += [bytes(p) for p in codec.encode(f)]

    async def join_all() -> list[Any]:  # plugins' timers want a running loop
        return [room.join(anonymous(f"b{i}", "r", f"s{i}"), 3, RecordingLink()) for i in range(n)]

    for i, m in enumerate(asyncio.run(join_all())):
        s = ra.mix.slot_of[m.id]
        ra.mix.attach(s, SpeakerInbox())
        ra.peers[m.id] = Peer(None, MixTrack(64000), True)  # type: ignore[arg-type]
        a = 2 * math.pi * i / n
        table.write(
            np.array([m.row]),
            np.array([[True, False, False]]),
            np.array(
                [[[int(2000 * math.sin(a)), 1600, int(2000 * math.cos(a))], [0] * 3, [0] * 3]]
            ),
            np.zeros((1, 3), np.uint8),
            np.zeros((1, 3, 3), np.int64),
        )
    ra.test_room, ra.test_table = room, table  # for tests that change the membership
    return ra, service.counters, packets[-6:]


def _feed(ra: RoomAudio, packets: list[bytes], slots: list[int] | None = None, k: int = 0) -> None:
    for s, box in ra.mix.inboxes.items():
        assert isinstance(box, SpeakerInbox)
        if slots is None or s in slots:
            box.put((None, JitterFrame(packets[k % len(packets)], 0)))


def test_mixer_bounds_speaker_backlog_and_trims_standing_delay() -> None:
    ra, counters, packets = _room_audio(3)
    for k in range(10):
        _feed(ra, packets, k=k)
        jobs = ra.mix_frame(float(k), cap=0)
    assert len(jobs) == 3 and all(pcm.shape == (960, 2) for _, pcm in jobs)
    assert all(np.abs(pcm).max() > 100 for _, pcm in jobs)  # everyone hears the others
    assert counters.dropped_in == 0 and counters.trimmed == 0
    # A stalled sender catching up: six frames at once. Latency stays bounded (drops).
    for k in range(6):
        _feed(ra, packets, [0], k)
    _feed(ra, packets, [1, 2])
    ra.mix_frame(10.0, cap=0)
    mx = ra.mix
    assert counters.dropped_in >= 2
    assert mx.wpos[0] - mx.rpos[0] <= 3
    # One extra frame that stays for a whole window is trimmed away.
    mx._frames_in_window = 0
    mx.min_backlog[:] = 4
    _feed(ra, packets, [1])
    for k in range(60):
        _feed(ra, packets, k=k)
        ra.mix_frame(11.0 + k, cap=0)
    assert counters.trimmed >= 1
    assert (mx.wpos[:3] - mx.rpos[:3]).max() <= 1


def test_mixer_never_mixes_yourself_nor_a_server_muted_member() -> None:
    ra, _, packets = _room_audio(2)
    for k in range(5):  # only member 1 (slot 0) talks
        _feed(ra, packets, [0], k)
        jobs = dict((id(t), pcm) for t, pcm in ra.mix_frame(float(k), cap=0))
    own = jobs[id(ra.peers[1].out)]
    other = jobs[id(ra.peers[2].out)]
    assert not own.any()  # digital silence, not just quiet
    assert np.abs(other).max() > 100
    ra.mix.server_muted[0] = True
    _feed(ra, packets, [0])
    jobs = dict((id(t), pcm) for t, pcm in ra.mix_frame(6.0, cap=0))
    assert not jobs[id(ra.peers[2].out)].any()


def test_interaural_delay_on_the_far_ear() -> None:
    one = np.array([True])
    src = np.array([[-2.0 * math.sin(math.pi / 4), 0.0, -2.0 * math.cos(math.pi / 4)]])
    d = interaural_delays(one, np.zeros((1, 3)), IDENTITY, one, src)  # 45 degrees left
    want = round(MAX_ITD * math.sin(math.pi / 4) / ITD_STEP) * ITD_STEP
    assert d[0, 0].tolist() == [0, want]  # the right ear hears it later
    ahead = interaural_delays(one, np.zeros((1, 3)), IDENTITY, one, np.array([[0, 0, -2.0]]))
    assert ahead.tolist() == [[[0, 0]]]
    # An impulse reaches the left ear at once and the right ear ``want`` samples later; the
    # previous frame's tail carries a late sample across the frame boundary.
    history = np.zeros((1, MAX_ITD + 960), np.float32)
    history[0, MAX_ITD + 100] = 0.5
    history[0, MAX_ITD - 3] = 0.5  # 3 samples before this frame began
    gains = spatial_gains(one, np.zeros((1, 3)), IDENTITY, one, src, Spatial())
    out = mix_delayed(gains.astype(np.float32), d, history)
    left, right = out[0, :, 0], out[0, :, 1]
    assert np.flatnonzero(left).tolist() == [100]
    assert np.flatnonzero(right).tolist() == [want - 3, 100 + want]


def test_frames_their_sender_marks_silent_are_not_decoded() -> None:
    ra, counters, packets = _room_audio(2)
    inbox = ra.mix.inboxes[0]
    assert isinstance(inbox, SpeakerInbox)
    for k in range(3):
        frame = JitterFrame(packets[k], 0)
        frame.audio_level = -127  # type: ignore[attr-defined]
        inbox.put((None, frame))
        jobs = ra.mix_frame(float(k), cap=0)
    assert counters.silent_skipped == 3
    assert all(not pcm.any() for _, pcm in jobs)
    frame = JitterFrame(packets[3], 0)
    frame.audio_level = -30  # type: ignore[attr-defined]
    inbox.put((None, frame))
    jobs = ra.mix_frame(3.0, cap=0)
    assert counters.silent_skipped == 3 and any(pcm.any() for _, pcm in jobs)


def test_a_speaker_who_leaves_flags_nothing_else() -> None:
    """The speaking flag of a member who left is not written to its freed avatar row, which
    may already be another entity's."""
    from medverse.protocol.snapshot import FLAG_SPEAKING, OBJECT_ID_BASE

    ra, _, packets = _room_audio(2)
    for k in range(5):  # member 1 (slot 0) talks: its flag goes up
        _feed(ra, packets, [0], k)
        ra.mix_frame(float(k), cap=0)
    room, table = ra.test_room, ra.test_table
    first = room._members[1]
    assert table.flags(first.row) & FLAG_SPEAKING
    row = first.row

    async def leave() -> None:  # plugins close peers and set timers on the running loop
        room.leave(first, "left")

    asyncio.run(leave())
    other = table.alloc(9, OBJECT_ID_BASE + 1, 2)  # the freed row goes to another entity
    assert other == row
    for k in range(30):  # silence: the speaking flag would drop now
        ra.mix_frame(10.0 + k, cap=0)
    assert table.flags(other) == 0


def test_a_disconnected_member_is_neither_mixed_nor_heard_until_it_resumes() -> None:
    """A member whose connection dropped (it may resume) costs no mix and is heard by nobody;
    resumed on a new link, its WebRTC peer (which lived on) gets its mix again."""
    ra, _, packets = _room_audio(3)
    room = ra.test_room
    gone = room._members[1]
    link = gone.link

    async def drop() -> None:
        room.disconnected(gone, link)

    asyncio.run(drop())
    for k in range(5):  # only the dropped member (slot 0) talks
        _feed(ra, packets, [0], k)
        jobs = dict((id(t), pcm) for t, pcm in ra.mix_frame(float(k), cap=0))
    assert id(ra.peers[1].out) not in jobs and len(jobs) == 2  # no mix made for it
    assert all(not pcm.any() for pcm in jobs.values())  # and nobody hears it

    async def resume() -> None:
        room.reattach(gone, RecordingLink())

    asyncio.run(resume())
    for k in range(5):
        _feed(ra, packets, [0], k)
        jobs = dict((id(t), pcm) for t, pcm in ra.mix_frame(10.0 + k, cap=0))
    assert len(jobs) == 3 and np.abs(jobs[id(ra.peers[2].out)]).max() > 100
