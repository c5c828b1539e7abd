"""The entity table: every room's quantized poses in one numpy struct-of-arrays.

Avatars and plugin entities (shared objects, ...) of all rooms of the process live in one table,
so one tick validates every pending pose in one vectorized batch and the world encoder encodes
every room in one pass. A row block belongs to one entity; its key ``segment << SEGMENT_SHIFT |
entity id`` sorts entities by room, then id, which is the order the state frames use.

Nothing here knows rooms, members or sockets: rows are handed out to owners (any object), and a
pose refused by validation is reported as its row's owner.
"""

from __future__ import annotations

import numpy as np

from medverse.protocol.messages import decode_pose_batch
from medverse.protocol.snapshot import MAX_SLOTS, SEGMENT_SHIFT, Snapshot


class EntityTable:
    """Row blocks of quantized poses, grown by doubling; rows are reused after being freed."""

    def __init__(self, capacity: int = 64) -> None:
        cap = capacity
        self._keys = np.zeros(cap, np.uint64)
        self._active = np.zeros(cap, np.bool_)
        self._slots = np.zeros(cap, np.uint8)
        self._flags = np.zeros(cap, np.uint8)
        self._present = np.zeros((cap, MAX_SLOTS), np.bool_)
        self._pos = np.zeros((cap, MAX_SLOTS, 3), np.int64)
        self._rot_index = np.zeros((cap, MAX_SLOTS), np.uint8)
        self._rot = np.zeros((cap, MAX_SLOTS, 3), np.int64)
        self._owners: list[object] = [None] * cap
        self._free: list[int] = list(range(cap - 1, -1, -1))
        self._layout: tuple[np.ndarray, np.ndarray] | None = None  # entity order, row gather
        # Latest unapplied pose frame per row, one dict per slot count (latest wins).
        self._pending: dict[int, dict[int, bytes]] = {}

    # ----------------------------------------------------------------- rows

    def alloc(self, segment: int, entity_id: int, slots: int, owner: object = None) -> int:
        """A new row block for entity ``entity_id`` of room ``segment``; all poses absent."""
        if not self._free:
            self._grow()
        i = self._free.pop()
        self._keys[i] = (segment << SEGMENT_SHIFT) | entity_id
        self._active[i] = True
        self._slots[i] = slots
        self._flags[i] = 0
        self._present[i] = False
        self._pos[i] = 0
        self._rot_index[i] = 0
        self._rot[i] = 0
        self._owners[i] = owner
        self._layout = None
        return i

    def free(self, row: int) -> None:
        """Take a row block out of the state (the entity disappears from every view)."""
        self._active[row] = False
        self._present[row] = False
        self._owners[row] = None
        self.discard_pending(row)
        self._free.append(row)
        self._layout = None

    def _grow(self) -> None:
        cap = self._keys.size
        for name in (
            "_keys",
            "_active",
            "_slots",
            "_flags",
            "_present",
            "_pos",
            "_rot_index",
            "_rot",
        ):
            a = getattr(self, name)
            b = np.zeros((cap * 2, *a.shape[1:]), a.dtype)
            b[:cap] = a
            setattr(self, name, b)
        self._owners.extend([None] * cap)
        self._free.extend(range(cap * 2 - 1, cap - 1, -1))

    # ----------------------------------------------------------------- writes

    def write(
        self,
        rows: np.ndarray,
        present: np.ndarray,
        pos: np.ndarray,
        rot_index: np.ndarray,
        rot: np.ndarray,
    ) -> None:
        """Set quantized pose rows (as ``protocol.quant`` produces them) of many entities of the
        same slot count at once: ``rows`` (N,), ``present`` (N, S), ``pos`` (N, S, 3),
        ``rot_index`` (N, S), ``rot`` (N, S, 3). The next tick sends the change."""
        n = present.shape[1]
        self._present[rows, :n] = present
        self._pos[rows, :n] = pos
        self._rot_index[rows, :n] = rot_index
        self._rot[rows, :n] = rot

    def hide(self, row: int) -> None:
        """Mark every pose of a row block absent and forget its pending input."""
        self._present[row] = False
        self.discard_pending(row)

    def set_shown(self, row: int, shown: bool) -> None:
        """Take a row block's entity out of the state (``shown`` False) or put it back, keeping
        the rows and their owner: a member who steps out disappears from every view, not only
        its poses, and comes back as the same entity."""
        if bool(self._active[row]) != shown:
            self._active[row] = shown
            self._layout = None

    def set_flags(self, row: int, flags: int) -> None:
        """Set an entity's 8 flag bits (e.g. ``FLAG_SPEAKING`` on an avatar)."""
        self._flags[row] = flags

    def flags(self, row: int) -> int:
        return int(self._flags[row])

    def poses(
        self, rows: np.ndarray, slot: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Quantized pose ``slot`` of rows, as of the last tick: present (N,), position mm
        (N, 3), rotation index (N,) and smallest-three components (N, 3)."""
        return (
            self._present[rows, slot],
            self._pos[rows, slot],
            self._rot_index[rows, slot],
            self._rot[rows, slot],
        )

    # ----------------------------------------------------------------- input

    def submit_pose(self, row: int, slots: int, frame: bytes) -> None:
        """Keep a structurally checked pose frame for ``row`` until the next tick (latest
        wins); its values are validated with every other pending frame in one batch."""
        d = self._pending.get(slots)
        if d is None:
            d = self._pending[slots] = {}
        d[row] = frame

    def discard_pending(self, row: int) -> None:
        for d in self._pending.values():
            d.pop(row, None)

    def apply_inputs(self) -> list[object]:
        """Validate and quantize all pending poses at once; returns the owners of rows whose
        frame was refused (NaN, infinity, absurd position, quaternion far from unit)."""
        refused: list[object] = []
        for slots, d in self._pending.items():
            if not d:
                continue
            idx = np.fromiter(d.keys(), np.int64, len(d))
            frames = list(d.values())
            d.clear()  # first: a batch that cannot be decoded must not wedge every later tick
            batch = decode_pose_batch(frames, slots)
            ok = batch.ok
            good = idx[ok]
            self._present[good, :slots] = batch.present[ok]
            self._pos[good, :slots] = batch.pos[ok]
            self._rot_index[good, :slots] = batch.rot_index[ok]
            self._rot[good, :slots] = batch.rot[ok]
            if not ok.all():
                refused.extend(self._owners[i] for i in idx[~ok].tolist())
        return refused

    # ----------------------------------------------------------------- state

    def snapshot(self) -> Snapshot:
        """Every active entity's quantized state now, in (room, entity id) order."""
        if self._layout is None:
            act = np.flatnonzero(self._active)
            order = act[np.argsort(self._keys[act], kind="stable")]
            used = np.arange(MAX_SLOTS) < self._slots[order][:, None]
            gather = (order[:, None] * MAX_SLOTS + np.arange(MAX_SLOTS))[used]
            self._layout = (order, gather)
        order, gather = self._layout
        return Snapshot(
            ids=self._keys[order],
            slots=self._slots[order],
            flags=self._flags[order],
            present=self._present.reshape(-1)[gather],
            pos=self._pos.reshape(-1, 3)[gather],
            rot_index=self._rot_index.reshape(-1)[gather],
            rot=self._rot.reshape(-1, 3)[gather],
        )
