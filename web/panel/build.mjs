// Builds the operator panel: web/panel/main.js and style.css bundled with esbuild into the web
// app's output folder as panel-main-HASH.js and panel-style-HASH.css, and panel.html naming
// them; `medverse serve` serves them at /panel (server/panel.py). No third-party code.
import { build } from "esbuild";
import { readFileSync, writeFileSync } from "node:fs";
import { basename, dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));

/** Bundle the panel into `outdir` (which build.mjs has just emptied). */
export async function buildPanel(outdir) {
  const result = await build({
    entryPoints: [join(here, "main.js"), join(here, "style.css")],
    bundle: true,
    format: "esm",
    target: "es2022",
    platform: "browser",
    minify: true,
    entryNames: "panel-[name]-[hash]",
    outdir,
    metafile: true,
    logLevel: "warning",
  });
  const outputs = Object.entries(result.metafile.outputs);
  const named = (entry) => basename(outputs.find(([, o]) => o.entryPoint?.endsWith(entry))[0]);
  const html = readFileSync(join(here, "index.html"), "utf8")
    .replace("%PANEL_JS%", named("main.js"))
    .replace("%PANEL_CSS%", named("style.css"));
  writeFileSync(join(outdir, "panel.html"), html);
}
