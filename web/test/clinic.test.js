// The browser SDK in a virtual clinic (examples/clinic.toml) against a real server: a patient
// waits, a clinician calls it in, it consents to the consultation's own text, and is sent back.
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { after, before, test } from "node:test";
import WebSocket from "ws";

import { MedverseClient } from "../sdk/client.js";
import { triangleGlb } from "./support/models.js";
import { startServer } from "./support/server.js";

const CLINIC = fileURLToPath(new URL("../../examples/clinic.toml", import.meta.url));
const TIMEOUT = 60000;

let server;
const tokens = {};
const clients = [];

before(
  async () => {
    server = await startServer({ env: { MEDVERSE_CLINIC: CLINIC } });
    const [patient, doctor, patient2, doctor2, patient3, desk] = await Promise.all([
      server.token("waiting", "pat", { name: "PAT" }),
      server.token("consult-1", "doc", { role: "host", name: "DOC" }),
      server.token("waiting", "pat2", { name: "PAT2" }),
      server.token("consult-2", "doc2", { role: "host", name: "DOC2" }),
      server.token("waiting", "pat3", { name: "PAT3" }),
      server.token("waiting", "desk", { role: "receptionist", name: "DESK" }),
    ]);
    Object.assign(tokens, { patient, doctor, patient2, doctor2, patient3, desk });
  },
  { timeout: 90000 },
);

after(async () => {
  for (const c of clients) c.close();
  await server?.stop();
});

function nextEvent(c, type, pred = () => true, ms = 15000) {
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

async function join(room, token, texts, accept = () => true) {
  const c = new MedverseClient({
    url: server.url,
    WebSocket,
    room,
    token,
    pingInterval: 0,
    connectTimeout: 10,
    fetch,
    consent: (version, text) => {
      texts.push(text);
      return accept(text);
    },
  });
  clients.push(c);
  const queue = nextEvent(c, "queue").catch(() => null);
  await c.start();
  return { c, queue };
}

test("a patient is called into a consultation and sent back", { timeout: TIMEOUT }, async () => {
  const patientTexts = [];
  const { c: patient, queue } = await join("waiting", tokens.patient, patientTexts);
  const first = await queue;
  assert.deepEqual([first.position, first.waiting, first.estimate], [1, 1, 720]);
  assert.match(first.message, /Riverside/);
  assert.equal(patientTexts.length, 1);

  const { c: doctor } = await join("consult-1", tokens.doctor, []);
  const called = nextEvent(patient, "called");
  const moved = nextEvent(patient, "moved");
  const arrived = nextEvent(patient, "arrived");
  await doctor.callNext();
  assert.deepEqual({ ...(await called) }, { type: "called", room: "consult-1", by: "DOC" });
  assert.equal((await moved).reason, "called");
  const a = await arrived;
  assert.equal(a.room, "consult-1");
  assert.equal(patient.room, "consult-1");
  assert.equal(patient.state, "joined");
  assert.equal(patientTexts.length, 2);
  assert.match(patientTexts[1], /consultation/);
  assert.ok(patient.members.has(doctor.memberId));

  const back = nextEvent(patient, "arrived", (ev) => ev.room === "waiting");
  const again = nextEvent(patient, "queue");
  await doctor.sendBack(a.memberId);
  await back;
  assert.equal(patient.room, "waiting");
  assert.equal((await again).position, 1);

  // A patient may not call anyone: the request is refused by name.
  await assert.rejects(patient.callNext(), (err) => err.code === "forbidden");
  patient.close(); // out of the queue for the next test
  doctor.close();
});

test("a moved patient fetches the consultation's model with the credential of its move", { timeout: TIMEOUT }, async () => {
  const { c: patient, queue } = await join("waiting", tokens.patient2, []);
  await queue;
  const { c: doctor } = await join("consult-2", tokens.doctor2, []);
  const glb = triangleGlb(["skin", "heart"]);
  const info = await doctor.uploadAsset(glb, "heart.glb");
  assert.equal(patient.roomAccess, null);

  const arrived = nextEvent(patient, "arrived");
  await doctor.callNext();
  const a = await arrived;
  assert.equal(a.room, "consult-2");
  const access = patient.roomAccess;
  assert.ok(typeof access === "string" && access !== tokens.patient2);
  assert.deepEqual((await patient.listAssets()).map((x) => x.sha256), [info.sha256]);
  assert.deepEqual(await patient.downloadAsset(info.sha256), glb);

  const assets = `${server.http}/rooms/consult-2/assets`;
  const status = async (token) => (await fetch(assets, { headers: { Authorization: `Bearer ${token}` } })).status;
  assert.equal(await status(tokens.patient2), 401); // the join token names the waiting room
  assert.equal(await status(access), 200);

  const back = nextEvent(patient, "arrived", (ev) => ev.room === "waiting");
  await doctor.sendBack(a.memberId);
  await back;
  // Sent back: the consultation's credential is revoked, and in the room its join token names
  // the client needs none (the token serves there).
  assert.equal(await status(access), 401);
  assert.equal(patient.roomAccess, null);
  assert.equal(patient.httpToken, tokens.patient2);
  assert.deepEqual(await patient.listAssets(), []);
  await assert.rejects(patient.downloadAsset(info.sha256), (err) => err.code === "not_found");
});

test("a patient that declines the consultation's consent goes back to the waiting room", { timeout: TIMEOUT }, async () => {
  const texts = [];
  const { c: patient, queue } = await join("waiting", tokens.patient3, texts, (text) => !/consultation/.test(text));
  await queue;
  const { c: desk } = await join("waiting", tokens.desk, []);
  const waitingId = patient.memberId;
  const waitingVersion = patient.consentVersion;
  const moves = [];
  patient.on("moved", (ev) => moves.push([ev.room, ev.reason]));
  const back = nextEvent(patient, "arrived", (ev) => ev.room === "waiting");
  const told = nextEvent(desk, "move_declined");
  await desk.transfer(waitingId, "consult-3", "see the doctor");
  await back;
  assert.deepEqual(moves, [
    ["consult-3", "see the doctor"],
    ["waiting", "consent_declined"],
  ]);
  assert.equal(texts.length, 2); // the waiting room's text is not asked again
  assert.equal(patient.room, "waiting");
  assert.equal(patient.state, "joined");
  assert.equal(patient.reconnect, true);
  assert.equal(patient.consentVersion, waitingVersion); // the waiting room's, not the declined one's
  const ev = await told;
  assert.deepEqual(
    [ev.memberId, ev.origin, ev.room, ev.reason, ev.back],
    [waitingId, "waiting", "consult-3", "consent_declined", "waiting"],
  );
  patient.close();
  desk.close();
});
