// The medverse client: one member's connection to a room over a WebSocket, for browsers (the
// global WebSocket) and Node (pass `WebSocket`, e.g. the `ws` package's class). It mirrors
// client_sdk/session.py and client_sdk/objects.py on top of the sans-I/O Connection and the
// state frame decoder:
//
//   const client = await connect({ url: "wss://clinic.example/ws", room: "demo", token,
//                                  onEvent: (ev) => console.log(ev.type, ev) });
//   client.sendPose(head, left, right);          // {position: [x, y, z], rotation: [x, y, z, w]}
//   for (const a of client.sample().values()) draw(a.id, a.poses);   // each animation frame
//
// Events (`onEvent`, and `client.on(type, fn)`) are plain objects with a `type`: waiting,
// joined, left, error, member_state, lobby, room_state, grants, reconnecting, resumed, closed,
// in a clinic moved, arrived, queue, called and move_declined, and for shared objects object_added, object_removed, lock_changed, handover_requested,
// view_changed, annotation_changed, move_refused, objects_synced, and for image viewers
// (images.js) panel_changed, pointer_moved, measurement_changed, images_synced.
//
// New message types are one declaration away: pass their definitions (messages.js's
// defineMessage) as `messages`, send them with `client.send(msg)` and receive them with
// `client.on(type, fn)`. A request answered by a reply naming its `req` (as object requests are
// by obj_ack and obj_refused) goes through `client.request(make)`; its reply types are entries
// of REPLIES below.

import { ErrorCode, ProtocolError } from "./errors.js";
import { Connection, Role, State } from "./connection.js";
import {
  CLIENT_MESSAGES,
  OBJECT_ID_BASE,
  PROTOCOL_VERSION,
  SERVER_MESSAGES,
  encodeMove,
  encodePose,
  messageRegistry,
} from "./messages.js";
import { POSITION_STEP_M, dequantizeRotation } from "./quant.js";
import { SnapshotDecoder, entityIndex, rowStarts } from "./snapshot.js";
import { IMAGE_METHODS, ImagePanels } from "./images.js";

/** Error codes after which reconnecting cannot help: the client stops for good and its
 * `closed` event carries the code as its `reason`. */
export const FINAL_CODES = new Set([
  ErrorCode.UNSUPPORTED_VERSION,
  ErrorCode.ROOM_FULL,
  ErrorCode.HANDSHAKE_REQUIRED,
  ErrorCode.BAD_FIELD,
  ErrorCode.OUT_OF_RANGE,
  ErrorCode.UNAUTHORIZED,
  ErrorCode.TOKEN_EXPIRED,
  ErrorCode.TOO_MANY_CONNECTIONS,
  ErrorCode.CONSENT_REQUIRED,
  ErrorCode.BANNED,
  ErrorCode.SESSION_ENDED,
  ErrorCode.DENIED,
  ErrorCode.REMOVED,
]);

/** Why a client closed (`closed` events' `reason`): a final error code (FINAL_CODES), or one of
 * these. */
export const CloseReason = Object.freeze({
  LEFT: "left", // the application called close()
  CONNECTION_LOST: "connection_lost", // the connection broke and reconnecting is off
  REPLACED: "replaced", // another connection resumed this member (close code 4002)
  ...Object.fromEntries([...FINAL_CODES].map((c) => [c.toUpperCase(), c])),
});

// WebSocket close codes a server ends a member with (protocol/SPEC.md "Close codes").
const CLOSE_REASONS = new Map([
  [4002, CloseReason.REPLACED],
  [4011, ErrorCode.CONSENT_REQUIRED],
]);

/** The server refused the join (`code`: an ErrorCode string). */
/** Redirects followed in a row before a join counts as failed. */
export const MAX_REDIRECTS = 5;

// The server answered our hello with `redirect`: the room lives at `url`.
class Redirected extends Error {
  constructor(url) {
    super(`redirected to ${url}`);
    this.url = url;
  }
}

export class JoinError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.name = "JoinError";
    this.code = code;
  }
}

/** The server refused a request (an object operation): `code`, and for `object_locked` the
 * member holding the object as `holder`. */
export class RequestError extends Error {
  constructor(code, message, { objectId = null, holder = null, attributes = null } = {}) {
    super(`${code}: ${message}`);
    this.name = "RequestError";
    this.code = code;
    this.objectId = objectId;
    this.holder = holder;
    /** For an image series refused with identifiable_data: the keywords of the identifying
     * attributes (never their values). */
    this.attributes = attributes;
  }
}

/** Replies that answer a request by its `req`: type -> how (ok resolves, refused rejects). */
export const REPLIES = new Map([
  ["obj_ack", "ok"],
  ["obj_refused", "refused"],
  ["ack", "ok"], // the acknowledged requests of the core and audio messages (their `req`)
  ["refused", "refused"],
  ["img_ack", "ok"], // image viewer requests (images.js)
  ["img_refused", "refused"],
]);

const OPEN = 1; // WebSocket.OPEN, the same in browsers and in ws
const now = () => performance.now() / 1000;
const IDENTITY = Object.freeze([0, 0, 0, 1]);

/** `ws://host:port` to `ws://host:port/ws`; a URL with a path is kept. */
export function wsUrl(url) {
  const base = url.replace(/\/+$/u, "");
  const i = base.indexOf("://");
  return base.indexOf("/", i >= 0 ? i + 3 : 0) >= 0 ? base : `${base}/ws`;
}

/** `ws(s)://host:port/...` (or an http URL) to `http(s)://host:port`. */
export function httpBase(url) {
  const i = url.indexOf("://");
  if (i < 0) throw new TypeError(`not a URL: ${url}`);
  const scheme = { ws: "http", wss: "https" }[url.slice(0, i)] || url.slice(0, i);
  return `${scheme}://${url.slice(i + 3).split("/")[0]}`;
}

/** A pose as [position, rotation]: from {position, rotation}, [position, rotation] or null. */
function poseOf(p) {
  if (p === null || p === undefined) return null;
  const pos = Array.isArray(p) ? p[0] : p.position;
  const rot = Array.isArray(p) ? p[1] : p.rotation || IDENTITY;
  if (!pos || !rot || pos.length !== 3 || rot.length !== 4) {
    throw new TypeError("a pose is a position [x, y, z] and a rotation [x, y, z, w]");
  }
  if (![...pos, ...rot].every(Number.isFinite)) throw new RangeError("pose values must be finite");
  return [pos, rot];
}

/** Spherical interpolation of two unit quaternions, shortest path. */
export function slerp(q0, q1, a) {
  let dot = q0[0] * q1[0] + q0[1] * q1[1] + q0[2] * q1[2] + q0[3] * q1[3];
  let s1 = 1;
  if (dot < 0) {
    dot = -dot;
    s1 = -1;
  }
  const theta = Math.acos(Math.min(dot, 1));
  const sin = Math.sin(theta);
  let w0 = 1 - a;
  let w1 = a;
  if (sin >= 1e-6) {
    w0 = Math.sin((1 - a) * theta) / sin;
    w1 = Math.sin(a * theta) / sin;
  }
  w1 *= s1;
  const out = [0, 1, 2, 3].map((k) => w0 * q0[k] + w1 * q1[k]);
  const n = Math.hypot(...out);
  return out.map((v) => v / n);
}

// Row r of a snapshot in metres and a unit quaternion.
function rowPose(snap, r) {
  const p = snap.pos;
  const q = snap.rot;
  return {
    position: [p[3 * r] * POSITION_STEP_M, p[3 * r + 1] * POSITION_STEP_M, p[3 * r + 2] * POSITION_STEP_M],
    rotation: dequantizeRotation(snap.rotIndex[r], [q[3 * r], q[3 * r + 1], q[3 * r + 2]]),
  };
}

// The rows of entity `id`: {start, count} or null.
function rowsOf(snap, id) {
  const i = entityIndex(snap, id);
  if (i < 0) return null;
  let start = 0;
  for (let j = 0; j < i; j++) start += snap.slots[j];
  return { index: i, start, count: snap.slots[i] };
}

/** An object's entity id in the tick state. */
export const objectEntityId = (objectId) => OBJECT_ID_BASE + objectId;

/** One member's connection to a room. Create it with `connect(options)`. */
export class MedverseClient {
  /** Options: `url` (ws(s)://host:port, or with a path), `room`, `token` (the join token;
   * required unless the server runs without authentication), `name` (shown only without a
   * token), `slots` (3: head and hands; 1: a desktop head), `consent` ((version, text) =>
   * boolean or a promise of one; without it consent rooms refuse the join), `onEvent`,
   * `WebSocket` (the class to use; default the global one), `fetch` (default the global one),
   * `reconnect` (default true), `maxBackoff` (seconds), `connectTimeout` (seconds),
   * `interpolationDelay` (seconds; default three ticks), `history` (states kept for
   * sampling), `pingInterval` (seconds; 0: off), `messages` (definitions of an application's
   * own message types), `requestTimeout` (seconds), `fallbackUrls` (other servers of a
   * cluster to reconnect through when the one we were on and `url` cannot be reached). In a
   * cluster the client follows the servers' `redirect` to the server that runs the room,
   * with its token and resume token. */
  constructor(options) {
    const o = { slots: 3, name: "guest", reconnect: true, maxBackoff: 5, connectTimeout: 10, history: 64, pingInterval: 2, requestTimeout: 10, ...options };
    if (!o.url || !o.room) throw new TypeError("url and room are required");
    this.url = wsUrl(o.url);
    /** The URL the application gave: reconnecting goes back to it when a server a redirect
     * named cannot be reached (it may have died; another takes its rooms). */
    this.entryUrl = this.url;
    this.fallbackUrls = (o.fallbackUrls ?? []).map(wsUrl);
    this._fallback = 0;
    this._movedTo = null; // where a redirect sent a joined member (its room moved)
    // The transfer grant of a redirect moving us to a room another server runs: the next
    // hello's token in place of the join token (which names our first room), until a welcome.
    this._transferGrant = null;
    /** Redirects followed since start(). */
    this.redirects = 0;
    this.room = o.room;
    this.token = o.token ?? null;
    /** After a move: the server's credential for the HTTP APIs of the room we are in now (our
     * join token names the room we first entered); null before any move. The server sends a
     * fresh one (`access`) before it expires, and this follows. */
    this.roomAccess = null;
    this.name = o.name;
    this.slots = o.slots;
    this.consent = o.consent ?? null;
    this.reconnect = o.reconnect;
    this.maxBackoff = o.maxBackoff;
    this.connectTimeout = o.connectTimeout;
    this.interpolationDelay = o.interpolationDelay ?? null;
    this.historySize = o.history;
    this.pingInterval = o.pingInterval;
    this.requestTimeout = o.requestTimeout;
    this.WebSocket = o.WebSocket ?? globalThis.WebSocket;
    this.fetch = o.fetch ?? globalThis.fetch?.bind(globalThis);
    if (typeof this.WebSocket !== "function") throw new TypeError("no WebSocket: pass one as the WebSocket option");
    this.clientMessages = messageRegistry(CLIENT_MESSAGES.values(), o.messages ?? []);
    this.serverMessages = messageRegistry(SERVER_MESSAGES.values(), o.messages ?? []);

    /** Our member id, the room's tick rate, the last round trip (seconds), the others. */
    this.memberId = 0;
    this.rate = 30;
    this.rtt = null;
    this.members = new Map(); // id -> name
    this.role = null; // as a host last changed it (null: as the token says)
    this.grants = null;
    this.consentVersion = null;
    this.lobbyId = null;
    /** Between a `moved` and the welcome of the room we were moved to: that room. */
    this.movingTo = null;
    // Declined the consent of a room we were moved to: `reconnect` as it was before (restored
    // when the server moves us back), until the server's answer.
    this._declinedMove = null;
    /** In a waiting room: {position, waiting, estimate, message} as last told. */
    this.queue = null;
    /** The room's shared objects: object id -> SharedObject (see _onObjectState). */
    this.objects = new Map();
    /** The room's image panels, measurements and pointers (images.js). */
    this.panels = new ImagePanels(this);

    this.conn = null;
    this.socket = null; // the current WebSocket (tools and tests may drop it)
    this.closedReason = null;
    this.framesReceived = 0;
    this.bytesReceived = 0;
    this._listeners = new Map(); // type -> Set of functions (events and server messages)
    if (o.onEvent) this.on("*", o.onEvent);
    this._resume = null;
    this._decoder = new SnapshotDecoder();
    this._history = []; // [{t, snap}], oldest first
    this._offsets = [];
    this._offset = 0;
    this._seq = 0;
    this._outbox = null;
    this._lastPoseSent = -Infinity;
    this._poseTimer = null;
    this._pings = new Map();
    this._pingId = 0;
    this._pingTimer = null;
    this._req = 0;
    this._pending = new Map(); // req -> {resolve, reject, timer}
    this._moves = new Map(); // object id -> move frame
    this._moveTimer = null;
    this._lastMoveSent = -Infinity;
    this._local = new Map(); // object id -> our own transform while we hold it
    this._released = new Map(); // object id -> [transform, until room time]
    this._synced = false;
    this._closing = false;
    this._wake = null; // ends a reconnect backoff early (close)
    this._opening = null; // the WebSocket and Connection of a join in progress
    this._openingConn = null;
    this._avatars = null;
  }

  /** Where the connection is: hello, consent, lobby, joined, paused, closing or closed. */
  get state() {
    const conn = this._openingConn ?? this.conn;
    return conn === null ? State.CLOSED : conn.state;
  }

  // ----------------------------------------------------------------- events

  /** Call `fn` with every event of `type` ("*": every event), or with every message of an
   * application's own server message type; returns a function that removes it. */
  on(type, fn) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(fn);
    return () => this._listeners.get(type).delete(fn);
  }

  /** Deliver an event to its listeners and to the catch-all ones. */
  emit(ev) {
    for (const key of [ev.type, "*"]) {
      for (const fn of this._listeners.get(key) ?? []) {
        try {
          fn(ev);
        } catch (err) {
          queueMicrotask(() => {
            throw err;
          });
        }
      }
    }
  }

  // ----------------------------------------------------------------- lifecycle

  /** Connect and join; resolves with the welcome, rejects with JoinError (or an Error when the
   * server cannot be reached). In a room with a lobby it resolves once a host admits us. */
  async start() {
    this._closing = false;
    try {
      await this.#join();
    } catch (err) {
      if (err instanceof JoinError && !this._closing) this.#finish(err.code, err.message);
      throw err;
    }
    if (this.pingInterval > 0) {
      this._pingTimer = setInterval(() => {
        if (this.state === State.JOINED) this.ping().catch(() => {});
      }, this.pingInterval * 1000);
      this._pingTimer.unref?.();
    }
  }

  /** Leave the room and close the connection for good. */
  close() {
    if (this._closing) return;
    this._closing = true;
    const ws = this.socket;
    if (ws !== null && ws.readyState === OPEN) {
      try {
        if (this.conn.accepts({ t: "leave" })) ws.send(this.conn.send({ t: "leave" }));
        ws.close(1000);
      } catch {
        // already going
      }
    }
    this.#finish(CloseReason.LEFT, "closed by the application");
  }

  #finish(reason, message = "") {
    if (this.closedReason !== null) return;
    this._closing = true;
    this.closedReason = reason;
    clearInterval(this._pingTimer);
    clearTimeout(this._poseTimer);
    clearTimeout(this._moveTimer);
    if (this._wake) this._wake();
    for (const p of this._pending.values()) p.reject(new Error(`closed: ${reason}`));
    this._pending.clear();
    for (const p of this._pings.values()) p.reject(new Error(`closed: ${reason}`));
    this._pings.clear();
    for (const ws of [this.socket, this._opening]) {
      if (ws !== null && ws.readyState <= OPEN) {
        try {
          ws.close(1000);
        } catch {
          // already going
        }
      }
    }
    this.conn?.closed();
    this.emit({ type: "closed", reason, message });
  }

  // Connect and join, following redirects (at most MAX_REDIRECTS in a row) to the server that
  // runs the room, and asking again while the room moves between servers (room_moving).
  async #join() {
    const deadline = now() + this.connectTimeout;
    let hops = 0;
    for (;;) {
      try {
        return await this.#open();
      } catch (err) {
        if (err instanceof Redirected) {
          if (++hops > MAX_REDIRECTS) throw new Error(`more than ${MAX_REDIRECTS} redirects in a row for room ${this.room}`);
          this.url = err.url;
          this.redirects += 1;
        } else if (err instanceof JoinError && err.code === ErrorCode.ROOM_MOVING && now() < deadline && !this._closing) {
          await new Promise((resolve) => setTimeout(resolve, 200));
          this.url = this.entryUrl;
          hops = 0;
        } else if (!(err instanceof JoinError) && hops > 0 && now() < deadline && !this._closing) {
          // A live server redirected us to one that is gone (killed moments ago: its entry
          // and the room's lease run out within the cluster's lease time): ask again shortly.
          await new Promise((resolve) => setTimeout(resolve, 200));
          this.url = this.entryUrl;
          hops = 0;
        } else {
          throw err;
        }
      }
    }
  }

  // The next URL to reconnect through: the given one, then each fallback in turn.
  #nextEntry() {
    const entries = [this.entryUrl, ...this.fallbackUrls];
    if (!entries.includes(this.url)) this._fallback = 0;
    else this._fallback = (this._fallback + 1) % entries.length;
    return entries[this._fallback];
  }

  // One connection attempt: hello, consent, lobby, until the welcome.
  #open() {
    return new Promise((resolve, reject) => {
      const ws = new this.WebSocket(this.url);
      ws.binaryType = "arraybuffer";
      const conn = new Connection(Role.CLIENT, { clientMessages: this.clientMessages, serverMessages: this.serverMessages });
      this._opening = ws;
      this._openingConn = conn;
      let settled = false;
      let fatal = null; // the fatal error the server sent before closing
      let timer = null;
      const arm = () => {
        clearTimeout(timer);
        timer = setTimeout(() => fail(new Error("no welcome from the server in time")), this.connectTimeout * 1000);
      };
      const fail = (err) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        this._openingConn = null;
        conn.closed();
        try {
          ws.close();
        } catch {
          // not open yet
        }
        reject(err);
      };
      arm();
      ws.onopen = () => {
        const hello = { t: "hello", version: PROTOCOL_VERSION, room: this.room, name: this.name, slots: this.slots, resume: this._resume, token: this._transferGrant ?? this.token };
        ws.send(conn.send(hello));
      };
      ws.onerror = () => {}; // a close follows
      ws.onclose = (e) => {
        if (!settled) {
          const code = fatal?.code ?? CLOSE_REASONS.get(e.code);
          fail(code ? new JoinError(code, fatal?.message ?? `closed with ${e.code}`) : new Error(`connection closed during join (${e.code})`));
          return;
        }
        if (this.socket === ws) this.#dropped(ws, fatal, e.code);
      };
      ws.onmessage = async (e) => {
        if (settled) {
          if (this.socket === ws) fatal = this.#onFrame(e.data) ?? fatal;
          return;
        }
        const ev = conn.receive(typeof e.data === "string" ? e.data : new Uint8Array(e.data), { text: typeof e.data === "string" });
        if (ev.event !== "MessageReceived") return; // nothing else is expected before the welcome
        const m = ev.message;
        if (m.t === "welcome") {
          settled = true;
          clearTimeout(timer);
          this._opening = this._openingConn = null;
          this.#welcomed(ws, conn, m);
          resolve(m);
        } else if (m.t === "redirect") {
          fail(new Redirected(m.url));
        } else if (m.t === "consent_required") {
          if (this.consent === null) {
            // Not answered: a decline would be recorded as the person's choice.
            this.reconnect = false;
            fail(new JoinError(ErrorCode.CONSENT_REQUIRED, "the room asks for consent and no consent callback was given"));
            return;
          }
          let accept = false;
          try {
            accept = Boolean(this.consent !== null && (await this.consent(m.version, m.text)));
          } catch {
            accept = false;
          }
          this.consentVersion = m.version;
          if (!settled && ws.readyState === OPEN) ws.send(conn.send({ t: "consent", version: m.version, accept }));
        } else if (m.t === "waiting") {
          clearTimeout(timer); // the wait lasts until a host answers
          this.lobbyId = m.lobby_id;
          this.emit({ type: "waiting", room: m.room, lobbyId: m.lobby_id });
        } else if (m.t === "error") {
          if (m.fatal) fatal = m;
          else this.emit({ type: "error", code: m.code, message: m.message, fatal: false });
        }
      };
    });
  }

  #welcomed(ws, conn, welcome) {
    this.conn = conn;
    this.socket = ws;
    // Back in the room our join token names (a resume after a move came too late): the move's
    // credential is for another room.
    if (welcome.room !== this.room && this.movingTo === null) this.roomAccess = null;
    this.room = welcome.room; // a member moved elsewhere resumes there
    this._transferGrant = null; // used: resumes go with the join token and resume token
    this.movingTo = null;
    this.memberId = welcome.member_id;
    this.rate = welcome.rate;
    this._resume = welcome.resume;
    this.members = new Map(welcome.members.map((m) => [m.id, m.name]));
    this._decoder.reset();
    this._history = [];
    this._offsets = [];
    this._avatars = null;
    this._objectsRenewed();
    if (this._outbox !== null) this.#flushPose();
  }

  // The joined connection `ws` is gone: reconnect (resume), or stop for good.
  async #dropped(ws, fatal, closeCode) {
    this.conn?.closed();
    if (this._closing) return;
    const code = fatal?.code ?? CLOSE_REASONS.get(closeCode);
    if (code !== undefined && (FINAL_CODES.has(code) || code === CloseReason.REPLACED)) {
      this.#finish(code, fatal?.message ?? `closed with ${closeCode}`);
      return;
    }
    if (!this.reconnect && this._transferGrant === null) {
      // (A move to a room another server runs is followed even so: it is the move.)
      this.#finish(CloseReason.CONNECTION_LOST, `connection closed (${closeCode})`);
      return;
    }
    const oldId = this.memberId;
    const moved = this._movedTo;
    this._movedTo = null;
    if (moved !== null) {
      this.url = moved;
      this.redirects += 1;
    }
    for (let attempt = 1; !this._closing; attempt++) {
      let delay = Math.min(this.maxBackoff, 0.05 * 2 ** (attempt - 1)) * (0.5 + Math.random() / 2);
      if (moved !== null && attempt === 1) delay = 0; // the room moved: its new server expects us now
      this.emit({ type: "reconnecting", attempt, delay });
      await new Promise((resolve) => {
        const t = setTimeout(resolve, delay * 1000);
        this._wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this._wake = null;
      if (this._closing) return;
      try {
        const arriving = this.movingTo !== null; // moved to a room another server runs
        const welcome = await this.#join();
        if (this._closing) {
          this.socket?.close();
          return;
        }
        if (arriving) {
          // We are a new member of the room we were moved to, on the server that runs it.
          this.emit({ type: "arrived", room: welcome.room, memberId: welcome.member_id, members: [...this.members] });
          return;
        }
        this.emit({ type: "resumed", memberId: welcome.member_id, sameMember: welcome.resumed && welcome.member_id === oldId });
        return;
      } catch (err) {
        // A move's transfer grant joins once: the room it moved us to refused us.
        if (err instanceof JoinError && (FINAL_CODES.has(err.code) || this._transferGrant !== null)) {
          this.#finish(err.code, err.message);
          return;
        }
        // The server may be gone (its rooms move to others): go back to the URL we were
        // given, which finds the room wherever it is now, or to the fallbacks in turn.
        if (!(err instanceof JoinError)) {
          // A server a live one redirected us to is gone: its lease runs out within the
          // cluster's lease time, so ask again shortly rather than backing off further.
          if (![this.entryUrl, ...this.fallbackUrls].includes(this.url)) attempt = Math.min(attempt, 2);
          this.url = this.#nextEntry();
        }
      }
    }
  }

  // ----------------------------------------------------------------- sending

  /** Send one control message now, through the connection's state machine; throws when not
   * connected, or (LocalProtocolError) when the protocol does not allow it in this state. */
  send(msg) {
    const ws = this.socket;
    if (this.conn === null || ws === null || ws.readyState !== OPEN || this.state === State.CLOSING || this.state === State.CLOSED) {
      throw new Error("not connected");
    }
    ws.send(this.conn.send(msg));
  }

  /** Send one binary frame as is (object moves; tools that speak the protocol byte by byte). */
  sendRaw(frame) {
    const ws = this.socket;
    if (ws === null || ws.readyState !== OPEN) throw new Error("not connected");
    ws.send(frame);
  }

  /** Queue this member's pose (each a {position, rotation}, [position, rotation] or null when
   * not tracked; `poses` for rigs of other sizes): the newest is sent, at most once per tick.
   * Returns its sequence number. */
  sendPose(head = null, left = null, right = null, { poses } = {}) {
    const list = (poses ?? [head, left, right]).slice(0, this.slots).map(poseOf);
    while (list.length < this.slots) list.push(null);
    this._seq = (this._seq + 1) >>> 0;
    this._outbox = encodePose(this._seq, list);
    this.#flushPose();
    return this._seq;
  }

  #flushPose() {
    if (this._poseTimer !== null || this._outbox === null) return;
    const wait = this._lastPoseSent + 1 / this.rate - now();
    if (wait > 0) {
      this._poseTimer = setTimeout(() => {
        this._poseTimer = null;
        this.#flushPose();
      }, wait * 1000);
      return;
    }
    const ws = this.socket;
    if (ws === null || ws.readyState !== OPEN || this.state !== State.JOINED) return; // kept for later
    ws.send(this._outbox);
    this._outbox = null;
    this._lastPoseSent = now();
  }

  /** Measure the round trip to the server; resolves with seconds. */
  ping(timeout = 5) {
    this._pingId = (this._pingId + 1) >>> 0;
    const id = this._pingId;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pings.delete(id);
        reject(new Error("no pong in time"));
      }, timeout * 1000);
      this._pings.set(id, {
        resolve: (v) => {
          clearTimeout(timer);
          resolve(v);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      });
      try {
        this.send({ t: "ping", id, client_time: now() });
      } catch (err) {
        this._pings.get(id).reject(err);
        this._pings.delete(id);
      }
    });
  }

  // ----------------------------------------------------------------- moderation

  /** A host's action (needs the moderate grant; refusals arrive as error events): admit or
   * deny a lobby member (its lobby id), remove or ban a member (the reason is shown to them),
   * mute or allow_unmute, lock, unlock, lobby, open, or end the session. */
  async moderate(action, memberId = null, reason = null) {
    this.send({ t: "moderate", action, member_id: memberId, reason });
  }

  /** Give a member another role, or give (allow true) or take one grant. */
  async changeRole(memberId, { role = null, grant = null, allow = null } = {}) {
    this.send({ t: "change_role", member_id: memberId, role, grant, allow });
  }

  /** Step out of the room (or back in); asking for the state we are in does nothing. */
  async pause(paused = true) {
    if (this.state === (paused ? State.PAUSED : State.JOINED)) return;
    this.send({ t: "pause", paused });
  }

  /** Ask the hosts to allow unmuting after a server mute. */
  async requestUnmute() {
    this.send({ t: "request_unmute" });
  }

  // ----------------------------------------------------------------- clinic

  /** Move member `memberId` of our room to `room` (a host, a receptionist or the transfer
   * grant); resolves once moved, rejects with RequestError (forbidden, not_found, room_full,
   * room_locked, banned, rate_limited, ...) with nothing moved. In a cluster, moving to a room
   * another server runs resolves once that server has accepted the member (or rejects with its
   * refusal, room_moving if it is gone, transfer_timeout if it did not answer: nothing moved).
   * If the member then declines that room's consent, a move_declined event follows (it went
   * back where it came from, or its connection closed: `back` null); so for callNext. */
  async transfer(memberId, room, reason = null) {
    await this.request((req) => ({ t: "transfer", req, member_id: memberId, room, reason }));
  }

  /** A host calls the patient who has waited longest in the clinic's waiting room into our
   * room. */
  async callNext() {
    await this.request((req) => ({ t: "call_next", req }));
  }

  /** Send member `memberId` of our room back to the clinic's waiting room. */
  async sendBack(memberId, reason = null) {
    await this.request((req) => ({ t: "send_back", req, member_id: memberId, reason }));
  }

  /** Withdraw the consent given to the room's text: the server removes us from the room. */
  async withdrawConsent() {
    if (this.consentVersion === null) throw new Error("this room did not ask for consent");
    this.reconnect = false;
    this.send({ t: "consent", version: this.consentVersion, accept: false });
  }

  // ----------------------------------------------------------------- receiving

  // One message on the joined connection; returns a fatal error message, if it is one.
  #onFrame(data) {
    const text = typeof data === "string";
    const frame = text ? data : new Uint8Array(data);
    this.bytesReceived += frame.length;
    const ev = this.conn.receive(frame, { text });
    if (ev.event === "StateReceived") {
      this.#onState(ev.frame);
    } else if (ev.event === "Refused") {
      this.emit({ type: "error", code: ev.error.code, message: `from server: ${ev.error.message}`, fatal: false });
    } else if (ev.event === "MessageReceived") {
      const m = ev.message;
      // The client's own types become events; an application's go to its on(type) listeners.
      const handle = HANDLERS[m.t];
      if (handle !== undefined) handle(this, m);
      else for (const fn of this._listeners.get(m.t) ?? []) fn(m);
      if (m.t === "error" && m.fatal) return m;
      // The room moves to another server: the server closes us, and we resume there at once.
      if (m.t === "redirect") {
        this._movedTo = m.url;
        // Moved to a room another server runs: we enter it there with the grant it gave.
        if (m.token != null && this.movingTo !== null) this._transferGrant = m.token;
      }
    }
    return null;
  }

  #onState(frame) {
    const t0 = now();
    let snap;
    try {
      snap = this._decoder.decode(frame);
    } catch (err) {
      if (!(err instanceof ProtocolError)) throw err;
      // Our stream state is lost; reconnecting (resume) brings a fresh keyframe.
      this.emit({ type: "error", code: err.code, message: err.message, fatal: false });
      this.socket?.close();
      return;
    }
    this.framesReceived++;
    const t = this._decoder.tick / this.rate;
    this._history.push({ t, snap });
    if (this._history.length > this.historySize) this._history.shift();
    this._offsets.push(t - t0);
    if (this._offsets.length > 90) this._offsets.shift();
    this._offset = Math.max(...this._offsets);
    this._avatars = null;
  }

  // ----------------------------------------------------------------- avatars

  /** The room clock now, in seconds, estimated from the least delayed recent frames. */
  roomTime() {
    return now() + this._offset;
  }

  /** Room time to render remote avatars at: now minus the interpolation delay (default three
   * ticks), so that sample() has states on both sides. */
  renderTime() {
    return this.roomTime() - (this.interpolationDelay ?? 3 / this.rate);
  }

  /** Room tick of the newest state received (null before the first). */
  get tick() {
    return this._decoder.tick;
  }

  /** The newest decoded (quantized) room state. */
  get snapshot() {
    return this._decoder.snapshot;
  }

  /** Avatars as last received, ours included: member id -> {id, name, poses, flags, speaking};
   * `poses` holds a {position, rotation} per slot, or null where a slot is not tracked. */
  avatars() {
    if (this._avatars === null) {
      const snap = this._decoder.snapshot;
      const starts = rowStarts(snap);
      this._avatars = new Map();
      for (let i = 0; i < snap.ids.length && snap.ids[i] < OBJECT_ID_BASE; i++) {
        const poses = [];
        for (let r = starts[i]; r < starts[i] + snap.slots[i]; r++) poses.push(snap.present[r] ? rowPose(snap, r) : null);
        this._avatars.set(snap.ids[i], this.#avatar(snap.ids[i], poses, snap.flags[i]));
      }
    }
    return this._avatars;
  }

  #avatar(id, poses, flags) {
    const name = id === this.memberId ? (this.members.get(id) ?? this.name) : (this.members.get(id) ?? null);
    return { id, name, poses, flags, speaking: (flags & 1) !== 0 };
  }

  /** Every avatar at room time `t` (default renderTime()), interpolated between the buffered
   * states on either side: positions linearly, rotations by slerp. */
  sample(t = this.renderTime()) {
    const out = new Map();
    const h = this._history;
    if (h.length === 0) return out;
    const ids = h[h.length - 1].snap.ids;
    for (let i = 0; i < ids.length && ids[i] < OBJECT_ID_BASE; i++) {
      const a = this.sampleEntity(ids[i], t);
      if (a !== null) out.set(ids[i], a);
    }
    return out;
  }

  /** Entity `id` (an avatar, or objectEntityId(objectId)) at room time `t`, or null when no
   * buffered state has it. */
  sampleEntity(id, t = this.renderTime()) {
    const h = this._history;
    if (h.length === 0) return null;
    let i = 0;
    while (i < h.length && h[i].t <= t) i++;
    let a;
    let b;
    let alpha = 0;
    if (i === 0) a = b = h[0];
    else if (i >= h.length) a = b = h[h.length - 1];
    else {
      a = h[i - 1];
      b = h[i];
      alpha = b.t > a.t ? (t - a.t) / (b.t - a.t) : 0;
    }
    const ra = rowsOf(a.snap, id);
    const rb = rowsOf(b.snap, id);
    if (ra === null && rb === null) return null;
    const poses = [];
    if (ra === null || rb === null || ra.count !== rb.count) {
      const [snap, rows] = rb !== null ? [b.snap, rb] : [a.snap, ra];
      for (let r = rows.start; r < rows.start + rows.count; r++) poses.push(snap.present[r] ? rowPose(snap, r) : null);
    } else {
      for (let k = 0; k < ra.count; k++) {
        const pa = a.snap.present[ra.start + k];
        const pb = b.snap.present[rb.start + k];
        if (pa && pb) {
          const p0 = rowPose(a.snap, ra.start + k);
          const p1 = rowPose(b.snap, rb.start + k);
          poses.push({
            position: p0.position.map((v, j) => v + (p1.position[j] - v) * alpha),
            rotation: slerp(p0.rotation, p1.rotation, alpha),
          });
        } else if (pb || (pa && alpha < 0.5)) {
          poses.push(pb ? rowPose(b.snap, rb.start + k) : rowPose(a.snap, ra.start + k));
        } else {
          poses.push(null);
        }
      }
    }
    const flags = rb !== null ? b.snap.flags[rb.index] : 0;
    return this.#avatar(id, poses, flags);
  }

  // ----------------------------------------------------------------- requests

  /** Send `make(req)` (a message naming the request id `req`) and resolve with its
   * acknowledgement, or reject with RequestError when it is refused. */
  request(make, timeout = this.requestTimeout) {
    this._req = (this._req + 1) >>> 0;
    const req = this._req;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(req);
        reject(new Error(`no answer to request ${req} in time`));
      }, timeout * 1000);
      const done = (fn) => (v) => {
        clearTimeout(timer);
        this._pending.delete(req);
        fn(v);
      };
      this._pending.set(req, { resolve: done(resolve), reject: done(reject) });
      try {
        this.#flushMoves(); // moves made before this call reach the server first
        this.send(make(req));
      } catch (err) {
        // A message the server would refuse (a value out of range, too long) is refused
        // here as the server would, without sending it.
        const why = err instanceof ProtocolError ? new RequestError(err.code, err.message) : err;
        this._pending.get(req)?.reject(why);
      }
    });
  }

  _onReply(m) {
    const p = this._pending.get(m.req);
    if (REPLIES.get(m.t) === "ok") {
      p?.resolve(m);
    } else if (p !== undefined) {
      p.reject(new RequestError(m.code, m.message, { objectId: m.object_id, holder: m.holder }));
    } else if (m.object_id !== null && m.object_id !== undefined) {
      // A refused move: show the server's transform again.
      this._local.delete(m.object_id);
      this._released.delete(m.object_id);
      this.emit({ type: "move_refused", objectId: m.object_id, code: m.code, holder: m.holder });
    }
  }

  // ----------------------------------------------------------------- shared objects

  /** Instantiate an uploaded asset (its SHA-256); resolves with the object id once stored. */
  async spawn(asset, { position = [0, 0, 0], rotation = IDENTITY, scale = 1, name = null } = {}) {
    const ack = await this.request((req) => ({ t: "obj_spawn", req, asset, position, rotation, scale, name }));
    return ack.object_id;
  }

  /** Take the object's exclusive lease (RequestError object_locked, with holder, if taken). */
  async grab(objectId) {
    await this.request((req) => ({ t: "obj_grab", req, object_id: objectId }));
  }

  /** Give the lease back. */
  async release(objectId) {
    await this.request((req) => ({ t: "obj_release", req, object_id: objectId }));
  }

  /** Ask the holder to hand the object over (granted at once if it is free). */
  async requestObject(objectId) {
    await this.request((req) => ({ t: "obj_request", req, object_id: objectId }));
  }

  /** Hand an object you hold to a member who asked for it. */
  async yieldObject(objectId, to) {
    await this.request((req) => ({ t: "obj_yield", req, object_id: objectId, to }));
  }

  /** Hosts only: end whoever's lease on the object. */
  async forceRelease(objectId) {
    await this.request((req) => ({ t: "obj_force_release", req, object_id: objectId }));
  }

  /** Change node visibility (merged into the object's map) and the clipping plane
   * [nx, ny, nz, d] ([] removes it). */
  async setView(objectId, { nodes = null, plane = null } = {}) {
    await this.request((req) => ({ t: "obj_view", req, object_id: objectId, nodes, plane }));
  }

  /** Remove an object and its annotations from the room. */
  async removeObject(objectId) {
    await this.request((req) => ({ t: "obj_remove", req, object_id: objectId }));
  }

  /** Annotate an object (points in its local frame, metres): pin (1 point), stroke (2-128) or
   * measure (2); resolves with the annotation id once stored. */
  async annotate(objectId, kind, points, { text = null, color = null } = {}) {
    const ack = await this.request((req) => ({ t: "anno_create", req, object_id: objectId, kind, points, text, color }));
    return ack.annotation_id;
  }

  async editAnnotation(annotationId, { text = null, points = null, color = null } = {}) {
    await this.request((req) => ({ t: "anno_edit", req, annotation_id: annotationId, text, points, color }));
  }

  async deleteAnnotation(annotationId) {
    await this.request((req) => ({ t: "anno_delete", req, annotation_id: annotationId }));
  }

  /** Move (and scale) an object you hold: applied locally at once, sent at most once per tick
   * (the newest wins). Returns the move's sequence number. */
  move(objectId, position, rotation = IDENTITY, scale = 1) {
    if (![...position, ...rotation, scale].every(Number.isFinite)) throw new RangeError("transform values must be finite");
    this._req = (this._req + 1) >>> 0; // one counter: a refusal's id names one request or move
    const obj = this.objects.get(objectId);
    if (obj !== undefined && obj.holder === this.memberId) {
      const n = Math.hypot(...rotation) || 1;
      this._local.set(objectId, { position: [...position], rotation: rotation.map((q) => q / n), scale });
    }
    this._moves.set(objectId, encodeMove(objectId, this._req, position, rotation, scale));
    this.#scheduleMoves();
    return this._req;
  }

  #scheduleMoves() {
    if (this._moveTimer !== null || this._moves.size === 0) return;
    const wait = this._lastMoveSent + 1 / this.rate - now();
    if (wait > 0) {
      this._moveTimer = setTimeout(() => {
        this._moveTimer = null;
        this.#scheduleMoves();
      }, wait * 1000);
      return;
    }
    this.#flushMoves();
  }

  #flushMoves() {
    const frames = [...this._moves.values()];
    this._moves.clear();
    if (frames.length) this._lastMoveSent = now();
    for (const f of frames) {
      try {
        this.sendRaw(f);
      } catch {
        // dropped: a move is only worth its newest value
      }
    }
  }

  /** An object's transform now, {position, rotation, scale}: our own move while we hold it,
   * else the newest tick state (the spawn transform until the state has it); null if unknown. */
  objectTransform(objectId) {
    const obj = this.objects.get(objectId);
    if (obj === undefined) return null;
    return this.#own(objectId) ?? this.#stateTransform(objectId) ?? obj.initial;
  }

  /** An object's transform at room time `t` (default renderTime()), interpolated like
   * avatars; our own move while we hold it. */
  sampleObject(objectId, t = this.renderTime()) {
    const obj = this.objects.get(objectId);
    if (obj === undefined) return null;
    const own = this.#own(objectId);
    if (own !== null) return own;
    const s = this.sampleEntity(objectEntityId(objectId), t);
    if (s === null || s.poses.length < 2 || s.poses.includes(null)) return this.objectTransform(objectId);
    // Row 1 carries the scale in thousandths as its x millimetres: in metres it is the scale.
    return { position: s.poses[0].position, rotation: s.poses[0].rotation, scale: s.poses[1].position[0] };
  }

  /** True once the room's object list has arrived on the current connection. */
  get objectsSynced() {
    return this._synced;
  }

  #own(objectId) {
    const local = this._local.get(objectId);
    if (local !== undefined) return local;
    const released = this._released.get(objectId);
    if (released !== undefined) {
      if (this.renderTime() <= released[1]) return released[0];
      this._released.delete(objectId);
    }
    return null;
  }

  #stateTransform(objectId) {
    const snap = this._decoder.snapshot;
    const rows = rowsOf(snap, objectEntityId(objectId));
    if (rows === null || rows.count < 2 || !snap.present[rows.start]) return null;
    const body = rowPose(snap, rows.start);
    return { position: body.position, rotation: body.rotation, scale: snap.pos[3 * (rows.start + 1)] / 1000 };
  }

  // A fresh connection (or coming back from a pause): the server resends every object.
  _objectsRenewed() {
    this.objects.clear();
    this._local.clear();
    this._released.clear();
    this._synced = false;
    this.panels._renewed();
    for (const p of this._pending.values()) p.reject(new Error("connection renewed before the answer"));
    this._pending.clear();
  }

  _onObjectState(m) {
    let obj = this.objects.get(m.object_id);
    const fresh = obj === undefined;
    if (fresh) {
      obj = { id: m.object_id, asset: m.asset, name: m.name, author: m.author, holder: null, nodes: new Map(), plane: [], annotations: new Map(), initial: null };
      this.objects.set(m.object_id, obj);
    }
    obj.holder = m.holder;
    obj.nodes = new Map(m.nodes);
    obj.plane = [...m.plane];
    obj.initial = { position: m.position, rotation: m.rotation, scale: m.scale };
    if (fresh) this.emit({ type: "object_added", objectId: m.object_id });
  }

  _onLock(m) {
    const obj = this.objects.get(m.object_id);
    const wasMine = obj !== undefined && obj.holder === this.memberId;
    if (obj !== undefined) obj.holder = m.holder;
    const local = this._local.get(m.object_id);
    if (m.holder === null && m.reason === "release" && wasMine && local !== undefined) {
      // Our last move stands until the state rendered shows it: no jump back.
      this._local.delete(m.object_id);
      this._released.set(m.object_id, [local, this.roomTime() + 1 / this.rate]);
    } else if (m.holder !== this.memberId) {
      this._local.delete(m.object_id);
      this._released.delete(m.object_id);
    }
    this.emit({ type: "lock_changed", objectId: m.object_id, holder: m.holder, reason: m.reason });
  }

  _onObjectMessage(m) {
    const obj = this.objects.get(m.object_id);
    if (m.t === "obj_removed") {
      this.objects.delete(m.object_id);
      this._local.delete(m.object_id);
      this._released.delete(m.object_id);
      this.emit({ type: "object_removed", objectId: m.object_id, by: m.by });
    } else if (m.t === "obj_handover") {
      this.emit({ type: "handover_requested", objectId: m.object_id, memberId: m.member_id });
    } else if (m.t === "obj_view_state") {
      if (obj === undefined) return;
      obj.nodes = new Map(m.nodes);
      obj.plane = [...m.plane];
      this.emit({ type: "view_changed", objectId: m.object_id });
    } else if (m.t === "anno") {
      if (obj === undefined) return;
      obj.annotations.set(m.annotation_id, {
        id: m.annotation_id,
        objectId: m.object_id,
        kind: m.kind,
        points: m.points,
        text: m.text,
        color: m.color,
        author: m.author,
        authorId: m.author_id,
        time: m.time,
        edited: m.edited,
        seq: m.seq,
      });
      this.emit({ type: "annotation_changed", annotationId: m.annotation_id, objectId: m.object_id, deleted: false, seq: m.seq });
    } else if (m.t === "anno_deleted") {
      obj?.annotations.delete(m.annotation_id);
      this.emit({ type: "annotation_changed", annotationId: m.annotation_id, objectId: m.object_id, deleted: true, seq: m.seq });
    }
  }

  // ----------------------------------------------------------------- assets (HTTP)

  #assetUrl(sha256 = null, suffix = "") {
    return this.roomUrl(`/assets${sha256 ? `/${sha256}` : ""}${suffix}`);
  }

  /** The HTTP URL of this room's resource `suffix` (e.g. "/series"). */
  roomUrl(suffix = "") {
    return `${httpBase(this.url)}/rooms/${encodeURIComponent(this.room)}${suffix}`;
  }

  /** An HTTP request with this member's token; resolves with the response, rejects with
   * RequestError (the server's error code) for an answer of 400 or more. */
  roomFetch(url, init = {}) {
    return this.#http(url, { ...init, headers: this.#headers(init.headers ?? {}) });
  }

  /** The bearer token for this room's HTTP APIs: the room access credential of our last
   * move, else the join token. */
  get httpToken() {
    return this.roomAccess ?? this.token;
  }

  #headers(extra = {}) {
    const token = this.httpToken;
    return token ? { ...extra, Authorization: `Bearer ${token}` } : { ...extra };
  }

  async #http(url, init = {}) {
    if (typeof this.fetch !== "function") throw new TypeError("no fetch: pass one as the fetch option");
    const resp = await this.fetch(url, init);
    if (resp.status >= 400) {
      let code = "http_error";
      let message = `HTTP ${resp.status}`;
      let attributes = null;
      try {
        const err = (await resp.json()).error;
        code = String(err.code);
        message = String(err.message);
        if (Array.isArray(err.attributes)) attributes = err.attributes.map(String);
      } catch {
        // not a medverse error body
      }
      throw new RequestError(code, message, { attributes });
    }
    return resp;
  }

  /** Upload a binary glTF (a Uint8Array or ArrayBuffer) to the room; resolves with its listing
   * ({sha256, name, size, ...}), whose sha256 names it for spawn(). */
  async uploadAsset(glb, name = "model.glb") {
    const url = `${this.#assetUrl()}?name=${encodeURIComponent(name)}`;
    const resp = await this.#http(url, { method: "POST", headers: this.#headers({ "Content-Type": "model/gltf-binary" }), body: glb });
    return resp.json();
  }

  /** Every asset of the room, oldest first. */
  async listAssets() {
    return (await (await this.#http(this.#assetUrl(), { headers: this.#headers() })).json()).assets;
  }

  /** Download an asset with this member's token; resolves with its bytes (a Uint8Array),
   * checked against the SHA-256 where the platform has crypto.subtle. */
  async downloadAsset(sha256) {
    const resp = await this.#http(this.#assetUrl(sha256), { headers: this.#headers() });
    const bytes = new Uint8Array(await resp.arrayBuffer());
    const subtle = globalThis.crypto?.subtle;
    if (subtle) {
      const digest = new Uint8Array(await subtle.digest("SHA-256", bytes));
      const hex = Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
      if (hex !== sha256) throw new RequestError("corrupt", `downloaded bytes do not hash to ${sha256}`);
    }
    return bytes;
  }
}

// What the client does with each server message, by type (applications add theirs with on()).
const object = (c, m) => c._onObjectMessage(m);
const HANDLERS = {
  joined(c, m) {
    c.members.set(m.member_id, m.name);
    c._avatars = null;
    c.emit({ type: "joined", memberId: m.member_id, name: m.name });
  },
  left(c, m) {
    c.members.delete(m.member_id);
    c._avatars = null;
    c.emit({ type: "left", memberId: m.member_id, name: m.name, reason: m.reason });
  },
  pong(c, m) {
    c.rtt = now() - m.client_time;
    c._pings.get(m.id)?.resolve(c.rtt);
    c._pings.delete(m.id);
  },
  error(c, m) {
    c.emit({ type: "error", code: m.code, message: m.message, fatal: m.fatal });
  },
  member_state(c, m) {
    c.emit({ type: "member_state", memberId: m.member_id, paused: m.paused, muted: m.muted, unmuteRequested: m.unmute_requested });
  },
  lobby(c, m) {
    c.emit({ type: "lobby", members: m.members.map((w) => ({ id: w.id, name: w.name })) });
  },
  room_state(c, m) {
    c.emit({ type: "room_state", entry: m.entry });
  },
  grants(c, m) {
    if (m.member_id === c.memberId) {
      c.role = m.role;
      c.grants = new Set(m.grants);
    }
    c.emit({ type: "grants", memberId: m.member_id, role: m.role, grants: [...m.grants] });
  },
  welcome(c, m) {
    const arrived = c.movingTo !== null;
    if (arrived) {
      // The room we were moved to let us in: we are a new member there.
      c.movingTo = null;
      c.lobbyId = null;
      c.room = m.room;
      c.memberId = m.member_id;
      c.rate = m.rate;
      c._resume = m.resume;
      c._decoder.reset();
      c._history = [];
      c._offsets = [];
    }
    // Back from a pause (or moved in): the server resends the room's objects.
    c.members = new Map(m.members.map((w) => [w.id, w.name]));
    c._avatars = null;
    c._objectsRenewed();
    if (arrived) c.emit({ type: "arrived", room: m.room, memberId: m.member_id, members: [...c.members] });
  },
  ack: (c, m) => c._onReply(m),
  refused: (c, m) => c._onReply(m),
  moved(c, m) {
    // Out of our room: the target room's consent, lobby and welcome follow on this connection.
    if (c._declinedMove !== null) {
      // We declined the consent of the room we were moved to and the server took us back to
      // the room we came from: the session goes on there.
      c.reconnect = c._declinedMove;
      c._declinedMove = null;
    }
    c.movingTo = m.room;
    c.room = m.room;
    c.roomAccess = m.access ?? null; // the new room's HTTP APIs refuse our join token
    c.queue = null;
    c.members = new Map();
    c._avatars = null;
    c.emit({ type: "moved", room: m.room, by: m.by, reason: m.reason });
  },
  move_declined(c, m) {
    // A member we moved declined the consent of the room we moved it to.
    c.emit({ type: "move_declined", memberId: m.member_id, name: m.name, origin: m.origin, room: m.room, reason: m.reason, back: m.back ?? null });
  },
  access(c, m) {
    // The server refreshes our room's credential before it expires: HTTP uses the new one.
    if (m.room === c.room) c.roomAccess = m.access;
  },
  async consent_required(c, m) {
    // The room we were moved to asks for consent to its own text.
    if (c.consent === null) {
      // Not answered (a decline would be recorded as the person's choice): we leave.
      c.reconnect = false;
      c.close();
      return;
    }
    let accept = false;
    try {
      accept = Boolean(c.consent !== null && (await c.consent(m.version, m.text)));
    } catch {
      accept = false;
    }
    // Declined, the version we consented to is still that of the room we go back to.
    if (accept) c.consentVersion = m.version;
    if (!accept) {
      // The server takes us back to the room we came from (a moved), or closes if it cannot.
      c._declinedMove = c.reconnect;
      c.reconnect = false;
    }
    try {
      c.send({ t: "consent", version: m.version, accept });
    } catch {
      // the connection went away meanwhile
    }
  },
  waiting(c, m) {
    c.lobbyId = m.lobby_id;
    c.emit({ type: "waiting", room: m.room, lobbyId: m.lobby_id });
  },
  queue(c, m) {
    c.queue = { position: m.position, waiting: m.waiting, estimate: m.estimate, message: m.message };
    c.emit({ type: "queue", ...c.queue });
  },
  called(c, m) {
    c.emit({ type: "called", room: m.room, by: m.by });
  },
  obj_ack: (c, m) => c._onReply(m),
  obj_refused: (c, m) => c._onReply(m),
  obj_state: (c, m) => c._onObjectState(m),
  obj_lock: (c, m) => c._onLock(m),
  obj_removed: object,
  obj_handover: object,
  obj_view_state: object,
  anno: object,
  anno_deleted: object,
  img_panel: (c, m) => c.panels._onMessage(m),
  img_closed: (c, m) => c.panels._onMessage(m),
  img_pointers: (c, m) => c.panels._onMessage(m),
  img_measurement: (c, m) => c.panels._onMessage(m),
  img_measurement_deleted: (c, m) => c.panels._onMessage(m),
  img_synced: (c, m) => c.panels._onMessage(m),
  img_ack: (c, m) => c._onReply(m),
  img_refused: (c, m) => c._onReply(m),
  obj_synced(c) {
    c._synced = true;
    c.emit({ type: "objects_synced" });
  },
};

// The image calls (openPanel, setImageView, measure, fetchSlice, ...): images.js.
Object.assign(MedverseClient.prototype, IMAGE_METHODS);

/** Connect and join (see MedverseClient's options); resolves with the joined client. */
export async function connect(options) {
  const client = new MedverseClient(options);
  await client.start();
  return client;
}

