"""The spatial audio mixer's arithmetic: gains from head poses and routing rules, and the mix.

Pure numpy, no I/O. A room's audio state (:mod:`.mixing`) is a set of slot arrays (one slot per
member); every 20 ms frame it takes one frame from each speaker's ring, builds a listeners x
speakers x 2 gain tensor with these functions and mixes every listener's stereo frame with one
matrix product; the int16 frames they return go on to each listener's Opus encoder
(:mod:`.codec`).

Coordinates follow the state protocol: metres, right-handed, +Y up, -Z forward, +X right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

SAMPLE_RATE = 48000
FRAME_SAMPLES = 960  # 20 ms at 48 kHz
#: Frames of each speaker's ring buffer; a speaker more than RING - 1 frames ahead of the mixer
#: loses its oldest frames (counted as dropped) so latency stays bounded.
RING = 4
#: Floor of level measurements (digital silence would be -inf).
MIN_DBFS = -120.0
#: Largest interaural delay, samples (0.625 ms at 48 kHz), and its quantization step.
MAX_ITD = 30
ITD_STEP = 6

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Spatial:
    """Distance model (the Web Audio "inverse" model, cut off at ``max_distance``)."""

    ref_distance: float = 1.0
    rolloff: float = 1.0
    max_distance: float = 20.0


def dbfs(rms: npt.ArrayLike) -> F64:
    """RMS (full scale 1.0) to dBFS, floored at MIN_DBFS."""
    r = np.asarray(rms, dtype=np.float64)
    return np.maximum(20.0 * np.log10(np.maximum(r, 1e-12)), MIN_DBFS)


def rotation_matrices(quat: F64) -> F64:
    """Unit quaternions (N, 4) as (x, y, z, w) to rotation matrices (N, 3, 3)."""
    x, y, z, w = quat[:, 0], quat[:, 1], quat[:, 2], quat[:, 3]
    m = np.empty((quat.shape[0], 3, 3))
    m[:, 0, 0] = 1 - 2 * (y * y + z * z)
    m[:, 0, 1] = 2 * (x * y - z * w)
    m[:, 0, 2] = 2 * (x * z + y * w)
    m[:, 1, 0] = 2 * (x * y + z * w)
    m[:, 1, 1] = 1 - 2 * (x * x + z * z)
    m[:, 1, 2] = 2 * (y * z - x * w)
    m[:, 2, 0] = 2 * (x * z - y * w)
    m[:, 2, 1] = 2 * (y * z + x * w)
    m[:, 2, 2] = 1 - 2 * (x * x + y * y)
    return m


def spatial_gains(
    l_present: npt.NDArray[np.bool_],
    l_pos: F64,
    l_quat: F64,
    s_present: npt.NDArray[np.bool_],
    s_pos: F64,
    model: Spatial,
) -> F64:
    """Left/right gains (L, S, 2) of each speaker at each listener.

    Distance attenuation ``ref / (ref + rolloff * (max(d, ref) - ref))``, silence beyond
    ``max_distance``; equal-power panning from the source's direction in the listener's head
    frame (a source straight to the left is all left). A pair where either head is untracked
    is heard centred at the reference level.
    """
    dist, pan = geometry(l_pos, l_quat, s_pos)
    ref = model.ref_distance
    clamped = np.maximum(dist, ref)
    att = ref / (ref + model.rolloff * (clamped - ref))
    att = np.where(dist > model.max_distance, 0.0, att)
    theta = (pan + 1.0) * (math.pi / 4)
    tracked = l_present[:, None] & s_present[None, :]
    att = np.where(tracked, att, 1.0)
    theta = np.where(tracked, theta, math.pi / 4)
    return np.stack((att * np.cos(theta), att * np.sin(theta)), axis=-1)


def geometry(l_pos: F64, l_quat: F64, s_pos: F64) -> tuple[F64, F64]:
    """Distance (L, S) of each speaker from each listener's head, and its lateral direction
    in the head frame, -1 (straight left) .. 1 (straight right)."""
    d = s_pos[None, :, :] - l_pos[:, None, :]  # (L, S, 3) world frame
    rot = rotation_matrices(l_quat)  # head to world
    local = np.einsum("lji,lsj->lsi", rot, d)  # world to head frame: R^T d
    dist = np.linalg.norm(d, axis=-1)
    pan = np.where(dist > 1e-6, local[..., 0] / np.maximum(dist, 1e-6), 0.0)
    return dist, np.clip(pan, -1.0, 1.0)


def interaural_delays(
    l_present: npt.NDArray[np.bool_],
    l_pos: F64,
    l_quat: F64,
    s_present: npt.NDArray[np.bool_],
    s_pos: F64,
) -> npt.NDArray[np.int64]:
    """Delay in samples (L, S, 2) of each ear: the ear away from the source hears it up to
    ``MAX_ITD`` samples later (about 0.6 ms, a head's width), in steps of ``ITD_STEP`` so
    that a frame needs only a few matrix products. Untracked pairs get none."""
    _, pan = geometry(l_pos, l_quat, s_pos)
    lag = np.rint(np.abs(pan) * (MAX_ITD / ITD_STEP)).astype(np.int64) * ITD_STEP
    lag *= l_present[:, None] & s_present[None, :]
    # A source on the left (pan < 0) reaches the right ear late, and the other way round.
    return np.stack((np.where(pan > 0, lag, 0), np.where(pan < 0, lag, 0)), axis=-1)


def route_mask(
    l_slots: npt.NDArray[np.intp],
    s_slots: npt.NDArray[np.intp],
    zone: npt.NDArray[np.int32],
    broadcast: npt.NDArray[np.float32],
    whisper: npt.NDArray[np.int64],
    ignore: npt.NDArray[np.bool_],
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Which listener hears which speaker (L, S) under the routing rules, and which of those
    pairs are heard at a fixed level rather than spatially (broadcast and whisper).

    Zones: same zone only (0 is the open room). Broadcast: everyone. Whisper: the target only.
    Ignore (either way): nobody. Nobody hears themselves.
    """
    lz = zone[l_slots][:, None]
    sz = zone[s_slots][None, :]
    bc = (broadcast[s_slots] > 0)[None, :]
    target = whisper[s_slots][None, :]
    whispering = target >= 0
    to_me = target == l_slots[:, None]
    heard = np.where(whispering, to_me, (lz == sz) | bc)
    heard &= ~ignore[np.ix_(l_slots, s_slots)] & ~ignore[np.ix_(s_slots, l_slots)].T
    heard &= l_slots[:, None] != s_slots[None, :]
    fixed = whispering | bc
    return heard, np.broadcast_to(fixed, heard.shape)


def keep_loudest(loudness: F64, n: int) -> npt.NDArray[np.bool_]:
    """Mask (L, S) keeping each listener's ``n`` loudest speakers (by gain x level)."""
    if n <= 0 or loudness.shape[1] <= n:
        return np.ones(loudness.shape, np.bool_)
    cut = np.partition(loudness, -n, axis=1)[:, -n][:, None]
    keep = loudness >= cut
    # Ties could keep more than n; rank to break them.
    order = np.argsort(-loudness, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(loudness.shape[1])[None, :], axis=1)
    return keep & (rank < n)


def mix_delayed(gains: F32, delays: npt.NDArray[np.int64], history: F32) -> npt.NDArray[np.int16]:
    """Like :func:`mix` with a delay per ear: ``history`` (S, MAX_ITD + N) holds each
    speaker's last MAX_ITD samples of the previous frame, then this frame. One matrix product
    per distinct delay (at most MAX_ITD / ITD_STEP + 1)."""
    n_l, n_s, _ = gains.shape
    n = history.shape[1] - MAX_ITD
    out = np.zeros((n_l * 2, n), np.float32)
    g_all = gains.transpose(0, 2, 1).reshape(n_l * 2, n_s)
    d_all = delays.transpose(0, 2, 1).reshape(n_l * 2, n_s)
    for d in np.unique(d_all[g_all != 0]).tolist():  # one product per delay step in use
        g = np.where(d_all == d, g_all, 0.0).astype(np.float32)
        out += g @ history[:, MAX_ITD - d : MAX_ITD - d + n]
    out = out.reshape(n_l, 2, n).transpose(0, 2, 1)
    return (np.clip(out, -1.0, 32767 / 32768) * 32768.0).astype(np.int16)


def mix(gains: F32, frames: F32) -> npt.NDArray[np.int16]:
    """Every listener's stereo frame at once: gains (L, S, 2) x frames (S, N) -> int16 (L, N, 2)
    interleaved (what an s16 stereo audio frame holds)."""
    n_l, n_s, _ = gains.shape
    g = np.ascontiguousarray(gains.transpose(0, 2, 1)).reshape(n_l * 2, n_s)
    out = g @ frames  # (2L, N)
    out = out.reshape(n_l, 2, -1).transpose(0, 2, 1)
    return (np.clip(out, -1.0, 32767 / 32768) * 32768.0).astype(np.int16)
