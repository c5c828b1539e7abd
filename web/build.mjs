// Builds the clinic web app: web/app/main.js bundled (three.js included) with esbuild into
// server/webapp/, where `medverse serve` serves it at / and /join, and the wheel ships it.
// Scripts and styles get content-hashed names (cached for a year); index.html names them and
// is never cached. `node build.mjs [OUTDIR]`.
import { build } from "esbuild";
import { mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { basename, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { buildPanel } from "./panel/build.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const outdir = resolve(process.argv[2] ?? join(here, "..", "server", "webapp"));

rmSync(outdir, { recursive: true, force: true });
mkdirSync(outdir, { recursive: true });
const result = await build({
  entryPoints: { app: join(here, "app", "main.js"), style: join(here, "app", "style.css") },
  bundle: true,
  format: "esm",
  target: "es2022",
  platform: "browser",
  minify: true,
  entryNames: "[name]-[hash]",
  outdir,
  metafile: true,
  legalComments: "eof",
  logLevel: "warning",
});
const outputs = Object.entries(result.metafile.outputs);
const named = (entry) => basename(outputs.find(([, o]) => o.entryPoint?.endsWith(entry))[0]);
const html = readFileSync(join(here, "app", "index.html"), "utf8")
  .replace("%APP_JS%", named("main.js"))
  .replace("%STYLE_CSS%", named("style.css"));
writeFileSync(join(outdir, "index.html"), html);
await buildPanel(outdir); // the operator panel at /panel, a bundle of its own
console.log(`web app built in ${outdir}: ${readdirSync(outdir).join(", ")}`);
