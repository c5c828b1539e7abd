// Decode time of a 12-avatar state frame (head and two hands each, moving every tick, one of
// them turning and talking): `npm run bench` (node bench/decode.js [frames]).
import { SnapshotDecoder, SnapshotEncoder, makeSnapshot } from "../sdk/snapshot.js";
import { quantizePosition, quantizeRotation } from "../sdk/quant.js";

const AVATARS = 12;
const TICKS = Number(process.argv[2] ?? 3000);

function room(tick) {
  const ids = [];
  const slots = [];
  const flags = [];
  const present = [];
  const pos = [];
  const rotIndex = [];
  const rot = [];
  for (let a = 0; a < AVATARS; a++) {
    ids.push(a + 1);
    slots.push(3);
    flags.push(a === 0 && tick % 60 < 30 ? 1 : 0);
    for (let s = 0; s < 3; s++) {
      const t = tick / 30 + a + s * 0.3;
      present.push(1);
      pos.push(...quantizePosition([Math.cos(a) * 2 + 0.05 * Math.sin(t * 1.7), 1.6 - 0.4 * (s > 0) + 0.02 * Math.sin(t * 2.3), Math.sin(a) * 2 + 0.03 * Math.cos(t)]));
      const angle = 0.3 * Math.sin(t * 0.7);
      const q = quantizeRotation([0.05 * Math.sin(t), Math.sin(angle / 2), 0.02 * Math.cos(t * 1.3), Math.cos(angle / 2)]);
      rotIndex.push(q.index);
      rot.push(...q.rot);
    }
  }
  return makeSnapshot({ ids, slots, flags, present, pos, rotIndex, rot });
}

const enc = new SnapshotEncoder();
const frames = [];
for (let t = 1; t <= TICKS; t++) frames.push(enc.encode(t, room(t)));
const keyframe = enc.keyframe();

const dec = new SnapshotDecoder();
const times = [];
for (let round = 0; round < 3; round++) {
  dec.reset();
  for (const f of frames) {
    const t0 = process.hrtime.bigint();
    dec.decode(f);
    times.push(Number(process.hrtime.bigint() - t0) / 1e3);
  }
}
const warm = times.slice(frames.length).sort((x, y) => x - y); // after the first round (JIT warm-up)
const q = (p) => warm[Math.min(warm.length - 1, Math.floor(p * warm.length))].toFixed(1);
let kt = 0;
for (let i = 0; i < 1000; i++) {
  const t0 = process.hrtime.bigint();
  new SnapshotDecoder().decode(keyframe);
  kt += Number(process.hrtime.bigint() - t0) / 1e3;
}
const bytes = frames.slice(1).reduce((n, f) => n + f.length, 0) / (frames.length - 1);
console.log(`${AVATARS} avatars, ${frames.length} deltas x 2 rounds (after a warm-up round): ${bytes.toFixed(1)} B/frame`);
console.log(`delta decode: p50 ${q(0.5)} us, p99 ${q(0.99)} us, max ${q(1)} us`);
console.log(`keyframe (${keyframe.length} B) decode: mean ${(kt / 1000).toFixed(1)} us`);
