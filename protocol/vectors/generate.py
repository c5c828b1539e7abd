"""Writes the protocol test vectors: ``python -m protocol.vectors.generate``.

``quantization.json``: float poses in, integer codes and dequantized values out.
``snapshots.json``: named sequences of quantized snapshots and the exact state frames that
:class:`protocol.SnapshotEncoder` produces for them. Both files are deterministic; the tests in
``tests/test_vectors.py`` check the codec against them byte for byte, in both directions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from medverse.protocol.quant import (
    POSITION_LIMIT_M,
    dequantize_positions,
    dequantize_rotations,
    quantize_positions,
    quantize_rotations,
)
from medverse.protocol.snapshot import Snapshot, SnapshotEncoder

HERE = Path(__file__).resolve().parent
H = math.sqrt(0.5)


# --------------------------------------------------------------------------- quantization


def _positions() -> list[list[float]]:
    lim = POSITION_LIMIT_M
    return [
        [0.0, 0.0, 0.0],
        [-0.0, 0.0004, -0.0004],
        [0.0005, -0.0005, 0.0015],
        [0.0025, -0.0025, 0.0006],
        [1.2345, -2.5, 0.1],
        [lim, -lim, 0.0],
        [lim - 0.0004, -lim + 0.0004, lim - 0.0005],
        [1.7, 1.0, -3.25],
    ]


def _quaternions() -> list[list[float]]:
    e = 1e-7
    fixed = [
        [0.0, 0.0, 0.0, 1.0],
        [0.0, 0.0, 0.0, -1.0],  # the same rotation, sign-flipped
        [1.0, 0.0, 0.0, 0.0],
        [0.0, -1.0, 0.0, 0.0],
        [H, 0.0, 0.0, H],  # two-way tie for the largest component
        [-H, 0.0, 0.0, -H],
        [H, 0.0, 0.0, -H],
        [0.5, 0.5, 0.5, 0.5],  # four-way tie
        [-0.5, -0.5, -0.5, -0.5],
        [0.5, -0.5, 0.5, -0.5],
        [0.5 + e, 0.5, 0.5, 0.5 - e],  # near ties: the tiny difference decides the index
        [0.5 - e, 0.5, 0.5, 0.5 + e],
        [0.5, 0.5 + e, -0.5, 0.5],
        [H + e, H - e, 0.0, 0.0],
        [0.1, 0.2, 0.3, 0.9],  # not unit: normalized first
        [-0.1, -0.2, -0.3, -0.9],
        [0.0, 0.0, 0.3826834323650898, 0.9238795325112867],  # 45 degrees about z
        [0.0, 0.0, -0.3826834323650898, -0.9238795325112867],
    ]
    rng = np.random.default_rng(20240601)
    rand = rng.normal(size=(12, 4))
    rand /= np.linalg.norm(rand, axis=1, keepdims=True)
    out = fixed + [[float(x) for x in q] for q in rand]
    out += [[-float(x) for x in q] for q in rand[:4]]
    return out


def quantization_vectors() -> dict[str, Any]:
    positions = _positions()
    quats = _quaternions()
    qpos = quantize_positions(np.array(positions))
    dpos = dequantize_positions(qpos)
    index, comps = quantize_rotations(np.array(quats))
    dq = dequantize_rotations(index, comps)
    return {
        "description": (
            "Pose quantization (SPEC.md, 'Pose quantization'). Positions: metres in, integer "
            "millimetres out, then back to metres. Rotations: (x, y, z, w) in; rot_index is the "
            "index of the dropped largest component, rot the three 10-bit codes of the others in "
            "ascending index order, packed = rot_index << 30 | rot[0] << 20 | rot[1] << 10 | "
            "rot[2]; dequantized is the unit quaternion rebuilt from the codes."
        ),
        "positions": [
            {"in": p, "mm": [int(v) for v in qp], "dequantized": [float(v) for v in dp]}
            for p, qp, dp in zip(positions, qpos, dpos, strict=True)
        ],
        "rotations": [
            {
                "in": q,
                "rot_index": int(i),
                "rot": [int(v) for v in c],
                "packed": (int(i) << 30) | (int(c[0]) << 20) | (int(c[1]) << 10) | int(c[2]),
                "dequantized": [float(v) for v in d],
            }
            for q, i, c, d in zip(quats, index, comps, dq, strict=True)
        ],
    }


# --------------------------------------------------------------------------- snapshots

# One entity: (id, flags, rows); a row is None (absent) or (x, y, z, rot_index, c0, c1, c2).
Row = tuple[int, int, int, int, int, int, int] | None
Entity = tuple[int, int, list[Row]]

IDENT = (3, 511, 511, 511)  # near-identity rotation: w dropped, x y z codes near zero


def snapshot_from(entities: list[Entity]) -> Snapshot:
    entities = sorted(entities, key=lambda e: e[0])
    rows = [r for _, _, rs in entities for r in rs]
    present = [r is not None for r in rows]
    full = [r if r is not None else (0, 0, 0, 0, 0, 0, 0) for r in rows]
    return Snapshot(
        ids=np.array([e[0] for e in entities], np.uint64),
        slots=np.array([len(e[2]) for e in entities], np.uint8),
        flags=np.array([e[1] for e in entities], np.uint8),
        present=np.array(present, np.bool_),
        pos=np.array([r[:3] for r in full], np.int64).reshape(-1, 3),
        rot_index=np.array([r[3] for r in full], np.uint8),
        rot=np.array([r[4:] for r in full], np.int64).reshape(-1, 3),
    )


def snapshot_to_json(s: Snapshot) -> dict[str, Any]:
    return {
        "ids": [int(v) for v in s.ids],
        "slots": [int(v) for v in s.slots],
        "flags": [int(v) for v in s.flags],
        "present": [int(v) for v in s.present],
        "pos": [[int(v) for v in r] for r in s.pos],
        "rot_index": [int(v) for v in s.rot_index],
        "rot": [[int(v) for v in r] for r in s.rot],
    }


def snapshot_from_json(d: dict[str, Any]) -> Snapshot:
    return Snapshot(
        ids=np.array(d["ids"], np.uint64),
        slots=np.array(d["slots"], np.uint8),
        flags=np.array(d["flags"], np.uint8),
        present=np.array(d["present"], np.bool_),
        pos=np.array(d["pos"], np.int64).reshape(-1, 3),
        rot_index=np.array(d["rot_index"], np.uint8),
        rot=np.array(d["rot"], np.int64).reshape(-1, 3),
    )


def _r(x: int, y: int, z: int, rot: tuple[int, int, int, int] = IDENT) -> Row:
    return (x, y, z, *rot)


# A case is a list of steps: (tick, entities) encodes a tick; ("keyframe",) asks the encoder
# for a keyframe of the last encoded tick, as a member joining mid-stream gets.
Step = tuple[int, list[Entity]] | tuple[str]


def _avatar(eid: int, x: int, flags: int = 0, rot: tuple[int, int, int, int] = IDENT) -> Entity:
    """Head and two hands."""
    return (eid, flags, [_r(x, 1600, 0, rot), _r(x - 250, 1100, 150), _r(x + 250, 1100, 150)])


def _cases() -> list[tuple[str, str, list[Step]]]:
    prop = (42, 0, [_r(500, 900, -1200, (3, 600, 400, 520))])
    moving = [(7, 1, [_r(1000 + 10 * t, 1600, -5 * t)]) for t in range(5)]
    return [
        (
            "keyframe",
            "First frame: a keyframe of a one-slot prop and a three-slot avatar with one hand "
            "absent and a flag set.",
            [
                (
                    100,
                    [
                        prop,
                        (3, 2, [_r(0, 1600, 0), None, _r(250, 1100, 150, (0, 500, 520, 530))]),
                    ],
                )
            ],
        ),
        (
            "empty_room",
            "An empty room: keyframe, then a delta with nothing in it.",
            [(1, []), (2, [])],
        ),
        (
            "no_change",
            "Nothing moves: one changed bit (0) per entity.",
            [(10, [prop, _avatar(3, 0)]), (11, [prop, _avatar(3, 0)])],
        ),
        (
            "steady_motion",
            "An entity moving at constant velocity: the first delta sets the velocity "
            "(RESIDUAL), the next ones are predicted exactly (changed bit 0).",
            [(t + 1, [moving[t]]) for t in range(4)],
        ),
        (
            "residual_motion",
            "Accelerating position and a turning rotation: RESIDUAL rows every tick.",
            [
                (50, [_avatar(9, 0)]),
                (51, [_avatar(9, 3, rot=(3, 512, 511, 510))]),
                (52, [_avatar(9, 9, rot=(3, 514, 510, 508))]),
                (53, [_avatar(9, 18, rot=(3, 513, 511, 508))]),
            ],
        ),
        (
            "rotation_index_change",
            "The largest quaternion component changes: ABSOLUTE row, rotation velocity reset.",
            [
                (7, [(5, 0, [_r(0, 0, 0, (3, 1000, 511, 511))])]),
                (8, [(5, 0, [_r(1, 0, 0, (3, 1010, 511, 511))])]),
                (9, [(5, 0, [_r(2, 0, 0, (0, 12, 511, 511))])]),
                (10, [(5, 0, [_r(3, 0, 0, (0, 12, 511, 511))])]),
            ],
        ),
        (
            "pose_disappears_and_reappears",
            "A hand loses tracking (ABSENT), stays absent (SAME), comes back (ABSOLUTE).",
            [
                (20, [_avatar(4, 0)]),
                (21, [(4, 0, [_r(0, 1600, 0), None, _r(250, 1100, 150)])]),
                (22, [(4, 0, [_r(0, 1600, 0), None, _r(250, 1100, 150)])]),
                (23, [(4, 0, [_r(0, 1600, 0), _r(-240, 1120, 160), _r(250, 1100, 150)])]),
            ],
        ),
        (
            "join_and_leave",
            "Entities join and leave inside deltas; entity 8 changes its slot count (removed "
            "and added again in one frame); entity 4294967295 uses the largest id.",
            [
                (30, [prop, _avatar(3, 0), (8, 0, [_r(10, 20, 30)])]),
                (
                    31,
                    [
                        _avatar(3, 0),
                        _avatar(8, 100, flags=4),
                        (4294967295, 0, [_r(-7, -8, -9), None]),
                    ],
                ),
                (32, [_avatar(3, 0), (12, 1, [None]), (4294967295, 0, [_r(-7, -8, -9), None])]),
                (33, []),
            ],
        ),
        (
            "flag_changes",
            "Flags change on some entities while poses stay put.",
            [
                (60, [(1, 0, [_r(0, 0, 0)]), (2, 5, [_r(1, 1, 1)]), (6, 0, [_r(2, 2, 2)])]),
                (61, [(1, 3, [_r(0, 0, 0)]), (2, 5, [_r(1, 1, 1)]), (6, 255, [_r(2, 2, 2)])]),
                (62, [(1, 0, [_r(0, 0, 0)]), (2, 0, [_r(1, 1, 1)]), (6, 255, [_r(2, 2, 2)])]),
            ],
        ),
        (
            "late_join",
            "A keyframe taken mid-stream carries the velocities, so the deltas that follow "
            "apply to it.",
            [(t + 200, [moving[t]]) for t in range(3)]
            + [("keyframe",), (203, [moving[3]]), (204, [moving[4]])],
        ),
        (
            "tick_gap_resets",
            "A tick gap over 255 cannot be a delta: the encoder sends a keyframe.",
            [(1000, [prop]), (1001, [prop]), (1300, [prop]), (1301, [prop])],
        ),
    ]


def snapshot_vectors() -> dict[str, Any]:
    cases = []
    for name, description, steps in _cases():
        enc = SnapshotEncoder()
        out_steps = []
        last: Snapshot | None = None
        for step in steps:
            if step[0] == "keyframe":
                assert last is not None and enc.tick is not None
                frame = enc.keyframe()
                out_steps.append(
                    {
                        "action": "keyframe",
                        "tick": enc.tick,
                        "snapshot": snapshot_to_json(last),
                        "frame": frame.hex(),
                    }
                )
                continue
            tick, entities = step
            assert isinstance(tick, int) and isinstance(entities, list)
            last = snapshot_from(entities)
            frame = enc.encode(tick, last)
            out_steps.append(
                {
                    "action": "encode",
                    "tick": tick,
                    "snapshot": snapshot_to_json(last),
                    "frame": frame.hex(),
                }
            )
        cases.append({"name": name, "description": description, "steps": out_steps})
    return {
        "description": (
            "State frames (SPEC.md, 'State frames'). Each case runs one encoder from scratch: "
            "'encode' steps give the snapshot encoded at that tick and the exact frame; "
            "'keyframe' steps give the encoder's keyframe of the last encoded tick. Feeding "
            "every frame of a case in order to one decoder yields each step's snapshot. Rows "
            "are flattened in entity order then slot order; absent rows carry zeros."
        ),
        "cases": cases,
    }


def write(directory: Path = HERE) -> list[Path]:
    paths = []
    for name, data in (
        ("quantization.json", quantization_vectors()),
        ("snapshots.json", snapshot_vectors()),
    ):
        path = directory / name
        path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write():
        print(p)
