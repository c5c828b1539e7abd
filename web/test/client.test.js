// The client against a real server (python -m medverse.server.cli serve): poses, the lobby,
// consent, resume after a dropped socket, shared objects. Every test is bounded in time.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";

import { CloseReason, JoinError, MedverseClient, connect } from "../sdk/client.js";
import { ErrorCode } from "../sdk/errors.js";
import { startServer } from "./support/server.js";
import { triangleGlb } from "./support/models.js";

const TIMEOUT = 20000;
const CONSENT = "I agree that this session is recorded in the audit log.";

let server;
const tokens = {};
const clients = [];

before(
  async () => {
    server = await startServer({ consentText: CONSENT });
    const want = {
      poseA: ["poses", "a", "participant"],
      poseB: ["poses", "b", "participant"],
      lobbyHost: ["lobby", "host", "host"],
      lobbyGuest: ["lobby", "guest", "participant"],
      consent: ["consent-1", "patient", "participant"],
      resume: ["resume", "r", "participant"],
      resumeWatcher: ["resume", "w", "participant"],
      objHost: ["objects", "surgeon", "host"],
      objOther: ["objects", "resident", "participant"],
      removeHost: ["removal", "chair", "host"],
      removeGuest: ["removal", "heckler", "participant"],
      flood: ["flood", "flooder", "participant"],
    };
    await Promise.all(
      Object.entries(want).map(async ([key, [room, identity, role]]) => {
        tokens[key] = await server.token(room, identity, { role, name: identity.toUpperCase() });
      }),
    );
  },
  { timeout: 60000 },
);

after(async () => {
  for (const c of clients) c.close();
  await server?.stop();
});

function client(options) {
  const c = new MedverseClient({ url: server.url, WebSocket, pingInterval: 0, connectTimeout: 5, ...options });
  clients.push(c);
  return c;
}

async function join(options) {
  const c = client(options);
  await c.start();
  return c;
}

/** Resolve once `check()` is truthy (polled), or fail after `ms`. */
async function until(check, what, ms = 5000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = check();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** The next event of `type` (matching `pred`), or fail after `ms`. */
function nextEvent(c, type, pred = () => true, ms = 5000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`no ${type} event in time`));
    }, ms);
    const off = c.on(type, (ev) => {
      if (!pred(ev)) return;
      clearTimeout(timer);
      off();
      resolve(ev);
    });
  });
}

const angle = (q0, q1) => 2 * Math.acos(Math.min(1, Math.abs(q0.reduce((s, v, i) => s + v * q1[i], 0))));
const dist = (a, b) => Math.hypot(...a.map((v, i) => v - b[i]));
// The codec's bounds: positions to the millimetre (half a step of rounding), rotations within
// about a thousandth of a radian (10 bits per smallest-three component).
const POS_BOUND = 0.0005 + 1e-9;
const ROT_BOUND = 0.0025;

describe("client against a real server", { timeout: 120000 }, () => {
  test("two clients in one room see each other's poses within the codec's bounds", { timeout: TIMEOUT }, async () => {
    const a = await join({ room: "poses", token: tokens.poseA });
    const b = await join({ room: "poses", token: tokens.poseB });
    assert.notEqual(a.memberId, b.memberId);
    await until(() => a.members.has(b.memberId), "a to see b join");
    assert.equal(a.members.get(b.memberId), "B");
    assert.equal(b.members.get(a.memberId), "A");

    const s = Math.sqrt(0.5);
    const head = { position: [0.1234, 1.6, -0.75], rotation: [0, s, 0, s] };
    const left = { position: [-0.3, 1.1, -0.5], rotation: [0.1, 0.2, 0.3, Math.sqrt(1 - 0.14)] };
    const right = [[0.3, 1.1, -0.5], [0, 0, 0, 1]];
    // Sent at the tick rate for a while: the newest wins, at most one frame per tick.
    const sender = setInterval(() => a.sendPose(head, left, right), 5);
    try {
      const seen = await until(() => {
        const av = b.avatars().get(a.memberId);
        return av && av.poses[0] && av.poses[2] ? av : null;
      }, "b to see a's pose");
      assert.equal(seen.name, "A");
      const want = [head, left, { position: right[0], rotation: right[1] }];
      for (let k = 0; k < 3; k++) {
        assert.ok(dist(seen.poses[k].position, want[k].position) <= POS_BOUND, `slot ${k} position ${seen.poses[k].position}`);
        assert.ok(angle(seen.poses[k].rotation, want[k].rotation) <= ROT_BOUND, `slot ${k} rotation`);
      }
      // Sampled three ticks in the past, between buffered states: the same still pose.
      await until(() => b.sample().get(a.memberId)?.poses[0], "a sampled pose");
      const sampled = b.sample().get(a.memberId);
      assert.ok(dist(sampled.poses[0].position, head.position) <= POS_BOUND);
      assert.ok(angle(sampled.poses[0].rotation, head.rotation) <= ROT_BOUND);
      assert.ok(Math.abs(b.renderTime() - (b.roomTime() - 3 / b.rate)) < 0.01);
      assert.ok(b.framesReceived > 0);
    } finally {
      clearInterval(sender);
    }
    const rtt = await b.ping();
    assert.ok(rtt >= 0 && rtt < 1, `rtt ${rtt}`);
    const left_ = nextEvent(b, "left", (ev) => ev.memberId === a.memberId);
    a.close();
    assert.equal(a.closedReason, CloseReason.LEFT);
    await left_;
    assert.ok(!b.members.has(a.memberId));
    b.close();
  });

  test("a lobby room makes a client wait until a host admits it", { timeout: TIMEOUT }, async () => {
    const host = await join({ room: "lobby", token: tokens.lobbyHost });
    await host.moderate("lobby");
    await nextEvent(host, "room_state", (ev) => ev.entry === "lobby");
    const guest = client({ room: "lobby", token: tokens.lobbyGuest });
    const waiting = nextEvent(guest, "waiting");
    const lobby = nextEvent(host, "lobby", (ev) => ev.members.length === 1);
    let joined = false;
    const started = guest.start().then(() => {
      joined = true;
    });
    const w = await waiting;
    assert.equal(guest.state, "lobby");
    const l = await lobby;
    assert.equal(l.members[0].id, w.lobbyId);
    assert.equal(l.members[0].name, "GUEST");
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(joined, false, "joined before being admitted");
    assert.equal(guest.framesReceived, 0);
    const seen = nextEvent(host, "joined");
    await host.moderate("admit", w.lobbyId);
    await started;
    assert.equal(guest.state, "joined");
    assert.equal((await seen).memberId, guest.memberId);
    assert.ok(guest.members.has(host.memberId));
    guest.close();
    host.close();
  });

  test("a declined consent closes with the consent reason", { timeout: TIMEOUT }, async () => {
    let asked = null;
    const c = client({
      room: "consent-1",
      token: tokens.consent,
      consent: async (version, text) => {
        asked = { version, text };
        return false;
      },
    });
    const closed = nextEvent(c, "closed");
    await assert.rejects(c.start(), (err) => err instanceof JoinError && err.code === ErrorCode.CONSENT_REQUIRED);
    assert.equal(asked.text, CONSENT);
    assert.match(asked.version, /^[0-9a-f]+$/);
    const ev = await closed;
    assert.equal(ev.reason, ErrorCode.CONSENT_REQUIRED);
    assert.equal(c.closedReason, CloseReason.CONSENT_REQUIRED);
  });

  test("without a consent callback the client leaves unanswered, so no decline is recorded", { timeout: TIMEOUT }, async () => {
    const identity = "no-callback";
    const token = await server.token("consent-1", identity);
    await assert.rejects(
      client({ room: "consent-1", token }).start(),
      (err) => err instanceof JoinError && err.code === ErrorCode.CONSENT_REQUIRED && /no consent callback/.test(err.message),
    );
    // The same person declining for real is recorded, once: the first attempt left no trace.
    await assert.rejects(client({ room: "consent-1", token, consent: () => false }).start(), JoinError);
    let lines = [];
    for (let i = 0; i < 100 && lines.length === 0; i++) {
      lines = (await server.auditShow("--identity", identity)).split("\n").filter((l) => l.includes("consent_declined"));
      if (lines.length === 0) await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal(lines.length, 1);
  });

  test("an accepted consent joins", { timeout: TIMEOUT }, async () => {
    const c = await join({ room: "consent-1", token: tokens.consent, consent: () => true });
    assert.equal(c.state, "joined");
    assert.ok(c.consentVersion);
    c.close();
  });

  test("a dropped socket resumes the same member", { timeout: TIMEOUT }, async () => {
    const watcher = await join({ room: "resume", token: tokens.resumeWatcher });
    const c = await join({ room: "resume", token: tokens.resume });
    const id = c.memberId;
    const reconnecting = nextEvent(c, "reconnecting");
    const resumed = nextEvent(c, "resumed");
    let leftSeen = false;
    watcher.on("left", () => {
      leftSeen = true;
    });
    c.socket.terminate(); // the TCP connection breaks, no close handshake
    const r = await reconnecting;
    assert.equal(r.attempt, 1);
    const ev = await resumed;
    assert.equal(ev.memberId, id);
    assert.equal(ev.sameMember, true);
    assert.equal(c.memberId, id);
    assert.equal(c.state, "joined");
    // The resumed member still sends poses, and the others see them as the same avatar.
    const sender = setInterval(() => c.sendPose({ position: [1, 1.5, 2] }), 10);
    try {
      await until(() => watcher.avatars().get(id)?.poses[0], "the resumed avatar's pose");
      assert.ok(dist(watcher.avatars().get(id).poses[0].position, [1, 1.5, 2]) <= POS_BOUND);
    } finally {
      clearInterval(sender);
    }
    assert.equal(leftSeen, false, "the others saw the member leave");
    c.close();
    watcher.close();
  });

  test("an object spawned by one client is seen and moved by the other", { timeout: TIMEOUT }, async () => {
    const host = await join({ room: "objects", token: tokens.objHost, fetch });
    const other = await join({ room: "objects", token: tokens.objOther, fetch });
    const glb = triangleGlb(["skin", "heart"]);
    const info = await host.uploadAsset(glb, "heart.glb");
    assert.match(info.sha256, /^[0-9a-f]{64}$/);
    const bytes = await other.downloadAsset(info.sha256);
    assert.deepEqual(bytes, glb);
    assert.deepEqual((await other.listAssets()).map((a) => a.sha256), [info.sha256]);

    const added = nextEvent(other, "object_added");
    const id = await host.spawn(info.sha256, { position: [0, 1, -1], name: "heart" });
    assert.equal((await added).objectId, id);
    assert.equal(other.objects.get(id).asset, info.sha256);
    assert.equal(other.objects.get(id).name, "heart");

    await other.grab(id);
    await until(() => host.objects.get(id).holder === other.memberId, "the host to see the lease");
    // The host cannot take it now: refused with the holder named.
    await assert.rejects(host.grab(id), (err) => err.code === ErrorCode.OBJECT_LOCKED && err.holder === other.memberId);

    const s = Math.sqrt(0.5);
    const target = { position: [0.25, 1.2, -0.8], rotation: [s, 0, 0, s], scale: 1.5 };
    other.move(id, target.position, target.rotation, target.scale);
    assert.deepEqual(other.objectTransform(id).position, target.position); // applied locally at once
    await until(() => {
      const t = host.objectTransform(id);
      return t && dist(t.position, target.position) <= POS_BOUND;
    }, "the host to see the move");
    const t = host.objectTransform(id);
    assert.ok(angle(t.rotation, target.rotation) <= ROT_BOUND);
    assert.ok(Math.abs(t.scale - target.scale) < 1e-9);
    await until(() => {
      const st = host.sampleObject(id);
      return st && dist(st.position, target.position) <= POS_BOUND;
    }, "the sampled move");

    const anno = nextEvent(host, "annotation_changed");
    const annotationId = await other.annotate(id, "pin", [[0, 0.05, 0]], { text: "apex" });
    assert.equal((await anno).annotationId, annotationId);
    assert.equal(host.objects.get(id).annotations.get(annotationId).text, "apex");

    const released = nextEvent(host, "lock_changed", (ev) => ev.holder === null);
    await other.release(id);
    assert.equal((await released).reason, "release");
    host.close();
    other.close();
  });

  test("a removed member stops for good with the removed reason", { timeout: TIMEOUT }, async () => {
    const host = await join({ room: "removal", token: tokens.removeHost });
    const guest = await join({ room: "removal", token: tokens.removeGuest });
    const closed = nextEvent(guest, "closed");
    let reconnects = 0;
    guest.on("reconnecting", () => reconnects++);
    await host.moderate("remove", guest.memberId, "disruptive");
    const ev = await closed;
    assert.equal(ev.reason, ErrorCode.REMOVED);
    assert.equal(ev.message, "disruptive");
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(reconnects, 0);
    host.close();
  });

  test("connect() with a bad token is refused", { timeout: TIMEOUT }, async () => {
    await assert.rejects(
      connect({ url: server.url, room: "poses", token: "not.a.token", WebSocket, pingInterval: 0 }),
      (err) => err instanceof JoinError && err.code === ErrorCode.UNAUTHORIZED,
    );
  });
});

test("a flood of requests: those over the message rate fail at once, refused by their req", { timeout: TIMEOUT }, async () => {
  // The server takes 120 messages a second with a burst of 240: the rest of 360 sent at once
  // are dropped, and each is answered by its req instead of waiting out requestTimeout.
  const c = await join({ room: "flood", token: tokens.flood, requestTimeout: 60 });
  const t0 = Date.now();
  const calls = Array.from({ length: 360 }, () => c.request((req) => ({ t: "request_unmute", req })));
  const results = await Promise.allSettled(calls);
  const limited = results.filter((r) => r.status === "rejected" && r.reason.code === ErrorCode.RATE_LIMITED);
  assert.ok(limited.length >= 60, `${limited.length} rate_limited`);
  assert.ok(results.every((r) => r.status === "fulfilled" || r.reason.code === ErrorCode.RATE_LIMITED));
  assert.ok(Date.now() - t0 < 15000, "answered at once, not after the request timeout");
  assert.equal(c.state, "joined");
  c.close();
});
