// The operator panel: asks for an admin token, then every 2 s reads /admin/rooms (with the
// token) and /health, shows the figures and charts the last minutes of each. The token stays
// in this tab's sessionStorage and travels only in the Authorization header: never in a URL,
// never logged. Everything the server sends is shown as text (textContent), never as markup.

const TOKEN_KEY = "medverse.panel.token";
const PERIOD_MS = 2000;
const HISTORY = 150; // samples kept per chart: 5 minutes at one every 2 s
const MIN_SPAN = 31; // the shortest time axis: a minute
const REQUEST_TIMEOUT_MS = 5000;
const SVG = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------ formatting

const fmtBytes = (n) => {
  if (n == null || !Number.isFinite(n)) return "–";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) {
    n /= 1000;
    i += 1;
  }
  return `${n >= 100 || i === 0 ? Math.round(n) : n.toFixed(1)} ${units[i]}`;
};
const fmtRate = (n) => (n == null ? "–" : `${fmtBytes(n)}/s`);
const fmtMs = (n) => (n == null || !Number.isFinite(n) ? "–" : `${n < 10 ? n.toFixed(2) : n.toFixed(1)} ms`);
const fmtCount = (n) => (n == null || !Number.isFinite(n) ? "–" : String(Math.round(n)));

// ------------------------------------------------------------------ requests

class Refused extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}
class Unreachable extends Error {}

async function getJSON(path, token) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  let response;
  try {
    response = await fetch(path, {
      headers,
      cache: "no-store",
      credentials: "omit",
      signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
    });
  } catch {
    throw new Unreachable("the server did not answer");
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (response.status === 401 || response.status === 403) {
    const why = body?.error?.message ?? response.statusText;
    throw new Refused(response.status, why);
  }
  if (!response.ok || body === null) {
    throw new Unreachable(`the server answered ${path} with HTTP ${response.status}`);
  }
  return body;
}

// ------------------------------------------------------------------ charts

/** One chart: an inline SVG of up to HISTORY samples of one or more series. */
class Chart {
  constructor(title, series, format) {
    this.title = title;
    this.series = series; // [{ label }]
    this.format = format;
    this.data = series.map(() => []);
    const fig = document.createElement("figure");
    fig.className = "chart";
    const cap = document.createElement("figcaption");
    cap.textContent = title;
    const plot = document.createElement("div");
    plot.className = "plot";
    const axis = document.createElement("div");
    axis.className = "axis";
    axis.setAttribute("aria-hidden", "true");
    this.top = document.createElement("span");
    this.bottom = document.createElement("span");
    axis.append(this.top, this.bottom);
    this.svg = document.createElementNS(SVG, "svg");
    this.svg.setAttribute("viewBox", `0 0 ${HISTORY - 1} 100`);
    this.svg.setAttribute("preserveAspectRatio", "none");
    this.svg.setAttribute("role", "img");
    this.lines = series.map((_, i) => {
      const line = document.createElementNS(SVG, "polyline");
      line.setAttribute("class", `s${i}`);
      line.setAttribute("vector-effect", "non-scaling-stroke");
      this.svg.append(line);
      return line;
    });
    plot.append(axis, this.svg);
    const legend = document.createElement("ul");
    legend.className = "legend";
    this.now = series.map((s, i) => {
      const li = document.createElement("li");
      li.className = `s${i}`;
      const value = document.createElement("span");
      value.className = "now";
      li.append(`${s.label}: `, value);
      legend.append(li);
      return value;
    });
    this.span = document.createElement("p");
    this.span.className = "span";
    fig.append(cap, plot, legend, this.span);
    this.element = fig;
  }

  push(values) {
    values.forEach((v, i) => {
      const d = this.data[i];
      d.push(v == null || !Number.isFinite(v) ? null : v);
      if (d.length > HISTORY) d.shift();
    });
    this.draw();
  }

  draw() {
    const all = this.data.flat().filter((v) => v != null);
    const max = Math.max(...all, 0) || 1;
    // The time axis spans at least a minute and grows to HISTORY samples, newest at the right.
    const n = Math.max(...this.data.map((d) => d.length));
    const span = Math.min(HISTORY, Math.max(MIN_SPAN, n));
    this.svg.setAttribute("viewBox", `0 0 ${span - 1} 100`);
    this.data.forEach((d, i) => {
      const offset = span - d.length;
      const points = [];
      d.forEach((v, j) => {
        if (v != null) points.push(`${offset + j},${(100 - (v / max) * 96).toFixed(2)}`);
      });
      this.lines[i].setAttribute("points", points.join(" "));
    });
    this.top.textContent = this.format(max);
    this.bottom.textContent = this.format(0);
    const minutes = ((span - 1) * PERIOD_MS) / 60000;
    this.span.textContent = `last ${minutes.toFixed(1)} min`;
    const nowText = this.series.map((s, i) => {
      const last = this.data[i].at(-1);
      const text = last == null ? "–" : this.format(last);
      this.now[i].textContent = text;
      return `${s.label} ${text}`;
    });
    this.svg.setAttribute("aria-label", `${this.title}, ${this.span.textContent}: now ${nowText.join(", ")}; highest ${this.format(max)}`);
  }
}

// ------------------------------------------------------------------ the panel

const charts = {
  members: new Chart("Rooms and members", [{ label: "members" }, { label: "rooms" }], fmtCount),
  tick: new Chart("Tick work time", [{ label: "p50" }, { label: "p99" }], fmtMs),
  traffic: new Chart(
    "Bandwidth",
    [{ label: "out (to clients)" }, { label: "in (from clients)" }],
    fmtRate,
  ),
  audio: new Chart("Audio mixer: mix time per frame", [{ label: "p50" }, { label: "p99" }], fmtMs),
  refusals: new Chart(
    "Refusals and protocol errors per 2 s",
    [{ label: "connections refused" }, { label: "protocol errors" }, { label: "tokens refused" }],
    fmtCount,
  ),
  assets: new Chart("Asset storage", [{ label: "stored" }], fmtBytes),
};

const FIGURES = [
  ["rooms", "Live rooms"],
  ["members", "Members"],
  ["connections", "Connections"],
  ["tickP50", "Tick work p50"],
  ["tickP99", "Tick work p99"],
  ["out", "Bandwidth out"],
  ["in", "Bandwidth in"],
  ["audioPeers", "Audio peers"],
  ["mixP99", "Audio mix p99"],
  ["refused", "Refusals (total)"],
  ["protocolErrors", "Protocol errors (total)"],
  ["assets", "Asset storage"],
  ["status", "Server status"],
];
const figureValues = {};

let token = sessionStorage.getItem(TOKEN_KEY);
let timer = null;
let previous = null; // the last sample's totals and time, for rates
let generation = 0; // a poll started under an older token is ignored

function show(screen) {
  for (const id of ["login", "problem", "dashboard"]) $(id).hidden = id !== screen;
  $("signout").hidden = screen === "login";
}

function buildDashboard() {
  const dl = $("figures");
  for (const [key, label] of FIGURES) {
    const div = document.createElement("div");
    const dt = document.createElement("dt");
    dt.textContent = label;
    const dd = document.createElement("dd");
    dd.id = `fig-${key}`;
    dd.textContent = "–";
    div.append(dt, dd);
    dl.append(div);
    figureValues[key] = dd;
  }
  for (const chart of Object.values(charts)) $("charts").append(chart.element);
}

const sum = (obj) => Object.values(obj ?? {}).reduce((a, b) => a + b, 0);

function totals(health) {
  const r = health.refusals ?? {};
  return {
    at: performance.now(),
    sent: health.traffic?.sent_bytes ?? 0,
    received: health.traffic?.received_bytes ?? 0,
    connections: r.connections ?? {},
    auth: r.auth ?? {},
    protocol: r.protocol_errors ?? {},
  };
}

function renderRooms(rooms) {
  const body = $("rooms").tBodies[0];
  body.replaceChildren();
  $("rooms-empty").hidden = rooms.length > 0;
  $("rooms").hidden = rooms.length === 0;
  for (const room of [...rooms].sort((a, b) => String(a.room).localeCompare(String(b.room)))) {
    const tr = document.createElement("tr");
    tr.dataset.room = room.room;
    const name = document.createElement("th");
    name.scope = "row";
    name.textContent = room.room;
    if (room.node) {
      const node = document.createElement("div");
      node.className = "tag";
      node.textContent = `node ${room.node}`;
      name.append(node);
    }
    const type = document.createElement("td");
    type.textContent = room.type ?? "";
    const members = room.members ?? [];
    const count = document.createElement("td");
    count.className = "num members";
    count.textContent = String(members.length);
    const lobby = document.createElement("td");
    lobby.className = "num";
    lobby.textContent = String(room.lobby ?? 0);
    const who = document.createElement("td");
    const list = document.createElement("ul");
    list.className = "who";
    for (const m of members) {
      const li = document.createElement("li");
      const flags = [m.role, m.connected ? null : "reconnecting", m.paused ? "paused" : null, m.muted ? "muted" : null];
      li.textContent = `${m.name} `;
      const tag = document.createElement("span");
      tag.className = "tag";
      tag.textContent = `(${flags.filter(Boolean).join(", ")})`;
      li.append(tag);
      list.append(li);
    }
    who.append(list);
    tr.append(name, type, count, lobby, who);
    body.append(tr);
  }
}

function renderNodes(nodes, self) {
  $("cluster").hidden = nodes === null;
  if (nodes === null) return;
  const body = $("nodes").tBodies[0];
  body.replaceChildren();
  for (const n of nodes) {
    const tr = document.createElement("tr");
    tr.dataset.node = n.node;
    const name = document.createElement("th");
    name.scope = "row";
    name.textContent = n.node === self ? `${n.node} (this one)` : n.node;
    const cells = [
      n.url ?? "",
      n.rooms ?? "–",
      `${n.members ?? "–"} / ${n.capacity ?? "–"}`,
      n.tick_p99_ms == null ? "–" : fmtMs(Number(n.tick_p99_ms)),
      n.cpu_percent == null ? "–" : `${n.cpu_percent} %`,
      n.draining === "1" ? "draining" : "serving",
    ];
    tr.append(name);
    for (const text of cells) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    body.append(tr);
  }
}

function renderRefusals(now, before) {
  const body = $("refusals").tBodies[0];
  body.replaceChildren();
  const kinds = [
    ["connection refused", now.connections, before?.connections],
    ["token refused", now.auth, before?.auth],
    ["protocol error", now.protocol, before?.protocol],
  ];
  let rows = 0;
  for (const [kind, counts, earlier] of kinds) {
    for (const [reason, n] of Object.entries(counts).sort()) {
      if (!n) continue;
      const tr = document.createElement("tr");
      const cells = [kind, reason, String(n), earlier ? String(n - (earlier[reason] ?? 0)) : "–"];
      cells.forEach((text, i) => {
        const td = document.createElement("td");
        if (i >= 2) td.className = "num";
        td.textContent = text;
        tr.append(td);
      });
      body.append(tr);
      rows += 1;
    }
  }
  $("refusals-empty").hidden = rows > 0;
  $("refusals").hidden = rows === 0;
}

function render(rooms, health, nodes) {
  const now = totals(health);
  const before = previous;
  previous = now;
  const seconds = before ? (now.at - before.at) / 1000 : 0;
  const rate = (a, b) => (before && seconds > 0 ? Math.max(0, (a - b) / seconds) : null);
  const delta = (a, b) => (before ? Math.max(0, sum(a) - sum(b)) : null);
  const members = rooms.reduce((n, r) => n + (r.members?.length ?? 0), 0);
  const tick = health.tick_work_ms ?? {};
  const audio = health.audio ?? {};
  const mix = audio.mix_ms ?? {};
  const out = rate(now.sent, before?.sent);
  const inn = rate(now.received, before?.received);
  const assets = health.assets ?? {};

  const set = (key, text) => {
    figureValues[key].textContent = text;
  };
  set("rooms", String(rooms.length));
  set("members", String(members));
  set("connections", fmtCount(health.connections));
  set("tickP50", fmtMs(tick.p50));
  set("tickP99", fmtMs(tick.p99));
  set("out", fmtRate(out));
  set("in", fmtRate(inn));
  set("audioPeers", audio.peers == null ? "–" : String(audio.peers));
  set("mixP99", fmtMs(mix.p99));
  set("refused", String(sum(now.connections) + sum(now.auth)));
  set("protocolErrors", String(sum(now.protocol)));
  set("assets", assets.files == null ? "–" : `${fmtBytes(assets.bytes)} in ${assets.files} file${assets.files === 1 ? "" : "s"}`);
  set("status", health.status ?? "–");

  charts.members.push([members, rooms.length]);
  charts.tick.push([tick.p50, tick.p99]);
  charts.traffic.push([out, inn]);
  charts.audio.push([mix.p50, mix.p99]);
  charts.refusals.push([
    delta(now.connections, before?.connections),
    delta(now.protocol, before?.protocol),
    delta(now.auth, before?.auth),
  ]);
  charts.assets.push([assets.bytes]);
  renderRooms(rooms);
  renderNodes(nodes, health.cluster?.node);
  // /health speaks for the node that answers; /admin/rooms for the whole cluster.
  $("scope").hidden = !health.cluster;
  $("scope").textContent = health.cluster
    ? `Figures and charts of node ${health.cluster.node} (the one this page came from); rooms and nodes of the whole cluster.`
    : "";
  renderRefusals(now, before);
  $("updated").textContent = `Last update ${new Date().toLocaleTimeString()}`;
}

let tickRate = 30;

async function poll() {
  const mine = generation;
  timer = null;
  try {
    // Tick percentiles over the last 2 s of ticks.
    const [admin, health] = await Promise.all([
      getJSON("/admin/rooms", token),
      getJSON(`/health?ticks=${Math.max(1, Math.round(tickRate * (PERIOD_MS / 1000)))}`),
    ]);
    if (mine !== generation) return;
    if (Number.isFinite(health.tick_rate) && health.tick_rate > 0) tickRate = health.tick_rate;
    // In a cluster, its nodes too (any node answers for all of them).
    const nodes = health.cluster ? ((await getJSON("/admin/nodes", token)).nodes ?? []) : null;
    if (mine !== generation) return;
    render(admin.rooms ?? [], health, nodes);
    if ($("dashboard").hidden) show("dashboard");
  } catch (err) {
    if (mine !== generation) return;
    if (err instanceof Refused) {
      refused(err);
      return;
    }
    previous = null; // no rate across an outage
    $("problem-title").textContent = "Cannot reach the server";
    $("problem-text").textContent =
      `The panel could not read the server's figures (${err.message}) at ${new Date().toLocaleTimeString()}.`;
    if ($("problem").hidden) {
      show("problem");
      $("retry").focus();
    }
  }
  if (mine === generation) timer = setTimeout(poll, PERIOD_MS);
}

function stop() {
  generation += 1;
  if (timer !== null) clearTimeout(timer);
  timer = null;
}

function refused(err) {
  stop();
  token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  const what = err.status === 401 ? "not valid here" : "not an operator's token";
  $("login-error-text").textContent = `The server refused this token (HTTP ${err.status}): ${err.message}. The token is ${what}; enter an admin token from medverse token --admin.`;
  $("login-error").hidden = false;
  show("login");
  $("token").value = "";
  $("token").focus();
}

function start() {
  stop();
  previous = null;
  poll();
}

function init() {
  buildDashboard();
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    if (!value) {
      $("login-error-title").textContent = "A token is needed";
      $("login-error-text").textContent = "Paste an admin token from medverse token --admin.";
      $("login-error").hidden = false;
      $("token").focus();
      return;
    }
    $("login-error-title").textContent = "This token was refused";
    $("login-error").hidden = true;
    token = value;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token").value = "";
    start();
  });
  $("retry").addEventListener("click", start);
  const signOut = () => {
    stop();
    token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    $("login-error").hidden = true;
    show("login");
    $("token").focus();
  };
  $("change-token").addEventListener("click", signOut);
  $("signout").addEventListener("click", signOut);
  if (token) start();
  else show("login");
}

init();
