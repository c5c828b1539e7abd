// The connection state machine (protocol/SPEC.md "Connection states"), sans-I/O, for both ends,
// mirroring protocol/connection.py; protocol/vectors/connection.json replays it step by step.
//
// `receive(data, {text})` takes each WebSocket message and returns one event:
//   {event: "MessageReceived", message}   a control message allowed in this state
//   {event: "PoseReceived", frame}        server end: a pose frame of the right size
//   {event: "StateReceived", frame}       client end: a state frame (not decoded)
//   {event: "FrameReceived", kind, frame} a binary frame of another kind (0x04, ...)
//   {event: "Refused", error, fatal}      refused with a ProtocolError
//   {event: "Ignored", reason}            dropped without an answer
// `send(message)` returns the control frame's bytes after applying the transition, or throws
// LocalProtocolError when this end may not send it now.

import { ErrorCode, ProtocolError } from "./errors.js";
import {
  CLIENT_MESSAGES,
  FRAME_CONTROL,
  FRAME_POSE,
  FRAME_STATE,
  MAX_CONTROL_BYTES,
  MAX_SERVER_CONTROL_BYTES,
  PROTOCOL_VERSION,
  SERVER_MESSAGES,
  checkPoseFrame,
  decodeMessage,
  encodeMessage,
} from "./messages.js";

export const Role = Object.freeze({ CLIENT: "client", SERVER: "server" });
export const State = Object.freeze({
  HELLO: "hello",
  CONSENT: "consent",
  LOBBY: "lobby",
  JOINED: "joined",
  PAUSED: "paused",
  CLOSING: "closing",
  CLOSED: "closed",
});

/** This end tried to send something its state does not allow: a bug in the caller. */
export class LocalProtocolError extends Error {
  constructor(message) {
    super(message);
    this.name = "LocalProtocolError";
  }
}

const BEFORE_CLOSING = new Set([State.HELLO, State.CONSENT, State.LOBBY, State.JOINED, State.PAUSED]);
const IN_ROOM = new Set([State.JOINED, State.PAUSED]);
const WELCOME_FROM = new Set([State.CONSENT, State.LOBBY, State.JOINED, State.PAUSED]);
const PING_IN = new Set([State.CONSENT, State.LOBBY, State.JOINED, State.PAUSED]);
const ENDED = new Set([State.CLOSING, State.CLOSED]);

// The code a client end refuses an out-of-place server message with: the one the server uses
// for out-of-place input in the same state.
const CLIENT_REFUSAL = {
  [State.HELLO]: ErrorCode.HANDSHAKE_REQUIRED,
  [State.CONSENT]: ErrorCode.CONSENT_REQUIRED,
  [State.LOBBY]: ErrorCode.FORBIDDEN,
  [State.JOINED]: ErrorCode.ALREADY_JOINED,
  [State.PAUSED]: ErrorCode.ALREADY_JOINED,
};

function refuse(code, message, fatal = false) {
  return { event: "Refused", error: new ProtocolError(code, message), fatal };
}

const accepted = (message) => ({ event: "MessageReceived", message });

function toBytes(data) {
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  throw new TypeError("binary data expected");
}

/** One medverse connection as seen from `role`'s end. Options: `maxControlBytes` (the control
 * frames a server accepts from its client), `clientMessages`, `serverMessages` (registries of
 * what each side may send; by default every family). */
export class Connection {
  constructor(role, { maxControlBytes = MAX_CONTROL_BYTES, clientMessages = CLIENT_MESSAGES, serverMessages = SERVER_MESSAGES } = {}) {
    if (role !== Role.CLIENT && role !== Role.SERVER) throw new TypeError(`unknown role ${role}`);
    this.role = role;
    this.state = State.HELLO;
    this.slots = null;
    this.hello = null;
    this.maxControlBytes = maxControlBytes;
    // A `moved` was sent (server) or received (client) and the target room's `welcome` has not
    // followed yet: the member is between rooms.
    this.moving = false;
    this.clientMessages = clientMessages;
    this.serverMessages = serverMessages;
  }

  // ----------------------------------------------------------------- input

  /** Handle one whole WebSocket message (`text`: it was a text message); never throws on bad
   * input. */
  receive(data, { text = false } = {}) {
    if (ENDED.has(this.state)) return { event: "Ignored", reason: this.state };
    const frame = text && typeof data === "string" ? new TextEncoder().encode(data) : toBytes(data);
    const event = this.role === Role.SERVER ? this.#serverReceive(frame, text) : this.#clientReceive(frame, text);
    if (event.event === "Refused" && event.fatal) this.state = State.CLOSING;
    return event;
  }

  #serverReceive(frame, text) {
    const state = this.state;
    if (text) return refuse(ErrorCode.MALFORMED, "binary frames only", !IN_ROOM.has(state));
    // Poses and plugin frames sent in the old room before the member learnt it was moved.
    if (this.moving && frame[0] !== FRAME_CONTROL) return { event: "Ignored", reason: "moving" };
    if (state === State.HELLO) return this.#serverHello(frame);
    if (state === State.CONSENT) {
      const msg = this.#clientControl(frame);
      if (msg && (msg.t === "consent" || msg.t === "ping" || msg.t === "leave")) return this.#accept(msg);
      return refuse(ErrorCode.CONSENT_REQUIRED, "answer the consent first");
    }
    if (state === State.LOBBY) {
      const msg = this.#clientControl(frame);
      if (msg && (msg.t === "ping" || msg.t === "leave")) return this.#accept(msg);
      return refuse(ErrorCode.FORBIDDEN, "waiting in the lobby");
    }
    return this.#serverInRoom(frame);
  }

  #serverHello(frame) {
    const msg = decodeMessage(frame, this.clientMessages, this.maxControlBytes);
    if (this.hello === null) {
      if (msg instanceof ProtocolError) return { event: "Refused", error: msg, fatal: true };
      if (msg.t !== "hello") return refuse(ErrorCode.HANDSHAKE_REQUIRED, "the first message must be hello", true);
      if (msg.version !== PROTOCOL_VERSION) {
        return refuse(ErrorCode.UNSUPPORTED_VERSION, `server speaks protocol ${PROTOCOL_VERSION}, client ${msg.version}`, true);
      }
      this.hello = msg;
      this.slots = msg.slots;
      return accepted(msg);
    }
    if (msg instanceof ProtocolError) return { event: "Refused", error: msg, fatal: false };
    if (msg.t === "hello") return refuse(ErrorCode.ALREADY_JOINED, "hello already received");
    if (msg.t === "leave") return this.#accept(msg);
    return refuse(ErrorCode.HANDSHAKE_REQUIRED, "wait for the answer to hello");
  }

  #serverInRoom(frame) {
    if (frame.length === 0) return { event: "Ignored", reason: "empty frame" };
    const kind = frame[0];
    if (kind === FRAME_POSE) {
      if (this.state === State.PAUSED) return { event: "Ignored", reason: "paused" };
      const err = checkPoseFrame(frame, this.slots);
      return err === null ? { event: "PoseReceived", frame } : { event: "Refused", error: err, fatal: false };
    }
    if (kind === FRAME_CONTROL) {
      const msg = decodeMessage(frame, this.clientMessages, this.maxControlBytes);
      if (msg instanceof ProtocolError) return { event: "Refused", error: msg, fatal: false };
      if (msg.t === "hello") return refuse(ErrorCode.ALREADY_JOINED, "already joined");
      return this.#accept(msg);
    }
    if (kind === FRAME_STATE) return refuse(ErrorCode.MALFORMED, "unknown frame kind 0x02");
    return { event: "FrameReceived", kind, frame };
  }

  #clientReceive(frame, text) {
    if (text) return refuse(ErrorCode.MALFORMED, "binary frames only");
    if (frame.length === 0) return refuse(ErrorCode.MALFORMED, "empty frame");
    const kind = frame[0];
    if (kind === FRAME_CONTROL) {
      const msg = decodeMessage(frame, this.serverMessages, MAX_SERVER_CONTROL_BYTES);
      if (msg instanceof ProtocolError) return { event: "Refused", error: msg, fatal: false };
      let after = this.#sendRule(msg, Role.SERVER);
      if (after === null) return refuse(CLIENT_REFUSAL[this.state], `${msg.t} not expected now`);
      // Only our own pause(false) ends a pause: a welcome that crossed our pause(true) on the
      // wire must not leave us JOINED while the server is PAUSED.
      if (this.state === State.PAUSED && after === State.JOINED) after = State.PAUSED;
      this.#noteMove(msg);
      this.state = after;
      return accepted(msg);
    }
    if (!IN_ROOM.has(this.state)) {
      return refuse(ErrorCode.MALFORMED, `frame kind 0x${kind.toString(16).padStart(2, "0")} before welcome`);
    }
    if (kind === FRAME_STATE) return { event: "StateReceived", frame };
    return { event: "FrameReceived", kind, frame };
  }

  // A client's control frame (null for a frame of another kind).
  #clientControl(frame) {
    if (frame[0] !== FRAME_CONTROL) return null;
    const msg = decodeMessage(frame, this.clientMessages, this.maxControlBytes);
    return msg instanceof ProtocolError ? null : msg;
  }

  #accept(msg) {
    if (msg.t === "leave") this.state = State.CLOSING;
    else if (msg.t === "pause" && IN_ROOM.has(this.state)) this.state = msg.paused ? State.PAUSED : State.JOINED;
    else if (msg.t === "consent" && !msg.accept && IN_ROOM.has(this.state)) this.state = State.CLOSING;
    return accepted(msg);
  }

  // ----------------------------------------------------------------- output

  /** The control frame for `msg`, after moving to the state it leads to. Throws
   * LocalProtocolError (and changes nothing) if this end may not send `msg` now. */
  send(msg) {
    const after = this.#sendRule(msg);
    if (after === null) throw new LocalProtocolError(`${this.role} may not send ${JSON.stringify(msg.t)} in state ${this.state}`);
    const frame = encodeMessage(msg, this.role === Role.SERVER ? this.serverMessages : this.clientMessages);
    if (msg.t === "hello") {
      this.hello = msg;
      this.slots = msg.slots;
    }
    this.#noteMove(msg);
    this.state = after;
    return frame;
  }

  // A `moved` starts a move between rooms; the target room's `welcome` ends it.
  #noteMove(msg) {
    if (msg.t === "moved") this.moving = true;
    else if (msg.t === "welcome") this.moving = false;
  }

  /** The transport is gone (either side closed it, or it broke). */
  closed() {
    this.state = State.CLOSED;
  }

  /** May this end send `msg` (a message) now? Changes nothing. */
  accepts(msg) {
    return this.#sendRule(msg) !== null;
  }

  #sendRule(msg, role = this.role) {
    const state = this.state;
    if (role === Role.SERVER && msg.t === "error" && msg.fatal) return state !== State.CLOSED ? State.CLOSING : null;
    if (role === Role.CLIENT && msg.t === "consent") {
      if (state === State.CONSENT) return State.CONSENT;
      if (IN_ROOM.has(state) && !msg.accept) return State.CLOSING;
      return null;
    }
    if (role === Role.CLIENT && msg.t === "pause") {
      if (state === State.JOINED && msg.paused) return State.PAUSED;
      if (state === State.PAUSED && !msg.paused) return State.JOINED;
      return null;
    }
    return this.#typeRule(msg.t, role);
  }

  #typeRule(type, role) {
    const state = this.state;
    const hello = this.hello !== null;
    if (role === Role.SERVER) {
      if (!this.serverMessages.has(type)) return null;
      // A move leaves the room; the target room's entry follows as after a hello. A member
      // that declines the consent of the room it was moved to is moved back (still moving).
      if (type === "moved") return IN_ROOM.has(state) || (state === State.CONSENT && this.moving) ? State.HELLO : null;
      if (type === "consent_required") return state === State.HELLO && hello ? State.CONSENT : null;
      if (type === "waiting") return (state === State.HELLO && hello) || state === State.CONSENT ? State.LOBBY : null;
      if (type === "welcome") return (state === State.HELLO && hello) || WELCOME_FROM.has(state) ? State.JOINED : null;
      // The room lives elsewhere: only the close follows.
      if (type === "redirect") return (state === State.HELLO && hello) || (BEFORE_CLOSING.has(state) && state !== State.HELLO) ? State.CLOSING : null;
      if (type === "pong" || type === "error") return BEFORE_CLOSING.has(state) ? state : null;
      return IN_ROOM.has(state) ? state : null;
    }
    if (!this.clientMessages.has(type)) return null;
    if (type === "hello") return state === State.HELLO && !hello ? state : null;
    // Before its hello a client just closes: the server refuses anything but hello.
    if (type === "leave") return BEFORE_CLOSING.has(state) && hello ? State.CLOSING : null;
    if (type === "ping") return PING_IN.has(state) ? state : null;
    return IN_ROOM.has(state) ? state : null;
  }
}
