// The browser audio client (sdk/audio.js) over a scripted WebSocket and a scripted
// RTCPeerConnection: what it offers and when, what it does with the answer, refusals, mute,
// speaking and rules, renegotiating after a reconnect, closing. The real thing (Chromium and the
// server's aiortc peers) is tests/test_browser_audio.py.
import assert from "node:assert/strict";
import { test } from "node:test";

import { AudioClient, AudioError, wantStereo } from "../sdk/audio.js";
import { MedverseClient } from "../sdk/client.js";
import { CLIENT_MESSAGES, SERVER_MESSAGES, decodeMessage, encodeMessage } from "../sdk/messages.js";

const OFFER = [
  "v=0",
  "o=- 1 2 IN IP4 127.0.0.1",
  "s=-",
  "t=0 0",
  "m=audio 9 UDP/TLS/RTP/SAVPF 111 63 0",
  "a=candidate:1 1 udp 2122194687 127.0.0.1 50723 typ host generation 0",
  "a=rtpmap:111 opus/48000/2",
  "a=fmtp:111 minptime=10;useinbandfec=1",
  "a=rtpmap:63 red/48000/2",
  "a=fmtp:63 111/111",
  "a=rtpmap:0 PCMU/8000",
  "",
].join("\r\n");
const ANSWER = "v=0\r\no=- 2 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n";

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
  deliver(msg) {
    const bytes = encodeMessage(msg, SERVER_MESSAGES);
    this.onmessage?.({ data: bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength) });
  }
  controls() {
    return this.sent.filter((f) => f[0] === 1).map((f) => decodeMessage(f, CLIENT_MESSAGES, 1 << 20));
  }
  last(type) {
    return this.controls().filter((m) => m.t === type).at(-1);
  }
}

/** A peer connection the test plays the browser of: gathering completes a tick after the local
 * description, and the remote track arrives with the answer. */
class FakePC {
  static all = [];
  constructor(config) {
    this.config = config;
    this.transceivers = [];
    this.iceGatheringState = "new";
    this.connectionState = "new";
    this.localDescription = null;
    this.remoteDescription = null;
    this.closed = false;
    FakePC.all.push(this);
  }
  addTransceiver(what, init) {
    this.transceivers.push({ what, direction: init.direction });
  }
  async createOffer() {
    return { type: "offer", sdp: OFFER };
  }
  async setLocalDescription(desc) {
    this.localDescription = desc;
    this.iceGatheringState = "gathering";
    setTimeout(() => {
      this.iceGatheringState = "complete";
      this.onicegatheringstatechange?.();
    }, 5);
  }
  async setRemoteDescription(desc) {
    this.remoteDescription = desc;
    setTimeout(() => this.ontrack?.({ track: { kind: "audio" }, streams: [{ id: "mix" }] }), 1);
  }
  close() {
    this.closed = true;
  }
}

class FakeTrack {
  constructor() {
    this.kind = "audio";
    this.enabled = true;
    this.stopped = false;
  }
  stop() {
    this.stopped = true;
  }
}

const devices = (tracks) => ({
  async getUserMedia() {
    const t = new FakeTrack();
    tracks.push(t);
    return { getAudioTracks: () => [t] };
  },
});

const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));
const welcome = (memberId = 7) => ({ t: "welcome", version: 1, member_id: memberId, room: "r", rate: 20, tick: 0, resume: "tok", resumed: false, members: [] });

async function joined(options = {}) {
  FakeSocket.all = [];
  FakePC.all = [];
  const c = new MedverseClient({ url: "ws://server", room: "r", WebSocket: FakeSocket, pingInterval: 0, ...options });
  const started = c.start();
  await tick();
  const ws = FakeSocket.all[0];
  ws.deliver(welcome());
  await started;
  return { c, ws };
}

// Wait until the client has sent its n-th audio offer (gathering takes a few ms).
async function offered(ws, n = 1) {
  for (let i = 0; i < 200; i++) {
    const offers = ws.controls().filter((m) => m.t === "audio_offer");
    if (offers.length >= n) return offers[n - 1];
    await tick(2);
  }
  throw new Error("no audio offer sent");
}

test("wantStereo asks for the mix in stereo on Opus lines only, once", () => {
  const out = wantStereo(OFFER);
  assert.match(out, /^a=fmtp:111 minptime=10;useinbandfec=1;stereo=1\r$/mu);
  assert.match(out, /^a=fmtp:63 111\/111\r$/mu);
  assert.equal(wantStereo(out), out);
  const already = OFFER.replace("useinbandfec=1", "stereo=0;useinbandfec=1");
  assert.equal(wantStereo(already), already); // the page's own choice stays
});

test("listening only: a recvonly offer with every candidate, then the mix", async () => {
  const { c, ws } = await joined();
  const audio = new AudioClient(c, { RTCPeerConnection: FakePC, mediaDevices: null });
  const started = audio.start({ microphone: false });
  const offer = await offered(ws);
  const pc = FakePC.all[0];
  assert.deepEqual(pc.config, { iceServers: [] });
  assert.deepEqual(pc.transceivers, [{ what: "audio", direction: "recvonly" }]);
  assert.equal(pc.iceGatheringState, "complete"); // sent only once gathering was done
  assert.equal(offer.publish, false);
  assert.match(offer.sdp, /stereo=1/u);
  assert.match(offer.sdp, /a=candidate:/u);
  ws.deliver({ t: "audio_answer", sdp: ANSWER, publish: false });
  const mix = await started;
  assert.deepEqual(mix, { id: "mix" });
  assert.deepEqual(pc.remoteDescription, { type: "answer", sdp: ANSWER });
  assert.equal(audio.publishing, false);
  audio.close();
  assert.equal(pc.closed, true);
  assert.equal(audio.pc, null);
  c.close();
});

test("auto publishes the microphone, and listens when the server forbids it", async () => {
  const { c, ws } = await joined();
  const tracks = [];
  const audio = new AudioClient(c, { RTCPeerConnection: FakePC, mediaDevices: devices(tracks) });
  const started = audio.start();
  const first = await offered(ws);
  assert.equal(first.publish, true);
  assert.equal(FakePC.all[0].transceivers[0].direction, "sendrecv");
  assert.equal(FakePC.all[0].transceivers[0].what, tracks[0]);
  ws.deliver({ t: "error", code: "forbidden", message: "role observer may not publish_audio", fatal: false });
  const second = await offered(ws, 2);
  assert.equal(second.publish, false);
  assert.equal(tracks[0].stopped, true); // our microphone is released
  assert.equal(FakePC.all[0].closed, true);
  ws.deliver({ t: "audio_answer", sdp: ANSWER, publish: false });
  await started;
  assert.equal(audio.publishing, false);
  assert.equal(audio.pc, FakePC.all[1]);
  c.close();
  assert.equal(audio.pc, null); // the room connection closing ends audio
  assert.equal(FakePC.all[1].closed, true);
});

test("a member whose grants lack publish_audio does not ask for a microphone", async () => {
  const { c, ws } = await joined();
  const tracks = [];
  ws.deliver({ t: "grants", member_id: 7, role: "participant", grants: ["annotate"] });
  const audio = new AudioClient(c, { RTCPeerConnection: FakePC, mediaDevices: devices(tracks) });
  assert.equal(audio.mayPublish, false);
  const started = audio.start();
  assert.equal((await offered(ws)).publish, false);
  assert.equal(tracks.length, 0);
  ws.deliver({ t: "audio_answer", sdp: ANSWER, publish: false });
  await started;
  c.close();
});

test("a refused offer rejects with AudioError and leaves nothing open", async () => {
  const { c, ws } = await joined();
  const tracks = [];
  const audio = new AudioClient(c, { RTCPeerConnection: FakePC, mediaDevices: devices(tracks) });
  const started = audio.start({ microphone: true });
  await offered(ws);
  ws.deliver({ t: "error", code: "rate_limited", message: "too many audio offers; wait a minute", fatal: false });
  await assert.rejects(started, (err) => err instanceof AudioError && err.code === "rate_limited");
  assert.equal(audio.pc, null);
  assert.equal(FakePC.all[0].closed, true);
  assert.equal(tracks[0].stopped, true);
  // No answer at all: a timeout, not a hang.
  const quick = new AudioClient(c, { RTCPeerConnection: FakePC, mediaDevices: null, timeout: 0.05 });
  await assert.rejects(quick.start({ microphone: false }), /no audio answer in time/u);
  // A microphone that was asked for and cannot be had fails the start.
  const none = new AudioClient(c, { RTCPeerConnection: FakePC, mediaDevices: null });
  await assert.rejects(none.start({ microphone: true }), /no mediaDevices/u);
  c.close();
});

test("mute is acknowledged by the server and silences the microphone", async () => {
  const { c, ws } = await joined();
  const tracks = [];
  const audio = new AudioClient(c, { RTCPeerConnection: FakePC, mediaDevices: devices(tracks) });
  const started = audio.start();
  await offered(ws);
  ws.deliver({ t: "audio_answer", sdp: ANSWER, publish: true });
  await started;
  const muting = audio.mute(true);
  const req = ws.last("audio_mute");
  assert.equal(req.muted, true);
  assert.equal(tracks[0].enabled, true); // not before the server applied it
  ws.deliver({ t: "ack", req: req.req });
  await muting;
  assert.equal(audio.muted, true);
  assert.equal(tracks[0].enabled, false);
  // A refused request rejects with AudioError; the state stays.
  const zoning = audio.setZone(9, 3);
  const z = ws.last("audio_zone");
  assert.deepEqual([z.member_id, z.zone], [9, 3]);
  ws.deliver({ t: "refused", req: z.req, code: "forbidden", message: "only hosts change zones" });
  await assert.rejects(zoning, (err) => err instanceof AudioError && err.code === "forbidden" && err.message === "forbidden: only hosts change zones");
  const unmuting = audio.mute(false);
  ws.deliver({ t: "ack", req: ws.last("audio_mute").req });
  await unmuting;
  assert.equal(tracks[0].enabled, true);
  c.close();
});

test("speaking and rules follow the server", async () => {
  const { c, ws } = await joined();
  const audio = new AudioClient(c, { RTCPeerConnection: FakePC, mediaDevices: null });
  const speaking = [];
  audio.on("speaking", (ev) => speaking.push(ev.members));
  const rules = [];
  audio.on("rules", (ev) => rules.push(ev.rules));
  ws.deliver({ t: "audio_speaking", members: [4, 2] });
  assert.deepEqual(speaking, [[4, 2]]);
  assert.equal(audio.isSpeaking(2), true);
  assert.equal(audio.isSpeaking(7), false);
  ws.deliver({ t: "audio_speaking", members: [] });
  assert.equal(audio.isSpeaking(2), false);
  ws.deliver({ t: "audio_rules", zones: [2, 1, 4, 1], broadcast: [9, 150], whispers: [2, 4], self_muted: [4], ignored: [] });
  const r = rules.at(-1);
  assert.deepEqual([...r.zones], [[2, 1], [4, 1]]);
  assert.deepEqual([...r.broadcast], [[9, 1.5]]);
  assert.deepEqual([...r.whispers], [[2, 4]]);
  assert.deepEqual([...r.selfMuted], [4]);
  assert.equal(audio.rules, r);
  audio.dispose();
  ws.deliver({ t: "audio_speaking", members: [1] });
  assert.equal(speaking.length, 2); // no longer following
  c.close();
});

test("after a reconnect as a new member the audio is negotiated again", async () => {
  const { c, ws } = await joined({ maxBackoff: 0.01 });
  const audio = new AudioClient(c, { RTCPeerConnection: FakePC, mediaDevices: null });
  const started = audio.start({ microphone: false });
  await offered(ws);
  ws.deliver({ t: "audio_answer", sdp: ANSWER, publish: false });
  await started;
  ws.readyState = 3;
  ws.onclose({ code: 1006 });
  while (FakeSocket.all.length < 2) await tick();
  const ws2 = FakeSocket.all[1];
  await tick();
  ws2.deliver({ ...welcome(8), resumed: false });
  const again = await offered(ws2);
  assert.equal(again.publish, false);
  assert.equal(FakePC.all[0].closed, true);
  ws2.deliver({ t: "audio_answer", sdp: ANSWER, publish: false });
  for (let i = 0; i < 100 && audio.mix === null; i++) await tick(2);
  assert.deepEqual(audio.mix, { id: "mix" });
  assert.equal(audio.pc, FakePC.all[1]);
  c.close();
});

test("moved to another room: audio stops with the move and is negotiated again there", async () => {
  const { c, ws } = await joined();
  const audio = new AudioClient(c, { RTCPeerConnection: FakePC, mediaDevices: null });
  const started = audio.start({ microphone: false });
  await offered(ws);
  ws.deliver({ t: "audio_answer", sdp: ANSWER, publish: false });
  await started;
  ws.deliver({ t: "moved", room: "exam-2", by: "Reception", reason: "" });
  assert.equal(FakePC.all[0].closed, true);
  assert.equal(audio.pc, null);
  ws.deliver({ ...welcome(11), room: "exam-2" });
  const again = await offered(ws, 2);
  assert.equal(again.publish, false);
  ws.deliver({ t: "audio_answer", sdp: ANSWER, publish: false });
  for (let i = 0; i < 100 && audio.mix === null; i++) await tick(2);
  assert.deepEqual(audio.mix, { id: "mix" });
  c.close();
});
