// `npm run build` bundles the SDK into one browser module (dist/medverse.js): the same build
// here, in memory, must have no imports left and export the client.
import assert from "node:assert/strict";
import { test } from "node:test";
import { build } from "esbuild";

test("the SDK bundles into one self-contained ES module", async () => {
  const out = await build({
    entryPoints: [new URL("../sdk/index.js", import.meta.url).pathname],
    bundle: true,
    format: "esm",
    target: "es2022",
    platform: "browser",
    write: false,
  });
  assert.equal(out.errors.length, 0);
  const code = out.outputFiles[0].text;
  assert.doesNotMatch(code, /^\s*import\s/mu);
  const mod = await import(`data:text/javascript;base64,${Buffer.from(code).toString("base64")}`);
  for (const name of ["connect", "MedverseClient", "Connection", "SnapshotDecoder", "defineMessage", "encodePose", "AudioClient"]) {
    assert.equal(typeof mod[name], "function", name);
  }
});
