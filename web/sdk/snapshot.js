// The state frame codec (protocol/SPEC.md "State frames"), producing the same snapshots and the
// same bytes as protocol/snapshot.py's SnapshotDecoder and SnapshotEncoder.
//
// A snapshot: `ids` (Uint32Array, ascending), `slots` and `flags` (Uint8Array) per entity; per
// pose row (entity order, then slot order) `present` (Uint8Array, 0/1), `pos` (Float64Array,
// 3 per row, integer millimetres), `rotIndex` (Uint8Array) and `rot` (Uint16Array, 3 per row,
// 0..1023). Absent rows hold zeros. Positions are exact integers in binary64 (the decoder does
// not bound them, as the reference does not; validate before use). Values in the bit stream
// stay below 2^40, so every sum here is exact.

import { ErrorCode, ProtocolError } from "./errors.js";
import { FRAME_STATE } from "./messages.js";
import { ROTATION_MAX } from "./quant.js";

export const FLAG_KEYFRAME = 0x01;
export const FLAG_SPEAKING = 0x01;
export const MAX_ENTITY_ID = 2 ** 32 - 1;
export const MAX_ENTITIES = 4096;
export const HEADER_SIZE = 7;
export const MODE_SAME = 0;
export const MODE_RESIDUAL = 1;
export const MODE_ABSOLUTE = 2;
export const MODE_ABSENT = 3;
const MAX_CODE_BITS = 41;

function malformed(message) {
  return new ProtocolError(ErrorCode.MALFORMED, message);
}

function outOfRange(message) {
  return new ProtocolError(ErrorCode.OUT_OF_RANGE, message);
}

// --------------------------------------------------------------------------- snapshots

/** A snapshot from its arrays (plain arrays or typed arrays; see the module comment). */
export function makeSnapshot({ ids = [], slots = [], flags = [], present = [], pos = [], rotIndex = [], rot = [] }) {
  return {
    ids: Uint32Array.from(ids),
    slots: Uint8Array.from(slots),
    flags: Uint8Array.from(flags),
    present: Uint8Array.from(present, (v) => (v ? 1 : 0)),
    pos: Float64Array.from(pos.flat ? pos.flat() : pos),
    rotIndex: Uint8Array.from(rotIndex),
    rot: Uint16Array.from(rot.flat ? rot.flat() : rot),
  };
}

export function emptySnapshot() {
  return makeSnapshot({});
}

/** First row of each entity. */
export function rowStarts(snap) {
  const out = new Uint32Array(snap.ids.length);
  let r = 0;
  for (let i = 0; i < snap.ids.length; i++) {
    out[i] = r;
    r += snap.slots[i];
  }
  return out;
}

/** Index of entity `id` in the snapshot, or -1 (binary search). */
export function entityIndex(snap, id) {
  const ids = snap.ids;
  let lo = 0;
  let hi = ids.length;
  while (lo < hi) {
    const m = (lo + hi) >>> 1;
    if (ids[m] < id) lo = m + 1;
    else hi = m;
  }
  return lo < ids.length && ids[lo] === id ? lo : -1;
}

// --------------------------------------------------------------------------- bit streams

class BitReader {
  constructor(bytes) {
    this.b = bytes;
    this.pos = 0;
    this.end = bytes.length * 8;
  }

  /** An unsigned field of `n` bits (n <= 52), most significant bit first. */
  fixed(n) {
    if (n > this.end - this.pos) throw malformed("bit stream truncated");
    const b = this.b;
    let pos = this.pos;
    let v = 0;
    let left = n;
    while (left > 0) {
      const off = pos & 7;
      const avail = 8 - off;
      const take = avail < left ? avail : left;
      v = v * (1 << take) + ((b[pos >>> 3] >>> (avail - take)) & ((1 << take) - 1));
      left -= take;
      pos += take;
    }
    this.pos = pos;
    return v;
  }

  /** `count` Exp-Golomb prefixes: the suffix width of each code. */
  lengths(count) {
    const out = new Uint8Array(count);
    const b = this.b;
    let pos = this.pos;
    for (let i = 0; i < count; i++) {
      let zeros = 0;
      for (;;) {
        if (pos >= this.end) throw malformed("bit stream truncated in code lengths");
        const byte = (b[pos >>> 3] << (pos & 7)) & 0xff;
        if (byte === 0) {
          const skip = 8 - (pos & 7);
          zeros += skip;
          pos += skip;
          continue;
        }
        const lz = Math.clz32(byte) - 24;
        zeros += lz;
        pos += lz + 1;
        break;
      }
      if (zeros >= MAX_CODE_BITS) throw malformed("code too long");
      out[i] = zeros;
    }
    this.pos = pos;
    return out;
  }

  /** The values of codes whose suffix widths came from `lengths` (into a Float64Array). */
  values(widths) {
    const out = new Float64Array(widths.length);
    for (let i = 0; i < widths.length; i++) {
      const w = widths[i];
      out[i] = w === 0 ? 0 : 2 ** w + this.fixed(w) - 1;
    }
    return out;
  }

  list(count) {
    return this.values(this.lengths(count));
  }

  checkPadding() {
    const rest = this.end - this.pos;
    if (rest >= 8 || (rest > 0 && this.fixed(rest) !== 0)) throw malformed("trailing data after bit stream");
  }
}

class BitWriter {
  constructor() {
    this.bytes = [];
    this.acc = 0;
    this.n = 0;
  }

  /** `value` (a non-negative integer below 2^53) in `width` bits. */
  fixed(value, width) {
    for (let i = width - 1; i >= 0; i--) {
      const bit = i >= 31 ? Math.floor(value / 2 ** i) % 2 : (value >>> i) & 1;
      this.acc = (this.acc << 1) | bit;
      if (++this.n === 8) {
        this.bytes.push(this.acc);
        this.acc = 0;
        this.n = 0;
      }
    }
  }

  /** An EG0 list: every prefix, then every suffix. */
  list(unsigned) {
    const lens = unsigned.map((u) => Math.floor(Math.log2(u + 1)) + 1);
    // log2 may be off by one near powers of two: correct it exactly.
    for (let i = 0; i < lens.length; i++) {
      const v = unsigned[i] + 1;
      while (2 ** (lens[i] - 1) > v) lens[i]--;
      while (2 ** lens[i] <= v) lens[i]++;
    }
    for (const l of lens) this.fixed(1, l);
    unsigned.forEach((u, i) => this.fixed(u + 1 - 2 ** (lens[i] - 1), lens[i] - 1));
  }

  gaps(ascending) {
    this.list(ascending.map((a, i) => (i === 0 ? a : a - ascending[i - 1] - 1)));
  }

  finish() {
    if (this.n > 0) this.fixed(0, 8 - this.n);
    return Uint8Array.from(this.bytes);
  }
}

export const zigzag = (v) => (v >= 0 ? 2 * v : -2 * v - 1);
export const unzigzag = (z) => (z % 2 === 0 ? z / 2 : -(z + 1) / 2);

// --------------------------------------------------------------------------- header

/** The 7-byte header of a state frame. */
export function stateHeader(tick, gap, keyframe) {
  const out = new Uint8Array(HEADER_SIZE);
  out[0] = FRAME_STATE;
  out[1] = keyframe ? FLAG_KEYFRAME : 0;
  new DataView(out.buffer).setUint32(2, tick, true);
  out[6] = gap;
  return out;
}

/** The tick in a state frame's header (at least 7 bytes; nothing else is checked). */
export function stateTick(frame) {
  return new DataView(frame.buffer, frame.byteOffset, frame.byteLength).getUint32(2, true);
}

// --------------------------------------------------------------------------- decoder

/** Client side: applies keyframes and deltas, keeping the same state as the encoder. */
export class SnapshotDecoder {
  constructor() {
    this.state = null; // {tick, snap, vpos, vrot}
  }

  get tick() {
    return this.state === null ? null : this.state.tick;
  }

  get snapshot() {
    return this.state === null ? emptySnapshot() : this.state.snap;
  }

  /** Forget everything; the next frame must be a keyframe. */
  reset() {
    this.state = null;
  }

  /** Apply one state frame (a Uint8Array); return the new snapshot. Throws ProtocolError and
   * leaves the state unchanged on a bad frame. */
  decode(frame) {
    if (frame.length < HEADER_SIZE) throw malformed("state frame shorter than its header");
    if (frame[0] !== FRAME_STATE) throw malformed("not a state frame");
    const flags = frame[1];
    const tick = frame[2] + frame[3] * 0x100 + frame[4] * 0x10000 + frame[5] * 0x1000000;
    const gap = frame[6];
    const r = new BitReader(frame.subarray(HEADER_SIZE));
    const keyframe = (flags & FLAG_KEYFRAME) !== 0;
    const prev = this.state;
    let old;
    if (keyframe) {
      if (gap !== 0) throw malformed("keyframe with a baseline");
      old = EMPTY;
    } else {
      if (prev === null || gap === 0 || tick - gap !== prev.tick) throw malformed("delta against a baseline we do not hold");
      old = prev.snap;
    }
    const oldIds = old.ids;
    const nOld = oldIds.length;
    const counts = r.list(3);
    const nRemoved = counts[0];
    const nAdded = counts[1];
    const nFlags = counts[2];
    if (nRemoved > nOld || nAdded > MAX_ENTITIES || nFlags > MAX_ENTITIES) throw outOfRange("entity counts out of range");
    if (keyframe && nRemoved) throw malformed("keyframe removes entities");
    const removed = readIds(r, nRemoved);
    const added = readIds(r, nAdded);
    const addedSlots = new Uint8Array(nAdded);
    for (let i = 0; i < nAdded; i++) addedSlots[i] = r.fixed(4) + 1;

    // Old entities that stay (by id), then the merge of those with the added ones.
    const keepOld = new Uint8Array(nOld).fill(1);
    for (let i = 0, j = 0; i < nRemoved; i++) {
      while (j < nOld && oldIds[j] < removed[i]) j++;
      if (j >= nOld || oldIds[j] !== removed[i]) throw malformed("removes an unknown entity");
      keepOld[j] = 0;
    }
    let nKeepOld = 0;
    for (let j = 0; j < nOld; j++) nKeepOld += keepOld[j];
    const nEnt = nKeepOld + nAdded;
    // Merge old kept (ascending) and added (ascending); an added id among the kept is an error.
    const ids = new Uint32Array(Math.min(nEnt, MAX_ENTITIES + 1));
    const slots = new Uint8Array(ids.length);
    const oldOf = new Int32Array(ids.length); // index in the old snapshot, or -1 when added
    {
      let j = 0;
      let k = 0;
      let n = 0;
      for (;;) {
        while (j < nOld && !keepOld[j]) j++;
        const hasOld = j < nOld;
        const hasAdd = k < nAdded;
        if (!hasOld && !hasAdd) break;
        if (hasOld && hasAdd && oldIds[j] === added[k]) throw malformed("adds an entity that exists");
        if (n >= MAX_ENTITIES) {
          n++;
          break;
        }
        if (hasOld && (!hasAdd || oldIds[j] < added[k])) {
          ids[n] = oldIds[j];
          slots[n] = old.slots[j];
          oldOf[n] = j;
          j++;
        } else {
          ids[n] = added[k];
          slots[n] = addedSlots[k];
          oldOf[n] = -1;
          k++;
        }
        n++;
      }
      if (n > MAX_ENTITIES) {
        // the remaining duplicate checks come first in the reference: finish them
        checkAddedAgainstKept(oldIds, keepOld, added);
        throw outOfRange("too many entities");
      }
    }
    // Kept: in the old snapshot with the same slot count (also an id removed and added again).
    const kept = new Uint8Array(nEnt);
    const src = new Int32Array(nEnt); // the old entity of a kept one
    for (let i = 0, j = 0; i < nEnt; i++) {
      while (j < nOld && oldIds[j] < ids[i]) j++;
      if (j < nOld && oldIds[j] === ids[i] && old.slots[j] === slots[i]) {
        kept[i] = 1;
        src[i] = j;
      } else src[i] = -1;
    }
    const newFlags = new Uint8Array(nEnt);
    for (let i = 0; i < nEnt; i++) if (kept[i]) newFlags[i] = old.flags[src[i]];
    const flagIdx = r.list(nFlags);
    for (let i = 0, acc = -1; i < nFlags; i++) {
      acc += flagIdx[i] + 1;
      flagIdx[i] = acc;
    }
    const flagVal = new Uint8Array(nFlags);
    for (let i = 0; i < nFlags; i++) flagVal[i] = r.fixed(8);
    if (nFlags && flagIdx[nFlags - 1] >= nEnt) throw malformed("flag update for a missing entity");
    for (let i = 0; i < nFlags; i++) newFlags[flagIdx[i]] = flagVal[i];

    // Rows: their source rows, the changed bits, the modes.
    const oldStart = rowStarts(old);
    let nRows = 0;
    for (let i = 0; i < nEnt; i++) nRows += slots[i];
    const changed = new Uint8Array(nEnt);
    for (let i = 0; i < nEnt; i++) changed[i] = kept[i] ? r.fixed(1) : 1;
    const modes = new Uint8Array(nRows);
    const rowSrc = new Int32Array(nRows);
    for (let i = 0, row = 0; i < nEnt; i++) {
      const s = slots[i];
      const base = kept[i] ? oldStart[src[i]] : -1;
      for (let k = 0; k < s; k++, row++) {
        rowSrc[row] = base < 0 ? -1 : base + k;
        if (changed[i]) modes[row] = r.fixed(2);
      }
    }
    const useOld = prev !== null && !keyframe && old.present.length > 0;
    const was = new Uint8Array(nRows);
    let nAbs = 0;
    let relativeWithoutBase = false;
    for (let row = 0; row < nRows; row++) {
      const s = rowSrc[row];
      was[row] = useOld && s >= 0 ? old.present[s] : 0;
      const m = modes[row];
      if (m === MODE_ABSOLUTE) nAbs++;
      else if ((m === MODE_RESIDUAL || m === MODE_ABSENT) && !was[row]) relativeWithoutBase = true;
    }
    if (keyframe) {
      for (let row = 0; row < nRows; row++) {
        if (modes[row] === MODE_RESIDUAL || modes[row] === MODE_ABSENT) throw malformed("keyframe with relative rows");
      }
    }
    if (relativeWithoutBase) throw malformed("relative row without a baseline pose");
    // Packed rotations: a 2-bit index (always 0..3) and three 10-bit codes.
    const absPacked = new Float64Array(nAbs);
    for (let i = 0; i < nAbs; i++) absPacked[i] = r.fixed(32);

    // Values: how many, then read them all.
    const present = new Uint8Array(nRows);
    let nVals = 0;
    for (let row = 0; row < nRows; row++) {
      const m = modes[row];
      present[row] = m === MODE_SAME ? was[row] : m !== MODE_ABSENT ? 1 : 0;
      if (keyframe) nVals += present[row] ? 9 : 0;
      else nVals += m === MODE_RESIDUAL ? 6 : m === MODE_ABSOLUTE ? 3 : 0;
    }
    const vals = r.list(nVals);
    r.checkPadding();

    const pos = new Float64Array(nRows * 3);
    const rot = new Uint16Array(nRows * 3);
    const rotIndex = new Uint8Array(nRows);
    const vpos = new Float64Array(nRows * 3);
    const vrot = new Float64Array(nRows * 3);
    const pvpos = useOld ? prev.vpos : null;
    const pvrot = useOld ? prev.vrot : null;
    let v = 0;
    let a = 0;
    for (let row = 0; row < nRows; row++) {
      if (!present[row]) continue;
      const m = modes[row];
      const w = was[row];
      const s = rowSrc[row];
      const o3 = 3 * s;
      const r3 = 3 * row;
      const oldIndex = w ? old.rotIndex[s] : 0;
      let index = oldIndex;
      let rr0;
      let rr1;
      let rr2;
      if (keyframe) {
        const p = absPacked[a++];
        index = Math.floor(p / 2 ** 30);
        rr0 = Math.floor(p / 2 ** 20) & ROTATION_MAX;
        rr1 = Math.floor(p / 2 ** 10) & ROTATION_MAX;
        rr2 = p & ROTATION_MAX;
        pos[r3] = unzigzag(vals[v]);
        pos[r3 + 1] = unzigzag(vals[v + 1]);
        pos[r3 + 2] = unzigzag(vals[v + 2]);
        vpos[r3] = unzigzag(vals[v + 3]);
        vpos[r3 + 1] = unzigzag(vals[v + 4]);
        vpos[r3 + 2] = unzigzag(vals[v + 5]);
        vrot[r3] = unzigzag(vals[v + 6]);
        vrot[r3 + 1] = unzigzag(vals[v + 7]);
        vrot[r3 + 2] = unzigzag(vals[v + 8]);
        v += 9;
      } else {
        // Prediction: the source row moved on by its velocity (zero without a source).
        const px = w ? old.pos[o3] + pvpos[o3] : 0;
        const py = w ? old.pos[o3 + 1] + pvpos[o3 + 1] : 0;
        const pz = w ? old.pos[o3 + 2] + pvpos[o3 + 2] : 0;
        rr0 = w ? old.rot[o3] + pvrot[o3] : 0;
        rr1 = w ? old.rot[o3 + 1] + pvrot[o3 + 1] : 0;
        rr2 = w ? old.rot[o3 + 2] + pvrot[o3 + 2] : 0;
        if (m === MODE_SAME) {
          pos[r3] = px;
          pos[r3 + 1] = py;
          pos[r3 + 2] = pz;
        } else {
          pos[r3] = px + unzigzag(vals[v]);
          pos[r3 + 1] = py + unzigzag(vals[v + 1]);
          pos[r3 + 2] = pz + unzigzag(vals[v + 2]);
          v += 3;
          if (m === MODE_RESIDUAL) {
            rr0 += unzigzag(vals[v]);
            rr1 += unzigzag(vals[v + 1]);
            rr2 += unzigzag(vals[v + 2]);
            v += 3;
          } else {
            const p = absPacked[a++];
            index = Math.floor(p / 2 ** 30);
            rr0 = Math.floor(p / 2 ** 20) & ROTATION_MAX;
            rr1 = Math.floor(p / 2 ** 10) & ROTATION_MAX;
            rr2 = p & ROTATION_MAX;
          }
        }
        if (w) {
          vpos[r3] = pos[r3] - old.pos[o3];
          vpos[r3 + 1] = pos[r3 + 1] - old.pos[o3 + 1];
          vpos[r3 + 2] = pos[r3 + 2] - old.pos[o3 + 2];
          if (index === oldIndex) {
            vrot[r3] = rr0 - old.rot[o3];
            vrot[r3 + 1] = rr1 - old.rot[o3 + 1];
            vrot[r3 + 2] = rr2 - old.rot[o3 + 2];
          }
        }
      }
      if (rr0 < 0 || rr0 > ROTATION_MAX || rr1 < 0 || rr1 > ROTATION_MAX || rr2 < 0 || rr2 > ROTATION_MAX) {
        throw outOfRange("rotation code out of range");
      }
      rotIndex[row] = index;
      rot[r3] = rr0;
      rot[r3 + 1] = rr1;
      rot[r3 + 2] = rr2;
    }
    const snap = { ids: ids.subarray(0, nEnt), slots: slots.subarray(0, nEnt), flags: newFlags, present, pos, rotIndex, rot };
    this.state = { tick, snap, vpos, vrot };
    return snap;
  }
}

const EMPTY = emptySnapshot();

function readIds(r, count) {
  const gaps = r.list(count);
  let acc = -1;
  for (let i = 0; i < count; i++) {
    acc += gaps[i] + 1;
    gaps[i] = acc;
  }
  if (count && acc > MAX_ENTITY_ID) throw outOfRange("entity id too large");
  return gaps;
}

function checkAddedAgainstKept(oldIds, keepOld, added) {
  const kept = new Set();
  oldIds.forEach((id, j) => keepOld[j] && kept.add(id));
  for (const id of added) if (kept.has(id)) throw malformed("adds an entity that exists");
}

// --------------------------------------------------------------------------- encoder

/** One room's stream, as protocol.SnapshotEncoder: `encode(tick, snap)` gives each tick's
 * frame (a keyframe the first time and after a gap outside 1..255), `keyframe()` the frame a
 * joining member needs. */
export class SnapshotEncoder {
  constructor() {
    this.tick = null;
    this.snap = EMPTY;
    this.vpos = new Float64Array(0);
    this.vrot = new Float64Array(0);
  }

  encode(tick, snap) {
    if (!(tick >= 0 && tick <= 0xffffffff)) throw new RangeError("tick out of range");
    const prev = this.tick;
    if (prev === null || !(tick - prev > 0 && tick - prev <= 255)) {
      const { vpos, vrot } = encodeBody(EMPTY, this.vpos, this.vrot, snap, null);
      Object.assign(this, { tick, snap, vpos, vrot });
      return this.keyframe();
    }
    const { body, vpos, vrot } = encodeBody(this.snap, this.vpos, this.vrot, snap, null);
    Object.assign(this, { tick, snap, vpos, vrot });
    return concat(stateHeader(tick, tick - prev, false), body);
  }

  keyframe() {
    if (this.tick === null) throw new Error("nothing encoded yet");
    const { body } = encodeBody(EMPTY, null, null, this.snap, { vpos: this.vpos, vrot: this.vrot });
    return concat(stateHeader(this.tick, 0, true), body);
  }
}

function concat(a, b) {
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

// The body of `snap` against `old` (velocities oldVpos/oldVrot); with `kv` (keyframe
// velocities) `old` is empty and the velocities are written out.
function encodeBody(old, oldVpos, oldVrot, snap, kv) {
  const nEnt = snap.ids.length;
  const oldStart = rowStarts(old);
  const kept = new Uint8Array(nEnt);
  const src = new Int32Array(nEnt).fill(-1);
  const keptOld = new Uint8Array(old.ids.length);
  for (let i = 0, j = 0; i < nEnt; i++) {
    while (j < old.ids.length && old.ids[j] < snap.ids[i]) j++;
    if (j < old.ids.length && old.ids[j] === snap.ids[i] && old.slots[j] === snap.slots[i]) {
      kept[i] = 1;
      src[i] = j;
      keptOld[j] = 1;
    }
  }
  const removed = [...old.ids].filter((_, j) => !keptOld[j]);
  const addedIdx = [...snap.ids.keys()].filter((i) => !kept[i]);
  const flagIdx = [];
  for (let i = 0; i < nEnt; i++) {
    if (kept[i] ? old.flags[src[i]] !== snap.flags[i] : snap.flags[i] !== 0) flagIdx.push(i);
  }
  let nRows = 0;
  for (let i = 0; i < nEnt; i++) nRows += snap.slots[i];
  const modes = new Uint8Array(nRows);
  const entOf = new Int32Array(nRows);
  const rowSrc = new Int32Array(nRows).fill(-1);
  const was = new Uint8Array(nRows);
  const pred = new Float64Array(nRows * 6); // px, py, pz, r0, r1, r2
  const vpos = new Float64Array(nRows * 3);
  const vrot = new Float64Array(nRows * 3);
  const changed = new Uint8Array(nEnt);
  for (let i = 0, row = 0; i < nEnt; i++) {
    for (let k = 0; k < snap.slots[i]; k++, row++) {
      entOf[row] = i;
      const s = kept[i] ? oldStart[src[i]] + k : -1;
      rowSrc[row] = s;
      const w = s >= 0 && old.present[s] === 1;
      was[row] = w ? 1 : 0;
      const now = snap.present[row] === 1;
      let sameIndex = false;
      if (w) {
        for (let c = 0; c < 3; c++) {
          pred[6 * row + c] = old.pos[3 * s + c] + oldVpos[3 * s + c];
          pred[6 * row + 3 + c] = old.rot[3 * s + c] + oldVrot[3 * s + c];
        }
        sameIndex = old.rotIndex[s] === snap.rotIndex[row];
      }
      let exact = true;
      for (let c = 0; c < 3; c++) {
        if (snap.pos[3 * row + c] !== pred[6 * row + c] || snap.rot[3 * row + c] !== pred[6 * row + 3 + c]) exact = false;
      }
      let m;
      if (now) m = sameIndex ? (exact ? MODE_SAME : MODE_RESIDUAL) : MODE_ABSOLUTE;
      else m = w ? MODE_ABSENT : MODE_SAME;
      modes[row] = m;
      if (m !== MODE_SAME) changed[i] = 1;
      if (w && now) {
        for (let c = 0; c < 3; c++) {
          vpos[3 * row + c] = snap.pos[3 * row + c] - old.pos[3 * s + c];
          if (sameIndex) vrot[3 * row + c] = snap.rot[3 * row + c] - old.rot[3 * s + c];
        }
      }
    }
  }
  const bw = new BitWriter();
  bw.list([removed.length, addedIdx.length, flagIdx.length]);
  bw.gaps(removed);
  bw.gaps(addedIdx.map((i) => snap.ids[i]));
  for (const i of addedIdx) bw.fixed(snap.slots[i] - 1, 4);
  bw.gaps(flagIdx);
  for (const i of flagIdx) bw.fixed(snap.flags[i], 8);
  for (let i = 0; i < nEnt; i++) if (kept[i]) bw.fixed(changed[i], 1);
  const sent = (row) => changed[entOf[row]] || !kept[entOf[row]];
  for (let row = 0; row < nRows; row++) if (sent(row)) bw.fixed(modes[row], 2);
  for (let row = 0; row < nRows; row++) {
    if (sent(row) && modes[row] === MODE_ABSOLUTE) {
      const r3 = 3 * row;
      bw.fixed(snap.rotIndex[row] * 2 ** 30 + snap.rot[r3] * 2 ** 20 + snap.rot[r3 + 1] * 2 ** 10 + snap.rot[r3 + 2], 32);
    }
  }
  const values = [];
  for (let row = 0; row < nRows; row++) {
    const r3 = 3 * row;
    if (kv !== null) {
      if (!snap.present[row]) continue;
      for (let c = 0; c < 3; c++) values.push(snap.pos[r3 + c]);
      for (let c = 0; c < 3; c++) values.push(kv.vpos[r3 + c]);
      for (let c = 0; c < 3; c++) values.push(kv.vrot[r3 + c]);
      continue;
    }
    if (!sent(row)) continue;
    const m = modes[row];
    if (m === MODE_RESIDUAL || m === MODE_ABSOLUTE) {
      for (let c = 0; c < 3; c++) values.push(snap.pos[r3 + c] - pred[6 * row + c]);
    }
    if (m === MODE_RESIDUAL) {
      for (let c = 0; c < 3; c++) values.push(snap.rot[r3 + c] - pred[6 * row + 3 + c]);
    }
  }
  bw.list(values.map(zigzag));
  return { body: bw.finish(), vpos, vrot };
}
