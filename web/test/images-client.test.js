// The browser SDK's image calls against a real server: a synthetic CT (benchmarks/dicomgen.py)
// uploaded, described and rendered over HTTP with the token, a panel opened and scrolled by
// one member and followed by another, pointers, measurements, and the refusals by name.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { fileURLToPath } from "node:url";
import { after, before, test } from "node:test";
import WebSocket from "ws";

import { MedverseClient, RequestError } from "../sdk/client.js";
import { PLANES, pixelToPatient } from "../sdk/images.js";
import { startServer } from "./support/server.js";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));
const PYTHON = process.env.MEDVERSE_PYTHON || "python3";
const TIMEOUT = 90000;
const PNG_MAGIC = [0x89, 0x50, 0x4e, 0x47];

let server;
let zip;
const clients = [];

/** A zip of synthetic_ct(32, 32, 12), made by the generator the Python tests use. */
function syntheticZip() {
  const code =
    "import sys; from benchmarks.dicomgen import synthetic_ct; from medverse.client_sdk.images import zip_files; " +
    "sys.stdout.buffer.write(zip_files(synthetic_ct(32, 32, 12)))";
  return new Promise((resolve, reject) =>
    execFile(PYTHON, ["-c", code], { cwd: ROOT, encoding: "buffer", maxBuffer: 1 << 26, timeout: 60000 }, (err, out, errOut) =>
      err ? reject(new Error(`${err.message}\n${errOut}`)) : resolve(new Uint8Array(out)),
    ),
  );
}

/** The files of synthetic_ct(16, 16, 4, phi=True): a patient's name, ids and more in them. */
function identifiableFiles() {
  const code =
    "import sys, json, base64; from benchmarks.dicomgen import synthetic_ct; " +
    "json.dump({n: base64.b64encode(b).decode() for n, b in synthetic_ct(16, 16, 4, phi=True).items()}, sys.stdout)";
  return new Promise((resolve, reject) =>
    execFile(PYTHON, ["-c", code], { cwd: ROOT, maxBuffer: 1 << 26, timeout: 60000 }, (err, out, errOut) =>
      err ? reject(new Error(`${err.message}\n${errOut}`)) : resolve(Object.entries(JSON.parse(out)).map(([n, b]) => new File([Buffer.from(b, "base64")], n))),
    ),
  );
}

before(
  async () => {
    [server, zip] = await Promise.all([startServer(), syntheticZip()]);
  },
  { timeout: TIMEOUT },
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

async function join(room, who, role = "participant") {
  return joinAs(room, who, role);
}

async function joinAs(room, who, role) {
  const token = await server.token(room, who, { role });
  const c = new MedverseClient({ url: server.url, WebSocket, room, token, pingInterval: 0, connectTimeout: 10 });
  clients.push(c);
  await c.start();
  await c.panels.waitSynced();
  return c;
}

test("a series over HTTP: upload, listing, descriptor, slices with a window and an ETag", { timeout: TIMEOUT }, async () => {
  const host = await join("review-http", "lead", "host");
  const listing = await host.uploadSeries(zip, { name: "abdomen CT", deidentify: true });
  assert.match(listing.sha256, /^[0-9a-f]{64}$/u);
  assert.equal(listing.instances, 12);
  assert.deepEqual(
    (await host.listSeries()).map((s) => s.sha256),
    [listing.sha256],
  );
  const d = await host.series(listing.sha256);
  assert.deepEqual(
    PLANES.map((p) => d.planes[p].count),
    [12, 32, 32],
  );
  const first = await host.fetchSlice(listing.sha256, "axial", 6, [40, 400]);
  assert.deepEqual([...first.bytes.slice(0, 4)], PNG_MAGIC);
  assert.ok(first.etag);
  const again = await host.fetchSlice(listing.sha256, "axial", 6, [40, 400], { etag: first.etag });
  assert.equal(again.bytes, null);
  const other = await host.fetchSlice(listing.sha256, "axial", 6, [400, 1800]);
  assert.notEqual(other.etag, first.etag);
  // A slice beyond the series and a series not in the room are refused by name.
  await assert.rejects(host.fetchSlice(listing.sha256, "coronal", 32), (e) => e instanceof RequestError && e.code === "out_of_range");
  await assert.rejects(host.series("ab".repeat(32)), (e) => e.code === "not_found");
  // A token for another room does not open this room's series.
  const stranger = new MedverseClient({ url: server.url, WebSocket, room: "review-http", token: await server.token("elsewhere", "x") });
  await assert.rejects(stranger.fetchSlice(listing.sha256, "axial", 0), (e) => e instanceof RequestError && e.code === "unauthorized");
  // The pixel to patient mapping of the descriptor: axial image k is k slice steps up.
  const p = pixelToPatient(d, "axial", 3, 0, 0);
  assert.deepEqual(p, d.planes.axial.origin.map((v, k) => v + 3 * d.planes.axial.slice_step[k]));
});

test("files uploaded as parts: identifying data refused with its keywords, then de-identified", { timeout: TIMEOUT }, async () => {
  const host = await join("review-parts", "lead", "host");
  const files = await identifiableFiles();
  let refused = null;
  await assert.rejects(host.uploadSeries(files, { name: "chest" }), (e) => {
    refused = e;
    return e instanceof RequestError && e.code === "identifiable_data";
  });
  for (const k of ["PatientName", "PatientID", "PatientBirthDate", "InstitutionName"]) assert.ok(refused.attributes.includes(k), k);
  assert.ok(!refused.attributes.some((k) => k.includes("Doe")), "keywords, never values");
  assert.deepEqual(await host.listSeries(), []);
  const listing = await host.uploadSeries(files, { name: "chest", deidentify: true });
  assert.equal(listing.instances, 4);
  assert.equal(listing.deidentified, true);
  assert.equal(listing.name, "chest");
  // Other refusals carry no attributes; an empty list of files is the caller's mistake.
  await assert.rejects(host.uploadSeries([new File([new Uint8Array([1, 2, 3])], "x.dcm")]), (e) => e.code === "not_dicom" && e.attributes === null);
  await assert.rejects(host.uploadSeries([]), TypeError);
});

test("a panel opened, scrolled and measured by one member is followed by another", { timeout: TIMEOUT }, async () => {
  const host = await join("review-view", "lead", "host");
  const guest = await join("review-view", "guest");
  const { sha256 } = await host.uploadSeries(zip, { name: "CT", deidentify: true });

  const seen = nextEvent(guest, "panel_changed");
  const panelId = await host.openPanel(sha256, { position: [0, 1.5, -1], width: 0.5 });
  assert.equal((await seen).panelId, panelId);
  const start = guest.panels.get(panelId);
  assert.equal(start.series, sha256);
  assert.equal(start.plane, "axial");

  const scrolled = nextEvent(guest, "panel_changed", (ev) => guest.panels.get(ev.panelId)?.slices[0] === 2);
  await host.setImageView(panelId, { plane: "coronal", slices: [2, 10, 20], window: [400, 1800] });
  const ev = await scrolled;
  assert.equal(ev.by, host.memberId);
  const now = guest.panels.get(panelId);
  assert.deepEqual([now.plane, now.slices, now.window], ["coronal", [2, 10, 20], [400, 1800]]);
  assert.ok(now.version > start.version);

  // Pointers: the guest's reaches the host; hiding it reaches the host as null.
  const pointed = nextEvent(host, "pointer_moved", (e) => e.memberId === guest.memberId && e.point !== null);
  guest.point(panelId, [1, 2, 3]);
  assert.deepEqual((await pointed).point, [1, 2, 3]);
  assert.deepEqual(host.panels.pointers.get(guest.memberId), { panelId, point: [1, 2, 3] });
  const hidden = nextEvent(host, "pointer_moved", (e) => e.memberId === guest.memberId && e.point === null);
  guest.point(panelId, null);
  await hidden;
  assert.equal(host.panels.pointers.has(guest.memberId), false);

  // A distance of 3-4-5 mm, measured by the guest; only its author (or a host) deletes it.
  const measured = nextEvent(host, "measurement_changed", (e) => !e.deleted);
  const mid = await guest.measure(sha256, "distance", [[0, 0, 10], [3, 4, 10]], "test line");
  assert.equal((await measured).measurementId, mid);
  const m = host.panels.measurements.get(mid);
  assert.ok(Math.abs(m.value - 5) < 1e-6, String(m.value));
  assert.deepEqual([m.kind, m.author, m.label], ["distance", "guest", "test line"]);
  const gone = nextEvent(guest, "measurement_changed", (e) => e.deleted && e.measurementId === mid);
  await host.deleteMeasurement(mid);
  await gone;
  assert.equal(guest.panels.measurements.has(mid), false);

  // Refusals name the request's error; nothing changes.
  await assert.rejects(host.setImageView(panelId, { slices: [99, 0, 0] }), (e) => e instanceof RequestError && e.code === "out_of_range");
  await assert.rejects(host.setImageView(9999, { plane: "axial" }), (e) => e.code === "not_found");
  await assert.rejects(host.measure(sha256, "distance", [[0, 0, 0]]), (e) => e instanceof RequestError);
  await assert.throws(() => guest.point(panelId, [Number.NaN, 0, 0]), TypeError);
  assert.deepEqual(guest.panels.get(panelId).slices, [2, 10, 20]);

  // Placing and closing reach the other member too.
  await host.placePanel(panelId, [1, 1.2, -1.5], { width: 0.8 });
  const placed = await guest.panels.waitVersion(panelId, guest.panels.get(panelId).version + 1);
  assert.deepEqual([placed.position, placed.width], [[1, 1.2, -1.5], 0.8]);
  const closed = nextEvent(guest, "panel_changed", (e) => e.closed);
  await host.closePanel(panelId);
  assert.equal((await closed).panelId, panelId);
  assert.equal(guest.panels.has(panelId), false);
});

test("a member who joins later receives the room's panels and measurements", { timeout: TIMEOUT }, async () => {
  const host = await join("review-late", "lead", "host");
  const { sha256 } = await host.uploadSeries(zip, { name: "CT", deidentify: true });
  const panelId = await host.openPanel(sha256);
  await host.setImageView(panelId, { slices: [5, 16, 16] });
  const mid = await host.measure(sha256, "distance", [[0, 0, 0], [0, 0, 7.5]]);
  const late = await join("review-late", "late");
  await late.panels.waitVersion(panelId, 1);
  assert.deepEqual(late.panels.get(panelId).slices, [5, 16, 16]);
  assert.ok(Math.abs(late.panels.measurements.get(mid).value - 7.5) < 1e-6);
});

test("bad image calls are refused by name, and a flood is answered while others carry on", { timeout: TIMEOUT }, async () => {
  const host = await join("review-bad", "lead", "host");
  const guest = await join("review-bad", "guest");
  const { sha256 } = await host.uploadSeries(zip, { name: "CT", deidentify: true });
  const panelId = await host.openPanel(sha256);
  await guest.panels.waitVersion(panelId, 0);
  const version = guest.panels.get(panelId).version;

  // Out-of-range values reach the server, which refuses each request by its req and name
  // (img_refused); the room's panel does not change.
  const bad = [
    [() => host.setImageView(panelId, { slices: [70000, 0, 0] }), "out_of_range"],
    [() => host.setImageView(panelId, { window: [40, 0] }), "out_of_range"],
    [() => host.setImageView(panelId, { zoom: 50 }), "out_of_range"],
    [() => host.setImageView(panelId, { plane: "oblique" }), "out_of_range"],
    [() => host.setImageView(panelId, { pan: [11, 0] }), "out_of_range"],
    [() => host.openPanel("not-a-hash"), "out_of_range"],
    [() => host.openPanel(sha256, { width: 20 }), "out_of_range"],
    [() => host.measure(sha256, "volume", [[0, 0, 0]]), "out_of_range"],
    [() => host.measure(sha256, "distance", [[0, 0, 0], [1, 1, 1]], "x".repeat(257)), "out_of_range"],
    [() => host.deleteMeasurement(0), "out_of_range"],
  ];
  for (const [call, code] of bad) {
    await assert.rejects(call(), (e) => e instanceof RequestError && e.code === code, String(call));
  }
  // Values of the wrong shape are refused before anything is sent.
  await assert.rejects(host.setImageView(panelId, { slices: [1, 2] }), TypeError);
  await assert.rejects(host.openPanel(sha256, { position: [0, Number.POSITIVE_INFINITY, 0] }), TypeError);
  // Refused by the server: no such panel; an observer may not open panels nor point.
  await assert.rejects(host.setImageView(4242, { plane: "axial" }), (e) => e instanceof RequestError && e.code === "not_found");
  const observer = await joinAs("review-bad", "watcher", "observer");
  await assert.rejects(observer.openPanel(sha256), (e) => e instanceof RequestError && e.code === "forbidden");
  assert.equal(guest.panels.get(panelId).version, version, "a refused call changed the panel");

  // A flood of 2 x 200 view changes (each connection within its message burst; together more
  // than the room queues): every one is answered, applied or refused with rate_limited (how
  // many depends on how fast the room works through them), none hangs, and a third member's
  // change goes through after it.
  const other = await join("review-bad", "third");
  const flood = (c) => Array.from({ length: 200 }, (_, i) => c.setImageView(panelId, { slices: [i % 12, 16, 16] }));
  const results = await Promise.allSettled([...flood(host), ...flood(guest)]);
  const refused = results.filter((r) => r.status === "rejected");
  for (const r of refused) assert.ok(r.reason instanceof RequestError && r.reason.code === "rate_limited", String(r.reason));
  assert.ok(results.length - refused.length >= 256, `only ${results.length - refused.length} applied`);
  await other.setImageView(panelId, { plane: "sagittal", slices: [3, 4, 5] });
  await waitFor(() => host.panels.get(panelId).plane === "sagittal" && guest.panels.get(panelId).slices[2] === 5);
  assert.deepEqual(host.panels.get(panelId).slices, [3, 4, 5]);
  assert.ok(host.panels.get(panelId).version > version);
});

async function waitFor(check, ms = 15000) {
  const end = Date.now() + ms;
  while (!check()) {
    if (Date.now() > end) throw new Error("not reached in time");
    await new Promise((r) => setTimeout(r, 20));
  }
}
