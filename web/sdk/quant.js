// Pose quantization (protocol/SPEC.md "Pose quantization"), in IEEE 754 binary64 with the same
// operations in the same order as protocol/quant.py, so every code and every dequantized value
// is the reference's, bit for bit.

/** Positions are integers in this unit (metres per step): 1 mm. */
export const POSITION_STEP_M = 0.001;
/** Largest accepted absolute coordinate, metres. */
export const POSITION_LIMIT_M = 10000.0;
export const ROTATION_BITS = 10;
export const ROTATION_MAX = (1 << ROTATION_BITS) - 1;
export const QUAT_NORM_MIN = 0.9;
export const QUAT_NORM_MAX = 1.1;

const H = Math.sqrt(0.5);
const SCALE = (2 * H) / ROTATION_MAX;
// The sent components for each index of the dropped largest one.
const OTHERS = [
  [1, 2, 3],
  [0, 2, 3],
  [0, 1, 3],
  [0, 1, 2],
];

/** Round to the nearest integer, ties to even (C rint). */
export function roundHalfEven(x) {
  const f = Math.floor(x);
  const d = x - f;
  let r;
  if (d < 0.5) r = f;
  else if (d > 0.5) r = f + 1;
  else r = f % 2 === 0 ? f : f + 1;
  return r + 0; // no negative zero
}

/** True if a pose is finite, inside the position limit and has a plausible quaternion. */
export function validatePose(pos, quat) {
  for (const v of pos) if (!Number.isFinite(v) || Math.abs(v) > POSITION_LIMIT_M) return false;
  for (const v of quat) if (!Number.isFinite(v)) return false;
  const norm = Math.sqrt(quat[0] * quat[0] + quat[1] * quat[1] + quat[2] * quat[2] + quat[3] * quat[3]);
  return norm >= QUAT_NORM_MIN && norm <= QUAT_NORM_MAX;
}

/** Metres [x, y, z] to integer millimetres (callers validate the range first). */
export function quantizePosition(pos) {
  return [roundHalfEven(pos[0] / POSITION_STEP_M), roundHalfEven(pos[1] / POSITION_STEP_M), roundHalfEven(pos[2] / POSITION_STEP_M)];
}

/** Integer millimetres to metres. */
export function dequantizePosition(mm) {
  return [mm[0] * POSITION_STEP_M, mm[1] * POSITION_STEP_M, mm[2] * POSITION_STEP_M];
}

/** A quaternion [x, y, z, w] to its smallest-three code: `{index, rot: [c0, c1, c2]}`. */
export function quantizeRotation(quat) {
  const n = Math.sqrt(quat[0] * quat[0] + quat[1] * quat[1] + quat[2] * quat[2] + quat[3] * quat[3]);
  const q = [quat[0] / n, quat[1] / n, quat[2] / n, quat[3] / n];
  let index = 0;
  for (let i = 1; i < 4; i++) if (Math.abs(q[i]) > Math.abs(q[index])) index = i;
  const sign = q[index] < 0 ? -1.0 : 1.0;
  const big = q[index] * sign;
  const o = OTHERS[index];
  const comps = [q[o[0]] * sign, q[o[1]] * sign, q[o[2]] * sign];
  const base = comps.map((c) => Math.max(Math.floor((c + H) / SCALE), 0.0));
  let best = null;
  let bestScore = -1;
  for (let a = 0; a <= 1; a++) {
    for (let b = 0; b <= 1; b++) {
      for (let e = 0; e <= 1; e++) {
        const cand = [Math.min(base[0] + a, ROTATION_MAX), Math.min(base[1] + b, ROTATION_MAX), Math.min(base[2] + e, ROTATION_MAX)];
        const c0 = cand[0] * SCALE - H;
        const c1 = cand[1] * SCALE - H;
        const c2 = cand[2] * SCALE - H;
        const s = c0 * c0 + c1 * c1 + c2 * c2;
        const rebuilt = Math.sqrt(Math.max(1.0 - s, 0.0));
        const dot = c0 * comps[0] + c1 * comps[1] + c2 * comps[2] + rebuilt * big;
        const score = Math.abs(dot) / Math.sqrt(Math.max(s, 1.0));
        if (score > bestScore) {
          bestScore = score;
          best = cand;
        }
      }
    }
  }
  return { index, rot: best };
}

/** A smallest-three code back to a unit quaternion [x, y, z, w]. */
export function dequantizeRotation(index, rot) {
  const c0 = rot[0] * SCALE - H;
  const c1 = rot[1] * SCALE - H;
  const c2 = rot[2] * SCALE - H;
  const largest = Math.sqrt(Math.max(1.0 - (c0 * c0 + c1 * c1 + c2 * c2), 0.0));
  const out = [0, 0, 0, 0];
  out[index] = largest;
  const o = OTHERS[index];
  out[o[0]] = c0;
  out[o[1]] = c1;
  out[o[2]] = c2;
  const norm = Math.sqrt(out[0] * out[0] + out[1] * out[1] + out[2] * out[2] + out[3] * out[3]);
  return [out[0] / norm, out[1] / norm, out[2] / norm, out[3] / norm];
}

/** The 32-bit packed rotation of state frames: index << 30 | c0 << 20 | c1 << 10 | c2. */
export function packRotation(index, rot) {
  return ((index << 30) | (rot[0] << 20) | (rot[1] << 10) | rot[2]) >>> 0;
}

export function unpackRotation(packed) {
  return { index: packed >>> 30, rot: [(packed >>> 20) & ROTATION_MAX, (packed >>> 10) & ROTATION_MAX, packed & ROTATION_MAX] };
}
