// Typed protocol errors, as in protocol/errors.py: every bad input becomes a ProtocolError with
// one of these codes (stable strings, part of the wire contract).

export const ErrorCode = Object.freeze({
  MALFORMED: "malformed",
  OVERSIZED: "oversized",
  UNKNOWN_TYPE: "unknown_type",
  BAD_FIELD: "bad_field",
  OUT_OF_RANGE: "out_of_range",
  UNSUPPORTED_VERSION: "unsupported_version",
  HANDSHAKE_REQUIRED: "handshake_required",
  ALREADY_JOINED: "already_joined",
  HANDSHAKE_TIMEOUT: "handshake_timeout",
  ROOM_FULL: "room_full",
  BAD_RESUME: "bad_resume",
  UNAUTHORIZED: "unauthorized",
  TOKEN_EXPIRED: "token_expired",
  FORBIDDEN: "forbidden",
  RATE_LIMITED: "rate_limited",
  TOO_MANY_CONNECTIONS: "too_many_connections",
  DENIED: "denied",
  REMOVED: "removed",
  BANNED: "banned",
  ROOM_LOCKED: "room_locked",
  SESSION_ENDED: "session_ended",
  NOT_FOUND: "not_found",
  INVALID_ASSET: "invalid_asset",
  CORRUPT: "corrupt",
  NOT_DICOM: "not_dicom",
  NO_PIXEL_DATA: "no_pixel_data",
  MIXED_SERIES: "mixed_series",
  UNSUPPORTED_TRANSFER_SYNTAX: "unsupported_transfer_syntax",
  UNSUPPORTED_IMAGE: "unsupported_image",
  IDENTIFIABLE_DATA: "identifiable_data",
  OBJECT_LOCKED: "object_locked",
  NOT_HOLDER: "not_holder",
  LIMIT_REACHED: "limit_reached",
  CONSENT_REQUIRED: "consent_required",
  STALE_INPUT: "stale_input",
  TOO_SLOW: "too_slow",
  SHUTTING_DOWN: "shutting_down",
  ROOM_MOVING: "room_moving",
  TRANSFER_TIMEOUT: "transfer_timeout",
  INTERNAL: "internal",
});

/** A bad input as a value: `code` (an ErrorCode string) for machines, `message` for people. */
export class ProtocolError extends Error {
  constructor(code, message) {
    super(message);
    this.name = "ProtocolError";
    this.code = code;
  }

  toString() {
    return `${this.code}: ${this.message}`;
  }
}
