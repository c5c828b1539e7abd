// Every file in protocol/vectors/, replayed byte for byte in both directions.
import assert from "node:assert/strict";
import { readFileSync, readdirSync } from "node:fs";
import { test } from "node:test";

import { Connection, LocalProtocolError } from "../sdk/connection.js";
import { CLIENT_MESSAGES, SERVER_MESSAGES, decodeMessage, encodeMessage } from "../sdk/messages.js";
import { dequantizePosition, dequantizeRotation, packRotation, quantizePosition, quantizeRotation } from "../sdk/quant.js";
import { SnapshotDecoder, SnapshotEncoder, makeSnapshot } from "../sdk/snapshot.js";

const DIR = new URL("../../protocol/vectors/", import.meta.url);
const load = (name) => JSON.parse(readFileSync(new URL(name, DIR), "utf8"));
const hex = (bytes) => Buffer.from(bytes).toString("hex");
const unhex = (s) => new Uint8Array(Buffer.from(s, "hex"));

test("every vector file is replayed here", () => {
  const files = readdirSync(DIR).filter((f) => f.endsWith(".json")).sort();
  assert.deepEqual(files, ["connection.json", "quantization.json", "snapshots.json"]);
});

test("quantization.json: positions", () => {
  const v = load("quantization.json");
  for (const p of v.positions) {
    assert.deepEqual(quantizePosition(p.in), p.mm, `quantize ${p.in}`);
    assert.deepEqual(dequantizePosition(p.mm), p.dequantized, `dequantize ${p.mm}`);
  }
});

test("quantization.json: rotations", () => {
  const v = load("quantization.json");
  assert.ok(v.rotations.length >= 30);
  for (const r of v.rotations) {
    const { index, rot } = quantizeRotation(r.in);
    assert.equal(index, r.rot_index, `index of ${r.in}`);
    assert.deepEqual(rot, r.rot, `codes of ${r.in}`);
    assert.equal(packRotation(index, rot), r.packed);
    // Exact binary64 equality, component by component.
    assert.deepEqual(dequantizeRotation(r.rot_index, r.rot), r.dequantized, `dequantize ${r.rot}`);
  }
});

function snapshotOf(s) {
  return makeSnapshot({ ids: s.ids, slots: s.slots, flags: s.flags, present: s.present, pos: s.pos, rotIndex: s.rot_index, rot: s.rot });
}

function plain(snap) {
  return {
    ids: [...snap.ids],
    slots: [...snap.slots],
    flags: [...snap.flags],
    present: [...snap.present],
    pos: [...snap.pos],
    rot_index: [...snap.rotIndex],
    rot: [...snap.rot],
  };
}

for (const c of load("snapshots.json").cases) {
  test(`snapshots.json: ${c.name}`, () => {
    const enc = new SnapshotEncoder();
    const dec = new SnapshotDecoder();
    for (const step of c.steps) {
      const frame = step.action === "encode" ? enc.encode(step.tick, snapshotOf(step.snapshot)) : enc.keyframe();
      assert.equal(hex(frame), step.frame, `encoded frame at tick ${step.tick} (${step.action})`);
      const snap = dec.decode(unhex(step.frame));
      assert.equal(dec.tick, step.tick);
      const want = { ...step.snapshot, pos: step.snapshot.pos.flat(), rot: step.snapshot.rot.flat() };
      assert.deepEqual(plain(snap), want, `decoded snapshot at tick ${step.tick}`);
    }
  });
}

for (const c of load("connection.json").cases) {
  test(`connection.json: ${c.name}`, () => {
    const conn = new Connection(c.role);
    // What the peer sends: server messages to a client, client messages to a server.
    const peer = c.role === "client" ? SERVER_MESSAGES : CLIENT_MESSAGES;
    c.steps.forEach((step, i) => {
      const where = `step ${i}`;
      if ("send" in step) {
        if (step.error === "local") {
          assert.throws(() => conn.send(step.send), LocalProtocolError, where);
        } else {
          const frame = conn.send(step.send);
          // The frame decodes back to the message the step names.
          const own = c.role === "client" ? CLIENT_MESSAGES : SERVER_MESSAGES;
          assert.equal(decodeMessage(frame, own, 1 << 24).t, step.send.t, where);
        }
      } else if ("recv" in step) {
        const data = unhex(step.recv);
        const ev = conn.receive(data, { text: step.text ?? false });
        assert.equal(ev.event, step.event, where);
        if (ev.event === "Refused") {
          assert.deepEqual([ev.error.code, ev.fatal], [step.code, step.fatal], where);
          // A request refused by name: the answer the server sends, as the vectors give it.
          assert.deepEqual(ev.error.answer, step.answer, `${where}: answer`);
        }
        if (ev.event === "MessageReceived") {
          assert.equal(ev.message.t, step.type, where);
          // Encoding the decoded message gives the Python encoder's bytes back.
          assert.equal(hex(encodeMessage(ev.message, peer)), step.recv, `${where}: re-encoded`);
        }
        if (ev.event === "FrameReceived") assert.equal(ev.kind, step.kind, where);
        if (ev.event === "Ignored") assert.equal(ev.reason, step.reason, where);
      } else {
        conn.closed();
      }
      assert.equal(conn.state, step.state, `${where}: state`);
    });
  });
}
