"""Property tests of pose quantization and the snapshot delta codec."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medverse.protocol.errors import ProtocolError
from medverse.protocol.quant import (
    POSITION_LIMIT_M,
    ROTATION_MAX,
    dequantize_positions,
    dequantize_rotations,
    quantize_positions,
    quantize_rotations,
    rotation_error_deg,
)
from medverse.protocol.snapshot import (
    MAX_SLOTS,
    SEGMENT_SHIFT,
    Snapshot,
    SnapshotDecoder,
    SnapshotEncoder,
    WorldEncoder,
)
from medverse.protocol.vectors.generate import snapshot_to_json
from tests.test_vectors import Refused, SpecState, spec_decode

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- quantization

coord = st.floats(-POSITION_LIMIT_M, POSITION_LIMIT_M, allow_nan=False)
positions = st.lists(coord, min_size=3, max_size=3)
component = st.floats(-1.0, 1.0, allow_nan=False)
quaternions = st.one_of(
    st.lists(component, min_size=4, max_size=4).filter(lambda q: np.linalg.norm(q) > 1e-3),
    # Near ties between the largest components, where the dropped index is decided.
    st.tuples(
        st.permutations([0.5, 0.5, 0.5, 0.5]),
        st.lists(st.floats(-1e-6, 1e-6), min_size=4, max_size=4),
        st.lists(st.sampled_from([1.0, -1.0]), min_size=4, max_size=4),
    ).map(lambda t: [(a + d) * s for a, d, s in zip(*t, strict=True)]),
    st.tuples(
        st.permutations([np.sqrt(0.5), np.sqrt(0.5), 0.0, 0.0]),
        st.lists(st.floats(-1e-6, 1e-6), min_size=4, max_size=4),
    ).map(lambda t: [a + d for a, d in zip(*t, strict=True)]),
)


@FAST
@given(st.lists(positions, min_size=1, max_size=8))
def test_position_round_trip_error_at_most_half_a_millimetre(pos: list[list[float]]) -> None:
    p = np.array(pos)
    mm = quantize_positions(p)
    assert (np.abs(mm) <= 10_000_000).all()
    err = np.abs(dequantize_positions(mm) - p)
    assert (err <= 0.0005 + 1e-9).all()


@FAST
@given(st.lists(quaternions, min_size=1, max_size=8))
def test_rotation_round_trip_error_below_two_tenths_of_a_degree(quats: list[list[float]]) -> None:
    q = np.array(quats)
    index, codes = quantize_rotations(q)
    assert ((index >= 0) & (index <= 3)).all()
    assert ((codes >= 0) & (codes <= ROTATION_MAX)).all()
    back = dequantize_rotations(index, codes)
    np.testing.assert_allclose(np.linalg.norm(back, axis=-1), 1.0, atol=1e-12)
    assert (rotation_error_deg(q, back) <= 0.2).all()


@FAST
@given(st.lists(quaternions, min_size=1, max_size=8))
def test_q_and_minus_q_give_identical_codes(quats: list[list[float]]) -> None:
    q = np.array(quats)
    i1, c1 = quantize_rotations(q)
    i2, c2 = quantize_rotations(-q)
    assert np.array_equal(i1, i2)
    assert np.array_equal(c1, c2)


def test_rotation_codes_are_stable_when_requantized() -> None:
    rng = np.random.default_rng(7)
    q = rng.normal(size=(2000, 4))
    index, codes = quantize_rotations(q)
    back = dequantize_rotations(index, codes)
    assert (rotation_error_deg(q, back) <= 0.2).all()
    i2, c2 = quantize_rotations(back)
    assert (rotation_error_deg(back, dequantize_rotations(i2, c2)) <= 0.2).all()


# --------------------------------------------------------------------------- snapshot streams


@dataclass
class _Ent:
    slots: int
    flags: int = 0
    present: np.ndarray = field(default_factory=lambda: np.zeros(0, np.bool_))
    pos: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))
    vel: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))
    idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    rot: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))
    vrot: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))


def _new_entity(rng: np.random.Generator) -> _Ent:
    n = int(rng.integers(1, MAX_SLOTS + 1)) if rng.random() < 0.3 else int(rng.choice([1, 3]))
    return _Ent(
        slots=n,
        flags=int(rng.integers(0, 256)) if rng.random() < 0.3 else 0,
        present=rng.random(n) < 0.8,
        pos=rng.integers(-5000, 5000, (n, 3)),
        vel=rng.integers(-20, 21, (n, 3)) * (rng.random((n, 1)) < 0.5),
        idx=rng.integers(0, 4, n).astype(np.uint8),
        rot=rng.integers(0, ROTATION_MAX + 1, (n, 3)),
        vrot=rng.integers(-3, 4, (n, 3)) * (rng.random((n, 1)) < 0.5),
    )


def _step_entity(e: _Ent, rng: np.random.Generator) -> None:
    n = e.slots
    toggle = rng.random(n) < 0.1
    e.present = e.present ^ toggle
    e.pos = e.pos + e.vel
    jump = rng.random(n) < 0.15
    e.pos[jump] += rng.integers(-3000, 3000, (int(jump.sum()), 3))
    accel = rng.random(n) < 0.2
    e.vel[accel] += rng.integers(-5, 6, (int(accel.sum()), 3))
    big = rng.random(n) < 0.02
    e.pos[big] = rng.integers(-10_000_000, 10_000_001, (int(big.sum()), 3))
    e.pos = np.clip(e.pos, -10_000_000, 10_000_000)
    e.rot = e.rot + e.vrot
    flip = rng.random(n) < 0.1
    e.idx[flip] = rng.integers(0, 4, int(flip.sum()))
    e.rot[flip] = rng.integers(0, ROTATION_MAX + 1, (int(flip.sum()), 3))
    e.rot = np.clip(e.rot, 0, ROTATION_MAX)
    if rng.random() < 0.1:
        e.flags = int(rng.integers(0, 256))


def random_stream(seed: int, n_ticks: int, n_ids: int = 10) -> list[tuple[int, Snapshot]]:
    """A sequence of (tick, snapshot) with motion, churn, slot count changes and absent rows."""
    rng = np.random.default_rng(seed)
    universe = np.unique(
        np.concatenate([rng.integers(0, 40, n_ids), rng.integers(0, 2**32, 2), [2**32 - 1]]).astype(
            np.uint64
        )
    )
    alive: dict[int, _Ent] = {}
    out = []
    tick = int(rng.integers(0, 2**32 - 2000))
    for t in range(n_ticks):
        for eid in universe.tolist():
            if eid in alive:
                if rng.random() < 0.1:
                    del alive[eid]
                elif rng.random() < 0.05:
                    alive[eid] = _new_entity(rng)  # same id, likely another slot count
                else:
                    _step_entity(alive[eid], rng)
            elif rng.random() < (0.6 if t == 0 else 0.1):
                alive[eid] = _new_entity(rng)
        out.append((tick, build_snapshot(alive)))
        r = rng.random()
        tick += 1 if r < 0.8 else int(rng.integers(2, 256)) if r < 0.95 else 300
    return out


def build_snapshot(alive: dict[int, _Ent], offset: int = 0) -> Snapshot:
    ids = sorted(alive)
    ents = [alive[i] for i in ids]
    if not ents:
        return Snapshot.empty()
    present = np.concatenate([e.present for e in ents])
    mask = present[:, None]
    return Snapshot(
        ids=np.array(ids, np.uint64) + np.uint64(offset),
        slots=np.array([e.slots for e in ents], np.uint8),
        flags=np.array([e.flags for e in ents], np.uint8),
        present=present.copy(),
        pos=np.where(mask, np.concatenate([e.pos for e in ents]), 0).astype(np.int64),
        rot_index=np.where(present, np.concatenate([e.idx for e in ents]), 0).astype(np.uint8),
        rot=np.where(mask, np.concatenate([e.rot for e in ents]), 0).astype(np.int64),
    )


seeds = st.integers(0, 2**63 - 1)


@FAST
@given(seeds, st.integers(2, 14))
def test_delta_round_trip_is_exact_under_churn(seed: int, n_ticks: int) -> None:
    enc, dec = SnapshotEncoder(), SnapshotDecoder()
    for tick, snap in random_stream(seed, n_ticks):
        frame = enc.encode(tick, snap)
        got = dec.decode(frame)
        assert got.equals(snap)
        assert dec.tick == tick


@FAST
@given(seeds, st.integers(3, 14), st.data())
def test_decoder_joining_from_keyframe_stays_in_sync(seed: int, n_ticks: int, data) -> None:
    stream = random_stream(seed, n_ticks)
    join_at = data.draw(st.integers(0, n_ticks - 2))
    enc, late = SnapshotEncoder(), SnapshotDecoder()
    for i, (tick, snap) in enumerate(stream):
        frame = enc.encode(tick, snap)
        if i == join_at:
            key = enc.keyframe()
            assert key[1] & 1
            assert late.decode(key).equals(snap)
        elif i > join_at:
            assert late.decode(frame).equals(snap)


@SLOW
@given(st.lists(seeds, min_size=2, max_size=4), st.integers(2, 10), st.data())
def test_world_encoder_bodies_match_separate_encoders(seeds_, n_ticks, data) -> None:
    n = len(seeds_)
    segs = sorted(data.draw(st.sets(st.integers(0, 2**32 - 1), min_size=n, max_size=n)))
    streams = [random_stream(s, n_ticks) for s in seeds_]
    world = WorldEncoder()
    separate = [SnapshotEncoder() for _ in segs]
    dec = [SnapshotDecoder() for _ in segs]
    keyframe_at = data.draw(st.integers(0, n_ticks - 1))
    for t in range(n_ticks):
        parts = [s[t][1] for s in streams]
        for p in parts:
            assert p.ids.size == 0 or int(p.ids[-1]) < 2**32
        combined = _concat(
            [_offset(p, seg << SEGMENT_SHIFT) for p, seg in zip(parts, segs, strict=True)]
        )
        got_segs, bodies = world.encode(combined)
        by_seg = dict(zip(got_segs.tolist(), bodies, strict=True))
        assert set(by_seg) <= set(segs)
        for k, seg in enumerate(segs):
            frame = separate[k].encode(t + 1, parts[k])
            if t == 0:
                assert frame[1] & 1  # the separate encoder starts with a keyframe
            else:
                assert frame[7:] == by_seg.get(seg, b"\xe0")
            assert dec[k].decode(frame).equals(parts[k])
        if t in (0, keyframe_at):
            keys = world.keyframes(segs)
            for k in range(len(segs)):
                assert keys[k] == separate[k].keyframe()[7:]


def _offset(s: Snapshot, base: int) -> Snapshot:
    ids = s.ids + np.uint64(base)
    return Snapshot(ids, s.slots, s.flags, s.present, s.pos, s.rot_index, s.rot)


def _concat(parts: list[Snapshot]) -> Snapshot:
    return Snapshot(
        ids=np.concatenate([p.ids for p in parts]),
        slots=np.concatenate([p.slots for p in parts]),
        flags=np.concatenate([p.flags for p in parts]),
        present=np.concatenate([p.present for p in parts]),
        pos=np.concatenate([p.pos for p in parts]),
        rot_index=np.concatenate([p.rot_index for p in parts]),
        rot=np.concatenate([p.rot for p in parts]),
    )


@SLOW
@given(seeds, st.integers(2, 10))
def test_scalar_decoder_written_from_the_spec_agrees(seed: int, n_ticks: int) -> None:
    enc = SnapshotEncoder()
    state = None
    for tick, snap in random_stream(seed, n_ticks):
        state = spec_decode(enc.encode(tick, snap), state)
        assert state.as_json() == snapshot_to_json(snap)


def test_empty_room_stream_round_trips() -> None:
    enc, dec = SnapshotEncoder(), SnapshotDecoder()
    for tick in range(5, 9):
        assert dec.decode(enc.encode(tick, Snapshot.empty())).equals(Snapshot.empty())


# --------------------------------------------------------------------------- garbage


class _Primed:
    """A decoder in the middle of a stream, plus the frame that should come next."""

    def __init__(self, seed: int) -> None:
        stream = random_stream(seed, 6)
        enc = SnapshotEncoder()
        self.frames = [enc.encode(t, s) for t, s in stream]
        self.snaps = [s for _, s in stream]
        self.dec = SnapshotDecoder()
        self.spec: SpecState | None = None  # the same stream, read by the spec decoder
        for f in self.frames[:-1]:
            self.dec.decode(f)
            self.spec = spec_decode(f, self.spec)
        self.state = self.dec._state
        self.next_frame = self.frames[-1]

    def assert_unchanged(self) -> None:
        assert self.dec._state is self.state
        assert copy.deepcopy(self.dec).decode(self.next_frame).equals(self.snaps[-1])


def _rejects(primed: _Primed, frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        primed.dec.decode(frame)
    primed.assert_unchanged()


def assert_decodes_as_specified(dec: SnapshotDecoder, spec: SpecState | None, frame: bytes) -> bool:
    """Apply ``frame`` to ``dec``, whose state is ``spec``, and check the outcome SPEC.md gives
    (decided by the scalar decoder written from the spec): refused with a ProtocolError and the
    state unchanged, or accepted with the state now at the frame's tick, with the specified
    snapshot and row velocities. Returns whether the frame was accepted."""
    before = dec._state
    try:
        expected = spec_decode(frame, spec)
    except Refused:
        with pytest.raises(ProtocolError):
            dec.decode(frame)
        assert dec._state is before
        return False
    snap = dec.decode(frame)
    assert snapshot_to_json(snap) == expected.as_json()
    assert dec.tick == expected.tick
    vpos, vrot = expected.velocities()
    assert dec._state is not None
    assert dec._state.vpos.tolist() == vpos
    assert dec._state.vrot.tolist() == vrot
    return True


def _as_specified(primed: _Primed, frame: bytes) -> None:
    """Garbage may be a valid frame; which it is, and what it decodes to, SPEC.md says."""
    if not assert_decodes_as_specified(primed.dec, primed.spec, frame):
        primed.assert_unchanged()
    assert_decodes_as_specified(SnapshotDecoder(), None, frame)


@FAST
@given(seeds, st.binary(max_size=64))
def test_random_bytes_decode_as_specified(seed: int, junk: bytes) -> None:
    _as_specified(_Primed(seed), junk)


@FAST
@given(seeds, st.binary(max_size=48), st.booleans())
def test_random_bodies_behind_a_valid_header(seed: int, body: bytes, key: bool) -> None:
    primed = _Primed(seed)
    header = primed.next_frame[:7] if not key else bytes([2, 1]) + primed.next_frame[2:6] + b"\0"
    _as_specified(primed, header + body)


@FAST
@given(seeds, st.data())
def test_truncated_frames_raise(seed: int, data) -> None:
    primed = _Primed(seed)
    frame = data.draw(st.sampled_from([primed.next_frame, primed.frames[0]]))
    cut = data.draw(st.integers(0, len(frame) - 1))
    _rejects(primed, frame[:cut])


@FAST
@given(seeds, st.binary(min_size=1, max_size=9))
def test_trailing_data_raises(seed: int, extra: bytes) -> None:
    primed = _Primed(seed)
    _rejects(primed, primed.next_frame + extra)
    key = SnapshotEncoder()
    key.encode(5, primed.snaps[0])
    _rejects(primed, key.keyframe() + extra)


@FAST
@given(seeds, st.data())
def test_bit_flips_decode_as_specified(seed: int, data) -> None:
    primed = _Primed(seed)
    frame = bytearray(primed.next_frame)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(frame) - 1))
        frame[i] ^= 1 << data.draw(st.integers(0, 7))
    _as_specified(primed, bytes(frame))


@FAST
@given(seeds, st.integers(1, 255))
def test_delta_against_a_baseline_not_held_raises(seed: int, gap: int) -> None:
    primed = _Primed(seed)
    frame = primed.next_frame
    if frame[1] & 1:  # the stream ended on a keyframe: give its body a delta header
        frame = bytes([2, 0]) + (primed.dec.tick + 1).to_bytes(4, "little") + b"\x01" + frame[7:]
    tick = int.from_bytes(frame[2:6], "little")
    wrong_gap = gap if tick - gap != primed.dec.tick else gap % 255 + 1
    _rejects(primed, frame[:6] + bytes([wrong_gap]) + frame[7:])
    # A decoder that holds nothing accepts no delta at all.
    fresh = SnapshotDecoder()
    with pytest.raises(ProtocolError):
        fresh.decode(frame)
    assert fresh.tick is None


def test_keyframe_with_a_baseline_gap_raises() -> None:
    primed = _Primed(3)
    enc = SnapshotEncoder()
    key = enc.encode(9, primed.snaps[0])
    _rejects(primed, key[:6] + b"\x01" + key[7:])
    _rejects(primed, b"\x03" + key[1:])


# --------------------------------------------------------------------------- receiver checks


def _eg0(values: list[int]) -> str:
    """An EG0 list as a bit string: every prefix, then every suffix (SPEC.md "Bit stream")."""
    codes = [bin(v + 1)[2:] for v in values]
    return "".join("0" * (len(c) - 1) + "1" for c in codes) + "".join(c[1:] for c in codes)


def _zz(v: int) -> int:
    """Zigzag: -(2**39) codes as 2**40 - 1, whose EG0 prefix has 40 zeros."""
    return 2 * v if v >= 0 else -2 * v - 1


def _keyframe(ids: list[int], present_values: list[int] | None = None, pad: str = "") -> bytes:
    """A keyframe of one-slot entities ``ids``: all absent, or (with the 9 values) the first
    one present with rotation code (3, 511, 511, 511)."""
    gaps = [b - a - 1 for a, b in zip([-1, *ids], ids, strict=False)]
    bits = _eg0([0, len(ids), 0]) + _eg0(gaps) + "0000" * len(ids)
    if present_values is None:
        bits += "00" * len(ids)
    else:
        bits += "10" + "00" * (len(ids) - 1)
        bits += f"{3 << 30 | 511 << 20 | 511 << 10 | 511:032b}"
        bits += _eg0([_zz(v) for v in present_values])
    bits += "0" * (-len(bits) % 8) + pad
    return bytes([2, 1, 5, 0, 0, 0, 0]) + int(bits, 2).to_bytes(len(bits) // 8, "big")


@pytest.mark.parametrize(
    ("frame", "accepted"),
    [
        pytest.param(_keyframe([2**32 - 1]), True, id="largest id"),
        pytest.param(_keyframe([2**32]), False, id="id over 32 bits"),
        pytest.param(_keyframe([7], [-(2**39), *[0] * 8]), True, id="40-zero prefix"),
        pytest.param(_keyframe([7], [-(2**40), *[0] * 8]), False, id="41-zero prefix"),
        pytest.param(_keyframe(list(range(4096))), True, id="4096 entities"),
        pytest.param(_keyframe(list(range(4097))), False, id="4097 entities"),
        # [0, 8] takes 25 bits, so 7 padding bits; [3] takes 16 bits, so a zero byte is 8.
        pytest.param(_keyframe([0, 8]), True, id="7 padding bits"),
        pytest.param(_keyframe([0, 8])[:-1] + b"\x01", False, id="a one in the padding"),
        pytest.param(_keyframe([3], pad="00000000"), False, id="8 padding bits"),
        pytest.param(b"\x02\xff" + _keyframe([7])[2:], True, id="reserved flag bits set"),
    ],
)
def test_receiver_check_boundaries(frame: bytes, accepted: bool) -> None:
    """Frames at the edges of SPEC.md's receiver checks: the reference decoder and the spec
    decoder agree, and on the outcome stated here."""
    assert assert_decodes_as_specified(SnapshotDecoder(), None, frame) is accepted
    primed = _Primed(5)
    assert assert_decodes_as_specified(primed.dec, primed.spec, frame) is accepted
