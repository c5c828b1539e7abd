// The client over a scripted WebSocket (no server): the pose rate, an application's own message
// types, close codes and closing while waiting in a lobby.
import assert from "node:assert/strict";
import { test } from "node:test";

import { CloseReason, MedverseClient } from "../sdk/client.js";
import { CLIENT_MESSAGES, FRAME_POSE, Hello, SERVER_MESSAGES, decodeMessage, defineMessage, encodeMessage, field, messageRegistry } from "../sdk/messages.js";

/** A WebSocket the test plays the server of. */
class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeSocket.all.push(this);
    queueMicrotask(() => {
      this.readyState = 1;
      this.onopen?.();
    });
  }
  send(data) {
    this.sent.push(new Uint8Array(data));
  }
  close(code = 1000) {
    if (this.readyState > 1) return;
    this.readyState = 3;
    queueMicrotask(() => this.onclose?.({ code }));
  }
  deliver(msg, registry) {
    const bytes = encodeMessage(msg, registry);
    this.onmessage?.({ data: bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength) });
  }
  controls(registry) {
    return this.sent.filter((f) => f[0] === 1).map((f) => decodeMessage(f, registry, 1 << 20));
  }
}

const welcome = (memberId = 7) => ({ t: "welcome", version: 1, member_id: memberId, room: "r", rate: 20, tick: 0, resume: "tok", resumed: false, members: [] });
const tick = () => new Promise((r) => setTimeout(r, 0));

async function joined(options = {}) {
  FakeSocket.all = [];
  const c = new MedverseClient({ url: "ws://server", room: "r", WebSocket: FakeSocket, pingInterval: 0, ...options });
  const started = c.start();
  await tick();
  const ws = FakeSocket.all[0];
  ws.deliver(welcome(), SERVER_MESSAGES);
  await started;
  return { c, ws };
}

test("hello names the room, the slots and the token; the URL gets /ws", async () => {
  const { c, ws } = await joined({ token: "t0k", slots: 1 });
  assert.equal(ws.url, "ws://server/ws");
  const [h] = ws.controls(messageRegistry([Hello]));
  assert.deepEqual([h.room, h.slots, h.token, h.resume], ["r", 1, "t0k", null]);
  assert.equal(c.memberId, 7);
  c.close();
});

test("poses are sent at most once per tick, the newest one", async () => {
  const { c, ws } = await joined();
  const poses = () => ws.sent.filter((f) => f[0] === FRAME_POSE);
  for (let i = 0; i < 10; i++) c.sendPose({ position: [i, 0, 0] });
  assert.equal(poses().length, 1); // the first at once
  await new Promise((r) => setTimeout(r, 1000 / 20 + 30));
  assert.equal(poses().length, 2); // then the newest, one tick later
  const last = poses()[1];
  const d = new DataView(last.buffer, last.byteOffset);
  assert.equal(d.getUint32(4, true), 10);
  assert.equal(d.getFloat32(8, true), 9);
  assert.throws(() => c.sendPose({ position: [NaN, 0, 0] }), RangeError);
  c.close();
});

test("an application's message types are one declaration away", async () => {
  const BreathingStart = defineMessage("breathing_start", { object_id: field("int", { lo: 1, hi: 2 ** 31 - 1 }), inhale: field("float", { lo: 1, hi: 10 }) });
  const BreathingState = defineMessage("breathing_state", { phase: field("str", { maxLen: 16 }) });
  const { c, ws } = await joined({ messages: [BreathingStart, BreathingState] });
  const got = [];
  c.on("breathing_state", (m) => got.push(m.phase));
  ws.deliver({ t: "breathing_state", phase: "inhale" }, messageRegistry([BreathingState]));
  assert.deepEqual(got, ["inhale"]);
  // The client's own messages become events, delivered once.
  const joinedEvents = [];
  c.on("joined", (ev) => joinedEvents.push(ev));
  ws.deliver({ t: "joined", member_id: 9, name: "Nurse" }, SERVER_MESSAGES);
  assert.deepEqual(joinedEvents, [{ type: "joined", memberId: 9, name: "Nurse" }]);
  assert.equal(c.members.get(9), "Nurse");
  c.send({ t: "breathing_start", object_id: 3, inhale: 4 });
  const [m] = ws.controls(messageRegistry([BreathingStart])).slice(-1);
  assert.deepEqual(m, { t: "breathing_start", object_id: 3, inhale: 4 });
  c.close();
});

test("a connection replaced by a resumed one stops without reconnecting", async () => {
  const { c, ws } = await joined();
  const events = [];
  c.on("*", (ev) => events.push(ev.type));
  ws.close(4002);
  await tick();
  assert.deepEqual(events, ["closed"]);
  assert.equal(c.closedReason, CloseReason.REPLACED);
  assert.equal(FakeSocket.all.length, 1);
});

test("a dropped connection reconnects with the resume token", async () => {
  const { c, ws } = await joined({ maxBackoff: 0.01 });
  const resumed = new Promise((r) => c.on("resumed", r));
  ws.readyState = 3;
  ws.onclose({ code: 1006 });
  while (FakeSocket.all.length < 2) await tick();
  const ws2 = FakeSocket.all[1];
  await tick();
  assert.equal(ws2.controls(messageRegistry([Hello]))[0].resume, "tok");
  ws2.deliver({ ...welcome(), resumed: true }, SERVER_MESSAGES);
  assert.deepEqual(await resumed, { type: "resumed", memberId: 7, sameMember: true });
  assert.equal(c.socket, ws2);
  c.close();
});

test("closing while waiting in a lobby ends the join", async () => {
  FakeSocket.all = [];
  const c = new MedverseClient({ url: "ws://server/ws", room: "r", WebSocket: FakeSocket, pingInterval: 0 });
  const events = [];
  c.on("*", (ev) => events.push(ev));
  const started = c.start();
  await tick();
  FakeSocket.all[0].deliver({ t: "waiting", room: "r", lobby_id: 4 }, SERVER_MESSAGES);
  assert.equal(c.state, "lobby");
  assert.deepEqual(events[0], { type: "waiting", room: "r", lobbyId: 4 });
  c.close();
  await assert.rejects(started);
  assert.equal(events.at(-1).type, "closed");
  assert.equal(events.at(-1).reason, CloseReason.LEFT);
});

test("a redirect answering the hello is followed with the same token", async () => {
  FakeSocket.all = [];
  const c = new MedverseClient({ url: "ws://a", room: "r", token: "t0k", WebSocket: FakeSocket, pingInterval: 0 });
  const started = c.start();
  await tick();
  FakeSocket.all[0].deliver({ t: "redirect", url: "ws://b:9001/ws", reason: "owner" }, SERVER_MESSAGES);
  while (FakeSocket.all.length < 2) await tick();
  const ws2 = FakeSocket.all[1];
  assert.equal(ws2.url, "ws://b:9001/ws");
  await tick();
  const [h] = ws2.controls(messageRegistry([Hello]));
  assert.deepEqual([h.room, h.token], ["r", "t0k"]);
  ws2.deliver(welcome(), SERVER_MESSAGES);
  await started;
  assert.equal(c.url, "ws://b:9001/ws");
  assert.equal(c.redirects, 1);
  assert.equal(FakeSocket.all[0].readyState, 3);
  c.close();
});

test("redirects that never end fail the join", async () => {
  FakeSocket.all = [];
  const c = new MedverseClient({ url: "ws://a", room: "r", WebSocket: FakeSocket, pingInterval: 0 });
  const started = c.start();
  for (let i = 0; i < 6; i++) {
    while (FakeSocket.all.length < i + 1) await tick();
    await tick();
    FakeSocket.all[i].deliver({ t: "redirect", url: `ws://n${i}/ws`, reason: "owner" }, SERVER_MESSAGES);
  }
  await assert.rejects(started, /more than 5 redirects/u);
});

test("a room that moves redirects its members, who resume at once with their token", async () => {
  const { c, ws } = await joined({ maxBackoff: 5 });
  const events = [];
  c.on("*", (ev) => events.push(ev));
  ws.deliver({ t: "redirect", url: "ws://c/ws", reason: "moving" }, SERVER_MESSAGES);
  assert.equal(c.state, "closing");
  ws.close(1001);
  while (FakeSocket.all.length < 2) await tick();
  const ws2 = FakeSocket.all[1];
  assert.equal(ws2.url, "ws://c/ws");
  assert.equal(events.find((e) => e.type === "reconnecting").delay, 0);
  await tick();
  assert.equal(ws2.controls(messageRegistry([Hello]))[0].resume, "tok");
  const resumed = new Promise((r) => c.on("resumed", r));
  ws2.deliver({ ...welcome(), resumed: true }, SERVER_MESSAGES);
  assert.deepEqual(await resumed, { type: "resumed", memberId: 7, sameMember: true });
  c.close();
});

test("moved to a room another server runs: the redirect's grant is the next hello's token, once", async () => {
  const { c, ws } = await joined({ token: "join-tok", maxBackoff: 0.01 });
  const events = [];
  c.on("*", (ev) => events.push(ev));
  ws.deliver({ t: "moved", room: "ward-9", by: "Dr A", reason: "review", access: "acc" }, SERVER_MESSAGES);
  assert.equal(c.roomAccess, "acc");
  assert.equal(c.httpToken, "acc");
  ws.deliver({ t: "redirect", url: "ws://b/ws", reason: "transfer", token: "grant" }, SERVER_MESSAGES);
  ws.close(1000);
  while (FakeSocket.all.length < 2) await tick();
  const ws2 = FakeSocket.all[1];
  assert.equal(ws2.url, "ws://b/ws");
  await tick();
  const [h] = ws2.controls(messageRegistry([Hello]));
  assert.deepEqual([h.room, h.token], ["ward-9", "grant"]);
  ws2.deliver({ ...welcome(12), room: "ward-9", resume: "tok2" }, SERVER_MESSAGES);
  while (!events.some((e) => e.type === "arrived")) await tick();
  await tick();
  assert.deepEqual(
    events.filter((e) => e.type === "arrived"),
    [{ type: "arrived", room: "ward-9", memberId: 12, members: [] }],
  );
  assert.ok(!events.some((e) => e.type === "resumed"));
  assert.equal(c.room, "ward-9");
  // The grant was for that one join: a later drop resumes with the join token.
  ws2.readyState = 3;
  ws2.onclose({ code: 1006 });
  while (FakeSocket.all.length < 3) await tick();
  await tick();
  const [h3] = FakeSocket.all[2].controls(messageRegistry([Hello]));
  assert.deepEqual([h3.room, h3.token, h3.resume], ["ward-9", "join-tok", "tok2"]);
  assert.equal(c.httpToken, "acc");
  c.close();
});

test("a room another server runs refusing a moved member ends the session: the grant joins once", async () => {
  const { c, ws } = await joined({ token: "join-tok", maxBackoff: 0.01 });
  const closed = new Promise((r) => c.on("closed", r));
  ws.deliver({ t: "moved", room: "ward-9", by: "Dr A", reason: "" }, SERVER_MESSAGES);
  ws.deliver({ t: "redirect", url: "ws://b/ws", reason: "transfer", token: "grant" }, SERVER_MESSAGES);
  ws.close(1000);
  while (FakeSocket.all.length < 2) await tick();
  const ws2 = FakeSocket.all[1];
  await tick();
  ws2.deliver({ t: "error", code: "room_locked", message: "locked", fatal: true }, SERVER_MESSAGES);
  ws2.close(1008);
  const ev = await closed;
  assert.equal(ev.reason, "room_locked");
  await tick();
  assert.equal(FakeSocket.all.length, 2);
});

test("back in the join token's room after a move (the resume came too late), the move's credential is dropped", async () => {
  const { c, ws } = await joined({ token: "join-tok", maxBackoff: 0.01 });
  ws.deliver({ t: "moved", room: "ward-9", by: "Dr A", reason: "", access: "acc" }, SERVER_MESSAGES);
  ws.deliver({ ...welcome(12), room: "ward-9", resume: "tok2" }, SERVER_MESSAGES);
  assert.equal(c.room, "ward-9");
  assert.equal(c.httpToken, "acc");
  ws.readyState = 3;
  ws.onclose({ code: 1006 });
  while (FakeSocket.all.length < 2) await tick();
  const ws2 = FakeSocket.all[1];
  await tick();
  ws2.deliver({ t: "error", code: "bad_resume", message: "cannot resume; joining anew", fatal: false }, SERVER_MESSAGES);
  const resumed = new Promise((r) => c.on("resumed", r));
  ws2.deliver({ ...welcome(3), room: "r" }, SERVER_MESSAGES);
  await resumed;
  assert.equal(c.room, "r");
  assert.equal(c.roomAccess, null);
  assert.equal(c.httpToken, "join-tok");
  c.close();
});

test("requests the server drops over its rate limit fail at once: refused by their req", async () => {
  const { c, ws } = await joined({ requestTimeout: 60 });
  const t0 = Date.now();
  const calls = [];
  for (let i = 0; i < 50; i++) calls.push(c.request((req) => ({ t: "request_unmute", req })));
  calls.push(c.grab(12));
  await tick();
  const sent = ws.controls(CLIENT_MESSAGES).filter((m) => m.t === "request_unmute" || m.t === "obj_grab");
  assert.equal(sent.length, 51);
  // The server applied the first ten and dropped the rest, naming each by its req.
  for (const [i, m] of sent.entries()) {
    if (i < 10) ws.deliver({ t: "ack", req: m.req }, SERVER_MESSAGES);
    else if (m.t === "obj_grab") ws.deliver({ t: "obj_refused", req: m.req, code: "rate_limited", message: "slow down" }, SERVER_MESSAGES);
    else ws.deliver({ t: "refused", req: m.req, code: "rate_limited", message: "slow down" }, SERVER_MESSAGES);
  }
  const results = await Promise.allSettled(calls);
  assert.equal(results.filter((r) => r.status === "fulfilled").length, 10);
  const refused = results.filter((r) => r.status === "rejected").map((r) => r.reason);
  assert.equal(refused.length, 41);
  assert.ok(refused.every((err) => err.name === "RequestError" && err.code === "rate_limited"), refused[0]);
  assert.ok(Date.now() - t0 < 5000, "answered at once, not after the request timeout");
  assert.equal(c.state, "joined");
  c.close();
});

test("a move refused by the server running the target room rejects with its code; nothing moved", async () => {
  const { c, ws } = await joined({ token: "join-tok" });
  const events = [];
  c.on("*", (ev) => events.push(ev));
  for (const code of ["transfer_timeout", "room_moving", "room_locked"]) {
    const moving = c.transfer(9, "ward-9", "review");
    await tick();
    const m = ws.controls(CLIENT_MESSAGES).filter((x) => x.t === "transfer").at(-1);
    assert.deepEqual([m.member_id, m.room, m.reason], [9, "ward-9", "review"]);
    ws.deliver({ t: "refused", req: m.req, code, message: "no" }, SERVER_MESSAGES);
    await assert.rejects(moving, (err) => err.code === code);
  }
  assert.equal(c.room, "r");
  assert.ok(!events.some((e) => e.type === "moved"));
  c.close();
});

test("access refreshes the room access credential the HTTP APIs use", async () => {
  const { c, ws } = await joined({ token: "join-tok" });
  ws.deliver({ t: "moved", room: "ward-9", by: "Dr A", reason: "", access: "acc1" }, SERVER_MESSAGES);
  ws.deliver({ ...welcome(12), room: "ward-9", resume: "tok2" }, SERVER_MESSAGES);
  assert.equal(c.httpToken, "acc1");
  ws.deliver({ t: "access", room: "ward-9", access: "acc2" }, SERVER_MESSAGES);
  assert.equal(c.roomAccess, "acc2");
  assert.equal(c.httpToken, "acc2");
  let asked = null;
  c.fetch = async (url, init) => {
    asked = [url, init.headers.Authorization];
    return new Response(JSON.stringify({ assets: [] }), { status: 200, headers: { "content-type": "application/json" } });
  };
  await c.listAssets();
  assert.deepEqual(asked, ["http://server/rooms/ward-9/assets", "Bearer acc2"]);
  // A credential for another room is not ours: ignored.
  ws.deliver({ t: "access", room: "ward-1", access: "acc3" }, SERVER_MESSAGES);
  assert.equal(c.httpToken, "acc2");
  c.close();
});

test("a request the server would refuse is refused here, typed, and not sent", async () => {
  const { c, ws } = await joined();
  const before = ws.sent.length;
  await assert.rejects(c.moderate("remove", 5, "x".repeat(5000)), (e) => e.code === "oversized");
  await assert.rejects(c.transfer(-3, "consult-1"), (e) => e.name === "RequestError" && e.code === "out_of_range");
  await assert.rejects(c.transfer(5, "no spaces allowed"), (e) => e.name === "RequestError" && e.code === "out_of_range");
  assert.equal(ws.sent.length, before);
  c.close();
});
