// The clinic web app: join with a token from the link's fragment (or pasted), go through
// consent and the waiting room, then the room in 3D (desktop or WebXR) with the session's
// controls. Every state change is written to a polite live region, so screen readers say it.
// `window.medverse` exposes the state for tools and tests.
import * as THREE from "three";
import { AudioClient, CloseReason, JoinError, MedverseClient, RequestError } from "../sdk/index.js";
import { ClinicControls } from "./clinic.js";
import { DesktopControls } from "./desktop.js";
import { ImageViewer } from "./images.js";
import { ImagePanels3D } from "./panels3d.js";
import { RoomScene } from "./scene.js";
import { grantsOf, readClaims, tokenFromFragment, tokenFromText } from "./token.js";
import { XRMode, xrSupport } from "./xr.js";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "medverse.token";

const app = {
  screen: null,
  token: null,
  claims: null,
  client: null,
  scene: null,
  desktop: null,
  xr: null,
  grants: new Set(),
  lobby: [],
  memberStates: new Map(), // member id -> {paused, muted, unmuteRequested}
  roles: new Map(), // member id -> role, as hosts changed them
  speaking: new Set(),
  entry: null,
  audioRules: null,
  selected: null, // object id
  held: null, // {objectId, hand: "desktop"|"left"|"right", offset: Matrix4, yaw}
  draft: null, // {objectId, kind, points}
  announcements: [],
  consentAnswer: null,
  closed: null, // {reason, message}
  frames: 0,
  audio: null, // the AudioClient of the current client
  mic: "unasked", // unasked, on, refused, unavailable, insecure, not_allowed, none
  micStream: null, // the microphone, asked for once per page
  images: null, // the case images panel (images.js)
  clinic: null, // the transfer controls (clinic.js)
  panels3d: null, // the image panels in the 3D view (panels3d.js)
};

// ----------------------------------------------------------------- announcing and screens

function announce(text) {
  app.announcements.push(text);
  if (app.announcements.length > 200) app.announcements.shift();
  const status = $("status");
  // A repeated text is still read: clear first, set on the next frame.
  status.textContent = "";
  requestAnimationFrame(() => (status.textContent = text));
}

function alertText(text) {
  const el = $("alert");
  el.hidden = !text;
  el.textContent = text || "";
  if (text) app.announcements.push(text);
}

function notice(text) {
  const p = document.createElement("p");
  p.textContent = text;
  $("notices").append(p);
}

function show(screen, text) {
  for (const el of document.querySelectorAll("main > .screen")) el.hidden = el.id !== `screen-${screen}`;
  const changed = app.screen !== screen;
  app.screen = screen;
  document.body.dataset.screen = screen;
  if (text) announce(text);
  if (!changed) return;
  if (screen === "room") {
    $("scene").focus({ preventScroll: true });
  } else {
    const heading = document.querySelector(`#screen-${screen} h1`);
    heading.tabIndex = -1;
    heading.focus({ preventScroll: true });
  }
}

// ----------------------------------------------------------------- joining

function socketUrl() {
  const url = new URL("ws", window.location.href);
  url.protocol = window.location.protocol === "https:" ? "wss:" : "ws:";
  url.hash = "";
  url.search = "";
  return url.href;
}

function useToken(token) {
  const claims = readClaims(token); // throws TypeError with a message for people
  app.token = token;
  app.claims = claims;
  app.grants = grantsOf(claims);
  sessionStorage.setItem(TOKEN_KEY, token);
  const shown = claims.pseudonym ?? claims.name;
  $("where").textContent = `Room ${claims.room} · ${shown}`;
  return claims;
}

function askConsent(version, text) {
  $("consent-text").textContent = text;
  show("consent", "This session asks for your consent before you join. Read the text, then agree or decline.");
  return new Promise((resolve) => {
    app.consentAnswer = (yes) => {
      app.consentAnswer = null;
      if (yes) show("connecting", "Consent given. Joining the session.");
      resolve(yes);
    };
  });
}

async function join() {
  const claims = app.claims;
  alertText("");
  app.closed = null;
  $("connecting-text").textContent = `Connecting to room ${claims.room}.`;
  show("connecting", `Connecting to room ${claims.room}.`);
  const client = new MedverseClient({
    url: socketUrl(),
    room: claims.room,
    token: app.token,
    slots: 3,
    consent: askConsent,
  });
  app.client = client;
  client.on("*", (ev) => onEvent(client, ev));
  client.on("audio_rules", (m) => onServerMessage(client, m));
  try {
    await client.start();
  } catch (err) {
    if (app.client !== client) return;
    if (!(err instanceof JoinError)) {
      client.close();
      showClosed("unreachable", String(err.message || err));
    }
    return; // a JoinError ends in a `closed` event
  }
  if (app.client !== client) return;
  enterRoom();
}

// ----------------------------------------------------------------- events

function nameOf(id) {
  const c = app.client;
  if (id === c.memberId) return "you";
  return c.members.get(id) ?? `Member ${id}`;
}

function onEvent(client, ev) {
  if (client !== app.client) return;
  app.images?.onEvent(ev);
  app.clinic?.onEvent(ev);
  switch (ev.type) {
    case "waiting":
      $("lobby-queue").textContent = "";
      show("lobby", "You are in the waiting room. The therapist will let you in.");
      break;
    case "queue": {
      // A clinic's waiting room says where we are in the queue.
      const parts = [`You are number ${ev.position} of ${ev.waiting} waiting.`];
      if (ev.estimate) parts.push(`About ${Math.max(1, Math.round(ev.estimate / 60))} minutes.`);
      if (ev.message) parts.push(ev.message);
      $("lobby-queue").textContent = parts.join(" ");
      announce(parts.join(" "));
      break;
    }
    case "called":
      announce("You are being called in.");
      break;
    case "moved":
      // A host moved us: that room's consent, waiting room and welcome follow.
      app.held = null;
      $("where").textContent = `Room ${ev.room} · ${app.claims.pseudonym ?? app.claims.name}`;
      $("connecting-text").textContent = `Moving you to room ${ev.room}.`;
      if (ev.reason === "consent_declined") show("connecting", `You did not agree to that room's terms: back to room ${ev.room}.`);
      else show("connecting", `A host is moving you to room ${ev.room}${ev.reason ? `: ${ev.reason}` : ""}.`);
      break;
    case "arrived":
      app.memberStates.clear();
      app.roles.clear();
      app.lobby = [];
      app.speaking = new Set();
      app.audioRules = null;
      app.peopleShape = null;
      app.audio?.dispose();
      app.audio = null; // enterRoom connects audio in the new room
      enterRoom(`You are now in room ${ev.room}.`);
      break;
    case "joined":
      announce(`${ev.name} joined the session.`);
      renderPeople();
      break;
    case "left":
      app.memberStates.delete(ev.memberId);
      announce(`${ev.name} left the session.`);
      renderPeople();
      break;
    case "member_state":
      onMemberState(ev);
      break;
    case "lobby": {
      const before = app.lobby.length;
      app.lobby = ev.members;
      renderLobby();
      if (ev.members.length > before) announce(`${ev.members[ev.members.length - 1].name} is in the waiting room.`);
      break;
    }
    case "room_state":
      app.entry = ev.entry;
      $("host-entry").textContent = { open: "open", lobby: "through the waiting room", locked: "locked" }[ev.entry] ?? ev.entry;
      announce(`Entry to the session is now ${$("host-entry").textContent}.`);
      break;
    case "grants":
      app.roles.set(ev.memberId, ev.role);
      if (ev.memberId === client.memberId) {
        app.grants = new Set(ev.grants);
        announce(`Your role is now ${ev.role}.`);
        applyGrants();
      }
      renderPeople();
      break;
    case "error":
      // A fatal one ends the session: the closing screen says why.
      if (!ev.fatal) alertText(`The server refused: ${ev.message} (${ev.code}).`);
      break;
    case "reconnecting":
      if (app.screen === "room" || app.screen === "reconnecting") {
        $("reconnecting-text").textContent = `Attempt ${ev.attempt}.`;
        show("reconnecting", ev.attempt === 1 ? "Connection lost. Reconnecting." : `Reconnecting, attempt ${ev.attempt}.`);
      }
      break;
    case "resumed":
      enterRoom(ev.sameMember ? "Reconnected. You are back in the session." : "Reconnected as a new member of the session.");
      break;
    case "closed":
      showClosed(ev.reason, ev.message);
      break;
    case "object_added":
    case "object_removed":
    case "objects_synced":
    case "view_changed":
    case "lock_changed":
    case "annotation_changed":
      onObjectEvent(ev);
      break;
    case "handover_requested":
      announce(`${nameOf(ev.memberId)} asks for the model you hold.`);
      break;
    case "move_refused":
      alertText(`Your move was refused: ${ev.code}.`);
      break;
    default:
      break;
  }
}

function onServerMessage(client, m) {
  if (client !== app.client) return;
  if (m.t === "audio_rules") {
    app.audioRules = m;
    renderAudio();
  }
}

function onMemberState(ev) {
  const c = app.client;
  const prev = app.memberStates.get(ev.memberId) ?? { paused: false, muted: false, unmuteRequested: false };
  const next = { paused: ev.paused, muted: ev.muted, unmuteRequested: ev.unmuteRequested };
  app.memberStates.set(ev.memberId, next);
  const who = nameOf(ev.memberId);
  if (ev.memberId === c.memberId) {
    if (next.muted !== prev.muted) announce(next.muted ? "A host muted your microphone." : "A host allowed you to unmute.");
  } else if (next.paused !== prev.paused) {
    announce(next.paused ? `${who} stepped out.` : `${who} is back.`);
  } else if (next.unmuteRequested && !prev.unmuteRequested) {
    announce(`${who} asks to be unmuted.`);
  } else if (next.muted !== prev.muted) {
    announce(next.muted ? `${who} is muted.` : `${who} may unmute.`);
  }
  renderPeople();
}

const CLOSED_TEXT = {
  [CloseReason.LEFT]: ["You left the session", "You have left the session. You can close this page."],
  removed: ["You were removed", "A host removed you from the session."],
  banned: ["You cannot join this room", "A host has barred you from this room."],
  session_ended: ["The session has ended", "The host ended the session. Thank you for taking part."],
  denied: ["You were not let in", "The host did not let you into the session."],
  consent_required: ["You did not join", "You did not give consent, so you have not joined the session. Nothing of the session was shared with you."],
  unauthorized: ["This join link does not work", "The server did not accept this join link. Ask for a new one."],
  token_expired: ["This join link has expired", "The join link is no longer valid. Ask for a new one."],
  room_full: ["The room is full", "The session has as many people as it can take."],
  replaced: ["You joined somewhere else", "You joined this session from another window or device, so this page was disconnected."],
  connection_lost: ["Connection lost", "The connection to the session was lost."],
  unreachable: ["Cannot reach the server", "The session's server did not answer. Check your connection and try again."],
};

function showClosed(reason, message) {
  if (app.closed !== null) return;
  app.closed = { reason, message };
  app.held = null;
  alertText("");
  if (app.xr?.presenting) app.xr.exit().catch(() => {});
  const [title, text] = CLOSED_TEXT[reason] ?? ["Session closed", `The session closed (${reason}).`];
  $("closed-title").textContent = title;
  $("closed-text").textContent = text;
  const detail = message && !["closed by the application"].includes(message) && (reason === "removed" || reason === "banned" || reason === "unreachable") ? message : "";
  $("closed-detail").textContent = detail ? `Reason given: ${detail.replace(/^[a-z_]+: /u, "")}` : "";
  const final = ["removed", "banned", "session_ended", "token_expired", "unauthorized"].includes(reason);
  $("closed-rejoin").hidden = final;
  show("closed", `${title}. ${text}`);
}

// ----------------------------------------------------------------- the room

function enterRoom(text) {
  const c = app.client;
  if (app.scene === null) setupScene();
  if (app.scene.client !== c || app.placedAs !== c.memberId) {
    // Each member starts on a circle around the room's centre, facing it.
    const a = (c.memberId * 2.39996) % (2 * Math.PI); // the golden angle: neighbours spread out
    app.desktop.place(1.8 * Math.sin(a), 1.8 * Math.cos(a), a);
    app.placedAs = c.memberId;
  }
  app.scene.client = c;
  const shown = app.claims.pseudonym ?? app.claims.name;
  $("you-text").textContent = `${shown}, ${app.roles.get(c.memberId) ?? app.claims.role}, in room ${c.room}.`;
  applyGrants();
  renderPeople();
  renderLobby();
  renderModels();
  $("room-banner").hidden = true;
  if (app.audio === null || app.audio.client !== c) startAudio(c);
  app.images.attach(c);
  app.clinic.attach(c);
  const others = c.members.size;
  show("room", text ?? `You are in the session. ${others === 0 ? "Nobody else is here yet." : `${others} other ${others === 1 ? "person is" : "people are"} here.`}`);
}

/** Whether the room the client is in now answers its HTTP requests (models, images): the
 * join token's own room, or another one the member was moved into with an access credential. */
function hasRoomAccess() {
  const c = app.client;
  return c !== null && c !== undefined && (c.room === app.claims?.room || c.roomAccess !== null);
}

function applyGrants() {
  const g = app.grants;
  $("host-lobby").hidden = !g.has("moderate");
  $("host-room").hidden = !g.has("moderate");
  $("model-add").hidden = !g.has("upload_assets") && !g.has("manipulate_objects");
  $("asset-upload").hidden = !g.has("upload_assets");
  $("asset-upload").previousElementSibling.hidden = !g.has("upload_assets");
  $("annotate").hidden = !g.has("annotate");
  // The asset API takes the token of its room, or after a move the room access credential
  // the server gave with it (a server without one leaves the moved member none).
  const ownRoom = hasRoomAccess();
  if (ownRoom && (g.has("manipulate_objects") || g.has("upload_assets"))) refreshAssets();
  $("model-add").hidden ||= !ownRoom;
  renderModels();
  app.images?.render();
  app.clinic?.render();
}

function setupScene() {
  const scene = new RoomScene($("scene"), app.client);
  app.scene = scene;
  app.panels3d = new ImagePanels3D(scene.scene, app.images);
  scene.onModelsChanged = () => renderModels();
  app.desktop = new DesktopControls($("scene"), scene, {
    grab: () => toggleGrab(),
    rotateHeld: (sign) => {
      if (app.held) app.held.yaw += (sign * Math.PI) / 12;
    },
    nextModel: () => {
      const ids = [...app.client.objects.keys()];
      if (ids.length === 0) return announce("There are no models in the room.");
      const i = ids.indexOf(app.selected);
      select(ids[(i + 1) % ids.length]);
    },
    placePoint: (hit) => placePoint(hit),
    pick: (hit) => {
      if (hit && currentTool() !== "none") placePoint(hit);
      else if (hit) pickModel(hit);
    },
    strokeActive: () => currentTool() === "stroke",
    strokeDrag: (hit) => {
      if (hit && app.draft && app.draft.kind === "stroke" && app.draft.objectId === hit.objectId) {
        const last = app.draft.points[app.draft.points.length - 1];
        if (Math.hypot(...hit.local.map((v, k) => v - last[k])) > 0.01 && app.draft.points.length < 128) {
          app.draft.points.push(hit.local);
          app.scene.showDraft(app.draft.objectId, app.draft.points);
        }
      } else if (hit) placePoint(hit);
    },
    cancel: () => {
      app.draft = null;
      scene.showDraft(null, []);
      announce("Cancelled.");
    },
  });
  app.xr = new XRMode(scene, {
    grabAt: (hand, grip) => xrGrab(hand, grip),
    releaseHand: (hand) => {
      if (app.held && app.held.hand === hand) releaseHeld();
    },
    pinAt: (origin, dir) => {
      const hit = scene.pickRay(origin, dir);
      if (hit) annotatePin(hit);
    },
    onEnd: () => {
      $("vr-enter").textContent = "Enter VR";
      announce("You left VR. You are back in the desktop view.");
    },
  });
  let last = performance.now();
  scene.renderer.setAnimationLoop(() => {
    const now = performance.now();
    const dt = Math.min(0.1, (now - last) / 1000);
    last = now;
    frame(dt);
  });
  xrSupport().then(({ ok, reason }) => {
    $("vr-enter").hidden = !ok;
    $("xr-text").textContent = ok ? "A VR headset is available." : reason;
  });
}

function frame(dt) {
  const c = app.client;
  const scene = app.scene;
  if (!c || app.screen !== "room") {
    if (app.screen === "room") scene.render();
    return;
  }
  app.frames++;
  const presenting = app.xr.presenting;
  if (!presenting) app.desktop.update(dt);
  const poses = presenting ? app.xr.poses() : [scene.headPose(), null, null];
  if (c.state === "joined") {
    try {
      c.sendPose(...poses);
    } catch {
      // a pose out of the protocol's range (far away): not sent this frame
    }
    moveHeld(poses);
  }
  scene.syncModels();
  scene.updateAvatars();
  scene.updateModels();
  scene.syncAnnotations();
  app.panels3d.sync(c);
  scene.render();
}

// ----------------------------------------------------------------- audio

const MIC_TEXT = {
  on: "Your microphone is on: others hear you from where your avatar stands.",
  refused: "You did not allow the microphone, so others cannot hear you; you still hear the session. To speak, allow the microphone for this site in the browser's settings, then reload the page.",
  unavailable: "No microphone was found, so others cannot hear you; you still hear the session.",
  insecure: "The microphone is not available: this page is not a secure context (https, or this computer's own address). You still hear the session.",
  not_allowed: "Your role does not include speaking: you hear the session.",
  failed: "Audio could not be connected to the session.",
};

// The microphone is asked for once per page: a refusal is remembered, not asked again.
async function microphone() {
  if (app.micStream !== null) return app.micStream.getAudioTracks()[0] ?? null;
  if (["refused", "unavailable", "insecure"].includes(app.mic)) return null;
  if (!window.isSecureContext || !navigator.mediaDevices?.getUserMedia) {
    app.mic = "insecure";
    return null;
  }
  try {
    app.micStream = await navigator.mediaDevices.getUserMedia({ audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true } });
    return app.micStream.getAudioTracks()[0] ?? null;
  } catch (err) {
    app.mic = err?.name === "NotAllowedError" || err?.name === "SecurityError" ? "refused" : "unavailable";
    return null;
  }
}

async function startAudio(client) {
  app.audio?.dispose();
  if (typeof RTCPeerConnection !== "function") {
    $("mic-text").textContent = "This browser has no WebRTC, so there is no audio.";
    return;
  }
  const audio = new AudioClient(client);
  app.audio = audio;
  audio.on("speaking", ({ members }) => {
    app.speaking = new Set(members);
    renderPeople();
  });
  audio.on("ended", () => {
    if (app.audio === audio && app.screen === "room") $("mic-text").textContent = MIC_TEXT.failed;
  });
  const may = app.grants.has("publish_audio");
  const track = may ? await microphone() : null;
  if (app.audio !== audio) return;
  if (!may) app.mic = "not_allowed";
  else if (track !== null) app.mic = "on";
  try {
    const mix = await audio.start({ microphone: track ?? false });
    const el = $("mix");
    el.srcObject = mix;
    el.play().catch(() => {
      // Autoplay refused until the person interacts: the button starts it.
      $("audio-start").hidden = false;
    });
  } catch (err) {
    if (app.audio !== audio) return;
    app.mic = "failed";
    alertText(`Audio could not be connected: ${err.message}`);
  }
  $("mic-text").textContent = MIC_TEXT[app.mic] ?? "";
  $("mic-toggle").hidden = !audio.publishing;
  announce(MIC_TEXT[app.mic] ?? "");
}

async function toggleMute() {
  const audio = app.audio;
  if (!audio?.publishing) return;
  try {
    await audio.mute(!audio.muted);
    $("mic-toggle").textContent = audio.muted ? "Unmute microphone" : "Mute microphone";
    $("mic-toggle").setAttribute("aria-pressed", String(audio.muted));
    announce(audio.muted ? "Your microphone is muted." : "Your microphone is on.");
  } catch (err) {
    alertText(`The microphone did not change: ${err.message}`);
  }
}

// ----------------------------------------------------------------- people and host controls

// A button: `label` shown, `spoken` (if given) its accessible name naming whom it acts on.
function button(label, action, key, spoken = null) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.dataset.action = action;
  b.dataset.key = String(key);
  if (spoken) b.setAttribute("aria-label", spoken);
  return b;
}

// Rebuild a list and keep keyboard focus on the same control if it still exists.
function rebuild(list, items) {
  const focused = list.contains(document.activeElement) ? document.activeElement : null;
  const sel = focused?.dataset?.action ? `[data-action="${focused.dataset.action}"][data-key="${focused.dataset.key}"]` : null;
  list.replaceChildren(...items);
  if (sel) (list.querySelector(sel) ?? list.closest("section").querySelector("h2"))?.focus?.();
}

function tagsOf(id) {
  const s = app.memberStates.get(id) ?? {};
  const tags = [];
  const role = app.roles.get(id);
  if (role) tags.push(role);
  if (app.speaking.has(id)) tags.push("speaking");
  if (s.muted) tags.push("muted by a host");
  if (s.unmuteRequested) tags.push("asks to unmute");
  if (s.paused) tags.push("stepped out");
  const zone = zoneOf(id);
  if (zone) tags.push(`zone ${zone}`);
  if (broadcasting(id)) tags.push("broadcasting");
  return tags.join(" · ");
}

function renderPeople() {
  const c = app.client;
  if (!c) return;
  const host = app.grants.has("moderate");
  const ids = [c.memberId, ...[...c.members.keys()].filter((id) => id !== c.memberId)];
  const nameFor = (id) => (id === c.memberId ? `${app.claims.pseudonym ?? app.claims.name} (you)` : (c.members.get(id) ?? `Member ${id}`));
  // What the controls depend on: when only tags change (someone starts or stops speaking),
  // the list is updated in place, so a control being pressed stays where it is.
  const shape = JSON.stringify([host, ids.map((id) => [id, nameFor(id), app.memberStates.get(id)?.muted, app.roles.get(id), broadcasting(id), zoneOf(id)])]);
  const list = $("people-list");
  if (shape === app.peopleShape) {
    for (const li of list.children) li.querySelector(".tags").textContent = tagsOf(Number(li.dataset.memberId));
    return;
  }
  app.peopleShape = shape;
  const items = [];
  for (const id of ids) {
    const li = document.createElement("li");
    const s = app.memberStates.get(id) ?? {};
    const name = nameFor(id);
    const role = app.roles.get(id);
    li.innerHTML = `<span class="who"></span><span class="tags"></span>`;
    li.querySelector(".who").textContent = name;
    li.querySelector(".tags").textContent = tagsOf(id);
    li.dataset.memberId = String(id);
    if (host && id !== c.memberId) {
      const row = document.createElement("div");
      row.className = "buttons";
      const casting = broadcasting(id);
      row.append(
        s.muted ? button("Allow unmute", "allow_unmute", id, `Allow ${name} to unmute`) : button("Mute", "mute", id, `Mute ${name}`),
        role === "host" ? button("Make participant", "participant", id, `Make ${name} a participant`) : button("Make host", "host", id, `Make ${name} a host`),
        button("Remove", "remove", id, `Remove ${name}`),
        button(casting ? "Stop broadcast" : "Broadcast", "broadcast", id, casting ? `Stop ${name}'s broadcast` : `Broadcast ${name} to the whole room`),
      );
      const zoneLabel = document.createElement("label");
      zoneLabel.textContent = "Audio zone";
      zoneLabel.className = "inline";
      const zoneSel = document.createElement("select");
      zoneSel.dataset.action = "zone";
      zoneSel.dataset.key = String(id);
      zoneSel.setAttribute("aria-label", `Audio zone of ${name}`);
      zoneLabel.htmlFor = zoneSel.id = `zone-${id}`;
      const zone = zoneOf(id);
      for (const z of [0, 1, 2, 3]) zoneSel.append(new Option(z === 0 ? "The whole room" : `Zone ${z}`, String(z), false, z === zone));
      li.append(row, zoneLabel, zoneSel);
    }
    items.push(li);
  }
  rebuild(list, items);
  const whisper = $("whisper-select");
  const current = whisper.value;
  whisper.replaceChildren(new Option("Nobody (speak to the room)", ""), ...[...c.members].map(([id, n]) => new Option(n, String(id))));
  whisper.value = [...whisper.options].some((o) => o.value === current) ? current : "";
}

// audio_rules broadcast: a flat list [member, gain percent, ...]
const broadcasting = (id) => pairs(app.audioRules?.broadcast ?? []).some(([m]) => m === id);

function zoneOf(id) {
  // audio_rules zones: a flat list [member, zone, member, zone, ...]
  const z = app.audioRules?.zones ?? [];
  for (let i = 0; i + 1 < z.length; i += 2) if (z[i] === id) return z[i + 1];
  return 0;
}

function renderLobby() {
  const items = app.lobby.map((w) => {
    const li = document.createElement("li");
    li.innerHTML = `<span class="who"></span><span class="tags"></span><div class="buttons"></div>`;
    li.querySelector(".who").textContent = w.name;
    li.querySelector(".tags").textContent = w.identity ? `identity: ${w.identity}` : "";
    li.querySelector(".buttons").append(button("Admit", "admit", w.id, `Admit ${w.name}`), button("Deny", "deny", w.id, `Deny ${w.name}`));
    return li;
  });
  rebuild($("host-lobby-list"), items);
  $("host-lobby-empty").hidden = app.lobby.length > 0;
}

function renderAudio() {
  const r = app.audioRules;
  if (!r) return;
  const parts = [];
  if (r.whispers?.length) parts.push(`Whispers: ${pairs(r.whispers).map(([a, b]) => `${nameOf(a)} to ${nameOf(b)}`).join(", ")}`);
  if (r.broadcast?.length) parts.push(`Broadcasting: ${pairs(r.broadcast).map(([m]) => nameOf(m)).join(", ")}`);
  if (r.zones?.length) parts.push(`Zones: ${pairs(r.zones).map(([m, z]) => `${nameOf(m)} in ${z}`).join(", ")}`);
  $("audio-rules").textContent = parts.join(". ");
  renderPeople();
}

const pairs = (flat) => {
  const out = [];
  for (let i = 0; i + 1 < flat.length; i += 2) out.push([flat[i], flat[i + 1]]);
  return out;
};

async function hostAction(action, id) {
  const c = app.client;
  const name = nameOf(id);
  try {
    if (action === "admit" || action === "deny") {
      const w = app.lobby.find((x) => x.id === id);
      await c.moderate(action, id);
      announce(`${action === "admit" ? "Admitted" : "Denied"} ${w?.name ?? "the person"}.`);
    } else if (action === "remove") {
      if (!window.confirm(`Remove ${name} from the session? They cannot come back with the same link.`)) return;
      await c.moderate("remove", id, "removed by a host");
      announce(`Removed ${name}.`);
    } else if (action === "mute" || action === "allow_unmute") {
      await c.moderate(action, id);
    } else if (action === "host" || action === "participant") {
      await c.changeRole(id, { role: action });
      announce(`${name} is now a ${action}.`);
    } else if (action === "broadcast") {
      const on = !broadcasting(id);
      await app.audio.broadcast(id, on);
      announce(on ? `${name} is heard by the whole room.` : `${name} no longer broadcasts.`);
    }
  } catch (err) {
    alertText(`That did not work: ${err.message}`);
  }
}

// ----------------------------------------------------------------- models

function currentTool() {
  return document.querySelector('input[name="tool"]:checked')?.value ?? "none";
}

function select(id) {
  app.selected = id;
  app.scene.selected = id;
  const obj = app.client.objects.get(id);
  announce(obj ? `Selected model ${obj.name ?? id}.` : "No model selected.");
  renderModels();
}

function renderModels() {
  const c = app.client;
  if (!c || !app.scene) return;
  if (app.selected !== null && !c.objects.has(app.selected)) app.selected = app.scene.selected = null;
  const items = [...c.objects.values()].map((o) => {
    const li = document.createElement("li");
    const m = app.scene.models.get(o.id);
    const state = m?.failed ? "could not be loaded" : m?.loaded ? "" : "loading";
    const holder = o.holder === null ? "" : o.holder === c.memberId ? "held by you" : `held by ${nameOf(o.holder)}`;
    const b = button(`${o.name ?? `Model ${o.id}`}${[state, holder].filter(Boolean).map((t) => ` (${t})`).join("")}`, "select", o.id);
    b.setAttribute("aria-pressed", String(app.selected === o.id));
    li.append(b);
    if (app.selected === o.id) li.setAttribute("aria-current", "true");
    return li;
  });
  rebuild($("models-list"), items);
  $("models-empty").hidden = c.objects.size > 0;
  const sel = app.selected !== null ? c.objects.get(app.selected) : null;
  const can = app.grants.has("manipulate_objects");
  $("model-grab").disabled = !sel || !can;
  $("model-grab").textContent = app.held && app.held.objectId === app.selected ? "Let go (G)" : "Grab (G)";
  $("model-remove").disabled = !sel || !can;
  renderView(sel);
  renderAnnotations(sel);
}

function renderView(obj) {
  const box = $("view-nodes");
  const m = obj ? app.scene.models.get(obj.id) : null;
  $("view").hidden = !obj;
  if (!obj) return;
  const items = (m?.nodeNames ?? []).slice(0, 64).map((name) => {
    const label = document.createElement("label");
    const input = document.createElement("input");
    input.type = "checkbox";
    input.checked = obj.nodes.get(name) !== false;
    input.dataset.action = "node";
    input.dataset.key = name;
    input.disabled = !app.grants.has("manipulate_objects");
    label.append(input, ` Show ${name}`);
    return label;
  });
  const focused = box.contains(document.activeElement) ? document.activeElement.dataset.key : null;
  box.replaceChildren(...items);
  if (focused) box.querySelector(`[data-key="${CSS.escape(focused)}"]`)?.focus();
  $("clip-on").checked = obj.plane.length === 4;
  $("clip-on").disabled = $("clip-offset").disabled = !app.grants.has("manipulate_objects");
  if (obj.plane.length === 4 && document.activeElement !== $("clip-offset")) $("clip-offset").value = String(Math.round(obj.plane[3] * 100));
}

function renderAnnotations(obj) {
  const items = obj
    ? [...obj.annotations.values()].map((a) => {
        const li = document.createElement("li");
        const what = a.kind === "pin" ? `Pin${a.text ? `: ${a.text}` : ""}` : a.kind === "measure" ? "Measurement" : `Stroke of ${a.points.length} points`;
        li.textContent = `${what}, by ${a.author}`;
        if (a.authorId === app.client.memberId || app.grants.has("moderate")) li.append(" ", button("Delete", "anno-delete", a.id, `Delete ${what}`));
        return li;
      })
    : [];
  rebuild($("anno-list"), items);
}

let syncQueued = false;
function onObjectEvent(ev) {
  if (ev.type === "lock_changed" && app.held && app.held.objectId === ev.objectId && ev.holder !== app.client.memberId) {
    app.held = null;
    announce(ev.reason === "timeout" ? "You let go of the model (it was idle)." : "You no longer hold the model.");
  }
  if (ev.type === "object_added" && app.client.objectsSynced) {
    // Models that were there when we joined are not news; ones added later are.
    const o = app.client.objects.get(ev.objectId);
    if (o) announce(`Model ${o.name ?? ev.objectId} was added to the room.`);
  }
  if (syncQueued) return;
  syncQueued = true;
  queueMicrotask(() => {
    syncQueued = false;
    app.scene?.syncModels();
    renderModels();
  });
}

async function toggleGrab() {
  const c = app.client;
  if (app.held) return releaseHeld();
  const id = app.selected;
  if (id === null) return announce("Select a model first: press N, or pick one in the list.");
  try {
    await c.grab(id);
    const t = c.objectTransform(id);
    // Carried at the distance it was grabbed from (the mouse wheel changes it).
    app.desktop.heldDistance = Math.min(4, Math.max(0.3, new THREE.Vector3(...t.position).distanceTo(app.scene.camera.getWorldPosition(new THREE.Vector3()))));
    app.held = { objectId: id, hand: "desktop", yaw: 0, rotation: new THREE.Quaternion(...t.rotation), scale: t.scale };
    announce("You hold the model. Move to carry it; G lets go.");
  } catch (err) {
    const who = err instanceof RequestError && err.holder ? ` ${nameOf(err.holder)} holds it.` : "";
    alertText(`You cannot grab this model: ${err.message}.${who}`);
  }
  renderModels();
}

async function releaseHeld() {
  const held = app.held;
  app.held = null;
  if (!held) return;
  try {
    await app.client.release(held.objectId);
    announce("You let go of the model.");
  } catch (err) {
    alertText(`Letting go failed: ${err.message}`);
  }
  renderModels();
}

async function xrGrab(hand, grip) {
  const c = app.client;
  const p = grip.getWorldPosition(new THREE.Vector3());
  const id = app.scene.nearestModel(p, 0.15);
  if (id === null || app.held) return;
  app.held = { objectId: id, hand, pending: true };
  try {
    await c.grab(id);
  } catch (err) {
    app.held = null;
    alertText(`You cannot grab this model: ${err.message}.`);
    return;
  }
  if (!app.held || app.held.objectId !== id) return; // let go before the server answered
  const m = app.scene.models.get(id);
  grip.updateMatrixWorld(true);
  m.group.updateMatrixWorld(true);
  // The model keeps its place relative to the hand while held.
  app.held = { objectId: id, hand, grip, offset: grip.matrixWorld.clone().invert().multiply(m.group.matrixWorld) };
  select(id);
  announce("You hold the model with your hand.");
}

function moveHeld() {
  const held = app.held;
  if (!held || held.pending) return;
  const c = app.client;
  if (held.hand === "desktop") {
    const p = app.desktop.heldTarget();
    const q = new THREE.Quaternion().setFromAxisAngle(new THREE.Vector3(0, 1, 0), held.yaw).multiply(held.rotation);
    c.move(held.objectId, p.toArray(), q.toArray(), held.scale);
  } else {
    held.grip.updateMatrixWorld(true);
    const m = held.grip.matrixWorld.clone().multiply(held.offset);
    const p = new THREE.Vector3();
    const q = new THREE.Quaternion();
    const s = new THREE.Vector3();
    m.decompose(p, q, s);
    c.move(held.objectId, p.toArray(), q.toArray(), Math.min(1000, Math.max(0.001, s.x)));
  }
}

// A model picked without an annotation tool: selected, and when the case images are linked to
// it, the images move to the point picked for everyone.
function pickModel(hit) {
  select(hit.objectId);
  app.images?.locateAt(hit.objectId, hit.local);
}

async function annotatePin(hit) {
  const text = $("anno-text").value.trim() || null;
  try {
    await app.client.annotate(hit.objectId, "pin", [hit.local], { text });
    announce(`Pin placed${text ? `: ${text}` : ""}.`);
  } catch (err) {
    alertText(`The pin was not placed: ${err.message}`);
  }
}

async function placePoint(hit) {
  const tool = currentTool();
  if (tool === "none") {
    if (hit) pickModel(hit);
    else announce("Nothing is under the centre cross.");
    return;
  }
  if (!hit) return announce("Nothing is under the centre cross: aim at a model.");
  if (app.selected !== hit.objectId) select(hit.objectId); // its view and annotations show
  if (tool === "pin") return annotatePin(hit);
  if (!app.draft || app.draft.objectId !== hit.objectId || app.draft.kind !== tool) app.draft = { objectId: hit.objectId, kind: tool, points: [] };
  app.draft.points.push(hit.local);
  app.scene.showDraft(hit.objectId, app.draft.points);
  if (tool === "measure") {
    if (app.draft.points.length < 2) return announce("First point placed. Place the second point.");
    const d = app.draft;
    app.draft = null;
    app.scene.showDraft(null, []);
    try {
      await app.client.annotate(d.objectId, "measure", d.points.slice(0, 2));
      announce("Measurement placed.");
    } catch (err) {
      alertText(`The measurement was not placed: ${err.message}`);
    }
  } else {
    announce(`Stroke point ${app.draft.points.length} placed. Finish the stroke when done.`);
  }
}

async function finishStroke() {
  const d = app.draft;
  if (!d || d.kind !== "stroke" || d.points.length < 2) return announce("A stroke needs at least two points.");
  app.draft = null;
  app.scene.showDraft(null, []);
  try {
    await app.client.annotate(d.objectId, "stroke", d.points.slice(0, 128));
    announce("Stroke placed.");
  } catch (err) {
    alertText(`The stroke was not placed: ${err.message}`);
  }
}

async function refreshAssets() {
  try {
    const assets = await app.client.listAssets();
    const sel = $("asset-select");
    sel.replaceChildren(...assets.map((a) => new Option(a.name, a.sha256)));
    $("asset-spawn").disabled = assets.length === 0;
  } catch (err) {
    $("asset-spawn").disabled = true;
  }
}

async function spawnSelected() {
  const sha = $("asset-select").value;
  if (!sha) return;
  const cam = app.scene.camera.getWorldPosition(new THREE.Vector3());
  const dir = app.scene.camera.getWorldDirection(new THREE.Vector3());
  const pos = cam.add(dir.multiplyScalar(1.2));
  try {
    const id = await app.client.spawn(sha, { position: pos.toArray() });
    select(id);
  } catch (err) {
    alertText(`The model was not added: ${err.message}`);
  }
}

// ----------------------------------------------------------------- wiring

function wire() {
  $("signin-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const err = $("signin-error");
    try {
      const token = tokenFromText($("signin-token").value);
      if (!token) throw new TypeError("Paste the join link or token first.");
      useToken(token);
      err.hidden = true;
      join();
    } catch (ex) {
      err.textContent = ex.message;
      err.hidden = false;
      $("signin-token").focus();
      announce(ex.message);
    }
  });
  $("consent-accept").addEventListener("click", () => app.consentAnswer?.(true));
  $("consent-decline").addEventListener("click", () => app.consentAnswer?.(false));
  $("lobby-leave").addEventListener("click", () => app.client?.close());
  $("you-leave").addEventListener("click", () => app.client?.close());
  $("paused-leave").addEventListener("click", () => app.client?.close());
  $("you-pause").addEventListener("click", async () => {
    await app.client.pause(true);
    if (app.held) app.held = null;
    show("paused", "You have stepped out. Others no longer see or hear you.");
  });
  $("paused-return").addEventListener("click", async () => {
    await app.client.pause(false);
    enterRoom("You are back in the session.");
  });
  $("closed-rejoin").addEventListener("click", () => join());
  $("closed-other").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    show("signin", "Paste a join link to join a session.");
  });
  for (const b of document.querySelectorAll("[data-entry]")) {
    b.addEventListener("click", () => app.client.moderate(b.dataset.entry).catch((e) => alertText(e.message)));
  }
  $("host-end").addEventListener("click", () => {
    if (window.confirm("End the session for everyone?")) app.client.moderate("end", null, "the session has ended");
  });
  for (const list of ["people-list", "host-lobby-list"]) {
    $(list).addEventListener("click", (e) => {
      const b = e.target.closest("button[data-action]");
      if (b) hostAction(b.dataset.action, Number(b.dataset.key));
    });
  }
  $("people-list").addEventListener("change", async (e) => {
    const s = e.target.closest("select[data-action='zone']");
    if (!s) return;
    const id = Number(s.dataset.key);
    try {
      await app.audio.setZone(id, Number(s.value));
      announce(`${nameOf(id)} is now in ${Number(s.value) === 0 ? "the whole room" : `zone ${s.value}`}.`);
    } catch (err) {
      alertText(`The zone did not change: ${err.message}`);
    }
  });
  $("whisper-set").addEventListener("click", async () => {
    const v = $("whisper-select").value;
    try {
      await app.audio.whisper(v ? Number(v) : null);
      announce(v ? `You now whisper to ${nameOf(Number(v))}.` : "You speak to the room.");
    } catch (err) {
      alertText(`The whisper did not change: ${err.message}`);
    }
  });
  $("mic-toggle").addEventListener("click", () => toggleMute());
  $("audio-start").addEventListener("click", () => {
    $("mix").play().then(() => ($("audio-start").hidden = true), () => {});
  });
  $("models-list").addEventListener("click", (e) => {
    const b = e.target.closest("button[data-action='select']");
    if (b) select(Number(b.dataset.key));
  });
  $("model-grab").addEventListener("click", () => toggleGrab());
  $("model-remove").addEventListener("click", async () => {
    if (app.selected === null || !window.confirm("Remove this model and its annotations from the room?")) return;
    try {
      await app.client.removeObject(app.selected);
      announce("Model removed.");
    } catch (err) {
      alertText(`The model was not removed: ${err.message}`);
    }
  });
  $("asset-spawn").addEventListener("click", () => spawnSelected());
  $("asset-upload").addEventListener("change", async (e) => {
    const file = e.target.files?.[0];
    if (!file) return;
    try {
      announce(`Uploading ${file.name}.`);
      const info = await app.client.uploadAsset(new Uint8Array(await file.arrayBuffer()), file.name);
      await refreshAssets();
      $("asset-select").value = info.sha256;
      await spawnSelected();
    } catch (err) {
      alertText(`The upload failed: ${err.message}`);
    }
    e.target.value = "";
  });
  $("anno-point").addEventListener("click", () => placePoint(app.scene.pickScreen(0, 0)));
  $("anno-finish").addEventListener("click", () => finishStroke());
  $("anno-list").addEventListener("click", async (e) => {
    const b = e.target.closest("button[data-action='anno-delete']");
    if (!b) return;
    try {
      await app.client.deleteAnnotation(Number(b.dataset.key));
      announce("Annotation deleted.");
    } catch (err) {
      alertText(`The annotation was not deleted: ${err.message}`);
    }
  });
  $("view-nodes").addEventListener("change", async (e) => {
    const input = e.target.closest("input[data-action='node']");
    if (!input || app.selected === null) return;
    try {
      await app.client.setView(app.selected, { nodes: new Map([[input.dataset.key, input.checked]]) });
      announce(`${input.dataset.key} ${input.checked ? "shown" : "hidden"}.`);
    } catch (err) {
      alertText(`The view did not change: ${err.message}`);
    }
  });
  const setPlane = async () => {
    if (app.selected === null) return;
    const plane = $("clip-on").checked ? [0, -1, 0, Number($("clip-offset").value) / 100] : [];
    try {
      await app.client.setView(app.selected, { plane });
    } catch (err) {
      alertText(`The clipping plane did not change: ${err.message}`);
    }
  };
  $("clip-on").addEventListener("change", () => {
    setPlane();
    announce($("clip-on").checked ? "Clipping plane on." : "Clipping plane off.");
  });
  $("clip-offset").addEventListener("change", () => setPlane());
  $("vr-enter").addEventListener("click", async () => {
    if (app.xr.presenting) return app.xr.exit();
    try {
      await app.xr.enter();
      $("vr-enter").textContent = "Exit VR";
      announce("You are in VR. Squeeze to grab a model within reach, pull the trigger to pin an annotation.");
    } catch (err) {
      alertText(`VR could not start: ${err.message}`);
    }
  });
}

function boot() {
  wire();
  const parts = {
    announce,
    alertText,
    nameOf: (id) => (app.client ? nameOf(id) : `Member ${id}`),
    grants: () => app.grants,
    // The HTTP API takes the token of its room, or the credential of the last move.
    ownRoom: hasRoomAccess,
  };
  app.images = new ImageViewer(parts);
  app.clinic = new ClinicControls(parts);
  if (!window.isSecureContext) {
    notice("This page is not a secure context (it is not served over https, nor from this computer's own address), so the browser offers neither the microphone nor VR here. Ask for an https link to use them.");
  }
  const fromFragment = tokenFromFragment(window.location.hash);
  // The token leaves the address bar (and the history) at once.
  if (window.location.hash) history.replaceState(null, "", window.location.pathname);
  const token = fromFragment ?? sessionStorage.getItem(TOKEN_KEY);
  if (token) {
    try {
      useToken(token);
      join();
      return;
    } catch (err) {
      $("signin-error").textContent = err.message;
      $("signin-error").hidden = false;
    }
  }
  show("signin", "Paste a join link to join a session.");
}

/** The app's state for tools and tests (read-only views and a few actions). */
window.medverse = {
  get screen() {
    return app.screen;
  },
  get state() {
    return app.client?.state ?? null;
  },
  get memberId() {
    return app.client?.memberId ?? null;
  },
  get client() {
    return app.client;
  },
  get closed() {
    return app.closed;
  },
  get announcements() {
    return [...app.announcements];
  },
  get lobby() {
    return app.lobby.map((w) => ({ ...w }));
  },
  get held() {
    return app.held ? { objectId: app.held.objectId, hand: app.held.hand } : null;
  },
  get selected() {
    return app.selected;
  },
  get frames() {
    return app.frames;
  },
  /** The case images panel: the panel shown, its view, the image drawn, pointers, measurements. */
  get images() {
    return app.images?.describe() ?? null;
  },
  /** The image panels drawn in the 3D view: panel id -> {key, position, width, height}. */
  get imagePanels() {
    return app.panels3d?.describe() ?? {};
  },
  /** The audio as the page has it: microphone state, publishing, muted, connection state. */
  get audio() {
    const a = app.audio;
    return { mic: app.mic, publishing: Boolean(a?.publishing), muted: Boolean(a?.muted), connection: a?.pc?.connectionState ?? null, receiving: Boolean($("mix").srcObject) };
  },
  get xrPresenting() {
    return Boolean(app.xr?.presenting);
  },
  /** In VR: this frame's head, left and right hand poses (world), as sent to the room. */
  get xrPoses() {
    return app.xr?.presenting ? app.xr.poses() : null;
  },
  /** What is drawn: avatars, models and this member's head, in world coordinates. */
  describe() {
    return app.scene ? app.scene.describe() : null;
  },
  /** Put the desktop viewpoint at (x, z) facing `yaw` radians (tests and demos). */
  place(x, z, yaw = 0, pitch = 0) {
    app.desktop?.place(x, z, yaw, pitch);
  },
  select(id) {
    select(id);
  },
};

boot();
