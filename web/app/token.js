// Join tokens as the page receives them: in the URL fragment (`/join#token=...`, which browsers
// never send to a server) or pasted by the person. The claims are read, not verified: the
// server verifies the signature; the page only needs the room and the names to show.

/** The token in a URL fragment (`#token=...`), or null. */
export function tokenFromFragment(hash) {
  const params = new URLSearchParams(String(hash || "").replace(/^#/u, ""));
  const token = params.get("token");
  return token && token.trim() ? token.trim() : null;
}

/** A token from what a person pasted: the token itself or a whole join link. */
export function tokenFromText(text) {
  const s = String(text || "").trim();
  const i = s.indexOf("#");
  if (i >= 0) return tokenFromFragment(s.slice(i));
  const m = /token=([A-Za-z0-9_.~-]+)/u.exec(s);
  return m ? m[1] : s || null;
}

function base64UrlJson(part) {
  const b64 = part.replace(/-/gu, "+").replace(/_/gu, "/").padEnd(Math.ceil(part.length / 4) * 4, "=");
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return JSON.parse(new TextDecoder().decode(bytes));
}

/** The claims of a JWT: {room, name, role, grants, exp, pseudonym, sub}; throws a TypeError
 * naming what is wrong when it is not a join token. */
export function readClaims(token) {
  const parts = String(token).split(".");
  if (parts.length !== 3) throw new TypeError("This is not a join token (it should have three parts separated by dots)");
  let claims;
  try {
    claims = base64UrlJson(parts[1]);
  } catch {
    throw new TypeError("This join token cannot be read (it may have been cut off when copied)");
  }
  if (typeof claims !== "object" || claims === null || typeof claims.room !== "string" || !claims.room) {
    throw new TypeError("This token names no room: ask for a join link to a session");
  }
  return {
    room: claims.room,
    name: typeof claims.name === "string" ? claims.name : String(claims.sub ?? "guest"),
    pseudonym: typeof claims.pseudonym === "string" ? claims.pseudonym : null,
    role: typeof claims.role === "string" ? claims.role : "participant",
    grants: Array.isArray(claims.grants) ? claims.grants.map(String) : null,
    exp: Number.isFinite(claims.exp) ? claims.exp : null,
    sub: claims.sub ?? null,
  };
}

/** What each role may do unless the token lists grants (protocol/tokens.py ROLE_GRANTS). */
export const ROLE_GRANTS = {
  host: ["publish_audio", "manipulate_objects", "annotate", "upload_assets", "moderate"],
  participant: ["publish_audio", "manipulate_objects", "annotate"],
  observer: ["hidden"],
  receptionist: ["publish_audio", "transfer"],
};

/** The grants a token gives. */
export function grantsOf(claims) {
  return new Set(claims.grants ?? ROLE_GRANTS[claims.role] ?? []);
}
