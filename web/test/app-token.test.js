// The web app's reading of join links and tokens (web/app/token.js): the token comes from the
// URL fragment or from what a person pasted, and bad input gets a sentence, not a crash.
import assert from "node:assert/strict";
import { test } from "node:test";
import { grantsOf, readClaims, tokenFromFragment, tokenFromText } from "../app/token.js";

const b64url = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
const jwt = (claims) => `${b64url({ alg: "HS256", typ: "JWT" })}.${b64url(claims)}.c2lnbmF0dXJl`;
const TOKEN = jwt({ sub: "pat-1", name: "Zoë Ødegård", room: "ward-3", role: "participant", exp: 2e9 });

test("the token is read from the fragment only", () => {
  assert.equal(tokenFromFragment(`#token=${TOKEN}`), TOKEN);
  assert.equal(tokenFromFragment(`#room=x&token=${TOKEN}`), TOKEN);
  assert.equal(tokenFromFragment(""), null);
  assert.equal(tokenFromFragment("#token="), null);
  assert.equal(tokenFromFragment("#other=1"), null);
});

test("a pasted link or token gives the token", () => {
  assert.equal(tokenFromText(`  https://clinic.example/join#token=${TOKEN}\n`), TOKEN);
  assert.equal(tokenFromText(TOKEN), TOKEN);
  assert.equal(tokenFromText(`see token=${TOKEN} please`), TOKEN);
  assert.equal(tokenFromText("   "), null);
});

test("claims give the room, the names and the grants", () => {
  const c = readClaims(TOKEN);
  assert.equal(c.room, "ward-3");
  assert.equal(c.name, "Zoë Ødegård"); // UTF-8 in base64url
  assert.deepEqual([...grantsOf(c)].sort(), ["annotate", "manipulate_objects", "publish_audio"]);
  const host = readClaims(jwt({ sub: "h", room: "r", role: "host", grants: ["moderate"] }));
  assert.deepEqual([...grantsOf(host)], ["moderate"]); // a token's own grants replace the role's
  assert.equal(host.name, "h");
});

test("what is not a join token is explained", () => {
  for (const [bad, words] of [
    ["not a token", /not a join token/u],
    ["a.b", /not a join token/u],
    ["a.!!!.c", /cannot be read/u],
    [`a.${Buffer.from("[1,2]").toString("base64url")}.c`, /names no room/u],
    [jwt({ sub: "x" }), /names no room/u],
    [jwt({ sub: "x", room: 42 }), /names no room/u],
    [`a.${"A".repeat(5000)}.c`, /cannot be read/u],
  ]) {
    assert.throws(() => readClaims(bad), (err) => err instanceof TypeError && words.test(err.message), bad.slice(0, 40));
  }
});
