// Control, pose and move frames: encoding, and every kind of bad input giving the same typed
// error (ProtocolError code) as the Python decoder (protocol/messages.py).
import assert from "node:assert/strict";
import { test } from "node:test";

import { decode as refDecode, encode as refEncode } from "@msgpack/msgpack";

import { ErrorCode, ProtocolError } from "../sdk/errors.js";
import {
  AUDIO_OFFER_MAX_BYTES,
  CLIENT_MESSAGES,
  CORE_CLIENT_MESSAGES,
  MAX_CONTROL_BYTES,
  MAX_SDP_CHARS,
  SERVER_MESSAGES,
  checkPoseFrame,
  decodeMessage,
  decodeMove,
  defineMessage,
  encodeMessage,
  encodeUnchecked,
  encodeMove,
  encodePose,
  field,
  messageRegistry,
  poseFrameSize,
} from "../sdk/messages.js";
import { F64, pack, unpack } from "../sdk/msgpack.js";

const hex = (b) => Buffer.from(b).toString("hex");
const unhex = (s) => new Uint8Array(Buffer.from(s, "hex"));
const frame = (map) => pack(map instanceof Map ? map : new Map(Object.entries(map)), 0x01);
const hello = { t: "hello", version: 1, room: "ward-3", name: "Dr A", slots: 3 };

function code(result) {
  assert.ok(result instanceof ProtocolError, `expected a ProtocolError, got ${JSON.stringify(result)}`);
  return result.code;
}

// Each case: [description, frame bytes, registry, expected code]. Every expected code here was
// checked against medverse.protocol.messages.decode_message on the same bytes.
const CASES = [
  ["empty frame", new Uint8Array(0), CLIENT_MESSAGES, "malformed"],
  ["kind byte only", unhex("01"), CLIENT_MESSAGES, "malformed"],
  ["pose kind", encodePose(1, [null]), CLIENT_MESSAGES, "malformed"],
  ["truncated map", frame(hello).subarray(0, 20), CLIENT_MESSAGES, "malformed"],
  ["trailing byte", Uint8Array.from([...frame(hello), 0]), CLIENT_MESSAGES, "malformed"],
  ["reserved type byte 0xc1", unhex("01c1"), CLIENT_MESSAGES, "malformed"],
  ["not a map", unhex("0193010203"), CLIENT_MESSAGES, "malformed"],
  ["invalid UTF-8", unhex("0181a174a2fffe"), CLIENT_MESSAGES, "malformed"],
  ["integer map key", unhex("01810102"), CLIENT_MESSAGES, "malformed"],
  ["bin value", unhex("0182a174a470696e67a16ac40101"), CLIENT_MESSAGES, "malformed"],
  ["ext value", unhex("0182a174a470696e67a16ad40500"), CLIENT_MESSAGES, "malformed"],
  ["map of 65 entries", frame(Object.fromEntries([["t", "ping"], ...Array.from({ length: 64 }, (_, i) => [`k${i}`, 1])])), CLIENT_MESSAGES, "malformed"],
  ["array of 1025", frame({ t: "leave", x: new Array(1025).fill(0) }), CLIENT_MESSAGES, "malformed"],
  ["nested 1025 deep", Uint8Array.from([0x01, 0x81, 0xa1, 0x78, ...new Array(1024).fill(0x91), 0x00]), CLIENT_MESSAGES, "malformed"],
  ["nested 1023 deep is msgpack", Uint8Array.from([0x01, 0x82, 0xa1, 0x74, 0xa5, ...Buffer.from("leave"), 0xa1, 0x78, ...new Array(1022).fill(0x91), 0x00]), CLIENT_MESSAGES, "bad_field"],
  ["oversized", frame({ t: "ping", id: 1, client_time: 0.5, pad: "x".repeat(4096) }), CLIENT_MESSAGES, "oversized"],
  ["no t", frame({ id: 1 }), CLIENT_MESSAGES, "bad_field"],
  ["t not a string", frame({ t: 5 }), CLIENT_MESSAGES, "bad_field"],
  ["unknown type", frame({ t: "teleport" }), CLIENT_MESSAGES, "unknown_type"],
  ["server type to a server", frame({ t: "pong", id: 1, client_time: 0.5, room_time: 1.5 }), CLIENT_MESSAGES, "unknown_type"],
  ["client type to a client", frame(hello), SERVER_MESSAGES, "unknown_type"],
  ["unknown field", frame({ ...hello, extra: 1 }), CLIENT_MESSAGES, "bad_field"],
  ["bin key", unhex("0182a174a56c65617665c40001"), CLIENT_MESSAGES, "bad_field"],
  ["missing field", frame({ t: "ping", id: 1 }), CLIENT_MESSAGES, "bad_field"],
  ["integral float for an int", frame({ t: "ping", id: new F64(1), client_time: 0.5 }), CLIENT_MESSAGES, "bad_field"],
  ["bool for an int", frame({ t: "ping", id: true, client_time: 0.5 }), CLIENT_MESSAGES, "bad_field"],
  ["bool for a float", frame({ t: "ping", id: 1, client_time: false }), CLIENT_MESSAGES, "bad_field"],
  ["NaN", frame({ t: "ping", id: 1, client_time: NaN }), CLIENT_MESSAGES, "out_of_range"],
  ["int out of range", frame({ t: "ping", id: 2 ** 32, client_time: 0.5 }), CLIENT_MESSAGES, "out_of_range"],
  ["uint64 out of range", frame({ t: "ping", id: 2n ** 64n - 1n, client_time: 0.5 }), CLIENT_MESSAGES, "out_of_range"],
  ["negative int", frame({ t: "ping", id: -1, client_time: 0.5 }), CLIENT_MESSAGES, "out_of_range"],
  ["room pattern", frame({ ...hello, room: "ward 3" }), CLIENT_MESSAGES, "out_of_range"],
  ["name with a control character", frame({ ...hello, name: "Dr\u0007A" }), CLIENT_MESSAGES, "out_of_range"],
  ["name of 65 characters", frame({ ...hello, name: "é".repeat(65) }), CLIENT_MESSAGES, "out_of_range"],
  ["slots 17", frame({ ...hello, slots: 17 }), CLIENT_MESSAGES, "out_of_range"],
  ["token too long", frame({ ...hello, token: "x".repeat(2049) }), CLIENT_MESSAGES, "out_of_range"],
  ["moderate action", frame({ t: "moderate", action: "explode" }), CLIENT_MESSAGES, "out_of_range"],
  ["string for a bool", frame({ t: "pause", paused: "yes" }), CLIENT_MESSAGES, "bad_field"],
  ["welcome member entry not a map", frame({ t: "welcome", version: 1, member_id: 1, room: "r", rate: 30, tick: 0, resume: "x", resumed: false, members: [1] }), SERVER_MESSAGES, "bad_field"],
  ["welcome member with an extra key", frame({ t: "welcome", version: 1, member_id: 1, room: "r", rate: 30, tick: 0, resume: "x", resumed: false, members: [{ id: 2, name: "B", x: 1 }] }), SERVER_MESSAGES, "bad_field"],
  ["welcome member id 0", frame({ t: "welcome", version: 1, member_id: 1, room: "r", rate: 30, tick: 0, resume: "x", resumed: false, members: [{ id: 0, name: "B" }] }), SERVER_MESSAGES, "out_of_range"],
  ["grants: 17 entries", frame({ t: "grants", member_id: 1, role: "host", grants: new Array(17).fill("a") }), SERVER_MESSAGES, "bad_field"],
  ["audio offer not SDP", frame({ t: "audio_offer", sdp: "hello", publish: true }), CLIENT_MESSAGES, "out_of_range"],
  ["audio rules float", frame({ t: "audio_rules", zones: [new F64(1)], broadcast: [], whispers: [], self_muted: [], ignored: [] }), SERVER_MESSAGES, "bad_field"],
  ["audio rules too long", frame({ t: "audio_speaking", members: new Array(1025).fill(1) }), SERVER_MESSAGES, "malformed"],
  ["audio rules negative", frame({ t: "audio_speaking", members: [-1] }), SERVER_MESSAGES, "out_of_range"],
  ["spawn: vec3 of 2", frame({ t: "obj_spawn", req: 1, asset: "a".repeat(64), position: [0, 0], rotation: [0, 0, 0, 1], scale: 1 }), CLIENT_MESSAGES, "bad_field"],
  ["spawn: far position", frame({ t: "obj_spawn", req: 1, asset: "a".repeat(64), position: [0, 0, 10001], rotation: [0, 0, 0, 1], scale: 1 }), CLIENT_MESSAGES, "out_of_range"],
  ["spawn: bool in a vector", frame({ t: "obj_spawn", req: 1, asset: "a".repeat(64), position: [0, true, 0], rotation: [0, 0, 0, 1], scale: 1 }), CLIENT_MESSAGES, "bad_field"],
  ["spawn: quaternion norm 2", frame({ t: "obj_spawn", req: 1, asset: "a".repeat(64), position: [0, 0, 0], rotation: [0, 0, 0, 2], scale: 1 }), CLIENT_MESSAGES, "out_of_range"],
  ["spawn: asset not hex", frame({ t: "obj_spawn", req: 1, asset: "A".repeat(64), position: [0, 0, 0], rotation: [0, 0, 0, 1], scale: 1 }), CLIENT_MESSAGES, "out_of_range"],
  ["spawn: scale 0", frame({ t: "obj_spawn", req: 1, asset: "a".repeat(64), position: [0, 0, 0], rotation: [0, 0, 0, 1], scale: 0 }), CLIENT_MESSAGES, "out_of_range"],
  ["view: node value not bool", frame({ t: "obj_view", req: 1, object_id: 1, nodes: { skull: 1 } }), CLIENT_MESSAGES, "bad_field"],
  ["view: node name with a newline", frame({ t: "obj_view", req: 1, object_id: 1, nodes: { "a\u0001": true } }), CLIENT_MESSAGES, "out_of_range"],
  ["view: plane distance", frame({ t: "obj_view", req: 1, object_id: 1, plane: [0, 1, 0, 20000] }), CLIENT_MESSAGES, "out_of_range"],
  ["annotation: 129 points", frame({ t: "anno_create", req: 1, object_id: 1, kind: "stroke", points: new Array(129).fill([0, 0, 0]) }), CLIENT_MESSAGES, "bad_field"],
  ["annotation: object id 2^31", frame({ t: "obj_grab", req: 1, object_id: 2 ** 31 }), CLIENT_MESSAGES, "out_of_range"],
];

for (const [what, bytes, registry, want] of CASES) {
  test(`control frame refused: ${what}`, () => {
    assert.equal(code(decodeMessage(bytes, registry)), want);
  });
}

test("the refusal cases name every decoding error code", () => {
  assert.deepEqual(new Set(CASES.map((c) => c[3])), new Set(["malformed", "oversized", "bad_field", "unknown_type", "out_of_range"]));
});

test("decoded messages: every field, null for absent optional ones, numbers for floats", () => {
  const msg = decodeMessage(frame({ ...hello, token: "jwt" }), CLIENT_MESSAGES);
  assert.deepEqual(msg, { ...hello, resume: null, token: "jwt" });
  const ping = decodeMessage(frame({ t: "ping", id: 7, client_time: 3 }), CLIENT_MESSAGES);
  assert.deepEqual(ping, { t: "ping", id: 7, client_time: 3 });
  const view = decodeMessage(frame({ t: "obj_view", req: 1, object_id: 1, nodes: { skull: false }, plane: [0, 1.05, 0, 0.5] }), CLIENT_MESSAGES);
  assert.deepEqual(view.nodes, new Map([["skull", false]]));
  assert.deepEqual(view.plane, [0, 1, 0, 0.5]); // the normal normalized, as the server does
});

test("encoding: t first, fields in declaration order, floats always float64", () => {
  assert.equal(hex(encodeMessage({ t: "ping", id: 1, client_time: 0 })), "0183a174a470696e67a26964" + "01" + "ab636c69656e745f74696d65cb0000000000000000");
  assert.equal(hex(encodeMessage({ t: "leave" })), "0181a174a56c65617665");
  // Absent optional fields are left out.
  const bytes = encodeMessage({ ...hello, resume: null });
  assert.deepEqual([...unpack(bytes.subarray(1)).keys()], ["t", "version", "room", "name", "slots"]);
  assert.throws(() => encodeMessage({ t: "ping", id: 1, client_time: 0, extra: 1 }), TypeError);
  assert.throws(() => encodeMessage({ t: "teleport" }), TypeError);
});

test("round trip of every message type through encode and decode", () => {
  const samples = {
    hello: { ...hello, resume: "r".repeat(32), token: "t" },
    welcome: { t: "welcome", version: 1, member_id: 7, room: "ward-3", rate: 30, tick: 1200, resume: "r", resumed: false, members: [{ id: 2, name: "B" }] },
    obj_state: { t: "obj_state", object_id: 3, asset: "0".repeat(64), name: "heart", author: "Dr A", position: [1, 2, 3], rotation: [0, 0, 0, 1], scale: 1, nodes: new Map([["valve", true]]), plane: [], holder: null },
    anno: { t: "anno", annotation_id: 1, object_id: 3, kind: "stroke", points: [[0, 0, 0], [0.1, 0.2, 0.3]], author: "Dr A", author_id: 7, time: 1.7e9, seq: 2 ** 53, text: "here", color: 0xff0000, edited: null },
    audio_rules: { t: "audio_rules", zones: [7, 1], broadcast: [], whispers: [], self_muted: [2 ** 32 - 1], ignored: [] },
  };
  for (const [t, msg] of Object.entries(samples)) {
    const registry = CLIENT_MESSAGES.has(t) ? CLIENT_MESSAGES : SERVER_MESSAGES;
    const back = decodeMessage(encodeMessage(msg), registry, 1 << 24);
    assert.ok(!(back instanceof ProtocolError), `${t}: ${back}`);
    assert.deepEqual(back, Object.fromEntries(Object.entries(msg).map(([k, v]) => [k, v ?? null])), t);
    assert.equal(hex(encodeMessage(back)), hex(encodeMessage(msg)), t);
  }
});

test("new message types are declarations", () => {
  const BreathingStart = defineMessage("breathing_start", {
    object_id: field("int", { lo: 1, hi: 2 ** 31 - 1 }),
    inhale: field("float", { lo: 1.0, hi: 10.0 }),
    exhale: field("float", { lo: 1.0, hi: 15.0 }),
    depth: field("float", { lo: 0.05, hi: 1.0, optional: true }),
  });
  const registry = messageRegistry(CLIENT_MESSAGES.values(), [BreathingStart]);
  const msg = { t: "breathing_start", object_id: 1, inhale: 4, exhale: 6, depth: null };
  assert.deepEqual(decodeMessage(encodeMessage(msg, registry), registry), msg);
  assert.equal(code(decodeMessage(frame({ t: "breathing_start", object_id: 1, inhale: 40, exhale: 6 }), registry)), "out_of_range");
  assert.throws(() => messageRegistry([BreathingStart], [defineMessage("breathing_start")]), /already taken/);
});

test("msgpack: the same values as @msgpack/msgpack, floats kept apart", () => {
  const values = [0, 1, 127, 128, 255, 256, 65535, 65536, 2 ** 32 - 1, 2 ** 32, 2 ** 53 - 1, -1, -32, -33, -128, -129, -32768, -32769, -(2 ** 31), -(2 ** 31) - 1, 0.5, -1.25e300, "", "x".repeat(31), "x".repeat(32), "é".repeat(200), "y".repeat(70000), true, false, null, [], new Array(16).fill(1), new Array(70000).fill(0), { a: [1, { b: "c" }] }];
  for (const v of values) {
    const mine = pack(v);
    assert.equal(hex(mine), hex(refEncode(v)), `pack ${JSON.stringify(v)?.slice(0, 40)}`);
    const back = unpack(mine, { maxArrayLen: 1 << 20, maxStrLen: 1 << 20, maxMapLen: 64 });
    const plain = (x) => (x instanceof F64 ? x.value : x instanceof Map ? Object.fromEntries([...x].map(([k, y]) => [k, plain(y)])) : Array.isArray(x) ? x.map(plain) : x);
    assert.deepEqual(plain(back), refDecode(mine));
  }
  assert.ok(unpack(pack(new F64(1))) instanceof F64);
  assert.equal(unpack(pack(1)), 1);
  assert.equal(unpack(unhex("cfffffffffffffffff")), 2n ** 64n - 1n);
});

test("pose frames: layout, size, and the server's structural check", () => {
  const f = encodePose(5, [[[0, 1.6, 0], [0, 0, 0, 1]], null, [[0.25, 1.1, 0.15], [0, 0.7071, 0, 0.7071]]]);
  assert.equal(f.length, poseFrameSize(3));
  assert.equal(hex(f.subarray(0, 8)), "0300050005000000");
  const d = new DataView(f.buffer);
  assert.equal(d.getFloat32(8 + 4, true), Math.fround(1.6));
  assert.equal(d.getFloat32(8 + 28 + 24, true), 1); // an absent slot holds the identity
  assert.equal(checkPoseFrame(f, 3), null);
  assert.equal(code(checkPoseFrame(f.subarray(0, 60), 3)), ErrorCode.MALFORMED);
  assert.equal(code(checkPoseFrame(Uint8Array.from([...f, 0]), 3)), ErrorCode.OVERSIZED);
  assert.equal(code(checkPoseFrame(f, 2)), ErrorCode.OVERSIZED);
  const reserved = f.slice();
  reserved[1] = 1;
  assert.equal(code(checkPoseFrame(reserved, 3)), ErrorCode.MALFORMED);
  const mask = encodePose(1, [null, null, null, [[0, 0, 0], [0, 0, 0, 1]]]).subarray(0, poseFrameSize(3));
  assert.equal(code(checkPoseFrame(mask, 3)), ErrorCode.OUT_OF_RANGE);
});

test("move frames: encode, decode and refusals", () => {
  const f = encodeMove(3, 9, [1, 2, 3], [0, 0, 0, 1.05], 1.5);
  assert.equal(f.length, 44);
  assert.equal(hex(f.subarray(0, 12)), "040000000300000009000000");
  const m = decodeMove(f);
  assert.deepEqual(m, { objectId: 3, seq: 9, position: [1, 2, 3], rotation: [0, 0, 0, 1], scale: 1.5 });
  assert.equal(code(decodeMove(f.subarray(0, 43))), "malformed");
  assert.equal(code(decodeMove(Uint8Array.from([...f, 0]))), "oversized");
  assert.equal(code(decodeMove(encodeMove(0, 1, [0, 0, 0], [0, 0, 0, 1]))), "out_of_range");
  assert.equal(code(decodeMove(encodeMove(1, 1, [0, 0, NaN], [0, 0, 0, 1]))), "out_of_range");
  assert.equal(code(decodeMove(encodeMove(1, 1, [0, 0, 1e5], [0, 0, 0, 1]))), "out_of_range");
  assert.equal(code(decodeMove(encodeMove(1, 1, [0, 0, 0], [0, 0, 0, 1], 2000))), "out_of_range");
  const reserved = f.slice();
  reserved[2] = 1;
  assert.equal(code(decodeMove(reserved)), "malformed");
});

test("control frames are bounded at 4096 bytes, audio offers at 16 KiB", () => {
  assert.equal(MAX_CONTROL_BYTES, 4096);
  const sdp = "v=0\r\n" + "a=candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host\r\n".repeat(100);
  const offer = { t: "audio_offer", sdp, publish: true };
  const f = encodeMessage(offer);
  assert.ok(f.length > 5000 && f.length < AUDIO_OFFER_MAX_BYTES);
  assert.deepEqual(decodeMessage(f, CLIENT_MESSAGES), offer);
  // Without the audio family there is no larger type.
  assert.equal(code(decodeMessage(f, messageRegistry(CORE_CLIENT_MESSAGES))), "oversized");
  const tooLong = [
    { t: "moderate", action: "mute", member_id: 2, reason: "x".repeat(MAX_CONTROL_BYTES) },
    { t: "audio_offer", sdp: "v=0\n" + "x".repeat(AUDIO_OFFER_MAX_BYTES), publish: true },
  ];
  const refusals = [
    ...tooLong.map((m) => encodeUnchecked(m)),
    Uint8Array.from([0x01, ...new Uint8Array(8000)]),
    frame({ sdp: "x".repeat(5000) }),
  ];
  for (const r of refusals) assert.equal(code(decodeMessage(r, CLIENT_MESSAGES)), "oversized");
  // The encoder refuses them too, with the same typed error, rather than send them.
  for (const m of tooLong) assert.throws(() => encodeMessage(m, CLIENT_MESSAGES), (e) => e.code === "oversized");
  const msg = { t: "audio_offer", sdp: "v=0\n" + "x".repeat(MAX_SDP_CHARS - 3), publish: true };
  const long = encodeUnchecked(msg);
  assert.ok(long.length <= AUDIO_OFFER_MAX_BYTES);
  assert.equal(code(decodeMessage(long, CLIENT_MESSAGES)), "out_of_range");
  assert.throws(() => encodeMessage(msg, CLIENT_MESSAGES), (e) => e.code === "out_of_range");
  assert.throws(() => encodeMessage({ t: "moderate", action: "ban", member_id: -1, req: 1 }), (e) => e.code === "out_of_range");
});
