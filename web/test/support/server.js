// A real medverse server for the client tests: `python -m medverse.server.cli serve` on a free
// port of 127.0.0.1 with a temporary data directory and its own token secret (the Python to use:
// MEDVERSE_PYTHON, default python3; the medverse package must be installed in it).
import { execFile, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

const PYTHON = process.env.MEDVERSE_PYTHON || "python3";

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Start a server; `env` adds settings (MEDVERSE_...), `consentText` makes rooms matching
 * `consentRooms` ask for consent. Resolves with {url, http, token(room, identity, opts), stop}. */
export async function startServer({ env = {}, consentText = null, consentRooms = "consent-.*", timeout = 30 } = {}) {
  const dataDir = mkdtempSync(join(tmpdir(), "medverse-web-"));
  const port = await freePort();
  const settings = {
    ...process.env,
    MEDVERSE_HOST: "127.0.0.1",
    MEDVERSE_PORT: String(port),
    MEDVERSE_DATA_DIR: dataDir,
    MEDVERSE_AUTH_SECRET: randomBytes(32).toString("hex"),
    MEDVERSE_LOG_LEVEL: "warning",
    ...env,
  };
  if (consentText !== null) {
    const file = join(dataDir, "consent.txt");
    writeFileSync(file, consentText);
    settings.MEDVERSE_CONSENT_FILE = file;
    settings.MEDVERSE_CONSENT_ROOMS = consentRooms;
  }
  const proc = spawn(PYTHON, ["-m", "medverse.server.cli", "serve"], { env: settings, stdio: ["ignore", "ignore", "pipe"] });
  let log = "";
  proc.stderr.on("data", (d) => {
    log = (log + d).slice(-8192);
  });
  let exited = null;
  const exit = new Promise((resolve) => proc.on("exit", (code, signal) => resolve((exited = { code, signal }))));
  const http = `http://127.0.0.1:${port}`;
  const stop = async () => {
    if (exited === null) {
      proc.kill("SIGTERM");
      const t = setTimeout(() => proc.kill("SIGKILL"), 5000);
      await exit;
      clearTimeout(t);
    }
    rmSync(dataDir, { recursive: true, force: true });
  };
  const deadline = Date.now() + timeout * 1000;
  for (;;) {
    if (exited !== null) {
      await stop();
      throw new Error(`the server exited (${exited.code ?? exited.signal}):\n${log}`);
    }
    try {
      const resp = await fetch(`${http}/health`);
      if (resp.ok) break;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) {
      await stop();
      throw new Error(`the server did not answer /health in ${timeout} s:\n${log}`);
    }
    await sleep(100);
  }
  /** A join token minted by `medverse token` with this server's secret. */
  const token = (room, identity, { role = "participant", name = identity, grants = null } = {}) =>
    new Promise((resolve, reject) => {
      const args = ["-m", "medverse.server.cli", "token", "--room", room, "--identity", identity, "--name", name, "--role", role, "--ttl", "1h"];
      if (grants !== null) args.push("--grants", grants.join(","));
      execFile(PYTHON, args, { env: settings, timeout: 90000 }, (err, stdout, stderr) => (err ? reject(new Error(`${err.message}\n${stderr}`)) : resolve(stdout.trim())));
    });
  /** `medverse audit show` of this server's data directory with `args` (its lines). */
  const auditShow = (...args) =>
    new Promise((resolve, reject) => {
      const cmd = ["-m", "medverse.server.cli", "audit", "show", "--data-dir", dataDir, ...args];
      execFile(PYTHON, cmd, { env: settings, timeout: 90000 }, (err, stdout, stderr) => (err ? reject(new Error(`${err.message}\n${stderr}`)) : resolve(stdout)));
    });
  return { url: `ws://127.0.0.1:${port}/ws`, http, port, dataDir, token, auditShow, stop, log: () => log };
}
