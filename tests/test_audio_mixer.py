"""The mixer's arithmetic and the audio messages, without a server."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.audio import (
    AudioOffer,
    AudioRules,
    AudioSpeaking,
    audio_sections,
    offer_direction,
)
from protocol.errors import ProtocolError
from protocol.messages import CLIENT_MESSAGES, SERVER_MESSAGES, decode_message, encode_message
from protocol.rtc import parse_addresses
from server.mixer import Spatial, dbfs, keep_loudest, mix, route_mask, spatial_gains

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
    assert parse_addresses(" 127.0.0.1 ,::1") == ("127.0.0.1", "::1")
    with pytest.raises(ValueError):
        parse_addresses("localhost")
    with pytest.raises(ValueError):
        parse_addresses(" , ")


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
