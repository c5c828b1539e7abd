// State frames the receiver must refuse (SPEC.md "Receiver checks"), with the codes of
// protocol.SnapshotDecoder, and the decoder's state left unchanged.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { ProtocolError } from "../sdk/errors.js";
import { SnapshotDecoder, SnapshotEncoder, entityIndex, makeSnapshot, rowStarts } from "../sdk/snapshot.js";

const unhex = (s) => new Uint8Array(Buffer.from(s, "hex"));
const vectors = JSON.parse(readFileSync(new URL("../../protocol/vectors/snapshots.json", import.meta.url), "utf8"));
const steps = (name) => vectors.cases.find((c) => c.name === name).steps.map((s) => unhex(s.frame));

function refused(dec, frame, code) {
  const before = dec.state;
  assert.throws(() => dec.decode(frame), (err) => err instanceof ProtocolError && err.code === code);
  assert.equal(dec.state, before, "state unchanged");
}

test("header checks", () => {
  const [key, delta] = steps("steady_motion");
  const dec = new SnapshotDecoder();
  refused(dec, key.subarray(0, 6), "malformed");
  refused(dec, Uint8Array.from([0x03, ...key.subarray(1)]), "malformed");
  refused(dec, delta, "malformed"); // a delta without a baseline
  const gapKey = key.slice();
  gapKey[6] = 1;
  refused(dec, gapKey, "malformed");
  dec.decode(key);
  const wrongBase = delta.slice();
  wrongBase[6] = 2;
  refused(dec, wrongBase, "malformed");
  const zeroGap = delta.slice();
  zeroGap[6] = 0;
  refused(dec, zeroGap, "malformed");
  dec.decode(delta);
  assert.equal(dec.tick, 2);
});

test("bit stream checks: truncation, padding, long prefixes", () => {
  const [key] = steps("keyframe");
  const dec = new SnapshotDecoder();
  for (let n = 7; n < key.length; n++) refused(dec, key.subarray(0, n), "malformed");
  refused(dec, Uint8Array.from([...key, 0]), "malformed");
  const last = key.slice();
  last[last.length - 1] |= 1; // a padding bit set (the keyframe's last byte has padding)
  refused(dec, last, "malformed");
  // 41 zeros before the first count's one bit.
  refused(dec, unhex("02010000000000" + "000000000000" + "4000"), "malformed");
  dec.decode(key);
  assert.equal(dec.tick, 100);
});

// A frame from a header and a body written as bit strings (spaces ignored, zero padded).
function frameOf(header, bitString) {
  const b = bitString.replaceAll(" ", "");
  const bytes = [];
  for (let i = 0; i < b.length; i += 8) bytes.push(parseInt(b.slice(i, i + 8).padEnd(8, "0"), 2));
  return Uint8Array.from([...unhex(header), ...bytes]);
}
const KEY = "02016400000000"; // keyframe, tick 100
const DELTA = "02000200000001"; // delta, tick 2, gap 1

test("count and entity checks", () => {
  const dec = new SnapshotDecoder();
  // counts 1, 0, 0 in a keyframe (nothing to remove)
  refused(dec, frameOf(KEY, "01 1 1 0"), "out_of_range");
  // counts 0, 4097, 0
  refused(dec, frameOf(KEY, "1 0000000000001 1 000000000010"), "out_of_range");
  // a prefix of 41 zeros
  refused(dec, frameOf(KEY, "0".repeat(41) + "1 1 1"), "malformed");
  const [key, delta] = steps("steady_motion");
  dec.decode(key); // entity 7
  // removes entity 8: counts 1, 0, 0, removed gap 8
  refused(dec, frameOf(DELTA, "01 1 1 0 0001 001"), "malformed");
  // adds entity 7 again: counts 0, 1, 0, added gap 7, slots 1
  refused(dec, frameOf(DELTA, "1 01 1 0 0001 000 0000"), "malformed");
  // flag index 1 of one entity: counts 0, 0, 1, index gap 1, value 0
  refused(dec, frameOf(DELTA, "1 1 01 0 01 0 00000000"), "malformed");
  dec.decode(delta);
});

test("a keyframe with a relative row", () => {
  // counts 0, 1, 0; added id 0 with 1 slot; its mode RESIDUAL
  refused(new SnapshotDecoder(), frameOf(KEY, "1 01 1 0 1 0000 01"), "malformed");
});

test("rotation codes out of range", () => {
  const dec = new SnapshotDecoder();
  // a delta pushing a rotation code below 0: steady_motion's baseline with a residual of
  // -1000 on c0 (rotation codes 511 there)
  const enc = new SnapshotEncoder();
  const snap = (rot0) => makeSnapshot({ ids: [7], slots: [1], flags: [0], present: [1], pos: [[0, 0, 0]], rotIndex: [3], rot: [[rot0, 511, 511]] });
  dec.decode(enc.encode(1, snap(600)));
  const good = enc.encode(2, snap(0)); // RESIDUAL: -600
  // The same delta (-600) against a baseline at 500 gives -100.
  const low = new SnapshotDecoder();
  low.decode(new SnapshotEncoder().encode(1, snap(500)));
  refused(low, good, "out_of_range");
  assert.equal(dec.decode(good).rot[0], 0);
});

test("snapshot helpers", () => {
  const dec = new SnapshotDecoder();
  const s = dec.decode(steps("keyframe")[0]);
  assert.deepEqual([...s.ids], [3, 42]);
  assert.equal(entityIndex(s, 42), 1);
  assert.equal(entityIndex(s, 5), -1);
  assert.deepEqual([...rowStarts(s)], [0, 3]);
});

test("corrupted frames give a snapshot or a ProtocolError, nothing else", () => {
  let seed = 12345;
  const rand = (n) => {
    seed = (seed * 1103515245 + 12345) % 2 ** 31;
    return seed % n;
  };
  for (const c of vectors.cases) {
    const frames = c.steps.map((s) => unhex(s.frame));
    for (let trial = 0; trial < 200; trial++) {
      const dec = new SnapshotDecoder();
      const k = rand(frames.length);
      for (let i = 0; i < k; i++) dec.decode(frames[i]);
      const f = frames[k].slice();
      f[7 + rand(Math.max(1, f.length - 7))] ^= 1 << rand(8);
      try {
        dec.decode(f.subarray(0, f.length - rand(2)));
      } catch (err) {
        assert.ok(err instanceof ProtocolError, String(err));
      }
    }
  }
});
