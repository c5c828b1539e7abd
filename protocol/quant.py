"""Pose quantization: positions in whole millimetres, rotations by smallest-three in 10 bits.

Everything here works on whole arrays (any leading shape) so the server quantizes a room's
inputs in one call.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

#: Positions are integers in this unit (metres per step): 1 mm.
POSITION_STEP_M = 0.001
#: Largest accepted absolute coordinate, metres. Anything beyond is an absurd position.
POSITION_LIMIT_M = 10_000.0
#: Bits per smallest-three component.
ROTATION_BITS = 10
ROTATION_MAX = (1 << ROTATION_BITS) - 1
#: Accepted quaternion norms; outside this a rotation is garbage, not rounding noise.
QUAT_NORM_MIN = 0.9
QUAT_NORM_MAX = 1.1

_HALF_SQRT2 = float(np.sqrt(0.5))
# The three component indices that are sent, for each index of the dropped largest component.
_OTHERS = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]], dtype=np.intp)
# Floor/ceil offsets of the three sent components, tried when quantizing a rotation.
_CORNERS = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=np.float64)

FloatArray = npt.NDArray[np.floating]
IntArray = npt.NDArray[np.integer]


def quantize_positions(pos: FloatArray) -> npt.NDArray[np.int32]:
    """Metres (..., 3) to integer millimetres (..., 3); callers validate the range first."""
    return np.rint(np.asarray(pos, dtype=np.float64) / POSITION_STEP_M).astype(np.int32)


def dequantize_positions(qpos: IntArray) -> npt.NDArray[np.float64]:
    """Integer millimetres (..., 3) to metres."""
    return np.asarray(qpos, dtype=np.float64) * POSITION_STEP_M


def quantize_rotations(
    quat: FloatArray,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int32]]:
    """Quaternions (..., 4) as (x, y, z, w) to smallest-three: (index (...), components (..., 3)).

    The quaternion is normalized, then negated if its largest component is negative, so ``q``
    and ``-q`` (the same rotation) give identical codes. Plain rounding of each component leaves
    up to 0.24 degrees of error, because the dropped component is rebuilt from the other three;
    so of the eight floor/ceil combinations we keep the one closest to the true rotation, which
    bounds the error at about 0.15 degrees with the same 10 bits.
    """
    q4 = np.asarray(quat, dtype=np.float64)
    lead = q4.shape[:-1]
    q = q4.reshape(-1, 4)
    q = q / np.sqrt(np.einsum("ij,ij->i", q, q))[:, None]
    n = q.shape[0]
    rows = np.arange(n)
    index = np.argmax(np.abs(q), axis=1)
    big = q[rows, index]
    sign = np.where(big < 0, -1.0, 1.0)
    big = big * sign  # the dropped component, made non-negative
    others = _OTHERS[index]
    scale = 2 * _HALF_SQRT2 / ROTATION_MAX
    # Component-major (3, n) arrays: numpy is slow at reducing a tiny last axis.
    comps = q[rows[None, :], others.T] * sign
    base = np.maximum(np.floor((comps + _HALF_SQRT2) / scale), 0.0)
    # The eight floor/ceil candidates of each component: (3, n, 8).
    cands = np.minimum(base[:, :, None] + _CORNERS.T[:, None, :], ROTATION_MAX)
    # Closeness |<decoded, q>| of each candidate, in the space of the sent components: the
    # decoded quaternion is (c, sqrt(1 - |c|^2)), or c / |c| when |c| > 1.
    c = cands * scale - _HALF_SQRT2
    s = c[0] * c[0] + c[1] * c[1] + c[2] * c[2]
    rebuilt = np.sqrt(np.maximum(1.0 - s, 0.0))
    dot = (
        c[0] * comps[0][:, None]
        + c[1] * comps[1][:, None]
        + c[2] * comps[2][:, None]
        + rebuilt * big[:, None]
    )
    best = np.argmax(np.abs(dot) / np.sqrt(np.maximum(s, 1.0)), axis=1)
    codes = cands[:, rows, best].T.reshape(*lead, 3)
    index = index.reshape(lead)
    return index.astype(np.uint8), codes.astype(np.int32)


def dequantize_rotations(index: IntArray, comps: IntArray) -> npt.NDArray[np.float64]:
    """Smallest-three codes back to unit quaternions (..., 4) with a non-negative largest part."""
    idx = np.asarray(index, dtype=np.intp)
    c = np.asarray(comps, dtype=np.float64) * (2 * _HALF_SQRT2 / ROTATION_MAX) - _HALF_SQRT2
    largest = np.sqrt(np.clip(1.0 - np.sum(c * c, axis=-1), 0.0, None))
    out = np.empty((*idx.shape, 4), dtype=np.float64)
    np.put_along_axis(out, idx[..., None], largest[..., None], axis=-1)
    np.put_along_axis(out, _OTHERS[idx], c, axis=-1)
    # Rounding can push the three over unit length; renormalize so callers always get unit quats.
    unit: npt.NDArray[np.float64] = out / np.linalg.norm(out, axis=-1, keepdims=True)
    return unit


def validate_poses(pos: FloatArray, quat: FloatArray) -> npt.NDArray[np.bool_]:
    """True where a pose is finite, inside the position limit and has a plausible quaternion.

    Shapes: ``pos`` (..., 3), ``quat`` (..., 4); the result has the leading shape.
    """
    p = np.asarray(pos, dtype=np.float64)
    q = np.asarray(quat, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(p).all(axis=-1) & np.isfinite(q).all(axis=-1)
        in_range = (np.abs(p) <= POSITION_LIMIT_M).all(axis=-1)
        norm = np.sqrt(np.sum(q * q, axis=-1))
        unit = (norm >= QUAT_NORM_MIN) & (norm <= QUAT_NORM_MAX)
    ok: npt.NDArray[np.bool_] = finite & in_range & unit
    return ok


def rotation_error_deg(a: FloatArray, b: FloatArray) -> npt.NDArray[np.float64]:
    """Angle in degrees between rotations ``a`` and ``b`` (..., 4), treating q and -q as equal."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    dot = np.clip(np.abs(np.sum(a * b, axis=-1)), 0.0, 1.0)
    degrees: npt.NDArray[np.float64] = np.degrees(2.0 * np.arccos(dot))
    return degrees
