"""The committed test vectors, checked byte for byte in both directions.

Besides the codec itself, the frames are decoded by a small scalar decoder written from
``protocol/SPEC.md`` alone, so the specification and the implementation cannot drift apart.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medverse.protocol.quant import (
    dequantize_positions,
    dequantize_rotations,
    quantize_positions,
    quantize_rotations,
)
from medverse.protocol.snapshot import SnapshotDecoder, SnapshotEncoder
from medverse.protocol.vectors import generate

VECTORS = Path(generate.__file__).resolve().parent
QUANT = json.loads((VECTORS / "quantization.json").read_text(encoding="utf-8"))
SNAPS = json.loads((VECTORS / "snapshots.json").read_text(encoding="utf-8"))
CASES = {c["name"]: c for c in SNAPS["cases"]}


def test_committed_vectors_are_what_the_generator_writes(tmp_path: Path) -> None:
    for path in generate.write(tmp_path):
        committed = (VECTORS / path.name).read_text(encoding="utf-8")
        assert path.read_text(encoding="utf-8") == committed, f"regenerate {path.name}"


def test_vectors_cover_the_required_cases() -> None:
    names = set(CASES)
    for name in (
        "keyframe",
        "no_change",
        "steady_motion",
        "residual_motion",
        "rotation_index_change",
        "pose_disappears_and_reappears",
        "join_and_leave",
        "flag_changes",
        "late_join",
    ):
        assert name in names
    slots = {s for c in SNAPS["cases"] for st in c["steps"] for s in st["snapshot"]["slots"]}
    assert {1, 3} <= slots


# --------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("vec", QUANT["positions"], ids=lambda v: str(v["in"]))
def test_position_vector(vec: dict[str, Any]) -> None:
    mm = quantize_positions(np.array(vec["in"]))
    assert mm.tolist() == vec["mm"]
    assert dequantize_positions(np.array(vec["mm"])).tolist() == vec["dequantized"]


@pytest.mark.parametrize("vec", QUANT["rotations"], ids=lambda v: str(v["in"]))
def test_rotation_vector(vec: dict[str, Any]) -> None:
    index, comps = quantize_rotations(np.array(vec["in"]))
    assert int(index) == vec["rot_index"]
    assert comps.tolist() == vec["rot"]
    packed = vec["rot_index"] << 30 | vec["rot"][0] << 20 | vec["rot"][1] << 10 | vec["rot"][2]
    assert packed == vec["packed"]
    deq = dequantize_rotations(np.array(vec["rot_index"]), np.array(vec["rot"]))
    np.testing.assert_allclose(deq, vec["dequantized"], rtol=0, atol=1e-12)
    # The formulas of SPEC.md, written out with scalars.
    h = math.sqrt(0.5)
    c = [code * (2 * h / 1023) - h for code in vec["rot"]]
    largest = math.sqrt(max(0.0, 1.0 - sum(x * x for x in c)))
    q = c[:]
    q.insert(vec["rot_index"], largest)
    norm = math.sqrt(sum(x * x for x in q))
    np.testing.assert_allclose([x / norm for x in q], vec["dequantized"], rtol=0, atol=1e-12)


def test_sign_flipped_quaternions_share_codes() -> None:
    by_input = {tuple(v["in"]): (v["rot_index"], v["rot"]) for v in QUANT["rotations"]}
    flipped = 0
    for q, code in by_input.items():
        neg = tuple(-x for x in q)
        if neg in by_input:
            assert by_input[neg] == code
            flipped += 1
    assert flipped >= 8


# --------------------------------------------------------------------------- snapshots


def _snap_json(s: Any) -> dict[str, Any]:
    return generate.snapshot_to_json(s)


@pytest.mark.parametrize("case", SNAPS["cases"], ids=lambda c: c["name"])
def test_snapshot_case_encodes_exactly(case: dict[str, Any]) -> None:
    enc = SnapshotEncoder()
    for step in case["steps"]:
        if step["action"] == "keyframe":
            frame = enc.keyframe()
        else:
            frame = enc.encode(step["tick"], generate.snapshot_from_json(step["snapshot"]))
        assert frame.hex() == step["frame"]


@pytest.mark.parametrize("case", SNAPS["cases"], ids=lambda c: c["name"])
def test_snapshot_case_decodes_exactly(case: dict[str, Any]) -> None:
    dec = SnapshotDecoder()
    for step in case["steps"]:
        snap = dec.decode(bytes.fromhex(step["frame"]))
        assert _snap_json(snap) == step["snapshot"]
        assert dec.tick == step["tick"]
    # A fresh decoder joining at any keyframe of the case follows the rest of it.
    steps = case["steps"]
    for i, step in enumerate(steps):
        if not bytes.fromhex(step["frame"])[1] & 1:
            continue
        late = SnapshotDecoder()
        for later in steps[i:]:
            assert _snap_json(late.decode(bytes.fromhex(later["frame"]))) == later["snapshot"]


@pytest.mark.parametrize("case", SNAPS["cases"], ids=lambda c: c["name"])
def test_snapshot_case_with_spec_decoder(case: dict[str, Any]) -> None:
    state: SpecState | None = None
    for step in case["steps"]:
        state = spec_decode(bytes.fromhex(step["frame"]), state)
        assert state.tick == step["tick"]
        assert state.as_json() == step["snapshot"]


def test_worked_example_of_the_spec() -> None:
    frames = [s["frame"] for s in CASES["steady_motion"]["steps"]]
    assert frames[1] == "02000200000001f431ea80"
    assert frames[2] == "02000300000001e0"


# --------------------------------------------------------------------------- SPEC decoder


class Refused(Exception):
    """The frame fails one of the receiver checks of SPEC.md ("Receiver checks")."""


#: SPEC.md bounds: entities per frame, zeros in an Exp-Golomb prefix.
MAX_ENTITIES = 4096
MAX_PREFIX_ZEROS = 40


class Bits:
    def __init__(self, data: bytes) -> None:
        self.bits = "".join(f"{b:08b}" for b in data)
        self.pos = 0

    def fixed(self, n: int) -> int:
        if self.pos + n > len(self.bits):
            raise Refused("the stream ends before a section is complete")
        v = int(self.bits[self.pos : self.pos + n] or "0", 2)
        self.pos += n
        return v

    def eg0_list(self, n: int) -> list[int]:
        lengths = []
        for _ in range(n):
            zeros = 0
            while self.fixed(1) == 0:
                zeros += 1
                if zeros > MAX_PREFIX_ZEROS:
                    raise Refused("a prefix longer than 40 zeros")
            lengths.append(zeros)
        return [(1 << z) + self.fixed(z) - 1 for z in lengths]

    def gaps(self, n: int) -> list[int]:
        out: list[int] = []
        for g in self.eg0_list(n):
            out.append(g if not out else out[-1] + g + 1)
        return out


def unzigzag(z: int) -> int:
    return z >> 1 if z % 2 == 0 else -((z + 1) >> 1)


Row = dict[str, Any]  # present, pos, idx, rot, vpos, vrot


class SpecState:
    def __init__(self, tick: int, ents: list[tuple[int, int, int]], rows: list[list[Row]]):
        self.tick = tick
        self.ents = ents  # (id, slots, flags), ascending id
        self.rows = rows  # per entity, per slot

    def as_json(self) -> dict[str, Any]:
        flat = [r for rs in self.rows for r in rs]
        return {
            "ids": [e[0] for e in self.ents],
            "slots": [e[1] for e in self.ents],
            "flags": [e[2] for e in self.ents],
            "present": [int(r["present"]) for r in flat],
            "pos": [r["pos"] for r in flat],
            "rot_index": [r["idx"] for r in flat],
            "rot": [r["rot"] for r in flat],
        }

    def velocities(self) -> tuple[list[list[int]], list[list[int]]]:
        """Every row's ``vpos`` and ``vrot``, in row order."""
        flat = [r for rs in self.rows for r in rs]
        return [r["vpos"] for r in flat], [r["vrot"] for r in flat]


def _absent() -> Row:
    zero = [0, 0, 0]
    return {"present": False, "pos": zero, "idx": 0, "rot": zero, "vpos": zero, "vrot": zero}


def spec_decode(frame: bytes, state: SpecState | None) -> SpecState:
    """The state after applying ``frame`` to ``state``, read the way SPEC.md says, one bit at a
    time; raises :class:`Refused` for every frame a receiver must reject. ``state`` is never
    modified."""
    if len(frame) < 7 or frame[0] != 2:
        raise Refused("not a state frame")
    flags, tick, gap = frame[1], int.from_bytes(frame[2:6], "little"), frame[6]
    key = bool(flags & 1)  # bits 1-7 are reserved and ignored
    if key:
        if gap != 0:
            raise Refused("a keyframe with a gap")
        base = SpecState(tick, [], [])
    else:
        if gap == 0 or state is None or tick - gap != state.tick:
            raise Refused("a delta against a baseline not held")
        base = state
    r = Bits(frame[7:])
    n_removed, n_added, n_flags = r.eg0_list(3)
    if n_removed > len(base.ents) or n_added > MAX_ENTITIES or n_flags > MAX_ENTITIES:
        raise Refused("counts out of range")
    if key and n_removed:
        raise Refused("a keyframe removes entities")
    removed = r.gaps(n_removed)
    added = r.gaps(n_added)
    if any(i > 2**32 - 1 for i in removed + added):
        raise Refused("an id above 2**32 - 1")
    added_slots = [r.fixed(4) + 1 for _ in range(n_added)]
    old = {e[0]: (e, rows) for e, rows in zip(base.ents, base.rows, strict=True)}
    if any(i not in old for i in removed):
        raise Refused("removes an id not in the baseline")
    slots_of = {i: old[i][0][1] for i in old if i not in removed}
    if any(i in slots_of for i in added):
        raise Refused("adds a remaining baseline entity")
    slots_of.update(zip(added, added_slots, strict=True))
    ids = sorted(slots_of)
    if len(ids) > MAX_ENTITIES:
        raise Refused("too many entities")
    # Kept: in the baseline with the same slot count. That includes an id removed and added
    # again with its slot count, which no encoder sends and receivers must not rely on; SPEC.md
    # says the reference decoder reads it as kept, and so does this one.
    kept = [i in old and old[i][0][1] == slots_of[i] for i in ids]
    flag_vals = [old[i][0][2] if k else 0 for i, k in zip(ids, kept, strict=True)]
    flag_idx = r.gaps(n_flags)
    if flag_idx and flag_idx[-1] >= len(ids):
        raise Refused("a flag index beyond the entities")
    for i in flag_idx:
        flag_vals[i] = r.fixed(8)
    changed = [r.fixed(1) if k else 1 for k in kept]
    modes = [
        [r.fixed(2) if c else 0 for _ in range(slots_of[i])]
        for i, c in zip(ids, changed, strict=True)
    ]
    rows: list[list[Row]] = []
    n_values = 0
    for i, k, ms in zip(ids, kept, modes, strict=True):
        ent_rows = []
        for slot, mode in enumerate(ms):
            src = old[i][1][slot] if k else _absent()
            was = src["present"]
            pp = [a + b for a, b in zip(src["pos"], src["vpos"], strict=True)] if was else [0] * 3
            rp = [a + b for a, b in zip(src["rot"], src["vrot"], strict=True)] if was else [0] * 3
            i0 = src["idx"] if was else 0
            row = _absent()
            row.update(src=src, was=was, pp=pp, rp=rp, i0=i0, mode=mode)
            if mode in (1, 3) and (key or not was):
                raise Refused("a RESIDUAL or ABSENT row without a baseline pose")
            if mode == 0:
                if was:
                    row.update(present=True, pos=pp, rot=rp, idx=i0)
            elif mode == 1:
                row.update(present=True, idx=i0)
                n_values += 6
            elif mode == 2:
                row.update(present=True)  # its rotation comes from the next section
                n_values += 3
            ent_rows.append(row)
        rows.append(ent_rows)
    flat = [row for ent_rows in rows for row in ent_rows]
    for row in flat:
        if row["mode"] == 2:
            packed = r.fixed(32)
            row["idx"] = packed >> 30
            row["rot"] = [(packed >> 20) & 1023, (packed >> 10) & 1023, packed & 1023]
    if key:
        n_values = 9 * sum(row["present"] for row in flat)
    values = iter([unzigzag(z) for z in r.eg0_list(n_values)])
    rest = r.bits[r.pos :]
    if len(rest) >= 8 or "1" in rest:
        raise Refused("data after the last section")
    for row in flat:
        take = lambda n: [next(values) for _ in range(n)]  # noqa: E731
        if key:
            if row["present"]:
                row["pos"], row["vpos"], row["vrot"] = take(3), take(3), take(3)
            continue
        if row["mode"] == 1:
            row["pos"] = [a + b for a, b in zip(row["pp"], take(3), strict=True)]
            row["rot"] = [a + b for a, b in zip(row["rp"], take(3), strict=True)]
        elif row["mode"] == 2:
            row["pos"] = [a + b for a, b in zip(row["pp"], take(3), strict=True)]
        src = row["src"]
        if row["was"] and row["present"]:
            row["vpos"] = [a - b for a, b in zip(row["pos"], src["pos"], strict=True)]
            if row["idx"] == src["idx"]:
                row["vrot"] = [a - b for a, b in zip(row["rot"], src["rot"], strict=True)]
    if not all(0 <= c <= 1023 for row in flat for c in row["rot"]):
        raise Refused("a rotation code outside 0..1023")
    ents = [(i, slots_of[i], f) for i, f in zip(ids, flag_vals, strict=True)]
    return SpecState(tick, ents, rows)
