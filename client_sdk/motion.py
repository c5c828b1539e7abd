"""Deterministic, seedable synthetic avatar motion for benchmarks and load tests.

An avatar has three tracked poses, in this order: head, left hand, right hand
(:data:`HEAD`, :data:`LEFT`, :data:`RIGHT`). Positions are metres, quaternions ``(x, y, z, w)``,
in the OpenXR frame (+X right, +Y up, -Z forward).

How the motion is generated
---------------------------
Head
    Either a recorded head trace (:func:`load_head_trace`, e.g. the 60 Hz Meta Quest trace in
    ``shared/data``) or, without one, a synthetic head. The track is sampled by linear
    interpolation of positions and normalized linear interpolation of sign-continuous
    quaternions, and it loops by playing forwards, then backwards ("ping-pong"), so looping never
    jumps. The synthetic head is band-limited Gaussian noise (see below): horizontal sway with
    0.12 m rms per axis, vertical 0.02 m, and yaw, pitch and roll of 35, 10 and 3 degrees rms;
    its time scale is set so the median head speed is 0.12 m/s and the median angular speed
    15 deg/s (inside the README's head range of 0.03-0.27 m/s).

Body frame
    The hands hang off a body frame at the head position turned by the head's yaw (heading of
    its forward vector), low-passed by a 1 s moving average so that looking around does not
    swing the arms; crouching and stepping carry the hands along.

Hands
    Each hand sits at a rest offset in the body frame (0.18 m to the side, 0.40 m below and
    0.30 m in front of the head) plus a displacement ``d(t)``. Each axis of ``d`` is white noise
    low-passed twice at ``drive_cutoff_hz`` (the driving force, i.e. band-limited noise on
    acceleration / velocity) pushing a damped spring (natural frequency ``spring_hz``, damping
    ratio ``damping``) back to the rest offset. That linear filter is applied in the frequency
    domain on a periodic 60 Hz grid of 8192 samples (136.5 s), which is exactly the stationary
    output of the IIR filter, costs one FFT per seed and needs no per-sample Python loop.
    ``d`` is then multiplied by a slow log-normal "activity" envelope (``activity_sigma``,
    0.08 Hz) per hand, so that there are calm stretches and bursts of reaching, which gives
    the speed distribution the long tail of real hand motion; it is scaled to
    ``displacement_rms`` per axis and its length is soft-limited to ``reach`` with ``tanh``
    (arm's reach). Hand orientation is the body yaw, a rest orientation (controller pitched
    down 20 degrees, rolled 10 degrees inwards) and a small rotation ``exp(r(t))`` whose
    rotation vector is generated the same way, with the same activity envelope
    (``rotation_rms_deg`` per axis).
    Finally a time scale is chosen from the generated samples so that the hand's own
    (body-frame) linear speed has exactly the profile's median and its angular speed the
    profile's median angular speed (separate time scales for position and rotation).

Seeds and sharing
    There are :data:`HAND_BASE_POOL` (64) base hand processes per profile, each 136.5 s long,
    built once and cached. Seed ``s`` uses base ``s % 64`` at its own random phase (separate for
    position and rotation) and may swap which hand gets which process, so avatars whose seeds
    differ by a multiple of 64 are time-shifted copies of the same stationary process. Synthetic
    heads are pooled the same way (head ``s % 64``).

Profiles
    :data:`EVERYDAY` (the README's "hands, everyday tasks": median 0.07-0.7 m/s, p95 0.4-2.8):
    body-frame median 0.33 m/s and 60 deg/s, which with the head's motion gives about 0.35 m/s
    in the world. :data:`FAST_GAMES` (Beat Saber: median 2.5-4 m/s, p95 6.5-9.6, up to about
    2,400 deg/s): median 3 m/s, 300 deg/s, larger and faster swings.

Measured statistics
-------------------
World frame, finite differences at 60 Hz over 132 s, 64 avatars (128 hands) from
:func:`room_trajectories` (``python -m medverse.client_sdk.motion [trace.csv]`` prints them again):

=================================  ==========  =======  ============  =========
poses                              median m/s  p95 m/s  median deg/s  p95 deg/s
=================================  ==========  =======  ============  =========
head, Quest trace                  0.019       0.33     4.5           39
hands, EVERYDAY, Quest head        0.35        0.89     61            171
hands, FAST_GAMES, Quest head      3.0         7.5      298           818
head, synthetic                    0.12        0.25     15            39
hands, EVERYDAY, synthetic head    0.37        0.90     63            173
=================================  ==========  =======  ============  =========

(The Quest trace is a calm calibration sequence; its head is slower than the README's range.)
Hand displacements never exceed ``reach`` from the rest offset (hand-to-head distance stays
within about 0.2-0.9 m for EVERYDAY). Everything is deterministic for a given seed, head trace
and profile.

Cost: building one base process takes about 12 ms (64 per profile, once per process);
evaluating 60 s at 30 Hz takes about 3 ms per avatar, so :func:`room_trajectories` for 1,000
avatars takes about 3.5 s on one core (and about 300 MB for the float64 results).
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]

HEAD, LEFT, RIGHT = 0, 1, 2
#: Names of the three pose slots, in slot order.
SLOT_NAMES = ("head", "left", "right")

#: Sample rate and length of the periodic grid the band-limited processes live on.
GRID_HZ = 60.0
GRID_SIZE = 8192
GRID_PERIOD_S = GRID_SIZE / GRID_HZ
#: Number of distinct hand base processes per profile; seeds share them at their own phases.
HAND_BASE_POOL = 64

_REST_OFFSET = np.array([[-0.18, -0.40, -0.30], [0.18, -0.40, -0.30]])
_BODY_YAW_SMOOTH_S = 1.0


@dataclass(frozen=True, slots=True)
class HandProfile:
    """Magnitudes of the synthetic hand motion (see the module docstring)."""

    name: str
    median_speed: float  # m/s, hand in the body frame
    median_angular_speed: float  # deg/s, hand in the body frame
    displacement_rms: float  # m per axis around the rest offset
    reach: float  # m, soft limit of the displacement length
    spring_hz: float
    damping: float
    drive_cutoff_hz: float
    activity_sigma: float  # log-normal envelope, 0 for none
    rotation_rms_deg: float  # per axis


EVERYDAY = HandProfile(
    name="everyday",
    median_speed=0.33,
    median_angular_speed=60.0,
    displacement_rms=0.09,
    reach=0.35,
    spring_hz=0.5,
    damping=0.7,
    drive_cutoff_hz=2.0,
    activity_sigma=0.5,
    rotation_rms_deg=20.0,
)

FAST_GAMES = HandProfile(
    name="fast_games",
    median_speed=3.0,
    median_angular_speed=300.0,
    displacement_rms=0.22,
    reach=0.6,
    spring_hz=1.2,
    damping=0.5,
    drive_cutoff_hz=4.0,
    activity_sigma=0.5,
    rotation_rms_deg=35.0,
)


# --------------------------------------------------------------------------- quaternion helpers


def quat_multiply(a: F64, b: F64) -> F64:
    """Hamilton product ``a * b`` of quaternions (..., 4) as (x, y, z, w)."""
    ax, ay, az, aw = np.moveaxis(a, -1, 0)
    bx, by, bz, bw = np.moveaxis(b, -1, 0)
    return np.stack(
        [
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
            aw * bw - ax * bx - ay * by - az * bz,
        ],
        axis=-1,
    )


def quat_from_rotvec(rv: F64) -> F64:
    """Rotation vectors (..., 3) in radians to unit quaternions (..., 4)."""
    angle = np.linalg.norm(rv, axis=-1, keepdims=True)
    half = 0.5 * angle
    # sin(x/2)/x, with its limit 1/2 at 0
    scale = np.where(angle > 1e-12, np.sin(half) / np.where(angle > 1e-12, angle, 1.0), 0.5)
    return np.concatenate([rv * scale, np.cos(half)], axis=-1)


def _quat_axis(angle: F64 | np.float64, axis: int) -> F64:
    q = np.zeros((*np.shape(angle), 4))
    q[..., axis] = np.sin(0.5 * angle)
    q[..., 3] = np.cos(0.5 * angle)
    return q


def _continuous(quat: F64, axis: int = 0) -> F64:
    """Flip signs along ``axis`` so neighbouring quaternions lie in the same hemisphere."""
    q = np.moveaxis(quat, axis, 0)
    dots = np.sum(q[1:] * q[:-1], axis=-1)
    sign = np.concatenate(
        [np.ones((1, *dots.shape[1:])), np.cumprod(np.where(dots < 0, -1.0, 1.0), axis=0)]
    )
    return np.moveaxis(q * sign[..., None], 0, axis)


def _normalize(q: F64) -> F64:
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


def _rotate_y(vec: F64, yaw: F64 | np.float64) -> F64:
    """Rotate vectors (..., 3) about +Y by ``yaw`` radians (broadcast over the leading shape)."""
    c, s = np.cos(yaw), np.sin(yaw)
    x, y, z = vec[..., 0], vec[..., 1], vec[..., 2]
    return np.stack([c * x + s * z, np.broadcast_to(y, (c * x).shape), c * z - s * x], axis=-1)


def angular_speed_deg(quat: F64, dt: float | F64, axis: int = 0) -> F64:
    """Angular speed in deg/s between consecutive quaternions along ``axis`` (q ~ -q)."""
    q = np.moveaxis(np.asarray(quat, dtype=np.float64), axis, 0)
    dot = np.clip(np.abs(np.sum(q[1:] * q[:-1], axis=-1)), 0.0, 1.0)
    dtv = np.asarray(dt, dtype=np.float64)
    if dtv.ndim:
        dtv = dtv.reshape(dtv.shape + (1,) * (dot.ndim - 1))
    return np.degrees(2.0 * np.arccos(dot)) / dtv


# ------------------------------------------------------------------------------ head tracks


def load_head_trace(path: str | Path) -> tuple[F64, F64, F64]:
    """Read the head rows of a trace CSV (columns t, device, px..pz, qx..qw).

    Returns ``(t (K,), pos (K, 3), quat (K, 4))``, seconds, metres and unit quaternions, with
    non-increasing timestamps dropped.
    """
    rows: list[list[float]] = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row.get("device", "head") != "head":
                continue
            rows.append([float(row[k]) for k in ("t", "px", "py", "pz", "qx", "qy", "qz", "qw")])
    if len(rows) < 2:
        raise ValueError(f"{path}: fewer than two head rows")
    a = np.asarray(rows, dtype=np.float64)
    keep = np.r_[True, np.diff(a[:, 0]) > 0]
    keep[1:] &= np.maximum.accumulate(a[:, 0])[:-1] < a[1:, 0]
    a = a[keep]
    return a[:, 0] - a[0, 0], a[:, 1:4], _normalize(a[:, 4:8])


def _heading(quat: F64) -> F64:
    """Yaw (radians about +Y) of each quaternion's forward (-Z) vector, unwrapped."""
    x, y, z, w = np.moveaxis(quat, -1, 0)
    # forward = R(q) @ (0, 0, -1)
    fx = -(2 * (x * z + w * y))
    fz = -(1 - 2 * (x * x + y * y))
    return np.unwrap(np.arctan2(-fx, -fz))


@dataclass(frozen=True, slots=True)
class HeadTrack:
    """Head poses on a time grid plus the smoothed body yaw; loops forwards then backwards."""

    t: F64  # (K,) ascending, t[0] == 0
    pos: F64  # (K, 3)
    quat: F64  # (K, 4) sign-continuous
    body_yaw: F64  # (K,) radians, unwrapped, smoothed

    @property
    def duration(self) -> float:
        """Length of one forward pass in seconds (the loop is twice as long)."""
        return float(self.t[-1])

    @classmethod
    def from_samples(cls, t: F64, pos: F64, quat: F64) -> HeadTrack:
        """Build a track from raw samples (e.g. :func:`load_head_trace`)."""
        t = np.asarray(t, dtype=np.float64)
        t = t - t[0]
        quat = _continuous(_normalize(np.asarray(quat, dtype=np.float64)))
        yaw = _heading(quat)
        # Moving average over about _BODY_YAW_SMOOTH_S, reflected at the ends like the loop.
        dt = float(np.median(np.diff(t)))
        half = max(1, round(0.5 * _BODY_YAW_SMOOTH_S / dt))
        half = min(half, yaw.size - 1)
        padded = np.concatenate([yaw[half:0:-1], yaw, yaw[-2 : -half - 2 : -1]])
        csum = np.concatenate([[0.0], np.cumsum(padded)])
        width = 2 * half + 1
        smooth = (csum[width:] - csum[:-width]) / width
        return cls(t, np.asarray(pos, dtype=np.float64), quat, smooth)

    def loop_time(self, times: F64) -> F64:
        """Map any times onto the track, playing it forwards then backwards."""
        d = self.duration
        u = np.mod(np.asarray(times, dtype=np.float64), 2 * d)
        return np.where(u > d, 2 * d - u, u)

    def sample(self, times: F64) -> tuple[F64, F64, F64]:
        """Positions (T, 3), unit quaternions (T, 4) and body yaw (T,) at ``times``."""
        u = self.loop_time(times)
        i = np.clip(np.searchsorted(self.t, u, side="right") - 1, 0, self.t.size - 2)
        f = ((u - self.t[i]) / (self.t[i + 1] - self.t[i]))[:, None]
        pos = self.pos[i] * (1 - f) + self.pos[i + 1] * f
        quat = _normalize(self.quat[i] * (1 - f) + self.quat[i + 1] * f)
        yaw = self.body_yaw[i] * (1 - f[:, 0]) + self.body_yaw[i + 1] * f[:, 0]
        return pos, quat, yaw


@lru_cache(maxsize=8)
def _trace_track(path: str) -> HeadTrack:
    return HeadTrack.from_samples(*load_head_trace(path))


# ------------------------------------------------------------- band-limited noise processes


def _spring_noise(
    rng: np.random.Generator, channels: int, spring_hz: float, damping: float, cutoff_hz: float
) -> F64:
    """Unit-variance periodic Gaussian processes (GRID_SIZE, channels) on the 60 Hz grid.

    White noise through a two-pole low-pass at ``cutoff_hz`` driving a damped spring: the
    stationary output of that linear filter, computed in the frequency domain.
    """
    freqs = np.fft.rfftfreq(GRID_SIZE, 1.0 / GRID_HZ)
    w = 2 * np.pi * freqs
    w0 = 2 * np.pi * spring_hz
    wc = 2 * np.pi * cutoff_hz
    gain = 1.0 / (w0 * w0 - w * w + 2j * damping * w0 * w) / (1.0 + 1j * w / wc) ** 2
    spec = rng.standard_normal((freqs.size, channels)) + 1j * rng.standard_normal(
        (freqs.size, channels)
    )
    spec *= gain[:, None]
    spec[0] = 0.0
    x = np.fft.irfft(spec, n=GRID_SIZE, axis=0)
    return x / x.std(axis=0)


def _grid_speed(pos: F64) -> F64:
    """Speed (m/s) of periodic grid positions (GRID_SIZE, ..., 3) by central differences."""
    v = (np.roll(pos, -1, axis=0) - np.roll(pos, 1, axis=0)) * (0.5 * GRID_HZ)
    return np.linalg.norm(v, axis=-1)


@dataclass(frozen=True, slots=True)
class _HandBase:
    disp: F64  # (GRID_SIZE + 1, 2, 3) body-frame displacement, periodic (last == first)
    rot: F64  # (GRID_SIZE + 1, 2, 4) body-frame local rotation, sign-continuous
    pos_rate: float  # grid samples per second of real time
    rot_rate: float


_REST_QUAT = quat_multiply(
    _quat_axis(np.array([0.1745, -0.1745]), 2),  # roll inwards 10 degrees (mirrored)
    _quat_axis(np.full(2, -0.349), 0),  # pitch down 20 degrees
)


@lru_cache(maxsize=2 * HAND_BASE_POOL)
def _hand_base(base_seed: int, profile: HandProfile) -> _HandBase:
    rng = np.random.default_rng([base_seed, 0x4A4E4453])
    disp = _spring_noise(rng, 6, profile.spring_hz, profile.damping, profile.drive_cutoff_hz)
    disp = disp.reshape(GRID_SIZE, 2, 3)
    env = np.exp(profile.activity_sigma * _spring_noise(rng, 2, 0.08, 0.7, 0.16))[:, :, None]
    disp = disp * env
    disp *= profile.displacement_rms / np.sqrt(np.mean(disp * disp, axis=(0, 2), keepdims=True))
    length = np.linalg.norm(disp, axis=-1, keepdims=True)
    disp *= profile.reach * np.tanh(length / profile.reach) / np.maximum(length, 1e-12)
    rv = _spring_noise(rng, 6, profile.spring_hz, profile.damping, profile.drive_cutoff_hz)
    rv = rv.reshape(GRID_SIZE, 2, 3) * env
    rv *= np.radians(profile.rotation_rms_deg) / np.sqrt(
        np.mean(rv * rv, axis=(0, 2), keepdims=True)
    )
    rot = _continuous(quat_from_rotvec(rv))
    # Time scales from the samples: base speeds are per grid sample at GRID_HZ.
    pos_median = float(np.median(_grid_speed(disp)))
    rot_closed = np.concatenate(
        [rot, rot[:1] * np.sign(np.sum(rot[:1] * rot[-1:], axis=-1))[..., None]]
    )
    rot_median = float(np.median(angular_speed_deg(rot_closed, 1.0 / GRID_HZ)))
    return _HandBase(
        disp=np.concatenate([disp, disp[:1]]),
        rot=rot_closed,
        pos_rate=GRID_HZ * profile.median_speed / pos_median,
        rot_rate=GRID_HZ * profile.median_angular_speed / rot_median,
    )


def _grid_lookup(grid: F64, u: F64) -> tuple[F64, F64, F64]:
    """Indices and weights to interpolate a periodic grid (GRID_SIZE + 1 rows) at ``u``."""
    u = np.mod(u, GRID_SIZE)
    i = np.minimum(u.astype(np.int64), GRID_SIZE - 1)
    f = (u - i)[:, None, None]
    return grid[i], grid[i + 1], f


@lru_cache(maxsize=64)
def _synthetic_head(seed: int) -> HeadTrack:
    """A synthetic head track of GRID_PERIOD_S seconds (see the module docstring)."""
    rng = np.random.default_rng([seed, 0x48454144])
    x = _spring_noise(rng, 6, 0.15, 0.8, 0.6)
    pos = x[:, :3] * np.array([0.12, 0.02, 0.12])
    ang = np.radians(x[:, 3:] * np.array([35.0, 10.0, 3.0]))
    quat = quat_multiply(
        quat_multiply(_quat_axis(ang[:, 0], 1), _quat_axis(ang[:, 1], 0)), _quat_axis(ang[:, 2], 2)
    )
    # Separate time scales for position and orientation: resample both on one 60 Hz grid.
    pos_rate = 0.12 / float(np.median(_grid_speed(pos)))
    rot_rate = 15.0 / float(np.median(angular_speed_deg(quat, 1.0 / GRID_HZ)))
    n = GRID_SIZE
    t = np.arange(n + 1) / GRID_HZ
    pos_c = np.concatenate([pos, pos[:1]])
    quat_c = np.concatenate([quat, quat[:1]])

    def resample(grid: F64, rate: float) -> F64:
        u = np.mod(np.arange(n + 1) * rate, n)
        i = np.minimum(u.astype(np.int64), n - 1)
        f = (u - i)[:, None]
        return grid[i] * (1 - f) + grid[i + 1] * f

    return HeadTrack.from_samples(t, resample(pos_c, pos_rate), resample(quat_c, rot_rate))


# --------------------------------------------------------------------------------- avatars


class AvatarMotion:
    """One avatar's head and hands, deterministic for a given seed, head trace and profile.

    ``head_trace`` is a CSV path (read once and cached), a :class:`HeadTrack`, or None for a
    synthetic head. ``time_offset`` shifts the head along its track; ``origin`` and
    ``heading_deg`` place the whole avatar in the room (the track's own origin goes to
    ``origin``, turned by ``heading_deg`` about +Y).
    """

    def __init__(
        self,
        seed: int = 0,
        head_trace: str | Path | HeadTrack | None = None,
        *,
        profile: HandProfile = EVERYDAY,
        time_offset: float = 0.0,
        origin: Sequence[float] = (0.0, 1.6, 0.0),
        heading_deg: float = 0.0,
    ) -> None:
        self.seed = int(seed)
        self.profile = profile
        if head_trace is None:
            self.head = _synthetic_head(self.seed % HAND_BASE_POOL)
        elif isinstance(head_trace, HeadTrack):
            self.head = head_trace
        else:
            self.head = _trace_track(str(Path(head_trace).resolve()))
        self.time_offset = float(time_offset)
        rng = np.random.default_rng([self.seed, 0x50484153])
        phases = rng.uniform(0.0, GRID_SIZE, 2)
        self._pos_phase = float(phases[0])
        self._rot_phase = float(phases[1])
        self._hands = [0, 1] if rng.random() < 0.5 else [1, 0]
        self.origin = np.asarray(origin, dtype=np.float64).reshape(3)
        self.heading = math.radians(heading_deg)

    def trajectory(self, times: npt.ArrayLike) -> tuple[F64, F64]:
        """Poses at ``times`` (T,) seconds: positions (T, 3, 3) and quaternions (T, 3, 4).

        Slot order is head, left hand, right hand. Quaternions are sign-continuous in time.
        """
        t = np.atleast_1d(np.asarray(times, dtype=np.float64))
        head_pos, head_quat, yaw = self.head.sample(t + self.time_offset)
        base = _hand_base(self.seed % HAND_BASE_POOL, self.profile)
        a, b, f = _grid_lookup(base.disp, t * base.pos_rate + self._pos_phase)
        disp = (a * (1 - f) + b * f)[:, self._hands]  # (T, 2, 3)
        a, b, f = _grid_lookup(base.rot, t * base.rot_rate + self._rot_phase)
        local = _normalize(a * (1 - f) + b * f)[:, self._hands]  # (T, 2, 4)

        pos = np.empty((t.size, 3, 3))
        quat = np.empty((t.size, 3, 4))
        pos[:, 0] = head_pos
        quat[:, 0] = head_quat
        pos[:, 1:] = head_pos[:, None, :] + _rotate_y(_REST_OFFSET + disp, yaw[:, None])
        body = _quat_axis(yaw, 1)[:, None, :]
        quat[:, 1:] = quat_multiply(quat_multiply(body, _REST_QUAT), local)
        if self.heading:
            pos = _rotate_y(pos, np.float64(self.heading))
            quat = quat_multiply(_quat_axis(np.float64(self.heading), 1), quat)
        pos += self.origin
        return pos, quat

    def poses(self, t: float) -> tuple[F64, F64]:
        """Poses at one time: positions (3, 3) and quaternions (3, 4)."""
        pos, quat = self.trajectory(np.array([t]))
        return pos[0], quat[0]


def room_trajectories(
    n: int,
    times: npt.ArrayLike,
    head_trace: str | Path | HeadTrack | None = None,
    *,
    profile: HandProfile = EVERYDAY,
    seed: int = 0,
    radius: float = 1.5,
) -> tuple[F64, F64]:
    """``n`` avatars standing in a circle: positions (T, n, 3, 3) and quaternions (T, n, 3, 4).

    The results are time-first views of avatar-major arrays (``np.ascontiguousarray`` them if
    a time-major layout matters).

    Avatar ``i`` gets hand seed ``seed + i``, a head time offset spreading the avatars over the
    head track's loop, and a place on a circle of ``radius`` metres facing its centre.
    """
    t = np.atleast_1d(np.asarray(times, dtype=np.float64))
    pos = np.empty((n, t.size, 3, 3))
    quat = np.empty((n, t.size, 3, 4))
    for i in range(n):
        angle = 2 * math.pi * i / max(n, 1)
        m = AvatarMotion(
            seed + i,
            head_trace,
            profile=profile,
            time_offset=0.0,
            origin=(radius * math.sin(angle), 1.6, radius * math.cos(angle)),
            heading_deg=math.degrees(angle),
        )
        m.time_offset = 2.0 * m.head.duration * i / max(n, 1)
        pos[i], quat[i] = m.trajectory(t)
    return pos.transpose(1, 0, 2, 3), quat.transpose(1, 0, 2, 3)


def measure_speeds(times: F64, pos: F64, quat: F64) -> dict[str, dict[str, float]]:
    """Median and 95th percentile linear (m/s) and angular (deg/s) speed per pose slot.

    ``pos`` (T, ..., S, 3) and ``quat`` (T, ..., S, 4), time first; slots are the last axis
    before the coordinates and are named by :data:`SLOT_NAMES` when there are three.
    """
    dt = np.diff(np.asarray(times, dtype=np.float64))
    shape = (dt.size,) + (1,) * (pos.ndim - 2)
    lin = np.linalg.norm(np.diff(pos, axis=0), axis=-1) / dt.reshape(shape)
    ang = angular_speed_deg(quat, dt)
    out: dict[str, dict[str, float]] = {}
    n_slots = pos.shape[-2]
    for s in range(n_slots):
        name = SLOT_NAMES[s] if n_slots == 3 else f"slot{s}"
        ls, as_ = lin[..., s], ang[..., s]
        out[name] = {
            "speed_median": float(np.median(ls)),
            "speed_p95": float(np.percentile(ls, 95)),
            "angular_median": float(np.median(as_)),
            "angular_p95": float(np.percentile(as_, 95)),
        }
    return out


def _print_stats(trace: str | None) -> None:
    times = np.arange(0, 132.0, 1 / 60)
    profiles = [EVERYDAY, FAST_GAMES] if trace else [EVERYDAY]
    for profile in profiles:
        pos, quat = room_trajectories(64, times, trace, profile=profile)
        stats = measure_speeds(times, pos, quat)
        n_t, n_av = pos.shape[:2]
        hands = measure_speeds(
            times,
            pos[:, :, 1:].reshape(n_t, 2 * n_av, 1, 3),
            quat[:, :, 1:].reshape(n_t, 2 * n_av, 1, 4),
        )["slot0"]
        head = "trace" if trace else "synthetic"
        print(f"{profile.name:>10} head ({head}): {stats['head']}")
        print(f"{profile.name:>10} hands: {hands}")


if __name__ == "__main__":
    _print_stats(sys.argv[1] if len(sys.argv) > 1 else None)
