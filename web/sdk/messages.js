// Frames and control messages (protocol/SPEC.md "Frames and control messages"), mirroring
// protocol/messages.py, protocol/audio.py and protocol/objects.py: the same message types, the
// same field validation (kinds, bounds, unknown fields refused, integers never from floats) and
// byte-identical encoding.
//
// A message is a plain object: its wire type under `t` and its fields by name, e.g.
// `{t: "ping", id: 1, client_time: 0.25}`. Decoded messages carry every field of their type
// (absent optional fields are null); integers are numbers, lists are arrays, node visibility maps
// are Maps. Decoding never throws: a bad frame gives a ProtocolError value.
//
// New message types are declarations: `defineMessage(type, {field: field(kind, bounds)})`, in
// the order the Python dataclass declares its fields (the encoder writes them in that order).
// A family of new field kinds registers them with `defineFieldKind`.

import { ErrorCode, ProtocolError } from "./errors.js";
import { F64, MsgpackError, pack, unpack } from "./msgpack.js";
import { POSITION_LIMIT_M, QUAT_NORM_MAX, QUAT_NORM_MIN } from "./quant.js";

export const PROTOCOL_VERSION = 1;
export const FRAME_CONTROL = 0x01;
export const FRAME_STATE = 0x02;
export const FRAME_POSE = 0x03;
export const FRAME_MOVE = 0x04;

/** Largest control frame a client may send (including the kind byte). */
export const MAX_CONTROL_BYTES = 4096;
/** Largest control frame a client accepts from the server (welcomes list every member). */
export const MAX_SERVER_CONTROL_BYTES = 1 << 24;
export const MAX_NAME_CHARS = 64;
export const MAX_SLOTS = 16;
const U32 = 2 ** 32 - 1;

// Patterns match whole strings, code point by code point ("u"), as SPEC.md states them.
export const ROOM_NAME_RE = /^[A-Za-z0-9_.-]{1,64}$/u;
export const DISPLAY_NAME_RE = /^[^\x00-\x1f\x7f]{1,64}$/u;
const MODERATION_ACTIONS = /^(admit|deny|remove|ban|unban|mute|allow_unmute|lock|unlock|lobby|open|end)$/u;
/** Longest ban a host may give with a duration (ten years). */
export const MAX_BAN_SECONDS = 10 * 365 * 86400;
const ROLE_NAMES = /^(host|participant|observer|receptionist)$/u;
const GRANT_NAMES = /^(publish_audio|manipulate_objects|annotate|upload_assets|moderate|hidden|transfer)$/u;

// --------------------------------------------------------------------------- field kinds

function fail(code, message) {
  throw new ProtocolError(code, message);
}

/** Length in characters (code points), as Python's len(str). */
export function charLength(s) {
  let n = s.length;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c >= 0xd800 && c <= 0xdbff && i + 1 < s.length) {
      const d = s.charCodeAt(i + 1);
      if (d >= 0xdc00 && d <= 0xdfff) {
        n--;
        i++;
      }
    }
  }
  return n;
}

function isInt(v) {
  return (typeof v === "number" && Number.isInteger(v)) || typeof v === "bigint";
}

function toNumber(name, v) {
  if (v instanceof F64) v = v.value;
  else if (typeof v === "bigint") v = Number(v);
  else if (typeof v !== "number") return undefined;
  return v;
}

function checkRange(name, spec, value) {
  if ((spec.lo !== undefined && value < spec.lo) || (spec.hi !== undefined && value > spec.hi)) {
    fail(ErrorCode.OUT_OF_RANGE, `${name} out of range`);
  }
  return value;
}

// Each kind: decode(name, spec, raw) -> value (raw is never null here); encode(spec, value) -> a
// value for msgpack.pack.
const KINDS = new Map();

/** Register a field kind: `decode(name, spec, raw)` checks a wire value, `encode(spec, value)`
 * gives what msgpack writes (wrap floats in F64 so integral floats stay floats). */
export function defineFieldKind(kind, decode, encode) {
  if (KINDS.has(kind)) throw new Error(`field kind ${kind} is already defined`);
  KINDS.set(kind, { decode, encode });
}

defineFieldKind(
  "int",
  (name, spec, v) => {
    if (!isInt(v)) fail(ErrorCode.BAD_FIELD, `${name} must be an integer`);
    checkRange(name, spec, v);
    return typeof v === "bigint" && v <= BigInt(Number.MAX_SAFE_INTEGER) + 1n ? Number(v) : v;
  },
  // An integer field stays an integer on the wire, also beyond 2^53 - 1.
  (spec, v) => (typeof v === "number" && Math.abs(v) > Number.MAX_SAFE_INTEGER ? BigInt(v) : v),
);
defineFieldKind(
  "float",
  (name, spec, v) => {
    const f = toNumber(name, v);
    if (f === undefined) fail(ErrorCode.BAD_FIELD, `${name} must be a number`);
    if (!Number.isFinite(f)) fail(ErrorCode.OUT_OF_RANGE, `${name} must be finite`);
    return checkRange(name, spec, f);
  },
  (spec, v) => new F64(v),
);
defineFieldKind(
  "bool",
  (name, spec, v) => {
    if (typeof v !== "boolean") fail(ErrorCode.BAD_FIELD, `${name} must be a boolean`);
    return v;
  },
  (spec, v) => v,
);
defineFieldKind(
  "str",
  (name, spec, v) => {
    if (typeof v !== "string") fail(ErrorCode.BAD_FIELD, `${name} must be a string`);
    if (spec.maxLen !== undefined && v.length > spec.maxLen && charLength(v) > spec.maxLen) {
      fail(ErrorCode.OUT_OF_RANGE, `${name} longer than ${spec.maxLen}`);
    }
    if (spec.pattern !== undefined && !spec.pattern.test(v)) {
      fail(ErrorCode.OUT_OF_RANGE, `${name} has characters not allowed`);
    }
    return v;
  },
  (spec, v) => v,
);
defineFieldKind(
  "strs",
  (name, spec, v) => {
    if (!Array.isArray(v) || v.length > (spec.hi || 16)) {
      fail(ErrorCode.BAD_FIELD, `${name} must be a short list`);
    }
    for (const item of v) {
      if (typeof item !== "string" || charLength(item) > (spec.maxLen || 64)) {
        fail(ErrorCode.BAD_FIELD, `${name} entries must be short strings`);
      }
    }
    return v.slice();
  },
  (spec, v) => [...v],
);
defineFieldKind(
  "members",
  (name, spec, v) => {
    if (!Array.isArray(v) || v.length > 10000) fail(ErrorCode.BAD_FIELD, `${name} must be a list`);
    return v.map((item) => {
      if (!(item instanceof Map)) fail(ErrorCode.BAD_FIELD, `${name} entries must be maps`);
      const keys = [...item.keys()];
      if (!item.has("id") || !item.has("name") || !keys.every((k) => MEMBER_KEYS.has(k))) {
        fail(ErrorCode.BAD_FIELD, "member entries have id, name, identity");
      }
      const out = {
        id: checkValue("id", MEMBER_ID, item.get("id")),
        name: checkValue("name", MEMBER_NAME, item.get("name")),
      };
      // The verified identity: in lobby entries only, to hosts.
      const identity = checkValue("identity", MEMBER_IDENTITY, item.get("identity") ?? null);
      if (identity !== null) out.identity = identity;
      return out;
    });
  },
  (spec, v) =>
    v.map((m) => {
      const out = new Map([["id", m.id], ["name", m.name]]);
      if (m.identity !== undefined && m.identity !== null) out.set("identity", m.identity);
      return out;
    }),
);
const MEMBER_KEYS = new Set(["id", "name", "identity"]);
const MEMBER_ID = field("int", { lo: 1, hi: U32 });
const MEMBER_NAME = field("str", { maxLen: MAX_NAME_CHARS });
const MEMBER_IDENTITY = field("str", { maxLen: 128, optional: true });

// The bans in force, as hosts see them.
defineFieldKind(
  "bans",
  (name, spec, v) => {
    if (!Array.isArray(v) || v.length > 10000) fail(ErrorCode.BAD_FIELD, `${name} must be a list`);
    return v.map((item) => {
      if (!(item instanceof Map)) fail(ErrorCode.BAD_FIELD, `${name} entries must be maps`);
      const keys = [...item.keys()];
      if (item.size !== 4 || !["id", "name", "until", "reason"].every((k) => keys.includes(k))) {
        fail(ErrorCode.BAD_FIELD, "ban entries have id, name, until, reason");
      }
      return {
        id: checkValue("id", MEMBER_ID, item.get("id")),
        name: checkValue("name", MEMBER_NAME, item.get("name")),
        until: checkValue("until", BAN_UNTIL, item.get("until")),
        reason: checkValue("reason", BAN_REASON, item.get("reason")),
      };
    });
  },
  (spec, v) =>
    v.map((b) => new Map([["id", b.id], ["name", b.name], ["until", b.until], ["reason", b.reason]])),
);
const BAN_UNTIL = field("int", { lo: 0, hi: Number.MAX_SAFE_INTEGER });
const BAN_REASON = field("str", { maxLen: 256 });

// Audio: flat lists of non-negative 32-bit integers.
defineFieldKind(
  "int_list",
  (name, spec, v) => {
    if (!Array.isArray(v)) fail(ErrorCode.BAD_FIELD, `${name} must be a list of integers`);
    const max = spec.maxLen || 1024;
    if (v.length > max) fail(ErrorCode.OUT_OF_RANGE, `${name} longer than ${max}`);
    for (const x of v) {
      if (!isInt(x)) fail(ErrorCode.BAD_FIELD, `${name} must be a list of integers`);
      if (x < 0 || x > U32) fail(ErrorCode.OUT_OF_RANGE, `${name} has an integer out of range`);
    }
    return v.slice();
  },
  (spec, v) => [...v],
);

// Objects: vectors, quaternions, planes, point lists, node visibility maps.
function numberOf(name, v) {
  const f = typeof v === "boolean" ? undefined : toNumber(name, v);
  if (f === undefined) fail(ErrorCode.BAD_FIELD, `${name} must hold numbers`);
  if (!Number.isFinite(f)) fail(ErrorCode.OUT_OF_RANGE, `${name} must be finite`);
  return f;
}

function numbers(name, v, n) {
  if (!Array.isArray(v) || v.length !== n) fail(ErrorCode.BAD_FIELD, `${name} must be a list of ${n} numbers`);
  return v.map((x) => numberOf(name, x));
}

function vec3(name, v) {
  const out = numbers(name, v, 3);
  if (out.some((x) => Math.abs(x) > POSITION_LIMIT_M)) {
    fail(ErrorCode.OUT_OF_RANGE, `${name} beyond ${POSITION_LIMIT_M} m`);
  }
  return out;
}

function unit(name, v, n, normOf) {
  const out = numbers(name, v, n);
  let sum = 0;
  for (let i = 0; i < normOf; i++) sum += out[i] * out[i];
  const norm = Math.sqrt(sum);
  if (!(norm >= QUAT_NORM_MIN && norm <= QUAT_NORM_MAX)) {
    fail(ErrorCode.OUT_OF_RANGE, `${name} is far from unit length`);
  }
  return out.map((x, i) => (i < normOf ? x / norm : x));
}

const floats = (spec, v) => v.map((x) => new F64(x));
export const MAX_STROKE_POINTS = 128;
export const MAX_VIEW_NODES = 64;
export const SHA256_RE = /^[0-9a-f]{64}$/u;
export const NODE_NAME_RE = /^[^\x00-\x1f\x7f]{1,64}$/u;

defineFieldKind("vec3", (name, spec, v) => vec3(name, v), floats);
defineFieldKind("quat", (name, spec, v) => unit(name, v, 4, 4), floats);
defineFieldKind(
  "plane",
  (name, spec, v) => {
    if (Array.isArray(v) && v.length === 0) return [];
    const out = unit(name, v, 4, 3);
    if (Math.abs(out[3]) > POSITION_LIMIT_M) fail(ErrorCode.OUT_OF_RANGE, `${name} distance out of range`);
    return out;
  },
  floats,
);
defineFieldKind(
  "points",
  (name, spec, v) => {
    if (!Array.isArray(v) || v.length < 1 || v.length > MAX_STROKE_POINTS) {
      fail(ErrorCode.BAD_FIELD, `${name} must be a list of 1-${MAX_STROKE_POINTS} points`);
    }
    return v.map((p) => vec3(name, p));
  },
  (spec, v) => v.map((p) => p.map((x) => new F64(x))),
);
defineFieldKind(
  "nodes",
  (name, spec, v) => {
    if (!(v instanceof Map) || v.size > MAX_VIEW_NODES) fail(ErrorCode.BAD_FIELD, `${name} must be a map of node names`);
    const out = new Map();
    for (const [k, vis] of v) {
      if (typeof k !== "string" || !NODE_NAME_RE.test(k)) fail(ErrorCode.OUT_OF_RANGE, `${name} has a bad node name`);
      if (typeof vis !== "boolean") fail(ErrorCode.BAD_FIELD, `${name} values must be booleans`);
      out.set(k, vis);
    }
    return out;
  },
  (spec, v) => (v instanceof Map ? new Map(v) : new Map(Object.entries(v))),
);

/** How a field is checked: `kind` and `{lo, hi, maxLen, pattern, optional}`. */
export function field(kind, opts = {}) {
  return Object.freeze({ kind, ...opts });
}

function checkValue(name, spec, value) {
  if (value === null || value === undefined) {
    if (spec.optional) return null;
    fail(ErrorCode.BAD_FIELD, `${name} is required`);
  }
  const k = KINDS.get(spec.kind);
  if (k === undefined) throw new Error(`unknown field kind ${spec.kind}`);
  return k.decode(name, spec, value);
}

// --------------------------------------------------------------------------- message types

/** A message type: its wire `type`, its fields in declaration order and, for a type whose
 * frames may be larger than the decoder's limit (an audio offer), `maxFrameBytes`. */
export function defineMessage(type, fields = {}, { maxFrameBytes = 0 } = {}) {
  for (const spec of Object.values(fields)) {
    if (!KINDS.has(spec.kind)) throw new Error(`unknown field kind ${spec.kind}`);
  }
  return Object.freeze({ type, fields: Object.freeze({ ...fields }), maxFrameBytes });
}

const int = (lo, hi, optional = false) => field("int", { lo, hi, optional });
const str = (opts = {}) => field("str", opts);
const bool = (optional = false) => field("bool", { optional });
const float = (opts = {}) => field("float", opts);
const opt = { optional: true };
/** The optional request id of an acknowledged request: answered by `ack` or `refused`. */
const ackReq = () => int(0, U32, true);

// Client to server (core).
export const Hello = defineMessage("hello", {
  version: int(0, 65535),
  room: str({ pattern: ROOM_NAME_RE }),
  name: str({ maxLen: MAX_NAME_CHARS, pattern: DISPLAY_NAME_RE }),
  slots: int(1, MAX_SLOTS),
  resume: str({ maxLen: 128, ...opt }),
  token: str({ maxLen: 2048, ...opt }),
});
export const Ping = defineMessage("ping", { id: int(0, U32), client_time: float() });
export const Leave = defineMessage("leave");
export const Moderate = defineMessage("moderate", {
  action: str({ pattern: MODERATION_ACTIONS }),
  member_id: int(1, U32, true),
  reason: str({ maxLen: 256, ...opt }),
  duration: int(1, MAX_BAN_SECONDS, true),
  req: ackReq(),
});
export const ChangeRole = defineMessage("change_role", {
  member_id: int(1, U32),
  role: str({ pattern: ROLE_NAMES, ...opt }),
  grant: str({ pattern: GRANT_NAMES, ...opt }),
  allow: bool(true),
  req: ackReq(),
});
export const Pause = defineMessage("pause", { paused: bool(), req: ackReq() });
export const RequestUnmute = defineMessage("request_unmute", { req: ackReq() });
export const Consent = defineMessage("consent", { version: str({ maxLen: 64 }), accept: bool() });

// Server to client (core).
export const Welcome = defineMessage("welcome", {
  version: int(0, 65535),
  member_id: int(1, U32),
  room: str({ pattern: ROOM_NAME_RE }),
  rate: int(1, 1000),
  tick: int(0, U32),
  resume: str({ maxLen: 128 }),
  resumed: bool(),
  members: field("members"),
});
export const Joined = defineMessage("joined", { member_id: int(1, U32), name: str({ maxLen: MAX_NAME_CHARS }) });
export const Left = defineMessage("left", {
  member_id: int(1, U32),
  name: str({ maxLen: MAX_NAME_CHARS }),
  reason: str({ maxLen: 64 }),
});
export const Pong = defineMessage("pong", { id: int(0, U32), client_time: float(), room_time: float() });
export const ErrorMessage = defineMessage("error", {
  code: str({ maxLen: 64 }),
  message: str({ maxLen: 1024 }),
  fatal: bool(),
});
export const Waiting = defineMessage("waiting", { room: str({ pattern: ROOM_NAME_RE }), lobby_id: int(1, U32) });
export const Lobby = defineMessage("lobby", { members: field("members") });
export const MemberState = defineMessage("member_state", {
  member_id: int(1, U32),
  paused: bool(),
  muted: bool(),
  unmute_requested: bool(),
});
export const RoomState = defineMessage("room_state", { entry: str({ maxLen: 16 }) });
export const ConsentRequired = defineMessage("consent_required", {
  version: str({ maxLen: 64 }),
  text: str({ maxLen: 65536 }),
});
export const Grants = defineMessage("grants", {
  member_id: int(1, U32),
  role: str({ maxLen: 16 }),
  grants: field("strs", { hi: 16, maxLen: 32 }),
});

export const CORE_CLIENT_MESSAGES = [Hello, Ping, Leave, Moderate, ChangeRole, Pause, RequestUnmute, Consent];
export const Bans = defineMessage("bans", { bans: field("bans") });
export const Ack = defineMessage("ack", { req: int(0, U32) });
export const RequestRefused = defineMessage("refused", {
  req: int(0, U32),
  code: str({ maxLen: 64 }),
  message: str({ maxLen: 1024 }),
});

/** Where a `redirect` may send a client: a WebSocket URL without spaces or control characters. */
export const REDIRECT_URL_RE = /^wss?:\/\/[^\x00-\x20\x7f]{1,500}$/u;
/** Another server runs this room: join at `url` with the same hello (and resume token). */
export const Redirect = defineMessage("redirect", {
  url: str({ pattern: REDIRECT_URL_RE }),
  reason: str({ maxLen: 64 }),
  token: str({ maxLen: 2048, ...opt }),
});

export const CORE_SERVER_MESSAGES = [
  Welcome,
  Joined,
  Left,
  Pong,
  ErrorMessage,
  Waiting,
  Lobby,
  MemberState,
  RoomState,
  ConsentRequired,
  Grants,
  Bans,
  Ack,
  RequestRefused,
  Redirect,
];

// Spatial audio (protocol/audio.py).
/** Largest audio offer frame (a browser's SDP offer is larger than other control frames). */
export const AUDIO_OFFER_MAX_BYTES = 16 * 1024;
/** Longest SDP in an audio offer, in characters. */
export const MAX_SDP_CHARS = AUDIO_OFFER_MAX_BYTES - 96;
const SDP_RE = /^v=0\r?\n/u;
const intList = () => field("int_list", { maxLen: 1024 });

export const AudioOffer = defineMessage(
  "audio_offer",
  { sdp: str({ maxLen: MAX_SDP_CHARS, pattern: SDP_RE }), publish: bool() },
  { maxFrameBytes: AUDIO_OFFER_MAX_BYTES },
);
export const AudioMute = defineMessage("audio_mute", { muted: bool(), req: ackReq() });
export const AudioZone = defineMessage("audio_zone", {
  member_id: int(1, U32),
  zone: int(0, 65535),
  req: ackReq(),
});
export const AudioBroadcast = defineMessage("audio_broadcast", {
  member_id: int(1, U32),
  on: bool(),
  gain: int(0, 400, true),
  req: ackReq(),
});
export const AudioWhisper = defineMessage("audio_whisper", { target: int(1, U32, true), req: ackReq() });
export const AudioIgnore = defineMessage("audio_ignore", {
  member_id: int(1, U32),
  ignore: bool(),
  req: ackReq(),
});
export const AudioAnswer = defineMessage("audio_answer", { sdp: str({ maxLen: 65536 }), publish: bool() });
export const AudioRules = defineMessage("audio_rules", {
  zones: intList(),
  broadcast: intList(),
  whispers: intList(),
  self_muted: intList(),
  ignored: intList(),
});
export const AudioSpeaking = defineMessage("audio_speaking", { members: intList() });

export const CLIENT_AUDIO = [AudioOffer, AudioMute, AudioZone, AudioBroadcast, AudioWhisper, AudioIgnore];
export const SERVER_AUDIO = [AudioAnswer, AudioRules, AudioSpeaking];

// Shared objects (protocol/objects.py).
export const MAX_OBJECT_ID = 2 ** 31 - 1;
export const OBJECT_ID_BASE = 2 ** 31;
const MIN_SCALE = 0.001;
const MAX_SCALE = 1000.0;
const ANNOTATION_KIND_RE = /^(pin|stroke|measure)$/u;
const LOCK_REASON_RE = /^(grab|release|handover|disconnected|left|paused|timeout|forced)$/u;
const req = () => int(0, U32);
const oid = (optional = false) => int(1, MAX_OBJECT_ID, optional);
const aid = (optional = false) => int(1, U32, optional);
const mid = (optional = false) => int(1, U32, optional);
const text = (optional = true) => str({ maxLen: 1024, optional });
const color = () => int(0, 0xffffff, true);
const scale = () => float({ lo: MIN_SCALE, hi: MAX_SCALE });

export const Spawn = defineMessage("obj_spawn", {
  req: req(),
  asset: str({ pattern: SHA256_RE }),
  position: field("vec3"),
  rotation: field("quat"),
  scale: scale(),
  name: str({ maxLen: 64, pattern: NODE_NAME_RE, ...opt }),
});
export const Grab = defineMessage("obj_grab", { req: req(), object_id: oid() });
export const Release = defineMessage("obj_release", { req: req(), object_id: oid() });
export const RequestHandover = defineMessage("obj_request", { req: req(), object_id: oid() });
export const Yield = defineMessage("obj_yield", { req: req(), object_id: oid(), to: mid() });
export const SetView = defineMessage("obj_view", {
  req: req(),
  object_id: oid(),
  nodes: field("nodes", opt),
  plane: field("plane", opt),
});
export const Remove = defineMessage("obj_remove", { req: req(), object_id: oid() });
export const ForceRelease = defineMessage("obj_force_release", { req: req(), object_id: oid() });
export const Annotate = defineMessage("anno_create", {
  req: req(),
  object_id: oid(),
  kind: str({ pattern: ANNOTATION_KIND_RE }),
  points: field("points"),
  text: text(),
  color: color(),
});
export const EditAnnotation = defineMessage("anno_edit", {
  req: req(),
  annotation_id: aid(),
  text: text(),
  points: field("points", opt),
  color: color(),
});
export const DeleteAnnotation = defineMessage("anno_delete", { req: req(), annotation_id: aid() });

export const ObjectAck = defineMessage("obj_ack", { req: req(), object_id: oid(true), annotation_id: aid(true) });
export const ObjectRefused = defineMessage("obj_refused", {
  req: req(),
  code: str({ maxLen: 64 }),
  message: str({ maxLen: 1024 }),
  object_id: oid(true),
  holder: mid(true),
});
export const ObjectState = defineMessage("obj_state", {
  object_id: oid(),
  asset: str({ pattern: SHA256_RE }),
  name: str({ maxLen: 64 }),
  author: str({ maxLen: 64 }),
  position: field("vec3"),
  rotation: field("quat"),
  scale: scale(),
  nodes: field("nodes"),
  plane: field("plane"),
  holder: mid(true),
});
export const ObjectRemoved = defineMessage("obj_removed", { object_id: oid(), by: mid(true) });
export const LockChanged = defineMessage("obj_lock", {
  object_id: oid(),
  reason: str({ pattern: LOCK_REASON_RE }),
  holder: mid(true),
});
export const HandoverRequested = defineMessage("obj_handover", { object_id: oid(), member_id: mid() });
export const ViewState = defineMessage("obj_view_state", {
  object_id: oid(),
  nodes: field("nodes"),
  plane: field("plane"),
});
export const AnnotationState = defineMessage("anno", {
  annotation_id: aid(),
  object_id: oid(),
  kind: str({ pattern: ANNOTATION_KIND_RE }),
  points: field("points"),
  author: str({ maxLen: 64 }),
  author_id: mid(),
  time: float({ lo: 0 }),
  seq: int(0, 2 ** 53),
  text: text(),
  color: color(),
  edited: float({ lo: 0, optional: true }),
});
export const AnnotationDeleted = defineMessage("anno_deleted", {
  annotation_id: aid(),
  object_id: oid(),
  seq: int(0, 2 ** 53),
});
export const ObjectsSynced = defineMessage("obj_synced", { objects: int(0, U32), annotations: int(0, U32) });

export const CLIENT_OBJECTS = [
  Spawn,
  Grab,
  Release,
  RequestHandover,
  Yield,
  SetView,
  Remove,
  ForceRelease,
  Annotate,
  EditAnnotation,
  DeleteAnnotation,
];
export const SERVER_OBJECTS = [
  ObjectAck,
  ObjectRefused,
  ObjectState,
  ObjectRemoved,
  LockChanged,
  HandoverRequested,
  ViewState,
  AnnotationState,
  AnnotationDeleted,
  ObjectsSynced,
];

// --------------------------------------------------------------------------- clinic (protocol/clinic.py)

const MAX_REASON_CHARS = 256;
const MAX_ACCESS_CHARS = 2048;
const MAX_CLINIC_MESSAGE_CHARS = 2048;
const MAX_ESTIMATE_SECONDS = 86400;

export const Transfer = defineMessage("transfer", {
  member_id: int(1, U32),
  room: str({ pattern: ROOM_NAME_RE }),
  reason: str({ maxLen: MAX_REASON_CHARS, ...opt }),
  req: ackReq(),
});
export const CallNext = defineMessage("call_next", { req: ackReq() });
export const SendBack = defineMessage("send_back", {
  member_id: int(1, U32),
  reason: str({ maxLen: MAX_REASON_CHARS, ...opt }),
  req: ackReq(),
});
export const Moved = defineMessage("moved", {
  room: str({ pattern: ROOM_NAME_RE }),
  by: str({ maxLen: MAX_NAME_CHARS }),
  reason: str({ maxLen: MAX_REASON_CHARS }),
  access: str({ maxLen: MAX_ACCESS_CHARS, ...opt }),
});
// A fresh room access credential for `room`, sent before the last one expires.
export const Access = defineMessage("access", {
  room: str({ pattern: ROOM_NAME_RE }),
  access: str({ maxLen: MAX_ACCESS_CHARS }),
});
export const Queue = defineMessage("queue", {
  position: int(1, U32),
  waiting: int(1, U32),
  message: str({ maxLen: MAX_CLINIC_MESSAGE_CHARS }),
  estimate: int(0, MAX_ESTIMATE_SECONDS, true),
});
export const Called = defineMessage("called", { room: str({ pattern: ROOM_NAME_RE }), by: str({ maxLen: MAX_NAME_CHARS }) });
// To the mover: the member it moved did not enter `room` (`reason` consent_declined); `back`:
// the room it went back to (`origin`), absent if its connection closed instead.
export const MoveDeclined = defineMessage("move_declined", {
  member_id: int(1, U32),
  name: str({ maxLen: MAX_NAME_CHARS }),
  origin: str({ pattern: ROOM_NAME_RE }),
  room: str({ pattern: ROOM_NAME_RE }),
  reason: str({ maxLen: 64 }),
  back: str({ pattern: ROOM_NAME_RE, ...opt }),
});

export const CLIENT_CLINIC = [Transfer, CallNext, SendBack];
export const SERVER_CLINIC = [Moved, Queue, Called, Access, MoveDeclined];

// --------------------------------------------------------------------------- image viewers
// As protocol/images.py: panels showing an image series, pointers and measurements.

export const MAX_IMAGE_INDEX = 65535;
export const MAX_POINTERS = 1024;
const PLANE_RE = /^(axial|coronal|sagittal)$/u;
const MEASURE_KIND_RE = /^(distance|angle|roi)$/u;
const UID_RE = /^[0-9.]{1,64}$/u;
const pid = (optional = false) => int(1, MAX_OBJECT_ID, optional);
const panelWidth = (optional = false) => float({ lo: 0.05, hi: 10.0, optional });

defineFieldKind(
  "indices",
  (name, spec, v) => {
    if (!Array.isArray(v) || v.length !== 3) fail(ErrorCode.BAD_FIELD, `${name} must be a list of 3 integers`);
    return v.map((x) => {
      if (!isInt(x)) fail(ErrorCode.BAD_FIELD, `${name} must hold integers`);
      if (x < 0 || x > MAX_IMAGE_INDEX) fail(ErrorCode.OUT_OF_RANGE, `${name} entries are 0-${MAX_IMAGE_INDEX}`);
      return Number(x);
    });
  },
  (spec, v) => [...v],
);
defineFieldKind(
  "window",
  (name, spec, v) => {
    if (!Array.isArray(v) || v.length !== 2) fail(ErrorCode.BAD_FIELD, `${name} must be [center, width]`);
    const [c, w] = [numberOf(name, v[0]), numberOf(name, v[1])];
    if (Math.abs(c) > 1e6 || !(w >= 1 && w <= 1e6)) fail(ErrorCode.OUT_OF_RANGE, `${name}: center within ±1e+06, width 1-1e6`);
    return [c, w];
  },
  floats,
);
defineFieldKind(
  "pan",
  (name, spec, v) => {
    if (!Array.isArray(v) || v.length !== 2) fail(ErrorCode.BAD_FIELD, `${name} must be [x, y]`);
    const [x, y] = [numberOf(name, v[0]), numberOf(name, v[1])];
    if (Math.abs(x) > 10 || Math.abs(y) > 10) fail(ErrorCode.OUT_OF_RANGE, `${name} within ±10 image widths`);
    return [x, y];
  },
  floats,
);
defineFieldKind(
  "pointers",
  (name, spec, v) => {
    if (!Array.isArray(v) || v.length > MAX_POINTERS) fail(ErrorCode.BAD_FIELD, `${name} must be a list of pointers`);
    return v.map((p) => {
      if (!Array.isArray(p) || p.length !== 5) fail(ErrorCode.BAD_FIELD, `${name} entries are [member, panel, x, y, z]`);
      for (const x of [p[0], p[1]]) {
        if (!isInt(x) || x < 0 || x > U32) fail(ErrorCode.OUT_OF_RANGE, `${name} ids out of range`);
      }
      return [Number(p[0]), Number(p[1]), ...vec3(name, p.slice(2))];
    });
  },
  (spec, v) => v.map(([m, p, x, y, z]) => [m, p, new F64(x), new F64(y), new F64(z)]),
);

export const OpenPanel = defineMessage("img_open", {
  req: req(),
  series: str({ pattern: SHA256_RE }),
  position: field("vec3"),
  rotation: field("quat"),
  width: panelWidth(),
});
export const ClosePanel = defineMessage("img_close", { req: req(), panel_id: pid() });
export const SetImageView = defineMessage("img_view", {
  req: req(),
  panel_id: pid(),
  series: str({ pattern: SHA256_RE, ...opt }),
  plane: str({ pattern: PLANE_RE, ...opt }),
  slices: field("indices", opt),
  window: field("window", opt),
  zoom: float({ lo: 0.1, hi: 20.0, ...opt }),
  pan: field("pan", opt),
});
export const PlacePanel = defineMessage("img_place", {
  req: req(),
  panel_id: pid(),
  position: field("vec3"),
  rotation: field("quat"),
  width: panelWidth(true),
});
export const LinkPanel = defineMessage("img_link", {
  req: req(),
  panel_id: pid(),
  object_id: oid(true),
  frame_of_reference: str({ pattern: UID_RE, ...opt }),
});
export const Locate = defineMessage("img_locate", { req: req(), panel_id: pid(), point: field("vec3") });
export const Point = defineMessage("img_pointer", { panel_id: int(0, MAX_OBJECT_ID), point: field("vec3", opt) });
export const Measure = defineMessage("img_measure", {
  req: req(),
  series: str({ pattern: SHA256_RE }),
  kind: str({ pattern: MEASURE_KIND_RE }),
  points: field("points"),
  label: str({ maxLen: 256, ...opt }),
});
export const DeleteMeasurement = defineMessage("img_unmeasure", { req: req(), measurement_id: int(1, U32) });

export const ImageAck = defineMessage("img_ack", { req: req(), panel_id: pid(true), measurement_id: int(1, U32, true) });
export const ImageRefused = defineMessage("img_refused", {
  req: req(),
  code: str({ maxLen: 64 }),
  message: str({ maxLen: 1024 }),
});
export const PanelState = defineMessage("img_panel", {
  panel_id: pid(),
  series: str({ pattern: SHA256_RE }),
  position: field("vec3"),
  rotation: field("quat"),
  width: panelWidth(),
  plane: str({ pattern: PLANE_RE }),
  slices: field("indices"),
  window: field("window"),
  zoom: float({ lo: 0.1, hi: 20.0 }),
  pan: field("pan"),
  version: int(0, 2 ** 53),
  object_id: oid(true),
  by: mid(true),
});
export const PanelClosed = defineMessage("img_closed", { panel_id: pid(), by: mid(true) });
export const Pointers = defineMessage("img_pointers", { pointers: field("pointers") });
export const MeasurementState = defineMessage("img_measurement", {
  measurement_id: int(1, U32),
  series: str({ pattern: SHA256_RE }),
  kind: str({ pattern: MEASURE_KIND_RE }),
  points: field("points"),
  value: float(),
  author: str({ maxLen: 64 }),
  author_id: mid(),
  time: float({ lo: 0 }),
  seq: int(0, 2 ** 53),
  label: str({ maxLen: 256, ...opt }),
  mean: float(opt),
  sd: float(opt),
  min: float(opt),
  max: float(opt),
  pixels: int(0, 2 ** 53, true),
  units: str({ maxLen: 16, ...opt }),
});
export const MeasurementDeleted = defineMessage("img_measurement_deleted", {
  measurement_id: int(1, U32),
  seq: int(0, 2 ** 53),
});
export const ImagesSynced = defineMessage("img_synced", { panels: int(0, U32), measurements: int(0, U32) });

export const CLIENT_IMAGES = [OpenPanel, ClosePanel, SetImageView, PlacePanel, LinkPanel, Locate, Point, Measure, DeleteMeasurement];
export const SERVER_IMAGES = [
  ImageAck,
  ImageRefused,
  PanelState,
  PanelClosed,
  Pointers,
  MeasurementState,
  MeasurementDeleted,
  ImagesSynced,
];

/** A decoder's registry (wire type -> message type) of the given families; a type named twice
 * is an error. */
export function messageRegistry(...families) {
  const registry = new Map();
  for (const family of families) {
    for (const def of family) {
      const had = registry.get(def.type);
      if (!def.type || (had !== undefined && had !== def)) {
        throw new Error(`message type ${JSON.stringify(def.type)} is already taken`);
      }
      registry.set(def.type, def);
    }
  }
  return registry;
}

/** Every message a client may send, and every message a server may send. */
const OBJECT_REQUESTS = new Set(CLIENT_OBJECTS.map((def) => def.type));
const IMAGE_REQUESTS = new Set(CLIENT_IMAGES.map((def) => def.type));
export const CLIENT_MESSAGES = messageRegistry(CORE_CLIENT_MESSAGES, CLIENT_AUDIO, CLIENT_OBJECTS, CLIENT_CLINIC, CLIENT_IMAGES);
export const SERVER_MESSAGES = messageRegistry(CORE_SERVER_MESSAGES, SERVER_AUDIO, SERVER_OBJECTS, SERVER_CLINIC, SERVER_IMAGES);
const ALL_MESSAGES = messageRegistry(CLIENT_MESSAGES.values(), SERVER_MESSAGES.values());

// --------------------------------------------------------------------------- control frames

/** Check a wire map (a Map from the msgpack decoder) against a message type; throws
 * ProtocolError. */
export function fromWire(def, data) {
  for (const key of data.keys()) {
    if (key !== "t" && !(typeof key === "string" && Object.hasOwn(def.fields, key))) {
      fail(ErrorCode.BAD_FIELD, `unexpected field ${JSON.stringify(typeof key === "string" ? key : "<bytes>")}`);
    }
  }
  const msg = { t: def.type };
  for (const [name, spec] of Object.entries(def.fields)) msg[name] = checkValue(name, spec, data.get(name));
  return msg;
}

/** The wire map of a message: "t", then the type's fields in order, absent ones left out. */
export function toWire(msg, registry = ALL_MESSAGES) {
  const def = registry.get(msg.t);
  if (def === undefined) throw new TypeError(`unknown message type ${JSON.stringify(msg.t)}`);
  for (const key of Object.keys(msg)) {
    if (key !== "t" && !Object.hasOwn(def.fields, key)) throw new TypeError(`${msg.t} has no field ${key}`);
  }
  const out = new Map([["t", def.type]]);
  for (const [name, spec] of Object.entries(def.fields)) {
    const v = msg[name];
    if (v === null || v === undefined) continue;
    out.set(name, KINDS.get(spec.kind).encode(spec, v));
  }
  return out;
}

/** The control frame for `msg` without checking its values: for tests of what a receiver
 * does with a frame it must refuse. */
export function encodeUnchecked(msg, registry = ALL_MESSAGES) {
  return pack(toWire(msg, registry), FRAME_CONTROL);
}

/** A control frame: 0x01 then the msgpack map (the same bytes as the Python encoder's).
 * Throws the ProtocolError the receiver would answer with (out_of_range, bad_field,
 * oversized, ...) for a message it would refuse, so nothing is sent only to be refused. */
export function encodeMessage(msg, registry = ALL_MESSAGES) {
  const frame = encodeUnchecked(msg, registry);
  // Checked by decoding it as the receiver does: one set of rules for both directions.
  const back = decodeMessage(frame, registry);
  if (back instanceof ProtocolError) throw back;
  return frame;
}

/** Decode a control frame with `registry`; returns the message or a ProtocolError (never
 * throws on bad input). A frame longer than `maxBytes` is oversized unless its type allows more
 * (`maxFrameBytes`): it is then decoded as far as its type, as protocol/messages.py does. */
export function decodeMessage(frame, registry, maxBytes = MAX_CONTROL_BYTES) {
  const size = frame.length;
  let limit = maxBytes;
  if (size > maxBytes) {
    limit = 0;
    for (const def of registry.values()) limit = Math.max(limit, def.maxFrameBytes);
  }
  const oversized = () => new ProtocolError(ErrorCode.OVERSIZED, `control frame over ${maxBytes} bytes`);
  if (size > limit) return oversized();
  if (size < 2 || frame[0] !== FRAME_CONTROL) return new ProtocolError(ErrorCode.MALFORMED, "not a control frame");
  let data;
  try {
    data = unpack(frame.subarray(1), { maxArrayLen: 1024, maxMapLen: 64, maxStrLen: limit, maxBinLen: 0, maxExtLen: 0 });
  } catch (err) {
    if (!(err instanceof MsgpackError)) throw err;
    return size > maxBytes ? oversized() : new ProtocolError(ErrorCode.MALFORMED, `bad msgpack: ${err.message}`);
  }
  const kind = data instanceof Map ? data.get("t") : undefined;
  const def = typeof kind === "string" ? registry.get(kind) : undefined;
  if (size > maxBytes && (def === undefined || size > def.maxFrameBytes)) return oversized();
  if (!(data instanceof Map)) return new ProtocolError(ErrorCode.MALFORMED, "control frame is not a map");
  if (typeof kind !== "string") return new ProtocolError(ErrorCode.BAD_FIELD, "missing message type 't'");
  if (def === undefined) {
    return new ProtocolError(ErrorCode.UNKNOWN_TYPE, `unknown message type ${JSON.stringify(kind.slice(0, 32))}`);
  }
  try {
    return fromWire(def, data);
  } catch (err) {
    if (err instanceof ProtocolError) return answerable(def, data, err);
    throw err;
  }
}

/** A request that did not decode but whose own `req` is valid: the error carries the refusal
 * that names it (`answer`: `refused`, or `obj_refused` for object requests), so the sender's
 * call fails at once instead of waiting for an answer. */
function answerable(def, data, err) {
  const req = data.get("req");
  if (Object.hasOwn(def.fields, "req") && isInt(req) && req >= 0 && req <= U32) {
    const object = OBJECT_REQUESTS.has(def.type);
    const image = IMAGE_REQUESTS.has(def.type);
    const t = object ? "obj_refused" : image ? "img_refused" : "refused";
    err.answer = { t, req, code: err.code, message: err.message.slice(0, 1024) };
  }
  return err;
}

// --------------------------------------------------------------------------- pose frames

export const POSE_HEADER_SIZE = 8;
export const POSE_SLOT_BYTES = 28;

/** Exact byte length of a pose frame of `slots` slots. */
export function poseFrameSize(slots) {
  return POSE_HEADER_SIZE + slots * POSE_SLOT_BYTES;
}

/** A pose frame: sequence number and, per slot, `[position, quaternion]` (arrays of 3 and 4
 * numbers, metres and x, y, z, w) or null for an untracked slot. */
export function encodePose(seq, poses) {
  const out = new Uint8Array(poseFrameSize(poses.length));
  const d = new DataView(out.buffer);
  let mask = 0;
  poses.forEach((p, i) => {
    const at = POSE_HEADER_SIZE + i * POSE_SLOT_BYTES;
    if (p === null || p === undefined) {
      d.setFloat32(at + 24, 1, true);
      return;
    }
    const [pos, rot] = p;
    if (pos.length !== 3 || rot.length !== 4) throw new TypeError("each pose is a 3-vector and a 4-vector");
    mask |= 1 << i;
    for (let k = 0; k < 3; k++) d.setFloat32(at + 4 * k, pos[k], true);
    for (let k = 0; k < 4; k++) d.setFloat32(at + 12 + 4 * k, rot[k], true);
  });
  out[0] = FRAME_POSE;
  d.setUint16(2, mask, true);
  d.setUint32(4, seq >>> 0, true);
  return out;
}

/** The structural check a server makes on arrival; a ProtocolError or null. */
export function checkPoseFrame(frame, slots) {
  const size = poseFrameSize(slots);
  if (frame.length !== size) {
    const code = frame.length > size ? ErrorCode.OVERSIZED : ErrorCode.MALFORMED;
    return new ProtocolError(code, `pose frame must be ${size} bytes`);
  }
  if (frame[1] !== 0) return new ProtocolError(ErrorCode.MALFORMED, "reserved byte must be 0");
  const mask = frame[2] | (frame[3] << 8);
  if (mask >> slots) return new ProtocolError(ErrorCode.OUT_OF_RANGE, "present mask names a slot we do not have");
  return null;
}

// --------------------------------------------------------------------------- move frames

export const MOVE_FRAME_SIZE = 44;

/** The 44-byte move frame of an object's new transform. */
export function encodeMove(objectId, seq, position, rotation, scale = 1.0) {
  const out = new Uint8Array(MOVE_FRAME_SIZE);
  const d = new DataView(out.buffer);
  out[0] = FRAME_MOVE;
  d.setUint32(4, objectId >>> 0, true);
  d.setUint32(8, seq >>> 0, true);
  const vals = [...position, ...rotation, scale];
  if (vals.length !== 8) throw new TypeError("a move is a 3-vector, a 4-vector and a scale");
  vals.forEach((v, i) => d.setFloat32(12 + 4 * i, v, true));
  return out;
}

/** Decode and validate a move frame: `{objectId, seq, position, rotation, scale}` (the
 * rotation normalized) or a ProtocolError. */
export function decodeMove(frame) {
  if (frame.length !== MOVE_FRAME_SIZE) {
    const code = frame.length > MOVE_FRAME_SIZE ? ErrorCode.OVERSIZED : ErrorCode.MALFORMED;
    return new ProtocolError(code, `move frame must be ${MOVE_FRAME_SIZE} bytes`);
  }
  const d = new DataView(frame.buffer, frame.byteOffset, frame.byteLength);
  if (frame[0] !== FRAME_MOVE) return new ProtocolError(ErrorCode.MALFORMED, "not a move frame");
  if (frame[1] || d.getUint16(2, true)) return new ProtocolError(ErrorCode.MALFORMED, "reserved bytes must be 0");
  const objectId = d.getUint32(4, true);
  if (objectId < 1 || objectId > MAX_OBJECT_ID) return new ProtocolError(ErrorCode.OUT_OF_RANGE, "object id out of range");
  const seq = d.getUint32(8, true);
  const v = [];
  for (let i = 0; i < 8; i++) v.push(d.getFloat32(12 + 4 * i, true));
  if (!v.every(Number.isFinite)) return new ProtocolError(ErrorCode.OUT_OF_RANGE, "move has NaN or infinity");
  const [px, py, pz, qx, qy, qz, qw, scale] = v;
  if (Math.max(Math.abs(px), Math.abs(py), Math.abs(pz)) > POSITION_LIMIT_M) {
    return new ProtocolError(ErrorCode.OUT_OF_RANGE, "position beyond the limit");
  }
  const norm = Math.sqrt(qx * qx + qy * qy + qz * qz + qw * qw);
  if (!(norm >= QUAT_NORM_MIN && norm <= QUAT_NORM_MAX)) {
    return new ProtocolError(ErrorCode.OUT_OF_RANGE, "rotation far from unit length");
  }
  if (!(scale >= MIN_SCALE && scale <= MAX_SCALE)) {
    return new ProtocolError(ErrorCode.OUT_OF_RANGE, `scale outside ${MIN_SCALE}-${MAX_SCALE}`);
  }
  return { objectId, seq, position: [px, py, pz], rotation: [qx / norm, qy / norm, qz / norm, qw / norm], scale };
}
