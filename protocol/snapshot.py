"""The snapshot delta codec: a room's quantized entity states at tick T against a baseline.

Layout and prediction are specified in ``protocol/SPEC.md`` (section "State frames"). In short:
each pose row keeps a velocity (its change over the last tick) and is predicted to move on by
it; a delta sends, per row, whether the prediction held, and otherwise Exp-Golomb coded
residuals. Entities at rest and entities in steady motion cost one bit per tick. Every step works
on whole arrays; nothing loops over entities in Python.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .bits import BitReader, exp_golomb_fields, pack_bits, unzigzag, zigzag
from .errors import ErrorCode, ProtocolError
from .quant import ROTATION_BITS, ROTATION_MAX

FRAME_STATE = 0x02
FLAG_KEYFRAME = 0x01
#: Most pose slots one entity may have (head + hands today; full-body rigs fit too).
MAX_SLOTS = 16
#: Largest entity id on the wire.
MAX_ENTITY_ID = (1 << 32) - 1
#: Composite ids of the world encoder: segment (room) in the high bits.
SEGMENT_SHIFT = 32
#: Entity ids from here up are shared objects; below are members' avatars.
OBJECT_ID_BASE = 1 << 31
#: Entity flag bits (the codec carries flags opaquely; these are their meanings).
FLAG_SPEAKING = 0x01  # an avatar whose member is talking now
#: Refuse to decode frames describing more than this many entities or pose rows.
MAX_ENTITIES = 4096

MODE_SAME = 0  # the row equals its prediction (or stays absent)
MODE_RESIDUAL = 1  # position and rotation residuals against the prediction follow
MODE_ABSOLUTE = 2  # the rotation is sent whole; the position residual follows
MODE_ABSENT = 3  # the pose disappears

_HEADER = struct.Struct("<BBIB")  # frame kind, flags, tick, baseline gap
HEADER_SIZE = _HEADER.size
_SLOT_BITS = 4  # slot count - 1
_MODE_BITS = 2
_ROT_ABS_BITS = 2 + 3 * ROTATION_BITS
# Body of a delta for a room that is empty at both ticks: counts 0, 0, 0 ("111"), zero padded.
_EMPTY_BODY = b"\xe0"

I64 = npt.NDArray[np.int64]


@dataclass(eq=False, slots=True)
class Snapshot:
    """Quantized world state: entities in ascending id order, their pose rows flattened.

    ``slots[i]`` rows belong to entity ``ids[i]``; rows follow entity order, then slot order.
    Absent rows carry zeros.
    """

    ids: npt.NDArray[np.uint64]
    slots: npt.NDArray[np.uint8]
    flags: npt.NDArray[np.uint8]
    present: npt.NDArray[np.bool_]
    pos: npt.NDArray[np.int64]  # (R, 3) millimetres
    rot_index: npt.NDArray[np.uint8]  # (R,) index of the dropped largest component
    rot: npt.NDArray[np.int64]  # (R, 3) smallest-three codes

    @classmethod
    def empty(cls) -> Snapshot:
        return cls(
            ids=np.zeros(0, np.uint64),
            slots=np.zeros(0, np.uint8),
            flags=np.zeros(0, np.uint8),
            present=np.zeros(0, np.bool_),
            pos=np.zeros((0, 3), np.int64),
            rot_index=np.zeros(0, np.uint8),
            rot=np.zeros((0, 3), np.int64),
        )

    @property
    def row_start(self) -> I64:
        """First row of each entity."""
        return np.cumsum(self.slots, dtype=np.int64) - self.slots

    def rows_of(self, entity_id: int) -> slice | None:
        """Row slice of one entity, or None if it is not in the snapshot."""
        i = int(np.searchsorted(self.ids, entity_id))
        if i >= self.ids.size or int(self.ids[i]) != entity_id:
            return None
        start = int(self.row_start[i])
        return slice(start, start + int(self.slots[i]))

    def equals(self, other: Snapshot) -> bool:
        """Exact equality of every array (absent rows compare as zeros)."""
        return (
            np.array_equal(self.ids, other.ids)
            and np.array_equal(self.slots, other.slots)
            and np.array_equal(self.flags, other.flags)
            and np.array_equal(self.present, other.present)
            and np.array_equal(self.pos, other.pos)
            and np.array_equal(self.rot_index, other.rot_index)
            and np.array_equal(self.rot, other.rot)
        )


@dataclass(eq=False, slots=True)
class _CodecState:
    """What encoder and decoder both track: the last snapshot, its tick and row velocities."""

    tick: int
    snap: Snapshot
    vpos: I64  # (R, 3)
    vrot: I64  # (R, 3)


@dataclass(slots=True)
class _Mapping:
    """How the entities of a new snapshot relate to those of the baseline."""

    kept: npt.NDArray[np.bool_]  # per new entity: it was in the baseline with the same slots
    removed_ids: npt.NDArray[np.uint64]
    added_ids: npt.NDArray[np.uint64]
    added_slots: npt.NDArray[np.uint8]
    row_src: I64  # per new row: row in the baseline, or -1
    row_entity: I64 = field(default_factory=lambda: np.zeros(0, np.int64))


def _map_rows(old: Snapshot, ids: npt.NDArray[np.uint64], slots: npt.NDArray[np.uint8]) -> _Mapping:
    row_entity = np.repeat(np.arange(ids.size, dtype=np.int64), slots)
    if np.array_equal(old.ids, ids) and np.array_equal(old.slots, slots):
        return _Mapping(
            kept=np.ones(ids.size, np.bool_),
            removed_ids=np.zeros(0, np.uint64),
            added_ids=np.zeros(0, np.uint64),
            added_slots=np.zeros(0, np.uint8),
            row_src=np.arange(row_entity.size, dtype=np.int64),
            row_entity=row_entity,
        )
    where = np.searchsorted(old.ids, ids)
    where_c = np.minimum(where, max(old.ids.size - 1, 0))
    in_old = (
        (where < old.ids.size) & (old.ids[where_c] == ids)
        if old.ids.size
        else np.zeros(ids.size, np.bool_)
    )
    kept = in_old & (old.slots[where_c] == slots) if old.ids.size else in_old
    kept_old = np.zeros(old.ids.size, np.bool_)
    kept_old[where_c[kept]] = True
    old_start = old.row_start
    new_start = np.cumsum(slots, dtype=np.int64) - slots
    slot_of_row = np.arange(row_entity.size, dtype=np.int64) - new_start[row_entity]
    src = (
        old_start[where_c[row_entity]] + slot_of_row
        if old.ids.size
        else np.zeros(row_entity.size, np.int64)
    )
    row_src = np.where(kept[row_entity], src, -1)
    return _Mapping(
        kept=kept,
        removed_ids=old.ids[~kept_old],
        added_ids=ids[~kept],
        added_slots=slots[~kept],
        row_src=row_src,
        row_entity=row_entity,
    )


def _read_id_list(r: BitReader, count: int) -> npt.NDArray[np.uint64]:
    gaps = r.exp_golomb_values(r.exp_golomb_lengths(count)).astype(np.int64)
    ids = np.cumsum(gaps + 1) - 1
    if ids.size and int(ids[-1]) > MAX_ENTITY_ID:
        raise ProtocolError(ErrorCode.OUT_OF_RANGE, "entity id too large")
    return ids.astype(np.uint64)


# Section order inside one segment's bit stream (see SPEC.md). Exp-Golomb coded lists take two
# sections: all unary prefixes, then all suffixes.
_S_COUNTS, _S_REMOVED, _S_ADDED, _S_SLOTS = 0, 2, 4, 6
_S_FLAG_INDEX, _S_FLAG_VALUE, _S_CHANGED, _S_MODES = 7, 9, 10, 11
_S_ROT_ABS, _S_RESIDUAL, _S_PAD = 12, 13, 15
_N_SECTIONS = 16


class _Fields:
    """Fields of many segments' bit streams, packed in one pass and split per segment."""

    __slots__ = ("keys", "values", "widths")

    def __init__(self) -> None:
        self.keys: list[I64] = []
        self.values: list[npt.NDArray[np.uint64]] = []
        self.widths: list[I64] = []

    def fixed(self, seg: I64, section: int, values: npt.ArrayLike, width: int) -> None:
        v = np.asarray(values, dtype=np.uint64).ravel()
        self.keys.append(seg * _N_SECTIONS + section)
        self.values.append(v)
        self.widths.append(np.full(v.size, width, np.int64))

    def exp_golomb(self, seg: I64, section: int, unsigned: npt.ArrayLike) -> None:
        pv, pw, sv, sw = exp_golomb_fields(unsigned)
        self.keys += [seg * _N_SECTIONS + section, seg * _N_SECTIONS + section + 1]
        self.values += [pv, sv]
        self.widths += [pw, sw]

    def gaps(self, seg: I64, section: int, local: I64) -> None:
        """Ascending values per segment as gaps: first value, then value - previous - 1."""
        prev = np.empty_like(local)
        prev[:1] = -1
        prev[1:] = local[:-1]
        prev[np.r_[True, seg[1:] != seg[:-1]] if seg.size else np.zeros(0, np.bool_)] = -1
        self.exp_golomb(seg, section, (local - prev - 1).astype(np.uint64))

    def pack(self, n_segments: int) -> list[bytes]:
        keys = np.concatenate(self.keys)
        widths = np.concatenate(self.widths)
        seg_bits = np.bincount(keys // _N_SECTIONS, weights=widths, minlength=n_segments)
        pad = (-seg_bits.astype(np.int64)) % 8
        keys = np.concatenate([keys, np.arange(n_segments) * _N_SECTIONS + _S_PAD])
        widths = np.concatenate([widths, pad])
        values = np.concatenate([*self.values, np.zeros(n_segments, np.uint64)])
        order = np.argsort(keys, kind="stable")
        blob = pack_bits(values[order], widths[order])
        ends = np.cumsum((seg_bits.astype(np.int64) + pad) // 8)
        starts = ends - (seg_bits.astype(np.int64) + pad) // 8
        return [blob[a:b] for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]


def _zero_velocity(snap: Snapshot) -> tuple[I64, I64]:
    n = snap.present.size
    return np.zeros((n, 3), np.int64), np.zeros((n, 3), np.int64)


def _pack_rotation(index: npt.NDArray[np.uint8], rot: I64) -> npt.NDArray[np.uint64]:
    r = rot.astype(np.uint64)
    b = np.uint64(ROTATION_BITS)
    packed: npt.NDArray[np.uint64] = (
        (index.astype(np.uint64) << (b * np.uint64(3)))
        | (r[:, 0] << (b * np.uint64(2)))
        | (r[:, 1] << b)
        | r[:, 2]
    )
    return packed


def _unpack_rotation(packed: npt.NDArray[np.uint64]) -> tuple[npt.NDArray[np.uint8], I64]:
    b = np.uint64(ROTATION_BITS)
    mask = np.uint64(ROTATION_MAX)
    rot = np.stack(
        [(packed >> (b * np.uint64(2))) & mask, (packed >> b) & mask, packed & mask], axis=1
    ).astype(np.int64)
    return (packed >> (b * np.uint64(3))).astype(np.uint8), rot


def segment_of(ids: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """Segment (room) part of composite entity ids."""
    return ids >> np.uint64(SEGMENT_SHIFT)


def _encode_bodies(
    old: Snapshot,
    old_vpos: I64,
    old_vrot: I64,
    new: Snapshot,
    segments: npt.NDArray[np.uint64],
    keyframe_velocity: tuple[I64, I64] | None,
) -> tuple[list[bytes], I64, I64]:
    """Bit-stream bodies of ``segments`` describing ``new`` against ``old``; new velocities.

    With ``keyframe_velocity`` the old state must be empty and the velocities are written out.
    """
    m = _map_rows(old, new.ids, new.slots)
    n_rows = new.present.size
    src = m.row_src
    has_src = src >= 0
    srcc = np.where(has_src, src, 0)
    if old.present.size:
        was = old.present[srcc] & has_src
        old_pos = old.pos[srcc]
        old_rot = old.rot[srcc]
        px = np.where(was[:, None], old_pos + old_vpos[srcc], 0)
        pr = np.where(was[:, None], old_rot + old_vrot[srcc], 0)
        same_index = was & (old.rot_index[srcc] == new.rot_index)
    else:
        was = same_index = np.zeros(n_rows, np.bool_)
        old_pos = old_rot = px = pr = np.zeros((n_rows, 3), np.int64)
    now = new.present
    exact = (new.pos == px).all(axis=1) & (new.rot == pr).all(axis=1)
    modes = np.where(
        now,
        np.where(same_index, np.where(exact, MODE_SAME, MODE_RESIDUAL), MODE_ABSOLUTE),
        np.where(was, MODE_ABSENT, MODE_SAME),
    )

    ent_k = np.searchsorted(segments, segment_of(new.ids)).astype(np.int64)
    rem_k = np.searchsorted(segments, segment_of(m.removed_ids)).astype(np.int64)
    add_k = np.searchsorted(segments, segment_of(m.added_ids)).astype(np.int64)
    row_k = ent_k[m.row_entity]
    n_seg = segments.size
    local_mask = np.uint64(MAX_ENTITY_ID)

    row_changed = modes != MODE_SAME
    ent_changed = np.bincount(m.row_entity, weights=row_changed, minlength=new.ids.size) > 0
    kept_idx = np.flatnonzero(m.kept)
    flag_changed = ~m.kept & (new.flags != 0)
    if kept_idx.size:
        old_ent = np.searchsorted(old.ids, new.ids[kept_idx])
        flag_changed[kept_idx] = old.flags[old_ent] != new.flags[kept_idx]
    flag_idx = np.flatnonzero(flag_changed)
    flag_k = ent_k[flag_idx]
    seg_first_entity = np.searchsorted(ent_k, np.arange(n_seg))

    f = _Fields()
    counts = np.stack(
        [
            np.bincount(rem_k, minlength=n_seg),
            np.bincount(add_k, minlength=n_seg),
            np.bincount(flag_k, minlength=n_seg),
        ],
        axis=1,
    )
    f.exp_golomb(np.repeat(np.arange(n_seg), 3), _S_COUNTS, counts.astype(np.uint64))
    f.gaps(rem_k, _S_REMOVED, (m.removed_ids & local_mask).astype(np.int64))
    f.gaps(add_k, _S_ADDED, (m.added_ids & local_mask).astype(np.int64))
    f.fixed(add_k, _S_SLOTS, m.added_slots.astype(np.uint64) - 1, _SLOT_BITS)
    f.gaps(flag_k, _S_FLAG_INDEX, flag_idx - seg_first_entity[flag_k])
    f.fixed(flag_k, _S_FLAG_VALUE, new.flags[flag_idx], 8)
    f.fixed(ent_k[kept_idx], _S_CHANGED, ent_changed[kept_idx], 1)
    sent_rows = (ent_changed | ~m.kept)[m.row_entity]
    f.fixed(row_k[sent_rows], _S_MODES, modes[sent_rows], _MODE_BITS)
    absolute = sent_rows & (modes == MODE_ABSOLUTE)
    f.fixed(
        row_k[absolute],
        _S_ROT_ABS,
        _pack_rotation(new.rot_index[absolute], new.rot[absolute]),
        _ROT_ABS_BITS,
    )

    both = was & now
    if keyframe_velocity is None:
        res = np.concatenate([new.pos - px, new.rot - pr], axis=1)
        take = np.empty((n_rows, 6), np.bool_)
        take[:, :3] = (sent_rows & ((modes == MODE_RESIDUAL) | (modes == MODE_ABSOLUTE)))[:, None]
        take[:, 3:] = (sent_rows & (modes == MODE_RESIDUAL))[:, None]
        vpos = np.where(both[:, None], new.pos - old_pos, 0)
        vrot = np.where((both & same_index)[:, None], new.rot - old_rot, 0)
    else:
        vpos, vrot = keyframe_velocity
        res = np.concatenate([new.pos, vpos, vrot], axis=1)
        take = np.broadcast_to(now[:, None], res.shape)
    val_k = np.broadcast_to(row_k[:, None], res.shape)[take]
    f.exp_golomb(val_k, _S_RESIDUAL, zigzag(res[take]))
    return f.pack(n_seg), vpos, vrot


def state_header(tick: int, gap: int, keyframe: bool) -> bytes:
    """The 7-byte header of a state frame (gap is 0 for keyframes)."""
    return _HEADER.pack(FRAME_STATE, FLAG_KEYFRAME if keyframe else 0, tick, gap)


def state_tick(frame: bytes | bytearray | memoryview) -> int:
    """The tick in a state frame's header, for receivers that count frames without decoding
    them (the frame must be at least the 7 header bytes; nothing else is checked)."""
    return int(_HEADER.unpack_from(frame)[2])


class WorldEncoder:
    """Encodes every room of a server in one vectorized pass.

    Entity ids are composite: ``segment << 32 | entity``, a segment being one room's stream.
    Each :meth:`encode` call yields, for every segment present now or in the previous call, the
    body of its delta frame against the previous call; :meth:`keyframes` yields the bodies a
    new or resynced member needs to join those streams.
    """

    def __init__(self) -> None:
        self._snap = Snapshot.empty()
        self._vpos, self._vrot = _zero_velocity(self._snap)

    @property
    def snapshot(self) -> Snapshot:
        return self._snap

    def encode(self, snap: Snapshot) -> tuple[npt.NDArray[np.uint64], list[bytes]]:
        """Delta bodies for every segment in ``snap`` or in the previous snapshot."""
        segments = np.union1d(segment_of(snap.ids), segment_of(self._snap.ids))
        bodies, self._vpos, self._vrot = _encode_bodies(
            self._snap, self._vpos, self._vrot, snap, segments, None
        )
        self._snap = snap
        return segments, bodies

    def keyframes(self, segments: npt.ArrayLike) -> list[bytes]:
        """Keyframe bodies of the last encoded state for the given segments (ascending)."""
        segs = np.asarray(segments, dtype=np.uint64)
        snap = self._snap
        keep = np.isin(segment_of(snap.ids), segs)
        rows = keep[np.repeat(np.arange(snap.ids.size), snap.slots)]
        sub = Snapshot(
            snap.ids[keep],
            snap.slots[keep],
            snap.flags[keep],
            snap.present[rows],
            snap.pos[rows],
            snap.rot_index[rows],
            snap.rot[rows],
        )
        empty = Snapshot.empty()
        bodies, _, _ = _encode_bodies(
            empty, *_zero_velocity(empty), sub, segs, (self._vpos[rows], self._vrot[rows])
        )
        return bodies


class SnapshotEncoder:
    """One room's stream: :meth:`encode` gives each tick's delta frame, :meth:`keyframe` the
    frame a new or resynced member needs. Entity ids must be below 2**32.
    """

    def __init__(self) -> None:
        self._world = WorldEncoder()
        self._tick: int | None = None

    @property
    def tick(self) -> int | None:
        return self._tick

    def encode(self, tick: int, snap: Snapshot) -> bytes:
        """Encode ``snap`` at ``tick`` against the previous tick (a keyframe the first time)."""
        if not 0 <= tick <= 0xFFFFFFFF:
            raise ValueError("tick out of range")
        if snap.ids.size and int(snap.ids[-1]) > MAX_ENTITY_ID:
            raise ValueError("entity id out of range")
        prev = self._tick
        if prev is None or not 0 < tick - prev <= 255:
            self._world = WorldEncoder()
            self._world.encode(snap)
            self._tick = tick
            return self.keyframe()
        _, bodies = self._world.encode(snap)
        self._tick = tick
        return state_header(tick, tick - prev, False) + (bodies[0] if bodies else _EMPTY_BODY)

    def keyframe(self) -> bytes:
        """The last encoded tick as a keyframe (carrying velocities so deltas can follow)."""
        if self._tick is None:
            raise RuntimeError("nothing encoded yet")
        return state_header(self._tick, 0, True) + self._world.keyframes([0])[0]


class SnapshotDecoder:
    """Client side: applies keyframes and deltas, keeping the same state as the encoder."""

    def __init__(self) -> None:
        self._state: _CodecState | None = None

    @property
    def tick(self) -> int | None:
        return None if self._state is None else self._state.tick

    @property
    def snapshot(self) -> Snapshot:
        return Snapshot.empty() if self._state is None else self._state.snap

    def reset(self) -> None:
        """Forget everything; the next frame must be a keyframe."""
        self._state = None

    def decode(self, frame: bytes | memoryview) -> Snapshot:
        """Apply one state frame; return the new snapshot. Raises :class:`ProtocolError`.

        On error the decoder's state is unchanged.
        """
        try:
            return self._decode(frame)
        except ProtocolError:
            raise
        except (ValueError, IndexError, OverflowError, struct.error) as exc:
            raise ProtocolError(ErrorCode.MALFORMED, f"bad state frame: {exc}") from None

    def _decode(self, frame: bytes | memoryview) -> Snapshot:
        if len(frame) < HEADER_SIZE:
            raise ProtocolError(ErrorCode.MALFORMED, "state frame shorter than its header")
        kind, flags, tick, gap = _HEADER.unpack_from(frame)
        if kind != FRAME_STATE:
            raise ProtocolError(ErrorCode.MALFORMED, "not a state frame")
        r = BitReader(memoryview(frame)[HEADER_SIZE:])
        keyframe = bool(flags & FLAG_KEYFRAME)
        prev = self._state
        if keyframe:
            if gap != 0:
                raise ProtocolError(ErrorCode.MALFORMED, "keyframe with a baseline")
            old = Snapshot.empty()
        else:
            if prev is None or gap == 0 or (tick - gap) != prev.tick:
                raise ProtocolError(ErrorCode.MALFORMED, "delta against a baseline we do not hold")
            old = prev.snap
        counts = r.exp_golomb_values(r.exp_golomb_lengths(3)).astype(np.int64)
        n_removed, n_added, n_flags = (int(c) for c in counts)
        if n_removed > old.ids.size or n_added > MAX_ENTITIES or n_flags > MAX_ENTITIES:
            raise ProtocolError(ErrorCode.OUT_OF_RANGE, "entity counts out of range")
        if keyframe and n_removed:
            raise ProtocolError(ErrorCode.MALFORMED, "keyframe removes entities")
        removed = _read_id_list(r, n_removed)
        added = _read_id_list(r, n_added)
        added_slots = (r.fixed(n_added, _SLOT_BITS) + np.uint64(1)).astype(np.uint8)
        if removed.size and not np.isin(removed, old.ids).all():
            raise ProtocolError(ErrorCode.MALFORMED, "removes an unknown entity")
        keep_old = ~np.isin(old.ids, removed)
        if np.isin(added, old.ids[keep_old]).any():
            raise ProtocolError(ErrorCode.MALFORMED, "adds an entity that exists")
        ids = np.concatenate([old.ids[keep_old], added])
        slots = np.concatenate([old.slots[keep_old], added_slots])
        order = np.argsort(ids, kind="stable")
        ids, slots = ids[order], slots[order]
        if ids.size > MAX_ENTITIES:
            raise ProtocolError(ErrorCode.OUT_OF_RANGE, "too many entities")
        m = _map_rows(old, ids, slots)
        kept = m.kept
        flags_arr = np.zeros(ids.size, np.uint8)
        if kept.any():
            flags_arr[kept] = old.flags[np.searchsorted(old.ids, ids[kept])]
        flag_idx = (
            np.cumsum(r.exp_golomb_values(r.exp_golomb_lengths(n_flags)).astype(np.int64) + 1) - 1
        )
        flag_val = r.fixed(n_flags, 8).astype(np.uint8)
        if flag_idx.size and int(flag_idx[-1]) >= ids.size:
            raise ProtocolError(ErrorCode.MALFORMED, "flag update for a missing entity")
        flags_arr[flag_idx] = flag_val

        kept_idx = np.flatnonzero(kept)
        changed = np.ones(ids.size, np.bool_)
        changed[kept_idx] = r.fixed(kept_idx.size, 1).astype(np.bool_)
        sent_rows = changed[m.row_entity]
        n_rows = m.row_entity.size
        modes = np.zeros(n_rows, np.int64)
        modes[sent_rows] = r.fixed(int(sent_rows.sum()), _MODE_BITS).astype(np.int64)

        src = m.row_src
        has_src = src >= 0
        srcc = np.where(has_src, src, 0)
        if prev is not None and not keyframe and old.present.size:
            was = old.present[srcc] & has_src
            old_pos = old.pos[srcc]
            old_rot = old.rot[srcc]
            px = np.where(was[:, None], old_pos + prev.vpos[srcc], 0)
            pr = np.where(was[:, None], old_rot + prev.vrot[srcc], 0)
            old_index = old.rot_index[srcc]
        else:
            was = np.zeros(n_rows, np.bool_)
            old_pos = old_rot = px = pr = np.zeros((n_rows, 3), np.int64)
            old_index = np.zeros(n_rows, np.uint8)
        if keyframe and ((modes == MODE_RESIDUAL) | (modes == MODE_ABSENT)).any():
            raise ProtocolError(ErrorCode.MALFORMED, "keyframe with relative rows")
        if ((modes == MODE_RESIDUAL) & ~was).any() or ((modes == MODE_ABSENT) & ~was).any():
            raise ProtocolError(ErrorCode.MALFORMED, "relative row without a baseline pose")

        absolute = modes == MODE_ABSOLUTE
        n_abs = int(absolute.sum())
        abs_index, abs_rot = _unpack_rotation(r.fixed(n_abs, _ROT_ABS_BITS))
        if n_abs and int(abs_index.max()) > 3:
            raise ProtocolError(ErrorCode.OUT_OF_RANGE, "rotation index out of range")

        present = np.where(modes == MODE_SAME, was, modes != MODE_ABSENT)
        rot_index = np.where(present, old_index, 0).astype(np.uint8)
        rot_index[absolute] = abs_index
        if keyframe:
            cols = 9
            take = np.zeros((n_rows, cols), np.bool_)
            take[present] = True
        else:
            cols = 6
            take = np.zeros((n_rows, cols), np.bool_)
            take[:, :3] = ((modes == MODE_RESIDUAL) | absolute)[:, None]
            take[:, 3:] = (modes == MODE_RESIDUAL)[:, None]
        n_vals = int(take.sum())
        vals = unzigzag(r.exp_golomb_values(r.exp_golomb_lengths(n_vals)))
        r.check_padding()
        res = np.zeros((n_rows, cols), np.int64)
        res[take] = vals
        pos = np.where(present[:, None], px + res[:, :3], 0)
        rot = np.where(present[:, None], pr + res[:, 3:6], 0)
        rot[absolute] = abs_rot
        if keyframe:
            vpos = res[:, 3:6]
            vrot = res[:, 6:9]
        else:
            same_index = was & present & (old_index == rot_index)
            vpos = np.where((was & present)[:, None], pos - old_pos, 0)
            vrot = np.where(same_index[:, None], rot - old_rot, 0)
        if ((rot < 0) | (rot > ROTATION_MAX)).any():
            raise ProtocolError(ErrorCode.OUT_OF_RANGE, "rotation code out of range")
        snap = Snapshot(ids, slots, flags_arr, present, pos, rot_index, rot)
        self._state = _CodecState(tick, snap, vpos, vrot)
        return snap
